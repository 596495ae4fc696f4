"""What the interpreter's environment holds for each variable of a traced program.

* :class:`Value`: an input-dependent array, described by the :class:`Kernel` of one of its
  channels and its per-example shape, plus what the rules need to combine values correctly
  (a pending elementwise function, which random layers it depends on, the input leaf it comes
  from).
* :class:`Concrete`: an array that does not depend on the input (parameters, constants).
* :class:`IntegerInput`: an integer or bool input leaf, which has no kernel.

Primitive rules receive a list of :class:`Value` and :class:`Concrete` objects (``invals``; the
interpreter handles integer leaves itself) and return one per output variable.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from ntk_adapters.infinite import elementwise as _ew
from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite.kernel import Kernel

__all__ = [
    "Concrete",
    "IntegerInput",
    "Interpreted",
    "Parameter",
    "Phi",
    "Value",
    "apply_phi",
    "depends_on_input",
    "input_value",
    "is_value",
    "new_id",
    "parameter",
]

_ids = itertools.count(1)


def new_id() -> int:
    """A fresh identity for a Gaussian base or a random linear layer (never reused in a process)."""
    return next(_ids)


@dataclasses.dataclass(frozen=True)
class Phi:
    """A pending elementwise function of a Gaussian value.

    Attributes:
      fn: the function itself (jnp-traceable on arrays of any shape); its Gaussian expectations
        are in closed form when :func:`ntk_adapters.infinite.elementwise.recognise` reads it as a
        member of the family of :mod:`ntk_adapters.infinite.forms`, else by quadrature.
      name: a closed-form name of :mod:`ntk_adapters.infinite.elementwise` (``'sin'``, ...) for a
        function outside that family, with its ``params`` as ``(key, value)`` pairs.
      linear: ``a`` when ``fn(x) = a·x`` by construction (multiplications by constants): a
        zero-mean Gaussian stays one, and the fresh output of a random layer stays fresh.
      where: the layer and primitive the function was built at, for messages.
    """

    fn: Callable[[jax.Array], jax.Array]
    name: Optional[str] = None
    params: tuple = ()
    linear: Optional[float] = None
    where: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Value:
    """An input-dependent value during interpretation.

    Attributes:
      kernel: the Kernel of the value, or of its Gaussian base when ``phi`` is set.
      shape: the per-example shape of the traced array (without the batch axis).
      flat: the spatial value ``(*spatial, C)`` was flattened to ``(prod(spatial)·C,)``; the
        kernel keeps the spatial structure.
      phi: a pending elementwise function of the Gaussian ``kernel`` (applied lazily, so that a
        chain of elementwise primitives is one function).
      base: identity of the Gaussian base, shared by values that are functions of it.
      fresh: id of the random linear layer whose output this is (through linear maps only):
        independent of, and zero-mean given, everything computed before that layer.
      deps: ids of every random linear layer this value depends on.
      source: for a value computed from one input leaf alone, that leaf's name (``x``,
        ``x['a']``, ``x[0]``), for messages.
      axes: ``None`` when the traced array is ``(batch, *spatial, C)``; else which of those
        canonical axes (0 the batch, ``1..D`` the positions, ``D + 1`` the channels) each traced
        axis is (the output of a ``transpose``, or of a product mixing positions with a constant
        matrix, :mod:`~ntk_adapters.infinite.mixing`). ``kernel`` and ``shape`` stay canonical, and
        ``phi`` is set (the identity at least), so that any rule materializing the value refuses it
        until a ``transpose`` restores the canonical order.
    """

    kernel: Kernel
    shape: tuple
    flat: bool = False
    phi: Optional[Phi] = None
    base: int = 0
    fresh: Optional[int] = None
    deps: frozenset = frozenset()
    source: Optional[str] = None
    axes: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class Concrete:
    """An array that does not depend on the input; ``scalar`` is set when every entry equals one scalar."""

    value: Any
    scalar: Any = None


@dataclasses.dataclass(frozen=True)
class IntegerInput:
    """An integer or bool input leaf (token ids, masks) during interpretation.

    It depends on the input but has no kernel: only a conversion to floats (which makes it an
    ordinary input feature) consumes it; every other equation receiving it is refused, naming
    ``name``. ``x1`` / ``x2`` are the leaf's arrays (``x2`` ``None`` when ``x2 = x1``).
    """

    name: str
    x1: Any
    x2: Any
    shape: tuple

    @property
    def dtype(self):
        return self.x1.dtype


def parameter(value, path: Optional[tuple] = None) -> Concrete:
    """A parameter of the model, as the interpreter starts from it; ``path`` is its key path in the
    params tree (``('language_model', 'positional_embeddings')``)."""
    return Parameter(value, value if np.ndim(value) == 0 else None, path=path)


@dataclasses.dataclass(frozen=True)
class Parameter(Concrete):
    """A concrete value computed from the model's parameters.

    At infinite width the parameters of the layers are random, so a parameter is not a constant
    of the input: an input constant that meets one (an embedding table indexed by token ids) is
    no longer a constant of the input.

    ``path``: the key path of the parameter leaf this is, through shape-only operations
    (:func:`~ntk_adapters.infinite.learned_arrays.carry`), else ``None``; ``tiled``: every slice
    along the leading axis is that leaf (a batch axis broadcast)."""

    path: Optional[tuple] = None
    tiled: bool = False


#: What a variable of the traced program holds during interpretation.
Interpreted = Union[Value, Concrete, IntegerInput]


def is_value(v: Any) -> bool:
    """Whether ``v`` is a :class:`Value` (has a kernel)."""
    return isinstance(v, Value)


def depends_on_input(v: Any) -> bool:
    """Whether an interpreted value depends on the input (a :class:`Value` or an :class:`IntegerInput`)."""
    return isinstance(v, (Value, IntegerInput))


def input_value(a1: jax.Array, a2: Optional[jax.Array], layout: str, name: str) -> Value:
    """A float input leaf as a deterministic input feature with its own kernel and base.

    A leaf ``(N,)`` (one number per example) is one channel: per-example shape ``()``.
    """
    shape = tuple(a1.shape[1:])
    if a1.ndim == 1:
        a1 = a1[:, None]
        a2 = None if a2 is None else a2[:, None]
    return Value(kernel=_layers.input_kernel(a1, a2, layout=layout), shape=shape, base=new_id(), source=name)


def apply_phi(v: Value, n_points: int) -> Value:
    """``v`` with its pending elementwise function applied to its (Gaussian) kernel.

    The result is a new base. A linear function ``a·x`` scales the kernel and keeps the value the
    fresh output of its linear layer; any other function makes it a non-Gaussian value.
    """
    phi = v.phi
    assert phi is not None, "apply_phi needs a value with a pending elementwise function"
    if v.axes is not None:
        from ntk_adapters.infinite.rules import InfiniteWidthError  # rules imports this module

        raise InfiniteWidthError(
            "an input-dependent value whose axes are not in the order (batch, *positions, channels) (since "
            f"{phi.where or 'a transpose'}) reaches an operation other than a transpose, an elementwise function or "
            "a product mixing positions with a constant matrix; transpose the value back first (e.g. "
            f"jnp.einsum('nic,ij->njc', h, A) rather than jnp.tensordot(h, A, axes=(1, 0))); {_programs.SUGGEST}"
        )
    factor = phi.linear
    form = None
    if factor is None:
        form = _ew.recognise(phi.fn, v.kernel.nngp.dtype)
        factor = None if form is None else form.linear_factor
    if factor is not None:
        k = v.kernel if factor == 1.0 else _layers.scale(v.kernel, factor)
        return Value(kernel=k, shape=v.shape, flat=v.flat, base=new_id(), fresh=v.fresh, deps=v.deps)
    label = phi.where
    try:
        if form is not None:
            k = _ew.apply_elementwise(v.kernel, form)
        elif phi.name is not None:
            k = _ew.apply_elementwise(v.kernel, phi.name, n_points=n_points, label=label, **dict(phi.params))
        else:
            k = _ew.apply_elementwise(v.kernel, phi.fn, n_points=n_points, label=label)
    except (TypeError, ValueError) as e:
        from ntk_adapters.infinite.rules import InfiniteWidthError  # rules imports this module

        raise InfiniteWidthError(
            f"{label or 'an elementwise function'}: its Gaussian expectations cannot be "
            f"computed ({type(e).__name__}: {e})"
        ) from None
    return Value(kernel=k, shape=v.shape, flat=v.flat, base=new_id(), fresh=None, deps=v.deps)

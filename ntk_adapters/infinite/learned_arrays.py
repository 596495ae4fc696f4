"""Parameter arrays added entry by entry to a value (learned positional embeddings) at infinite width.

A Transformer often adds a learned array to its token embeddings, ``h + P`` with ``P`` a parameter of
the per-example shape ``(*spatial, C)`` of ``h`` (``hk.get_parameter('pos', [T, D], init=...)``),
the same array for every example. At initialization the entries of ``P`` are i.i.d. draws of mean
zero and variance ``v`` (read from the parameter's initializer), independent of ``h``. For one
channel ``c``, two examples ``x, x'`` and two positions ``s, s'``::

    E[(h + P)(x, s) (h + P)(x', s')] = E[h(x, s) h(x', s')] + v·δ(s, s')

for every pair of examples, ``x = x'`` or not, because both read the same entry ``P[s, c]``; the
cross terms vanish (``P`` is independent of ``h`` and has mean zero). So the NNGP and the
per-input variances gain ``v`` at equal positions: in layout ``'diagonal'`` ``v`` is added to every
entry, in ``'full'`` ``v`` times the identity over positions (axes interleaved as in
:mod:`~ntk_adapters.infinite.kernel`), in ``'none'`` (a value ``(C,)``) ``v`` everywhere, as for a
bias. The derivative of ``(h + P)(x, s, c)`` with respect to ``P[s, c]`` is ``1`` (the standard
parameterization, as for a layer's bias in :func:`~ntk_adapters.infinite.layers.dense`), so the NTK
gains ``1·δ(s, s')``. ``h − P`` and ``P − h`` have the same kernel (``P`` is symmetric).

The sum of a zero-mean Gaussian value and an independent zero-mean Gaussian array is one again:
the result is Gaussian when ``h`` is (a pending elementwise function of ``h`` is applied first).
Other initializers keep the kernel exact but make the sum non-Gaussian.

Only the parameter leaf itself is accepted, reaching the addition through shape-only operations
(:func:`carry`): a leading axis of size one or of the batch size, reshapes, dtype conversions. A
slice of the parameter, one broadcast over positions or channels, a scaled or combined parameter,
or a value that already depends on the same parameter is refused, since then the entries added are
not i.i.d. draws independent of the value. The variance is the user's ``bias_variance`` override
for the parameter's path (``'language_model/positional_embeddings'``) or its last component, else
that of the initializer recorded when the model was adapted (``ntk_adapters.haiku.adapt`` records
them), else the addition is refused naming the path.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import initializers as _inits
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.values import Concrete, Value, is_value, new_id

__all__ = ["LearnedArrays", "add_array", "carry", "path_name"]

#: The shape-only operations through which a parameter leaf stays itself.
SHAPE_OPS = ("broadcast_in_dim", "reshape", "convert_element_type")


def _reason(shape: tuple, path: Optional[str] = None, why: Optional[str] = None) -> str:
    """Why a parameter array added entry by entry to a value has no rule: ``why`` says what keeps it
    from being an independent random term; without it, the variance of the parameter at ``path``
    (its params-tree path) is unknown."""
    head = (
        f"adds a parameter array of shape {shape} to an input-dependent value entry by entry (a learned "
        "additive positional embedding, or a bias written outside every layer with a rule)"
    )
    if why is not None:
        return f"{head}: {why}"
    name = f"parameter `{path}`" if path else "the parameter"
    return (
        f"{head}: at initialization it is an independent random term whose variance the kernel needs, but "
        f"the initializer of {name} is not known (ntk_adapters.haiku.adapt records the initializers of a "
        f"Haiku model); pass bias_variance={{'{path or '<path>'}': v}} to infinite_kernel_fn, with v the "
        "variance of one entry at initialization"
    )


def path_name(path: tuple) -> str:
    """``('language_model', 'positional_embeddings')`` → ``'language_model/positional_embeddings'``."""
    return "/".join(str(k) for k in path)


def carry(name: str, params: Mapping[str, Any], in_shape: tuple, out_shape: tuple, tiled: bool) -> Optional[bool]:
    """Whether a shape-only operation keeps a parameter leaf itself, per example.

    ``tiled`` is ``False`` when the array holds the leaf's entries once, in order, and ``True`` when
    every slice along its leading axis is the leaf. Returns the flag of the result, or ``None`` when
    the result is no longer the leaf (a slice, a broadcast over other axes, ...).
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if tiled and in_shape[:1] == (1,):
        tiled = False  # one copy of the leaf along a leading axis of size one: the leaf in order
    if name == "convert_element_type":
        return tiled
    if name == "reshape":
        if params.get("dimensions") is not None:
            return None
        if not tiled:
            return False
        return True if out_shape[:1] == in_shape[:1] and len(out_shape) >= 1 else None
    if name == "broadcast_in_dim":
        dims = tuple(params["broadcast_dimensions"])
        n = len(in_shape)
        if out_shape == in_shape and dims == tuple(range(n)):
            return tiled
        if tiled:
            return None
        lead = len(out_shape) - n
        if lead >= 1 and dims == tuple(range(lead, lead + n)) and out_shape[lead:] == in_shape:
            # new leading axes: of size one (the leaf in order), or one of the batch size
            if all(d == 1 for d in out_shape[:lead]):
                return False
            return True if lead == 1 else None
        if len(out_shape) == n and n and dims == tuple(range(n)) and in_shape[0] == 1 and out_shape[1:] == in_shape[1:]:
            return out_shape[0] > 1
    return None


def add_array(kernel: Kernel, variance: float) -> Kernel:
    """The kernel of ``h + P`` for ``P`` an independent array of i.i.d. zero-mean entries of variance
    ``variance`` shared by all examples: ``variance·δ(s, s')`` added to the NNGP and the per-input
    variances, ``δ(s, s')`` to the NTK (module docstring). ``is_gaussian`` is kept from ``kernel``."""
    dtype = kernel.nngp.dtype
    if kernel.layout == "full":
        same: Any = jnp.ones((), dtype)
        for n in kernel.spatial:
            same = same[..., None, None] * jnp.eye(n, dtype=dtype)
    else:
        same = jnp.ones((), dtype)
    v = jnp.asarray(variance, dtype)
    return kernel.replace(
        nngp=kernel.nngp + v * same,
        ntk=None if kernel.ntk is None else kernel.ntk + same,
        cov1=kernel.cov1 + v * same,
        cov2=kernel.cov2 + v * same,
        **kernel.map_variances(lambda var: var + v),
    )


def _lookup(tree, path: tuple):
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError):
            return None
    return node


class LearnedArrays:
    """The rule for ``value + parameter`` of one interpretation.

    Args:
      params: the model's params tree (for the shape of a leaf).
      initializers: the initializers recorded when the model was adapted, by params-tree key path
        (``{('language_model', 'positional_embeddings'): init}``), or ``None``.
    """

    def __init__(self, params, initializers: Optional[Mapping[tuple, Any]] = None):
        self.params = params
        self.initializers = dict(initializers or {})
        # One identity per parameter leaf, in the deps of every value it was added to.
        self._ids: dict = {}

    def variance(self, path: tuple, shape: tuple, options: _rules.EngineOptions) -> Optional[float]:
        """``Var(P[i])`` of the leaf at ``path``: the user's ``bias_variance`` for it, else its recorded
        initializer's, else ``None``. Raises for an initializer whose variance is not known exactly."""
        name = path_name(path)
        o = _rules.variance_override(options.bias_variance, name)
        if o is not None:
            return o
        init = self.initializers.get(tuple(path))
        if init is None:
            return None
        leaf = _lookup(self.params, path)
        try:
            return _inits.variance(init, np.shape(leaf) if leaf is not None else shape, what=f"parameter {name}")
        except _inits.UnknownInitializerError as e:
            raise _rules.InfiniteWidthError(
                f"{e}; or pass bias_variance={{'{name}': v}} with v the variance of one entry of `{name}`"
            ) from None

    def add(self, eqn, invals, ctx: _rules.PrimitiveContext) -> list:
        """``h ± P`` (or ``P ± h``) for ``P`` a parameter leaf; raises naming why otherwise."""
        (h,) = [v for v in invals if is_value(v)]
        (c,) = [v for v in invals if isinstance(v, Concrete)]
        shape = tuple(np.shape(c.value))
        path = getattr(c, "path", None)

        def refuse(why: Optional[str] = None, named: Optional[str] = None):
            return ctx.error(eqn, _reason(shape, path=named, why=why))

        if path is None:
            raise refuse(
                "it is not a parameter itself reaching the addition through reshapes, dtype conversions and a "
                "leading batch axis only (it is sliced, broadcast over positions or channels, scaled, or "
                "combined with other arrays), so its entries are not known to be i.i.d. draws of one "
                "parameter's initializer, independent of the value"
            )
        name = path_name(path)
        tiled = bool(getattr(c, "tiled", False))
        per_example = shape[1:]
        if per_example != tuple(h.shape) or not shape or not (shape[0] == 1 or (tiled and shape[0] == ctx.batch)):
            raise refuse(
                f"it is parameter `{name}` broadcast over the value's positions or channels (per-example shape "
                f"{tuple(h.shape)}), so one entry is added at several places; only the parameter itself, one entry "
                "per position and channel, is an independent term"
            )
        pid = self._ids.setdefault(tuple(path), new_id())
        if pid in h.deps:
            raise refuse(f"the value already depends on parameter `{name}`, so their covariance is unknown")
        try:
            v = self.variance(tuple(path), per_example, ctx.options)
        except _rules.InfiniteWidthError as e:
            raise ctx.error(eqn, str(e)) from None
        if v is None:
            raise refuse(named=name)
        h = ctx.materialize(h, eqn)
        k = add_array(h.kernel, v)
        return [Value(kernel=k, shape=h.shape, flat=h.flat, base=new_id(), fresh=None, deps=h.deps | {pid})]

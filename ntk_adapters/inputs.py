"""Inputs as pytrees, and the batch axes of independent examples.

Every function of the library takes ``x`` as an array ``(N, *input_shape)`` or as a pytree (tuple,
dict, ...) of arrays that share the leading batch axis: tokens with their lengths or masks, images
with labels, token types. Integer leaves (token ids) are passed to the model unchanged.

``vmap_axes`` follows neural-tangents: an int ``a`` declares that examples are independent along
input axis ``a`` and output axis ``a``; a pytree prefix of ``x`` (``(0, None)``: the second input
is shared by every example) gives the input axes, with the output axis their common value; the
triple ``(in_axes, out_axes, kwargs_axes)`` gives both explicitly. The library's kernel functions
take their per-example inputs inside ``x``, so ``kwargs_axes`` must be empty.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_is_none = lambda a: a is None  # noqa: E731 - a leaf predicate for tree_flatten


def leaves_with_names(x: PyTree, name: str) -> list[tuple[str, Any]]:
    """``[(name + keystr(path), leaf)]`` of an input pytree, for messages."""
    return [(name + jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(x)]


def num_examples(x: PyTree, name: str = "x", batch: Optional["BatchAxes"] = None) -> int:
    """The size of the batch axis shared by the leaves of ``x`` (axis 0, or as ``batch`` says;
    leaves that ``batch`` marks as shared by every example are skipped).

    Raises ``ValueError`` naming the leaf when one has no batch axis, when sizes differ, or when
    ``x`` has no array at all.
    """
    leaves = leaves_with_names(x, name)
    if not leaves:
        raise ValueError(f"{name} holds no array; pass an array (N, ...) or a pytree of arrays with a batch axis")
    axes = [0] * len(leaves) if batch is None else batch.per_leaf(x)
    sizes = {}
    for (where, leaf), axis in zip(leaves, axes):
        if axis is None:
            continue
        shape = np.shape(leaf)
        if len(shape) <= axis:
            raise ValueError(
                f"{where} has no batch axis: every input needs shape (N, ...) with the examples on axis "
                f"{axis}; got shape {shape}. For a single example use x[None]"
            )
        sizes[where] = shape[axis]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"the leaves of {name} must share the batch size on axis 0; got {listing}")
    return next(iter(sizes.values()))


def check_pair(x1: PyTree, x2: Optional[PyTree], batch: Optional["BatchAxes"] = None) -> None:
    """Check that ``x1`` (and ``x2``) have a batch axis and the same per-example structure."""
    num_examples(x1, "x1", batch)
    if x2 is None:
        return
    num_examples(x2, "x2", batch)
    t1, t2 = jax.tree_util.tree_structure(x1), jax.tree_util.tree_structure(x2)
    if t1 != t2:  # type: ignore[operator]  # PyTreeDef's stub is unresolved; it defines ==
        raise ValueError(f"x1 and x2 must have the same structure; got\n  {t1}\nand\n  {t2}")
    for (w1, a), (_, b) in zip(leaves_with_names(x1, "x1"), leaves_with_names(x2, "x2")):
        if np.shape(a)[1:] != np.shape(b)[1:]:
            raise ValueError(
                f"x1 and x2 must have the same per-example shape: {w1} is {np.shape(a)} and its "
                f"x2 counterpart {np.shape(b)} (batch axis first)"
            )


def spec(x: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` of every leaf (shapes and dtypes only)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), x)


def hashable_spec(x: PyTree) -> tuple:
    """A hashable key of the structure, shapes and dtypes of ``x`` (for caches)."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    return treedef, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in leaves)


def example_spec(x: PyTree) -> PyTree:
    """Per-example ``ShapeDtypeStruct`` of every leaf (the batch axis dropped)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), x)


def rows(x: PyTree, index: Any) -> PyTree:
    """``x[index]`` on every leaf (a slice or index array along the batch axis)."""
    return jax.tree_util.tree_map(lambda a: a[index], x)


def concatenate(a: PyTree, b: PyTree) -> PyTree:
    """Stack two input batches of the same structure along the batch axis."""
    return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([jnp.asarray(u), jnp.asarray(v)]), a, b)


def as_arrays(x: PyTree) -> PyTree:
    """Every leaf as a jax array, integer dtypes kept."""
    return jax.tree_util.tree_map(jnp.asarray, x)


def zeros_like_spec(per_example: PyTree, n: int = 1) -> PyTree:
    """A batch of ``n`` zero examples with the given per-example specs (integer dtypes kept)."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros((n,) + tuple(s.shape), s.dtype), per_example)


@dataclasses.dataclass(frozen=True)
class BatchAxes:
    """Where independent examples sit: input axes (a pytree prefix of ``x``) and the output axis.

    Stored flattened so that it is hashable (it keys compiled-function caches).
    """

    in_leaves: tuple[Optional[int], ...]
    in_treedef: Any
    out_axis: int

    @property
    def in_axes(self) -> PyTree:
        return jax.tree_util.tree_unflatten(self.in_treedef, list(self.in_leaves))

    @classmethod
    def of(cls, in_axes: PyTree, out_axis: int) -> "BatchAxes":
        leaves, treedef = jax.tree_util.tree_flatten(in_axes, is_leaf=_is_none)
        return cls(tuple(leaves), treedef, int(out_axis))

    def per_leaf(self, x: PyTree) -> list[Optional[int]]:
        """The batch axis of each leaf of ``x`` (``None``: the leaf is shared by every example)."""
        try:
            full = jax.tree.broadcast(self.in_axes, x, is_leaf=_is_none)
        except ValueError as err:
            raise ValueError(
                f"vmap_axes: the input axes {self.in_axes!r} are not a prefix of the structure of x "
                f"{jax.tree_util.tree_structure(x)}"
            ) from err
        return jax.tree_util.tree_leaves(full, is_leaf=_is_none)

    def expand(self, x_one: PyTree) -> PyTree:
        """One example as a batch of one, the batch axis inserted where ``x`` has it."""
        return _map_axes(self, x_one, lambda a, ax: a if ax is None else jnp.expand_dims(a, ax))

    def squeeze_out(self, y: jax.Array) -> jax.Array:
        return jnp.squeeze(y, self.out_axis)

    def example(self, x: PyTree) -> PyTree:
        """Per-example ``ShapeDtypeStruct`` of ``x`` (batch axes dropped, shared leaves kept whole)."""

        def one(a, ax):
            shape = tuple(int(d) for d in np.delete(np.shape(a), ax)) if ax is not None else tuple(np.shape(a))
            return jax.ShapeDtypeStruct(shape, jnp.result_type(a))

        return _map_axes(self, x, one)


def _map_axes(axes: BatchAxes, x: PyTree, fn) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(x)
    per_leaf = axes.per_leaf(x)
    return jax.tree_util.tree_unflatten(treedef, [fn(a, ax) for a, ax in zip(leaves, per_leaf)])


def parse_vmap_axes(vmap_axes: Any, name: str = "vmap_axes") -> Optional[BatchAxes]:
    """Canonical :class:`BatchAxes` of a ``vmap_axes`` argument in neural-tangents' forms.

    ``None`` means examples may interact (no per-example path). An int gives both axes. A triple
    ``(in_axes, out_axes, kwargs_axes)`` (recognized by its dict or ``None`` third entry) gives them
    explicitly. Any other pytree is ``in_axes``, with the output axis their common int.
    """
    if vmap_axes is None:
        return None
    if _is_int(vmap_axes):
        return BatchAxes.of(int(vmap_axes), int(vmap_axes))
    if (
        isinstance(vmap_axes, tuple)
        and len(vmap_axes) == 3
        and (vmap_axes[2] is None or isinstance(vmap_axes[2], dict))
    ):
        in_axes, out_axes, kwargs_axes = vmap_axes
        if kwargs_axes:
            raise ValueError(
                f"{name}={vmap_axes!r} gives kwargs_axes {kwargs_axes!r}, but this library's kernel functions "
                "take per-example inputs inside x (a tuple or dict of arrays): put those arguments into x "
                "and give their axes in in_axes"
            )
        if not _is_int(out_axes):
            raise TypeError(f"{name}: out_axes must be an int (models return one array); got {out_axes!r}")
        _check_in_axes(in_axes, name)
        return BatchAxes.of(in_axes, int(out_axes))
    _check_in_axes(vmap_axes, name)
    ints = {a for a in jax.tree_util.tree_leaves(vmap_axes, is_leaf=_is_none) if a is not None}
    if len(ints) != 1:
        raise ValueError(
            f"{name}={vmap_axes!r} gives input axes {sorted(ints)} but no output axis; pass the triple "
            "(in_axes, out_axes, {}) to say where the batch axis of the output is"
        )
    return BatchAxes.of(vmap_axes, ints.pop())


def _is_int(a: Any) -> bool:
    return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


def _check_in_axes(in_axes: PyTree, name: str) -> None:
    leaves = jax.tree_util.tree_leaves(in_axes, is_leaf=_is_none)
    bad = [a for a in leaves if a is not None and not _is_int(a)]
    if bad or not leaves:
        raise TypeError(f"{name}: input axes must be ints or None (one per input leaf or subtree); got {in_axes!r}")
    if all(a is None for a in leaves):
        raise ValueError(f"{name}={in_axes!r} batches no input; use vmap_axes=None for a whole-batch kernel")


# --------------------------------------------------------------------------------------------
# How adapters pass x to a framework model: one argument, positional arguments or keywords.

Inputs = Literal["one", "args", "kwargs"]
_INPUTS = ("one", "args", "kwargs")


def check_inputs_mode(inputs: Any, x: PyTree, name: str) -> None:
    """Raise a clear error unless ``x`` can be passed to the model the way ``inputs`` says."""
    if inputs not in _INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(map(repr, _INPUTS))}; got {inputs!r}")
    if inputs == "args" and not isinstance(x, (tuple, list)):
        raise ValueError(
            f"inputs='args' spreads {name} as positional arguments, so {name} must be a tuple or list "
            f"such as (tokens, lengths); got {type(x).__name__}. For a single input use inputs='one'."
        )
    if inputs == "kwargs" and not (isinstance(x, Mapping) and all(isinstance(k, str) for k in x)):
        raise ValueError(
            f"inputs='kwargs' spreads {name} as keyword arguments, so {name} must be a dict with str "
            f"keys such as {{'tokens': ..., 'lengths': ...}}; got {type(x).__name__}"
        )


def spread(inputs: str, x: PyTree, kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
    """The positional and keyword arguments of one call of the model."""
    if inputs == "one":
        return (x,), dict(kwargs)
    if inputs == "args":
        return tuple(x), dict(kwargs)
    clash = sorted(set(x) & set(kwargs))
    if clash:
        raise ValueError(
            f"inputs='kwargs': {clash} are keys of x and also fixed keyword arguments of the call; "
            "pass each argument once"
        )
    return (), {**x, **kwargs}


# --------------------------------------------------------------------------------------------
# vmap_axes='auto' and explicit vmap_axes, checked against the traced program.


class _ByFunction:
    """Hashes a Model by its function, framework and parameter/input shapes (for the cache below)."""

    def __init__(self, model, x):
        self.model = model
        self.key = (model.apply_fn, model.framework, hashable_spec(model.params), hashable_spec(x))

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _ByFunction) and self.key == other.key


@functools.lru_cache(maxsize=256)
def _coupling(wrapped: _ByFunction, x_key: tuple, batch: BatchAxes):
    from ntk_adapters.independence import find_model_coupling

    x = jax.tree_util.tree_unflatten(x_key[0], [jax.ShapeDtypeStruct(s, d) for s, d in x_key[1]])
    return find_model_coupling(wrapped.model, x, batch.in_axes, batch.out_axis)


def declared_vmap_axes(vmap_axes: Any, name: str = "vmap_axes") -> Optional[BatchAxes]:
    """Validate a ``vmap_axes`` argument when a kernel function is built; the axes it declares
    (``None`` for ``'auto'`` and ``None``)."""
    if isinstance(vmap_axes, str):
        if vmap_axes != "auto":
            raise ValueError(
                f"{name}={vmap_axes!r}; pass 'auto', None, an int, a pytree of input axes, "
                "or the triple (in_axes, out_axes, {{}})"
            )
        return None
    return parse_vmap_axes(vmap_axes, name)


def resolve_vmap_axes(model, x: PyTree, vmap_axes: Any, name: str = "vmap_axes") -> Optional[BatchAxes]:
    """The batch axes to use for ``model`` on inputs like ``x``, or ``None`` for whole-batch kernels.

    ``'auto'`` takes the per-example path along axis 0 exactly when the traced program proves that
    examples do not interact (:mod:`ntk_adapters.independence`); otherwise ``None``. An explicit
    ``vmap_axes`` is checked the same way and refused, naming the operation and the layer, when
    examples provably interact; where the analysis cannot follow the program it is taken as given.
    """
    declared = declared_vmap_axes(vmap_axes, name)
    if declared is None and vmap_axes is None:
        return None
    batch = BatchAxes.of(0, 0) if declared is None else declared
    try:
        coupling = _coupling(_ByFunction(model, x), hashable_spec(x), batch)
    except Exception:  # noqa: BLE001 - a program the analysis cannot trace proves nothing
        coupling = _Unproven()
    if coupling is None:
        return batch
    if vmap_axes == "auto":
        return None
    if coupling.certain:
        raise ValueError(
            f"{name}={vmap_axes!r} declares that examples are independent, but they are not: "
            f"{coupling.message().rstrip('.')}. Use {name}=None (whole-batch kernels, exact for any model), or 'auto'"
        )
    return batch


class _Unproven:
    """What an analysis that failed to run proves: nothing."""

    certain = False

    def message(self) -> str:
        return "the traced program could not be analysed for interactions between examples"


def batch_coupling(model, x: PyTree, params: Optional[PyTree] = None):
    """The first operation of ``model`` that combines examples along axis 0 of ``x`` (a
    :class:`ntk_adapters.independence.BatchCoupling`), or ``None`` when examples provably do not
    interact (``params`` replaces the Model's). Kernel functions carry it as their
    ``batch_coupling(x, params=None)`` attribute, so that tiling (:func:`ntk_adapters.batch`) can
    refuse kernels whose tiles are not blocks of the whole."""
    if params is not None:
        model = model.replace(params=params)
    try:
        return _coupling(_ByFunction(model, x), hashable_spec(x), BatchAxes.of(0, 0))
    except Exception:  # noqa: BLE001 - a program the analysis cannot trace proves nothing
        return _Unproven()


class CoupledKernelFn(Protocol):
    """A kernel function (arguments as its maker documents) carrying
    ``batch_coupling(x, params=None)`` (:func:`batch_coupling` for its model)."""

    batch_coupling: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def with_batch_coupling(fn: Callable[..., Any], coupling: Callable[..., Any]) -> CoupledKernelFn:
    """``fn`` with ``coupling`` set as its ``batch_coupling`` attribute."""
    typed = cast(CoupledKernelFn, fn)
    typed.batch_coupling = coupling
    return typed

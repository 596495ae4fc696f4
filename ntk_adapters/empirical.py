"""Empirical (finite-width) NTK and NNGP of any model in the ``(params, x) -> y`` signature.

For outputs ``f(x1)`` of shape ``(N1, *O)`` and ``f(x2)`` of shape ``(N2, *O)``:

* ``ntk(x1, x2) = J(x1) J(x2)ᵀ`` with ``J`` the Jacobian of the outputs with respect to the
  trainable parameters;
* ``nngp(x1, x2) = f(x1) f(x2)ᵀ`` for the current parameters (averaged over initializations by
  :func:`ntk_adapters.monte_carlo_kernel_fn`).

Output axes follow :mod:`ntk_adapters.axes`: with the default ``trace_axes=(-1,)`` the result
is ``(N1, N2)``, the per-output kernel (averaged over outputs); ``trace_axes=()`` gives
``(N1, N2, O, O)``. An infinite-width kernel is ``(N1, N2)`` because there the full kernel is
``K ⊗ I_O``: outputs are independent and identically distributed. A wide network's empirical
``(N1, N2, O, O)`` kernel approaches ``K[:, :, None, None] * eye(O)``.

Implementations (``implementation=``):

* ``'jacobian'``: materialize both Jacobians and contract them leaf by leaf. Time
  ``~ N·O`` backward passes plus ``N1·N2·O²·P`` multiply-adds; memory ``(N1 + N2)·O·P``.
* ``'ntvp'``: NTK-vector products: for each output entry of ``x2`` pull a cotangent back to
  parameter space (VJP) and push it forward through ``x1`` (JVP); never stores ``J(x1)`` and
  processes the ``N2·O`` basis vectors in chunks, so memory stays ``chunk·P``. Time
  ``~ N2·O·(N1 + N2)`` forward-equivalents.
* ``'structured'``: layer factorization (:mod:`ntk_adapters.structured`): a dense or
  convolutional weight's contribution is an activation Gram times an output-cotangent Gram, so
  its Jacobian block is never formed; leaves that cannot be factorized use their Jacobian. Fast
  when ``vmap_axes`` declares independent examples (then ``~ O`` backward passes per example
  for the cotangents plus ``N1·N2·(fan_in + O·fan_out)`` multiply-adds per dense layer, ``O²``
  in place of ``O`` for ``trace_axes=()``); exact but about as costly as ``'jacobian'`` with
  ``vmap_axes=None``.
* ``'auto'`` (default): ``'structured'`` when ``vmap_axes`` is given and its multiply-add estimate
  from the shapes (:func:`ntk_adapters.structured.structured_cost`) is below ``'jacobian'``'s and
  its memory estimate fits in ``memory_budget`` bytes (default 1 GiB); otherwise ``'jacobian'``
  when both Jacobians fit in ``memory_budget``, else ``'ntvp'``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.axes import Axes, OutputAxes
from ntk_adapters.model import Model, ModelLike, PyTree, as_model, check_array_output, check_params_match, module_path
from ntk_adapters.outputs import Get, normalize_get, pack
from ntk_adapters.structured import structured_contributions, structured_cost

IMPLEMENTATIONS = ("auto", "jacobian", "ntvp", "structured")
Subset = Union[None, str, Sequence[str], Callable[[str], bool]]

KernelFn = Callable[..., Any]


# --------------------------------------------------------------------------------------------
# Input checks shared by every kernel function.


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_finite(tree: PyTree, name: str) -> None:
    """Raise ``ValueError`` if a concrete array in ``tree`` has NaN or Inf (tracers are skipped)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if _is_concrete(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            if not bool(np.all(np.isfinite(np.asarray(leaf)))):
                where = f" at {jax.tree_util.keystr(path)}" if path else ""
                raise ValueError(
                    f"{name}{where} contains NaN or Inf; kernels of non-finite values are meaningless. "
                    "Clean the data, or pass check_finite=False to let NaNs propagate."
                )


def check_inputs(x1: jax.Array, x2: Optional[jax.Array]) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and np.ndim(x) < 1:
            raise ValueError(f"{name} must have a batch axis: shape (N, ...); got a scalar")
    if x2 is not None and np.shape(x1)[1:] != np.shape(x2)[1:]:
        raise ValueError(
            f"x1 and x2 must have the same per-example shape: x1 is {np.shape(x1)} and x2 is "
            f"{np.shape(x2)} (batch axis first)"
        )


def checked_call(model: Model, x1, x2, params: Optional[PyTree], finite: bool) -> PyTree:
    """Validate one kernel call's arguments and return the params to use (the Model's by default)."""
    if params is None:
        if model.params is None:
            raise ValueError("no params: pass params=... to the kernel function, or build a Model that holds them")
        params = model.params
    else:
        check_params_match(model.params, params)
    check_inputs(x1, x2)
    if finite:
        check_finite(x1, "x1")
        check_finite(x2, "x2")
        check_finite(params, "params")
    return params


# --------------------------------------------------------------------------------------------
# Parameter subsets and groups.


def _path_predicate(subset: Subset) -> Callable[[str], bool]:
    if callable(subset):
        return subset
    prefixes = (subset,) if isinstance(subset, str) else tuple(subset)
    return lambda path: any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _leaf_paths(params: PyTree) -> list[str]:
    return [module_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def layer_of(path: str) -> str:
    """The module path owning a parameter: ``'Dense_0/kernel' -> 'Dense_0'``."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def select_leaves(params: PyTree, subset: Subset) -> tuple[int, ...]:
    """Indices (in ``tree_leaves`` order) of the parameters selected by ``subset``."""
    paths = _leaf_paths(params)
    keep = _path_predicate(subset)
    selected = tuple(i for i, p in enumerate(paths) if keep(p))
    if not selected:
        raise ValueError(f"subset={subset!r} selects no parameter; the parameter paths are {paths}")
    return selected


def _restricted(apply_fn, params: PyTree, selected: Optional[tuple[int, ...]]):
    """``(g, sub)``: ``g(sub, x)`` is ``apply_fn`` as a function of the selected leaves only."""
    if selected is None:
        return apply_fn, params
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def g(sub, x):
        full = list(leaves)
        for i, leaf in zip(selected, sub):
            full[i] = leaf
        return apply_fn(jax.tree_util.tree_unflatten(treedef, full), x)

    return g, [leaves[i] for i in selected]


# --------------------------------------------------------------------------------------------
# The two contractions.


def _jacobian_contributions(apply_fn, params, x1, x2, axes: OutputAxes) -> list[jax.Array]:
    """Per-leaf NTK contributions ``J1_leaf J2_leafᵀ`` (untraced sums; divided later)."""
    jac = jax.jacrev(apply_fn)
    j1 = jax.tree_util.tree_leaves(jac(params, x1))
    j2 = j1 if x2 is None else jax.tree_util.tree_leaves(jac(params, x2))
    return _contract(j1, j2, axes)


def _contract(j1: list[jax.Array], j2: list[jax.Array], axes: OutputAxes) -> list[jax.Array]:
    first, second, result = axes.letters()
    out = []
    for leaf1, leaf2 in zip(j1, j2):
        p = "".join(chr(ord("α") + i) for i in range(leaf1.ndim - axes.ndim))
        out.append(jnp.einsum(f"{first}{p},{second}{p}->{result}", leaf1, leaf2))
    return out


def _ntvp_kernel(apply_fn, params, x1, x2, axes: OutputAxes, chunk: int) -> jax.Array:
    x2_ = x1 if x2 is None else x2
    f1 = lambda p: apply_fn(p, x1)
    y2, vjp2 = jax.vjp(lambda p: apply_fn(p, x2_), params)
    size2 = math.prod(y2.shape)

    def column(i):
        basis = jnp.zeros(size2, y2.dtype).at[i].set(1).reshape(y2.shape)
        (tangent,) = vjp2(basis)
        return jax.jvp(f1, (params,), (tangent,))[1]

    cols = jax.lax.map(column, jnp.arange(size2), batch_size=min(chunk, size2))  # (size2, *y1)
    y1_shape = cols.shape[1:]
    cols = cols.reshape(y2.shape + y1_shape)
    nd = axes.ndim
    # (*y2, *y1) -> interleaved (a1, a2, b1, b2, ...), then trace/diagonal.
    perm = [k for a in range(nd) for k in (nd + a, a)]
    return axes.reduce_full(jnp.transpose(cols, perm))


def _choose(implementation: str, n_entries: int, itemsize: int, memory_budget: float) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    return "jacobian" if n_entries * itemsize <= memory_budget else "ntvp"


# --------------------------------------------------------------------------------------------
# Public kernel functions.


def empirical_ntk_fn(
    f: ModelLike,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Optional[int] = None,
    implementation: str = "auto",
    subset: Subset = None,
    by_layer: bool = False,
    memory_budget: float = 2**30,
    ntvp_chunk: int = 256,
    check_finite_values: bool = True,
) -> KernelFn:
    """The empirical neural tangent kernel ``J(x1) J(x2)ᵀ`` of a model.

    Args:
      f: a :class:`~ntk_adapters.Model` or a function ``f(params, x) -> y``.
      trace_axes: output axes to contract and average (default: the last, i.e. the outputs).
      diagonal_axes: output axes to keep once (only equal indices paired).
      vmap_axes: ``None`` (default) differentiates the whole batch at once, exact for any model;
        an int ``a`` declares that examples are independent along input axis ``a`` and output
        axis ``a`` (no batch statistics), so the Jacobian is taken one example at a time, which
        is much cheaper for large batches.
      implementation: ``'jacobian'``, ``'ntvp'``, ``'structured'`` or ``'auto'`` (see module
        docstring).
      subset: only differentiate the parameters whose module path (``'Dense_2'``,
        ``'mlp/~/linear_1'``) equals or starts with one of these strings, or for which this
        predicate of the parameter path (``'Dense_2/kernel'``) is true. E.g. ``subset='Dense_2'``
        gives the NTK of training only the last layer.
      by_layer: return a dict ``{module path: NTK contribution}`` whose values sum to the NTK.
      memory_budget: bytes allowed for both Jacobians before ``'auto'`` switches to ``'ntvp'``.
      ntvp_chunk: basis vectors processed together by ``'ntvp'``.
      check_finite_values: raise on NaN/Inf in concrete inputs and params (skipped under ``jit``,
        where NaNs propagate).

    Returns:
      ``ntk(x1, x2=None, params=None)`` with ``x1`` ``(N1, *input)``, ``x2`` ``(N2, *input)``
      (``None`` means ``x1``) and ``params`` defaulting to the Model's. Output shape: ``(N1, N2)``
      for outputs ``(N, O)`` and the default ``trace_axes``; ``(N1, N2, O, O)`` with
      ``trace_axes=()``; ``(N1, N2, O)`` with ``trace_axes=(), diagonal_axes=(-1,)``.

    Example::

      ntk = empirical_ntk_fn(model)
      ntk(x_train).shape               # (N, N)
      ntk(x_test, x_train).shape       # (M, N)
    """
    model = as_model(f)
    _check_vmap_axes(vmap_axes)

    def ntk(x1: jax.Array, x2: Optional[jax.Array] = None, params: Optional[PyTree] = None):
        params = checked_call(model, x1, x2, params, check_finite_values)
        selected = None if subset is None else select_leaves(params, subset)
        paths = _leaf_paths(params)
        groups = tuple(layer_of(paths[i]) for i in (range(len(paths)) if selected is None else selected))
        axes = _output_axes(model.apply_fn, params, x1, x2, trace_axes, diagonal_axes)
        leaves = jax.tree_util.tree_leaves(params)
        used = leaves if selected is None else [leaves[i] for i in selected]
        n_out = math.prod(jax.eval_shape(model.apply_fn, params, x1[:1]).shape[1:])
        n_params = sum(math.prod(np.shape(p)) for p in used)
        n = np.shape(x1)[0] + (0 if x2 is None else np.shape(x2)[0])
        itemsize = jnp.result_type(*used).itemsize
        impl = _choose(implementation, n * n_out * n_params, itemsize, memory_budget)
        if implementation == "auto" and vmap_axes is not None:
            try:
                cost = structured_cost(model.apply_fn, params, x1, x2, axes, vmap_axes, selected)
            except Exception:  # a model that cannot be traced on abstract shapes: keep the simpler choice
                cost = None
            if cost and cost["structured_flops"] < cost["jacobian_flops"] and cost["structured_bytes"] <= memory_budget:
                impl = "structured"
        if by_layer and impl == "ntvp":
            impl = "jacobian"  # NTK-vector products do not separate the layers
        compute = _ntk_jit(model.apply_fn, axes, impl, vmap_axes, ntvp_chunk, selected, groups if by_layer else None)
        return compute(params, x1, x2)

    return ntk


def _check_vmap_axes(vmap_axes) -> None:
    if vmap_axes is not None and (not isinstance(vmap_axes, int) or isinstance(vmap_axes, bool)):
        raise TypeError(f"vmap_axes must be None or an int batch axis; got {vmap_axes!r}")


def _output_axes(apply_fn, params, x1, x2, trace_axes, diagonal_axes) -> OutputAxes:
    y1 = check_array_output(jax.eval_shape(apply_fn, params, x1), "the model")
    y2 = y1 if x2 is None else check_array_output(jax.eval_shape(apply_fn, params, x2), "the model")
    axes = OutputAxes.make(len(y1.shape), trace_axes, diagonal_axes)
    axes.check_shapes(y1.shape, y2.shape)
    return axes


@functools.lru_cache(maxsize=256)
def _ntk_jit(apply_fn, axes: OutputAxes, impl: str, vmap_axes, chunk: int, selected, groups):
    def compute(params, x1, x2):
        g, sub = _restricted(apply_fn, params, selected)
        if impl == "ntvp":
            return _ntvp_kernel(g, sub, x1, x2, axes, chunk)
        if impl == "structured":
            parts = structured_contributions(g, sub, x1, x2, axes, vmap_axes)
        elif vmap_axes is None:
            parts = _jacobian_contributions(g, sub, x1, x2, axes)
        else:
            parts = _vmapped_jacobian(g, sub, x1, x2, axes, vmap_axes)
        return _combine(parts, groups, axes, jax.eval_shape(g, sub, x1).shape)

    return jax.jit(compute)


def _combine(parts, groups, axes: OutputAxes, out_shape):
    scale = axes.trace_size(out_shape)
    if groups is None:
        return sum(parts) / scale
    out: dict[str, jax.Array] = {}
    for g, part in zip(groups, parts):
        out[g] = out.get(g, 0) + part / scale
    return out


def _vmapped_jacobian(apply_fn, params, x1, x2, axes: OutputAxes, batch_axis: int) -> list[jax.Array]:
    """Per-leaf contributions from per-example Jacobians (examples independent along batch_axis)."""

    def single(p, x):
        return jnp.squeeze(apply_fn(p, jnp.expand_dims(x, batch_axis)), batch_axis)

    jac = jax.vmap(jax.jacrev(single), in_axes=(None, batch_axis), out_axes=batch_axis)
    j1 = jax.tree_util.tree_leaves(jac(params, x1))
    j2 = j1 if x2 is None else jax.tree_util.tree_leaves(jac(params, x2))
    return _contract(j1, j2, axes)


def empirical_nngp_fn(
    f: ModelLike,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    check_finite_values: bool = True,
) -> KernelFn:
    """The empirical NNGP ``f(x1) f(x2)ᵀ`` of a model at its current parameters.

    Averaged over output axes in ``trace_axes`` (default: the outputs), so for outputs ``(N, O)``
    the result is ``(N1, N2)``; ``trace_axes=()`` gives ``(N1, N2, O, O)``. Its average over random
    initializations (:func:`ntk_adapters.monte_carlo_kernel_fn`) converges to the infinite-width
    NNGP.

    Returns:
      ``nngp(x1, x2=None, params=None)``.

    Example::

      nngp = empirical_nngp_fn(model)
      nngp(x1, x2).shape    # (N1, N2)
    """
    model = as_model(f)

    def nngp(x1: jax.Array, x2: Optional[jax.Array] = None, params: Optional[PyTree] = None):
        params = checked_call(model, x1, x2, params, check_finite_values)
        axes = _output_axes(model.apply_fn, params, x1, x2, trace_axes, diagonal_axes)
        return _nngp_jit(model.apply_fn, axes)(params, x1, x2)

    return nngp


@functools.lru_cache(maxsize=256)
def _nngp_jit(apply_fn, axes: OutputAxes):
    def compute(params, x1, x2):
        y1 = apply_fn(params, x1)
        y2 = y1 if x2 is None else apply_fn(params, x2)
        return axes.outer(y1, y2)

    return jax.jit(compute)


def empirical_kernel_fn(
    f: ModelLike,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Optional[int] = None,
    implementation: str = "auto",
    subset: Subset = None,
    check_finite_values: bool = True,
) -> KernelFn:
    """Empirical NNGP and NTK behind one function.

    Returns:
      ``kernel(x1, x2=None, get=('nngp', 'ntk'), params=None)``: an array for ``get='ntk'`` or
      ``'nngp'``, a named tuple with fields ``nngp``, ``ntk`` (in the order asked) for a tuple.

    Example::

      k = empirical_kernel_fn(model)(x1, x2)
      k.nngp.shape, k.ntk.shape      # (N1, N2), (N1, N2)
    """
    nngp_fn = empirical_nngp_fn(f, trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                                check_finite_values=check_finite_values)
    ntk_fn = empirical_ntk_fn(f, trace_axes=trace_axes, diagonal_axes=diagonal_axes, vmap_axes=vmap_axes,
                              implementation=implementation, subset=subset,
                              check_finite_values=check_finite_values)

    def kernel(x1: jax.Array, x2: Optional[jax.Array] = None, get: Get = None, params: Optional[PyTree] = None):
        names, _ = normalize_get(get)
        values = {}
        if "nngp" in names:
            values["nngp"] = nngp_fn(x1, x2, params)
        if "ntk" in names:
            values["ntk"] = ntk_fn(x1, x2, params)
        return pack(get, values)

    return kernel

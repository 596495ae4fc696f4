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
* ``'auto'`` (default): the implementation with the smallest estimated time among those whose
  estimated peak memory fits in ``memory_budget`` bytes (default: a quarter of the accelerator's
  memory, 1 GiB on CPU), or the one needing the least memory when none fits; the estimates come
  from the shapes only (:func:`ntk_adapters.implementations.implementation_costs`).
  ``'structured'`` competes only when examples are independent (``vmap_axes`` given or proven by
  ``vmap_axes='auto'``), and wins when its estimate is within 10 % of the best. With many
  parameters and few output entries (``P ≫ N·O``, e.g. a ResNet on a few images) this is the
  per-example Jacobian or ``'structured'``, never ``'ntvp'``, whose ``N2·O`` VJP+JVP pairs over
  whole batches cost ``~N`` times more.

Precision (``precision=``, default ``'highest'``): every matrix product of the kernel, the
model's own included, runs in full float32 even where JAX would use TensorFloat-32 (NVIDIA GPUs);
see :mod:`ntk_adapters.precision`.

neural-tangents' implementation numbers are accepted too: ``1`` (Jacobian contraction), ``2``
(NTK-vector products), ``3`` (structured derivatives), ``0`` (auto), or
:class:`ntk_adapters.NtkImplementation`.

Inputs ``x1``, ``x2`` are arrays or pytrees of arrays sharing the batch axis
(:mod:`ntk_adapters.inputs`): ``(tokens, lengths)``, ``{'image': ..., 'mask': ...}``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax

from ntk_adapters.axes import Axes, OutputAxes
from ntk_adapters.finite import KnownFinite, check_finite
from ntk_adapters.implementations import Implementation, choose, implementation_name, resolve_memory_budget
from ntk_adapters.implementations import ntk as _ntk_value
from ntk_adapters.inputs import (
    BatchAxes,
    CoupledKernelFn,
    batch_coupling,
    check_pair,
    declared_vmap_axes,
    hashable_spec,
    resolve_vmap_axes,
    with_batch_coupling,
)
from ntk_adapters.model import Model, ModelLike, PyTree, as_model, check_array_output, check_params_match, module_path
from ntk_adapters.outputs import Get, normalize_get, pack
from ntk_adapters.precision import PrecisionLike, canonical, matmul_precision

PathSelector = Union[str, Sequence[str], Callable[[str], bool]]
Subset = Optional[PathSelector]
VmapAxes = Any  # 'auto', None, an int, a pytree prefix of x, or (in_axes, out_axes, kwargs_axes)

KernelFn = CoupledKernelFn


# --------------------------------------------------------------------------------------------
# Input checks shared by every kernel function.


check_inputs = check_pair


def checked_call(
    model: Model,
    x1,
    x2,
    params: Optional[PyTree],
    finite: bool,
    batch: Optional[BatchAxes] = None,
    known: Optional[KnownFinite] = None,
) -> PyTree:
    """Validate one kernel call's arguments and return the params to use (the Model's by default)."""
    if params is None:
        if model.params is None:
            raise ValueError("no params: pass params=... to the kernel function, or build a Model that holds them")
        params = model.params
    else:
        check_params_match(model.params, params)
    check_pair(x1, x2, batch)
    if finite:
        leaves = jax.tree_util.tree_leaves(params)
        if known is not None and known.covers(leaves):
            check_finite(x1, "x1", x2, "x2")
        else:
            check_finite(x1, "x1", x2, "x2", params, "params")
            if known is not None:
                known.remember(leaves)
    return params


# --------------------------------------------------------------------------------------------
# Parameter subsets and groups.


def _path_predicate(subset: PathSelector) -> Callable[[str], bool]:
    if callable(subset):
        return subset
    prefixes = (subset,) if isinstance(subset, str) else tuple(subset)
    return lambda path: any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _leaf_paths(params: PyTree) -> list[str]:
    return [module_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def layer_of(path: str) -> str:
    """The module path owning a parameter: ``'Dense_0/kernel' -> 'Dense_0'``."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def select_leaves(params: PyTree, subset: PathSelector) -> tuple[int, ...]:
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


class SpecCache:
    """``fn(x1, x2, params, *static)`` memoized on the structure, shapes and dtypes of the arrays and
    on the hashable ``static`` values, for functions of those alone; one per kernel function (it
    lives and dies with it)."""

    def __init__(self, fn: Callable, maxsize: int = 64):
        self.fn, self.maxsize = fn, maxsize
        self.entries: dict[tuple, Any] = {}

    def __call__(self, x1, x2, params, *static):
        key = (hashable_spec(x1), None if x2 is None else hashable_spec(x2), hashable_spec(params), static)
        if key not in self.entries:
            if len(self.entries) >= self.maxsize:
                self.entries.pop(next(iter(self.entries)))
            self.entries[key] = self.fn(x1, x2, params, *static)
        return self.entries[key]


# --------------------------------------------------------------------------------------------
# Public kernel functions.


def empirical_ntk_fn(
    f: ModelLike,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VmapAxes = "auto",
    implementation: Implementation = "auto",
    subset: Subset = None,
    by_layer: bool = False,
    memory_budget: Optional[float] = None,
    ntvp_chunk: int = 256,
    check_finite_values: bool = True,
    precision: PrecisionLike = "highest",
) -> KernelFn:
    """The empirical neural tangent kernel ``J(x1) J(x2)ᵀ`` of a model.

    Args:
      f: a :class:`~ntk_adapters.Model` or a function ``f(params, x) -> y``.
      trace_axes: output axes to contract and average (default: the last, i.e. the outputs).
        The batch axis 0 cannot be traced.
      diagonal_axes: output axes to keep once (only equal indices paired).
      vmap_axes: where independent examples sit, so that Jacobians can be taken one example at a
        time (much cheaper for large batches). ``'auto'`` (default) reads the traced program and
        takes the per-example path along axis 0 exactly when no operation combines examples
        (batch statistics, reductions over the batch, ...), else differentiates the whole batch.
        ``None`` always differentiates the whole batch (exact for any model; neural-tangents'
        default). An int, a pytree prefix of ``x`` (``(0, None)``: the second input is shared by
        every example) or neural-tangents' triple ``(in_axes, out_axes, {})`` declares the axes;
        it is refused, naming the operation and the layer, when examples provably interact.
      implementation: ``'jacobian'``, ``'ntvp'``, ``'structured'`` or ``'auto'`` (see the module
        docstring), or neural-tangents' numbers ``0``-``3`` / :class:`NtkImplementation`.
      subset: only differentiate the parameters whose module path (``'Dense_2'``,
        ``'mlp/~/linear_1'``) equals or starts with one of these strings, or for which this
        predicate of the parameter path (``'Dense_2/kernel'``) is true. E.g. ``subset='Dense_2'``
        gives the NTK of training only the last layer.
      by_layer: return a dict ``{module path: NTK contribution}`` whose values sum to the NTK.
      memory_budget: bytes ``'auto'`` may plan for (default ``None``: a quarter of the device's
        memory on accelerators, 1 GiB on CPU). ``'auto'`` takes the implementation with the smallest
        estimated time among those whose estimated memory fits
        (:func:`ntk_adapters.implementations.implementation_costs`); ``'structured'`` also keeps
        each layer's intermediates under it.
      ntvp_chunk: basis vectors processed together by ``'ntvp'``.
      check_finite_values: raise on NaN/Inf in concrete inputs and params (skipped under ``jit``,
        where NaNs propagate).
      precision: precision of the matrix products: ``'highest'`` (default: full float32, so that
        the kernel is fit for linear solves), ``'high'``, ``'default'`` (JAX's own setting, which is
        TensorFloat-32 for float32 on NVIDIA GPUs, ~3e-4 relative error) or a
        :class:`jax.lax.Precision`. It covers the contractions the library writes and the model's
        own forward and backward products (those that do not set a precision themselves); see
        :mod:`ntk_adapters.precision`. CPUs compute float32 products exactly either way.

    Returns:
      ``ntk(x1, x2=None, params=None)`` with ``x1`` ``(N1, *input)``, ``x2`` ``(N2, *input)``
      (``None`` means ``x1``), each an array or a pytree of arrays sharing the batch axis, and
      ``params`` defaulting to the Model's. Output shape: ``(N1, N2)`` for outputs ``(N, O)`` and the
      default ``trace_axes``; ``(N1, N2, O, O)`` with ``trace_axes=()``; ``(N1, N2, O)`` with
      ``trace_axes=(), diagonal_axes=(-1,)``.

    Example::

      ntk = empirical_ntk_fn(model)
      ntk(x_train).shape               # (N, N)
      ntk(x_test, x_train).shape       # (M, N)
      empirical_ntk_fn(model, precision='default')  # allow TF32 on GPUs: faster, ~3e-4 off
    """
    model = as_model(f)
    precision = canonical(precision)
    memory_budget = resolve_memory_budget(memory_budget)
    impl_name = implementation_name(implementation)
    declared = declared_vmap_axes(vmap_axes)

    def resolve(x1, x2, params):
        selected = None if subset is None else select_leaves(params, subset)
        paths = _leaf_paths(params)
        groups = tuple(layer_of(paths[i]) for i in (range(len(paths)) if selected is None else selected))
        axes = output_axes(model.apply_fn, params, x1, x2, trace_axes, diagonal_axes)
        batch = resolve_vmap_axes(model.replace(params=params), x1, vmap_axes)
        impl = choose(impl_name, model.apply_fn, params, x1, x2, axes, batch, selected, memory_budget, ntvp_chunk)
        if by_layer and impl == "ntvp":
            impl = "jacobian"  # NTK-vector products do not separate the layers
        return _ntk_jit(
            model.apply_fn,
            axes,
            impl,
            batch,
            ntvp_chunk,
            selected,
            groups if by_layer else None,
            memory_budget,
            precision,
        )

    # Everything resolve() decides follows from shapes and dtypes alone: later calls with the same
    # ones skip the tracing it takes (several ms per call, more than small kernels cost).
    resolved = SpecCache(resolve)
    known = KnownFinite()

    def ntk(x1: PyTree, x2: Optional[PyTree] = None, params: Optional[PyTree] = None):
        params = checked_call(model, x1, x2, params, check_finite_values, declared, known)
        return resolved(x1, x2, params)(params, x1, x2)

    return with_batch_coupling(ntk, functools.partial(batch_coupling, model))


def output_axes(apply_fn, params, x1, x2, trace_axes, diagonal_axes) -> OutputAxes:
    """The resolved output axes for this model on these inputs (shapes checked)."""
    y1 = check_array_output(jax.eval_shape(apply_fn, params, x1), "the model")
    y2 = y1 if x2 is None else check_array_output(jax.eval_shape(apply_fn, params, x2), "the model")
    axes = OutputAxes.make(len(y1.shape), trace_axes, diagonal_axes)
    if len(y1.shape) == 1 and 0 in axes.trace:
        # Only the batch axis is left: tracing it would silently turn the kernel into a scalar.
        raise ValueError(
            f"the model returns one value per example, shape {tuple(y1.shape)}, so trace_axes={trace_axes!r} "
            "would trace the batch axis; pass trace_axes=() for an (N1, N2) kernel, or return shape (N, 1)"
        )
    axes.check_shapes(y1.shape, y2.shape)
    return axes


@functools.lru_cache(maxsize=256)
def _ntk_jit(
    apply_fn,
    axes: OutputAxes,
    impl: str,
    batch: Optional[BatchAxes],
    chunk: int,
    selected,
    groups,
    memory_budget: float,
    precision,
):
    def compute(params, x1, x2):
        g, sub = _restricted(apply_fn, params, selected)
        return _ntk_value(g, sub, x1, x2, axes, impl, batch, chunk, groups, memory_budget, precision)

    return jax.jit(compute)


def empirical_nngp_fn(
    f: ModelLike,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    check_finite_values: bool = True,
    precision: PrecisionLike = "highest",
) -> KernelFn:
    """The empirical NNGP ``f(x1) f(x2)ᵀ`` of a model at its current parameters.

    Averaged over output axes in ``trace_axes`` (default: the outputs), so for outputs ``(N, O)``
    the result is ``(N1, N2)``; ``trace_axes=()`` gives ``(N1, N2, O, O)``. Its average over random
    initializations (:func:`ntk_adapters.monte_carlo_kernel_fn`) converges to the infinite-width
    NNGP.

    Args:
      f, trace_axes, diagonal_axes, check_finite_values, precision: as for :func:`empirical_ntk_fn`;
        ``precision`` covers the model's forward products and the outer product ``f(x1) f(x2)ᵀ``.

    Returns:
      ``nngp(x1, x2=None, params=None)``.

    Example::

      nngp = empirical_nngp_fn(model)
      nngp(x1, x2).shape    # (N1, N2)
    """
    model = as_model(f)
    precision = canonical(precision)

    resolved = SpecCache(
        lambda x1, x2, params: _nngp_jit(
            model.apply_fn, output_axes(model.apply_fn, params, x1, x2, trace_axes, diagonal_axes), precision
        )
    )

    known = KnownFinite()

    def nngp(x1: PyTree, x2: Optional[PyTree] = None, params: Optional[PyTree] = None):
        params = checked_call(model, x1, x2, params, check_finite_values, known=known)
        return resolved(x1, x2, params)(params, x1, x2)

    return with_batch_coupling(nngp, functools.partial(batch_coupling, model))


@functools.lru_cache(maxsize=256)
def _nngp_jit(apply_fn, axes: OutputAxes, precision):
    def compute(params, x1, x2):
        # The outer product is an einsum without its own precision: the context reaches it too.
        with matmul_precision(precision):
            y1 = apply_fn(params, x1)
            y2 = y1 if x2 is None else apply_fn(params, x2)
            return axes.outer(y1, y2)

    return jax.jit(compute)


def empirical_kernel_fn(
    f: ModelLike,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VmapAxes = "auto",
    implementation: Implementation = "auto",
    subset: Subset = None,
    memory_budget: Optional[float] = None,
    check_finite_values: bool = True,
    precision: PrecisionLike = "highest",
) -> KernelFn:
    """Empirical NNGP and NTK behind one function (arguments as :func:`empirical_ntk_fn`).

    Returns:
      ``kernel(x1, x2=None, get=('nngp', 'ntk'), params=None)``: an array for ``get='ntk'`` or
      ``'nngp'``, a named tuple with fields ``nngp``, ``ntk`` (in the order asked) for a tuple.

    Example::

      k = empirical_kernel_fn(model)(x1, x2)
      k.nngp.shape, k.ntk.shape      # (N1, N2), (N1, N2)
    """
    nngp_fn = empirical_nngp_fn(
        f,
        trace_axes=trace_axes,
        diagonal_axes=diagonal_axes,
        check_finite_values=check_finite_values,
        precision=precision,
    )
    ntk_fn = empirical_ntk_fn(
        f,
        trace_axes=trace_axes,
        diagonal_axes=diagonal_axes,
        vmap_axes=vmap_axes,
        implementation=implementation,
        subset=subset,
        memory_budget=memory_budget,
        check_finite_values=check_finite_values,
        precision=precision,
    )

    def kernel(x1: PyTree, x2: Optional[PyTree] = None, get: Get = None, params: Optional[PyTree] = None):
        names, _ = normalize_get(get)
        values = {}
        if "nngp" in names:
            values["nngp"] = nngp_fn(x1, x2, params)
        if "ntk" in names:
            values["ntk"] = ntk_fn(x1, x2, params)
        return pack(get, values)

    return with_batch_coupling(kernel, ntk_fn.batch_coupling)

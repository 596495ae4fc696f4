"""Monte Carlo estimates of NNGP and NTK: empirical kernels averaged over initializations."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.axes import Axes, OutputAxes
from ntk_adapters.empirical import SpecCache, VmapAxes, output_axes
from ntk_adapters.finite import check_finite
from ntk_adapters.implementations import Implementation, choose, implementation_name, resolve_memory_budget
from ntk_adapters.implementations import ntk as _ntk_value
from ntk_adapters.inputs import (
    BatchAxes,
    batch_coupling,
    check_pair,
    declared_vmap_axes,
    resolve_vmap_axes,
    with_batch_coupling,
)
from ntk_adapters.model import Model, as_model
from ntk_adapters.outputs import Get, normalize_get, pack
from ntk_adapters.precision import PrecisionLike, canonical, matmul_precision


def monte_carlo_kernel_fn(
    model: Model,
    key: jax.Array,
    n_samples: Union[int, Sequence[int]],
    *,
    batch_size: int = 8,
    get: Get = ("nngp", "ntk"),
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VmapAxes = "auto",
    implementation: Implementation = "auto",
    memory_budget: Optional[float] = None,
    ntvp_chunk: int = 256,
    check_finite_values: bool = True,
    precision: PrecisionLike = "highest",
) -> Callable[..., Any]:
    """Average empirical NNGP and NTK over fresh initializations of a model.

    Each sample draws parameters with ``model.init_fn`` (the model's own initializers) and
    evaluates the empirical kernels of :mod:`ntk_adapters.empirical` with the same implementation
    choice as :func:`ntk_adapters.empirical_ntk_fn` (structured derivatives wherever examples are
    independent and that is cheaper); the estimates converge to the infinite-width kernels as
    width and ``n_samples`` grow (standard error ``∝ 1/√n``).

    Args:
      model: a :class:`~ntk_adapters.Model` with an ``init_fn`` (the Flax and Haiku adapters
        provide one).
      key: PRNG key; sample ``i`` uses ``jax.random.fold_in(key, i)``, so estimates for growing
        ``n_samples`` share their first draws.
      n_samples: number of initializations, or an increasing list of counts: then the result is a
        dict ``{count: estimate}`` of running means (a convergence curve at the cost of the
        largest count).
      batch_size: initializations evaluated together (``jax.vmap``); trades memory for speed.
        ``'auto'`` implementations are chosen so that ``batch_size`` samples fit in
        ``memory_budget``.
      get: default kernels to return, ``'nngp'``, ``'ntk'`` or a tuple.
      trace_axes, diagonal_axes, vmap_axes, implementation, memory_budget, ntvp_chunk: as for
        :func:`ntk_adapters.empirical_ntk_fn`.
      check_finite_values, precision: as for :func:`ntk_adapters.empirical_ntk_fn` (``precision``,
        ``'highest'`` by default, also covers the initializers' and the NNGP's products).

    Returns:
      ``kernel_fn(x1, x2=None, get=None)``; ``x1``, ``x2`` arrays or pytrees of arrays sharing the
      batch axis; shapes as the empirical kernels, ``(N1, N2)`` by default.

    Example::

      mc = monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), [16, 64, 256])
      estimates = mc(x1, x2)           # {16: Kernels(nngp, ntk), 64: ..., 256: ...}
      estimates[256].ntk.shape         # (N1, N2)
    """
    model = as_model(model)
    if model.init_fn is None:
        raise ValueError(
            "monte_carlo_kernel_fn needs a model that can draw fresh parameters (Model.init_fn); adapt "
            "it with ntk_adapters.flax.adapt / ntk_adapters.haiku.adapt, or pass init_fn= to ntk_adapters.adapt"
        )
    counts = [n_samples] if isinstance(n_samples, (int, np.integer)) else [int(n) for n in n_samples]
    if not counts or any(n <= 0 for n in counts) or sorted(counts) != counts:
        raise ValueError(f"n_samples must be a positive int or an increasing list of them; got {n_samples!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    impl_name = implementation_name(implementation)
    precision = canonical(precision)
    memory_budget = resolve_memory_budget(memory_budget)
    declared = declared_vmap_axes(vmap_axes)
    default_get = get

    def resolve(x1, x2, params, names):
        axes = output_axes(model.apply_fn, params, x1, x2, trace_axes, diagonal_axes)
        batch = resolve_vmap_axes(model, x1, vmap_axes)
        impl = "jacobian"
        if "ntk" in names:
            impl = choose(
                impl_name, model.apply_fn, params, x1, x2, axes, batch, None, memory_budget / batch_size, ntvp_chunk
            )
        return _chunk_fn(
            model.init_fn, model.apply_fn, axes, names, impl, batch, ntvp_chunk, memory_budget / batch_size, precision
        )

    # What resolve() decides follows from shapes, dtypes and the names asked for: later calls with
    # the same ones skip its tracing.
    resolved = SpecCache(resolve)

    def kernel_fn(x1: Any, x2: Optional[Any] = None, get: Get = None):
        get = default_get if get is None else get
        names, _ = normalize_get(get)
        check_pair(x1, x2, declared)
        if check_finite_values:
            check_finite(x1, "x1", x2, "x2")
        chunk = resolved(x1, x2, model.params, tuple(names))
        totals = None
        done = 0
        results = {}
        for count in counts:
            while done < count:
                n = min(batch_size, count - done)
                keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(done, done + n))
                part = chunk(keys, x1, x2)
                totals = part if totals is None else jax.tree_util.tree_map(jnp.add, totals, part)
                done += n
            assert totals is not None  # counts are positive, so the first one draws samples
            results[count] = pack(get, {k: v / count for k, v in totals.items()})
        return results[counts[0]] if isinstance(n_samples, (int, np.integer)) else results

    return with_batch_coupling(kernel_fn, functools.partial(batch_coupling, model))


@functools.lru_cache(maxsize=64)
def _chunk_fn(
    init_fn,
    apply_fn,
    axes: OutputAxes,
    names: tuple[str, ...],
    impl: str,
    batch: Optional[BatchAxes],
    ntvp_chunk: int,
    memory_budget: float,
    precision,
):
    """Sum of empirical kernels over a batch of init keys (jitted once per shape)."""

    def one(key, x1, x2):
        with matmul_precision(precision):
            return sample(key, x1, x2)

    def sample(key, x1, x2):
        params = init_fn(key, x1)
        out = {}
        if "nngp" in names:
            y1 = apply_fn(params, x1)
            y2 = y1 if x2 is None else apply_fn(params, x2)
            out["nngp"] = axes.outer(y1, y2)
        if "ntk" in names:
            out["ntk"] = _ntk_value(
                apply_fn,
                params,
                x1,
                x2,
                axes,
                impl,
                batch,
                ntvp_chunk,
                memory_budget=memory_budget,
                precision=precision,
            )
        return out

    def chunk(keys, x1, x2):
        per_sample = jax.vmap(one, in_axes=(0, None, None))(keys, x1, x2)
        return jax.tree_util.tree_map(lambda v: v.sum(0), per_sample)

    return jax.jit(chunk)

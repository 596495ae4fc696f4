"""The empirical-NTK implementations and how one is chosen.

Shared by :func:`ntk_adapters.empirical_ntk_fn` and :func:`ntk_adapters.monte_carlo_kernel_fn`, so
that both compute the same kernel the same way. The cost model of each implementation is in the
module docstring of :mod:`ntk_adapters.empirical`.
"""

from __future__ import annotations

import enum
import math
from typing import Literal, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.axes import OutputAxes
from ntk_adapters.inputs import BatchAxes, num_examples
from ntk_adapters.precision import PrecisionLike, einsum_precision, matmul_precision
from ntk_adapters.structured import structured_contributions, structured_cost

ImplementationName = Literal["auto", "jacobian", "ntvp", "structured"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "jacobian", "ntvp", "structured")


class NtkImplementation(enum.IntEnum):
    """neural-tangents' implementation numbers, accepted beside the names.

    ``AUTO`` (0) is ``'auto'``, ``JACOBIAN_CONTRACTION`` (1) ``'jacobian'``,
    ``NTK_VECTOR_PRODUCTS`` (2) ``'ntvp'``, ``STRUCTURED_DERIVATIVES`` (3) ``'structured'``.
    """

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


Implementation = Union[ImplementationName, int, NtkImplementation]


def implementation_name(implementation: Implementation) -> str:
    """The library's name for an implementation given by name, neural-tangents number or enum."""
    if isinstance(implementation, str):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS} or 0-3")
        return implementation
    if isinstance(implementation, (int, np.integer)) and not isinstance(implementation, bool):
        if 0 <= int(implementation) < len(IMPLEMENTATIONS):
            return IMPLEMENTATIONS[int(implementation)]
    raise ValueError(
        f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS}, or neural-tangents' numbers "
        "0 (auto), 1 (jacobian contraction), 2 (NTK-vector products), 3 (structured derivatives)"
    )


# Flop-equivalents of moving one element through memory: the time proxy of an implementation is
# flops + _TRAFFIC * elements stored. GPUs do ~15 float32 flops per byte of bandwidth (H200: 67
# TFLOP/s, 4.8 TB/s), CPUs a few; 8 per element keeps memory-bound plans from looking free on both.
_TRAFFIC = 8

# The structured plan computes each layer's part as one batched contraction of activations (or
# patches) and cotangents; per estimated multiply-add it runs faster than the batched transposed
# operations of per-example Jacobians (``vmap(jacrev)``), which the time proxy does not model.
# Measured on 2 CPU cores (benchmarks/auto_choice.py, benchmarks/vs_neural_tangents.py): with
# estimates within 10 % of each other structured was faster on 4 of 5 models (1.36x on a 4-layer
# GAP CNN with estimates 0.5 % apart, 1.22x on the MNIST CNNs at +4-9 %) and 1.11x slower on one
# (the LM1B Transformer at +8 %). It wins when its estimate is within this factor.
_STRUCTURED_PREFERENCE = 1.1


def default_memory_budget() -> float:
    """Bytes 'auto' may plan for: a quarter of the first device's memory where JAX reports it
    (accelerators), else 1 GiB (CPUs, whose memory is shared with everything else)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    limit = stats.get("bytes_limit")
    return float(limit) / 4 if limit else float(2**30)


def resolve_memory_budget(memory_budget: Optional[float]) -> float:
    """``memory_budget`` in bytes, :func:`default_memory_budget` for ``None``; refuses non-positive values."""
    if memory_budget is None:
        return default_memory_budget()
    if not memory_budget > 0:
        raise ValueError(
            f"memory_budget={memory_budget!r}; pass a positive number of bytes, or None for "
            "a quarter of the device's memory"
        )
    return float(memory_budget)


def implementation_costs(
    apply_fn,
    params,
    x1,
    x2,
    axes: OutputAxes,
    batch: Optional[BatchAxes],
    selected: Optional[Sequence[int]] = None,
    memory_budget: Optional[float] = None,
    ntvp_chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """Estimated multiply-adds, peak bytes and a time proxy of each implementation, from shapes only.

    With ``N1``, ``N2`` examples, ``O`` outputs per example, ``P`` parameters, ``F`` the forward
    multiply-adds and ``A`` the intermediate elements of one example (``vmap_axes`` set) or of the
    batch (``vmap_axes=None``, then every cotangent runs through the whole batch):

    * ``'jacobian'``: one backward pass (``2F``) per output entry, then ``J1 J2ᵀ``; stores the
      Jacobians (``(N1 + N2)·O·P``) and the cotangents' intermediates (``(N1 + N2)·O·A``);
    * ``'structured'``: one activation-only backward pass (``F``) per output entry, then per layer
      the cheaper of its Gram and Jacobian forms (:func:`ntk_adapters.structured.structured_cost`);
    * ``'ntvp'``: per output entry of ``x2`` a VJP through ``x2`` and a JVP through ``x1``
      (``2F`` each, whole batches); stores ``chunk`` parameter-sized tangents with their
      intermediates and the ``(N2·O, N1·O)`` columns.

    Returns:
      ``{name: {'flops', 'bytes', 'time'}}`` with ``time = flops + 8·(elements stored)``, a proxy
      in multiply-add units; ``'structured'`` is absent without ``vmap_axes``. Raises whatever
      tracing raises for a model that cannot be traced on abstract shapes (:func:`choose` then
      falls back to a rule on sizes alone).

    Example::

      costs = implementation_costs(f, params, x, None, OutputAxes.make(2, (-1,), ()), parse_vmap_axes(0))
      min(costs, key=lambda k: costs[k]['time'])     # e.g. 'jacobian'
    """
    n1 = num_examples(x1, "x1", batch)
    n2 = n1 if x2 is None else num_examples(x2, "x2", batch)
    c = structured_cost(apply_fn, params, x1, x2, axes, batch, selected, memory_budget)
    s = c["itemsize"]
    n_out = math.prod(jax.eval_shape(apply_fn, params, x1).shape) // max(n1, 1)
    sides = n1 * n_out + (0 if x2 is None else n2 * n_out)
    per_example = batch is not None
    # Whole-batch forward costs, from one example's or from the batch x1's trace.
    f1 = c["forward_flops"] * (n1 if per_example else 1)
    a1 = c["activations"] * (n1 if per_example else 1)
    f2, a2 = f1 * n2 / n1, a1 * n2 / n1
    backward_elements = sides * c["activations"]
    out: dict[str, dict[str, float]] = {}
    out["jacobian"] = dict(flops=c["jacobian_flops"], bytes=c["jacobian_bytes"] + backward_elements * s)
    if batch is not None:
        out["structured"] = dict(flops=c["structured_flops"], bytes=c["structured_bytes"] + backward_elements * s)
    basis = n2 * n_out
    chunk = min(ntvp_chunk, basis)
    out["ntvp"] = dict(flops=basis * 2 * (f1 + f2), bytes=(chunk * (c["n_params"] + a1 + a2) + basis * n1 * n_out) * s)
    for v in out.values():
        v["time"] = v["flops"] + _TRAFFIC * v["bytes"] / s
    return out


def choose(
    implementation: str,
    apply_fn,
    params,
    x1,
    x2,
    axes: OutputAxes,
    batch: Optional[BatchAxes],
    selected: Optional[Sequence[int]],
    memory_budget: Optional[float],
    ntvp_chunk: int = 256,
) -> str:
    """Resolve ``'auto'``: the implementation with the smallest estimated time
    (:func:`implementation_costs`) among those whose estimated memory fits ``memory_budget``
    bytes, or the one needing the least memory when none fits. ``'structured'`` competes only
    when examples are independent (``batch``), and wins when its estimate is within 10 % of the
    best (its batched contractions run faster per multiply-add than the model's cost proxy says)."""
    if implementation != "auto":
        return implementation
    budget = resolve_memory_budget(memory_budget)
    try:
        costs = implementation_costs(apply_fn, params, x1, x2, axes, batch, selected, budget, ntvp_chunk)
    except Exception:  # a model that cannot be traced on abstract shapes: the simpler rule on sizes
        leaves = jax.tree_util.tree_leaves(params)
        used = leaves if selected is None else [leaves[i] for i in selected]
        n = num_examples(x1, "x1", batch) + (0 if x2 is None else num_examples(x2, "x2", batch))
        n_out = math.prod(jax.eval_shape(apply_fn, params, x1).shape) // max(num_examples(x1, "x1", batch), 1)
        n_params = sum(math.prod(np.shape(p)) for p in used)
        itemsize = jnp.result_type(*used).itemsize
        return "jacobian" if n * n_out * n_params * itemsize <= budget else "ntvp"
    fitting = [k for k, v in costs.items() if v["bytes"] <= budget]
    if not fitting:
        return min(costs, key=lambda k: costs[k]["bytes"])
    # Ties go to the simpler computation: dict order is jacobian, structured, ntvp.
    return min(fitting, key=lambda k: costs[k]["time"] / (_STRUCTURED_PREFERENCE if k == "structured" else 1.0))


def ntk(
    apply_fn,
    params,
    x1,
    x2,
    axes: OutputAxes,
    implementation: str,
    batch: Optional[BatchAxes],
    ntvp_chunk: int,
    groups: Optional[Sequence[str]] = None,
    memory_budget: Optional[float] = None,
    precision: PrecisionLike = "highest",
):
    """The empirical NTK with a resolved implementation; pure and ``jit``-friendly.

    With ``groups`` (one name per parameter leaf) the result is ``{name: contribution}``, the
    contributions of the leaves sharing a name summed; the values add up to the NTK.
    ``memory_budget`` bounds the intermediates of each structured layer (as in :func:`choose`).
    ``precision`` covers the model's products and the contractions (:mod:`ntk_adapters.precision`).
    """
    with matmul_precision(precision):
        return _ntk(apply_fn, params, x1, x2, axes, implementation, batch, ntvp_chunk, groups, memory_budget, precision)


def _ntk(apply_fn, params, x1, x2, axes, implementation, batch, ntvp_chunk, groups, memory_budget, precision):
    if implementation == "ntvp":
        if groups is not None:
            raise ValueError("NTK-vector products do not separate the layers; use 'jacobian' or 'structured'")
        return _ntvp_kernel(apply_fn, params, x1, x2, axes, ntvp_chunk)
    if implementation == "structured":
        parts = structured_contributions(
            apply_fn, params, x1, x2, axes, batch, memory_budget=memory_budget, precision=precision
        )
    else:
        parts = jacobian_contributions(apply_fn, params, x1, x2, axes, batch, precision)
    scale = axes.trace_size(jax.eval_shape(apply_fn, params, x1).shape)
    if groups is None:
        return sum(parts) / scale
    out: dict[str, jax.Array] = {}
    for name, part in zip(groups, parts):
        out[name] = out.get(name, 0) + part / scale
    return out


def jacobian_contributions(
    apply_fn, params, x1, x2, axes: OutputAxes, batch: Optional[BatchAxes] = None, precision: PrecisionLike = "highest"
) -> list[jax.Array]:
    """Per-leaf ``J1 J2ᵀ`` (untraced sums), from whole-batch Jacobians or, with ``batch``, from
    per-example ones."""
    if batch is None:
        jac = jax.jacrev(apply_fn)
    else:

        def single(p, x_one):
            return batch.squeeze_out(apply_fn(p, batch.expand(x_one)))

        jac = jax.vmap(jax.jacrev(single), in_axes=(None, batch.in_axes), out_axes=batch.out_axis)
    j1 = jax.tree_util.tree_leaves(jac(params, x1))
    j2 = j1 if x2 is None else jax.tree_util.tree_leaves(jac(params, x2))
    return contract(j1, j2, axes, precision)


def contract(
    j1: list[jax.Array], j2: list[jax.Array], axes: OutputAxes, precision: PrecisionLike = "highest"
) -> list[jax.Array]:
    """Per-leaf ``J1 J2ᵀ`` over the parameter axes, output axes paired as ``axes`` says."""
    first, second, result = axes.letters()
    einsum_p = einsum_precision(precision)
    out = []
    for leaf1, leaf2 in zip(j1, j2):
        p = "".join(chr(ord("α") + i) for i in range(leaf1.ndim - axes.ndim))
        out.append(jnp.einsum(f"{first}{p},{second}{p}->{result}", leaf1, leaf2, precision=einsum_p))
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
    cols = cols.reshape(y2.shape + cols.shape[1:])
    nd = axes.ndim
    # (*y2, *y1) -> interleaved (a1, a2, b1, b2, ...), then trace/diagonal.
    perm = [k for a in range(nd) for k in (nd + a, a)]
    return axes.reduce_full(jnp.transpose(cols, perm))

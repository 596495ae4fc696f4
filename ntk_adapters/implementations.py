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


def choose(
    implementation: str,
    apply_fn,
    params,
    x1,
    x2,
    axes: OutputAxes,
    batch: Optional[BatchAxes],
    selected: Optional[Sequence[int]],
    memory_budget: float,
) -> str:
    """Resolve ``'auto'`` from the shapes: structured when examples are independent and it is
    estimated cheaper and within the budget, else jacobian when both Jacobians fit, else ntvp."""
    if implementation != "auto":
        return implementation
    leaves = jax.tree_util.tree_leaves(params)
    used = leaves if selected is None else [leaves[i] for i in selected]
    n = num_examples(x1, "x1", batch) + (0 if x2 is None else num_examples(x2, "x2", batch))
    n_out = math.prod(jax.eval_shape(apply_fn, params, x1).shape) // max(num_examples(x1, "x1", batch), 1)
    n_params = sum(math.prod(np.shape(p)) for p in used)
    itemsize = jnp.result_type(*used).itemsize
    choice = "jacobian" if n * n_out * n_params * itemsize <= memory_budget else "ntvp"
    if batch is not None:
        try:
            cost = structured_cost(apply_fn, params, x1, x2, axes, batch, selected, memory_budget)
        except Exception:  # a model that cannot be traced on abstract shapes keeps the simpler choice
            cost = None
        if cost and cost["structured_flops"] < cost["jacobian_flops"] and cost["structured_bytes"] <= memory_budget:
            choice = "structured"
    return choice


def ntk(apply_fn, params, x1, x2, axes: OutputAxes, implementation: str, batch: Optional[BatchAxes],
        ntvp_chunk: int, groups: Optional[Sequence[str]] = None, memory_budget: Optional[float] = None):
    """The empirical NTK with a resolved implementation; pure and ``jit``-friendly.

    With ``groups`` (one name per parameter leaf) the result is ``{name: contribution}``, the
    contributions of the leaves sharing a name summed; the values add up to the NTK.
    ``memory_budget`` bounds the intermediates of each structured layer (as in :func:`choose`).
    """
    if implementation == "ntvp":
        if groups is not None:
            raise ValueError("NTK-vector products do not separate the layers; use 'jacobian' or 'structured'")
        return _ntvp_kernel(apply_fn, params, x1, x2, axes, ntvp_chunk)
    if implementation == "structured":
        parts = structured_contributions(apply_fn, params, x1, x2, axes, batch, memory_budget=memory_budget)
    else:
        parts = jacobian_contributions(apply_fn, params, x1, x2, axes, batch)
    scale = axes.trace_size(jax.eval_shape(apply_fn, params, x1).shape)
    if groups is None:
        return sum(parts) / scale
    out: dict[str, jax.Array] = {}
    for name, part in zip(groups, parts):
        out[name] = out.get(name, 0) + part / scale
    return out


def jacobian_contributions(apply_fn, params, x1, x2, axes: OutputAxes,
                           batch: Optional[BatchAxes] = None) -> list[jax.Array]:
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
    return contract(j1, j2, axes)


def contract(j1: list[jax.Array], j2: list[jax.Array], axes: OutputAxes) -> list[jax.Array]:
    """Per-leaf ``J1 J2ᵀ`` over the parameter axes, output axes paired as ``axes`` says."""
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
    cols = cols.reshape(y2.shape + cols.shape[1:])
    nd = axes.ndim
    # (*y2, *y1) -> interleaved (a1, a2, b1, b2, ...), then trace/diagonal.
    perm = [k for a in range(nd) for k in (nd + a, a)]
    return axes.reduce_full(jnp.transpose(cols, perm))

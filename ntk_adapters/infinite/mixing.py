"""Mixing positions with a constant matrix (graph aggregation, fixed token mixing) at infinite width.

A model that aggregates over the positions of a value ``h`` ``(N, T, C)`` with a fixed matrix
``A`` ``(T, J)`` of its own (a normalized adjacency matrix closed over, not a parameter and not
computed from the input)::

    y[n, j, c] = Σ_i A[i, j] h[n, i, c]      # jnp.einsum('nic,ij->njc', h, A), A.T @ h, tensordot

keeps its channels independent and identically distributed, and every second moment mixes
linearly over the positions of the mixed axis, on both sides::

    nngp'[n, m, j, j'] = Σ_{i, i'} A[i, j] A[i', j'] nngp[n, m, i, i']

and the same for the NTK (the matrix has no parameters) and the per-input covariances. A fixed
linear map of a zero-mean Gaussian process is one, and of the fresh output of a random layer is
still independent of everything before that layer, so the value stays ``fresh``. Mixing needs the
covariances between positions: layout ``'full'`` (``spatial_layout='auto'`` chooses it when such
a product is live, see :func:`mixes_positions`). Along one axis of ``(N, H, W, C)`` only the two
kernel axes of that spatial dimension change. A vector ``w`` ``(T,)`` (``jnp.einsum('nic,i->nc',
h, w)``) is a weighted sum over that axis, which drops it.

JAX lowers these products to ``dot_general``, whose output lists the free axes of its first
operand, then those of its second (``(N, C, J)`` or ``(J, N, C)``), usually followed by a
``transpose`` back to ``(N, J, C)``. The engine's values are ``(batch, *spatial, channels)``: a
value whose traced axes are in another order carries :attr:`Value.axes
<ntk_adapters.infinite.values.Value>` (which canonical axis each traced axis is), its kernel in
canonical order, and a pending identity function, so that every operation other than a
``transpose``, a product with a constant matrix or an elementwise function refuses it when it
materializes the value (reshapes and broadcasts that change its shape are refused too); a
``transpose`` restoring the canonical order clears it.

Refused, naming the layer and the operation: contracting the channel axis with a fixed matrix
(the channels would stop being i.i.d.), the batch axis (it mixes examples), several axes at once,
batched products (a matrix per example), a matrix from the model's parameters (a hand-written
linear layer: register a rule for its module), a product of two input-dependent values, and
layout ``'diagonal'`` forced by the user.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.rules import PrimitiveContext, register_primitive_rule
from ntk_adapters.infinite.values import Concrete, Parameter, Phi, Value, apply_phi, is_value, new_id

__all__ = ["PRODUCT_OF_VALUES", "PARAMETER_PRODUCT", "mix_positions", "mixes_positions"]

#: The refusal of a ``dot_general`` of two input-dependent values.
PRODUCT_OF_VALUES = (
    "a product of two input-dependent values (attention scores, bilinear gating) has no infinite-width rule"
)

#: The refusal of a ``dot_general`` of a value with an array computed from the model's parameters.
PARAMETER_PRODUCT = (
    "a matrix product outside every layer with a rule (a hand-written linear layer) has no "
    "infinite-width rule: register a rule for its module"
)

_CHANNELS = (
    "contracts the channel axis of an input-dependent value with a fixed matrix: the output channels "
    "are fixed combinations of the input channels, no longer independent and identically distributed, "
    "so no kernel of one channel describes them (a random Dense layer over the channels has a rule; a "
    "fixed matrix may mix positions, e.g. jnp.einsum('nic,ij->njc', h, A))"
)

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# The kernel map.


def mix_positions(kernel: Kernel, a, dim: int) -> Kernel:
    """The kernel of ``y[..., j, ...] = Σ_i a[i, j] h[..., i, ...]`` along spatial dimension ``dim``.

    Args:
      kernel: layout ``'full'``: ``nngp`` ``(N1, N2, S1, S1', ...)``, ``cov1`` ``(N1, S1, S1', ...)``.
      a: the constant matrix ``(I, J)`` with ``I`` the size of spatial dimension ``dim``, or a vector
        ``(I,)`` (a weighted sum, which removes the dimension; removing the last one gives layout
        ``'none'``).
      dim: which spatial dimension, ``0 ≤ dim < len(kernel.spatial)``.

    Returns:
      The kernel with both axes of ``dim`` mixed (``nngp'[.., j, j', ..] = Σ a[i, j] a[i', j']
      nngp[.., i, i', ..]``, the same for ``ntk``, ``cov1``, ``cov2``, and the channel means, if
      known, mixed once); ``is_gaussian`` and ``same_inputs`` are kept.

    Example::

        adj = np.full((5, 5), 0.2)                  # every position averages all five
        k2 = mix_positions(k, adj, 0)               # k.nngp (N1, N2, 5, 5) -> (N1, N2, 5, 5)
    """
    if kernel.layout != "full":
        raise ValueError(f"mix_positions needs layout 'full' (covariances between positions); got {kernel.layout!r}")
    spatial = kernel.spatial
    if not 0 <= dim < len(spatial):
        raise ValueError(f"mix_positions: dimension {dim} of a kernel with spatial shape {spatial}")
    a = jnp.asarray(a, kernel.nngp.dtype)
    vector = a.ndim == 1
    if vector:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != spatial[dim]:
        raise ValueError(f"mix_positions: a matrix of shape {a.shape} for positions of size {spatial[dim]}")

    def mix_axis(x, axis):
        return jnp.moveaxis(jnp.tensordot(x, a, axes=([axis], [0]), precision=_HIGHEST), -1, axis)

    def both(x, batch_axes):
        first = batch_axes + 2 * dim
        x = mix_axis(mix_axis(x, first), first + 1)
        return jnp.squeeze(x, (first, first + 1)) if vector else x

    def once(m):
        if m is None:
            return None
        m = mix_axis(m, 1 + dim)
        return jnp.squeeze(m, 1 + dim) if vector else m

    changes = dict(
        nngp=both(kernel.nngp, 2),
        ntk=None if kernel.ntk is None else both(kernel.ntk, 2),
        cov1=both(kernel.cov1, 1),
    )
    changes["cov2"] = changes["cov1"] if kernel.same_inputs else both(kernel.cov2, 1)
    if vector and len(spatial) == 1:
        changes["layout"] = "none"
    if kernel.mean1 is not None:
        changes["mean1"] = once(kernel.mean1)
        changes["mean2"] = once(kernel.mean2)
    return kernel.replace(**changes)


# ----------------------------------------------------------------------------------------------
# Values whose traced axes are not in canonical order.


def _order(v: Value) -> tuple[int, ...]:
    """Which canonical axis (0 the batch, then the positions, then the channels) each traced axis is."""
    return tuple(range(len(v.shape) + 1)) if v.axes is None else tuple(v.axes)


def _with_order(v: Value, order: tuple[int, ...], where: str) -> Value:
    """``v`` (canonical kernel and shape) whose traced axes are ``order``: canonical order clears the
    pending identity that makes every other consumer refuse it.

    The result is a new base: entry by entry, a permuted array is not a function of the same Gaussian
    as the array it was permuted from (``h * swapaxes(h)`` pairs different entries)."""
    if v.axes is None and order == tuple(range(len(order))):
        return v
    if order == tuple(range(len(order))):
        phi = v.phi
        if phi is not None and phi.linear == 1.0:
            phi = None
        return dataclasses.replace(v, axes=None, phi=phi, base=new_id())
    phi = v.phi if v.phi is not None else Phi(fn=lambda u: u, linear=1.0, where=where)
    return dataclasses.replace(v, axes=order, phi=phi, base=new_id())


def _settled(v: Value, ctx: PrimitiveContext) -> Value:
    """A permuted value with its pending function (the identity marking it, a scale, or an elementwise
    function applied after the permutation) applied to its kernel, still permuted."""
    if v.phi is None:
        return v
    return dataclasses.replace(apply_phi(dataclasses.replace(v, axes=None), ctx.options.n_points), axes=v.axes)


def _where(eqn, ctx: PrimitiveContext) -> str:
    return f"{ctx.location(eqn)} at {_programs.operation(ctx.outer, eqn)}"


def _transpose_rule(eqn, invals, ctx: PrimitiveContext):
    (v,) = invals
    if v.flat:
        raise ctx.error(eqn, "a transpose of a flattened spatial value")
    perm = tuple(int(p) for p in eqn.params["permutation"])
    order = _order(v)
    if len(perm) != len(order):
        raise ctx.error(eqn, f"a transpose of {len(perm)} axes of a value with {len(order)}")
    if v.axes is None:
        # A pending function is applied now: the permuted value must carry only the pending
        # identity that marks it.
        v = ctx.materialize(v, eqn)
    return [_with_order(v, tuple(order[p] for p in perm), _where(eqn, ctx))]


register_primitive_rule("transpose", _transpose_rule)

# ----------------------------------------------------------------------------------------------
# Products with a constant matrix.


def _dot_general_rule(eqn, invals, ctx: PrimitiveContext):
    lhs, rhs = invals
    if is_value(lhs) and is_value(rhs):
        raise ctx.error(eqn, PRODUCT_OF_VALUES)
    value_first = is_value(lhs)
    v, m = (lhs, rhs) if value_first else (rhs, lhs)
    if not isinstance(m, Concrete) or isinstance(m, Parameter):
        raise ctx.error(eqn, PARAMETER_PRODUCT)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    v_con, m_con = (tuple(lc), tuple(rc)) if value_first else (tuple(rc), tuple(lc))
    if lb or rb:
        raise ctx.error(
            eqn,
            "a batched product of an input-dependent value with a constant array (a matrix per example or per "
            "batched axis) has no infinite-width rule; mix positions with one matrix, e.g. "
            "jnp.einsum('nic,ij->njc', h, A)",
        )
    if v.flat:
        raise ctx.error(eqn, "a product of a flattened spatial value with a constant matrix; mix before flattening")
    a = m.value
    if len(v_con) != 1 or np.ndim(a) not in (1, 2):
        raise ctx.error(
            eqn,
            f"a product contracting {len(v_con)} axes of an input-dependent value with a constant array of "
            f"{np.ndim(a)} axes; only one axis of positions mixed by a matrix (I, J), or summed with weights "
            "(I,), has a rule",
        )
    order = _order(v)
    canonical = order[v_con[0]]
    channel = len(v.shape)
    if canonical == 0:
        raise ctx.error(eqn, "contracts the batch axis of an input-dependent value with a constant (it mixes examples)")
    if canonical == channel:
        raise ctx.error(eqn, _CHANNELS)
    dim = canonical - 1
    v = ctx.materialize(v, eqn) if v.axes is None else _settled(v, ctx)
    if v.kernel.layout != "full":
        raise ctx.error(
            eqn,
            "mixing positions with a constant matrix needs the covariance between positions, which layout "
            f"{v.kernel.layout!r} does not keep; pass spatial_layout='full'",
        )
    if len(v.kernel.spatial) != channel - 1:
        raise ctx.error(
            eqn, f"a value of per-example shape {v.shape} with a kernel of spatial shape {v.kernel.spatial}"
        )
    if np.ndim(a) == 2 and m_con[0] == 1:
        a = jnp.transpose(jnp.asarray(a))
    try:
        k = mix_positions(v.kernel, a, dim)
    except ValueError as e:
        raise ctx.error(eqn, str(e)) from None
    free = [order[i] for i in range(len(order)) if i != v_con[0]]
    if np.ndim(a) == 2:
        shape = v.shape[:dim] + (int(np.shape(a)[1]),) + v.shape[dim + 1 :]
        out = free + [canonical] if value_first else [canonical] + free
    else:
        shape = v.shape[:dim] + v.shape[dim + 1 :]
        out = [c - 1 if c > canonical else c for c in free]
    mixed = Value(kernel=k, shape=shape, base=new_id(), fresh=v.fresh, deps=v.deps, source=v.source)
    return [_with_order(mixed, tuple(out), _where(eqn, ctx))]


register_primitive_rule("dot_general", _dot_general_rule)


# ----------------------------------------------------------------------------------------------
# Layout choice.


def mixes_positions(eqn, constants: Optional[set] = None) -> bool:
    """Whether a ``dot_general`` may mix positions of an activation with a constant matrix (so the
    layout must be ``'full'``): an operand with batch, position and channel axes contracted over one
    axis that is neither its first (the batch) nor, unless the other operand is one of
    ``constants`` (the program's constant variables), its last (a Dense over channels)."""
    if eqn.primitive.name != "dot_general":
        return False
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return False
    constants = constants or set()
    for big, small, con in ((0, 1, lc), (1, 0, rc)):
        bv, sv = eqn.invars[big], eqn.invars[small]
        nd = len(getattr(bv.aval, "shape", ()))
        if nd < 3 or len(getattr(sv.aval, "shape", ())) > 2 or len(con) != 1 or con[0] == 0:
            continue
        constant = _programs.is_literal(sv) or sv in constants
        if con[0] != nd - 1 or constant:
            return True
    return False

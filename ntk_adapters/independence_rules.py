"""The lattice and the per-primitive transfer rules of :mod:`ntk_adapters.independence`.

Every rule has the signature ``rule(eqn, ins, ctx) -> list of output states``. The interpreter
calls a rule only when at least one input is :class:`Batched` and none is ``TOP``/``ROW`` (the
constant, unknown and single-example cases are decided once, generically, in the interpreter).
A rule that cannot prove row independence returns ``ctx.couple(reason, certain)``, which records a
coupling for the current equation and returns ``TOP`` for each of its outputs. Control-flow
rules recurse with ``ctx.run(jaxpr, in_states)``.

Rules are registered in :data:`RULES` beside their definitions with :func:`_rule`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol, Sequence, Union

__all__ = ["CONST", "DRAWN", "ROW", "TOP", "Batched", "State", "join", "RULES", "Ctx"]


class _Named:
    """A singleton state, printed by name."""

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


# Constant with respect to the examples: parameters, literals, unbatched inputs, fixed random draws.
CONST = _Named("CONST")
# Inside the body of a scan over the batch axis: depends on the current example only (no batch axis).
ROW = _Named("ROW")
# Unknown or coupled (already reported where it arose).
TOP = _Named("TOP")
# Constant in the examples but drawn at random with an axis of the batch's size: row-dependent.
DRAWN = _Named("DRAWN")


@dataclasses.dataclass(frozen=True)
class Batched:
    """Batched along ``axis`` with rows independent.

    The axis has size ``outer * N * inner`` and position ``(o, i, r)`` (row-major) belongs to
    example ``i``: ``outer == inner == 1`` is a plain batch axis; other values arise when a reshape
    merges the batch axis with neighbouring axes (``(N, T, D) -> (N * T, D)`` has ``inner = T``).
    """

    axis: int
    outer: int = 1
    inner: int = 1

    def at(self, axis: int) -> "Batched":
        return dataclasses.replace(self, axis=axis)

    @property
    def simple(self) -> bool:
        return self.outer == 1 and self.inner == 1


State = Union[_Named, Batched]


def join(a: State, b: State) -> State:
    """The least upper bound: ``CONST ⊑ ROW``, ``CONST ⊑ Batched(d)``, everything ``⊑ TOP``.

    A constant joins a batched state because a value constant in the examples trivially has
    independent rows.
    """
    if a is CONST or a == b:
        return b
    if b is CONST:
        return a
    return TOP


class Ctx(Protocol):
    """What a rule may ask of the interpreter."""

    def couple(self, reason: str, certain: bool) -> list[State]: ...

    def run(self, jaxpr: Any, ins: Sequence[State]) -> list[State]: ...


Rule = Callable[[Any, list, Ctx], list]
RULES: dict[str, Rule] = {}


def _rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.aval.shape)


def _n_out(eqn: Any) -> int:
    return len(eqn.outvars)


def _batched(ins: Sequence[State]) -> list[tuple[int, Batched]]:
    return [(k, s) for k, s in enumerate(ins) if isinstance(s, Batched)]


def _only(ins: Sequence[State]) -> Batched:
    """The operand of a one-operand rule: the interpreter calls a rule only when one is batched."""
    s = ins[0]
    assert isinstance(s, Batched), s
    return s


def _mismatch(ctx: Ctx, a: Batched, b: Batched, what: str = "combines values") -> list[State]:
    """Two batched operands meeting in one result with different batch layouts."""
    if a.simple and b.simple and a.axis != b.axis:
        # out[.., i (axis a), .., j (axis b), ..] depends on examples i and j: rows mix.
        return ctx.couple(f"{what} batched along axes {a.axis} and {b.axis}", True)
    return ctx.couple(f"{what} whose batch axes are laid out differently ({a} and {b})", False)


# ----------------------------------------------------------------------------------------------
# Elementwise primitives (equal-rank operands, size-1 dimensions broadcast) and identities.

ELEMENTWISE = (
    "neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan asin "
    "acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt square abs erf erfc erf_inv lgamma "
    "digamma igamma igammac igamma_grad_a random_gamma_grad bessel_i0e bessel_i1e polygamma zeta "
    "regularized_incomplete_beta real imag conj complex not population_count clz add sub mul div "
    "rem pow integer_pow max min atan2 nextafter and or xor shift_left shift_right_logical "
    "shift_right_arithmetic eq ne lt le gt ge select_n clamp convert_element_type "
    "bitcast_convert_type reduce_precision copy copy_p stop_gradient add_any random_fold_in "
    "random_seed random_clone threefry2x32"
).split()


@_rule(*ELEMENTWISE)
def _elementwise(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    out = _shape(eqn.outvars[0])
    first = _batched(ins)[0][1]
    for k, s in _batched(ins):
        if s != first:
            return _mismatch(ctx, first, s)
        shape = _shape(eqn.invars[k])
        # The batch axis must not be broadcast from size 1 (that happens only for a batch of one).
        if len(shape) != len(out) or shape[s.axis] != out[s.axis]:
            return ctx.couple("broadcasts a batched operand along its batch axis", False)
    return [first] * _n_out(eqn)


@_rule("optimization_barrier")
def _identity(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    return list(ins)


@_rule("debug_callback", "debug_print")
def _no_outputs(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    return [CONST] * _n_out(eqn)


# ----------------------------------------------------------------------------------------------
# Shape manipulation: track where the batch axis goes.


@_rule("broadcast_in_dim")
def _broadcast_in_dim(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s = ins[0]
    if not isinstance(s, Batched):  # only a dynamic-shape operand is batched
        return ctx.couple("has a batch-dependent shape", False)
    axis = eqn.params["broadcast_dimensions"][s.axis]
    if _shape(eqn.invars[0])[s.axis] != _shape(eqn.outvars[0])[axis]:
        return ctx.couple("broadcasts the batch axis", False)
    return [s.at(axis)]


@_rule("reshape")
def _reshape(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    # In row-major order the batch index i is one "digit" of the flat index: f = hi*(post*n) +
    # i*post + lo. It survives the reshape iff it lies within one output axis b, i.e. that axis's
    # stride divides post and its extent is a multiple of post*n; then the new state records the
    # digits merged into axis b around the batch index (outer, inner).
    s = ins[0]
    old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    if not isinstance(s, Batched):  # only a dynamic-shape operand is batched
        return ctx.couple("has a batch-dependent shape", False)
    if eqn.params.get("dimensions") is not None:
        return ctx.couple("reshapes with a transposition", False)
    n = old[s.axis] // (s.outer * s.inner)
    post = s.inner * math.prod(old[s.axis + 1 :])
    stride = 1
    for b in reversed(range(len(new))):
        if post % stride == 0 and (stride * new[b]) % (post * n) == 0:
            return [Batched(b, outer=stride * new[b] // (post * n), inner=post // stride)]
        stride *= new[b]
    return ctx.couple("reshape splits the batch axis", False)


@_rule("transpose")
def _transpose(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s = _only(ins)
    return [s.at(tuple(eqn.params["permutation"]).index(s.axis))]


@_rule("squeeze")
def _squeeze(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s, dims = _only(ins), tuple(d % len(_shape(eqn.invars[0])) for d in eqn.params["dimensions"])
    if s.axis in dims:
        return ctx.couple("squeezes the batch axis away", False)
    return [s.at(s.axis - sum(d < s.axis for d in dims))]


@_rule("rev")
def _rev(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    if _only(ins).axis in eqn.params["dimensions"]:
        return ctx.couple("reverses the order of the examples", True)
    return [ins[0]]


@_rule("slice")
def _slice(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s = _only(ins)
    a, p = s.axis, eqn.params
    strides = p["strides"] or (1,) * len(p["start_indices"])
    if (p["start_indices"][a], p["limit_indices"][a], strides[a]) != (0, _shape(eqn.invars[0])[a], 1):
        return ctx.couple("takes part of the batch along the batch axis", False)
    return [s]


@_rule("dynamic_slice")
def _dynamic_slice(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s = ins[0]
    if not isinstance(s, Batched):
        return ctx.couple("slices at a batch-dependent position", False)
    if eqn.params["slice_sizes"][s.axis] != _shape(eqn.invars[0])[s.axis]:
        return ctx.couple("takes part of the batch along the batch axis", False)
    return [s]


@_rule("dynamic_update_slice")
def _dynamic_update_slice(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    op, upd = ins[0], ins[1]
    if any(isinstance(s, Batched) for s in ins[2:]):
        return ctx.couple("updates at a batch-dependent position", False)
    if isinstance(op, Batched) and isinstance(upd, Batched) and op != upd:
        return _mismatch(ctx, op, upd, "writes values")
    s = op if isinstance(op, Batched) else upd
    assert isinstance(s, Batched)  # the start indices are not batched, so the operand or update is
    # A constant update writes the same values into every row it covers; a batched update must
    # cover the whole batch axis, so that its start there is clamped to 0 and rows stay aligned.
    if isinstance(upd, Batched) and _shape(eqn.invars[1])[s.axis] != _shape(eqn.invars[0])[s.axis]:
        return ctx.couple("writes a batched update into part of the batch", False)
    return [s]


@_rule("pad")
def _pad(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s = ins[0]
    if not isinstance(s, Batched):
        return ctx.couple("pads with a batch-dependent value", False)
    if tuple(eqn.params["padding_config"][s.axis]) != (0, 0, 0):
        return ctx.couple("pads along the batch axis", False)
    return [s]


@_rule("concatenate")
def _concatenate(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    first = _batched(ins)[0][1]
    for _, s in _batched(ins):
        if s != first:
            return _mismatch(ctx, first, s, "concatenates values")
    if eqn.params["dimension"] == first.axis:
        return ctx.couple("concatenates along the batch axis", False)
    return [first]


@_rule("split")
def _split(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    if eqn.params["axis"] % len(_shape(eqn.invars[0])) == _only(ins).axis:
        return ctx.couple("splits the batch axis", False)
    return [ins[0]] * _n_out(eqn)


# ----------------------------------------------------------------------------------------------
# Reductions, scans along an axis, sorting.

_REDUCE_VERBS = {
    "reduce_sum": "sums",
    "reduce_max": "takes the maximum",
    "reduce_min": "takes the minimum",
    "reduce_prod": "multiplies",
    "reduce_and": "takes the logical and",
    "reduce_or": "takes the logical or",
    "reduce_xor": "takes the exclusive or",
    "argmax": "takes the argmax",
    "argmin": "takes the argmin",
    "reduce": "reduces",
}


@_rule(*_REDUCE_VERBS)
def _reduce(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    axes = tuple(eqn.params.get("axes", eqn.params.get("dimensions", ())))
    s = _batched(ins)[0][1]
    for _, other in _batched(ins):
        if other != s:
            return _mismatch(ctx, s, other, "reduces values")
    if s.axis in axes:
        return ctx.couple(f"{_REDUCE_VERBS[eqn.primitive.name]} over the batch axis", True)
    return [s.at(s.axis - sum(a < s.axis for a in axes))] * _n_out(eqn)


@_rule("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def _cumulative(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    if eqn.params["axis"] % len(_shape(eqn.invars[0])) == _only(ins).axis:
        return ctx.couple("accumulates along the batch axis", True)
    return [ins[0]]


@_rule("sort", "top_k")
def _sort(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s = _batched(ins)[0][1]
    for _, other in _batched(ins):
        if other != s:
            return _mismatch(ctx, s, other, "sorts values")
    ndim = len(_shape(eqn.invars[0]))
    axis = eqn.params.get("dimension", eqn.params.get("axis", ndim - 1)) % ndim
    if axis == s.axis:
        return ctx.couple("sorts along the batch axis", True)
    # Keys and companion operands (argsort's iota) are permuted within each row.
    return [s] * _n_out(eqn)


# ----------------------------------------------------------------------------------------------
# Contractions and windows.


@_rule("dot_general")
def _dot_general(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    lnd, rnd = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
    lfree = [d for d in range(lnd) if d not in lc and d not in lb]
    rfree = [d for d in range(rnd) if d not in rc and d not in rb]

    def place(s: Batched, contract, batch, free, offset) -> Union[Batched, str]:
        if s.axis in contract:
            return "contracts over the batch axis"
        if s.axis in batch:
            return s.at(tuple(batch).index(s.axis))
        return s.at(len(lb) + offset + free.index(s.axis))

    lo = place(lhs, lc, lb, lfree, 0) if isinstance(lhs, Batched) else None
    ro = place(rhs, rc, rb, rfree, len(lfree)) if isinstance(rhs, Batched) else None
    if isinstance(lo, str):
        return ctx.couple(lo, True)
    if isinstance(ro, str):
        return ctx.couple(ro, True)
    if lo is not None and ro is not None:
        # Both operands batched: fine only when their batch axes are paired as one dot_general
        # batch dimension (per-example attention scores); anything else multiplies example i by
        # example j.
        if lo != ro:
            if lo.simple and ro.simple:
                return ctx.couple("multiplies different examples with each other", True)
            return _mismatch(ctx, lo, ro, "multiplies values")
    out = lo if lo is not None else ro
    assert out is not None  # the interpreter calls a rule only when an operand is batched
    return [out]


@_rule("conv_general_dilated")
def _conv(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    if isinstance(rhs, Batched):
        return ctx.couple("convolves with a batch-dependent kernel", False)
    assert isinstance(lhs, Batched)  # some operand is batched, and the kernel is not
    if lhs.axis != dn.lhs_spec[0]:
        kernel = _shape(eqn.invars[1])
        if lhs.axis == dn.lhs_spec[1]:
            return ctx.couple("contracts over the batch axis (it is the convolution's feature axis)", True)
        k = tuple(dn.lhs_spec[2:]).index(lhs.axis)
        if kernel[dn.rhs_spec[2 + k]] > 1:
            return ctx.couple("convolves along the batch axis", True)
        return ctx.couple("has the batch axis as a spatial axis of a convolution", False)
    if eqn.params.get("batch_group_count", 1) != 1:
        return ctx.couple("groups the batch axis (batch_group_count > 1)", False)
    return [lhs.at(dn.out_spec[0])]


@_rule(
    "reduce_window_sum",
    "reduce_window_max",
    "reduce_window_min",
    "reduce_window",
    "select_and_scatter_add",
    "select_and_gather_add",
)
def _window(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    s = _batched(ins)[0][1]
    for _, other in _batched(ins):
        if other != s:
            return _mismatch(ctx, s, other, "pools values")
    p, a = eqn.params, s.axis
    if p["window_dimensions"][a] > 1:
        return ctx.couple("pools over the batch axis", True)
    dil = p.get("base_dilation") or (1,) * len(p["window_dimensions"])
    if p["window_strides"][a] != 1 or tuple(p["padding"][a]) != (0, 0) or dil[a] != 1:
        return ctx.couple("strides or pads the batch axis of a window", False)
    return [s] * _n_out(eqn)


# ----------------------------------------------------------------------------------------------
# Indexing.


@_rule("gather")
def _gather(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    op, idx = ins[0], ins[1]
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    op_shape, idx_shape = _shape(eqn.invars[0]), _shape(eqn.invars[1])
    out_rank = len(_shape(eqn.outvars[0]))
    # Output positions not in offset_dims enumerate the index array's dimensions (all but the
    # trailing index-vector one); the operand's offset dimensions fill offset_dims in order.
    batch_pos = [d for d in range(out_rank) if d not in dn.offset_dims]
    op_offset = [
        d for d in range(len(op_shape)) if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims
    ]
    from_idx = from_op = None
    if isinstance(idx, Batched):
        if idx.axis == len(idx_shape) - 1:
            return ctx.couple("gathers with a batched index vector", False)
        from_idx = idx.at(batch_pos[idx.axis])  # embedding lookups: table[ids]
    if isinstance(op, Batched):
        a = op.axis
        if a in dn.operand_batching_dims:  # take_along_axis: indices paired with the example
            k = tuple(dn.operand_batching_dims).index(a)
            from_op = op.at(batch_pos[dn.start_indices_batching_dims[k]])
        elif a in op_offset and a not in dn.start_index_map and sizes[a] == op_shape[a]:
            from_op = op.at(dn.offset_dims[op_offset.index(a)])
        else:
            return ctx.couple("selects examples by index along the batch axis", False)
    if from_idx is not None and from_op is not None and from_idx != from_op:
        return _mismatch(ctx, from_op, from_idx, "gathers values")
    out = from_idx if from_idx is not None else from_op
    assert out is not None  # an operand is batched, and each batched case set one or returned
    return [out]


@_rule(
    "scatter",
    "scatter-add",
    "scatter_add",
    "scatter-mul",
    "scatter_mul",
    "scatter-min",
    "scatter_min",
    "scatter-max",
    "scatter_max",
)
def _scatter(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    # Only the simple case: constant indices, the batch axis a full window dimension of both the
    # operand and the updates (x.at[:, 0].set(v)), so every row is updated at the same positions.
    op, idx, upd = ins[:3]
    dn = eqn.params["dimension_numbers"]
    if isinstance(idx, Batched) or any(isinstance(s, Batched) for s in ins[3:]):
        return ctx.couple("scatters at batch-dependent indices", False)
    op_shape, upd_shape = _shape(eqn.invars[0]), _shape(eqn.invars[2])
    # The operand's window dimensions correspond, in order, to the updates' update_window_dims.
    op_window = [
        d for d in range(len(op_shape)) if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims
    ]
    windows = tuple(dn.update_window_dims)
    a = out = None
    if isinstance(op, Batched):
        a, out = op.axis, op
    else:
        assert isinstance(upd, Batched)  # nothing else is batched now, and some operand is
        if upd.axis in windows:
            a = op_window[windows.index(upd.axis)]
            out = upd.at(a)
    if a is None or out is None or a not in op_window or a in dn.scatter_dims_to_operand_dims:
        return ctx.couple("scatters into the batch axis", False)
    u = windows[op_window.index(a)]
    if upd_shape[u] != op_shape[a] or (isinstance(upd, Batched) and upd != out.at(u)):
        return ctx.couple("scatters into the batch axis", False)
    return [out]


# ----------------------------------------------------------------------------------------------
# Random numbers: a key array's dimensions lead the result's.


@_rule("random_bits", "random_split", "random_unwrap")
def _random_leading(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    return [ins[0]]


@_rule("random_wrap")
def _random_wrap(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    if _only(ins).axis >= len(_shape(eqn.outvars[0])):
        return ctx.couple("wraps the batch axis into key data", False)
    return [ins[0]]


# ----------------------------------------------------------------------------------------------
# Calls and control flow.

_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@_rule(
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
)
def _call(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    for key in _CALL_PARAMS:
        sub = eqn.params.get(key)
        if sub is not None and len(getattr(sub, "jaxpr", sub).invars) == len(ins):
            return ctx.run(sub, ins)
    return ctx.couple("calls a program the analysis cannot see", False)


def _fixed_point(ctx: Ctx, body: Any, before: list, carry: list, after: list, n_carry: int) -> list:
    """Carry states of a loop: join the body's carry outputs into its inputs until stable.

    Each pass before the last raises at least one carry (CONST -> Batched/ROW -> TOP), so
    ``2 * n_carry + 1`` passes always suffice. Couplings met in any pass are real: the states of
    a pass are below the final ones, and a rule reporting at some states reports at higher ones
    too, unless an input became TOP, which was reported where it arose.
    """
    for _ in range(2 * n_carry + 1):
        outs = ctx.run(body, before + carry + after)[:n_carry]
        new = [join(c, o) for c, o in zip(carry, outs)]
        for c, o, j in zip(carry, outs, new):
            if j is TOP and c is not TOP and o is not TOP:
                ctx.couple("moves the batch axis of a loop carry from one iteration to the next", False)
        if new == carry:
            return carry
        carry = new
    raise AssertionError("the loop analysis did not reach a fixed point")


@_rule("scan")
def _scan(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = list(ins[:nc]), list(ins[nc : nc + ncar]), ins[nc + ncar :]
    # The body sees one slice of each xs along axis 0: a scan over the batch axis sees one
    # example (ROW), a scan over another axis (time in an LSTM) sees the batch one axis lower.
    over_batch = any(isinstance(s, Batched) and s.axis == 0 for s in xs)
    x_in = []
    for s in xs:
        if isinstance(s, Batched) and s.axis == 0 and not s.simple:
            return ctx.couple("scans over an axis merged with the batch axis", False)
        x_in.append(ROW if s == Batched(0) else s.at(s.axis - 1) if isinstance(s, Batched) else s)
    carry = _fixed_point(ctx, p["jaxpr"], consts, carry, x_in, ncar)
    if over_batch and ROW in carry:
        ctx.couple("carries state from one example to the next (a scan over the batch axis)", True)
        carry = [TOP if c is ROW else c for c in carry]
    ys = ctx.run(p["jaxpr"], consts + carry + x_in)[ncar:]
    ys = [Batched(0) if y is ROW else y.at(y.axis + 1) if isinstance(y, Batched) else y for y in ys]
    # The final carry is the fixed point, not the body's last output: it also covers the initial
    # carry (a loop may run zero times).
    return carry + ys


@_rule("while")
def _while(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = list(ins[:cn]), list(ins[cn : cn + bn]), list(ins[cn + bn :])
    carry = _fixed_point(ctx, p["body_jaxpr"], bconsts, carry, [], len(carry))
    (pred,) = ctx.run(p["cond_jaxpr"], cconsts + carry)
    if pred is TOP:
        # A trip count that depends on the data is shared by every row; the predicate's
        # reduction over the batch was reported inside the condition.
        return [TOP] * len(carry)
    if pred is not CONST:
        return ctx.couple("loops for a batch-dependent number of iterations", False)
    return carry


@_rule("cond")
def _cond(eqn: Any, ins: list[State], ctx: Ctx) -> list[State]:
    index, args = ins[0], list(ins[1:])
    if index is not CONST:
        return ctx.couple("branches on a batch-dependent predicate", False)
    first, *rest = eqn.params["branches"]
    outs = ctx.run(first, args)
    for branch in rest:
        outs = [join(a, b) for a, b in zip(outs, ctx.run(branch, args))]
    for k, o in enumerate(outs):
        if o is TOP and TOP not in [ctx.run(b, args)[k] for b in eqn.params["branches"]]:
            return ctx.couple("returns the batch axis at different places in different branches", False)
    return outs

"""Constants of the input: values computed from integer and bool input leaves alone.

A padding mask ``tokens > 0``, a length ``(tokens != pad).sum(-1)`` or a position mask are
functions of the input with no parameters and no randomness in them: for each example they are
one fixed array. The engine keeps them as :class:`InputConstant` values, computed for ``x1`` and
for ``x2``, and never gives them a kernel. What they may do to an input-dependent
:class:`~ntk_adapters.infinite.values.Value`:

* multiply (or divide) it entry by entry where the constant is the same for every channel
  (``h * mask[..., None]``, ``jnp.where(mask[..., None], h, 0)``, ``h / count``): each example
  ``n`` at position ``p`` is scaled by its own ``m[n, p]``. The channels stay i.i.d., and the
  kernel entry of ``(n, p)`` and ``(n', p')`` is multiplied by ``m1[n, p] · m2[n', p']``, NNGP and
  NTK alike (the mask has no parameters). A zero-mean Gaussian process stays one, and the output
  of a fresh random linear layer stays independent of everything before it. A masked sum over
  positions ``Σ_t m[n, t] h[n, t, c]`` then needs the covariance between positions
  (``spatial_layout='full'``, chosen by ``'auto'``) and has the kernel
  ``Σ_{t, t'} m1[n, t] m2[n', t'] K[n, n', t, t']``;
* reach a module or an operation as floats: then they are an input feature like a float input
  leaf (``nngp = x·x'/C``, zero NTK).

A constant that varies along the channel axis (``one_hot(tokens)``) multiplying a value would
make the channels differ; that, and every other use of integers (a lookup in a parameter table
outside the embedding layers with a rule, see :mod:`~ntk_adapters.infinite.embeddings`), is
refused by the interpreter, naming the leaf.

Equations on input constants are evaluated with the traced program's own parameters, so they
must act on each example separately (:func:`evaluate` checks which primitives do). The program
is traced for ``x1``'s batch; for an ``x2`` with another number of rows the equation is evaluated
on chunks of ``x1``'s batch size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.values import Concrete, Value, is_value, new_id

__all__ = ["InputConstant", "evaluate", "input_leaf", "mask_rule", "scale_examples"]


@dataclasses.dataclass(frozen=True, eq=False)
class InputConstant:
    """A per-example array that is a function of integer or bool input leaves alone.

    Attributes:
      name: the input leaves it is computed from (``x``, ``x['ids']``), for messages.
      x1: the array for the ``x1`` batch, ``(N1, *shape)``.
      x2: the array for the ``x2`` batch, ``(N2, *shape)``; ``None`` when ``x2`` is ``x1``.
      const_axes: per-example axes (0 is the first axis after the batch) along which every
        example's array is known to be constant, from how it was computed (the arrays may be
        traced, so this cannot be read from their values).
      leaf: whether this is the input leaf itself rather than something computed from it.
    """

    name: str
    x1: Any
    x2: Any
    const_axes: frozenset = frozenset()
    leaf: bool = False

    @property
    def shape(self) -> tuple:
        """The per-example shape."""
        return tuple(self.x1.shape[1:])

    @property
    def dtype(self):
        return self.x1.dtype

    @property
    def is_float(self) -> bool:
        return bool(jnp.issubdtype(self.dtype, jnp.floating))

    def describe(self) -> str:
        """``input leaf x (int32, per-example shape (8,))`` or ``a value computed from input leaf x (...)``."""
        what = f"input leaf {self.name}" if self.leaf else f"a value computed from input leaf {self.name}"
        return f"{what} ({self.dtype}, per-example shape {self.shape})"


def input_leaf(name: str, a1, a2) -> InputConstant:
    """An integer or bool input leaf (``a2`` ``None`` when ``x2`` is ``x1``)."""
    return InputConstant(name=name, x1=a1, x2=a2, const_axes=_unit_axes(tuple(a1.shape[1:])), leaf=True)


def _unit_axes(shape: Sequence[int]) -> frozenset:
    return frozenset(d for d, s in enumerate(shape) if s == 1)


# ----------------------------------------------------------------------------------------------
# Equations on input constants.

_REDUCTIONS = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "reduce_xor",
    "argmax",
    "argmin",
}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}


def _acts_per_example(eqn, invals, batch: int) -> bool:
    """Whether ``eqn`` computes each example's outputs from that example's inputs alone, with the
    batch as axis 0 of every per-example operand and output."""
    name = eqn.primitive.name
    p = eqn.params
    outs = [v.aval for v in eqn.outvars]
    if not all(len(getattr(a, "shape", ())) >= 1 and a.shape[0] == batch for a in outs):
        return False
    if name in _rules.ELEMENTWISE_PRIMITIVES:
        return True
    if name == "broadcast_in_dim":
        return len(eqn.invars[0].aval.shape) >= 1 and p["broadcast_dimensions"][:1] == (0,)
    if name == "reshape":
        return p.get("dimensions") is None and tuple(p["new_sizes"])[:1] == (batch,)
    if name == "transpose":
        return tuple(p["permutation"])[:1] == (0,)
    if name == "squeeze":
        return 0 not in tuple(p["dimensions"])
    if name in _REDUCTIONS:
        return 0 not in tuple(p["axes"])
    if name in _CUMULATIVE:
        return p["axis"] != 0
    if name in ("rev",):
        return 0 not in tuple(p["dimensions"])
    if name == "pad":
        return tuple(p["padding_config"][0]) == (0, 0, 0)
    if name == "slice":
        strides = p.get("strides")
        return p["start_indices"][0] == 0 and p["limit_indices"][0] == batch and (strides is None or strides[0] == 1)
    if name in ("dynamic_slice", "dynamic_update_slice"):
        first_index = invals[1] if name == "dynamic_slice" else invals[2]
        if not isinstance(first_index, Concrete):
            return False
        try:
            if int(np.asarray(first_index.value)) != 0:
                return False
        except (TypeError, jax.errors.ConcretizationTypeError):
            return False
        index_start = 1 if name == "dynamic_slice" else 2
        if any(not isinstance(v, Concrete) for v in invals[index_start:]):
            return False
        return name == "dynamic_update_slice" or tuple(p["slice_sizes"])[:1] == (batch,)
    if name == "concatenate":
        return p["dimension"] != 0
    if name == "gather":
        # a lookup in a constant table at per-example indices (``table[ids]``): the output's leading
        # axis is the indices' batch axis
        dn = p["dimension_numbers"]
        return (
            isinstance(invals[0], Concrete)
            and isinstance(invals[1], InputConstant)
            and 0 not in tuple(dn.offset_dims)
            and not tuple(dn.operand_batching_dims)
        )
    if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min"):
        return (
            p["window_dimensions"][0] == 1
            and p["window_strides"][0] == 1
            and tuple(p["padding"][0]) == (0, 0)
            and p["base_dilation"][0] == 1
        )
    if name == "sort":
        return p["dimension"] != 0
    if name == "split":
        return p["axis"] != 0
    return False


def _concrete_const_axes(c: Concrete, ndim: int) -> frozenset:
    """Per-example axes along which a concrete operand of a per-example equation is constant."""
    if c.scalar is not None or np.ndim(c.value) == 0:
        return frozenset(range(ndim))
    try:
        a = np.asarray(c.value)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return frozenset()
    return frozenset(d for d in range(a.ndim - 1) if a.shape[d + 1] == 1 or bool(np.all(a == a.take([0], axis=d + 1))))


def _out_const_axes(eqn, invals) -> list[frozenset]:
    """Per-example axes along which each output is constant, from how the equation computes it."""
    name = eqn.primitive.name
    p = eqn.params
    out_shapes = [tuple(v.aval.shape[1:]) for v in eqn.outvars]
    nd = len(out_shapes[0])

    def of(v, ndim=nd) -> frozenset:
        if isinstance(v, InputConstant):
            return v.const_axes
        return _concrete_const_axes(v, ndim)

    first = invals[0]
    in_shape = tuple(eqn.invars[0].aval.shape[1:])
    if name in _rules.ELEMENTWISE_PRIMITIVES:
        axes = frozenset(range(nd))
        for v in invals:
            axes &= of(v)
        found = [axes] * len(out_shapes)
    elif name == "broadcast_in_dim":
        dims = [d - 1 for d in p["broadcast_dimensions"][1:]]  # per-example operand axis i -> output axis dims[i]
        src = {o: i for i, o in enumerate(dims)}
        moved: set[int] = set()
        for o in range(nd):
            if o not in src or (in_shape[src[o]] == 1 and out_shapes[0][o] != 1) or src[o] in of(first, len(in_shape)):
                moved.add(o)
        found = [frozenset(moved)]
    elif name == "reshape":
        kept_in = [d for d, s in enumerate(in_shape) if s != 1]
        kept_out = [d for d, s in enumerate(out_shapes[0]) if s != 1]
        if [in_shape[d] for d in kept_in] == [out_shapes[0][d] for d in kept_out]:
            found = [frozenset(o for i, o in zip(kept_in, kept_out) if i in of(first, len(in_shape)))]
        else:
            found = [frozenset()]
    elif name == "transpose":
        perm = [d - 1 for d in p["permutation"][1:]]
        found = [frozenset(o for o, i in enumerate(perm) if i in of(first, len(in_shape)))]
    elif name in ("squeeze",) or name in _REDUCTIONS:
        removed = {d - 1 for d in (p["dimensions"] if name == "squeeze" else p["axes"])}
        remaining = [d for d in range(len(in_shape)) if d not in removed]
        found = [frozenset(o for o, i in enumerate(remaining) if i in of(first, len(in_shape)))] * len(out_shapes)
    elif name in ("slice", "dynamic_slice", "rev"):
        found = [of(first, len(in_shape))]
    elif name == "pad":
        padded = {d - 1 for d, cfg in enumerate(p["padding_config"]) if tuple(cfg) != (0, 0, 0)}
        found = [of(first, len(in_shape)) - padded]
    elif name in _CUMULATIVE or name in ("sort", "split", "concatenate"):
        axis = p["axis"] if name in _CUMULATIVE or name == "split" else p["dimension"]
        axes = frozenset(range(nd))
        for v in invals:
            axes &= of(v)
        found = [axes - {axis - 1}] * len(out_shapes)
    else:
        found = [frozenset()] * len(out_shapes)
    return [a | _unit_axes(s) for a, s in zip(found, out_shapes)]


def _bind_rows(eqn, args: list, per_example: list[bool], n: int, batch: int):
    """``eqn`` on operands of which those marked ``per_example`` have ``n`` rows, for a program traced
    with ``batch`` rows; the others are the same for every chunk of rows.

    The equation acts on each example separately, so rows can be processed in chunks of the traced
    batch size (padded by repeating the first row), with the traced parameters unchanged.
    """
    if n == batch:
        return _programs.bind(eqn, args)
    k = -(-n // batch)

    def chunks(a):
        a = jnp.asarray(a)
        if k * batch > n:
            a = jnp.concatenate([a, jnp.repeat(a[:1], k * batch - n, axis=0)], axis=0)
        return a.reshape((k, batch) + a.shape[1:])

    ins = [chunks(a) if b else a for a, b in zip(args, per_example)]
    out = jax.vmap(lambda *xs: _programs.bind(eqn, list(xs)), in_axes=[0 if b else None for b in per_example])(*ins)
    return jax.tree_util.tree_map(lambda o: o.reshape((k * batch,) + o.shape[2:])[:n], out)


def evaluate(eqn, invals: Sequence[Any], batch: int) -> Optional[list[InputConstant]]:
    """The outputs of an equation whose operands are input constants and constants of the model
    (no parameters), or ``None`` when the equation does not act on each example separately."""
    if not _acts_per_example(eqn, invals, batch):
        return None
    consts = [v for v in invals if isinstance(v, InputConstant)]
    names = sorted({c.name for c in consts})
    if consts[0].x2 is not None and consts[0].x2.shape[0] != batch and eqn.primitive.name != "gather":
        for v in invals:
            # A constant with the traced batch axis (lax operands of elementwise equations are
            # full-shaped) serves every chunk of x2's rows: only right if its rows are equal,
            # otherwise it depends on an example's position in the batch, not on the example.
            if (
                isinstance(v, Concrete)
                and np.ndim(v.value) > 0
                and np.shape(v.value)[0] == batch
                and not _rows_equal(v.value)
            ):
                return None
    out1 = _programs.bind(eqn, [v.x1 if isinstance(v, InputConstant) else v.value for v in invals])
    out2 = None
    if consts[0].x2 is not None:
        n2 = consts[0].x2.shape[0]
        out2 = _bind_rows(
            eqn,
            [v.x2 if isinstance(v, InputConstant) else v.value for v in invals],
            [isinstance(v, InputConstant) for v in invals],
            n2,
            batch,
        )
    if not eqn.primitive.multiple_results:
        out1, out2 = [out1], [out2]
    elif out2 is None:
        out2 = [None] * len(out1)
    axes = _out_const_axes(eqn, invals)
    return [InputConstant(name=" and ".join(names), x1=a, x2=b, const_axes=c) for a, b, c in zip(out1, out2, axes)]


def _rows_equal(a) -> bool:
    try:
        a = np.asarray(a)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False
    return bool(np.all(a == a[:1]))


# ----------------------------------------------------------------------------------------------
# Masking a value.


def _interleave(s, first: bool, n_batch_axes: int):
    """``s`` ``(N, *spatial)`` laid out as one side of a 'full' kernel entry: spatial axis ``i`` at
    ``n_batch_axes + 2i`` (``first``) or ``n_batch_axes + 2i + 1``, size-1 axes elsewhere."""
    d = s.ndim - 1
    shape = [s.shape[0]] + [1] * (n_batch_axes - 1)
    for i in range(d):
        shape += [s.shape[1 + i], 1] if first else [1, s.shape[1 + i]]
    if n_batch_axes == 2 and not first:
        shape[0], shape[1] = 1, s.shape[0]
    return s.reshape(shape)


def scale_examples(kernel: Kernel, s1, s2=None) -> Kernel:
    """Multiplication of example ``n`` at position ``p`` by its own ``s[n, p]``, the same for every channel.

    The kernel entry of ``(n, p)`` and ``(n', p')`` is multiplied by ``s1[n, p] · s2[n', p']``
    (NNGP and NTK: the factors have no parameters), the per-input variances by ``s[n, p] s[n, p']``.
    Channels stay i.i.d. and a zero-mean Gaussian process stays one (``is_gaussian`` is kept).

    Args:
      kernel: any layout.
      s1: ``(N1, *spatial)`` factors for the ``x1`` examples (``(N1,)`` for layout ``'none'``).
      s2: the same for ``x2``, ``(N2, *spatial)``; ``None`` when ``x2`` is ``x1``.

    Example::

        k = scale_examples(k, mask1, mask2)   # mask (N, T) on a kernel of spatial shape (T,)
    """
    dtype = kernel.nngp.dtype
    s1 = jnp.asarray(s1, dtype)
    s2 = s1 if s2 is None else jnp.asarray(s2, dtype)
    if kernel.layout in ("none", "diagonal"):
        pair = s1[:, None] * s2[None, :]
        c1, c2 = s1 * s1, s2 * s2
    else:
        pair = _interleave(s1, True, 2) * _interleave(s2, False, 2)
        c1 = _interleave(s1, True, 1) * _interleave(s1, False, 1)
        c2 = _interleave(s2, True, 1) * _interleave(s2, False, 1)
    return kernel.replace(
        nngp=pair * kernel.nngp,
        ntk=None if kernel.ntk is None else pair * kernel.ntk,
        cov1=c1 * kernel.cov1,
        cov2=c2 * kernel.cov2,
    )


def _mask_operands(eqn, invals):
    """``(value, mask, how)`` of a masking equation, ``how`` one of ``'mul'``, ``'div'``, ``'keep'``
    (select the value where the mask holds, else 0) and ``'drop'`` (the opposite), else ``None``."""
    name = eqn.primitive.name
    if name == "mul" and len(invals) == 2:
        a, b = invals
        if is_value(a) and isinstance(b, InputConstant):
            return a, b, "mul"
        if is_value(b) and isinstance(a, InputConstant):
            return b, a, "mul"
    if name == "div" and len(invals) == 2 and is_value(invals[0]) and isinstance(invals[1], InputConstant):
        return invals[0], invals[1], "div"
    if name == "select_n" and len(invals) == 3 and isinstance(invals[0], InputConstant):
        pred, on_false, on_true = invals

        def zero(c):
            return isinstance(c, Concrete) and c.scalar is not None and float(c.scalar) == 0.0

        if is_value(on_true) and zero(on_false):
            return on_true, pred, "keep"
        if is_value(on_false) and zero(on_true):
            return on_false, pred, "drop"
    return None


def mask_rule(eqn, invals, ctx: _rules.PrimitiveContext) -> Optional[list]:
    """A value multiplied (or divided) entry by entry by an input constant that is the same for every
    channel: the outputs, or ``None`` when ``eqn`` is not such an operation. Raises
    :class:`~ntk_adapters.infinite.rules.InfiniteWidthError` for a masking that has no exact kernel."""
    found = _mask_operands(eqn, invals)
    if found is None:
        return None
    v, m, how = found
    where = f"{m.describe()}"
    if v.flat:
        raise ctx.error(eqn, f"masks a flattened spatial value with {where}; mask before flattening")
    channel = len(v.shape) - 1
    if v.shape and channel not in m.const_axes:
        leaves = f"{v.source} and {m.name}" if v.source else f"an input-dependent value and {m.name}"
        raise ctx.error(
            eqn,
            f"combines {leaves} entry by entry with a constant of the input that varies along "
            f"the channel axis ({where}): the channels would no longer be identically distributed. "
            "Only masks that are the same for every channel (a per-position mask[..., None]) "
            "have an exact kernel",
        )
    v = ctx.materialize(v, eqn)
    if len(v.kernel.spatial) != max(len(v.shape) - 1, 0):
        raise ctx.error(
            eqn, f"masks a value of per-example shape {v.shape} whose kernel has spatial shape {v.kernel.spatial}"
        )

    def factors(a):
        if a is None:
            return None
        s = a[..., 0] if v.shape else a
        if how == "div":
            return 1.0 / s.astype(v.kernel.nngp.dtype)
        if how == "drop":
            return jnp.logical_not(s)
        return s

    k = scale_examples(v.kernel, factors(m.x1), factors(m.x2))
    return [Value(kernel=k, shape=v.shape, flat=False, base=new_id(), fresh=v.fresh, deps=v.deps, source=v.source)]

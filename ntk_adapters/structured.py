"""Structured (layer-factorized) empirical NTK: ``implementation='structured'``.

For a linear operation ``y = a · W`` the Jacobian block of the outputs with respect to ``W`` is
an outer product of the input activations ``a`` and the output cotangents
``g[o] = ∂f_o/∂y``, so the NTK contribution of ``W`` never needs that block:

    Θ_W[o1, o2] = Σ_{p, p'} (Σ_i a1[p, i] a2[p', i]) · (Σ_j g1[o1, p, j] g2[o2, p', j])

with ``p`` the positions the weight is shared over (none for a dense layer on vectors, the
spatial output positions for a convolution, whose activations are the input *patches*). This
is an activation Gram times a cotangent Gram (Novak et al. 2022, "Fast Finite Width Neural
Tangent Kernel"). When the positions are many and the channels few, the per-example weight
Jacobian ``Σ_p a[p, i] g[o, p, j]`` is cheaper than the Gram of positions; each layer takes the
cheaper of the two forms by a multiply-add count from the shapes. Both are exact.

How the pieces are found without changing the model: the model is traced with
:func:`jax.make_jaxpr` over its flattened parameters. A parameter leaf is *factorized* when its
only use is one ``dot_general``, ``conv_general_dilated``, ``add``, ``sub`` or ``mul``
equation, reached from the leaf through shape-only linear steps (``reshape``, ``transpose``,
``convert_element_type``, ``broadcast_in_dim``, ``squeeze``, ``neg``, multiplication by a
scalar literal, calls of nested ``jit`` functions). The jaxpr is re-evaluated with a zero
*probe* added to the output of each such equation; derivatives with respect to the probes are
the cotangents ``g``, and the other operand of the equation is captured as the activation
``a``. Dense kernels (no ``dot_general`` batch dimensions) and ungrouped convolutions use the
Gram form when cheaper; biases, normalization scales and any other factorized use get the
per-example Jacobian form, computed from ``a`` and ``g`` by the transpose of that one equation.
Every other leaf (used twice, used inside a custom-derivative function or a loop, ...) falls back
to its ordinary Jacobian, taken in the same backward pass as the probe cotangents.

Examples and cotangents: with ``vmap_axes=a`` (examples independent along axis ``a``, as
:func:`ntk_adapters.empirical.empirical_ntk_fn` documents) the cotangent of output ``(n, o)``
touches only example ``n``, and everything is computed one example at a time: this is where the
method is fast. With ``vmap_axes=None`` nothing is assumed: the cotangents are taken for the
whole batch (``g[n, o, m, ...]`` for every example ``m``), which is exact for any model, batch
statistics included, but costs about as much as ``'jacobian'``; ``'auto'`` therefore only picks
``'structured'`` when ``vmap_axes`` is given.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ntk_adapters.axes import OutputAxes
from ntk_adapters.inputs import BatchAxes, hashable_spec, parse_vmap_axes, spec
from ntk_adapters.model import module_path
from ntk_adapters.precision import PrecisionLike, einsum_precision, matmul_precision

__all__ = ["structured_contributions", "structured_cost", "factorized_leaves"]

# Shape-only linear steps between a parameter leaf and the equation that uses it.
_CHAIN = frozenset(
    {
        "reshape",
        "transpose",
        "convert_element_type",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
        "neg",
        "reduce_precision",
    }
)
# Equations whose output is linear (or affine) in one operand given the other.
_SITES = frozenset({"dot_general", "conv_general_dilated", "add", "sub", "mul"})
# Calls whose body can be evaluated inline without changing derivatives.
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat"})


# --------------------------------------------------------------------------------------------
# Analysis of the traced model.


@dataclasses.dataclass(frozen=True)
class _Step:
    """One linear step ``v -> primitive(v)`` (or ``v * c``, ``v / c`` with a scalar literal)."""

    primitive: Any
    params: tuple
    literal: Any = None
    position: int = 0

    def __call__(self, v):
        params = dict(self.params)
        if self.literal is None:
            return self.primitive.bind(v, **params)
        args = (v, self.literal) if self.position == 0 else (self.literal, v)
        return self.primitive.bind(*args, **params)


@dataclasses.dataclass(frozen=True)
class _Origin:
    """A value that is a chain of linear steps applied to parameter leaf ``leaf``."""

    leaf: int
    steps: tuple = ()
    scale: float = 1.0
    bijective: bool = True


@dataclasses.dataclass(frozen=True)
class _Site:
    """The single use of a factorized leaf: equation ``path`` with the leaf in operand ``operand``."""

    leaf: int
    path: tuple
    primitive: Any
    params: tuple
    operand: int
    origin: _Origin
    out_shape: tuple
    other_shape: tuple
    leaf_shape: tuple
    out_dtype: Any = None

    @property
    def name(self) -> str:
        return self.primitive.name

    def apply(self, other, leaf_value):
        """The equation as a function of the leaf: linear (or affine) in ``leaf_value``."""
        w = _apply_steps(self.origin.steps, leaf_value)
        args = (other, w) if self.operand == 1 else (w, other)
        return self.primitive.bind(*args, **self.primitive.get_bind_params(dict(self.params)))


@dataclasses.dataclass(frozen=True)
class _Plan:
    sites: tuple  # _Site per factorized leaf, in leaf order
    fallback: tuple  # leaves handled by their Jacobian
    unused: tuple  # leaves the output does not depend on structurally
    probe_paths: tuple  # equation paths that get a probe (a site path may serve two leaves)
    call_paths: frozenset  # call equations containing a probe
    capture: Any = None  # {path: operand positions to capture (the activations)}


def _sub_jaxpr(eqn):
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, sub.consts
        if isinstance(sub, jcore.Jaxpr):
            return sub, ()
    return None


def _scalar_literal(v) -> bool:
    return isinstance(v, jcore.Literal) and np.ndim(v.val) == 0


def _frozen(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _analyze(closed: jcore.ClosedJaxpr, n_leaves: int, active: Optional[Sequence[int]] = None) -> _Plan:
    """Classify leaves ``active`` (default all) of a jaxpr whose first ``n_leaves`` inputs are leaves."""
    active = tuple(range(n_leaves)) if active is None else tuple(active)
    consumed = [0] * n_leaves
    chained = [0] * n_leaves
    bad = [False] * n_leaves
    found: list[list[_Site]] = [[] for _ in range(n_leaves)]

    def walk(jaxpr, origins_in, path):
        env = {v: o for v, o in zip(jaxpr.invars, origins_in) if o is not None}

        def origin(v):
            return None if isinstance(v, jcore.Literal) else env.get(v)

        for k, eqn in enumerate(jaxpr.eqns):
            ins = [origin(v) for v in eqn.invars]
            if not any(o is not None for o in ins):
                continue
            here = path + (k,)
            name = eqn.primitive.name
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                outs = walk(sub[0], ins, here)
                for v, o in zip(eqn.outvars, outs):
                    if o is not None:
                        env[v] = o
                continue
            live = [o for o in ins if o is not None]
            for o in live:
                consumed[o.leaf] += 1
            out_aval = eqn.outvars[0].aval if eqn.outvars else None
            if name in _CHAIN and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
                o = ins[0]
                keeps_size = math.prod(out_aval.shape) == math.prod(eqn.invars[0].aval.shape)
                scale = -o.scale if name == "neg" else o.scale
                env[eqn.outvars[0]] = _Origin(
                    o.leaf, o.steps + (_Step(eqn.primitive, _frozen(eqn.params)),), scale, o.bijective and keeps_size
                )
                chained[o.leaf] += 1
                continue
            if (
                name in ("mul", "div")
                and len(live) == 1
                and len(eqn.invars) == 2
                and (name == "mul" or ins[0] is not None)
            ):
                pos = 0 if ins[0] is not None else 1
                other = eqn.invars[1 - pos]
                if _scalar_literal(other):
                    o = ins[pos]
                    c = float(np.asarray(other.val))
                    step = _Step(eqn.primitive, _frozen(eqn.params), other.val, pos)
                    env[eqn.outvars[0]] = _Origin(
                        o.leaf, o.steps + (step,), o.scale * (c if name == "mul" else 1.0 / c), o.bijective
                    )
                    chained[o.leaf] += 1
                    continue
            if name in _SITES and len(eqn.invars) == 2 and len(eqn.outvars) == 1:
                for pos, o in enumerate(ins):
                    if o is None:
                        continue
                    o_other = ins[1 - pos]
                    if (o_other is not None and o_other.leaf == o.leaf) or (
                        name == "conv_general_dilated" and pos == 0
                    ):
                        bad[o.leaf] = True
                        continue
                    found[o.leaf].append(
                        _Site(
                            o.leaf,
                            here,
                            eqn.primitive,
                            _frozen(eqn.params),
                            pos,
                            o,
                            tuple(out_aval.shape),
                            tuple(eqn.invars[1 - pos].aval.shape),
                            (),
                            out_aval.dtype,
                        )
                    )
                continue
            for o in live:
                bad[o.leaf] = True
        return [origin(v) for v in jaxpr.outvars]

    origins = [_Origin(i) if i in active else None for i in range(n_leaves)]
    top = walk(closed.jaxpr, origins + [None] * (len(closed.jaxpr.invars) - n_leaves), ())
    for o in top:
        if o is not None:
            bad[o.leaf] = True
    leaf_shapes = [tuple(v.aval.shape) for v in closed.jaxpr.invars[:n_leaves]]
    sites, fallback, unused = [], [], []
    for i in active:
        if bad[i]:
            fallback.append(i)
        elif consumed[i] == 0:
            unused.append(i)
        elif len(found[i]) == 1 and consumed[i] == chained[i] + 1:
            sites.append(dataclasses.replace(found[i][0], leaf_shape=leaf_shapes[i]))
        else:
            fallback.append(i)
    probe_paths = tuple(sorted({s.path for s in sites}))
    call_paths = frozenset(p[:k] for p in probe_paths for k in range(1, len(p)))
    capture = {p: tuple(sorted({1 - s.operand for s in sites if s.path == p})) for p in probe_paths}
    return _Plan(tuple(sites), tuple(fallback), tuple(unused), probe_paths, call_paths, capture)


def _interpret(jaxpr, consts, args, path, plan: _Plan, probes: dict, captured: dict):
    """Evaluate ``jaxpr``, adding ``probes[path]`` to probed equations and capturing their operands."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for k, eqn in enumerate(jaxpr.eqns):
        here = path + (k,)
        invals = [read(v) for v in eqn.invars]
        if here in plan.call_paths:
            sub, sub_consts = _sub_jaxpr(eqn)
            outs = _interpret(sub, sub_consts, invals, here, plan, probes, captured)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
            if here in probes:
                outs = [outs[0] + probes[here].astype(outs[0].dtype)]
                captured[here] = {i: invals[i] for i in plan.capture[here]}
        for v, val in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _batch_axes(vmap_axes) -> Optional[BatchAxes]:
    return vmap_axes if vmap_axes is None or isinstance(vmap_axes, BatchAxes) else parse_vmap_axes(vmap_axes)


def _out_axis(batch: Optional[BatchAxes]) -> Optional[int]:
    return None if batch is None else batch.out_axis


def _flat_fn(apply_fn, treedef, batch: Optional[BatchAxes]):
    def flat(leaves, x):
        params = jax.tree_util.tree_unflatten(treedef, list(leaves))
        if batch is None:
            return apply_fn(params, x)
        return batch.squeeze_out(apply_fn(params, batch.expand(x)))

    return flat


def _trace(apply_fn, leaves, treedef, x, batch: Optional[BatchAxes]):
    """``(closed jaxpr, plan)`` of the model on ``x`` (one example when ``batch`` is set)."""
    sample = spec(x) if batch is None else batch.example(x)
    leaf_specs = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves]
    closed = jax.make_jaxpr(_flat_fn(apply_fn, treedef, batch))(leaf_specs, sample)
    return closed, _analyze(closed, len(leaves))


# --------------------------------------------------------------------------------------------
# Cotangents and activations.


def _side(closed, plan: _Plan, leaves, x, batch: Optional[BatchAxes]):
    """Probe cotangents ``g[path]``, captured operands and fallback Jacobians for one input batch.

    Shapes (``out`` the full output shape with the batch axis where the model puts it):
    ``g[path]`` is ``(*out, *y)``; operands are ``(N, *operand)`` per example with ``vmap_axes``,
    the operands themselves without; fallback Jacobians are ``(*out, *leaf)``.
    """
    out_avals = {s.path: (s.out_shape, s.out_dtype) for s in plan.sites}
    fb = [leaves[i] for i in plan.fallback]

    def run(probes, fb_leaves, x_):
        full = list(leaves)
        for i, leaf in zip(plan.fallback, fb_leaves):
            full[i] = leaf
        captured = {}
        args = full + jax.tree_util.tree_leaves(x_)
        (out,) = _interpret(closed.jaxpr, closed.consts, args, (), plan, probes, captured)
        return out, captured

    def one(x_):
        probes = {p: jnp.zeros(*out_avals[p]) for p in plan.probe_paths}
        (g, jfb), captured = jax.jacrev(run, argnums=(0, 1), has_aux=True)(probes, fb, x_)
        return g, jfb, captured

    if batch is None:
        return one(x)
    g, jfb, captured = jax.vmap(one, in_axes=(batch.in_axes,))(x)
    move = lambda t: jnp.moveaxis(t, 0, batch.out_axis)
    return jax.tree_util.tree_map(move, g), jax.tree_util.tree_map(move, jfb), captured


# --------------------------------------------------------------------------------------------
# Contractions.


def _letters():
    return iter([chr(c) for c in itertools.chain(range(0x3B1, 0x3CA), range(0x410, 0x450), range(0x4E00, 0x4F00))])


def _size(subs: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of a two-operand einsum: the product of every distinct letter's size."""
    sizes: dict[str, int] = {}
    for s, shape in zip(subs, shapes):
        sizes.update(zip(s, shape))
    return math.prod(sizes.values())


def _contract(j1, j2, axes: OutputAxes, precision=None):
    first, second, result = axes.letters()
    pool = _letters()
    p = "".join(next(pool) for _ in range(j1.ndim - axes.ndim))
    return jnp.einsum(f"{first}{p},{second}{p}->{result}", j1, j2, precision=precision)


def _unique(s: str) -> str:
    return "".join(dict.fromkeys(s))


@dataclasses.dataclass(frozen=True)
class _GramLayout:
    """How a site's activation and output split into shared positions and weight channels.

    ``a_free``/``a_contract``: activation axes that are positions / contracted with the weight;
    ``y_free``: output axes matching ``a_free`` in order; ``y_weight``: output axes of the weight.
    """

    a_free: tuple
    a_contract: tuple
    y_free: tuple
    y_weight: tuple
    patches: Optional[tuple] = None  # conv: (filter_shape, strides, padding, lhs_dil, rhs_dil, dn)


def _gram_layout(site: _Site) -> Optional[_GramLayout]:
    if not site.origin.bijective:
        return None
    params = dict(site.params)
    if site.name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        if lb or rb:
            return None
        a_contract = tuple(rc if site.operand == 0 else lc)
        a_ndim = len(site.other_shape)
        a_free = tuple(d for d in range(a_ndim) if d not in a_contract)
        n_w_free = len(site.out_shape) - len(a_free)
        if site.operand == 1:  # y = [a free..., W free...]
            y_free = tuple(range(len(a_free)))
            y_weight = tuple(range(len(a_free), len(site.out_shape)))
        else:  # y = [W free..., a free...]
            y_weight = tuple(range(n_w_free))
            y_free = tuple(range(n_w_free, len(site.out_shape)))
        return _GramLayout(a_free, a_contract, y_free, y_weight)
    if site.name == "conv_general_dilated":
        if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
            return None
        dn = params["dimension_numbers"]
        rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
        if list(rhs_spec[2:]) != sorted(rhs_spec[2:]):
            return None  # patch extraction assumes the kernel's spatial axes in increasing order
        w_shape = _operand_shape(site)
        filter_shape = tuple(w_shape[d] for d in rhs_spec[2:])
        feature = out_spec[1]
        free = tuple(d for d in range(len(site.out_shape)) if d != feature)
        patches = (
            filter_shape,
            tuple(params["window_strides"]),
            tuple(map(tuple, params["padding"])),
            tuple(params["lhs_dilation"]),
            tuple(params["rhs_dilation"]),
            dn,
        )
        return _GramLayout(free, (feature,), free, (feature,), patches)
    return None


def _operand_shape(site: _Site) -> tuple:
    """Shape of the weight operand as the equation sees it (after the chain of steps)."""
    # The steps may multiply by literals of the traced dtype: evaluate them in that dtype.
    w = jax.ShapeDtypeStruct(site.leaf_shape, site.out_dtype or jnp.float32)
    return tuple(jax.eval_shape(lambda v: _apply_steps(site.origin.steps, v), w).shape)


def _apply_steps(steps, v):
    for step in steps:
        v = step(v)
    return v


def _patches(a, layout: _GramLayout):
    """The input patches of a convolution: a grouped convolution with a one-hot filter, whose
    output channel ``ci·K + s`` copies input channel ``ci`` at window offset ``s``.

    Written out rather than ``jax.lax.conv_general_dilated_patches``, which leaves the filter's
    precision at DEFAULT: both operands are HIGHEST here, so that nothing in the kernel allows
    reduced-precision products (the copy is exact then on every backend).
    """
    assert layout.patches is not None, "_patches is for convolution layouts"
    filter_shape, strides, padding, lhs_dil, rhs_dil, dn = layout.patches
    channels = a.shape[dn.lhs_spec[1]]
    k = math.prod(filter_shape)
    one_hot = jnp.eye(k, dtype=a.dtype).reshape((k, 1) + tuple(filter_shape))
    rhs = jnp.tile(one_hot, (channels, 1) + (1,) * len(filter_shape))  # (channels·K, 1, *filter)
    rhs = jnp.moveaxis(rhs, (0, 1), (dn.rhs_spec[0], dn.rhs_spec[1]))
    return jax.lax.conv_general_dilated(
        a,
        rhs,
        strides,
        padding,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        dimension_numbers=dn,
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )


def _gram_subscripts(layout: _GramLayout, axes: OutputAxes, row_axis, a_ndim: int, y_ndim: int):
    first, second, result = axes.letters()
    r1 = first[row_axis] if row_axis is not None else ""
    r2 = second[row_axis] if row_axis is not None else ""
    pool = _letters()
    p1 = [next(pool) for _ in layout.a_free]
    p2 = [next(pool) for _ in layout.a_free]
    ci = [next(pool) for _ in layout.a_contract]
    wj = [next(pool) for _ in layout.y_weight]

    def a_sub(p):
        return "".join(
            p[layout.a_free.index(d)] if d in layout.a_free else ci[layout.a_contract.index(d)] for d in range(a_ndim)
        )

    def y_sub(p):
        return "".join(
            p[layout.y_free.index(d)] if d in layout.y_free else wj[layout.y_weight.index(d)] for d in range(y_ndim)
        )

    rows = _unique(r1 + r2)
    keep = _unique(result + rows)
    P1, P2 = "".join(p1), "".join(p2)
    w = "".join(ci) + "".join(wj)  # the weight's axes as the equation sees it (after the chain of steps)
    return dict(
        a=(r1 + a_sub(p1), r2 + a_sub(p2), rows + P1 + P2),
        g=(first + y_sub(p1), second + y_sub(p2), keep + P1 + P2),
        final=(rows + P1 + P2, keep + P1 + P2, result),
        # Per-example Jacobian form: J[out, w] = Σ_positions a g, then J1 J2ᵀ over w.
        jac1=(r1 + a_sub(p1), first + y_sub(p1), first + w),
        jac2=(r2 + a_sub(p2), second + y_sub(p2), second + w),
        jac_final=(first + w, second + w, result),
    )


def _letter_sizes(subs: Sequence[str], shapes: Sequence[Sequence[int]]) -> dict:
    sizes: dict[str, int] = {}
    for sub, shape in zip(subs, shapes):
        sizes.update(zip(sub, shape))
    return sizes


@dataclasses.dataclass(frozen=True)
class _Form:
    """How one factorized leaf is contracted, with its estimated multiply-adds and bytes (elements)."""

    kind: str  # 'gram' or 'jacobian'
    layout: Optional[_GramLayout]
    subs: Optional[dict]
    flops: int
    elements: int


def _choose_form(
    site: _Site, axes: OutputAxes, row_axis, out1, out2, prefer: str = "auto", max_elements: Optional[float] = None
) -> _Form:
    """The Gram form or the per-example Jacobian form of a site, whichever needs fewer multiply-adds
    among those whose intermediates fit in ``max_elements`` (the one needing less memory when
    neither fits).

    Gram: ``Σ_i a1 a2`` over the contracted activation axes, ``Σ_j g1 g2`` over the weight's output
    channels, then the product summed over position pairs. Jacobian: ``Σ_p a g`` per output entry,
    then ``J1 J2ᵀ``.
    """
    out1, out2 = tuple(out1), tuple(out2)
    first, second, _ = axes.letters()
    pair = _size((first, second), (out1, out2))
    leaf_size = math.prod(site.leaf_shape)
    y_size = math.prod(site.out_shape)
    n_out = math.prod(out1) + math.prod(out2)
    layout = _gram_layout(site)
    a_shape = site.other_shape
    if layout is not None and layout.patches is not None:
        k = math.prod(layout.patches[0]) * a_shape[layout.patches[5].lhs_spec[1]]
        a_shape = tuple(k if d == layout.a_contract[0] else site.out_shape[d] for d in range(len(site.out_shape)))
    contract = 1 if layout is None else math.prod(a_shape[d] for d in layout.a_contract)
    jac = _Form("jacobian", None, None, n_out * y_size * contract + pair * leaf_size, n_out * leaf_size)
    if layout is None:
        return jac
    rows = (lambda o: (o[row_axis],)) if row_axis is not None else (lambda o: ())
    subs = _gram_subscripts(layout, axes, row_axis, len(a_shape), len(site.out_shape))
    shapes = (rows(out1) + a_shape, rows(out2) + a_shape, out1 + site.out_shape, out2 + site.out_shape)
    sizes = _letter_sizes(subs["a"][:2] + subs["g"][:2], shapes)
    flops = (
        _size(subs["a"][:2], shapes[:2])
        + _size(subs["g"][:2], shapes[2:])
        + math.prod(sizes[c] for c in _unique(subs["final"][0] + subs["final"][1]))
    )
    elements = math.prod(sizes[c] for c in subs["g"][2]) + math.prod(sizes[c] for c in subs["a"][2])
    gram = _Form("gram", layout, subs, flops, elements)
    jac = dataclasses.replace(jac, layout=layout, subs=subs)
    if prefer != "auto":
        return gram if prefer == "gram" else jac
    fitting = [f for f in (gram, jac) if max_elements is None or f.elements <= max_elements]
    if not fitting:
        # The cotangent Gram of a full (O, O) kernel over many positions can outgrow the per-example
        # Jacobian by orders of magnitude: memory decides first.
        return min((gram, jac), key=lambda f: f.elements)
    return min(fitting, key=lambda f: f.flops)


def _site_jacobian(site: _Site, leaf_value, a, g, out_shape, row_axis):
    """Per-output Jacobian ``(*out, *leaf)`` of one factorized leaf from its operand and cotangents."""
    y_shape = site.out_shape

    def per_row(a_row, g_rows):
        _, pull = jax.vjp(lambda w: site.apply(a_row, w), leaf_value)
        return jax.vmap(lambda c: pull(c.astype(site.out_dtype))[0])(g_rows)

    if row_axis is None:
        j = per_row(a, g.reshape((-1,) + y_shape))
        return j.reshape(tuple(out_shape) + site.leaf_shape)
    n = out_shape[row_axis]
    g_rows = jnp.moveaxis(g, row_axis, 0).reshape((n, -1) + y_shape)
    j = jax.vmap(per_row)(a, g_rows)
    rest = tuple(np.delete(out_shape, row_axis))
    return jnp.moveaxis(j.reshape((n,) + rest + site.leaf_shape), 0, row_axis)


def _patched(layout, a1, a2, row_axis, same):
    if layout.patches is None:
        return a1, a2
    patch = lambda a: _patches(a, layout)
    if row_axis is not None:
        patch = jax.vmap(patch)
    a1 = patch(a1)
    return a1, (a1 if same else patch(a2))


def _jacobian_contribution(site, layout, subs, a1, a2, g1, g2, row_axis, same, precision=None):
    """``J1 J2ᵀ`` of a Gram-capable leaf through the Jacobian of the operand the equation sees.

    That operand is the leaf through bijective linear steps (reshape, transpose, scaling), so
    ``J_leaf J_leafᵀ = scale² · J_op J_opᵀ``; each ``J_op`` is one batched product of the (patched)
    activations and the cotangents over the positions, instead of a transposed equation per
    output entry.
    """
    a1, a2 = _patched(layout, a1, a2, row_axis, same)
    j = lambda k, a, g: jnp.einsum(
        f"{subs[k][0]},{subs[k][1]}->{subs[k][2]}", a, g.astype(a.dtype), precision=precision
    )
    j1 = j("jac1", a1, g1)
    j2 = j1 if same else j("jac2", a2, g2)
    f = subs["jac_final"]
    return jnp.einsum(f"{f[0]},{f[1]}->{f[2]}", j1, j2, precision=precision) * (site.origin.scale**2)


def _gram_contribution(site, layout, subs, a1, a2, g1, g2, row_axis, same, precision=None):
    a1, a2 = _patched(layout, a1, a2, row_axis, same)
    gram_a = jnp.einsum(f"{subs['a'][0]},{subs['a'][1]}->{subs['a'][2]}", a1, a2, precision=precision)
    gram_g = jnp.einsum(f"{subs['g'][0]},{subs['g'][1]}->{subs['g'][2]}", g1, g2, precision=precision)
    out = jnp.einsum(f"{subs['final'][0]},{subs['final'][1]}->{subs['final'][2]}", gram_a, gram_g, precision=precision)
    return out * (site.origin.scale**2)


# --------------------------------------------------------------------------------------------
# Entry points.


def structured_contributions(
    apply_fn: Callable,
    params,
    x1: jax.Array,
    x2: Optional[jax.Array],
    axes: OutputAxes,
    vmap_axes: Optional[int] = None,
    form: str = "auto",
    memory_budget: Optional[float] = None,
    precision: PrecisionLike = "highest",
) -> list[jax.Array]:
    """Per-leaf NTK contributions (untraced sums) by layer factorization, in ``tree_leaves`` order.

    The same values as the Jacobian contraction ``Σ_p J1[..., p] J2[..., p]`` per parameter leaf,
    before the division by the traced size, so they can be summed or grouped by layer.

    Args:
      apply_fn: ``apply_fn(params, x) -> y`` with ``y`` of shape ``(N, *O)``.
      params: the parameter pytree.
      x1: ``(N1, *input)``, an array or a pytree of arrays; x2: the same with ``N2`` rows, or
        ``None`` for ``x1``.
      axes: the resolved output axes (:class:`ntk_adapters.axes.OutputAxes`).
      vmap_axes: ``None`` (exact for any model), or where independent examples sit: an int, a
        pytree prefix of ``x``, the triple ``(in_axes, out_axes, {})`` or a
        :class:`ntk_adapters.inputs.BatchAxes`.
      form: ``'auto'`` takes, per leaf, the cheaper of the Gram form and the Jacobian form;
        ``'gram'`` or ``'jacobian'`` force one wherever the Gram form applies (for checking).
      memory_budget: bytes one leaf's intermediates may take; ``'auto'`` forms that exceed it are
        passed over (``None``: no limit). :func:`structured_cost` takes the same budget, so the
        estimate describes the computation that runs.
      precision: of the model's products and of the Gram and Jacobian contractions
        (:mod:`ntk_adapters.precision`); ``'highest'`` keeps TensorFloat-32 out of the kernel on GPUs.

    Returns:
      A list with one array per parameter leaf, each of the kernel's shape (e.g. ``(N1, N2, O, O)``
      for ``trace_axes=()``; ``(N1, N2)`` summed, not averaged, over a traced output axis).

    Example::

      parts = structured_contributions(model.apply_fn, model.params, x1, x2, OutputAxes.make(2, (-1,), ()), 0)
      ntk = sum(parts) / n_outputs
    """
    if form not in ("auto", "gram", "jacobian"):
        raise ValueError(f"form={form!r}; choose 'auto', 'gram' or 'jacobian'")
    with matmul_precision(precision):
        return _structured(apply_fn, params, x1, x2, axes, vmap_axes, form, memory_budget, einsum_precision(precision))


def _structured(apply_fn, params, x1, x2, axes, vmap_axes, form, memory_budget, precision):
    batch = _batch_axes(vmap_axes)
    row_axis = _out_axis(batch)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed1, plan1 = _trace(apply_fn, leaves, treedef, x1, batch)
    same = x2 is None
    if same or batch is not None:
        closed2, plan2 = closed1, plan1
    else:
        closed2, plan2 = _trace(apply_fn, leaves, treedef, x2, batch)
        if [(s.leaf, s.path) for s in plan1.sites] != [(s.leaf, s.path) for s in plan2.sites]:
            # The model is structured differently for the two batch sizes: use Jacobians throughout.
            plan1 = plan2 = _Plan((), tuple(range(len(leaves))), (), (), frozenset(), {})
    g1, j1, c1 = _side(closed1, plan1, leaves, x1, batch)
    g2, j2, c2 = (g1, j1, c1) if same else _side(closed2, plan2, leaves, x2, batch)
    out1 = jax.eval_shape(apply_fn, params, x1).shape
    out2 = out1 if same else jax.eval_shape(apply_fn, params, x2).shape

    parts: list[Optional[jax.Array]] = [None] * len(leaves)
    for k, i in enumerate(plan1.fallback):
        parts[i] = _contract(j1[k], j2[k], axes, precision)
    for s1, s2 in zip(plan1.sites, plan2.sites):
        a1 = c1[s1.path][1 - s1.operand]
        a2 = c2[s2.path][1 - s2.operand]
        chosen = _choose_form(s1, axes, row_axis, out1, out2, form, _elements(memory_budget, leaves))
        if chosen.kind == "gram":
            parts[s1.leaf] = _gram_contribution(
                s1, chosen.layout, chosen.subs, a1, a2, g1[s1.path], g2[s2.path], row_axis, same, precision
            )
        elif chosen.layout is not None:
            parts[s1.leaf] = _jacobian_contribution(
                s1, chosen.layout, chosen.subs, a1, a2, g1[s1.path], g2[s2.path], row_axis, same, precision
            )
        else:
            jac1 = _site_jacobian(s1, leaves[s1.leaf], a1, g1[s1.path], out1, row_axis)
            jac2 = jac1 if same else _site_jacobian(s2, leaves[s2.leaf], a2, g2[s2.path], out2, row_axis)
            parts[s1.leaf] = _contract(jac1, jac2, axes, precision)
    shape = axes.result_shape(out1, out2)
    dtype = jnp.result_type(*leaves)
    for i in plan1.unused:
        parts[i] = jnp.zeros(shape, dtype)
    return parts


def factorized_leaves(apply_fn: Callable, params, x: jax.Array, vmap_axes: Optional[int] = None) -> dict:
    """How the structured implementation handles each parameter leaf, for inspection.

    Args:
      apply_fn: ``apply_fn(params, x) -> y``.
      params: the parameter pytree.
      x: an input batch ``(N, *input)`` (only its shape and dtype matter).
      vmap_axes: as for :func:`ntk_adapters.empirical.empirical_ntk_fn`.

    Returns:
      ``{parameter path: how}`` in ``tree_leaves`` order, ``how`` being the equation the leaf is
      factorized at (``'dot_general'``, ``'conv_general_dilated'``, ``'add'``, ``'sub'``, ``'mul'``;
      ``' (gram-capable)'`` appended where the Gram form applies), ``'jacobian'`` for a leaf that
      keeps its Jacobian, or ``'unused'`` for a leaf the output does not depend on.

    Example::

      factorized_leaves(model.apply_fn, model.params, x[:2], vmap_axes=0)
      # {'Dense_0/bias': 'add', 'Dense_0/kernel': 'dot_general (gram-capable)', ...}
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    _, plan = _trace(apply_fn, leaves, treedef, x, _batch_axes(vmap_axes))
    how = {i: "jacobian" for i in plan.fallback}
    how.update({i: "unused" for i in plan.unused})
    for s in plan.sites:
        how[s.leaf] = s.name + (" (gram-capable)" if _gram_layout(s) is not None else "")
    paths = [module_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return {paths[i]: how[i] for i in range(len(leaves))}


def _forward_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            total += _forward_flops(sub[0])
        elif eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(eqn.invars[0].aval.shape[d] for d in lc)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // max(rhs[dn.rhs_spec[0]], 1)
        else:
            total += sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    return total


def _activation_elements(jaxpr) -> int:
    """Elements of every intermediate value: what a backward pass keeps or recomputes per cotangent."""
    total = 0
    for eqn in jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            total += _activation_elements(sub[0])
        else:
            total += sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    return total


def _elements(memory_budget: Optional[float], leaves) -> Optional[float]:
    if memory_budget is None:
        return None
    return memory_budget / jnp.result_type(*leaves).itemsize


def structured_cost(
    apply_fn: Callable,
    params,
    x1: jax.Array,
    x2: Optional[jax.Array],
    axes: OutputAxes,
    vmap_axes: Union[None, int, BatchAxes],
    selected: Optional[Sequence[int]] = None,
    memory_budget: Optional[float] = None,
) -> dict:
    """Rough multiply-add and memory estimates of ``'structured'`` against ``'jacobian'``, from shapes.

    Both methods pull each output entry back through the network (one backward pass per output
    entry and example when ``vmap_axes`` is set); ``'jacobian'`` also forms every weight gradient
    there (counted as a second forward's worth), ``'structured'`` only activation cotangents. Then
    ``'jacobian'`` contracts ``J1 J2ᵀ`` leaf by leaf, while ``'structured'`` takes, per factorized
    leaf, the cheaper of its Gram form and its Jacobian form.

    Returns:
      ``{'structured_flops', 'jacobian_flops', 'structured_bytes', 'jacobian_bytes', 'forward_flops',
      'activations', 'n_params', 'itemsize'}``; only the leaves in ``selected`` (indices in
      ``tree_leaves`` order; default all) are differentiated. ``forward_flops`` and ``activations``
      (elements of all intermediates) are those of one example when ``vmap_axes`` is set, else of
      the batch ``x1``; the ``*_bytes`` count the stored Jacobians, cotangents and Grams.

    Example::

      cost = structured_cost(model.apply_fn, model.params, x1, x2, OutputAxes.make(2, (-1,), ()), 0)
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_spec = lambda a: (tuple(np.shape(a)), str(jnp.result_type(a)))
    return dict(
        _cost(
            apply_fn,
            treedef,
            tuple(leaf_spec(l) for l in leaves),
            hashable_spec(x1),
            None if x2 is None else hashable_spec(x2),
            axes,
            _batch_axes(vmap_axes),
            None if selected is None else tuple(selected),
            memory_budget,
        )
    )


def _from_hashable(key):
    treedef, leaf_specs = key
    return jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaf_specs])


@functools.lru_cache(maxsize=256)
def _cost(
    apply_fn, treedef, leaf_specs, x1_spec, x2_spec, axes, batch: Optional[BatchAxes], selected, memory_budget
) -> tuple:
    leaves = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaf_specs]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    x1 = _from_hashable(x1_spec)
    x2 = None if x2_spec is None else _from_hashable(x2_spec)
    closed, plan = _trace(apply_fn, leaves, treedef, x1, batch)
    if selected is not None:
        plan = _analyze(closed, len(leaves), selected)
        leaves = [leaves[i] for i in selected]
    out1 = tuple(jax.eval_shape(apply_fn, params, x1).shape)
    out2 = out1 if x2 is None else tuple(jax.eval_shape(apply_fn, params, x2).shape)
    n_sides = (math.prod(out1) + math.prod(out2)) if x2 is not None else math.prod(out1)
    forward = _forward_flops(closed.jaxpr)
    first, second, _ = axes.letters()
    pair = _size((first, second), (out1, out2))
    itemsize = jnp.result_type(*leaves).itemsize
    sizes = {i: math.prod(leaf_specs[i][0]) for i in range(len(leaf_specs))}
    n_params = sum(math.prod(np.shape(l)) for l in leaves)
    jac_flops = n_sides * 2 * forward + pair * n_params
    jac_bytes = n_sides * n_params * itemsize
    s_flops = n_sides * forward + pair * sum(sizes[i] for i in plan.fallback)
    s_bytes = n_sides * sum(sizes[i] for i in plan.fallback) * itemsize
    s_bytes += n_sides * sum(math.prod(s.out_shape) for s in plan.sites) * itemsize
    for s in plan.sites:
        form = _choose_form(s, axes, _out_axis(batch), out1, out2, max_elements=_elements(memory_budget, leaves))
        s_flops += form.flops
        s_bytes += form.elements * itemsize
    return tuple(
        dict(
            structured_flops=int(s_flops),
            jacobian_flops=int(jac_flops),
            structured_bytes=int(s_bytes),
            jacobian_bytes=int(jac_bytes),
            forward_flops=int(forward),
            activations=int(_activation_elements(closed.jaxpr)),
            n_params=int(n_params),
            itemsize=int(itemsize),
        ).items()
    )

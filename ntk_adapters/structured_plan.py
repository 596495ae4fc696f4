"""How the structured empirical NTK finds the factorized pieces of an unchanged model.

The model is traced over its flattened parameters; :func:`_analyze` finds, for every parameter
leaf, the one linear equation (``dot_general``, ``conv_general_dilated``, ``add``, ``sub``,
``mul``) it reaches through shape-only steps, and :func:`_side` re-evaluates the program with zero
probes on those equations' outputs to capture their other operands (activations) and the
cotangents (the derivatives with respect to the probes). See :mod:`ntk_adapters.structured`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ntk_adapters.inputs import BatchAxes, parse_vmap_axes, spec

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


def _apply_steps(steps, v):
    for step in steps:
        v = step(v)
    return v


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

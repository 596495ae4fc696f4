"""The built-in primitive rules: how the operations written between modules act on kernels.

Each rule has the :class:`~ntk_adapters.infinite.rules.PrimitiveRule` signature
``rule(eqn, invals, ctx) -> outvals`` and is registered beside its definition with
:func:`~ntk_adapters.infinite.rules.register_primitive_rule`, the way user rules are. The kernel
mathematics is in :mod:`ntk_adapters.infinite.layers` and :mod:`ntk_adapters.infinite.elementwise`;
the rules decide which map applies and refuse what no kernel can express:

* ``reshape``: a flatten (the kernel keeps its positions; the Dense that follows averages over
  them), its inverse, or the units of a dense layer split into positions × channels;
* ``reduce_sum`` over spatial axes and ``reduce_window_sum``: spatial sums and sum pooling;
* ``concatenate`` on the channel axis: the channel-weighted mix of the branches;
* elementwise primitives (:data:`~ntk_adapters.infinite.rules.ELEMENTWISE`): a chain on one
  Gaussian value becomes one lazy function phi (closed form where recognised, quadrature
  otherwise); ``add``/``sub`` of two independent branches sums their kernels; multiplication by a
  constant (per position or overall) scales them;
* call primitives (``jit``, ``custom_jvp``, ...): an elementwise program is one more link of a
  chain, any other program is interpreted equation by equation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.rules import PrimitiveContext, register_primitive_rule
from ntk_adapters.infinite.values import Concrete, Phi, Value, is_value, new_id

__all__ = ["elementwise_program"]


# ----------------------------------------------------------------------------------------------
# Shapes.


_REORDERED = (
    "reshapes or broadcasts an input-dependent value whose axes are not in the order (batch, *positions, "
    "channels): its entries would no longer be those of a kernel in that order; transpose it back first"
)


def _reordered(eqn, v: Value, ctx: PrimitiveContext) -> list:
    """A value whose traced axes are in another order (``Value.axes``, see
    :mod:`~ntk_adapters.infinite.mixing`) passes a shape operation only when it leaves the traced
    shape as it is: its ``shape`` is canonical, so it cannot be compared with the new shape."""
    if tuple(eqn.invars[0].aval.shape) != tuple(eqn.outvars[0].aval.shape):
        raise ctx.error(eqn, _REORDERED)
    return [v]


def _reshape_rule(eqn, invals, ctx: PrimitiveContext):
    v = invals[0]
    if not is_value(v):
        raise ctx.error(eqn, "reshape of a value with a dynamic shape")
    if v.axes is not None:
        return _reordered(eqn, v, ctx)
    new = tuple(eqn.params["new_sizes"])
    if new[0] != ctx.batch:
        raise ctx.error(eqn, f"reshape to {new} mixes the batch axis with the features")
    new = new[1:]
    if new == v.shape:
        return [v]
    spatial = v.kernel.spatial
    if len(new) == 1 and math.prod(v.shape) == new[0]:
        # flatten: positions stay in the kernel, the Dense that follows averages over them
        return [dataclasses.replace(v, shape=new, flat=v.kernel.layout != "none")]
    if v.flat and math.prod(new) == math.prod(v.shape) and tuple(new[:-1]) == tuple(spatial):
        return [dataclasses.replace(v, shape=new, flat=False)]
    if v.kernel.layout == "none" and not v.flat and len(new) >= 2:
        v = ctx.materialize(v, eqn)
        k = _layers.unflatten(v.kernel, new[:-1], layout=ctx.options.layout)
        return [dataclasses.replace(v, kernel=k, shape=new, flat=False)]
    raise ctx.error(eqn, f"reshape of per-example shape {v.shape} to {new} is neither a flatten nor its inverse")


def _broadcast_rule(eqn, invals, ctx: PrimitiveContext):
    v = invals[0]
    if is_value(v) and v.axes is not None:
        return _reordered(eqn, v, ctx)
    new = tuple(eqn.params["shape"][1:])
    if new == v.shape:
        return [v]
    if v.shape == () and new == (1,) and v.kernel.layout == "none":
        # x[:, None] of a leaf (N,): one number per example is one channel
        return [dataclasses.replace(v, shape=new)]
    raise ctx.error(eqn, f"broadcast of an input-dependent value of per-example shape {v.shape}")


register_primitive_rule("reshape", _reshape_rule)
register_primitive_rule("broadcast_in_dim", _broadcast_rule)


# ----------------------------------------------------------------------------------------------
# Spatial sums and pooling.


def _reduce_sum_rule(eqn, invals, ctx: PrimitiveContext):
    v = invals[0]
    axes = tuple(a - 1 for a in eqn.params["axes"])  # per-example axes
    nsp = len(v.shape) - 1
    if v.flat or -1 in axes or (len(v.shape) - 1) in axes or nsp == 0:
        raise ctx.error(
            eqn,
            "a sum over the channel axis or the batch axis (e.g. a normalization or "
            "softmax written inline) has no infinite-width rule outside a recognised module",
        )
    v = ctx.materialize(v, eqn)
    if v.kernel.layout != "full":
        raise ctx.error(
            eqn,
            "pooling over spatial axes needs the covariance between positions; pass spatial_layout='full' (or 'auto')",
        )
    k = _layers.spatial_sum(v.kernel, axes=tuple(a + 1 for a in axes))
    new_shape = tuple(s for d, s in enumerate(v.shape[:-1]) if d not in axes) + (v.shape[-1],)
    return [Value(kernel=k, shape=new_shape, base=new_id(), fresh=v.fresh, deps=v.deps)]


def _reduce_window_sum_rule(eqn, invals, ctx: PrimitiveContext):
    v = invals[0]
    if v.flat or len(v.shape) < 2:
        raise ctx.error(eqn, "a window sum over a value without spatial axes")
    p = eqn.params
    dims, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    if dims[0] != 1 or dims[-1] != 1 or strides[0] != 1 or strides[-1] != 1:
        raise ctx.error(eqn, "a window sum over the batch or channel axis")
    if any(d != 1 for d in p.get("base_dilation", ())) or any(d != 1 for d in p.get("window_dilation", ())):
        raise ctx.error(eqn, "dilated window sums have no rule")
    v = ctx.materialize(v, eqn)
    window = tuple(dims[1:-1])
    if v.kernel.layout != "full" and math.prod(window) > 1:
        raise ctx.error(eqn, "pooling needs the covariance between positions; pass spatial_layout='full' (or 'auto')")
    try:
        k = _layers.sum_pool(v.kernel, window, strides=tuple(strides[1:-1]), padding=[tuple(x) for x in pads[1:-1]])
    except ValueError as e:
        raise ctx.error(eqn, str(e)) from None
    shape = tuple(eqn.outvars[0].aval.shape[1:])
    return [Value(kernel=k, shape=shape, base=new_id(), fresh=v.fresh, deps=v.deps)]


register_primitive_rule("reduce_sum", _reduce_sum_rule)
register_primitive_rule("reduce_window_sum", _reduce_window_sum_rule)


# ----------------------------------------------------------------------------------------------
# Concatenation.


def _concatenate_rule(eqn, invals, ctx: PrimitiveContext):
    dim = eqn.params["dimension"]
    if not all(is_value(v) for v in invals):
        raise ctx.error(eqn, "concatenates input-dependent values with constants")
    vals = [ctx.materialize(v, eqn) for v in invals]
    nd = len(vals[0].shape)
    if dim - 1 != nd - 1 or any(v.flat for v in vals):
        raise ctx.error(eqn, "concatenation along a non-channel axis")
    if len({v.kernel.layout for v in vals}) != 1:
        raise ctx.error(eqn, "concatenates values of different spatial layouts")
    sizes = [v.shape[-1] for v in vals]
    try:
        k = _layers.concatenate([v.kernel for v in vals], channels=sizes)
    except ValueError as e:
        raise ctx.error(eqn, str(e)) from None
    deps = frozenset().union(*(v.deps for v in vals))
    return [Value(kernel=k, shape=vals[0].shape[:-1] + (sum(sizes),), base=new_id(), deps=deps)]


register_primitive_rule("concatenate", _concatenate_rule)


# ----------------------------------------------------------------------------------------------
# Elementwise primitives.


def _to_dtype(a, dtype):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
        return a.astype(dtype)
    return a


def _bind_elementwise(eqn, args, dtype):
    """Bind an elementwise equation on arrays of any (broadcast-compatible) shape.

    phi is evaluated on quadrature nodes and kernel entries, not on the traced shapes, so shape
    parameters (broadcasts, conversions to the traced dtype) are dropped.
    """
    name = eqn.primitive.name
    if name == "convert_element_type":
        a = jnp.asarray(args[0])
        new = eqn.params["new_dtype"]
        if jnp.issubdtype(new, jnp.floating):
            # the working dtype, not the traced one: a bool comparison (a step of the value) becomes
            # a number that the next multiplication accepts
            return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(dtype)
        return a.astype(new)
    if name in ("broadcast_in_dim", "copy", "copy_p", "stop_gradient", "reduce_precision"):
        return args[0]
    if name in _programs.CALL_PRIMITIVES:
        jaxpr, consts = _programs.sub_jaxpr(eqn)
        outs = _eval_elementwise(jaxpr, consts, args, dtype)
        return outs if eqn.primitive.multiple_results else outs[0]
    args = [_to_dtype(a, dtype) for a in args]
    if name == "select_n":
        pred, *cases = args
        if len(cases) == 2:
            return jnp.where(pred, cases[1], cases[0])
        return jnp.choose(pred.astype(jnp.int32), jnp.broadcast_arrays(*cases))
    if len(args) > 1:
        args = jnp.broadcast_arrays(*args)
    return _programs.bind(eqn, args)


def _eval_elementwise(jaxpr, consts, args, dtype):
    env = {}
    for v, a in zip(jaxpr.constvars, consts):
        env[v] = jnp.asarray(a).reshape(()) if np.size(a) == 1 else a
    for v, a in zip(jaxpr.invars, args):
        env[v] = a

    def read(v):
        if hasattr(v, "val"):
            return v.val
        return env[v]

    for e in jaxpr.eqns:
        outs = _bind_elementwise(e, [read(v) for v in e.invars], dtype)
        if not e.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(e.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def elementwise_program(jaxpr) -> bool:
    """Whether every equation of ``jaxpr`` acts entry by entry (so the program is one phi)."""
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name in _rules.ELEMENTWISE_PRIMITIVES:
            continue
        if name == "broadcast_in_dim" and all(
            len(getattr(getattr(v, "aval", None), "shape", ())) == 0 for v in e.invars
        ):
            continue
        if name in _programs.CALL_PRIMITIVES:
            sub = _programs.sub_jaxpr(e)
            if sub is not None and elementwise_program(sub[0]):
                continue
        return False
    return True


# Functions outside the closed-form family of ntk_adapters.infinite.forms that have closed forms
# of their own when applied alone to a Gaussian value.
_SIMPLE_CLOSED_FORMS = {"sin": "sin", "cos": "cos", "exp": "exp"}


def _recognise(eqn, invals) -> Optional[tuple[str, tuple]]:
    """A closed-form name for a one-equation phi applied to a Gaussian value, if it has one."""
    name = eqn.primitive.name
    if name in _SIMPLE_CLOSED_FORMS and len(invals) == 1:
        return _SIMPLE_CLOSED_FORMS[name], ()
    return None


def _sources(values) -> str:
    names = [v.source for v in values if v.source]
    return f" ({' and '.join(names)})" if len(names) == len(values) and len(set(names)) > 1 else ""


def _linear_scale(eqn, invals, scalars) -> Optional[float]:
    """The factor of a linear map by a constant (``x * c``, ``x / c``, ``-x``, a copy), else ``None``."""
    name = eqn.primitive.name
    if name == "convert_element_type":
        # a conversion to integers truncates: a function of the value, not a copy
        return 1.0 if jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact) else None
    if name in ("copy", "copy_p", "reduce_precision"):
        return 1.0
    if name == "neg":
        return -1.0
    vals = [s for s in scalars if s is not None]
    try:
        if name == "mul" and len(vals) == 1:
            return float(vals[0])
        if name == "div" and len(vals) == 1 and is_value(invals[0]):
            return 1.0 / float(vals[0])
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None
    return None


def _positional_scale(eqn, invals, v0: Value) -> Optional[Value]:
    """``x * s`` or ``x / s`` with ``s`` constant over channels but varying over positions (average
    pooling with 'SAME' padding divides each position by its own window count), else ``None``."""
    name = eqn.primitive.name
    if name not in ("mul", "div") or len(invals) != 2 or v0.phi is not None or v0.flat:
        return None
    const = [c for c in invals if isinstance(c, Concrete)]
    if len(const) != 1 or const[0].scalar is not None or np.size(const[0].value) == 1:
        return None
    if name == "div" and not is_value(invals[0]):
        return None
    spatial = v0.shape[:-1]
    try:
        s = np.broadcast_to(np.asarray(const[0].value), (1,) + tuple(v0.shape))[0]
    except (ValueError, TypeError, jax.errors.ConcretizationTypeError):
        return None
    if v0.kernel.layout == "none" or not spatial or not np.all(s == s[..., :1]):
        return None
    s = s[..., 0].astype(np.float64)
    k = _layers.scale_positions(v0.kernel, 1.0 / s if name == "div" else s)
    return dataclasses.replace(v0, kernel=k, base=new_id())


def _residual(eqn, invals, ctx: PrimitiveContext) -> Value:
    """``a + b`` (or ``a − b``) of two independent zero-mean branches: their kernels add."""
    if not all(is_value(v) for v in invals):
        raise ctx.error(eqn, "adds a constant to a sum of branches")
    a, b = invals
    independent = (a.fresh is not None and a.fresh not in b.deps) or (b.fresh is not None and b.fresh not in a.deps)
    if not independent and a.source and b.source and a.source != b.source:
        raise ctx.error(
            eqn,
            f"adds input leaves {a.source} and {b.source} (or functions of them) entry "
            "by entry: the kernel of the sum needs the products between the two leaves, "
            "which the engine does not track. Concatenate the leaves on the channel axis, "
            "or give each its own Dense layer and add their outputs",
        )
    if not independent:
        raise ctx.error(
            eqn,
            "adds two branches that are not independent Gaussian processes (neither ends "
            "in a fresh random linear layer that the other does not use), so their "
            "cross-covariance is unknown",
        )
    a, b = ctx.materialize(a, eqn), ctx.materialize(b, eqn)
    if a.shape != b.shape or a.flat != b.flat:
        raise ctx.error(eqn, f"adds values of per-example shapes {a.shape} and {b.shape}")
    if a.kernel.layout != b.kernel.layout:
        raise ctx.error(eqn, f"adds kernels of layouts {a.kernel.layout} and {b.kernel.layout}")
    try:
        # a - b has the same kernel as a + b for independent zero-mean branches
        k = _layers.add(a.kernel, b.kernel)
    except ValueError as e:
        raise ctx.error(eqn, str(e)) from None
    return Value(kernel=k, shape=a.shape, flat=a.flat, base=new_id(), fresh=None, deps=a.deps | b.deps)


def _label(eqn, ctx: PrimitiveContext) -> str:
    return f"`{ctx.where(eqn)}` (primitive {_programs.describe_primitive(ctx.outer, eqn)})"


def _elementwise(eqn, invals, ctx: PrimitiveContext) -> Value:
    values = [v for v in invals if is_value(v)]
    name = eqn.primitive.name
    # Values of one base are functions of the same Gaussian (its linear maps included, which stay
    # pending for that reason): x·Φ(x), h·sigmoid(1.702 h), (h >= 0)·h² are each one phi.
    if len({v.base for v in values}) > 1:
        if name in ("add", "sub", "add_any"):
            return _residual(eqn, invals, ctx)
        raise ctx.error(
            eqn,
            "combines two different input-dependent values"
            f"{_sources(values)} entry by entry (only sums of independent "
            "branches are supported)",
        )
    v0 = values[0]
    positional = _positional_scale(eqn, invals, v0)
    if positional is not None:
        return positional
    for c in invals:
        if isinstance(c, Concrete) and c.scalar is None and np.size(c.value) != 1:
            raise ctx.error(
                eqn,
                f"an elementwise operation with a non-scalar constant of shape "
                f"{np.shape(c.value)} (per-unit constants make channels non-identical)",
            )
    scalars = [
        None if is_value(c) else (c.scalar if c.scalar is not None else jnp.reshape(c.value, ())) for c in invals
    ]
    one_value = len(values) == len(invals) - 1 or len(invals) == 1
    factor = _linear_scale(eqn, invals, scalars) if one_value else None
    if factor is not None and factor == 1.0 and (v0.phi is None or v0.phi.linear is not None):
        return v0
    if factor is not None and v0.phi is None and not v0.kernel.is_gaussian:
        # A linear map of a materialized non-Gaussian value acts on its kernel directly (mean
        # pooling divides a sum of ReLU features).
        return dataclasses.replace(v0, kernel=_layers.scale(v0.kernel, factor), base=new_id())
    if factor is not None and (v0.phi is None or v0.phi.linear is not None):
        # A multiple of a Gaussian value stays a pending function of it, so that it can meet the
        # value itself again (0.5·x·erfc(−x/√2)); it is still a fresh layer output.
        total = factor * (1.0 if v0.phi is None else v0.phi.linear)
        phi = Phi(fn=lambda u: total * u, linear=total, where=_label(eqn, ctx))
        return dataclasses.replace(v0, phi=phi)
    if not v0.kernel.is_gaussian:
        raise ctx.error(
            eqn,
            "an elementwise nonlinearity applied to a value that is not a zero-mean "
            "Gaussian process (two nonlinearities in a row, a nonlinearity of the raw "
            "input, or after a residual sum / concatenation); its kernel does not "
            "determine the result",
        )
    recognised = None
    if all(v.phi is None for v in values) and len(values) == 1:
        recognised = _recognise(eqn, invals)

    fns = [None if not is_value(c) else (c.phi.fn if c.phi is not None else None) for c in invals]

    def fn(u, fns=tuple(fns), scalars=tuple(scalars), eqn=eqn):
        args = []
        for f, s in zip(fns, scalars):
            if s is not None:
                args.append(s)
            else:
                args.append(u if f is None else f(u))
        out = _bind_elementwise(eqn, args, u.dtype)
        return out[0] if eqn.primitive.multiple_results else out

    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((), v0.kernel.nngp.dtype))
    except Exception as e:  # noqa: BLE001  (any failure of the user's function is reported with its place)
        raise ctx.error(
            eqn,
            f"the elementwise function of the Gaussian value built up to here cannot be "
            f"evaluated ({type(e).__name__}: {e})",
        ) from None
    if not jnp.issubdtype(out.dtype, jnp.number) and not jnp.issubdtype(out.dtype, jnp.bool_):
        raise ctx.error(eqn, f"the elementwise function returns {out.dtype}")
    label = _label(eqn, ctx)
    if recognised is not None:
        phi = Phi(fn=fn, name=recognised[0], params=recognised[1], where=label)
    else:
        phi = Phi(fn=fn, where=label)
    return dataclasses.replace(v0, phi=phi, fresh=None)


def _elementwise_rule(eqn, invals, ctx: PrimitiveContext):
    return [_elementwise(eqn, invals, ctx)]


register_primitive_rule(_rules.ELEMENTWISE, _elementwise_rule)


# ----------------------------------------------------------------------------------------------
# Calls.


def _call_rule(eqn, invals, ctx: PrimitiveContext):
    sub = _programs.sub_jaxpr(eqn)
    if sub is None:
        raise ctx.error(eqn, "cannot read the called program")
    if elementwise_program(sub[0]) and len(eqn.outvars) == 1:
        return [_elementwise(eqn, invals, ctx)]
    return ctx.call_program(eqn, invals)


for _name in sorted(_programs.CALL_PRIMITIVES):
    register_primitive_rule(_name, _call_rule)

"""Where an elementwise function outside the family of :mod:`ntk_adapters.infinite.forms` has
kinks or jumps: the points at which the branches of its traced program switch, for the
piecewise quadrature of :mod:`ntk_adapters.infinite.quadrature`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite.forms import _CALLS as _ENTERED  # the call primitives the family analysis enters

__all__ = ["find_kinks"]

_SWITCH_TWO = {"max", "min", "ge", "gt", "le", "lt", "eq", "ne"}
_SWITCH_ONE = {"abs", "sign", "sqrt", "rsqrt", "cbrt", "log"}
_JUMPS = {"floor", "ceil", "round", "rem", "nextafter", "is_finite", "sort", "argmax", "argmin"}


class _Unresolvable(Exception):
    pass


def _recording_eval(jaxpr, consts, args, record: list):
    env: dict = {}

    def read(v):
        if hasattr(v, "val") and not hasattr(v, "count"):
            return v.val
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for e in jaxpr.eqns:
        name = e.primitive.name
        ins = [read(v) for v in e.invars]
        if name in _JUMPS or (
            name == "convert_element_type"
            and jnp.issubdtype(jnp.result_type(ins[0]), jnp.inexact)
            and not jnp.issubdtype(e.params["new_dtype"], jnp.inexact)
        ):
            raise _Unresolvable(name)
        if name in _SWITCH_TWO and not jnp.issubdtype(jnp.result_type(ins[0]), jnp.bool_):
            record.append(jnp.asarray(ins[0], jnp.result_type(float)) - ins[1])
        elif name in _SWITCH_ONE:
            record.append(jnp.asarray(ins[0], jnp.result_type(float)))
        elif name == "clamp":
            record.append(ins[1] - ins[0])
            record.append(ins[1] - ins[2])
        elif name == "div":
            record.append(jnp.asarray(ins[1], jnp.result_type(float)))
        sub = _programs.sub_jaxpr(e) if name in _ENTERED or name == "custom_vjp_call" else None
        if sub is not None:
            outs = _recording_eval(sub[0], sub[1], ins, record)
            outs = outs if e.primitive.multiple_results else outs[0]
        else:
            outs = _programs.bind(e, ins)
        if not e.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(e.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def find_kinks(fn: Callable, dtype: Any = None, max_kinks: int = 16) -> Optional[tuple]:
    """Sorted points ``x`` where ``fn`` may fail to be smooth, ``()`` for a smooth function.

    A kink is where the argument of a ``max``/``min``/``abs``/``sign``/``clamp``, of a comparison, or
    of a ``sqrt``/``log``/division changes sign; they are located on ``[-1e4, 1e4]`` (a log- and a
    linear grid) and refined by bisection. ``None`` when ``fn`` has jumps on a lattice (``floor``,
    ``round``, a conversion to integers, ...) or more than ``max_kinks`` kinks: quadrature cannot
    split at them.
    """
    dtype = jnp.dtype(dtype if dtype is not None else jnp.result_type(float))
    try:
        with jax.ensure_compile_time_eval():
            closed = jax.make_jaxpr(fn)(jnp.zeros((), dtype))

            def switches(x):
                rec: list = []
                _recording_eval(closed.jaxpr, closed.consts, [x], rec)
                return [jnp.asarray(r, dtype) for r in rec]

            f = jax.vmap(switches)
            pos = np.logspace(-6, 4, 1201)
            grid = np.unique(np.concatenate([-pos, [0.0], pos, np.linspace(-12, 12, 2401)])).astype(dtype)
            rec = [np.asarray(r) for r in f(jnp.asarray(grid))]
            if not rec:
                return ()
            lo_list: list = []
            hi_list: list = []
            which_list: list[int] = []
            for k, r in enumerate(rec):
                sg = np.sign(np.where(np.isnan(r), 0.0, r))
                idx = np.nonzero(sg[1:] != sg[:-1])[0]
                lo_list += list(grid[idx])
                hi_list += list(grid[idx + 1])
                which_list += [k] * len(idx)
            if not which_list:
                return ()
            if len(which_list) > 4 * max_kinks:
                return None
            lo, hi = np.array(lo_list, dtype), np.array(hi_list, dtype)
            which = np.array(which_list)
            lo_sign = np.array(
                [np.sign(np.nan_to_num(np.asarray(rec[k]))[np.searchsorted(grid, l)]) for k, l in zip(which, lo)]
            )
            for _ in range(64 if dtype.itemsize >= 8 else 32):
                mid = ((lo + hi) / 2).astype(dtype)
                vals = [np.asarray(r) for r in f(jnp.asarray(mid))]
                sm = np.array([np.sign(np.nan_to_num(vals[k][i])) for i, k in enumerate(which)])
                same = sm == lo_sign
                lo = np.where(same, mid, lo)
                hi = np.where(same, hi, mid)
    except _Unresolvable:
        return None
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None
    pts = np.sort((lo.astype(np.float64) + hi.astype(np.float64)) / 2)
    kinks: list = []
    # Two switches at one kink (x > 1 and x < 1 of a clamp) bisect to points a few ulps apart.
    merge = max(1e-9, 64 * float(np.finfo(dtype).eps))
    for p in pts:
        if not kinks or abs(p - kinks[-1]) > merge * max(1.0, abs(p)):
            kinks.append(float(p))
    kinks = [0.0 if abs(k) < 1e-12 else k for k in kinks]
    if len(kinks) > max_kinks:
        return None
    return tuple(kinks)

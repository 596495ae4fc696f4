"""Piecewise exponential polynomials read from a traced program: breaks anywhere, ``e^{a x}`` pieces.

:func:`analyze_piecewise` interprets the program of an elementwise ``phi`` symbolically on the
whole line and returns a :class:`PiecewiseForm`: sorted breaks ``t_1 < … < t_K`` and, on each of
the ``K + 1`` open intervals between them, a finite sum ``Σ coef · x^m · e^{a x}``. This holds
``relu6``, ``hard_tanh``, ``clip(x, a, b)``, ``elu``, ``selu``, ``celu`` (as ``jax.nn`` writes
them), and every ``jnp.where``/``max``/``min``/``clip``/``abs``/``sign`` combination of
polynomials and exponentials of linear functions whose comparisons are between linear functions
(so that every break is an exact number). The Gaussian expectations of such functions are closed
forms (:mod:`ntk_adapters.infinite.piecewise_kernels`).

As for :func:`ntk_adapters.infinite.forms.analyze`, the result is checked against ``phi`` and
JAX's derivative of ``phi`` at probe points, and ``None`` is returned for anything else
(``tanh``, ``log1p``, a comparison with an exponential, ``stop_gradient``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import forms as _forms
from ntk_adapters.infinite import programs as _programs

__all__ = ["PiecewiseForm", "analyze_piecewise"]

MAX_BREAKS = 16
MAX_POWER = 8
MAX_TERMS = 48


@dataclasses.dataclass(frozen=True)
class PiecewiseForm:
    """``phi(x) = Σ_{(m, a) → coef ∈ pieces[i]} coef · x^m · e^{a x}`` on ``(breaks[i−1], breaks[i])``.

    ``pieces`` has ``len(breaks) + 1`` entries, each a sorted tuple ``((m, a, coef), ...)``.
    ``at_zero`` and ``slope_at_zero`` are ``phi(0)`` and ``phi'(0)`` as JAX computes them (used
    for a zero variance).
    """

    breaks: tuple
    pieces: tuple
    at_zero: float = 0.0
    slope_at_zero: float = 0.0

    @property
    def linear_factor(self) -> Optional[float]:
        """``a`` when ``phi(x) = a·x`` exactly, else ``None``."""
        if not self.breaks and len(self.pieces[0]) == 1:
            m, a, coef = self.pieces[0][0]
            if m == 1 and a == 0.0:
                return coef
        return None

    def intervals(self):
        """``(lo, hi, terms)`` per piece, with ``±inf`` at the ends."""
        edges = (-math.inf,) + tuple(self.breaks) + (math.inf,)
        return [(edges[i], edges[i + 1], p) for i, p in enumerate(self.pieces)]

    def derivative(self) -> "PiecewiseForm":
        """``phi'`` on each interval (jumps carry no derivative, as in JAX)."""
        out = []
        for piece in self.pieces:
            d: dict = {}
            for m, a, coef in piece:
                if m:
                    d[(m - 1, a)] = d.get((m - 1, a), 0.0) + coef * m
                if a:
                    d[(m, a)] = d.get((m, a), 0.0) + coef * a
            out.append(_canonical(d))
        return PiecewiseForm(self.breaks, tuple(out))

    def __call__(self, x):
        """``phi(x)`` in numpy, from the pieces (at a break: the piece on its left)."""
        x = np.asarray(x, np.float64)
        total = np.zeros_like(x)
        for lo, hi, piece in self.intervals():
            inside = (x > lo) & (x <= hi)
            val = sum(coef * x**m * np.exp(a * np.where(inside, x, 0.0)) for m, a, coef in piece) if piece else 0.0
            total = np.where(inside, val, total)
        return total

    def __str__(self) -> str:
        parts = []
        for lo, hi, piece in self.intervals():
            body = (
                " + ".join(f"{c:.6g}" + (f"·x^{m}" if m else "") + (f"·e^({a:.6g}x)" if a else "") for m, a, c in piece)
                or "0"
            )
            parts.append(f"({lo:.6g}, {hi:.6g}): {body}")
        return "; ".join(parts)


def _canonical(d: dict) -> tuple:
    return tuple(sorted((m, a, c) for (m, a), c in d.items() if c != 0.0))


class _Refused(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class _PW:
    """A piecewise function under construction: ``breaks`` and one dict ``(m, a) -> coef`` per piece."""

    breaks: tuple
    pieces: tuple  # tuple of dicts


@dataclasses.dataclass(frozen=True)
class _PB:
    """A boolean function, constant on each open interval between ``breaks``."""

    breaks: tuple
    values: tuple


def _const(c: float) -> _PW:
    return _PW((), ({(0, 0.0): float(c)},))


_X = _PW((), ({(1, 0.0): 1.0},))


def _refine(v, breaks: tuple):
    """``v`` on the finer ``breaks`` (a superset of ``v.breaks``)."""
    # Fine piece j lies left of fine break j; the coarse breaks strictly left of it count its owner.
    owners = [int(np.searchsorted(np.asarray(v.breaks, float), b, side="left")) for b in breaks] + [len(v.breaks)]
    if isinstance(v, _PW):
        return [v.pieces[o] for o in owners]
    return [v.values[o] for o in owners]


def _common(*vs):
    breaks = tuple(sorted(set().union(*(v.breaks for v in vs))))
    if len(breaks) > MAX_BREAKS:
        raise _Refused("too many breaks")
    return breaks, [_refine(v, breaks) for v in vs]


def _pw(breaks, pieces) -> _PW:
    pieces = [{k: c for k, c in p.items() if c != 0.0} for p in pieces]
    if any(len(p) > MAX_TERMS or any(m > MAX_POWER for m, _ in p) for p in pieces):
        raise _Refused("too large")
    # Merge neighbours that agree (keeps breaks that only an intermediate value had out of the form).
    keep_b, keep_p = [], [pieces[0]]
    for b, p in zip(breaks, pieces[1:]):
        if _same(p, keep_p[-1]):
            continue
        keep_b.append(b)
        keep_p.append(p)
    return _PW(tuple(keep_b), tuple(keep_p))


def _same(a: dict, b: dict) -> bool:
    keys = set(a) | set(b)
    return all(abs(a.get(k, 0.0) - b.get(k, 0.0)) <= 1e-13 * max(abs(a.get(k, 0.0)), abs(b.get(k, 0.0))) for k in keys)


def _as_pw(v) -> _PW:
    if isinstance(v, _PW):
        return v
    if isinstance(v, _PB):
        return _pw(v.breaks, [{(0, 0.0): float(b)} for b in v.values])
    return _const(float(v))


def _add(a, b, sign=1.0) -> _PW:
    breaks, (pa, pb) = _common(_as_pw(a), _as_pw(b))
    out = []
    for x, y in zip(pa, pb):
        d = dict(x)
        for k, c in y.items():
            d[k] = d.get(k, 0.0) + sign * c
        out.append(d)
    return _pw(breaks, out)


def _scale(a: _PW, s: float) -> _PW:
    return _pw(a.breaks, [{k: c * s for k, c in p.items()} for p in a.pieces])


def _mul(a, b) -> _PW:
    breaks, (pa, pb) = _common(_as_pw(a), _as_pw(b))
    out = []
    for x, y in zip(pa, pb):
        d: dict = {}
        for (m, r), c in x.items():
            for (n, s), e in y.items():
                d[(m + n, r + s)] = d.get((m + n, r + s), 0.0) + c * e
        out.append(d)
    return _pw(breaks, out)


def _linear(p: dict) -> Optional[tuple]:
    """``(α, β)`` when the piece is ``α x + β``."""
    if set(p) - {(0, 0.0), (1, 0.0)}:
        return None
    return p.get((1, 0.0), 0.0), p.get((0, 0.0), 0.0)


def _signs(d: _PW):
    """Breaks and signs (−1, 0, 1) of ``d`` on each interval, splitting linear pieces at their roots."""
    edges = (-math.inf,) + d.breaks + (math.inf,)
    breaks: list = []
    signs: list = []
    for i, p in enumerate(d.pieces):
        lo, hi = edges[i], edges[i + 1]
        lin = _linear(p)
        if lin is None:
            raise _Refused("a comparison of functions that are not linear")
        al, be = lin
        if al == 0.0:
            parts = [(None, np.sign(be))]
        else:
            root = -be / al
            if lo < root < hi:
                parts = [(root, -np.sign(al)), (None, np.sign(al))]
            else:
                mid = (
                    (max(lo, -1e300) + min(hi, 1e300)) / 2
                    if math.isfinite(lo) and math.isfinite(hi)
                    else (lo + 1.0 if math.isfinite(lo) else (hi - 1.0 if math.isfinite(hi) else 0.0))
                )
                parts = [(None, np.sign(al * mid + be))]
        for root, s in parts:
            signs.append(int(s))
            if root is not None:
                breaks.append(root)
        if i < len(d.breaks):
            breaks.append(d.breaks[i])
    return tuple(breaks), tuple(signs)


_COMPARE = {
    "ge": lambda s: s >= 0,
    "gt": lambda s: s > 0,
    "le": lambda s: s <= 0,
    "lt": lambda s: s < 0,
    "eq": lambda s: s == 0,
    "ne": lambda s: s != 0,
}


def _compare(name, a, b) -> _PB:
    breaks, signs = _signs(_add(a, b, -1.0))
    if len(breaks) > MAX_BREAKS:
        raise _Refused("too many breaks")
    return _PB(breaks, tuple(bool(_COMPARE[name](s)) for s in signs))


def _select(pred: _PB, on_false, on_true) -> _PW:
    breaks, (pp, pf, pt) = _common(pred, _as_pw(on_false), _as_pw(on_true))
    return _pw(breaks, [t if p else f for p, f, t in zip(pp, pf, pt)])


def _max(a, b, want_max=True) -> _PW:
    return _select(_compare("ge" if want_max else "le", a, b), b, a)


def _exp(a: _PW, minus_one=False) -> _PW:
    out = []
    for p in a.pieces:
        lin = _linear(p)
        if lin is None:
            raise _Refused("exp of a function that is not linear")
        d = {(0, float(lin[0])): math.exp(lin[1])}
        if minus_one:
            d[(0, 0.0)] = d.get((0, 0.0), 0.0) - 1.0
        out.append(d)
    return _pw(a.breaks, out)


def _logic(name, bs):
    breaks, vals = _common(*bs)
    ops = {"and": lambda p, q: p and q, "or": lambda p, q: p or q, "xor": lambda p, q: p != q}
    if name == "not":
        return _PB(breaks, tuple(not v for v in vals[0]))
    return _PB(breaks, tuple(ops[name](p, q) for p, q in zip(*vals)))


def _eqn(eqn, args):
    name = eqn.primitive.name
    if all(not isinstance(a, (_PW, _PB)) for a in args):
        with jax.ensure_compile_time_eval():
            out = _forms._bind(eqn, [jnp.asarray(a, dtype=v.aval.dtype) for a, v in zip(args, eqn.invars)])
        if eqn.primitive.multiple_results:
            return [_forms._concrete_scalar(o) for o in out]
        return _forms._concrete_scalar(out)
    if name in _forms._CALLS:
        sub = _programs.sub_jaxpr(eqn)
        if sub is None:
            raise _Refused(name)
        outs = _interpret(sub[0], sub[1], args)
        return outs if eqn.primitive.multiple_results else outs[0]
    if name in _forms._IDENTITY:
        return args[0]
    if name == "convert_element_type":
        a, new = args[0], eqn.params["new_dtype"]
        if jnp.issubdtype(new, jnp.bool_):
            return a if isinstance(a, _PB) else _compare("ne", a, 0.0)
        if isinstance(a, _PB) and not jnp.issubdtype(new, jnp.inexact):
            return a
        if jnp.issubdtype(new, jnp.inexact):
            return _as_pw(a)
        raise _Refused("conversion of a float value to an integer")
    if name in ("and", "or", "xor", "not"):
        bs = [a if isinstance(a, _PB) else _PB((), (bool(a),)) for a in args]
        return _logic(name, bs)
    if name in _COMPARE:
        return _compare(name, args[0], args[1])
    if name == "select_n":
        pred, *cases = args
        if isinstance(pred, _PB):
            if len(cases) != 2:
                raise _Refused("select_n")
            return _select(pred, cases[0], cases[1])
        return cases[int(pred)]
    a = [_as_pw(x) if isinstance(x, _PB) else x for x in args]
    if name in ("add", "add_any", "sub"):
        return _add(a[0], a[1], -1.0 if name == "sub" else 1.0)
    if name == "neg":
        return _scale(_as_pw(a[0]), -1.0)
    if name == "mul":
        if not isinstance(a[0], _PW):
            return _scale(a[1], float(a[0]))
        if not isinstance(a[1], _PW):
            return _scale(a[0], float(a[1]))
        return _mul(a[0], a[1])
    if name == "div":
        if isinstance(a[1], _PW) or float(a[1]) == 0.0:
            raise _Refused("division by a function of the value")
        return _scale(a[0], 1.0 / float(a[1]))
    if name in ("integer_pow", "square", "pow"):
        if name == "square":
            y = 2
        elif name == "integer_pow":
            y = eqn.params["y"]
        else:
            if isinstance(a[1], _PW) or float(a[1]) != int(a[1]) or int(a[1]) < 0:
                raise _Refused("pow with a non-integer exponent")
            y = int(a[1])
        if not 0 <= y <= MAX_POWER:
            raise _Refused("power")
        out = _const(1.0)
        for _ in range(y):
            out = _mul(out, a[0])
        return out
    if name in ("max", "min"):
        return _max(a[0], a[1], want_max=name == "max")
    if name == "clamp":
        lo, x, hi = a
        return _max(_max(x, lo), hi, want_max=False)
    if name == "abs":
        return _max(a[0], _scale(_as_pw(a[0]), -1.0))
    if name == "sign":
        return _add(_as_pw(_compare("gt", a[0], 0.0)), _as_pw(_compare("lt", a[0], 0.0)), -1.0)
    if name in ("exp", "expm1"):
        return _exp(_as_pw(a[0]), minus_one=name == "expm1")
    raise _Refused(name)


def _interpret(jaxpr, consts, args):
    env: dict = {}

    def read(v):
        if hasattr(v, "val") and not hasattr(v, "count"):
            return _forms._concrete_scalar(v.val)
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = _forms._concrete_scalar(c)
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for e in jaxpr.eqns:
        outs = _eqn(e, [read(v) for v in e.invars])
        if not e.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(e.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def analyze_piecewise(fn: Callable, dtype: Any = None) -> Optional[PiecewiseForm]:
    """The :class:`PiecewiseForm` of the elementwise ``fn``, or ``None`` if it is not one.

    Example::

        analyze_piecewise(jax.nn.elu)    # (-inf, 0): 1·e^(1x) − 1; (0, inf): 1·x
        analyze_piecewise(jax.nn.relu6)  # breaks (0, 6)
        analyze_piecewise(jnp.tanh)      # None
    """
    dtype = jnp.dtype(dtype if dtype is not None else jnp.result_type(float))
    try:
        with jax.ensure_compile_time_eval():
            closed = jax.make_jaxpr(fn)(jnp.zeros((), dtype))
        if len(closed.jaxpr.invars) != 1 or len(closed.jaxpr.outvars) != 1:
            return None
        (out,) = _interpret(closed.jaxpr, closed.consts, [_X])
        pw = _as_pw(out)
        with jax.ensure_compile_time_eval():
            zero = jnp.zeros((), dtype)
            v0, d0 = jax.jvp(lambda x: jnp.asarray(fn(x), dtype), (zero,), (jnp.ones((), dtype),))
        form = PiecewiseForm(
            tuple(float(b) for b in pw.breaks), tuple(_canonical(p) for p in pw.pieces), float(v0), float(d0)
        )
        if not _agrees(fn, form, dtype):
            return None
    except (_Refused, TypeError, ValueError, jax.errors.ConcretizationTypeError, OverflowError, KeyError):
        return None
    return form


def _agrees(fn, form: PiecewiseForm, dtype) -> bool:
    """``form`` and its derivative match ``fn`` and JAX's derivative at probe points off the breaks."""
    x = _forms._probe_points(np.float64)
    for lo, hi, _ in form.intervals():
        if math.isfinite(lo) and math.isfinite(hi):
            x = np.concatenate([x, lo + (hi - lo) * np.array([0.1, 0.5, 0.9])])
    b = np.asarray(form.breaks, np.float64)
    if b.size:
        x = x[np.min(np.abs(x[:, None] - b[None]), 1) > 1e-3 * (1 + np.abs(x))]
    x = x.astype(dtype)
    f = jax.vmap(lambda z: jax.jvp(lambda y: jnp.asarray(fn(y), dtype), (z,), (jnp.ones((), dtype),)))
    with jax.ensure_compile_time_eval():
        v, dv = (np.asarray(a, np.float64) for a in f(jnp.asarray(x)))
    xe = x.astype(np.float64)
    ref, dref = form(xe), form.derivative()(xe)
    tol = 1e-9 if jnp.dtype(dtype).itemsize >= 8 else 2e-4
    ok = (np.abs(v - ref) <= tol * (1.0 + np.abs(ref))) & (np.abs(dv - dref) <= tol * (1.0 + np.abs(dref)))
    return bool(np.all(ok))

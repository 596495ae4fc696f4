"""Closed-form Gaussian expectations of the family of :mod:`ntk_adapters.infinite.forms`.

Sums of terms ``x^m · I(x) · exp(−d x²/2)`` with ``I`` one of ``1``, ``1{±x > 0}``, ``Φ(a x)``
(the derivations are in :mod:`ntk_adapters.infinite.elementwise`); :func:`form_expectations`
is the entry point.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

from ntk_adapters.infinite import forms as _forms
from ntk_adapters.infinite.bivariate import _angle, _arcsin, _corr
from ntk_adapters.infinite.common_forms import common_expectations

Array = jax.Array
# Sums of closed-form terms stay Python floats while every term is constant (0.0, 1/2, 1/4).
ArrayOrFloat = Union[Array, float]

__all__ = ["closable", "form_expectations"]


_SQRT_2PI = math.sqrt(2 * math.pi)


def _half_moment(k: int) -> float:
    """``E[w^k 1{w > 0}]`` for ``w ~ N(0, 1)``: ``2^{k/2} Γ((k+1)/2) / (2√π)``."""
    return 2 ** (k / 2) * math.gamma((k + 1) / 2) / (2 * math.sqrt(math.pi))


class _Orthant:
    """``M_jk(±ρ) = E[u^j v^k 1{u > 0} 1{v > 0}]`` for standard normals with correlation ``±ρ``.

    Gaussian integration by parts (Stein's lemma) on ``u`` gives, for ``j ≥ 1``,
    ``M_jk = (j−1) M_{j−2,k} + k ρ M_{j−1,k−1} + [j = 1] s^k m_k / √(2π) + [k = 0] ρ s^{j−1} m_{j−1} / √(2π)``
    with ``s = sqrt(1 − ρ²)`` and ``m_k = E[w^k 1{w > 0}]``: the last two terms are the deltas of the
    indicators, ``v | u = 0 ~ N(0, s²)``. ``M_00 = (π − θ)/(2π)``, ``θ = arccos ρ``; ``M_jk = M_kj``.
    ``M_nn`` is Cho & Saul's arc-cosine kernel ``J_n(θ) / (2π)`` ("Kernel methods for deep learning",
    NeurIPS 2009): ``J_0 = π − θ``, ``J_1 = sin θ + (π − θ) cos θ``,
    ``J_2 = 3 sin θ cos θ + (π − θ)(1 + 2 cos² θ)``.
    """

    def __init__(self, rho: Array, sin_t: Array, theta: Array):
        self.rho, self.s, self.theta = rho, sin_t, theta
        self.cache: dict = {}

    def __call__(self, j: int, k: int, sign: int) -> Array:
        if j < k:
            j, k = k, j
        key = (j, k, sign)
        if key not in self.cache:
            self.cache[key] = self._compute(j, k, sign)
        return self.cache[key]

    def _spow(self, k: int):
        return 1.0 if k == 0 else self.s**k

    def _compute(self, j, k, sign):
        r = sign * self.rho
        if j == 0:
            theta = self.theta if sign > 0 else jnp.pi - self.theta
            return (jnp.pi - theta) / (2 * jnp.pi)
        val = 0.0
        if j >= 2:
            val = val + (j - 1) * self(j - 2, k, sign)
        if k >= 1:
            val = val + k * r * self(j - 1, k - 1, sign)
        if j == 1:
            val = val + self._spow(k) * (_half_moment(k) / _SQRT_2PI)
        if k == 0:
            val = val + r * self._spow(j - 1) * (_half_moment(j - 1) / _SQRT_2PI)
        return val


def _sides(form: _forms.Form) -> tuple[dict, dict]:
    """``(power -> coef on x > 0, power -> coef on x < 0)`` of a piecewise polynomial."""
    pos: dict = {}
    neg: dict = {}
    for t in form.terms:
        if t.step >= 0:
            pos[t.power] = pos.get(t.power, 0.0) + t.coef
        if t.step <= 0:
            neg[t.power] = neg.get(t.power, 0.0) + t.coef
    return pos, neg


def _piecewise_polynomial_pair(f: _forms.Form, g: _forms.Form, orth: _Orthant, s1, s2) -> ArrayOrFloat:
    """``E[f(u) g(v)]`` for piecewise polynomials: with ``u = σ1 ũ`` and the reflection
    ``(ũ, ṽ) → (−ũ, ṽ)`` (correlation ``−ρ``), ``E[ũ^j 1{aũ>0} ṽ^k 1{bṽ>0}] = a^j b^k M_jk(abρ)``."""
    fp, fn = _sides(f)
    gp, gn = _sides(g)
    total = 0.0
    for a, fa in ((1, fp), (-1, fn)):
        for j, cj in fa.items():
            for b, gb in ((1, gp), (-1, gn)):
                for k, ck in gb.items():
                    coef = cj * ck * (a**j) * (b**k)
                    total = total + coef * orth(j, k, a * b) * _pow(s1, j) * _pow(s2, k)
    return total


def _pow(x, k):
    return 1.0 if k == 0 else x**k


class _Cov:
    """A symmetric covariance over named jointly Gaussian variables, entries broadcast arrays."""

    def __init__(self, entries: dict):
        self.e = entries

    def __call__(self, a, b):
        return self.e[(a, b)] if (a, b) in self.e else self.e[(b, a)]

    def condition(self, name: str, names) -> "_Cov":
        """The covariance of ``names`` given ``name = 0`` (zero means stay zero)."""
        saa = self(name, name)
        ok = saa > 0
        inv = jnp.where(ok, 1.0 / jnp.where(ok, saa, 1.0), 0.0)
        out = {}
        names = list(names)
        for i, a in enumerate(names):
            for b in names[i:]:
                out[(a, b)] = self(a, b) - self(a, name) * self(name, b) * inv
        return _Cov(out)


def _gaussian_moment(m: int, n: int, inds: tuple, cov: _Cov, cache: dict, state: tuple) -> ArrayOrFloat:
    """``E[u^m v^n Π_{A ∈ inds} 1{A > 0}]`` for zero-mean jointly Gaussian ``(u, v, A...)``.

    Stein's lemma ``E[u g] = Σ_X Cov(u, X) E[∂_X g]`` lowers the powers; the derivative of an
    indicator is a delta, ``E[h δ(A)] = E[h | A = 0] / sqrt(2π Var A)``, which conditions the
    remaining variables on ``A = 0``. With no power left, the orthant probabilities are ``1``,
    ``1/2``, ``1/4 + arcsin(r)/(2π)`` (``r`` the correlation of the two indicators' variables,
    Sheppard's formula).
    """
    key = (m, n, inds, state)
    if key in cache:
        return cache[key]
    if m == 0 and n == 0:

        def r(a, b):
            saa, sbb = cov(a, a), cov(b, b)
            ok = (saa > 0) & (sbb > 0)
            return _arcsin(jnp.clip(jnp.where(ok, cov(a, b) / jnp.sqrt(jnp.where(ok, saa * sbb, 1.0)), 0.0), -1, 1))

        if not inds:
            val = 1.0
        elif len(inds) == 1:
            val = 0.5
        else:
            val = 0.25 + r(*inds) / (2 * jnp.pi)
        cache[key] = val
        return val
    x, p, other, q = ("u", m, "v", n) if m > 0 else ("v", n, "u", m)

    def moment(pp, qq, ii, cv, st):
        mm, nn = (pp, qq) if x == "u" else (qq, pp)
        return _gaussian_moment(mm, nn, ii, cv, cache, st)

    val = 0.0
    if p >= 2:
        val = val + (p - 1) * cov(x, x) * moment(p - 2, q, inds, cov, state)
    if q >= 1:
        val = val + q * cov(x, other) * moment(p - 1, q - 1, inds, cov, state)
    for a in inds:
        saa = cov(a, a)
        ok = saa > 0
        density = jnp.where(ok, 1.0 / jnp.sqrt(2 * jnp.pi * jnp.where(ok, saa, 1.0)), 0.0)
        rest = tuple(i for i in inds if i != a)
        cond = cov.condition(a, ("u", "v") + rest)
        val = val + cov(x, a) * density * moment(p - 1, q, rest, cond, state + (a,))
    cache[key] = val
    return val


def _general_pair(t1: _forms.Term, t2: _forms.Term, q1, q2, c, delta) -> ArrayOrFloat:
    """``E[t1(u) t2(v)]`` without the coefficients, for terms with ``Φ`` or Gaussian factors.

    A Gaussian factor reweights the density: ``E[h(u, v) e^{−(d1 u² + d2 v²)/2}] = E'[h] / sqrt(Δ)``
    with ``Δ = det(I + Σ D) = 1 + d1 q1 + d2 q2 + d1 d2 δ`` (``δ = q1 q2 − c²``) and
    ``Σ' = (Σ⁻¹ + D)⁻¹ = [[q1 + d2 δ, c], [c, q2 + d1 δ]] / Δ``. ``Φ(a u) = P(Z < a u)`` with an
    independent ``Z ~ N(0, 1)`` is the indicator of ``A = a u − Z``, jointly Gaussian with ``(u, v)``;
    a step ``1{s u > 0}`` is the indicator of ``s u``.
    """
    d1, d2 = t1.decay, t2.decay
    factor: ArrayOrFloat = 1.0
    if d1 or d2:
        big = 1 + d1 * q1 + d2 * q2 + d1 * d2 * delta
        q1, q2, c = (q1 + d2 * delta) / big, (q2 + d1 * delta) / big, c / big
        factor = jax.lax.rsqrt(big)
    e = {("u", "u"): q1, ("v", "v"): q2, ("u", "v"): c}
    # (name, variable, coefficient on it, variance of the independent part)
    inds = []
    for side, t, var in (("1", t1, "u"), ("2", t2, "v")):
        if t.step:
            inds.append(("S" + side, var, float(t.step), 0.0))
        if t.phi is not None:
            inds.append(("P" + side, var, float(t.phi), 1.0))
    var_of = {"u": q1, "v": q2}
    for i, (name, var, a, aux) in enumerate(inds):
        other = "v" if var == "u" else "u"
        e[(name, name)] = a * a * var_of[var] + aux
        e[(name, var)] = a * var_of[var]
        e[(name, other)] = a * c
        for name2, var2, a2, _ in inds[:i]:
            e[(name, name2)] = a * a2 * (var_of[var] if var == var2 else c)
    val = _gaussian_moment(t1.power, t2.power, tuple(i[0] for i in inds), _Cov(e), {}, ())
    return factor * val


def closable(form: _forms.Form) -> bool:
    """Whether every term of ``form`` and of its derivative has at most one indicator (a step or a
    ``Φ``): a pair of terms then has at most two, whose orthant probability is Sheppard's formula.
    (``1{x > 0} Φ(x)`` would need the orthant probability of four correlated variables.)"""
    return all(t.n_indicators <= 1 for f in (form, form.derivative()) for t in f.terms)


def _form_pair(f: _forms.Form, g: _forms.Form, q1, q2, c, rho, sin_t, theta, s1, s2) -> ArrayOrFloat:
    """``E[f(u) g(v)]`` for two members of the family (one closed form per pair of terms)."""
    orth = _Orthant(rho, sin_t, theta)
    if f.piecewise_polynomial and g.piecewise_polynomial:
        return _piecewise_polynomial_pair(f, g, orth, s1, s2)
    delta = (s1 * s2 * sin_t) ** 2
    total = 0.0
    for t1 in f.terms:
        for t2 in g.terms:
            if t1.decay == 0.0 and t2.decay == 0.0 and t1.phi is None and t2.phi is None:
                # Steps only: exact at ρ = ±1, where conditioning would divide 0 by 0.
                one = lambda t: _forms.Form((dataclasses.replace(t, coef=1.0),))
                val = _piecewise_polynomial_pair(one(t1), one(t2), orth, s1, s2)
            else:
                val = _general_pair(t1, t2, q1, q2, c, delta)
            total = total + t1.coef * t2.coef * val
    return total


_ONE = _forms.Form((_forms.Term(1.0, 0),), 1.0, 0.0)


def form_expectations(
    form: _forms.Form, c: Array, q1: Array, q2: Array, derivative: bool = True
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` in closed form for a :class:`~ntk_adapters.infinite.forms.Form`.

    Where a variance is zero that value is the constant 0 and the expectation factors,
    ``phi(0) E[phi(v)]``, with ``phi(0)`` and ``phi'(0)`` as JAX computes them. Piecewise-linear
    functions through the origin and scaled error functions take the short closed forms of
    :mod:`ntk_adapters.infinite.common_forms`.
    """
    common = common_expectations(form, c, q1, q2, derivative)
    return common if common is not None else term_by_term(form, c, q1, q2, derivative)


def term_by_term(
    form: _forms.Form, c: Array, q1: Array, q2: Array, derivative: bool = True
) -> tuple[Array, Optional[Array]]:
    """:func:`form_expectations` for any member of the family, one closed form per pair of terms."""
    _, rho, positive = _corr(c, q1, q2)
    theta, sin_t = _angle(rho)
    q1s = jnp.where(q1 > 0, q1, 1.0)
    q2s = jnp.where(q2 > 0, q2, 1.0)
    s1, s2 = jnp.sqrt(q1s), jnp.sqrt(q2s)
    cs = rho * s1 * s2
    rho0 = jnp.zeros_like(rho)
    th0 = jnp.full_like(rho, jnp.pi / 2)
    one = jnp.ones_like(rho)

    def expect(f, at_zero):
        full = _form_pair(f, f, q1s, q2s, cs, rho, sin_t, theta, s1, s2)
        m1 = _form_pair(f, _ONE, q1s, q2s, 0.0 * cs, rho0, one, th0, s1, s2)
        m2 = _form_pair(_ONE, f, q1s, q2s, 0.0 * cs, rho0, one, th0, s1, s2)
        m1 = jnp.where(q1 > 0, m1, at_zero)
        m2 = jnp.where(q2 > 0, m2, at_zero)
        return jnp.where(positive, full, m1 * m2)

    nngp = expect(form, form.at_zero)
    dd = expect(form.derivative(), form.slope_at_zero) if derivative else None
    return nngp, dd

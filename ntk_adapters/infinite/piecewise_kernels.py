"""Closed-form Gaussian expectations of piecewise exponential polynomials (:class:`PiecewiseForm`).

For ``(u, v) ~ N(0, Σ)``, ``Σ = [[q1, c], [c, q2]]``, a pair of pieces ``u^m e^{a u} 1{u ∈ I}`` and
``v^n e^{b v} 1{v ∈ J}`` is, by the exponential tilt,

    ``E[u^m e^{au} 1_I(u) v^n e^{bv} 1_J(v)] = e^{(a² q1 + 2ab c + b² q2)/2} E[w1^m w2^n 1_I(w1) 1_J(w2)]``

with ``(w1, w2) ~ N(μ, Σ)``, ``μ = (a q1 + b c, a c + b q2)``. An interval is one or two
half-line indicators ``1{s (w − t) > 0}``; Stein's lemma ``E[(w1 − μ1) g] = q1 E[∂1 g] + c E[∂2 g]``
lowers the powers, the indicators' derivatives are deltas ``s δ(w − t)`` (conditioning the other
variable on ``w = t``: a univariate truncated normal moment, the same recursion in one
dimension), and what remains is the bivariate orthant probability ``Φ2`` of non-zero thresholds
(:func:`~ntk_adapters.infinite.bivariate.bvn_upper`) or ``Φ``.

At ``ρ = ±1`` exactly (every diagonal entry of a kernel), ``v = ±(σ2/σ1) u`` and the pair is the
univariate moment ``E[u^p e^{r u} 1{lo < u < hi}]`` on the intersected interval: no division by
the vanishing conditional variance.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from ntk_adapters.infinite.bivariate import _corr, bvn_upper, norm_cdf, norm_pdf
from ntk_adapters.infinite.piecewise import PiecewiseForm

Array = jax.Array

__all__ = ["piecewise_expectations"]


def _truncated(kmax: int, mean, var, ind) -> list:
    """``[E[w^k 1{s (w − t) > 0}] for k ≤ kmax]``, ``w ~ N(mean, var)``, ``var > 0``; ``ind = (s, t)`` or ``None``.

    ``E[(w − m) h] = var E[h']`` with ``h = w^{k−1} 1{…}``: ``T_k = m T_{k−1} + var ((k−1) T_{k−2} + s t^{k−1} p(t))``.
    """
    sd = jnp.sqrt(var)
    if ind is None:
        out = [jnp.ones_like(mean)]
        dens = None
    else:
        s, t = ind
        out = [norm_cdf(s * (mean - t) / sd)]
        dens = norm_pdf((t - mean) / sd) / sd
    for k in range(1, kmax + 1):
        val = mean * out[k - 1]
        if k >= 2:
            val = val + var * (k - 1) * out[k - 2]
        if dens is not None:
            val = val + var * s * _pow(t, k - 1) * dens
        out.append(val)
    return out


def _pow(x, k):
    return 1.0 if k == 0 else x**k


def _indicators(lo, hi) -> list:
    """``1{lo < w < hi}`` as ``[(coef, (s, t) or None)]``; ``None`` endpoints are infinite."""
    if lo is None and hi is None:
        return [(1.0, None)]
    if lo is None:
        return [(1.0, (-1.0, hi))]
    if hi is None:
        return [(1.0, (1.0, lo))]
    return [(1.0, (1.0, lo)), (-1.0, (1.0, hi))]


def _end(x: float) -> Optional[float]:
    return None if math.isinf(x) else x


class _Bivariate:
    """``E[w1^m w2^n 1_1 1_2]`` for ``(w1, w2) ~ N((μ1, μ2), [[q1, c], [c, q2]])``, ``|ρ| < 1``, memoized."""

    def __init__(self, mu1, mu2, q1, q2, c, s1, s2, rho, one_minus_r2, kmax: int = 0):
        self.mu1, self.mu2, self.q1, self.q2, self.c = mu1, mu2, q1, q2, c
        self.s1, self.s2, self.rho, self.omr = s1, s2, rho, one_minus_r2
        self.kmax = kmax  # the highest power the forms have: conditional moments up to it at once
        self.cache: dict = {}
        self.conditionals: dict = {}

    def density(self, which, t):
        mu, s = (self.mu1, self.s1) if which == 1 else (self.mu2, self.s2)
        return norm_pdf((t - mu) / s) / s

    def conditional(self, which: int, kmax: int, ind, t_other):
        """Moments of ``w_which`` times its indicator given the other variable at ``t_other``,
        memoized (up to the highest order asked so far: each carries a ``Φ``)."""
        key = (which, None if ind is None else tuple(ind), float(t_other))
        cached = self.conditionals.get(key)
        if cached is None or len(cached) <= kmax:
            cached = self._conditional(which, max(kmax, self.kmax), ind, t_other)
            self.conditionals[key] = cached
        return cached

    def _conditional(self, which: int, kmax: int, ind, t_other):
        if which == 2:
            mean = self.mu2 + self.c / self.q1 * (t_other - self.mu1)
            var = self.q2 * self.omr
        else:
            mean = self.mu1 + self.c / self.q2 * (t_other - self.mu2)
            var = self.q1 * self.omr
        return _truncated(kmax, mean, var, ind)

    def __call__(self, m, n, i1, i2):
        key = (m, n, id(i1) if i1 is not None else None, id(i2) if i2 is not None else None)
        if key in self.cache:
            return self.cache[key][0]
        val = self._compute(m, n, i1, i2)
        self.cache[key] = (val, i1, i2)  # the indicators stay alive while their ids are keys
        return val

    def _compute(self, m, n, i1, i2):
        if m == 0 and n == 0:
            if i1 is None and i2 is None:
                return 1.0
            if i2 is None:
                return norm_cdf(i1[0] * (self.mu1 - i1[1]) / self.s1)
            if i1 is None:
                return norm_cdf(i2[0] * (self.mu2 - i2[1]) / self.s2)
            (a, t1), (b, t2) = i1, i2
            return bvn_upper(a * (t1 - self.mu1) / self.s1, b * (t2 - self.mu2) / self.s2, a * b * self.rho)
        if m == 0:  # by symmetry, Stein's lemma on w2
            val = self.mu2 * self(0, n - 1, i1, i2)
            if n >= 2:
                val = val + self.q2 * (n - 1) * self(0, n - 2, i1, i2)
            if i2 is not None:
                b, t2 = i2
                cond = self.conditional(1, 0, i1, t2)[0]
                val = val + self.q2 * b * _pow(t2, n - 1) * self.density(2, t2) * cond
            if i1 is not None:
                a, t1 = i1
                cond = self.conditional(2, n - 1, i2, t1)[n - 1]
                val = val + self.c * a * self.density(1, t1) * cond
            return val
        val = self.mu1 * self(m - 1, n, i1, i2)
        if m >= 2:
            val = val + self.q1 * (m - 1) * self(m - 2, n, i1, i2)
        if n >= 1:
            val = val + self.c * n * self(m - 1, n - 1, i1, i2)
        if i1 is not None:
            a, t1 = i1
            cond = self.conditional(2, n, i2, t1)[n]
            val = val + self.q1 * a * _pow(t1, m - 1) * self.density(1, t1) * cond
        if i2 is not None:
            b, t2 = i2
            cond = self.conditional(1, m - 1, i1, t2)[m - 1]
            val = val + self.c * b * _pow(t2, n) * self.density(2, t2) * cond
        return val


def _pair_bivariate(f: PiecewiseForm, g: PiecewiseForm, q1, q2, c, s1, s2, rho, omr):
    kmax = max(m for h in (f, g) for _, _, piece in h.intervals() for m, _, _ in piece)
    engines: dict = {}
    inds: dict = {}
    work = []
    for lo1, hi1, p1 in f.intervals():
        for lo2, hi2, p2 in g.intervals():
            k1 = inds.setdefault(("f", lo1, hi1), _indicators(_end(lo1), _end(hi1)))
            k2 = inds.setdefault(("g", lo2, hi2), _indicators(_end(lo2), _end(hi2)))
            for m, a, ca in p1:
                for n, b, cb in p2:
                    if (a, b) not in engines:
                        mu1, mu2 = a * q1 + b * c, a * c + b * q2
                        tilt = jnp.exp((a * a * q1 + 2 * a * b * c + b * b * q2) / 2) if (a or b) else 1.0
                        engines[(a, b)] = (_Bivariate(mu1, mu2, q1, q2, c, s1, s2, rho, omr, kmax), tilt)
                    work.append((engines[(a, b)], m, n, ca * cb, k1, k2))
    _orthants_at_once(work)
    total = 0.0
    for (eng, tilt), m, n, coef, k1, k2 in work:
        val = 0.0
        for w1, i1 in k1:
            for w2, i2 in k2:
                val = val + w1 * w2 * eng(m, n, i1, i2)
        total = total + coef * tilt * val
    return total


def _orthants_at_once(work) -> None:
    """Every ``Φ2`` the recursions will need, in one batched :func:`bvn_upper` (a graph of one
    call, not one per pair of thresholds: compile time grows with the graph)."""
    seen: dict = {}
    for (eng, _), _, _, _, k1, k2 in work:
        for _, i1 in k1:
            for _, i2 in k2:
                if i1 is not None and i2 is not None:
                    seen.setdefault((id(eng), id(i1), id(i2)), (eng, i1, i2))
    if not seen:
        return
    hs, ks, rs = [], [], []
    for eng, (a, t1), (b, t2) in seen.values():
        hs.append(a * (t1 - eng.mu1) / eng.s1)
        ks.append(b * (t2 - eng.mu2) / eng.s2)
        rs.append(a * b * eng.rho)
    shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in hs + ks + rs))
    stack = lambda xs: jnp.stack([jnp.broadcast_to(x, shape) for x in xs], -1)
    probs = bvn_upper(stack(hs), stack(ks), stack(rs))
    for j, (eng, i1, i2) in enumerate(seen.values()):
        eng.cache[(0, 0, id(i1), id(i2))] = (probs[..., j], i1, i2)


_FAR = 40.0  # standard deviations: Φ and φ vanish beyond, in float32 and float64


def _interval_moments(p: int, mean, var, lo, hi) -> list:
    """``[E[w^k 1{lo < w < hi}] for k ≤ p]``, ``w ~ N(mean, var)``, ``var > 0``; ``lo``, ``hi`` arrays
    (clipped to ``mean ± 40 sd``, so infinite ends need no special case).

    ``D_k = m D_{k−1} + var ((k−1) D_{k−2} + lo^{k−1} p(lo) − hi^{k−1} p(hi))``, with
    ``D_0 = Φ(b) − Φ(a)`` written as ``Φ(−a) − Φ(−b)`` above the mean (no cancellation in the tails).
    """
    sd = jnp.sqrt(var)
    a = jnp.clip((lo - mean) / sd, -_FAR, _FAR)
    b = jnp.clip((hi - mean) / sd, -_FAR, _FAR)
    b = jnp.maximum(a, b)
    lo, hi = mean + a * sd, mean + b * sd
    above = a > 0
    cdf = norm_cdf(jnp.stack([jnp.where(above, -b, a), jnp.where(above, -a, b)]))
    out = [cdf[1] - cdf[0]]
    pa, pb = norm_pdf(a) / sd, norm_pdf(b) / sd
    for k in range(1, p + 1):
        val = mean * out[k - 1] + var * (_pow(lo, k - 1) * pa - _pow(hi, k - 1) * pb)
        if k >= 2:
            val = val + var * (k - 1) * out[k - 2]
        out.append(val)
    return out


def _univariate_sum(q, terms: list):
    """``Σ coef · E[u^p e^{r u} 1{lo < u < hi}]`` over ``terms = [(coef, p, r, lo, hi)]``,
    ``u ~ N(0, q)``, ``q > 0``: each term is the tilt ``e^{r² q/2}`` times a moment of ``N(r q, q)``.

    The terms are stacked on a last axis and evaluated together: each ``Φ`` expands to a few
    hundred operations (``erfc``), and compile time grows with the graph.
    """
    shape = jnp.broadcast_shapes(jnp.shape(q), *(jnp.shape(x) for _, _, r, lo, hi in terms for x in (r, lo, hi)))
    stack = lambda xs: jnp.stack([jnp.broadcast_to(x, shape) for x in xs], -1)
    r = stack([t[2] for t in terms])
    qs = jnp.broadcast_to(q, shape)[..., None]
    moments = _interval_moments(
        max(t[1] for t in terms), r * qs, qs, stack([t[3] for t in terms]), stack([t[4] for t in terms])
    )
    tilted = jnp.exp(r * r * qs / 2)
    total = 0.0
    for j, (coef, p, _, _, _) in enumerate(terms):
        total = total + coef * tilted[..., j] * moments[p][..., j]
    return total


def _ends(lo: float, hi: float, big):
    return (-big if math.isinf(lo) else lo), (big if math.isinf(hi) else hi)


def _pair_collinear(f: PiecewiseForm, g: PiecewiseForm, q1, kappa, big):
    """``E[f(u) g(κ u)]``, ``u ~ N(0, q1)``: the value at ``ρ = ±1``, ``κ = ρ σ2/σ1``."""
    terms: list[tuple] = []
    for lo1, hi1, p1 in f.intervals():
        for lo2, hi2, p2 in g.intervals():
            a1, b1 = _ends(lo1, hi1, big)
            a2, b2 = _ends(lo2, hi2, big * jnp.abs(kappa))
            ga, gb = a2 / kappa, b2 / kappa
            lo = jnp.maximum(a1, jnp.minimum(ga, gb))
            hi = jnp.minimum(b1, jnp.maximum(ga, gb))
            for m, a, ca in p1:
                for n, b, cb in p2:
                    terms.append((ca * cb * _pow(kappa, n), m + n, a + b * kappa, lo, hi))
    return _univariate_sum(q1, terms)


def _mean(f: PiecewiseForm, q, big):
    terms: list[tuple] = []
    for lo, hi, piece in f.intervals():
        a, b = _ends(lo, hi, big)
        terms.extend((coef, m, r, a, b) for m, r, coef in piece)
    return _univariate_sum(q, terms)


def _expect(f: PiecewiseForm, g: PiecewiseForm, c, q1, q2, at_zero_f, at_zero_g):
    _, rho, positive = _corr(c, q1, q2)
    q1s = jnp.where(q1 > 0, q1, 1.0)
    q2s = jnp.where(q2 > 0, q2, 1.0)
    s1, s2 = jnp.sqrt(q1s), jnp.sqrt(q2s)
    inside = jnp.abs(rho) < 1
    r = jnp.where(inside, rho, 0.0)
    omr = (1 - r) * (1 + r)
    cs = r * s1 * s2
    biv = _pair_bivariate(f, g, q1s, q2s, cs, s1, s2, r, omr)
    kappa = jnp.where(rho < 0, -1.0, 1.0) * s2 / s1
    # an "infinite" end beyond every tilted mean (|r q| <= rate·q) by 40 sd; clipped there anyway
    rate = max([abs(a) for h in (f, g) for p in h.pieces for _, a, _ in p] + [1.0])
    big1, big2 = (rate * qs + 2 * _FAR * s + 1.0 for qs, s in ((q1s, s1), (q2s, s2)))
    collinear = _pair_collinear(f, g, q1s, kappa, big1)
    full = jnp.where(inside, biv, collinear)
    m1 = jnp.where(q1 > 0, _mean(f, q1s, big1), at_zero_f)
    m2 = jnp.where(q2 > 0, _mean(g, q2s, big2), at_zero_g)
    return jnp.where(positive, full, m1 * m2)


def piecewise_expectations(
    form: PiecewiseForm, c: Array, q1: Array, q2: Array, derivative: bool = True
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` in closed form for a :class:`PiecewiseForm`.

    ``c``, ``q1``, ``q2`` broadcast together. Where a variance is zero the expectation factors,
    with ``phi(0)``, ``phi'(0)`` as JAX computes them.

    Example::

        form = analyze_piecewise(jax.nn.elu)
        nngp, dd = piecewise_expectations(form, jnp.array(0.5), jnp.array(1.0), jnp.array(1.0))
    """
    c, q1, q2 = jnp.broadcast_arrays(c, q1, q2)
    nngp = _expect(form, form, c, q1, q2, form.at_zero, form.at_zero)
    dd = None
    if derivative:
        d = form.derivative()
        dd = _expect(d, d, c, q1, q2, form.slope_at_zero, form.slope_at_zero)
    return nngp, dd

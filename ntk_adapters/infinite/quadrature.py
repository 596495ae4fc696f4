"""Quadrature of Gaussian expectations of elementwise functions without a closed form.

:func:`quadrature_scheme` chooses, once per function, a Hermite (Mehler) series whose length a
rigorous tail bound fixes, plain Gauss–Hermite, or Gauss–Legendre panels split at the function's
kinks; :class:`QuadratureScheme` integrates with the chosen rule (see
:mod:`ntk_adapters.infinite.elementwise` for the measured errors).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import kinks as _kinks
from ntk_adapters.infinite.bivariate import _angle, _corr, _safe_sqrt

Array = jax.Array

__all__ = ["DEFAULT_QUADRATURE_POINTS", "DEFAULT_RTOL", "QuadratureScheme", "QuadratureWarning", "quadrature_scheme"]


#: Default number of Gauss–Hermite nodes per dimension the node-count search starts from.
DEFAULT_QUADRATURE_POINTS = 32
#: Relative accuracy the quadrature's node count is chosen for (see :func:`quadrature_scheme`).
DEFAULT_RTOL = 1e-6
_HERMITE_MAX = 256
_LEGENDRE_COUNTS = (8, 16, 32)
_SERIES_TERMS = (64, 128, 256, 512, 1024, 2048)
# Panel edges in the standardized variable z (the Gaussian weight is resolved by every rule on
# panels of length <= 1.5) and in x (the features of the usual activations sit at |x| ~ 1, which a
# large variance squeezes into a small range of z); beyond |z| = 9 the weight is below 1e-17.
_Z_BREAKS = (-6.0, -4.5, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.5, 6.0)
_X_FEATURES = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
_Z_LIMIT = 9.0


class QuadratureWarning(UserWarning):
    """The quadrature of an elementwise function did not reach the requested tolerance."""


@functools.lru_cache(maxsize=None)
def _hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2 * math.pi)


@functools.lru_cache(maxsize=None)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _value_and_slope(f, derivative):
    if derivative:
        return lambda x: jax.jvp(f, (x,), (jnp.ones_like(x),))
    return lambda x: (f(x), None)


def _outer_sum(step, nodes, weights, shape, dtype, derivative, scan):
    """``Σ_i w_i · step(z_i)`` over outer nodes ``(..., m)`` (scanned: memory of one node at a time)."""
    if not scan:
        a, b = step(nodes, weights)
        return a.sum(-1), (b.sum(-1) if derivative else None)

    def body(acc, zw):
        a, b = step(zw[0][..., None], zw[1][..., None])
        return (acc[0] + a[..., 0], acc[1] + b[..., 0] if derivative else acc[1]), None

    zero = jnp.zeros(shape, dtype)
    xs = (jnp.moveaxis(nodes, -1, 0), jnp.moveaxis(weights, -1, 0))
    (a, b), _ = jax.lax.scan(body, (zero, zero), xs)
    return a, (b if derivative else None)


def _canonical(c, q1, q2):
    # The input with the larger variance is integrated outermost: the canonical order makes the
    # result exactly symmetric under swapping the two inputs, so a kernel matrix stays symmetric.
    qa, qb = jnp.maximum(q1, q2), jnp.minimum(q1, q2)
    _, rho, _ = _corr(c, qa, qb)
    return _safe_sqrt(qa), _safe_sqrt(qb), rho, _angle(rho)[1]


def _quadrature(
    f: Callable, c: Array, q1: Array, q2: Array, n: int, derivative: bool, scan: bool = True
) -> tuple[Array, Optional[Array]]:
    """``E[f(u) f(v)]`` (and ``E[f'(u) f'(v)]``) by ``n × n`` Gauss–Hermite quadrature.

    ``u = σa z1``, ``v = σb (ρ z1 + sqrt(1 − ρ²) z2)`` (Cholesky). ``c``, ``q1``, ``q2`` share one
    shape. With ``derivative`` each node evaluates ``f`` and ``f'`` together in one forward-mode pass.
    """
    dtype = c.dtype
    nodes, weights = (jnp.asarray(a, dtype) for a in _hermite(n))
    sa, sb, rho, sin_t = _canonical(c, q1, q2)
    both = _value_and_slope(f, derivative)
    b1, b2 = (sb * rho)[..., None, None], (sb * sin_t)[..., None, None]

    def step(z, w):  # z, w: (..., m) outer nodes
        fi, dfi = both(b1 * z[..., None] + b2 * nodes)  # (..., m, n) inner nodes
        fo, dfo = both(sa[..., None] * z)
        a = w * fo * (fi @ weights)  # E[f(v) | z1 = z] by the inner sum
        b = w * dfo * (dfi @ weights) if derivative else None
        return a, b

    z1 = jnp.broadcast_to(nodes, c.shape + (n,))
    w1 = jnp.broadcast_to(weights, c.shape + (n,))
    return _outer_sum(step, z1, w1, c.shape, dtype, derivative, scan)


def _panels(edges: Array, n: int, dtype) -> tuple[Array, Array]:
    """``n``-point Gauss–Legendre nodes and weights (times the standard normal density) on each
    panel between ``-L``, the sorted ``edges`` (clipped to ``[-L, L]``) and ``L``: ``(..., (K+1)·n)``."""
    x, w = (jnp.asarray(a, dtype) for a in _legendre(n))
    e = jnp.clip(edges, -_Z_LIMIT, _Z_LIMIT)
    cap = jnp.full(e.shape[:-1] + (1,), _Z_LIMIT, dtype)
    lo = jnp.concatenate([-cap, e], -1)
    hi = jnp.concatenate([e, cap], -1)
    half, mid = (hi - lo) / 2, (hi + lo) / 2
    z = mid[..., None] + half[..., None] * x
    wz = half[..., None] * w * jnp.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return z.reshape(z.shape[:-2] + (-1,)), wz.reshape(wz.shape[:-2] + (-1,))


# Where the coefficients of a Hermite series are integrated: |h_k(z)| sqrt(N(z)) <= 1, so the
# integrand is below e^{-z²/4} < 1e-21 beyond |z| = 14, and panels of width ~3/sqrt(k) with 8
# Gauss–Legendre nodes resolve the oscillations of h_k (spacing ~π/sqrt(2k) near 0).
_SERIES_LIMIT = 14.0


@functools.lru_cache(maxsize=None)
def _series_nodes(terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(z, r, s)``: nodes, ``r = Legendre weight · sqrt(N(z))`` and ``s = sqrt(N(z))``."""
    width = min(0.5, 3.0 / math.sqrt(terms))
    count = int(math.ceil(2 * _SERIES_LIMIT / width))
    edges = np.linspace(-_SERIES_LIMIT, _SERIES_LIMIT, count + 1)
    x, w = _legendre(8)
    half, mid = np.diff(edges) / 2, (edges[1:] + edges[:-1]) / 2
    z = (mid[:, None] + half[:, None] * x).ravel()
    wz = (half[:, None] * w).ravel()
    root = np.exp(-z * z / 4) / (2 * math.pi) ** 0.25
    return z, wz * root, root


def _hermite_coefficients(f, q, terms: int, derivative: bool):
    """``a_k = E[f(σ z) h_k(z)]`` (and the same for ``f'``), ``σ = sqrt(q)``, ``k < terms``:
    ``(..., terms)``. ``h_k = He_k / sqrt(k!)`` are the orthonormal Hermite polynomials of the
    standard normal; the Hermite functions ``ψ_k = h_k sqrt(N)`` are generated by the recurrence
    ``ψ_{k+1} = (z ψ_k − sqrt(k) ψ_{k−1}) / sqrt(k+1)``, which stays bounded (no overflow in float32)."""
    dtype = q.dtype
    z, r, root = (jnp.asarray(a, dtype) for a in _series_nodes(terms))

    def body(carry, k):
        prev, cur = carry
        return (cur, (z * cur - jnp.sqrt(k) * prev) / jnp.sqrt(k + 1)), cur

    _, psi = jax.lax.scan(body, (jnp.zeros_like(root), root), jnp.arange(terms, dtype=dtype))
    basis = (psi * r).T  # (nodes, terms): one matrix product per input array
    v, dv = _value_and_slope(f, derivative)(_safe_sqrt(q)[..., None] * z)
    return v @ basis, (dv @ basis if derivative else None)


def _hermite_series(
    f: Callable, c: Array, q1: Array, q2: Array, terms: int, derivative: bool, scan: bool = True
) -> tuple[Array, Optional[Array]]:
    """``E[f(u) f(v)] = Σ_k a_k(q1) a_k(q2) ρ^k`` (and the same for ``f'``), truncated to ``terms``.

    Mehler's formula: for standard normals with correlation ``ρ``, ``E[h_j(z1) h_k(z2)] = δ_jk ρ^k``,
    so expanding ``f(σ z) = Σ_k a_k(σ) h_k(z)`` gives the series (O'Donnell, "Analysis of Boolean
    Functions", ch. 11; the "dual activation" of Daniely, Frostig & Singer, NeurIPS 2016). The
    coefficients are 1-D integrals per variance, so ``q1``, ``q2`` may keep the shapes they
    broadcast from (one row of coefficients per input, not per pair); each entry costs ``terms``
    multiply-adds. The series converges fast for smooth ``f`` (analytic in a strip), slowly for
    kinks, which go to :func:`_piecewise_quadrature`.
    """
    _, rho, _ = _corr(c, q1, q2)
    a1, d1 = _hermite_coefficients(f, q1, terms, derivative)
    a2, d2 = _hermite_coefficients(f, q2, terms, derivative)

    def horner(x, y):
        xs = (jnp.moveaxis(x, -1, 0)[::-1], jnp.moveaxis(y, -1, 0)[::-1])
        if not scan:
            acc = jnp.zeros_like(rho)
            for xk, yk in zip(*xs):
                acc = acc * rho + xk * yk
            return acc

        def body(acc, xy):
            return acc * rho + xy[0] * xy[1], None

        acc, _ = jax.lax.scan(body, jnp.zeros_like(rho), xs)
        return acc

    return horner(a1, a2), (horner(d1, d2) if derivative else None)


#: Distances (in units of ``s / |ρ|``) from a kink of ``v`` at which the outer panels are split.
_NEAR_KINK = (-64.0, -16.0, -4.0, -1.0, 1.0, 4.0, 16.0, 64.0)


def _piecewise_quadrature(
    f: Callable, c: Array, q1: Array, q2: Array, kinks: tuple, n: int, derivative: bool, scan: bool = True
) -> tuple[Array, Optional[Array]]:
    """``E[f(u) f(v)]`` (and ``E[f'(u) f'(v)]``) by Gauss–Legendre panels split at the kinks.

    ``u = σa z1``, ``v = σb (ρ z1 + s z2)``. The inner integral over ``z2`` (given ``z1``) has panels
    split where ``v`` crosses a kink ``t``, ``z2 = (t/σb − ρ z1)/s``, so ``f`` is smooth on each and
    every rule converges exponentially. The outer integrand (over ``z1``) then has kinks at
    ``t/σa``, where it is split, and, when ``|ρ|`` is close to 1, changes over a width ``~s/|ρ|``
    around ``z1 = t/(σb ρ)`` (where ``v``'s kink crosses the inner range): it is also split there at
    geometric distances (:data:`_NEAR_KINK`). Fixed edges in ``z`` (:data:`_Z_BREAKS`) keep the
    panels short, and edges at the feature scale in ``x`` (:data:`_X_FEATURES`, mapped to ``z``)
    resolve steep functions at large variances.
    """
    dtype = c.dtype
    sa, sb, rho, sin_t = _canonical(c, q1, q2)
    both = _value_and_slope(f, derivative)
    safe = lambda a: jnp.where(a > 0, a, 1.0)
    xb = jnp.asarray(tuple(sorted(set(_X_FEATURES) | set(kinks))), dtype)
    zb = jnp.asarray(_Z_BREAKS, dtype)

    def edges(*groups):
        lead = jnp.broadcast_shapes(*(g.shape[:-1] for g in groups))
        return jnp.sort(jnp.concatenate([jnp.broadcast_to(g, lead + g.shape[-1:]) for g in groups], -1), -1)

    sa_safe, sb_safe, s_safe = safe(sa), safe(sb), safe(sin_t)
    outer = [jnp.broadcast_to(zb, c.shape + zb.shape), xb / sa_safe[..., None]]
    if kinks:
        xk = jnp.asarray(kinks, dtype)
        correlated = jnp.abs(rho) > 1e-3
        r_safe = jnp.where(correlated, rho, 1.0)
        center = xk / (sb_safe * r_safe)[..., None]
        width = (sin_t / jnp.abs(r_safe))[..., None, None]
        near = center[..., None] + width * jnp.asarray(_NEAR_KINK, dtype)
        near = jnp.where(correlated[..., None, None], near, _Z_LIMIT)
        outer.append(near.reshape(c.shape + (-1,)))
    z1, w1 = _panels(edges(*outer), n, dtype)

    def step(z, w):  # z, w: (..., m) outer nodes
        inner_e = edges(
            zb[None], (xb / sb_safe[..., None, None] - rho[..., None, None] * z[..., None]) / s_safe[..., None, None]
        )
        z2, w2 = _panels(inner_e, n, dtype)  # (..., m, P n)
        fi, dfi = both(sb[..., None, None] * (rho[..., None, None] * z[..., None] + sin_t[..., None, None] * z2))
        fo, dfo = both(sa[..., None] * z)
        a = w * fo * (fi * w2).sum(-1)
        b = w * dfo * (dfi * w2).sum(-1) if derivative else None
        return a, b

    return _outer_sum(step, z1, w1, c.shape, dtype, derivative, scan)


@dataclasses.dataclass(frozen=True)
class QuadratureScheme:
    """How an elementwise function without closed form is integrated.

    Attributes:
      kind: ``'series'`` (Hermite series of ``n`` terms, :func:`_hermite_series`), ``'hermite'``
        (``n × n`` Gauss–Hermite) or ``'panels'`` (Gauss–Legendre panels, ``n`` nodes each, split
        at the kinks ``breaks``).
      n: terms (``'series'``), nodes per dimension (``'hermite'``) or per panel (``'panels'``).
      breaks: the kinks of the function in ``x`` (``'panels'``).
      error: the estimated relative error on the check covariances (``nan`` when not checked).
      reason: why the tolerance was not reached, if it was not.
    """

    kind: str
    n: int
    breaks: tuple = ()
    error: float = float("nan")
    reason: str = ""

    def integrate(self, f, c, q1, q2, derivative, scan=True):
        """``(E[f(u) f(v)], E[f'(u) f'(v)])``; ``c``, ``q1``, ``q2`` broadcast together."""
        if self.kind == "series":
            return _hermite_series(f, c, q1, q2, self.n, derivative, scan)
        c, q1, q2 = jnp.broadcast_arrays(c, q1, q2)
        if self.kind == "hermite":
            return _quadrature(f, c, q1, q2, self.n, derivative, scan)
        return _piecewise_quadrature(f, c, q1, q2, self.breaks, self.n, derivative, scan)

    def key(self):
        return (self.kind, self.n, self.breaks)


def _check_grid(dtype):
    """Representative covariances ``(c, q1, q2)``: variances 0.25–16, correlations from −0.999 to 1
    (0.99999: nearly equal inputs)."""
    rows = []
    for q in (0.25, 1.0, 4.0, 16.0):
        for r in (-0.999, -0.5, 0.0, 0.5, 0.9, 0.999, 0.99999, 1.0):
            rows.append((r * q, q, q))
    for r in (-0.8, 0.3, 0.95):
        rows.append((r, 0.25, 4.0))
        rows.append((2 * r, 0.25, 16.0))
    return tuple(np.array(col, dtype=dtype) for col in zip(*rows))


def _scales(f, q1, q2, dtype):
    """``sqrt(E[f(u)²] E[f(v)²])`` and the same for ``f'``: the Cauchy–Schwarz bounds of the two
    expectations, against which errors are relative (so odd functions at ``ρ = 0`` count)."""
    x, w = (jnp.asarray(a, dtype) for a in _hermite(200))
    tiny = jnp.finfo(dtype).tiny

    def second_moments(q):
        v, d = _value_and_slope(f, True)(jnp.sqrt(q)[..., None] * x)
        return (v * v * w).sum(-1), (d * d * w).sum(-1)

    (a1, b1), (a2, b2) = second_moments(q1), second_moments(q2)
    return jnp.sqrt(a1 * a2) + tiny, jnp.sqrt(b1 * b2) + tiny


_SCHEMES: dict = {}


def _program_key(f, dtype):
    """A key for ``f`` by its traced program and constants (closures are new at every trace)."""
    with jax.ensure_compile_time_eval():
        closed = jax.make_jaxpr(f)(jnp.zeros((), dtype))
    consts = tuple((np.asarray(c).dtype.str, np.asarray(c).tobytes()) for c in closed.consts)
    return (str(closed.jaxpr), consts, jnp.dtype(dtype).str)


def quadrature_scheme(
    f: Callable,
    dtype=None,
    *,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    rtol: float = DEFAULT_RTOL,
    label: Optional[str] = None,
) -> QuadratureScheme:
    """Choose, once and concretely (at trace time), how to integrate ``f`` to relative accuracy ``rtol``.

    The rule is chosen on representative covariances (variances 0.25, 1 and 4, correlations
    −0.999 … 1; :func:`_check_grid`), where ``E[f(u) f(v)]`` and ``E[f'(u) f'(v)]`` are compared
    between successive rules, relative to ``sqrt(E[f(u)²] E[f(v)²])``:

    1. ``f`` without kinks (:func:`~ntk_adapters.infinite.kinks.find_kinks`): Gauss–Hermite with
       ``n_points`` or ``2·n_points`` nodes per dimension (checked against the next doubling), the
       first whose estimate agrees with the next to ``rtol``.
    2. Otherwise (kinks, or too steep for ``4·n_points`` Hermite nodes): Gauss–Legendre panels
       split at the kinks (:func:`_piecewise_quadrature`) with 8 or 16 nodes per panel (checked
       against 16 and 32).
    3. If even that does not agree to ``rtol`` (jumps on a lattice such as ``floor``, more than 16
       kinks), a :class:`QuadratureWarning` naming ``label`` is issued and 32 nodes per panel are used.

    Variances far outside the checked range (e.g. unnormalized inputs) may need more nodes than
    chosen here. The choice is cached by the program of ``f``.
    """
    dtype = jnp.dtype(dtype if dtype is not None else jnp.result_type(float))
    try:
        key = (_program_key(f, dtype), int(n_points), float(rtol))
    except Exception:  # noqa: BLE001  (f not traceable on a scalar: let the integration report it)
        key = None
    if key is not None and key in _SCHEMES:
        scheme = _SCHEMES[key]
        if scheme.error > rtol:
            _warn_inaccurate(scheme, rtol, label)
        return scheme
    try:
        scheme = _choose_scheme(f, dtype, int(n_points), float(rtol))
    except (jax.errors.JAXTypeError, jax.errors.ConcretizationTypeError, TypeError):
        # f closes over traced values (e.g. parameters under jax.grad): it cannot be checked now.
        return QuadratureScheme("hermite", int(n_points), reason="not checked (the function closes over traced values)")
    if key is not None:
        _SCHEMES[key] = scheme
    if scheme.error > rtol:
        _warn_inaccurate(scheme, rtol, label)
    return scheme


def _choose_scheme(f, dtype, n_points, rtol) -> QuadratureScheme:
    kinks = _kinks.find_kinks(f, dtype)
    breaks = tuple(kinks or ())
    grid = _check_grid(dtype)
    # The series is tried first whatever the kinks (a max(x, 0) inside a smooth softplus is one):
    # its error bound is rigorous, and in the graph it costs a few hundred multiply-adds per entry
    # where panels cost tens of thousands of evaluations of f.
    last = series = _series_choice(f, dtype, rtol)
    if series.error <= rtol:
        return series
    panels = _errors(f, [QuadratureScheme("panels", n, breaks) for n in _LEGENDRE_COUNTS], grid, dtype)
    good = [c for c in panels if c.error <= rtol]
    if good:
        return good[0]
    last = panels[-1] if last is None or panels[-1].error < last.error else last
    reason = (
        "it has jumps or more kinks than the quadrature can split at"
        if kinks is None
        else f"it has kinks at {', '.join(f'{k:.6g}' for k in kinks)}"
        if kinks
        else "it is too steep"
    )
    return dataclasses.replace(last, reason=reason)


_CHECK_VARIANCES = (0.25, 1.0, 4.0, 16.0)


@functools.lru_cache(maxsize=None)
def _series_basis(terms: int) -> tuple[np.ndarray, np.ndarray]:
    """``(z, B)`` in float64: nodes and ``B[i, k] = r_i ψ_k(z_i)``, so ``a_k = Σ_i f(σ z_i) B[i, k]``."""
    z, r, root = _series_nodes(terms)
    psi = np.empty((terms, z.size))
    prev, cur = np.zeros_like(root), root
    for k in range(terms):
        psi[k] = cur
        prev, cur = cur, (z * cur - math.sqrt(k) * prev) / math.sqrt(k + 1)
    return z, (psi * r).T


def _series_choice(f, dtype, rtol) -> QuadratureScheme:
    """The shortest Hermite series whose truncation error is provably below ``rtol``.

    For ``|ρ| ≤ 1`` the tail of ``Σ_k a_k(q1) a_k(q2) ρ^k`` is at most ``Σ_{k ≥ K} |a_k(q1) a_k(q2)|``;
    relative to ``sqrt(E[f(u)²] E[f(v)²]) = sqrt(Σ a_k(q1)² Σ a_k(q2)²)`` this bounds the error of
    ``K`` terms at every correlation at once, for ``f`` and for ``f'``. The coefficients are computed
    once for the largest series, eagerly and in float64 from ``f`` evaluated in ``dtype`` (so the
    choice costs a few evaluations of ``f``, not a compilation); if even that series leaves more than
    ``rtol`` of the second moment (integrated on the same nodes) unexplained, the coefficients are
    not resolved (kinks, jumps, very steep ``f``) and panels are used instead.
    """
    terms = _SERIES_TERMS[-1]
    z, basis = _series_basis(terms)
    _, r, root = _series_nodes(terms)
    density = r * root  # Legendre weight × N(z)
    sig = np.sqrt(np.asarray(_CHECK_VARIANCES))[:, None]
    with jax.ensure_compile_time_eval():
        vals = [np.asarray(a, np.float64) for a in _value_and_slope(f, True)(jnp.asarray(sig * z, dtype))]
    worst = np.zeros(len(_SERIES_TERMS))
    for v in vals:
        a = v @ basis  # (variances, terms)
        second = (v * v) @ density  # E[f(σ z)²]
        scale = np.sqrt(np.outer(second, second)) + np.finfo(np.float64).tiny
        unexplained = np.max(np.abs(second - (a * a).sum(-1)) / (second + np.finfo(np.float64).tiny))
        mags = np.abs(a)
        # tails[K] = Σ_{k ≥ K} |a_k(q1)| |a_k(q2)| for every pair of check variances
        pair = mags[:, None, :] * mags[None, :, :]
        tails = np.cumsum(pair[..., ::-1], -1)[..., ::-1]
        for i, count in enumerate(_SERIES_TERMS):
            tail = tails[..., count] if count < terms else np.zeros_like(scale)
            worst[i] = max(worst[i], float(np.max(tail / scale)), float(unexplained))
    for count, err in zip(_SERIES_TERMS, worst):
        if err <= rtol:
            return QuadratureScheme("series", count, error=float(err))
    return QuadratureScheme("series", _SERIES_TERMS[-1], error=float(worst[-1]))


def _errors(f, family, grid, dtype) -> list:
    """Each rule of ``family`` but the last, with its ``error``: the largest change to the next rule."""

    def estimates(c, q1, q2):
        return [s.integrate(f, c, q1, q2, derivative=True, scan=False) for s in family], _scales(f, q1, q2, dtype)

    # One compiled program per family of rules, compiled and run apart from any trace in progress
    # so that its results are concrete (running the rules op by op is slower still).
    ests, scales = jax.tree_util.tree_map(np.asarray, jax.jit(estimates).lower(*grid).compile()(*grid))
    out = []
    for i in range(len(family) - 1):
        err = max(float(np.max(np.abs(ests[i][k] - ests[i + 1][k]) / scales[k])) for k in range(2))
        out.append(dataclasses.replace(family[i], error=err))
    return out


def _warn_inaccurate(scheme, rtol, label):
    import warnings

    where = f"{label}: " if label else ""
    warnings.warn(
        f"{where}the Gaussian expectations of this elementwise function have no closed form, and quadrature "
        f"did not reach the relative tolerance {rtol:g} on representative covariances (estimated error "
        f"{scheme.error:.1e}){'; ' + scheme.reason if scheme.reason else ''}; the kernel uses {scheme.kind} "
        f"quadrature with {scheme.n} nodes. Write the "
        "function with closed-form pieces (ReLU-like maxima at 0, erf, x·Φ(c·x), polynomials) or check the "
        "kernel against ntk_adapters.monte_carlo_kernel_fn",
        QuadratureWarning,
        stacklevel=4,
    )

"""Numerically safe pieces shared by the closed forms and the quadrature of elementwise kernels.

``(u, v) ~ N(0, [[q1, c], [c, q2]])`` throughout: :func:`_corr` turns ``(c, q1, q2)`` into
``(sqrt(q1 q2), ρ, both variances positive)``, :func:`_angle` and :func:`_arcsin` are the
arc functions of ``ρ`` with finite gradients at ``ρ = ±1``, and :func:`bvn_upper` is the bivariate
normal orthant probability ``P(X > h, Y > k)`` for standard normals with correlation ``ρ``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["bvn_upper", "norm_cdf", "norm_pdf"]


def _safe_sqrt(x: Array) -> Array:
    """``sqrt(max(x, 0))`` with a zero (not NaN) gradient at 0."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _corr(c: Array, q1: Array, q2: Array) -> tuple[Array, Array, Array]:
    """``(s, ρ, positive)`` with ``s = sqrt(q1 q2)``, ``ρ = c/s`` clipped; ``ρ = 0`` where ``s = 0``."""
    positive = (q1 > 0) & (q2 > 0)
    # sqrt(q1·q2) is exactly q when q1 = q2 = q (so a diagonal entry has ρ = 1 exactly, where
    # arccos/arcsin would turn a rounding error ε into sqrt(ε)); sqrt(q1)·sqrt(q2) only where the
    # product of two tiny variances would underflow.
    qq = q1 * q2
    normal = qq >= jnp.finfo(qq.dtype).tiny
    s = jnp.where(normal, _safe_sqrt(jnp.where(normal, qq, 1.0)), _safe_sqrt(q1) * _safe_sqrt(q2))
    s_safe = jnp.where(positive, s, 1.0)
    rho = jnp.where(positive, jnp.clip(c / s_safe, -1.0, 1.0), 0.0)
    return s, rho, positive


def _atan2(y: Array, x: Array) -> Array:
    """``atan2(y, x)`` for ``y ≥ 0`` (an angle in ``[0, π]``; ``x = −0`` counts as ``+0``) by one
    ``arctan`` of a ratio in ``[-1, 1]``.

    XLA expands ``atan2`` (and ``arccos``, ``arcsin``) into a polynomial plus the handling of every
    quadrant and special value, about three times the cost of ``arctan`` of a bounded ratio on a
    CPU; on a large kernel matrix this one function is most of a layer's time. The derivatives are
    those of ``atan2`` (each branch is a smooth formula for the angle, and the branches agree where
    they meet), and finite at ``(0, 0)``, where the value is 0.
    """
    steep = jnp.abs(x) < y
    den = jnp.where(steep, y, jnp.where(x == 0, 1.0, x))
    base = jnp.where(steep, jnp.pi / 2, jnp.where(x < 0, jnp.pi, 0.0))
    return base + jnp.arctan(jnp.where(steep, -x, y) / den)


def _angle(rho: Array) -> tuple[Array, Array]:
    """``(θ, sin θ)`` for ``θ = arccos ρ``, with finite gradients at ``ρ = ±1``.

    At ``|ρ| = 1`` the infinite derivatives of ``arccos`` and ``sqrt(1 − ρ²)`` cancel in every
    kernel below (e.g. ``d/dρ (sin θ − θ ρ) = −θ``); dropping both there gives the exact gradient.
    """
    inside = jnp.abs(rho) < 1.0
    r = jnp.where(inside, rho, 0.0)
    # (1 − r)(1 + r) rather than 1 − r²: exact differences, accurate as |r| → 1
    sin_t = jnp.where(inside, jnp.sqrt((1.0 - r) * (1.0 + r)), 0.0)
    theta = jnp.where(inside, _atan2(sin_t, r), jnp.where(rho > 0, 0.0, jnp.pi))
    return theta, sin_t


def _arcsin(rho: Array) -> Array:
    """``arcsin ρ`` on ``[-1, 1]`` with a finite (zero) gradient at ``ρ = ±1``."""
    inside = jnp.abs(rho) < 1.0
    r = jnp.where(inside, rho, 0.0)
    # arcsin r = arctan(r / sqrt(1 − r²)), the square root positive inside
    return jnp.where(inside, jnp.arctan(r / jnp.sqrt((1.0 - r) * (1.0 + r))), jnp.sign(rho) * jnp.pi / 2)


# ----------------------------------------------------------------------------------------------
# Univariate and bivariate normal probabilities.


def norm_cdf(x: Array) -> Array:
    """``Φ(x)``, accurate in both tails (``erfc`` based)."""
    return jax.scipy.special.ndtr(x)


def norm_pdf(x: Array) -> Array:
    """``φ(x) = exp(−x²/2) / sqrt(2π)``."""
    return jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _legendre_half(n: int):
    x, w = np.polynomial.legendre.leggauss(n)
    return x, w


_GL20 = _legendre_half(20)
_RHO_SWITCH = 0.925  # below: the arcsine form; above: the form around ρ = ±1 (Drezner & Wesolowsky)


def bvn_upper(h: Array, k: Array, rho: Array) -> Array:
    """``P(X > h, Y > k)`` for standard normals ``X``, ``Y`` with correlation ``ρ`` (broadcast).

    The method of Drezner & Wesolowsky (J. Statist. Comput. Simul. 35, 1990) in the form of Genz
    ("Numerical computation of rectangular bivariate and trivariate normal and t probabilities",
    Statistics and Computing 14, 2004), with a fixed 20-point Gauss–Legendre rule, accurate to
    ~1e-15 in float64:

    * ``|ρ| < 0.925``: ``Φ(−h)Φ(−k) + (1/2π) ∫_0^{arcsin ρ} exp(−(h² + k² − 2hk sin t) / (2cos² t)) dt``
      (Sheppard's formula integrated along ``ρ``);
    * ``|ρ| ≥ 0.925``: for ``ρ > 0``, ``Φ(−max(h, k)) − (1/2π) ∫_0^{sqrt(1−ρ²)} e^{−(h−k)²/(2x²) −
      hk/(1+sqrt(1−x²))} / sqrt(1−x²) dx`` (Plackett's ``∂P/∂ρ = φ2`` with ``x = sqrt(1 − r²)``),
      whose sharp factor ``e^{−(h−k)²/(2x²)}`` times the second-order expansion of the rest is
      integrated exactly and only the smooth remainder numerically; ``ρ < 0`` by ``Y → −Y``;
    * ``|ρ| = 1``: ``Φ(−max(h, k))`` and ``max(0, Φ(−h) − Φ(k))``.

    ``jnp.where`` guards keep values and gradients finite at ``|ρ| = 1``.

    Example::

        bvn_upper(0.0, 0.0, 0.5)  # 1/4 + arcsin(0.5)/(2π) = 1/3
    """
    h, k, rho = jnp.broadcast_arrays(*(jnp.asarray(a) for a in (h, k, rho)))
    dtype = jnp.result_type(h, k, rho, float)
    h, k, rho = h.astype(dtype), k.astype(dtype), rho.astype(dtype)
    x, w = (jnp.asarray(a, dtype) for a in _GL20)
    two_pi = 2 * math.pi

    # Low correlation: t = arcsin(ρ)(x + 1)/2 on the 20 nodes.
    low = jnp.abs(rho) < _RHO_SWITCH
    r_low = jnp.where(low, rho, 0.0)
    asr = jnp.arcsin(r_low)
    sn = jnp.sin(asr[..., None] * (x + 1) / 2)
    hk, hs = (h * k)[..., None], ((h * h + k * k) / 2)[..., None]
    lowval = (w * jnp.exp((sn * hk - hs) / (1 - sn * sn))).sum(-1) * asr / (2 * two_pi)

    # High correlation, reduced to ρ > 0 by Y -> -Y.
    neg = rho < 0
    kk = jnp.where(neg, -k, k)
    hkp = h * kk
    inside = (jnp.abs(rho) < 1) & ~low
    r_hi = jnp.where(inside, jnp.abs(rho), 0.5)
    a_s = (1 - r_hi) * (1 + r_hi)
    a = jnp.sqrt(a_s)
    bs = (h - kk) ** 2
    b = jnp.abs(h - kk)  # not sqrt(bs): a finite gradient at h = k
    # Every Φ below in one call: each expands to a few hundred operations (erfc), and compile time
    # grows with the graph. The ρ < 0 gap P(h < X < k) is Φ(hi) − Φ(lo), taken in the tail where
    # it does not cancel.
    left = h < 0
    cdf = norm_cdf(jnp.stack([-h, -k, -b / a, -jnp.maximum(h, kk), jnp.where(left, h, -kk), jnp.where(left, kk, -h)]))
    lowval = lowval + cdf[0] * cdf[1]

    c = (4 - hkp) / 8
    d = (12 - hkp) / 16
    # ∫_0^a e^{−bs/(2x²)} e^{−hk/2} (1 + c x² + c d x⁴) dx in closed form ...
    exact = a * jnp.exp(-(bs / a_s + hkp) / 2) * (1 - c * (bs - a_s) * (1 - d * bs / 5) / 3 + c * d * a_s * a_s / 5)
    tail_ok = hkp > -160
    hk_safe = jnp.where(tail_ok, hkp, 0.0)
    exact = exact - jnp.where(
        tail_ok,
        jnp.exp(-hk_safe / 2) * math.sqrt(two_pi) * cdf[2] * b * (1 - c * bs * (1 - d * bs / 5) / 3),
        0.0,
    )
    # ... and the smooth remainder on 20 nodes of [0, a].
    xs = (a[..., None] / 2 * (x + 1)) ** 2
    rs = jnp.sqrt(1 - xs)
    bse, hke, ce, de = bs[..., None], hkp[..., None], c[..., None], d[..., None]
    rest = (
        (
            w
            * (
                jnp.exp(-bse / (2 * xs) - hke / (1 + rs)) / rs
                - jnp.exp(-(bse / xs + hke) / 2) * (1 + ce * xs * (1 + de * xs))
            )
        ).sum(-1)
        * a
        / 2
    )
    integral = (exact + rest) / two_pi  # ∫_{|ρ|}^1 φ2(h, ±k; r) dr
    integral = jnp.where(inside, integral, 0.0)
    upper_pos = cdf[3] - integral
    # ρ < 0: P(X > h, Y > k) = P(X > h) − P(X > h, −Y > −k) with −Y of correlation |ρ|.
    gap = cdf[5] - cdf[4]
    upper_neg = integral + jnp.where(kk > h, gap, 0.0)
    highval = jnp.where(neg, upper_neg, upper_pos)
    return jnp.clip(jnp.where(low, lowval, highval), 0.0, 1.0)

"""The kernels of the commonest members of the closed-form family, with the fewest array operations.

:func:`ntk_adapters.infinite.form_kernels.form_expectations` handles every member of the family
term by term; on a large kernel matrix each of its operations is a pass over memory, and XLA can
recompute an expensive intermediate (an ``atan2``) once per consumer. Two members dominate real
models and have short closed forms, used instead whenever a form is one of them:

* **piecewise linear through the origin**, ``f(x) = p·x`` for ``x > 0`` and ``n·x`` for ``x < 0``
  (ReLU, leaky ReLU, abs, PReLU-like slopes). With ``f = A x + B |x|``, ``A = (p + n)/2``,
  ``B = (p − n)/2``, ``y = sqrt(q1 q2 − c²)`` and ``θ = atan2(y, c)`` (the angle between the two
  Gaussians, ``arccos ρ`` without forming ``ρ``; :func:`~ntk_adapters.infinite.bivariate._atan2`)::

      E[f(u) f(v)]   = A² c + B² (2y/π + c (1 − 2θ/π))          (E[u|v|] = 0, E|u||v| = 4 J1 − c)
      E[f'(u) f'(v)] = (p² + n²) (π − θ)/(2π) + 2 p n θ/(2π)

  ``J1 = (y + (π − θ) c)/(2π)`` is Cho & Saul's first arc-cosine kernel.
* **a scaled error function**, ``f(x) = α (2Φ(b x) − 1) = α erf(b x/√2)``, with
  ``d_i = 1 + b² q_i`` (Williams, "Computing with infinite networks", 1997)::

      E[f(u) f(v)]   = α² (2/π) arcsin(b² c / sqrt(d1 d2)) = α² (2/π) arctan(b² c / sqrt(d1 d2 − b⁴ c²))
      E[f'(u) f'(v)] = α² (2b²/π) / sqrt(d1 d2 − b⁴ c²)

Where a variance is zero the value is the constant 0 and the expectations factor, as in
:func:`~ntk_adapters.infinite.form_kernels.form_expectations`.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from ntk_adapters.infinite import forms as _forms
from ntk_adapters.infinite.bivariate import _atan2

Array = jax.Array

__all__ = ["common_expectations", "erf_kernels", "piecewise_linear_kernels"]


def _slopes(form: _forms.Form) -> Optional[tuple[float, float]]:
    """``(p, n)`` when ``form`` is ``p·x`` on ``x > 0`` and ``n·x`` on ``x < 0``, else ``None``."""
    p = n = 0.0
    for t in form.terms:
        if t.power != 1 or t.phi is not None or t.decay != 0.0:
            return None
        if t.step >= 0:
            p += t.coef
        if t.step <= 0:
            n += t.coef
    return p, n


def _scaled_erf(form: _forms.Form) -> Optional[tuple[float, float]]:
    """``(α, b)`` when ``form`` is ``α (2Φ(b x) − 1)``, else ``None``."""
    if len(form.terms) != 2:
        return None
    by_kind = {t.phi is None: t for t in form.terms}
    if len(by_kind) != 2:
        return None
    phi, const = by_kind[False], by_kind[True]
    if any(t.power or t.step or t.decay for t in (phi, const)) or phi.coef != -2.0 * const.coef:
        return None
    return -const.coef, float(phi.phi)


def piecewise_linear_kernels(p, n, slope_at_zero, c, q1, q2, derivative=True):
    """The kernels of ``f(x) = p·x`` (``x > 0``), ``n·x`` (``x < 0``); ``slope_at_zero`` is
    ``f'(0)`` as JAX computes it (it matters only for a zero variance)."""
    positive = (q1 > 0) & (q2 > 0)
    # A zero variance (then c = 0 too) gives a finite angle with finite derivatives (s and y are floored
    # at the smallest normal number, bivariate._atan2 is finite at the origin); it is masked below.
    # y² = (s − c)(s + c) with s = sqrt(q1 q2), not q1 q2 − c²: at unit correlation s − c is exact
    # (s is exactly q when q1 = q2 = q), where q1 q2 − c² would keep the rounding of c², or of an
    # FMA the compiler forms, and turn it into an angle of sqrt(ε). The max with the smallest
    # normal number gives a zero (not infinite) derivative at ρ = ±1, where the infinite
    # derivatives of y and θ cancel, and fuses where a select on y² > 0 would be recomputed.
    tiny = jnp.finfo(jnp.result_type(c, q1, q2)).tiny
    s = jnp.sqrt(jnp.maximum(q1 * q2, tiny))  # finite derivatives at a zero variance
    y = jnp.sqrt(jnp.maximum((s - c) * (s + c), tiny))
    theta = _atan2(y, c)
    a, b = (p + n) / 2, (p - n) / 2
    nngp = a * a * c + b * b * (y * (2 / math.pi) + c * (1 - theta * (2 / math.pi)))
    nngp = jnp.where(positive, nngp, 0.0)
    if not derivative:
        return nngp, None
    dd = (p * p + n * n) / 2 + (p - n) ** 2 * -theta / (2 * math.pi)
    mean = (p + n) / 2  # E f'(w) for a variance > 0
    m1 = jnp.where(q1 > 0, mean, slope_at_zero)
    m2 = jnp.where(q2 > 0, mean, slope_at_zero)
    return nngp, jnp.where(positive, dd, m1 * m2)


def erf_kernels(alpha, b, c, q1, q2, derivative=True):
    """The kernels of ``f(x) = α (2Φ(b x) − 1) = α erf(b x/√2)``."""
    b2 = b * b
    d1, d2 = 1 + b2 * jnp.maximum(q1, 0.0), 1 + b2 * jnp.maximum(q2, 0.0)
    # d1 d2 − b⁴ c² = 1 + b²(q1 + q2) + b⁴ (q1 q2 − c²) ≥ 1, and arcsin(a/√(d1 d2)) = arctan(a/√(d1 d2 − a²))
    # for a = b² c: one arctan (no clipping, no arcsin expanded around it) and one rsqrt for both kernels.
    inv = jax.lax.rsqrt(jnp.maximum(d1 * d2 - b2 * b2 * c * c, 1.0))
    nngp = (alpha * alpha * 2 / math.pi) * jnp.arctan(b2 * c * inv)
    if not derivative:
        return nngp, None
    return nngp, (alpha * alpha * 2 * b2 / math.pi) * inv


def common_expectations(
    form: _forms.Form, c: Array, q1: Array, q2: Array, derivative: bool
) -> Optional[tuple[Array, Optional[Array]]]:
    """``(E[f(u) f(v)], E[f'(u) f'(v)])`` by the short closed forms above, or ``None`` when ``form``
    is neither piecewise linear through the origin nor a scaled error function."""
    if form.at_zero != 0.0:
        return None
    slopes = _slopes(form)
    if slopes is not None:
        return piecewise_linear_kernels(*slopes, form.slope_at_zero, c, q1, q2, derivative)
    erf = _scaled_erf(form)
    if erf is not None:
        return erf_kernels(*erf, c, q1, q2, derivative)
    return None

"""Gaussian expectations of elementwise nonlinearities: the infinite-width kernel of ``phi``.

At infinite width, a channel ``u`` of a hidden layer evaluated on two inputs is a zero-mean
Gaussian pair ``(u, v) ~ N(0, [[q1, c], [c, q2]])``, where ``c`` is the NNGP between the two
inputs and ``q1``, ``q2`` their variances. An elementwise nonlinearity ``phi`` maps the kernel to

* ``nngp  ← E[phi(u) phi(v)]``          (the second moment the next random linear layer sees),
* ``ntk   ← E[phi'(u) phi'(v)] · ntk``  (the chain rule, averaged over the infinitely many channels),
* ``q     ← E[phi(u)²]``                (the new per-input variances).

``phi(u)`` is not zero-mean in general (e.g. ReLU). That is fine: a following linear layer with
zero-mean weights sees exactly the *uncentred* second moment ``E[phi(u) phi(v)]``, which is what
is computed here; the output is marked ``is_gaussian=False`` because it is no longer a zero-mean
Gaussian process and a second nonlinearity cannot be applied to it before another linear layer.

``phi`` is handled in this order (``method='auto'``):

1. **Named closed forms** (``gaussian_expectations("relu", ...)``; derived by hand;
   ``s = sqrt(q1 q2)``, ``ρ = c / s`` clipped to ``[-1, 1]``, ``θ = arccos ρ``):

==================  ===========================================  ==========================================
``phi``             ``E[phi(u) phi(v)]``                         ``E[phi'(u) phi'(v)]``
==================  ===========================================  ==========================================
``identity``        ``c``                                        ``1``
``affine`` a·x+b    ``a² c + b²``                                ``a²``
``relu``            ``s (sin θ + (π − θ) cos θ) / (2π)``  (J1)   ``(π − θ) / (2π)``  (J0)
``leaky_relu`` α    ``α c + (1 − α)² J1``                        ``α + (1 − α)² J0``
``abs``             ``4 J1 − c``                                 ``(2/π) arcsin ρ``
``sign``            ``(2/π) arcsin ρ``                           ``0`` (zero almost everywhere)
``erf`` erf(a·x)    ``(2/π) arcsin(2a²c / sqrt((1+2a²q1)(1+2a²q2)))``  ``(4a²/π) / sqrt((1+2a²q1)(1+2a²q2) − 4a⁴c²)``
``sin`` sin(a·x+b)  ``½ (e^{−a²(q1+q2−2c)/2} − cos 2b · e^{−a²(q1+q2+2c)/2})``  ``a²`` × the same with ``b + π/2``
``cos`` cos(a·x+b)  ``sin`` with ``b + π/2``                     ``a²`` × ``sin`` with ``b + π``
``exp`` exp(a·x)    ``e^{a²(q1+q2+2c)/2}``                       ``a²`` × the same
``square`` x²       ``q1 q2 + 2c²``                              ``4c``
==================  ===========================================  ==========================================

   (``E[u relu(v)] = c/2`` by the symmetry ``(u, v) → (−u, −v)``, which gives the leaky ReLU and
   ``abs = 2 relu(x) − x`` rows from the ReLU row; ``sin``/``cos`` follow from
   ``sin A sin B = ½(cos(A−B) − cos(A+B))`` and ``E cos(w) = e^{−Var(w)/2}``; ``erf`` is the classic
   Williams (1997) integral.) ``sign`` has derivative zero almost everywhere, so it contributes
   nothing to the NTK of the layers before it: ``ntk ← 0``.

2. **The closed-form family** (:func:`form_expectations`): any function — a callable, the names
   ``gelu`` (``approximate=False``), or a chain of primitives written between modules — that
   :func:`ntk_adapters.infinite.forms.analyze` reads as a sum of terms
   ``x^m · I(x) · exp(−d x²/2)``, ``I`` one of ``1``, ``1{±x > 0}``, ``Φ(a x)``: every
   piecewise-linear function with its break at 0 (``a·max(x,0) + b·min(x,0) + c·x + d``: ReLU,
   leaky ReLU, ABReLU, abs, their scalings and shifts), rectified monomials ``(x ≥ 0)·x^k``,
   polynomials, step and sign, ``erf(a x)``, exact GELU ``x Φ(x)`` and ``x Φ(c x)``
   (``jax.nn.gelu(x, approximate=False)``, ``0.5 x erfc(−x/√2)``, ``x·norm.cdf(c x)``), Gaussians.
   Per pair of terms:

   * steps and polynomials: ``E[ũ^j 1{aũ>0} ṽ^k 1{bṽ>0}] = a^j b^k M_jk(abρ)`` for standardized
     ``ũ, ṽ``, with ``M_jk`` from Stein's lemma (:class:`_Orthant`); ``M_nn`` are Cho & Saul's
     arc-cosine kernels (NeurIPS 2009), ``M_00 = (π − θ)/(2π)``;
   * ``Φ(a u) = P(Z < a u)`` with an independent ``Z``: the indicator of a Gaussian ``a u − Z``;
     moments of Gaussians times at most two indicators follow from Stein's lemma, the deltas of
     the indicators (conditioning on the indicator's variable being 0) and Sheppard's orthant
     probability ``1/4 + arcsin(r)/(2π)`` (:func:`_gaussian_moment`). For ``x Φ(x)`` this gives
     the GELU kernel of Tsuchida, Pearce, van der Heide, Roosta & Gallagher ("Avoiding kernel
     fixed points: computing with ELU and GELU infinite networks", AAAI 2021);
   * a Gaussian factor reweights the bivariate normal (``Σ' = (Σ⁻¹ + D)⁻¹``, :func:`_general_pair`).

   ``phi'`` is the family's own derivative (``Φ(a x)' = a N(a x)``, the jumps of steps carry
   none, as in JAX). Measured against an independent float64 product-rule integration (errors
   relative to ``sqrt(E[phi(u)²] E[phi(v)²])``, variances 0.01–25, ``ρ`` in ``[−1, 1]`` including
   ``±1`` and ``0.99999``): below 1e-14 for every function above
   (``tests/infinite/test_elementwise_exact.py``).

3. **Quadrature** for everything else (``tanh``, tanh-approximate ``gelu``, ``silu``,
   ``x·sigmoid(c x)``, ``softplus``, ``hard_tanh``/``clip``, ``relu6``, ``elu``, user functions),
   with ``phi'`` by forward-mode differentiation (``jax.jvp``) of ``phi`` and the input with the
   larger variance integrated outermost (exactly symmetric kernels).
   :func:`quadrature_scheme` chooses the rule once per function, at trace time, for relative
   accuracy ``rtol`` (default 1e-6) on representative covariances: 2-D Gauss–Hermite
   (``E[f(u) f(v)] ≈ Σ_ij w_i w_j f(σ1 z_i) f(σ2 (ρ z_i + sqrt(1 − ρ²) z_j))``) with 32 or 64 nodes
   for smooth functions, else Gauss–Legendre panels split at the function's kinks
   (:func:`~ntk_adapters.infinite.forms.find_kinks`, :func:`_piecewise_quadrature`), and a
   :class:`QuadratureWarning` naming the layer when neither reaches ``rtol`` (jumps on a lattice,
   more than 16 kinks). Measured errors (same reference, scale and covariances as above):
   ``tanh`` 8e-11, tanh-GELU 4e-11, ``x·sigmoid(1.702 x)`` 4e-12, ``hard_tanh`` 7e-9 (each with 8
   nodes per panel).

   Plain Gauss–Hermite (``rtol=None``: exactly ``n_points × n_points`` nodes) is exact for
   polynomials up to degree ``2n − 1`` in each variable and converges exponentially for smooth
   ``phi`` of moderate variance, but only algebraically for ``phi`` with a kink. Measured absolute
   errors with ``n_points=32`` (float64, ``q1 = q2 = 1``; ``E[phi phi]`` / ``E[phi' phi']``;
   reproduced by ``tests/infinite/test_elementwise.py::test_quadrature_accuracy_table``):

=========  ===================  ===================  ===================
``phi``    ``ρ = 0.3``          ``ρ = 0.99``         ``ρ = −0.999``
=========  ===================  ===================  ===================
sin        1e-16 / 1e-16        2e-16 / 1e-16        1e-16 / 1e-16
erf        3e-11 / 3e-10        8e-8 / 2e-6          1e-7 / 2e-6
relu       1.5e-3 / 2.0e-2      8e-5 / 1.3e-2        5e-6 / 7e-3
=========  ===================  ===================  ===================

   (with ``n_points=64`` erf is at 1e-13 / 5e-12 and relu at 9e-4 / 1.4e-2), which is why kinked
   functions are integrated on panels split at their kinks.

When a variance is zero the corresponding value is the constant ``0``, so the expectation factors:
``E[phi(0) phi(v)] = phi(0) E[phi(v)]``; the same holds for the derivative, with ``phi'(0)`` taken
as JAX defines it (``relu'(0) = 0``, ``leaky_relu'(0) = 1``, ``sign(0) = 0``). All formulas are
written with ``jnp.where`` guards so that no NaN appears there, under ``jit`` too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import forms as _forms
from ntk_adapters.infinite.kernel import Kernel

Array = jax.Array
Phi = Union[str, Callable[[Array], Array]]
PhiLike = Union[str, Callable[[Array], Array], _forms.Form]

__all__ = [
    "CLOSED_FORMS",
    "DEFAULT_QUADRATURE_POINTS",
    "DEFAULT_RTOL",
    "QUADRATURE_NAMES",
    "QuadratureScheme",
    "QuadratureWarning",
    "apply_elementwise",
    "elementwise_fn",
    "form_expectations",
    "gaussian_expectations",
    "gaussian_variance",
    "has_closed_form",
    "quadrature_scheme",
    "recognise",
]


# ----------------------------------------------------------------------------------------------
# Small numerically safe helpers.


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


def _factor_if_degenerate(value, positive, q1, q2, mean_pos, at_zero):
    """Where one variance is zero, replace ``value`` by ``E[f(u)] E[f(v)]``.

    ``mean_pos`` is ``E[f(w)]`` for ``w`` with positive variance and ``at_zero`` is ``f(0)``.
    """
    m1 = jnp.where(q1 > 0, mean_pos, at_zero)
    m2 = jnp.where(q2 > 0, mean_pos, at_zero)
    return jnp.where(positive, value, m1 * m2)


def _angle(rho: Array) -> tuple[Array, Array]:
    """``(θ, sin θ)`` for ``θ = arccos ρ``, with finite gradients at ``ρ = ±1``.

    At ``|ρ| = 1`` the infinite derivatives of ``arccos`` and ``sqrt(1 − ρ²)`` cancel in every
    kernel below (e.g. ``d/dρ (sin θ − θ ρ) = −θ``); dropping both there gives the exact gradient.
    """
    inside = jnp.abs(rho) < 1.0
    r = jnp.where(inside, rho, 0.0)
    theta = jnp.where(inside, jnp.arccos(r), jnp.where(rho > 0, 0.0, jnp.pi))
    sin_t = jnp.where(inside, jnp.sqrt(1.0 - r * r), 0.0)
    return theta, sin_t


def _arccos_terms(c, q1, q2):
    s, rho, positive = _corr(c, q1, q2)
    theta, sin_t = _angle(rho)
    j1 = s * (sin_t + (jnp.pi - theta) * rho) / (2 * jnp.pi)
    j0 = (jnp.pi - theta) / (2 * jnp.pi)
    return s, rho, positive, j1, j0


def _arcsin(rho: Array) -> Array:
    """``arcsin ρ`` on ``[-1, 1]`` with a finite (zero) gradient at ``ρ = ±1``."""
    inside = jnp.abs(rho) < 1.0
    return jnp.where(inside, jnp.arcsin(jnp.where(inside, rho, 0.0)), jnp.sign(rho) * jnp.pi / 2)


# ----------------------------------------------------------------------------------------------
# Closed forms: each returns (E[phi(u)phi(v)], E[phi'(u)phi'(v)]) for broadcastable c, q1, q2.


def _cf_affine(c, q1, q2, a=1.0, b=0.0):
    nngp = a * a * c + b * b
    return nngp, jnp.full_like(nngp, a * a)


def _cf_identity(c, q1, q2):
    return _cf_affine(c, q1, q2)


def _cf_relu(c, q1, q2):
    _, _, positive, j1, j0 = _arccos_terms(c, q1, q2)
    nngp = jnp.where(positive, j1, 0.0)
    dd = _factor_if_degenerate(j0, positive, q1, q2, 0.5, 0.0)
    return nngp, dd


def _cf_leaky_relu(c, q1, q2, negative_slope=0.01):
    al = negative_slope
    _, _, positive, j1, j0 = _arccos_terms(c, q1, q2)
    nngp = jnp.where(positive, al * c + (1 - al) ** 2 * j1, 0.0)
    dd = _factor_if_degenerate(al + (1 - al) ** 2 * j0, positive, q1, q2, (1 + al) / 2, 1.0)
    return nngp, dd


def _cf_abs(c, q1, q2):
    _, rho, positive, j1, _ = _arccos_terms(c, q1, q2)
    nngp = jnp.where(positive, 4 * j1 - c, 0.0)
    dd = jnp.where(positive, (2 / jnp.pi) * _arcsin(rho), 0.0)
    return nngp, dd


def _cf_sign(c, q1, q2):
    _, rho, positive = _corr(c, q1, q2)
    nngp = jnp.where(positive, (2 / jnp.pi) * _arcsin(rho), 0.0)
    return nngp, jnp.zeros_like(nngp)


def _cf_erf(c, q1, q2, a=1.0):
    a2 = a * a
    d1 = 1 + 2 * a2 * jnp.maximum(q1, 0.0)
    d2 = 1 + 2 * a2 * jnp.maximum(q2, 0.0)
    s, _, _ = _corr(c, q1, q2)
    c = jnp.clip(c, -s, s)
    nngp = (2 / jnp.pi) * jnp.arcsin(jnp.clip(2 * a2 * c / jnp.sqrt(d1 * d2), -1.0, 1.0))
    det = jnp.maximum(d1 * d2 - 4 * a2 * a2 * c * c, 1.0)
    dd = (4 * a2 / jnp.pi) / jnp.sqrt(det)
    return nngp, dd


def _sin_moment(c, q1, q2, a, b):
    a2 = a * a
    return 0.5 * (jnp.exp(-a2 * (q1 + q2 - 2 * c) / 2) - jnp.cos(2 * b) * jnp.exp(-a2 * (q1 + q2 + 2 * c) / 2))


def _cf_sin(c, q1, q2, a=1.0, b=0.0):
    return _sin_moment(c, q1, q2, a, b), a * a * _sin_moment(c, q1, q2, a, b + jnp.pi / 2)


def _cf_cos(c, q1, q2, a=1.0, b=0.0):
    return _cf_sin(c, q1, q2, a, b + jnp.pi / 2)


def _cf_exp(c, q1, q2, a=1.0):
    nngp = jnp.exp(a * a * (q1 + q2 + 2 * c) / 2)
    return nngp, a * a * nngp


def _cf_square(c, q1, q2):
    return q1 * q2 + 2 * c * c, 4 * c


# ----------------------------------------------------------------------------------------------
# The functions themselves (for quadrature, tests and the engine's pattern matching).


@dataclasses.dataclass(frozen=True)
class _Spec:
    fn: Callable[..., Array]  # fn(x, **params)
    closed_form: Optional[Callable[..., tuple[Array, Array]]]
    linear: bool = False  # phi(x) = a x: a zero-mean GP stays one


def _sign(x):
    return jnp.sign(x)


_SPECS: dict[str, _Spec] = {
    "identity": _Spec(lambda x: x, _cf_identity, linear=True),
    "affine": _Spec(lambda x, a=1.0, b=0.0: a * x + b, _cf_affine, linear=True),
    "relu": _Spec(jax.nn.relu, _cf_relu),
    "leaky_relu": _Spec(lambda x, negative_slope=0.01: jax.nn.leaky_relu(x, negative_slope), _cf_leaky_relu),
    "abs": _Spec(jnp.abs, _cf_abs),
    "sign": _Spec(_sign, _cf_sign),
    "erf": _Spec(lambda x, a=1.0: jax.scipy.special.erf(a * x), _cf_erf),
    "sin": _Spec(lambda x, a=1.0, b=0.0: jnp.sin(a * x + b), _cf_sin),
    "cos": _Spec(lambda x, a=1.0, b=0.0: jnp.cos(a * x + b), _cf_cos),
    "exp": _Spec(lambda x, a=1.0: jnp.exp(a * x), _cf_exp),
    "square": _Spec(jnp.square, _cf_square),
    # No closed form: quadrature of the very function Flax / Haiku / jax.nn use.
    "tanh": _Spec(jnp.tanh, None),
    "sigmoid": _Spec(jax.nn.sigmoid, None),
    "softplus": _Spec(jax.nn.softplus, None),
    "gelu": _Spec(lambda x, approximate=True: jax.nn.gelu(x, approximate=approximate), None),
    "silu": _Spec(jax.nn.silu, None),
    "swish": _Spec(jax.nn.silu, None),
    "elu": _Spec(lambda x, alpha=1.0: jax.nn.elu(x, alpha), None),
    "selu": _Spec(jax.nn.selu, None),
    "celu": _Spec(lambda x, alpha=1.0: jax.nn.celu(x, alpha), None),
    "softsign": _Spec(jax.nn.soft_sign, None),
    "relu6": _Spec(jax.nn.relu6, None),
    "hard_tanh": _Spec(jax.nn.hard_tanh, None),
    "log_sigmoid": _Spec(jax.nn.log_sigmoid, None),
    "mish": _Spec(lambda x: x * jnp.tanh(jax.nn.softplus(x)), None),
}

#: Names with a closed-form kernel.
CLOSED_FORMS: tuple[str, ...] = tuple(k for k, v in _SPECS.items() if v.closed_form is not None)
#: Names computed by Gauss–Hermite quadrature of the named ``jax.nn`` / ``jnp`` function.
QUADRATURE_NAMES: tuple[str, ...] = tuple(k for k, v in _SPECS.items() if v.closed_form is None)


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown elementwise function {name!r}; known names: {sorted(_SPECS)}. "
            "Pass the function itself (a jnp-traceable callable) to use quadrature."
        ) from None


def _check_params(name: str, fn: Callable, params: dict) -> None:
    import inspect

    allowed = [p for p in inspect.signature(fn).parameters][1:]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"elementwise function {name!r} takes parameters {allowed}; got unknown {unknown}")


def has_closed_form(phi: Phi) -> bool:
    """Whether ``phi`` (a name) has a closed-form kernel; callables never do."""
    return isinstance(phi, str) and _spec(phi).closed_form is not None


def elementwise_fn(phi: Phi, **params: Any) -> Callable[[Array], Array]:
    """The elementwise function ``x -> phi(x; **params)`` itself.

    Example::

        f = elementwise_fn("leaky_relu", negative_slope=0.2)
        f(jnp.array([-1.0, 2.0]))  # [-0.2, 2.0]
    """
    if isinstance(phi, str):
        spec = _spec(phi)
        _check_params(phi, spec.fn, params)
        return functools.partial(spec.fn, **params) if params else spec.fn
    if not callable(phi):
        raise TypeError(f"phi must be a name or a callable; got {type(phi).__name__}")
    return functools.partial(phi, **params) if params else phi



# ----------------------------------------------------------------------------------------------
# Closed forms of the family of :mod:`ntk_adapters.infinite.forms`: sums of terms
# ``x^m · I(x) · exp(−d x²/2)`` with ``I`` one of ``1``, ``1{±x > 0}``, ``Φ(a x)``.

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
        return 1.0 if k == 0 else self.s ** k

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


def _piecewise_polynomial_pair(f: _forms.Form, g: _forms.Form, orth: _Orthant, s1, s2) -> Array:
    """``E[f(u) g(v)]`` for piecewise polynomials: with ``u = σ1 ũ`` and the reflection
    ``(ũ, ṽ) → (−ũ, ṽ)`` (correlation ``−ρ``), ``E[ũ^j 1{aũ>0} ṽ^k 1{bṽ>0}] = a^j b^k M_jk(abρ)``."""
    fp, fn = _sides(f)
    gp, gn = _sides(g)
    total = 0.0
    for a, fa in ((1, fp), (-1, fn)):
        for j, cj in fa.items():
            for b, gb in ((1, gp), (-1, gn)):
                for k, ck in gb.items():
                    coef = cj * ck * (a ** j) * (b ** k)
                    total = total + coef * orth(j, k, a * b) * _pow(s1, j) * _pow(s2, k)
    return total


def _pow(x, k):
    return 1.0 if k == 0 else x ** k


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


def _gaussian_moment(m: int, n: int, inds: tuple, cov: _Cov, cache: dict, state: tuple) -> Array:
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


def _general_pair(t1: _forms.Term, t2: _forms.Term, q1, q2, c, delta) -> Array:
    """``E[t1(u) t2(v)]`` without the coefficients, for terms with ``Φ`` or Gaussian factors.

    A Gaussian factor reweights the density: ``E[h(u, v) e^{−(d1 u² + d2 v²)/2}] = E'[h] / sqrt(Δ)``
    with ``Δ = det(I + Σ D) = 1 + d1 q1 + d2 q2 + d1 d2 δ`` (``δ = q1 q2 − c²``) and
    ``Σ' = (Σ⁻¹ + D)⁻¹ = [[q1 + d2 δ, c], [c, q2 + d1 δ]] / Δ``. ``Φ(a u) = P(Z < a u)`` with an
    independent ``Z ~ N(0, 1)`` is the indicator of ``A = a u − Z``, jointly Gaussian with ``(u, v)``;
    a step ``1{s u > 0}`` is the indicator of ``s u``.
    """
    d1, d2 = t1.decay, t2.decay
    factor = 1.0
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


def _form_pair(f: _forms.Form, g: _forms.Form, q1, q2, c, rho, sin_t, theta, s1, s2) -> Array:
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


def form_expectations(form: _forms.Form, c: Array, q1: Array, q2: Array, derivative: bool = True
                      ) -> tuple[Array, Optional[Array]]:
    """``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` in closed form for a :class:`~ntk_adapters.infinite.forms.Form`.

    Where a variance is zero that value is the constant 0 and the expectation factors,
    ``phi(0) E[phi(v)]``, with ``phi(0)`` and ``phi'(0)`` as JAX computes them.
    """
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


# ----------------------------------------------------------------------------------------------
# Quadrature.

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


def _quadrature(f: Callable, c: Array, q1: Array, q2: Array, n: int, derivative: bool, scan: bool = True
                ) -> tuple[Array, Optional[Array]]:
    """``E[f(u) f(v)]`` (and ``E[f'(u) f'(v)]``) by ``n × n`` Gauss–Hermite quadrature.

    ``u = σa z1``, ``v = σb (ρ z1 + sqrt(1 − ρ²) z2)`` (Cholesky). ``c``, ``q1``, ``q2`` share one
    shape. With ``derivative`` each node evaluates ``f`` and ``f'`` together in one forward-mode pass.
    """
    nodes, weights = _hermite(n)
    dtype = c.dtype
    nodes, weights = jnp.asarray(nodes, dtype), jnp.asarray(weights, dtype)
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


def _hermite_series(f: Callable, c: Array, q1: Array, q2: Array, terms: int, derivative: bool, scan: bool = True
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


def _piecewise_quadrature(f: Callable, c: Array, q1: Array, q2: Array, kinks: tuple, n: int, derivative: bool,
                          scan: bool = True) -> tuple[Array, Optional[Array]]:
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
        inner_e = edges(zb[None], (xb / sb_safe[..., None, None] - rho[..., None, None] * z[..., None])
                        / s_safe[..., None, None])
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


def quadrature_scheme(f: Callable, dtype=None, *, n_points: int = DEFAULT_QUADRATURE_POINTS,
                      rtol: float = DEFAULT_RTOL, label: Optional[str] = None) -> QuadratureScheme:
    """Choose, once and concretely (at trace time), how to integrate ``f`` to relative accuracy ``rtol``.

    The rule is chosen on representative covariances (variances 0.25, 1 and 4, correlations
    −0.999 … 1; :func:`_check_grid`), where ``E[f(u) f(v)]`` and ``E[f'(u) f'(v)]`` are compared
    between successive rules, relative to ``sqrt(E[f(u)²] E[f(v)²])``:

    1. ``f`` without kinks (:func:`~ntk_adapters.infinite.forms.find_kinks`): Gauss–Hermite with
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
    kinks = _forms.find_kinks(f, dtype)
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
    reason = ("it has jumps or more kinks than the quadrature can split at" if kinks is None else
              f"it has kinks at {', '.join(f'{k:.6g}' for k in kinks)}" if kinks else "it is too steep")
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
        QuadratureWarning, stacklevel=4)


# ----------------------------------------------------------------------------------------------
# Choosing the method for one function.

_FORMS: dict = {}


def recognise(phi: PhiLike, dtype=None, **params: Any) -> Optional[_forms.Form]:
    """The closed-form :class:`~ntk_adapters.infinite.forms.Form` of ``phi`` (a name, a callable or a
    Form), or ``None`` when its Gaussian expectations need quadrature. Cached by program."""
    if isinstance(phi, _forms.Form):
        return phi
    dtype = jnp.dtype(dtype if dtype is not None else jnp.result_type(float))
    f = elementwise_fn(phi, **params)
    try:
        key = _program_key(f, dtype)
    except Exception:  # noqa: BLE001  (not traceable on a scalar: quadrature will report it)
        return None
    if key not in _FORMS:
        form = _forms.analyze(f, dtype)
        _FORMS[key] = form if form is not None and closable(form) else None
    return _FORMS[key]


def _plan(phi, params: dict, method: str, n_points, rtol, dtype, label) -> tuple:
    """``('named',)``, ``('form', Form)`` or ``('quadrature', QuadratureScheme)`` for ``phi``."""
    if method not in ("auto", "closed_form", "quadrature"):
        raise ValueError(f"method must be 'auto', 'closed_form' or 'quadrature'; got {method!r}")
    if isinstance(phi, _forms.Form):
        if method == "quadrature":
            raise ValueError("a Form is integrated in closed form; pass the function itself for quadrature")
        return ("form", phi)
    if isinstance(phi, str):
        spec = _spec(phi)
        _check_params(phi, spec.fn, params)
        if spec.closed_form is not None and method != "quadrature":
            return ("named",)
    elif not callable(phi):
        raise TypeError(f"phi must be a name, a callable or a Form; got {type(phi).__name__}")
    if method != "quadrature":
        form = recognise(phi, dtype, **params)
        if form is not None:
            return ("form", form)
        if method == "closed_form":
            raise ValueError(f"phi={getattr(phi, '__name__', phi)!r} has no closed form; closed forms exist for "
                             f"{list(CLOSED_FORMS)} and for every function of the family described in "
                             "ntk_adapters.infinite.forms (piecewise polynomials broken at 0, erf, x·Φ(c·x), ...)")
    if n_points is None or not 1 <= int(n_points) <= 300:
        raise ValueError(f"n_points must be between 1 and 300 (numpy's Hermite nodes overflow beyond); got {n_points}")
    f = elementwise_fn(phi, **params)
    if rtol is None:
        return ("quadrature", QuadratureScheme("hermite", int(n_points)))
    return ("quadrature", quadrature_scheme(f, dtype, n_points=int(n_points), rtol=float(rtol), label=label))


def _plan_key(plan: tuple) -> tuple:
    return plan if plan[0] != "quadrature" else ("quadrature", plan[1].key())


# ----------------------------------------------------------------------------------------------
# Public raw-array API.


def gaussian_expectations(
    phi: PhiLike,
    cov12: Array,
    var1: Array,
    var2: Array,
    *,
    derivative: bool = True,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    rtol: Optional[float] = DEFAULT_RTOL,
    label: Optional[str] = None,
    **params: Any,
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` for ``(u, v) ~ N(0, [[var1, cov12], [cov12, var2]])``.

    Args:
      phi: a name from :data:`CLOSED_FORMS` or :data:`QUADRATURE_NAMES`, an elementwise
        jnp-traceable callable ``phi(x, **params)``, or a :class:`~ntk_adapters.infinite.forms.Form`.
      cov12, var1, var2: arrays broadcastable to one shape (the output shape).
      derivative: also return ``E[phi'(u) phi'(v)]`` (else ``None``).
      n_points: Gauss–Hermite nodes per dimension the quadrature's node search starts from
        (exactly this many with ``rtol=None``).
      method: ``'auto'`` (closed form where known or recognised, else quadrature),
        ``'closed_form'`` or ``'quadrature'`` (forces quadrature, e.g. to check a closed form).
      rtol: relative accuracy the quadrature is chosen for (:func:`quadrature_scheme`); ``None``
        uses ``n_points × n_points`` Gauss–Hermite nodes as they are.
      label: names the caller (a layer) in a :class:`QuadratureWarning`.
      **params: parameters of ``phi`` (``negative_slope`` for ``leaky_relu``, ``a``/``b`` for
        ``affine``/``erf``/``sin``/``cos``/``exp``, ``approximate`` for ``gelu``, ...).

    Returns:
      ``(nngp, dnngp)``, both of the broadcast shape; ``dnngp`` is ``None`` unless ``derivative``.

    Example::

        nngp, dd = gaussian_expectations("relu", jnp.array(0.5), 1.0, 1.0)
        # nngp = (sin θ + (π − θ) cos θ)/(2π) with θ = arccos 0.5; dd = (π − θ)/(2π) = 1/3
        gaussian_expectations(lambda x: x * jax.scipy.stats.norm.cdf(x), 0.5, 1.0, 1.0)  # exact GELU, closed form
    """
    c, q1, q2 = jnp.broadcast_arrays(*(jnp.asarray(a) for a in (cov12, var1, var2)))
    dtype = jnp.result_type(c, q1, q2)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    c, q1, q2 = c.astype(dtype), q1.astype(dtype), q2.astype(dtype)
    plan = _plan(phi, params, method, n_points, rtol, dtype, label)
    key = (phi, tuple(sorted(params.items())), _plan_key(plan), bool(derivative))
    try:
        fn = _compiled(key, plan)
    except TypeError:  # unhashable phi or parameters (e.g. traced arrays): no caching
        fn = _expectation_fn(phi, params, plan, derivative)
    return fn(c, q1, q2)


def _expectation_fn(phi, params, plan, derivative):
    def fn(c, q1, q2):
        if plan[0] == "named":
            nngp, dd = _spec(phi).closed_form(c, q1, q2, **params)
            nngp = jnp.broadcast_to(nngp, c.shape).astype(c.dtype)
            dd = jnp.broadcast_to(dd, c.shape).astype(c.dtype) if derivative else None
            return nngp, dd
        if plan[0] == "form":
            nngp, dd = form_expectations(plan[1], c, q1, q2, derivative)
            nngp = jnp.broadcast_to(nngp, c.shape).astype(c.dtype)
            dd = jnp.broadcast_to(dd, c.shape).astype(c.dtype) if derivative else None
            return nngp, dd
        return plan[1].integrate(elementwise_fn(phi, **params), c, q1, q2, derivative)

    return fn


class _Keyed:
    """Carries an unhashable-by-value plan next to its hashable key through ``lru_cache``."""

    def __init__(self, key, plan):
        self.key, self.plan = key, plan

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Keyed) and self.key == other.key


def _compiled(key, plan):
    return _compiled_cached(_Keyed(key, plan))


@functools.lru_cache(maxsize=256)
def _compiled_cached(k: _Keyed):
    # One jitted function per (phi, parameters, method): eager calls compile once per shape
    # instead of dispatching (and compiling) op by op.
    phi, params_items, _, derivative = k.key
    return jax.jit(_expectation_fn(phi, dict(params_items), k.plan, derivative))


def gaussian_variance(
    phi: PhiLike,
    var: Array,
    *,
    derivative: bool = False,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    rtol: Optional[float] = DEFAULT_RTOL,
    **params: Any,
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u)²]`` (and ``E[phi'(u)²]`` if ``derivative``) for ``u ~ N(0, var)``; shape of ``var``.

    Example::

        q, _ = gaussian_variance("relu", jnp.array([1.0, 4.0]))  # [0.5, 2.0]
    """
    return gaussian_expectations(
        phi, var, var, var, derivative=derivative, n_points=n_points, method=method, rtol=rtol, **params
    )


# ----------------------------------------------------------------------------------------------
# Kernel-level entry point.


def _full_diagonal(cov: Array) -> Array:
    """``(N, H, H', W, W')`` → ``(N, H, W)``: the per-position variances of a 'full' covariance."""
    for _ in range((cov.ndim - 1) // 2):
        cov = jnp.diagonal(cov, axis1=1, axis2=2)
    return cov


def _interleave(diag: Array, first: bool) -> Array:
    """``(N, H, W)`` → ``(N, H, 1, W, 1)`` (``first``) or ``(N, 1, H, 1, W)``."""
    n, *spatial = diag.shape
    shape = [n]
    for size in spatial:
        shape += [size, 1] if first else [1, size]
    return diag.reshape(shape)


def apply_elementwise(
    kernel: Kernel,
    phi: PhiLike,
    *,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    rtol: Optional[float] = DEFAULT_RTOL,
    label: Optional[str] = None,
    **params: Any,
) -> Kernel:
    """The kernel after the elementwise nonlinearity ``phi``, in any layout.

    ``nngp ← E[phi(u)phi(v)]``, ``ntk ← E[phi'(u)phi'(v)] · ntk``, ``cov1``/``cov2`` ←
    ``E[phi(u)phi(u')]`` for the pairs of positions they hold; the variances of ``u``, ``v`` at each
    position are ``cov1``/``cov2`` (``'none'``, ``'diagonal'``) or their position diagonals
    (``'full'``, where ``cov1[n, h, h', w, w']`` is a covariance between two positions of the same
    input and transforms by the same formula).

    Args:
      kernel: a :class:`Kernel` with ``is_gaussian=True`` (the output of a random linear layer).
      phi: name, callable or Form, as in :func:`gaussian_expectations`.
      n_points, method, rtol, label, **params: as in :func:`gaussian_expectations`. The method is
        chosen once, when ``apply_elementwise`` is traced.

    Returns:
      A :class:`Kernel` of the same layout and shapes, ``is_gaussian=False`` (``True`` only for a
      linear ``phi`` without offset).

    Raises:
      ValueError: if ``kernel.is_gaussian`` is ``False``: ``phi`` of a non-Gaussian value (e.g.
        ``relu(relu(x))``, or ``phi`` of the raw input) is not determined by its kernel.

    Example::

        k = Kernel(nngp=x @ x.T / d, ntk=jnp.zeros((n, n)), cov1=q, cov2=q, is_gaussian=True,
                   same_inputs=True)
        k = apply_elementwise(k, "relu")         # nngp, ntk (n, n); cov1, cov2 (n,)
        k = apply_elementwise(k2, jnp.tanh)      # any callable: closed form if recognised, else quadrature
    """
    if not kernel.is_gaussian:
        raise ValueError(
            f"elementwise function {getattr(phi, '__name__', phi)!r} applied to a value that is not a "
            "zero-mean Gaussian process (is_gaussian=False): its kernel does not determine the result. "
            "This happens for two nonlinearities in a row, a nonlinearity of the raw input, or after "
            "flatten/concatenate/dropout; put a linear layer (Dense/Conv) before the nonlinearity."
        )
    plan = _plan(phi, params, method, n_points, rtol, kernel.nngp.dtype, label)
    key = (phi, tuple(sorted(params.items())), _plan_key(plan))
    try:
        fn = _compiled_apply(_Keyed(key, plan))
    except TypeError:  # unhashable phi or parameters: trace eagerly
        fn = functools.partial(_apply_impl, phi=phi, params=params, plan=plan)
    return fn(kernel)


@functools.lru_cache(maxsize=256)
def _compiled_apply(k: _Keyed):
    phi, params_items, _ = k.key
    return jax.jit(functools.partial(_apply_impl, phi=phi, params=dict(params_items), plan=k.plan))


def _is_linear(phi, params, plan) -> bool:
    if plan[0] == "form":
        return plan[1].linear_factor is not None
    return isinstance(phi, str) and _spec(phi).linear and params.get("b", 0.0) == 0.0


def _apply_impl(kernel: Kernel, *, phi, params, plan) -> Kernel:
    linear = _is_linear(phi, params, plan)
    want_ntk = kernel.ntk is not None
    # One expectation per array: the derivative is computed for the NTK's entries only, and no
    # array is copied into a concatenation (the whole map is one jitted function anyway).
    run = _expectation_fn(phi, params, plan, True)
    run_value = _expectation_fn(phi, params, plan, False)

    def expect(c, q1, q2, derivative):
        if plan[0] != "quadrature":
            c, q1, q2 = jnp.broadcast_arrays(c, q1, q2)
        out = (run if derivative else run_value)(c, q1, q2)
        shape = jnp.broadcast_shapes(c.shape, q1.shape, q2.shape)
        return tuple(None if o is None else jnp.broadcast_to(o, shape) for o in out)

    if kernel.layout == "full":
        d1 = _full_diagonal(kernel.cov1)
        d2 = d1 if kernel.same_inputs else _full_diagonal(kernel.cov2)
        var1, var2 = _interleave(d1, True)[:, None], _interleave(d2, False)[None]
        cov1 = expect(kernel.cov1, _interleave(d1, True), _interleave(d1, False), False)[0]
        cov2 = cov1 if kernel.same_inputs else expect(kernel.cov2, _interleave(d2, True), _interleave(d2, False),
                                                      False)[0]
    else:
        var1, var2 = kernel.cov1[:, None], kernel.cov2[None]
        cov1 = expect(kernel.cov1, kernel.cov1, kernel.cov1, False)[0]
        cov2 = cov1 if kernel.same_inputs else expect(kernel.cov2, kernel.cov2, kernel.cov2, False)[0]
    nngp, dd = expect(kernel.nngp, var1, var2, want_ntk)
    ntk = dd * kernel.ntk if want_ntk else None
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=bool(linear))

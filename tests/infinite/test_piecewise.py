"""Closed forms for piecewise exponential polynomials (breaks anywhere) and the bivariate normal CDF.

References are independent of ``ntk_adapters``: ``Φ2`` by adaptive 1-D integration (scipy's
``quad`` of ``φ(x) Φ((ρx − k)/sqrt(1 − ρ²))``), kernels by the float64 product Gauss–Legendre rule
of ``test_elementwise_exact.bivariate`` split at the kinks, functions and derivatives written in
numpy.
"""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

from ntk_adapters.infinite import elementwise as E
from ntk_adapters.infinite.bivariate import bvn_upper
from ntk_adapters.infinite.kinks import find_kinks
from ntk_adapters.infinite.piecewise import analyze_piecewise

_spec = importlib.util.spec_from_file_location(
    "_elementwise_exact_reference", pathlib.Path(__file__).with_name("test_elementwise_exact.py")
)
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)
CASES, bivariate = _ref.CASES, _ref.bivariate

PIECEWISE = ["elu", "selu", "celu_0.5", "where_elu_1.3", "relu6", "clip", "hard_tanh", "shifted_square_decay"]
# variances 0.01–25 (also unequal), correlations including ±1 and 0.99999
COVS = [
    (q1, q2, r)
    for q1, q2 in ((0.01, 0.01), (1.0, 1.0), (25.0, 25.0), (0.01, 25.0), (2.0, 0.3))
    for r in (-1.0, -0.999, -0.5, 0.0, 0.3, 0.99, 0.99999, 1.0)
]
#: Bounds on the measured errors (relative to sqrt(E[f(u)²] E[f(v)²])) stated in the elementwise
#: docstring. Exponential pieces at variance 25 multiply a tail probability of ~1e-20 by a tilt of
#: ~e^50 (celu's e^{2x}, the e^{−x} decay), and Φ2 is accurate to 1e-16 absolutely, not relatively;
#: float32 loses digits to the cancellation in e^x − 1 at variance 0.01 and in 1 − ρ at 0.99999.
FLOAT64_BOUND = {"celu_0.5": 1e-5, "shifted_square_decay": 1e-5}
FLOAT32_BOUND = 2e-5


def _bvn_reference(h, k, r):
    if abs(r) == 1.0:
        return special.ndtr(-max(h, k)) if r > 0 else max(0.0, special.ndtr(-h) - special.ndtr(k))
    s = math.sqrt(1 - r * r)
    f = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi) * special.ndtr((r * x - k) / s)
    return integrate.quad(f, h, np.inf, epsabs=1e-17, epsrel=1e-14, limit=500)[0]


def test_bvn_upper_against_integration():
    worst = 0.0
    for h in (-6.0, -1.2, 0.0, 0.3, 2.5):
        for k in (-2.0, 0.0, 0.3, 1.7, 5.0):
            for r in (-1.0, -0.99999, -0.95, -0.93, -0.9, -0.5, 0.0, 0.4, 0.92, 0.93, 0.99, 0.99999, 1.0):
                worst = max(worst, abs(float(bvn_upper(h, k, r)) - _bvn_reference(h, k, r)))
    assert worst <= 2e-15, worst
    # Sheppard: P(X > 0, Y > 0) = 1/4 + arcsin(ρ)/(2π)
    np.testing.assert_allclose(float(bvn_upper(0.0, 0.0, 0.5)), 1 / 3, rtol=1e-15)


def test_bvn_upper_float32_and_gradients():
    for h, k, r in [(0.3, -0.2, 0.5), (1.0, 1.5, 0.95), (-0.5, 0.4, -0.97)]:
        v = bvn_upper(jnp.float32(h), jnp.float32(k), jnp.float32(r))
        assert v.dtype == jnp.float32
        h32, k32, r32 = (float(jnp.float32(a)) for a in (h, k, r))
        assert abs(float(v) - _bvn_reference(h32, k32, r32)) < 1e-6
    # Plackett: dP/dρ = φ2(h, k; ρ); finite (zero) at ρ = ±1 where the branch is Φ(−max(h, k))
    g = jax.grad(lambda r: bvn_upper(0.3, -0.4, r))
    for r in (0.2, 0.95, -0.99):
        s2 = 1 - r * r
        phi2 = math.exp(-(0.09 + 0.16 + 2 * r * 0.12) / (2 * s2)) / (2 * math.pi * math.sqrt(s2))
        np.testing.assert_allclose(float(g(r)), phi2, rtol=1e-10)
    assert np.isfinite(float(g(1.0))) and np.isfinite(float(g(-1.0)))


@pytest.mark.parametrize("name", PIECEWISE)
def test_recognised_with_exact_breaks(name):
    phi, fn, _, kinks = CASES[name]
    for dtype in (jnp.float64, jnp.float32):
        form = analyze_piecewise(phi, dtype)
        assert form is not None, (name, dtype)
        np.testing.assert_allclose(form.breaks, kinks, rtol=1e-7, atol=1e-12)
        x = np.linspace(-7.1, 7.3, 57)
        np.testing.assert_allclose(form(x), fn(x), rtol=1e-6 if dtype == jnp.float32 else 1e-12, atol=1e-12)


def test_outside_the_class_is_refused():
    assert analyze_piecewise(jnp.tanh) is None
    assert analyze_piecewise(CASES["log1p_jump"][0]) is None
    assert analyze_piecewise(lambda h: jnp.maximum(jnp.exp(h), 2.0)) is None  # break at log 2: not exact
    assert analyze_piecewise(lambda h: jax.lax.stop_gradient(h) * h) is None


def _errors(name, dtype):
    phi, fn, dfn, kinks = CASES[name]
    worst = [0.0, 0.0]
    for q1, q2, r in COVS:
        c = r * math.sqrt(q1 * q2)
        args = [jnp.asarray(a, dtype) for a in (c, q1, q2)]
        nngp, dd = E.gaussian_expectations(phi, *args)
        assert nngp.dtype == dtype
        c64, q164, q264 = (float(a) for a in args)  # the reference at the rounded inputs
        c64 = float(np.clip(c64, -math.sqrt(q164 * q264), math.sqrt(q164 * q264)))
        for i, (h, val) in enumerate(((fn, nngp), (dfn, dd))):
            ref = bivariate(h, h, q164, q264, c64, kinks)
            scale = math.sqrt(bivariate(h, h, q164, q164, q164, kinks) * bivariate(h, h, q264, q264, q264, kinks))
            if scale < 1e-200:
                continue
            worst[i] = max(worst[i], abs(float(val) - ref) / scale)
    return worst


@pytest.mark.parametrize("name", PIECEWISE)
def test_kernels_against_reference_float64(name):
    assert E.recognise(CASES[name][0], jnp.float64) is not None
    worst = _errors(name, jnp.float64)
    assert max(worst) <= FLOAT64_BOUND.get(name, 1e-12), worst


# Each function compiles its own closed forms (tens of seconds here): float32 and gradients are
# checked on one exponential and one kinked-linear function.
@pytest.mark.parametrize("name", ["elu", "relu6"])
def test_kernels_against_reference_float32(name):
    worst = _errors(name, jnp.float32)
    assert max(worst) <= FLOAT32_BOUND, worst


@pytest.mark.parametrize("name", ["elu"])
def test_gradients_are_finite_and_match_differences(name):
    phi = CASES[name][0]
    f = lambda c, q: E.gaussian_expectations(phi, c, q, 1.3)[0]
    # Correlations −1, interior and +1, as one compiled gradient program (each eager gradient
    # would compile the closed forms' derivatives again).
    c = np.array([-math.sqrt(1.3), 0.4, math.sqrt(1.3)])
    q = np.array([1.3, 1.0, 1.3])
    gc, gq = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1))))(c, q)
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gq)), (gc, gq)
    eps = 1e-6
    difference = (float(f(0.4 + eps, 1.0)) - float(f(0.4 - eps, 1.0))) / (2 * eps)
    np.testing.assert_allclose(float(gc[1]), difference, rtol=1e-6)


def test_zero_variance_factorizes():
    """A zero variance: ``E[phi(0) phi(v)] = phi(0) E[phi(v)]``; ``elu(0) = 0``, ``relu6'(0) = 0``,
    ``elu'(0) = 1`` (JAX's values), ``E[elu(v)] = E[v 1{v>0}] + E[(e^v − 1) 1{v<0}]``."""
    q = 2.0
    mean_elu = math.sqrt(q / (2 * math.pi)) + math.exp(q / 2) * special.ndtr(-math.sqrt(q)) - 0.5
    nngp, dd = E.gaussian_expectations("elu", 0.0, jnp.array([0.0, 0.0]), jnp.array([0.0, q]))
    np.testing.assert_allclose(nngp, [0.0, 0.0], atol=1e-15)
    mean_delu = 0.5 + math.exp(q / 2) * special.ndtr(-math.sqrt(q))
    np.testing.assert_allclose(dd, [1.0, mean_delu], rtol=1e-12)
    shifted = lambda h: jax.nn.elu(h) + 1.0
    nngp, _ = E.gaussian_expectations(shifted, 0.0, 0.0, q)
    np.testing.assert_allclose(float(nngp), 1.0 + mean_elu, rtol=1e-12)


def test_hard_tanh_float32_has_two_kinks():
    assert len(find_kinks(jax.nn.hard_tanh, jnp.float32)) == 2
    assert len(find_kinks(lambda h: jnp.clip(h, -0.3, 0.7), jnp.float32)) == 2

"""Elementwise functions of one Gaussian value, exact to 1e-6 through the whole engine.

Every expectation here is computed independently of ``ntk_adapters``: the functions and their
derivatives are written out in numpy, and ``E[f(u) g(v)]`` for the bivariate normal is a product
Gauss–Legendre rule in float64 (panels of width 0.25 on ``[-10, 10]²`` in standardized
coordinates, 12 nodes each, split at the function's kinks). One hidden layer ``Dense(n) → phi → Dense(1)``
(Flax linen, ``lecun_normal`` weights, zero-initialized trainable biases) has, with
``K0 = x·x'/d``, ``(u, v) ~ N(0, [[K0(x,x), K0(x,x')], [K0(x,x'), K0(x',x')]])``:

* ``nngp = E[phi(u) phi(v)]`` (the readout's ``σw² = 1``, zero bias variance);
* ``ntk  = 1 + n·E[phi(u) phi(v)] + (x·x' + 1)·E[phi'(u) phi'(v)]``: readout bias, readout weights
  (``Σ_j phi(h_j) phi(h'_j)``, standard parameterization), hidden weights and biases.

Errors are relative to ``sqrt(K(x, x) K(x', x'))``, the Cauchy–Schwarz bound of each entry (an odd
``phi`` has entries near zero between nearly orthogonal inputs).
"""

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import ntk_adapters.flax
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn
from ntk_adapters.infinite import elementwise as E
from ntk_adapters.infinite import forms as F
from ntk_adapters.infinite.kinks import find_kinks

RTOL = 1e-6
WIDTH = 16  # the engine reads it from the parameters; small so that the NTK's phi' part weighs


_SELU_A, _SELU_L = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946  # Klambauer et al. 2017


def _sigmoid(x):
    return special.expit(x)


def _gelu_tanh(x):
    k = math.sqrt(2 / math.pi)
    return 0.5 * x * (1 + np.tanh(k * (x + 0.044715 * x**3)))


def _dgelu_tanh(x):
    k = math.sqrt(2 / math.pi)
    g = np.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1 + g) + 0.5 * x * (1 - g * g) * k * (1 + 3 * 0.044715 * x * x)


def _npdf(x):
    return np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


# name: (phi as the model writes it, phi in numpy, phi' in numpy, kinks)
CASES = {
    "leaky_relu_0.01": (
        nn.leaky_relu,
        lambda x: np.where(x > 0, x, 0.01 * x),
        lambda x: np.where(x > 0, 1.0, 0.01),
        (0.0,),
    ),
    "leaky_relu_0.2": (
        lambda h: nn.leaky_relu(h, negative_slope=0.2),
        lambda x: np.where(x > 0, x, 0.2 * x),
        lambda x: np.where(x > 0, 1.0, 0.2),
        (0.0,),
    ),
    "abrelu": (
        lambda h: -0.4 * jnp.minimum(h, 0) + 1.3 * jnp.maximum(h, 0),
        lambda x: np.where(x > 0, 1.3 * x, -0.4 * x),
        lambda x: np.where(x > 0, 1.3, -0.4),
        (0.0,),
    ),
    "3relu": (lambda h: 3.0 * nn.relu(h), lambda x: 3 * np.maximum(x, 0), lambda x: 3.0 * (x > 0), (0.0,)),
    "relu_plus_1": (lambda h: nn.relu(h) + 1, lambda x: np.maximum(x, 0) + 1, lambda x: 1.0 * (x > 0), (0.0,)),
    "abs": (jnp.abs, np.abs, np.sign, (0.0,)),
    "gelu_exact_flax": (
        lambda h: nn.gelu(h, approximate=False),
        lambda x: x * special.ndtr(x),
        lambda x: special.ndtr(x) + x * _npdf(x),
        (),
    ),
    "gelu_exact_jax": (
        lambda h: jax.nn.gelu(h, approximate=False),
        lambda x: x * special.ndtr(x),
        lambda x: special.ndtr(x) + x * _npdf(x),
        (),
    ),
    "gelu_tanh": (nn.gelu, _gelu_tanh, _dgelu_tanh, ()),
    "x_sigmoid_1.702x": (
        lambda h: h * nn.sigmoid(1.702 * h),
        lambda x: x * _sigmoid(1.702 * x),
        lambda x: _sigmoid(1.702 * x) + 1.702 * x * _sigmoid(1.702 * x) * _sigmoid(-1.702 * x),
        (),
    ),
    "step_times_square": (lambda h: (h >= 0) * h**2, lambda x: (x > 0) * x * x, lambda x: 2 * x * (x > 0), (0.0,)),
    "tanh": (jnp.tanh, np.tanh, lambda x: 1 - np.tanh(x) ** 2, ()),
    "erf": (jax.scipy.special.erf, special.erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-x * x), ()),
    "hard_tanh": (nn.hard_tanh, lambda x: np.clip(x, -1, 1), lambda x: 1.0 * (np.abs(x) < 1), (-1.0, 1.0)),
    "x_norm_cdf_2x": (
        lambda h: h * jax.scipy.stats.norm.cdf(2.0 * h),
        lambda x: x * special.ndtr(2 * x),
        lambda x: special.ndtr(2 * x) + 2 * x * _npdf(2 * x),
        (),
    ),
    "elu": (
        nn.elu,
        lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
        lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0))),
        (0.0,),
    ),
    "selu": (
        nn.selu,
        lambda x: _SELU_L * np.where(x > 0, x, _SELU_A * np.expm1(np.minimum(x, 0))),
        lambda x: _SELU_L * np.where(x > 0, 1.0, _SELU_A * np.exp(np.minimum(x, 0))),
        (0.0,),
    ),
    "celu_0.5": (
        lambda h: nn.celu(h, 0.5),
        lambda x: np.where(x > 0, x, 0.5 * np.expm1(np.minimum(x, 0) / 0.5)),
        lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0) / 0.5)),
        (0.0,),
    ),
    "where_elu_1.3": (
        lambda h: jnp.where(h > 0, h, 1.3 * (jnp.exp(h) - 1)),
        lambda x: np.where(x > 0, x, 1.3 * np.expm1(np.minimum(x, 0))),
        lambda x: np.where(x > 0, 1.0, 1.3 * np.exp(np.minimum(x, 0))),
        (0.0,),
    ),
    "relu6": (jax.nn.relu6, lambda x: np.clip(x, 0, 6), lambda x: 1.0 * ((x > 0) & (x < 6)), (0.0, 6.0)),
    "clip": (
        lambda h: jnp.clip(h, -0.3, 0.7),
        lambda x: np.clip(x, -0.3, 0.7),
        lambda x: 1.0 * ((x > -0.3) & (x < 0.7)),
        (-0.3, 0.7),
    ),
    "shifted_square_decay": (
        lambda h: jnp.maximum(h - 1, 0) ** 2 * jnp.exp(-h),
        lambda x: np.maximum(x - 1, 0) ** 2 * np.exp(-x),
        lambda x: (x > 1) * (2 * (x - 1) - (x - 1) ** 2) * np.exp(-x),
        (1.0,),
    ),
    # no closed form: a logarithm beyond a jump at 1
    "log1p_jump": (
        lambda h: jnp.where(h > 1, jnp.log1p(h), h * jnp.abs(h) / 2),
        lambda x: np.where(x > 1, np.log1p(np.maximum(x, 0)), x * np.abs(x) / 2),
        lambda x: np.where(x > 1, 1 / (1 + np.maximum(x, 0)), np.abs(x)),
        (0.0, 1.0),
    ),
}
CLOSED = {
    "leaky_relu_0.01",
    "leaky_relu_0.2",
    "abrelu",
    "3relu",
    "relu_plus_1",
    "abs",
    "gelu_exact_flax",
    "gelu_exact_jax",
    "step_times_square",
    "erf",
    "x_norm_cdf_2x",
    "elu",
    "selu",
    "celu_0.5",
    "where_elu_1.3",
    "relu6",
    "clip",
    "hard_tanh",
    "shifted_square_decay",
}


def _panels(edges, m=12):
    """Gauss–Legendre nodes and weights (times the standard normal density) on the panels between
    sorted ``edges`` (..., K) and ±10."""
    x, w = np.polynomial.legendre.leggauss(m)
    e = np.clip(edges, -10.0, 10.0)
    lo = np.concatenate([np.full(e.shape[:-1] + (1,), -10.0), e], -1)
    hi = np.concatenate([e, np.full(e.shape[:-1] + (1,), 10.0)], -1)
    z = (hi + lo)[..., None] / 2 + (hi - lo)[..., None] / 2 * x
    wz = (hi - lo)[..., None] / 2 * w * _npdf(z)
    return z.reshape(z.shape[:-2] + (-1,)), wz.reshape(wz.shape[:-2] + (-1,))


GRID = np.arange(-9.75, 10.0, 0.25)


#: Reference values already integrated, keyed by the exact arguments: the tests ask for the same
#: diagonal entries E[f(u)²] (the error scales) many times, and one integration takes ~0.2 s.
_BIVARIATE_CACHE: dict = {}


def bivariate(f, g, q1, q2, c, kinks=()):
    """``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[q1, c], [c, q2]])`` (see :func:`_integrate`), memoized."""
    key = (f, g, float(q1), float(q2), float(c), tuple(float(k) for k in kinks))
    if key not in _BIVARIATE_CACHE:
        _BIVARIATE_CACHE[key] = _integrate(f, g, float(q1), float(q2), float(c), kinks)
    return _BIVARIATE_CACHE[key]


def _integrate(f, g, q1, q2, c, kinks=()):
    """``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[q1, c], [c, q2]])``: ``u = σ1 z1``,
    ``v = σ2 (ρ z1 + s z2)``, panels split where ``u`` or ``v`` crosses a kink. Near ``|ρ| = 1`` the
    inner integral changes over a range ``~s`` of ``z1`` around ``v``'s kinks, so the outer panels
    are also split at geometric distances ``s·2^j`` from them."""
    s1, s2 = math.sqrt(q1), math.sqrt(q2)
    rho = float(np.clip(c / math.sqrt(q1 * q2), -1.0, 1.0))  # exactly ±1 for c = ±q1 = ±q2
    s = math.sqrt(max(1.0 - rho * rho, 0.0))
    k = np.asarray(kinks, float)
    outer = [GRID, k / s1]
    if rho != 0.0:
        offsets = s / abs(rho) * 2.0 ** np.arange(-4, 8)
        near = (k / (s2 * rho))[:, None, None] + np.array([1.0, -1.0])[None, :, None] * offsets[None, None, :]
        outer.append(near.ravel())
    z1, w1 = _panels(np.sort(np.concatenate(outer)))
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = (k[None, :] / s2 - rho * z1[:, None]) / s if s > 0 else np.full((z1.size, k.size), 20.0)
    z2, w2 = _panels(np.sort(np.concatenate([np.broadcast_to(GRID, (z1.size, GRID.size)), inner], 1), 1))
    v = s2 * (rho * z1[:, None] + s * z2)
    return float(np.sum(w1 * f(s1 * z1) * np.sum(w2 * g(v), 1)))


def test_reference_integrator_against_hand_values():
    """The reference itself: ReLU's arc-cosine kernels (Cho & Saul) and an exact GELU diagonal
    ``E[(u Φ(u))²] = q (1/4 + (1/(2π)) (arcsin(q/(1+q)) + 2q/((1+q) sqrt(1+2q))))`` (derived with
    Sheppard's formula), to 1e-12."""
    for rho in (-1.0, -0.3, 0.0, 0.7, 1.0):
        th = math.acos(rho)
        relu = lambda x: np.maximum(x, 0)
        step = lambda x: 1.0 * (x > 0)
        np.testing.assert_allclose(
            bivariate(relu, relu, 2.0, 2.0, 2.0 * rho, (0.0,)),
            2.0 * (math.sin(th) + (math.pi - th) * math.cos(th)) / (2 * math.pi),
            atol=1e-12,
        )
        np.testing.assert_allclose(
            bivariate(step, step, 2.0, 2.0, 2.0 * rho, (0.0,)), (math.pi - th) / (2 * math.pi), atol=1e-12
        )
    q = 1.7
    gelu = lambda x: x * special.ndtr(x)
    ref = q * (0.25 + (math.asin(q / (1 + q)) + 2 * q / ((1 + q) * math.sqrt(1 + 2 * q))) / (2 * math.pi))
    np.testing.assert_allclose(bivariate(gelu, gelu, q, q, q), ref, rtol=1e-12)


def _inputs():
    x = np.random.default_rng(7).standard_normal((5, 6))
    x[3] = -x[0]  # correlation −1
    x[4] = x[1] + 0.01 * x[2]  # correlation close to 1
    return x


def _model(phi, width=WIDTH, dtype=jnp.float64, x=None, outputs=1):
    class OneHidden(nn.Module):
        @nn.compact
        def __call__(self, h):
            h = nn.Dense(width, param_dtype=dtype, dtype=dtype)(h)
            return nn.Dense(outputs, param_dtype=dtype, dtype=dtype)(phi(h))

    x = jnp.asarray(_inputs() if x is None else x, dtype)
    module = OneHidden()
    return ntk_adapters.flax.adapt(module, module.init(jax.random.PRNGKey(0), x), x), x


def _reference(fn, dfn, kinks, x, width):
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    k0 = x @ x.T / d
    n = len(x)
    e = np.zeros((n, n))
    ed = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            e[i, j] = bivariate(fn, fn, k0[i, i], k0[j, j], k0[i, j], kinks)
            ed[i, j] = bivariate(dfn, dfn, k0[i, i], k0[j, j], k0[i, j], kinks)
    ntk = 1 + width * e + (x @ x.T + 1) * ed
    return e, ed, ntk


def _assert_entrywise(actual, ref, rtol, what):
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    err = np.abs(actual - ref) / scale
    assert err.max() <= rtol, f"{what}: max relative error {err.max():.2e} > {rtol:g}"
    return float(err.max())


# Variants of elu and clip whose kernels tests/infinite/test_piecewise.py checks directly; each
# would compile its own closed forms here again.
_MODEL_CASES = [name for name in CASES if name not in ("selu", "where_elu_1.3", "clip")]


@pytest.mark.parametrize("name", _MODEL_CASES)
def test_one_hidden_layer_matches_reference(name):
    phi, fn, dfn, kinks = CASES[name]
    model, x = _model(phi)
    with warnings.catch_warnings():
        warnings.simplefilter("error", E.QuadratureWarning)
        nngp, ntk = infinite_kernel_fn(model)(x)
    e, ed, ntk_ref = _reference(fn, dfn, kinks, x, WIDTH)
    _assert_entrywise(nngp, e, RTOL, f"{name} nngp")
    _assert_entrywise(ntk, ntk_ref, RTOL, f"{name} ntk")
    # the phi' part on its own: ntk − 1 − n·nngp = (x·x' + 1)·E[phi' phi']
    xx = np.asarray(x) @ np.asarray(x).T + 1
    _assert_entrywise((np.asarray(ntk) - 1 - WIDTH * np.asarray(nngp)) / xx, ed, 10 * RTOL, f"{name} E[phi' phi']")


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_closed_forms_are_recognised(name):
    """Functions of the closed-form family are read from their programs (no quadrature)."""
    phi = CASES[name][0]
    form = E.recognise(phi, jnp.float64)
    assert form is not None, name
    x = np.linspace(-3.1, 2.9, 41)
    np.testing.assert_allclose(form(x), np.asarray(jax.vmap(phi)(jnp.asarray(x))), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gelu_tanh", "x_sigmoid_1.702x", "tanh", "log1p_jump"])
def test_no_closed_form_uses_quadrature_at_the_tolerance(name):
    phi = CASES[name][0]
    assert E.recognise(phi, jnp.float64) is None
    scheme = E.quadrature_scheme(phi, jnp.float64)
    assert scheme.error <= RTOL
    if name == "log1p_jump":
        assert scheme.kind == "panels" and {0.0, 1.0} <= set(scheme.breaks)


def test_gelu_and_leaky_relu_closed_forms_are_exact_at_extreme_correlations():
    """rho = ±1 exactly and variances 0.01 / 25, outside the quadrature's checked range, against the
    reference; kernels of the raw API."""
    cases = [CASES["gelu_exact_flax"], CASES["leaky_relu_0.2"], CASES["step_times_square"]]
    for phi, fn, dfn, kinks in cases:
        for q1, q2, rho in [(1.0, 1.0, 1.0), (2.0, 2.0, -1.0), (0.01, 25.0, 0.6), (25.0, 25.0, 0.999)]:
            c = rho * math.sqrt(q1 * q2)
            nngp, dd = E.gaussian_expectations(phi, c, q1, q2)
            scale0 = math.sqrt(bivariate(fn, fn, q1, q1, q1, kinks) * bivariate(fn, fn, q2, q2, q2, kinks))
            scale1 = math.sqrt(bivariate(dfn, dfn, q1, q1, q1, kinks) * bivariate(dfn, dfn, q2, q2, q2, kinks))
            assert abs(float(nngp) - bivariate(fn, fn, q1, q2, c, kinks)) <= 1e-12 * scale0
            assert abs(float(dd) - bivariate(dfn, dfn, q1, q2, c, kinks)) <= 1e-12 * scale1


def test_rectified_monomials_are_arc_cosine_kernels():
    """``(x ≥ 0)·x^k``: Cho & Saul's arc-cosine kernel of degree k, ``q^k J_k(θ) / (2π)``, with
    ``J_0 = π − θ``, ``J_1 = sin θ + (π − θ) cos θ``, ``J_2 = 3 sin θ cos θ + (π − θ)(1 + 2 cos²θ)``;
    degree 3 against the reference integrator."""
    J = {
        0: lambda t: math.pi - t,
        1: lambda t: math.sin(t) + (math.pi - t) * math.cos(t),
        2: lambda t: 3 * math.sin(t) * math.cos(t) + (math.pi - t) * (1 + 2 * math.cos(t) ** 2),
    }
    q = 1.6
    for k in (0, 1, 2, 3):
        phi = lambda h, k=k: (h >= 0) * h**k
        for rho in (-0.9, 0.0, 0.4, 1.0):
            nngp, _ = E.gaussian_expectations(phi, rho * q, q, q)
            th = math.acos(rho)
            if k in J:
                ref = q**k * J[k](th) / (2 * math.pi)
            else:
                ref = bivariate(lambda x: (x > 0) * x**3, lambda x: (x > 0) * x**3, q, q, rho * q, (0.0,))
            np.testing.assert_allclose(float(nngp), ref, rtol=1e-12, atol=1e-15)


def test_old_failures_now_have_kernels():
    """What used to be refused or raise a raw TypeError."""
    for name in ("gelu_exact_flax", "x_sigmoid_1.702x", "step_times_square"):
        model, x = _model(CASES[name][0])
        nngp, ntk = infinite_kernel_fn(model)(x)
        assert np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))


def test_refusals_are_infinite_width_errors_naming_the_layer_and_primitive():
    """Functions of two different Gaussian values are refused, never a raw error."""

    class TwoValues(nn.Module):
        @nn.compact
        def __call__(self, x):
            a, b = nn.Dense(8)(x), nn.Dense(8)(x)
            return nn.Dense(1)(a * nn.sigmoid(b))

    x = jnp.asarray(_inputs())
    model = ntk_adapters.flax.adapt(TwoValues(), TwoValues().init(jax.random.PRNGKey(0), x), x)
    with pytest.raises(InfiniteWidthError, match=r"layer `TwoValues`.*primitive mul.*two different"):
        infinite_kernel_fn(model)(x)


class _Wavy(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.abs(jnp.sin(5.0 * nn.Dense(8)(x))))


class _Truncated(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        return nn.Dense(1)(h.astype(jnp.int32) * h)


@pytest.mark.parametrize("module,prim", [(_Wavy(), "abs"), (_Truncated(), "mul")], ids=["abs_sin", "truncate"])
def test_unresolvable_function_warns_naming_the_layer(module, prim):
    """Kinks at every multiple of π/5, or jumps at every integer (more than quadrature splits at): a
    QuadratureWarning that names the place, and a finite kernel."""
    x = jnp.asarray(_inputs())
    model = ntk_adapters.flax.adapt(module, module.init(jax.random.PRNGKey(0), x), x)
    name = type(module).__name__
    with pytest.warns(E.QuadratureWarning, match=rf"{name}.*primitive {prim}.*jumps or more kinks"):
        nngp = infinite_kernel_fn(model)(x, get="nngp")
    assert np.all(np.isfinite(nngp))


def test_float32_model_exact_gelu():
    """A float32 model: the recognised coefficients are the float32 constants the model computes."""
    phi, fn, dfn, kinks = CASES["gelu_exact_flax"]
    model, x = _model(phi, dtype=jnp.float32)
    nngp, ntk = infinite_kernel_fn(model)(x)
    assert nngp.dtype == jnp.float32
    e, _, ntk_ref = _reference(fn, dfn, kinks, x, WIDTH)
    _assert_entrywise(nngp, e, 2e-6, "float32 nngp")
    _assert_entrywise(ntk, ntk_ref, 2e-6, "float32 ntk")


def test_zero_variance_uses_jax_values_at_zero():
    """A zero variance makes the value the constant 0: phi(0) and phi'(0) as JAX computes them
    (the step (h >= 0) is 1 at 0, relu'(0) = 0), times the other input's mean."""
    step = lambda h: (h >= 0) * 1.0
    nngp, dd = E.gaussian_expectations(step, 0.0, jnp.array([0.0, 0.0, 2.0]), jnp.array([0.0, 2.0, 0.0]))
    np.testing.assert_allclose(nngp, [1.0, 0.5, 0.5])
    np.testing.assert_allclose(dd, [0.0, 0.0, 0.0])
    relu_sq = lambda h: jax.nn.relu(h) + h**2
    _, dd = E.gaussian_expectations(relu_sq, 0.0, jnp.array([0.0, 0.0]), jnp.array([0.0, 3.0]))
    np.testing.assert_allclose(dd, [0.0, 0.0])  # relu'(0) + 2·0 = 0
    g = jax.grad(lambda c: E.gaussian_expectations(CASES["gelu_exact_flax"][0], c, 1.0, 1.0)[0])(1.0)
    assert np.isfinite(g)


def test_forms_reject_what_they_cannot_represent():
    assert F.analyze(jnp.tanh) is None
    assert F.analyze(lambda h: jnp.maximum(h, 1.0)) is None  # break away from 0
    assert F.analyze(lambda h: jax.lax.stop_gradient(h) * h) is None  # derivative is not the value's
    assert find_kinks(lambda h: jnp.maximum(h, 1.0)) == (1.0,)

    @jax.custom_jvp
    def straight_through_sign(x):
        return jnp.sign(x)

    straight_through_sign.defjvp(lambda p, t: (jnp.sign(p[0]), t[0]))
    assert F.analyze(straight_through_sign) is None  # its custom derivative is not sign' = 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gelu_exact_flax", "leaky_relu_0.2"])
def test_monte_carlo_error_falls_with_width(mc, name):
    """The real Flax module (32 outputs) at widths 64 and 1024, 64 initializations: the average
    empirical NTK approaches the engine's, with an error falling with width (its fluctuations are
    sums over the hidden units). The NNGP does not depend on width and its Monte Carlo error is the
    readout's (``~ sqrt(2 / (outputs · samples))``), so it is only bounded."""
    phi = CASES[name][0]
    x = jnp.asarray(_inputs()[:4])
    errors = []
    for width in (64, 1024):
        model, _ = _model(phi, width=width, x=x, outputs=32)
        nngp, ntk = infinite_kernel_fn(model)(x)
        mc_nngp, mc_ntk = mc.monte_carlo(model, x, n_samples=64, seed=3)
        errors.append((mc.rel_err(mc_nngp, nngp), mc.rel_err(mc_ntk, ntk)))
    assert errors[1][1] < errors[0][1] and errors[1][1] < 0.02, errors
    assert max(errors[0][0], errors[1][0]) < 0.08, errors

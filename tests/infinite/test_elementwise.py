"""Elementwise Gaussian expectations against Monte Carlo, quadrature and hand-derived limits.

The reference values here never come from ``ntk_adapters.infinite.elementwise``: Monte Carlo
samples of the bivariate normal drawn with numpy, nonlinearities and their derivatives written
out in numpy, explicit wide random layers, and limits derived by hand.
"""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.scipy.special import erf
from scipy import special

import ntk_adapters.flax as nflax
from ntk_adapters.infinite import elementwise as E
from ntk_adapters.infinite import infinite_kernel_fn
from ntk_adapters.infinite.kernel import Kernel

# (name, params, phi in numpy, phi' in numpy)
FUNCTIONS = [
    ("identity", {}, lambda x: x, lambda x: np.ones_like(x)),
    ("affine", dict(a=1.5, b=0.3), lambda x: 1.5 * x + 0.3, lambda x: np.full_like(x, 1.5)),
    ("relu", {}, lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    (
        "leaky_relu",
        dict(negative_slope=0.2),
        lambda x: np.where(x > 0, x, 0.2 * x),
        lambda x: np.where(x > 0, 1.0, 0.2),
    ),
    ("abs", {}, np.abs, np.sign),
    ("sign", {}, np.sign, lambda x: np.zeros_like(x)),
    (
        "erf",
        dict(a=0.7),
        lambda x: special.erf(0.7 * x),
        lambda x: 0.7 * 2 / math.sqrt(math.pi) * np.exp(-0.49 * x * x),
    ),
    ("sin", dict(a=1.3, b=0.4), lambda x: np.sin(1.3 * x + 0.4), lambda x: 1.3 * np.cos(1.3 * x + 0.4)),
    ("cos", dict(a=0.8, b=-0.3), lambda x: np.cos(0.8 * x - 0.3), lambda x: -0.8 * np.sin(0.8 * x - 0.3)),
    ("exp", dict(a=0.5), lambda x: np.exp(0.5 * x), lambda x: 0.5 * np.exp(0.5 * x)),
    ("square", {}, np.square, lambda x: 2 * x),
]

# (q1, q2, rho)
COVARIANCES = [(1.3, 0.7, 0.3), (2.0, 0.5, -0.6), (1.0, 1.0, 0.95)]
N_MC = 1_000_000


@pytest.fixture(scope="module")
def gaussian_samples():
    rng = np.random.default_rng(1234)
    out = []
    for q1, q2, rho in COVARIANCES:
        z1, z2 = rng.standard_normal((2, N_MC))
        u = math.sqrt(q1) * z1
        v = math.sqrt(q2) * (rho * z1 + math.sqrt(1 - rho * rho) * z2)
        out.append((q1, q2, rho * math.sqrt(q1 * q2), u, v))
    return out


def _mc_close(estimate_samples, value, n_se=5.0, floor=1e-12):
    mean = estimate_samples.mean()
    se = estimate_samples.std() / math.sqrt(estimate_samples.size)
    assert abs(float(value) - mean) <= n_se * se + floor, (float(value), mean, se)


@pytest.mark.parametrize("name,params,phi,dphi", FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_closed_form_matches_monte_carlo(gaussian_samples, name, params, phi, dphi):
    assert E.has_closed_form(name)
    for q1, q2, c, u, v in gaussian_samples:
        nngp, dd = E.gaussian_expectations(name, c, q1, q2, **params)
        _mc_close(phi(u) * phi(v), nngp)
        _mc_close(dphi(u) * dphi(v), dd)
        var, dvar = E.gaussian_variance(name, q1, derivative=True, **params)
        _mc_close(phi(u) ** 2, var)
        _mc_close(dphi(u) ** 2, dvar)


def test_elementwise_fn_matches_numpy():
    x = np.linspace(-3, 3, 13)
    for name, params, phi, _ in FUNCTIONS:
        np.testing.assert_allclose(E.elementwise_fn(name, **params)(jnp.asarray(x)), phi(x), atol=1e-12)


def test_relu_hand_values():
    # rho = 1/2: theta = pi/3, J1 = (sqrt(3)/2 + (2pi/3)(1/2)) / (2pi), J0 = 1/3; rho = 0: 1/(2pi), 1/4
    nngp, dd = E.gaussian_expectations("relu", jnp.array([0.5, 0.0]), 1.0, 1.0)
    np.testing.assert_allclose(nngp, [(math.sqrt(3) / 2 + math.pi / 3) / (2 * math.pi), 1 / (2 * math.pi)], rtol=1e-12)
    np.testing.assert_allclose(dd, [1 / 3, 1 / 4], rtol=1e-12)
    # homogeneity: scaling both variances by s scales J1 by s
    nngp4, _ = E.gaussian_expectations("relu", 4 * 0.5, 4.0, 4.0)
    np.testing.assert_allclose(nngp4, 4 * nngp[0], rtol=1e-12)


@pytest.mark.parametrize("name", ["erf", "sin", "cos", "exp", "square", "affine"])
def test_quadrature_matches_smooth_closed_forms(name):
    c = jnp.array([0.3, -0.9, 0.99, 0.0])
    q1 = jnp.array([1.0, 1.2, 1.0, 0.4])
    q2 = jnp.array([0.5, 1.0, 1.0, 2.0])
    c = c * jnp.sqrt(q1 * q2)
    cf = E.gaussian_expectations(name, c, q1, q2, method="closed_form")
    qd = E.gaussian_expectations(name, c, q1, q2, method="quadrature", n_points=64, rtol=None)
    np.testing.assert_allclose(qd[0], cf[0], atol=1e-9, rtol=1e-9)
    np.testing.assert_allclose(qd[1], cf[1], atol=1e-9, rtol=1e-9)


def test_quadrature_relu_is_close():
    """Plain 32-point Gauss–Hermite barely resolves the kink; the default (panels split at the
    kink, chosen for rtol=1e-6) does."""
    c = jnp.array([0.3, -0.6, 0.9])
    cf = E.gaussian_expectations("relu", c, 1.0, 1.0, method="closed_form")
    qd = E.gaussian_expectations("relu", c, 1.0, 1.0, method="quadrature", rtol=None)
    np.testing.assert_allclose(qd[0], cf[0], atol=3e-3)
    np.testing.assert_allclose(qd[1], cf[1], atol=4e-2)
    qd = E.gaussian_expectations("relu", c, 1.0, 1.0, method="quadrature")
    np.testing.assert_allclose(qd[0], cf[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(qd[1], cf[1], rtol=1e-6, atol=1e-9)


def test_quadrature_accuracy_table():
    """The figures quoted in the module docstring (plain Gauss–Hermite, n_points=32, q1 = q2 = 1)."""
    bounds = {  # (rho, name): (nngp error bound, derivative error bound)
        (0.3, "sin"): (1e-14, 1e-14),
        (0.99, "sin"): (1e-14, 1e-14),
        (-0.999, "sin"): (1e-14, 1e-14),
        (0.3, "erf"): (1e-10, 1e-9),
        (0.99, "erf"): (2e-7, 4e-6),
        (-0.999, "erf"): (2e-7, 4e-6),
        (0.3, "relu"): (2e-3, 3e-2),
        (0.99, "relu"): (2e-4, 2e-2),
        (-0.999, "relu"): (1e-5, 1e-2),
    }
    for (rho, name), (b0, b1) in bounds.items():
        cf = E.gaussian_expectations(name, rho, 1.0, 1.0)
        qd = E.gaussian_expectations(
            name, rho, 1.0, 1.0, method="quadrature", n_points=E.DEFAULT_QUADRATURE_POINTS, rtol=None
        )
        assert abs(float(qd[0] - cf[0])) < b0, (rho, name)
        assert abs(float(qd[1] - cf[1])) < b1, (rho, name)


QUAD_FUNCTIONS = [
    ("tanh", {}, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    (
        "gelu",
        dict(approximate=False),
        lambda x: 0.5 * x * (1 + special.erf(x / math.sqrt(2))),
        lambda x: 0.5 * (1 + special.erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi),
    ),
    ("softplus", {}, lambda x: np.logaddexp(0, x), special.expit),
]


@pytest.mark.parametrize("name,params,phi,dphi", QUAD_FUNCTIONS, ids=[f[0] for f in QUAD_FUNCTIONS])
def test_quadrature_functions_match_monte_carlo(gaussian_samples, name, params, phi, dphi):
    for q1, q2, c, u, v in gaussian_samples:
        nngp, dd = E.gaussian_expectations(name, c, q1, q2, **params)
        _mc_close(phi(u) * phi(v), nngp)
        _mc_close(dphi(u) * dphi(v), dd)


def test_callable_with_params_uses_quadrature(gaussian_samples):
    q1, q2, c, u, v = gaussian_samples[1]
    f = lambda x, k: jnp.tanh(k * x) + 0.1 * x  # noqa: E731
    nngp, dd = E.gaussian_expectations(f, c, q1, q2, k=1.5, n_points=48)
    ref = np.tanh(1.5 * u) + 0.1 * u, np.tanh(1.5 * v) + 0.1 * v
    _mc_close(ref[0] * ref[1], nngp)
    dref = 1.5 * (1 - np.tanh(1.5 * u) ** 2) + 0.1, 1.5 * (1 - np.tanh(1.5 * v) ** 2) + 0.1
    _mc_close(dref[0] * dref[1], dd)


ALL_NAMES = list(E.CLOSED_FORMS) + ["tanh", "gelu", "relu6", "softplus"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_correlation_plus_minus_one_and_beyond(name):
    q1, q2 = 1.5, 0.6
    s = math.sqrt(q1 * q2)
    c = jnp.array([s, -s, 1.0000001 * s, -1.0000001 * s])
    nngp, dd = E.gaussian_expectations(name, c, q1, q2)
    assert np.all(np.isfinite(nngp)) and np.all(np.isfinite(dd))


def test_correlation_plus_minus_one_values():
    # rho = 1 with q1 = q2 = q: u = v, so E[relu(u)^2] = q/2, E[1{u>0}] = 1/2; rho = -1: disjoint supports.
    q = 1.7
    nngp, dd = E.gaussian_expectations("relu", jnp.array([q, -q]), q, q)
    np.testing.assert_allclose(nngp, [q / 2, 0.0], atol=1e-12)
    np.testing.assert_allclose(dd, [0.5, 0.0], atol=1e-12)
    nngp, dd = E.gaussian_expectations("abs", jnp.array([q, -q]), q, q)
    np.testing.assert_allclose(nngp, [q, q], atol=1e-12)  # |u| |±u| = u²
    np.testing.assert_allclose(dd, [1.0, -1.0], atol=1e-12)


def test_zero_variance_factorizes():
    # u == 0: E[phi(u) phi(v)] = phi(0) E[phi(v)], with JAX's phi'(0) for the derivative.
    q = jnp.array([0.0, 0.0, 1.0])
    q2 = jnp.array([0.0, 1.0, 0.0])
    c = jnp.zeros(3)
    for name in E.CLOSED_FORMS + ("tanh", "gelu"):
        nngp, dd = E.gaussian_expectations(name, c, q, q2)
        assert np.all(np.isfinite(nngp)) and np.all(np.isfinite(dd)), name
    nngp, dd = E.gaussian_expectations("relu", c, q, q2)
    np.testing.assert_array_equal(nngp, 0.0)
    np.testing.assert_array_equal(dd, 0.0)  # relu'(0) = 0 in JAX
    _, dd = E.gaussian_expectations("leaky_relu", c, q, q2, negative_slope=0.2)
    np.testing.assert_allclose(dd, [1.0, 0.6, 0.6])  # leaky'(0) = 1, E[leaky'(v)] = (1 + 0.2)/2
    nngp, dd = E.gaussian_expectations("cos", c, q, q2)
    np.testing.assert_allclose(nngp, [1.0, math.exp(-0.5), math.exp(-0.5)], rtol=1e-12)
    nngp, dd = E.gaussian_expectations("tanh", c, q, q2, n_points=96)
    np.testing.assert_allclose(nngp, 0.0, atol=1e-15)
    # tanh'(0) = 1 times E[sech^2(v)], v ~ N(0, 1): a 1-D integral done with scipy.
    from scipy import integrate

    ref = integrate.quad(lambda x: (1 - np.tanh(x) ** 2) * np.exp(-x * x / 2) / math.sqrt(2 * math.pi), -12, 12)[0]
    np.testing.assert_allclose(dd, [1.0, ref, ref], rtol=1e-9)


def test_zero_variance_is_nan_free_under_jit_and_grad():
    f = jax.jit(lambda c, q: E.gaussian_expectations("relu", c, q, q)[0].sum())
    g = jax.grad(f)(jnp.array([0.0, 0.3]), jnp.array([0.0, 1.0]))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("name", ["relu", "abs", "sign", "leaky_relu", "erf", "tanh"])
def test_gradients_through_same_input_diagonal(name):
    """Kernels of x with itself have rho = 1 exactly on the diagonal; gradients w.r.t. x stay finite
    and match central finite differences."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 4)))

    def total(x):
        nngp = x @ x.T / 4
        q = jnp.diag(nngp)
        out, dd = E.gaussian_expectations(name, nngp, q[:, None], q[None, :])
        return jnp.sum(out) + 0.5 * jnp.sum(dd)

    g = jax.grad(total)(x)
    assert np.all(np.isfinite(g))
    eps = 1e-6
    e = np.zeros((3, 4))
    e[1, 2] = eps
    fd = (total(x + e) - total(x - e)) / (2 * eps)
    np.testing.assert_allclose(g[1, 2], fd, rtol=1e-5, atol=1e-7)


def test_errors():
    with pytest.raises(ValueError, match="unknown elementwise function"):
        E.gaussian_expectations("relu7", 0.1, 1.0, 1.0)
    with pytest.raises(TypeError, match="negative_slope"):
        E.gaussian_expectations("leaky_relu", 0.1, 1.0, 1.0, slope=0.1)
    with pytest.raises(ValueError, match="no closed form"):
        E.gaussian_expectations("tanh", 0.1, 1.0, 1.0, method="closed_form")


# ----------------------------------------------------------------------------------------------
# The Kernel-level entry point.


def _dense_kernel(x1, x2=None, layout="none"):
    """The kernel of a Dense(σw² = 1, no bias) applied to inputs, written out in the test."""
    same = x2 is None
    x2 = x1 if same else x2
    d = x1.shape[-1]
    nngp = np.einsum("i...c,j...c->ij...", x1, x2) / d
    cov1 = np.einsum("i...c,i...c->i...", x1, x1) / d
    cov2 = np.einsum("i...c,i...c->i...", x2, x2) / d
    return Kernel(
        nngp=jnp.asarray(nngp),
        ntk=jnp.asarray(nngp),
        cov1=jnp.asarray(cov1),
        cov2=jnp.asarray(cov2),
        layout=layout,
        is_gaussian=True,
        same_inputs=same,
    )


def test_apply_elementwise_matches_wide_random_layer():
    """relu(x W) with W ~ N(0, 1/d) and 200k hidden units: channel averages vs the kernel."""
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((3, 5))
    x2 = rng.standard_normal((2, 5))
    k = E.apply_elementwise(_dense_kernel(x1, x2), "relu")
    width = 200_000
    w = rng.standard_normal((5, width)) / math.sqrt(5)
    h1, h2 = x1 @ w, x2 @ w
    emp = np.maximum(h1, 0) @ np.maximum(h2, 0).T / width
    np.testing.assert_allclose(k.nngp, emp, atol=0.01)
    np.testing.assert_allclose(k.cov1, (np.maximum(h1, 0) ** 2).mean(1), rtol=0.02)
    emp_d = (h1 > 0).astype(float) @ (h2 > 0).T.astype(float) / width
    np.testing.assert_allclose(k.ntk, emp_d * (x1 @ x2.T / 5), atol=0.01)  # ntk_in = nngp_in here
    assert not k.is_gaussian


def test_apply_elementwise_full_layout_entrywise():
    """'full' layout: every entry uses the variances of its own two positions (explicit loops)."""
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal((2, 3, 2, 4))
    x2 = rng.standard_normal((2, 3, 2, 4))
    d = 4
    nngp = np.einsum("ahwc,bHWc->abhHwW", x1, x2) / d
    cov1 = np.einsum("ahwc,aHWc->ahHwW", x1, x1) / d
    cov2 = np.einsum("ahwc,aHWc->ahHwW", x2, x2) / d
    k = Kernel(
        nngp=jnp.asarray(nngp),
        ntk=jnp.asarray(2 * nngp),
        cov1=jnp.asarray(cov1),
        cov2=jnp.asarray(cov2),
        layout="full",
        is_gaussian=True,
    )
    out = E.apply_elementwise(k, "erf", a=0.5)

    def erf_k(c, q1, q2):  # Williams' formula, written again here
        return 2 / math.pi * math.asin(0.5 * c / math.sqrt((1 + 0.5 * q1) * (1 + 0.5 * q2)))

    def erf_dd(c, q1, q2):
        return (4 * 0.25 / math.pi) / math.sqrt((1 + 0.5 * q1) * (1 + 0.5 * q2) - 0.25 * c * c)

    for a in range(2):
        for b in range(2):
            for h in range(3):
                for H in range(3):
                    for w in range(2):
                        for W in range(2):
                            q1 = cov1[a, h, h, w, w]
                            q2 = cov2[b, H, H, W, W]
                            c = nngp[a, b, h, H, w, W]
                            np.testing.assert_allclose(out.nngp[a, b, h, H, w, W], erf_k(c, q1, q2), rtol=1e-10)
                            np.testing.assert_allclose(out.ntk[a, b, h, H, w, W], erf_dd(c, q1, q2) * 2 * c, rtol=1e-10)
                            if a == b:
                                c1 = cov1[a, h, H, w, W]
                                ref = erf_k(c1, cov1[a, h, h, w, w], cov1[a, H, H, W, W])
                                np.testing.assert_allclose(out.cov1[a, h, H, w, W], ref, rtol=1e-10)


def test_apply_elementwise_diagonal_equals_full_diagonal():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 3, 5))
    full = _dense_kernel(x, layout="full")
    full = full.replace(
        nngp=jnp.asarray(np.einsum("ahwc,bHWc->abhHwW", x, x) / 5),
        ntk=jnp.asarray(np.einsum("ahwc,bHWc->abhHwW", x, x) / 5),
        cov1=jnp.asarray(np.einsum("ahwc,aHWc->ahHwW", x, x) / 5),
        cov2=jnp.asarray(np.einsum("ahwc,aHWc->ahHwW", x, x) / 5),
    )
    diag = _dense_kernel(x, layout="diagonal")
    for phi in ["relu", jnp.tanh]:
        f = E.apply_elementwise(full, phi)
        g = E.apply_elementwise(diag, phi)
        fd = np.einsum("abhhww->abhw", np.asarray(f.nngp))
        np.testing.assert_allclose(fd, g.nngp, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.einsum("abhhww->abhw", np.asarray(f.ntk)), g.ntk, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.einsum("ahhww->ahw", np.asarray(f.cov1)), g.cov1, rtol=1e-10, atol=1e-12)


def test_apply_elementwise_requires_gaussian():
    k = _dense_kernel(np.ones((2, 3))).replace(is_gaussian=False)
    with pytest.raises(ValueError, match="not a zero-mean Gaussian"):
        E.apply_elementwise(k, "relu")


def test_identity_keeps_gaussian_and_ntk_none():
    k = _dense_kernel(np.eye(3)).replace(ntk=None)
    out = E.apply_elementwise(k, "identity")
    assert out.is_gaussian and out.ntk is None
    np.testing.assert_allclose(out.nngp, k.nngp)


def test_apply_elementwise_jits():
    k = _dense_kernel(np.random.default_rng(3).standard_normal((4, 3)))
    f = jax.jit(lambda k: E.apply_elementwise(k, "gelu"))
    out = f(k)
    assert out.nngp.shape == (4, 4) and not out.is_gaussian


@settings(max_examples=25, deadline=None)
@example(x=np.array([[1.0, 1e-85, 1e-85]] + [[1e-85] * 3] * 4), name="sign")  # q1·q2 underflows
@given(
    x=hnp.arrays(np.float64, (5, 3), elements=st.floats(-3, 3, allow_nan=False, width=64)),
    name=st.sampled_from(["relu", "abs", "erf", "sin", "cos", "exp", "leaky_relu", "sign", "tanh", "square"]),
)
def test_nngp_symmetric_psd(x, name):
    k = _dense_kernel(x)
    out = E.apply_elementwise(k, name)
    nngp = np.asarray(out.nngp)
    np.testing.assert_allclose(nngp, nngp.T, atol=1e-12)
    scale = max(1.0, np.abs(nngp).max())
    assert np.linalg.eigvalsh(nngp).min() >= -1e-8 * scale
    np.testing.assert_allclose(np.diag(nngp), out.cov1, rtol=1e-9, atol=1e-12)


class _DeepMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = erf(nn.Dense(64)(x))
        x = nn.gelu(nn.Dense(64)(x))  # tanh approximation: quadrature
        return nn.Dense(3)(nn.leaky_relu(nn.Dense(64)(x), 0.1))


class _FlattenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))  # diagonal layout: (N, N, H, W) kernels
        return nn.Dense(3)(nn.relu(nn.Conv(8, (3, 3))(x)).reshape(x.shape[0], -1))


class _PoolingCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))  # full layout: the variances are nngp's own diagonal
        return nn.Dense(3)(nn.relu(nn.Conv(8, (3, 3))(x)).mean((1, 2)))


@pytest.mark.parametrize(
    "module,shape",
    [(_DeepMLP(), (12, 7)), (_FlattenCNN(), (6, 5, 5, 2)), (_PoolingCNN(), (5, 4, 4, 2))],
    ids=["mlp", "flatten_cnn", "pooling_cnn"],
)
def test_same_input_diagonal_is_exact_in_float32(module, shape):
    """K(x, x)'s diagonal is the variances' own map: its Gram and sum of squares differ in the last
    bits, which would give an angle of sqrt(2ε) (5e-4 in float32) instead of 0 there. Against the
    float64 kernel of the same model: the diagonal to float32 round-off, as the off-diagonal."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    x[1] = 3.0 * x[0]  # parallel inputs: unit correlation off the diagonal, where nothing is exact
    model = nflax.adapt(module, None, jnp.asarray(x[:2], jnp.float32))
    kernel_fn = infinite_kernel_fn(model)
    k32, k64 = kernel_fn(jnp.asarray(x, jnp.float32)), kernel_fn(jnp.asarray(x, jnp.float64))
    for name in ("nngp", "ntk"):
        got, want = np.asarray(getattr(k32, name), np.float64), np.asarray(getattr(k64, name))
        assert getattr(k32, name).dtype == jnp.float32
        n = want.shape[0]
        diag_err = np.abs(got[np.arange(n), np.arange(n)] - want[np.arange(n), np.arange(n)])
        assert np.max(diag_err / np.abs(want[np.arange(n), np.arange(n)])) < 2e-6, name
        # elsewhere parallel inputs keep the sqrt(ε) conditioning of the angle
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4, name

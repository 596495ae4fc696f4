"""Tests of ntk_adapters.predict.gradient_descent_mse_ensemble and gp_inference: Monte Carlo over
random initializations of a wide ReLU network whose infinite-width kernels are the arc-cosine
kernels written out by hand, and Gaussian conditioning through the joint precision matrix.
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_adapters import predict

D = 3


def _relu_kernels(x1, x2, width, sw2=2.0, sv2=1.0):
    """NNGP and standard-parameterization NTK of f(x) = W2·relu(W1 x), written out by hand.

    W1 ~ N(0, sw2/d), W2 ~ N(0, sv2/width). Pre-activations have covariance q = sw2 x·x'/d;
    E[relu(u) relu(v)] = √(q11 q22)/(2π) (sin θ + (π − θ) cos θ), E[relu'(u) relu'(v)] = (π − θ)/(2π).
    NNGP = sv2·E[relu relu]; NTK = width·E[relu relu] (readout) + sv2·E[relu' relu']·x·x' (W1).
    """
    d = x1.shape[1]
    dot = x1 @ x2.T
    q12 = sw2 * dot / d
    q1 = sw2 * np.sum(x1**2, 1) / d
    q2 = sw2 * np.sum(x2**2, 1) / d
    norm = np.sqrt(np.outer(q1, q2))
    cos = np.clip(q12 / norm, -1, 1)
    theta = np.arccos(cos)
    e_relu = norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    e_step = (np.pi - theta) / (2 * np.pi)
    return sv2 * e_relu, width * e_relu + sv2 * e_step * dot


def _kernel_fn_for(width):
    def kernel_fn(x1, x2=None, get=("nngp", "ntk")):
        x2 = x1 if x2 is None else x2
        nngp, ntk = _relu_kernels(np.asarray(x1), np.asarray(x2), width)
        values = dict(nngp=nngp, ntk=ntk)
        if isinstance(get, str):
            return values[get]
        return collections.namedtuple("K", get)(*(values[g] for g in get))

    return kernel_fn


@pytest.fixture(scope="module")
def relu_setup():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, D))
    xt = rng.standard_normal((3, D))
    y = rng.standard_normal((6, 1))
    return x, xt, y


@pytest.mark.slow
def test_ensemble_matches_monte_carlo_over_wide_relu_networks(relu_setup):
    x, xt, y = relu_setup
    width, samples, chunk = 1024, 4000, 500
    xs = jnp.asarray(np.concatenate([x, xt], 0))
    n = x.shape[0]
    kernel_fn = _kernel_fn_for(width)
    k_nngp, k_ntk = kernel_fn(x)
    rate = 1.0 / y.size  # learning_rate 1: t steps are time t
    t = 1.5 / (rate * np.linalg.eigvalsh(k_ntk).max())

    def net(params, inputs):
        w1, w2 = params
        return jax.nn.relu(inputs @ w1) @ w2

    def draw(key):
        k1, k2 = jax.random.split(key)
        w1 = jax.random.normal(k1, (D, width)) * math.sqrt(2.0 / D)
        w2 = jax.random.normal(k2, (width, 1)) * math.sqrt(1.0 / width)
        return w1, w2

    def trained_outputs(key):
        """One linearized network trained to time t and to convergence, in closed form from its
        own empirical NTK (explicit Jacobians), eigendecomposed here."""
        params = draw(key)
        flat, unravel = ravel_pytree(params)
        jac = jax.jacobian(lambda p: net(unravel(p), xs)[:, 0])(flat)  # (N+M, P)
        theta = jac @ jac[:n].T
        f0 = net(params, xs)
        lam, vec = jnp.linalg.eigh(theta[:n])
        resid = vec.T @ (y - f0[:n])
        at_t = theta[n:] @ vec @ ((-jnp.expm1(-rate * lam * t) / lam)[:, None] * resid)
        at_inf = theta[n:] @ jnp.linalg.solve(theta[:n], y - f0[:n])
        return f0[n:, 0] + at_t[:, 0], f0[n:, 0] + at_inf[:, 0]

    run = jax.jit(jax.vmap(trained_outputs))
    keys = jax.random.split(jax.random.PRNGKey(6), samples)
    outs = [run(keys[i : i + chunk]) for i in range(0, samples, chunk)]
    mc_t = np.concatenate([o[0] for o in outs])
    mc_inf = np.concatenate([o[1] for o in outs])

    ensemble = predict.gradient_descent_mse_ensemble(kernel_fn, x, y)
    for time, mc in ((t, mc_t), (None, mc_inf)):
        pred = ensemble(time, xt, get=("nngp", "ntk"), compute_cov=True).ntk
        mean, cov = np.asarray(pred.mean[:, 0]), np.asarray(pred.covariance)
        mc_mean, mc_cov = mc.mean(0), np.cov(mc.T)
        sd = np.sqrt(np.diag(mc_cov))
        se_mean = sd / math.sqrt(samples)
        se_cov = np.sqrt((np.outer(sd**2, sd**2) + mc_cov**2) / samples)
        # Monte Carlo error plus a small allowance for the O(1/sqrt(width)) finite-width spread.
        assert np.all(np.abs(mean - mc_mean) < 5 * se_mean + 0.02 * sd), (time, mean, mc_mean)
        assert np.all(np.abs(cov - mc_cov) < 5 * se_cov + 0.03 * np.outer(sd, sd)), (time, cov, mc_cov)
        # Not trivially satisfied: the trained ensemble differs from the prior.
        assert np.max(np.abs(mc_cov - kernel_fn(xt).nngp)) > 10 * np.max(se_cov)


@pytest.mark.float64
def test_ntk_ensemble_is_eq16_and_train_mode_is_consistent(relu_setup):
    x, xt, y = relu_setup
    kernel_fn = _kernel_fn_for(64)
    knn, ktk = kernel_fn(x)
    knn_t, ktk_t = kernel_fn(xt, x)
    knn_tt = kernel_fn(xt).nngp
    rate = 1.0 / y.size
    t = 0.7 / (rate * np.linalg.eigvalsh(ktk).max())
    ensemble = predict.gradient_descent_mse_ensemble(kernel_fn, x, y)
    out = ensemble(np.array([t, 3 * t]), xt, "ntk", compute_cov=True)
    assert out.mean.shape == (2, 3, 1) and out.covariance.shape == (2, 3, 3)
    for i, s in enumerate([t, 3 * t]):
        lam, vec = np.linalg.eigh(ktk)
        a = ktk_t @ vec @ np.diag((1 - np.exp(-rate * lam * s)) / lam) @ vec.T
        cov = knn_tt - a @ knn_t.T - knn_t @ a.T + a @ knn @ a.T
        np.testing.assert_allclose(out.mean[i], a @ y, atol=1e-10)
        np.testing.assert_allclose(out.covariance[i], cov, atol=1e-10)
    # Predicting on the training set (x_test=None) equals passing x_train as test points.
    a = ensemble(t, None, ("nngp", "ntk"), compute_cov=True)
    b = ensemble(t, x, ("nngp", "ntk"), compute_cov=True)
    for name in ("nngp", "ntk"):
        np.testing.assert_allclose(getattr(a, name).mean, getattr(b, name).mean, atol=1e-9)
        np.testing.assert_allclose(getattr(a, name).covariance, getattr(b, name).covariance, atol=1e-9)
    # Means alone when compute_cov=False; a single name gives a bare array.
    assert ensemble(t, xt, "nngp").shape == (3, 1)


@pytest.mark.float64
def test_ensemble_and_gp_with_full_kernels_equal_per_output(relu_setup):
    x, xt, _ = relu_setup
    y = np.random.default_rng(8).standard_normal((x.shape[0], 2))
    per_fn = _kernel_fn_for(64)
    eye = np.eye(2)

    def full_fn(x1, x2=None, get=("nngp", "ntk")):
        k = per_fn(x1, x2, get=get)
        return type(k)(*(np.einsum("nm,op->nmop", v, eye) for v in k))

    t = 0.5
    per = predict.gradient_descent_mse_ensemble(per_fn, x, y)(t, xt, compute_cov=True)
    full = predict.gradient_descent_mse_ensemble(full_fn, x, y)(t, xt, compute_cov=True)
    for name in ("nngp", "ntk"):
        a, b = getattr(per, name), getattr(full, name)
        assert b.mean.shape == (3, 2) and b.covariance.shape == (3, 3, 2, 2)
        np.testing.assert_allclose(b.mean, a.mean, atol=1e-10)
        np.testing.assert_allclose(b.covariance, np.einsum("nm,op->nmop", a.covariance, eye), atol=1e-10)
    k_per, k_full = per_fn(x), full_fn(x)
    gp_per = predict.gp_inference(k_per, y, 0.01)("nngp", per_fn(xt, x), per_fn(xt))
    gp_full = predict.gp_inference(k_full, y, 0.01)("nngp", full_fn(xt, x), full_fn(xt))
    np.testing.assert_allclose(gp_full.mean, gp_per.mean, atol=1e-10)
    np.testing.assert_allclose(gp_full.covariance, np.einsum("nm,op->nmop", gp_per.covariance, eye), atol=1e-10)


def _condition(joint, y, n_obs, noise):
    """Posterior of the first block given noisy observations of the second, via the joint precision."""
    cov = joint.copy()
    cov[-n_obs:, -n_obs:] += noise * np.eye(n_obs)
    prec = np.linalg.inv(cov)
    m = joint.shape[0] - n_obs
    post_cov = np.linalg.inv(prec[:m, :m])
    post_mean = -post_cov @ prec[:m, m:] @ y
    return post_mean, post_cov


@pytest.mark.float64
@pytest.mark.parametrize("diag_reg", [0.0, 0.1])
def test_gp_inference_is_gaussian_conditioning_and_the_ensemble_limit(relu_setup, diag_reg):
    x, xt, y = relu_setup
    kernel_fn = _kernel_fn_for(64)
    k_train, k_test_train, k_test = kernel_fn(x), kernel_fn(xt, x), kernel_fn(xt)
    posterior = predict.gp_inference(k_train, y, diag_reg=diag_reg)(("nngp", "ntk", "ntkgp"), k_test_train, k_test)
    # 'nngp' and 'ntkgp' are GP posteriors with the NNGP / the NTK as prior covariance.
    for name, kernel in (("nngp", "nngp"), ("ntkgp", "ntk")):
        kk = getattr(k_train, kernel)
        joint = np.block(
            [[getattr(k_test, kernel), getattr(k_test_train, kernel)], [getattr(k_test_train, kernel).T, kk]]
        )
        noise = diag_reg * np.trace(kk) / kk.shape[0]
        mean, cov = _condition(joint, y, x.shape[0], noise)
        np.testing.assert_allclose(getattr(posterior, name).mean, mean, atol=1e-8)
        np.testing.assert_allclose(getattr(posterior, name).covariance, cov, atol=1e-8)
    # 'ntk' is the trained ensemble at t → ∞ (eq. 16): diag_reg on the NTK, the prior unregularized.
    theta = k_train.ntk + diag_reg * np.trace(k_train.ntk) / x.shape[0] * np.eye(x.shape[0])
    a = np.linalg.solve(theta, k_test_train.ntk.T).T
    cov = k_test.nngp - a @ k_test_train.nngp.T - k_test_train.nngp @ a.T + a @ k_train.nngp @ a.T
    np.testing.assert_allclose(posterior.ntk.mean, a @ y, atol=1e-8)
    np.testing.assert_allclose(posterior.ntk.covariance, cov, atol=1e-8)
    ensemble = predict.gradient_descent_mse_ensemble(kernel_fn, x, y, diag_reg=diag_reg)
    inf = ensemble(None, xt, ("nngp", "ntk"), compute_cov=True)
    for name in ("nngp", "ntk"):
        np.testing.assert_allclose(getattr(inf, name).mean, getattr(posterior, name).mean, atol=1e-9)
        np.testing.assert_allclose(getattr(inf, name).covariance, getattr(posterior, name).covariance, atol=1e-9)
        # Late finite time (the eigenbasis) approaches infinity (the Cholesky solves).
        late = ensemble(1e9, xt, name, compute_cov=True)
        np.testing.assert_allclose(late.mean, getattr(inf, name).mean, atol=1e-7)
        np.testing.assert_allclose(late.covariance, getattr(inf, name).covariance, atol=1e-7)


@pytest.mark.float64
def test_gp_inference_bare_array_and_train_points(predict_problem):
    k, y = predict_problem["k"], predict_problem["y"]
    # The training points: N(y_train, 0); any non-None k_test_test asks for the covariance.
    post = predict.gp_inference(k, y, diag_reg=0.1)("nngp", None, True)
    np.testing.assert_allclose(post.mean, y, atol=1e-12)
    np.testing.assert_allclose(post.covariance, np.zeros((k.shape[0],) * 2), atol=1e-12)
    # Without k_test_test the mean itself is returned.
    mean_only = predict.gp_inference(k, y)("ntk", predict_problem["kt"])
    assert mean_only.shape == (predict_problem["kt"].shape[0], 2)
    np.testing.assert_allclose(mean_only, predict_problem["kt"] @ np.linalg.solve(k, y), atol=1e-10)

"""Tests of ntk_adapters.predict against independent references.

References used here: numerical integration of the ODEs written in this file (RK4), gradient
descent on a linearized plain-jax network with its NTK from explicit Jacobians, numpy solves,
Gaussian conditioning through the joint precision matrix, discrete (heavy-ball) iterations, and
Monte Carlo over random initializations of a wide ReLU network whose infinite-width kernels are
the arc-cosine kernels written out by hand.
"""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_adapters import predict

N, M, D = 8, 5, 3


# ---------------------------------------------------------------------------------------------
# Shared data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    """A generic PSD kernel on N train + M test points (from random features) and targets."""
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((N + M, 30))
    k = phi @ phi.T / 30 + 0.05 * np.eye(N + M)  # jitter keeps the train block well conditioned
    k_train, k_test_train, k_test = k[:N, :N], k[N:, :N], k[N:, N:]
    y = rng.standard_normal((N, 2))
    f0 = rng.standard_normal((N, 2))
    f0_test = rng.standard_normal((M, 2))
    return dict(k=k_train, kt=k_test_train, ktt=k_test, y=y, f0=f0, f0t=f0_test)


def _rk4(rhs, state, t_end, steps):
    h = t_end / steps
    for _ in range(steps):
        k1 = rhs(state)
        k2 = rhs(state + h / 2 * k1)
        k3 = rhs(state + h / 2 * k2)
        k4 = rhs(state + h * k3)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


# ---------------------------------------------------------------------------------------------
# gradient_descent_mse
# ---------------------------------------------------------------------------------------------


@pytest.mark.float64
def test_mse_matches_rk4_integration_of_the_ode(problem):
    k, kt, y, f0, f0t = problem["k"], problem["kt"], problem["y"], problem["f0"], problem["f0t"]
    lr = 0.7
    rate = 1.0 / y.size  # loss ½·mean over N·O entries, time = k·η after k steps
    # Stack train and test outputs: df/dt = −η' Θ(·, X) (f(X) − y).
    kk = np.concatenate([k, kt], 0)

    def rhs(state):
        return -rate * kk @ (state[:N] - y)

    lam_max = np.linalg.eigvalsh(k).max()
    times = [0.0, 0.3 / (rate * lam_max), 4.0 / (rate * lam_max), 40.0 / (rate * lam_max)]
    predict_fn = predict.gradient_descent_mse(k, y, learning_rate=lr)
    steps = np.asarray(times) / lr  # t counts steps of the learning rate: time = lr · t
    train, test = predict_fn(jnp.asarray(steps), f0, f0t, kt)
    assert train.shape == (4, N, 2) and test.shape == (4, M, 2)
    state = np.concatenate([f0, f0t], 0)
    for i, t in enumerate(times):
        if i:
            state = _rk4(rhs, state, t - times[i - 1], 400)
        np.testing.assert_allclose(train[i], state[:N], atol=1e-8)
        np.testing.assert_allclose(test[i], state[N:], atol=1e-8)
    # A scalar time gives no time axis and the same numbers.
    train_s, test_s = predict_fn(steps[2], f0, f0t, kt)
    np.testing.assert_allclose(train_s, train[2], atol=1e-12)
    np.testing.assert_allclose(test_s, test[2], atol=1e-12)


@pytest.mark.float64
def test_t_none_is_the_kernel_regression_solve(problem):
    k, kt, y, f0, f0t = problem["k"], problem["kt"], problem["y"], problem["f0"], problem["f0t"]
    predict_fn = predict.gradient_descent_mse(k, y, learning_rate=1.0)
    train, test = predict_fn(None, f0, f0t, kt)
    np.testing.assert_allclose(train, y, atol=1e-12)
    np.testing.assert_allclose(test, f0t + kt @ np.linalg.solve(k, y - f0), atol=1e-10)
    # Zero initial test outputs, training outputs skipped (fx_train_0=None): K(x, X) K⁻¹ y.
    test0 = predict_fn(None, None, 0.0, kt)
    np.testing.assert_allclose(test0, kt @ np.linalg.solve(k, y), atol=1e-10)


@pytest.mark.float64
def test_diag_reg_is_ridge_scaled_by_mean_diagonal(problem):
    k, kt, y = problem["k"], problem["kt"], problem["y"]
    reg = 0.3
    ridge = k + reg * np.trace(k) / N * np.eye(N)
    test = predict.gradient_descent_mse(k, y, diag_reg=reg)(None, None, 0.0, kt)
    np.testing.assert_allclose(test, kt @ np.linalg.solve(ridge, y), atol=1e-10)
    absolute = k + reg * np.eye(N)
    test = predict.gradient_descent_mse(k, y, diag_reg=reg, diag_reg_absolute_scale=True)(None, None, 0.0, kt)
    np.testing.assert_allclose(test, kt @ np.linalg.solve(absolute, y), atol=1e-10)


@pytest.mark.float64
def test_full_kernel_kron_identity_equals_per_output(problem):
    k, kt, y, f0, f0t = problem["k"], problem["kt"], problem["y"], problem["f0"], problem["f0t"]
    eye = np.eye(2)
    k_full = np.einsum("nm,op->nmop", k, eye)
    kt_full = np.einsum("nm,op->nmop", kt, eye)
    per = predict.gradient_descent_mse(k, y, 0.5)
    full = predict.gradient_descent_mse(k_full, y, 0.5)
    for t in (None, 3.0, jnp.array([0.5, 50.0])):
        a_train, a_test = per(t, f0, f0t, kt)
        b_train, b_test = full(t, f0, f0t, kt_full)
        np.testing.assert_allclose(a_train, b_train, atol=1e-10)
        np.testing.assert_allclose(a_test, b_test, atol=1e-10)


@pytest.mark.float64
def test_trailing_output_axes_equal_flattened_outputs(problem):
    k, kt = problem["k"], problem["kt"]
    rng = np.random.default_rng(1)
    y = rng.standard_normal((N, 2, 3))
    a_train, a_test = predict.gradient_descent_mse(k, y)(2.0, 0.0, 0.0, kt)
    b_train, b_test = predict.gradient_descent_mse(k, y.reshape(N, 6))(2.0, 0.0, 0.0, kt)
    assert a_train.shape == (N, 2, 3) and a_test.shape == (M, 2, 3)
    np.testing.assert_allclose(a_train.reshape(N, 6), b_train, atol=1e-12)
    np.testing.assert_allclose(a_test.reshape(M, 6), b_test, atol=1e-12)
    # One output as a vector. The flow rate is 1/(N·O): one output at t/6 moves like six at t.
    v_train = predict.gradient_descent_mse(k, y[:, 0, 0])(2.0 / 6)
    assert v_train.shape == (N,)
    np.testing.assert_allclose(v_train, b_train[:, 0], atol=1e-12)


@pytest.mark.float64
def test_learning_rate_only_sets_the_time_unit_and_warns_past_the_edge(problem):
    k, kt, y = problem["k"], problem["kt"], problem["y"]
    edge = 2 * y.size / np.linalg.eigvalsh(k).max()
    # 300 steps of 0.01·edge and 6 steps of 0.5·edge are the same time 3·edge.
    a = predict.gradient_descent_mse(k, y, 0.01 * edge)(300.0, 0.0, 0.0, kt)
    b = predict.gradient_descent_mse(k, y, 0.5 * edge)(6.0, 0.0, 0.0, kt)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, atol=1e-13)
    # ... and the same number of steps at another learning rate is another time.
    c = predict.gradient_descent_mse(k, y, 0.5 * edge)(300.0, 0.0, 0.0, kt)
    assert np.max(np.abs(np.asarray(c[0]) - np.asarray(a[0]))) > 0.1
    with pytest.warns(UserWarning, match="stability edge"):
        predict.gradient_descent_mse(k, y, 1.01 * edge)


@pytest.mark.float64
def test_float32_inputs_stay_float32_and_agree_with_float64(problem):
    k, kt, y = problem["k"], problem["kt"], problem["y"]
    a_train, a_test = predict.gradient_descent_mse(k.astype(np.float32), y.astype(np.float32))(
        jnp.array([1.0, 5.0], jnp.float32), 0.0, 0.0, kt.astype(np.float32)
    )
    assert a_train.dtype == jnp.float32 and a_test.dtype == jnp.float32
    b_train, b_test = predict.gradient_descent_mse(k, y)(jnp.array([1.0, 5.0]), 0.0, 0.0, kt)
    assert b_train.dtype == jnp.float64
    np.testing.assert_allclose(a_train, b_train, atol=1e-4)
    np.testing.assert_allclose(a_test, b_test, atol=1e-4)


@pytest.mark.float64
def test_jit_over_time_matches_eager(problem):
    k, kt, y, f0, f0t = problem["k"], problem["kt"], problem["y"], problem["f0"], problem["f0t"]
    predict_fn = predict.gradient_descent_mse(k, y, 0.3)
    jitted = jax.jit(lambda t, a, b: predict_fn(t, a, b, kt))
    ts = jnp.array([0.0, 1.0, 10.0])
    for got, want in zip(jitted(ts, f0, f0t), predict_fn(ts, f0, f0t, kt)):
        np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.float64
def test_singular_kernel_warns_and_infinite_time_is_the_limit():
    rng = np.random.default_rng(2)
    phi = rng.standard_normal((N + M, 3))  # rank 3 kernel on N = 8 points
    k_all = phi @ phi.T
    k, kt = k_all[:N, :N], k_all[N:, :N]
    y = rng.standard_normal((N, 1))
    with pytest.warns(UserWarning, match="singular"):
        predict_fn = predict.gradient_descent_mse(k, y)
    inf_train, inf_test = predict_fn(None, 0.0, 0.0, kt)
    late_train, late_test = predict_fn(1e9, 0.0, 0.0, kt)
    assert np.all(np.isfinite(inf_test)) and np.all(np.isfinite(late_test))
    np.testing.assert_allclose(inf_train, late_train, atol=1e-8)
    np.testing.assert_allclose(inf_test, late_test, atol=1e-8)
    # Minimum-norm least squares on the features: the kernel-regression pseudo-inverse solution.
    w = np.linalg.lstsq(phi[:N], y, rcond=None)[0]
    np.testing.assert_allclose(inf_test, phi[N:] @ w, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# A small tanh MLP in plain jax, its linearization and its empirical NTK
# ---------------------------------------------------------------------------------------------


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] / math.sqrt(x.shape[-1]) + params["b1"])
    return h @ params["w2"] / math.sqrt(h.shape[-1]) + params["b2"]


def _mlp_init(rng, d, width, out):
    # numpy draws: eager jax.random calls each compile, which dominates these small tests
    return {
        "w1": jnp.asarray(rng.standard_normal((d, width))),
        "b1": jnp.asarray(0.1 * rng.standard_normal(width)),
        "w2": jnp.asarray(rng.standard_normal((width, out))),
        "b2": jnp.zeros((out,)),
    }


@jax.jit
def _jacobian_ntk(params, x1, x2):
    """Full NTK (N1, N2, O, O) from explicit Jacobians."""
    flat, unravel = ravel_pytree(params)
    j1 = jax.jacobian(lambda p: _mlp(unravel(p), x1))(flat)  # (N1, O, P)
    j2 = jax.jacobian(lambda p: _mlp(unravel(p), x2))(flat)
    return jnp.einsum("aop,bqp->aboq", j1, j2)


@jax.jit
def _linear(params, params0, x):
    """The linearization f(p0, x) + J(p0, x)·(p − p0), by a Jacobian-vector product."""
    delta = jax.tree_util.tree_map(lambda a, b: a - b, params, params0)
    f0, df = jax.jvp(lambda q: _mlp(q, x), (params0,), (delta,))
    return f0 + df


@functools.partial(jax.jit, static_argnames="steps")
def _gd_on_linearized(params0, x, y, lr, steps):
    """`steps` full-batch GD steps on the linearized MLP, loss ½·mean over all N·O entries."""

    def loss(p):
        return 0.5 * jnp.mean((_linear(p, params0, x) - y) ** 2)

    def body(p, _):
        return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, jax.grad(loss)(p)), None

    return jax.lax.scan(body, params0, None, length=steps)[0]


def _lam_max_full(k_full):
    n, _, o, _ = k_full.shape
    return float(np.linalg.eigvalsh(np.asarray(k_full).transpose(0, 2, 1, 3).reshape(n * o, n * o)).max())


@pytest.fixture(scope="module")
def linearized_run():
    """Full-batch GD on the linearized MLP, with train/test outputs after `steps` steps."""
    rng = np.random.default_rng(3)
    out, steps = 2, 400
    x, xt = jnp.asarray(rng.standard_normal((N, D))), jnp.asarray(rng.standard_normal((M, D)))
    y = jnp.asarray(rng.standard_normal((N, out)))
    params0 = _mlp_init(rng, D, 64, out)
    k_full = _jacobian_ntk(params0, x, x)
    lr = 0.01 * y.size / _lam_max_full(k_full)  # η'λ_max = 0.01: GD close to gradient flow
    p = _gd_on_linearized(params0, x, y, lr, steps)
    return dict(
        y=y,
        lr=lr,
        steps=steps,
        k_full=k_full,
        kt_full=_jacobian_ntk(params0, xt, x),
        f0=_linear(params0, params0, x),
        f0t=_linear(params0, params0, xt),
        f_train=_linear(p, params0, x),
        f_test=_linear(p, params0, xt),
    )


def test_full_kernel_matches_gradient_descent_on_linearized_network(linearized_run):
    r = linearized_run
    predict_fn = predict.gradient_descent_mse(r["k_full"], r["y"], learning_rate=r["lr"])
    t = r["steps"]  # t counts steps of the learning rate
    train, test = predict_fn(t, r["f0"], r["f0t"], r["kt_full"])
    moved = float(jnp.max(jnp.abs(r["f_train"] - r["f0"])))
    assert moved > 0.3  # the comparison is about real training, not about staying put
    # Discrete GD differs from the flow by O(η'λ) = 1% of the distance travelled.
    np.testing.assert_allclose(train, r["f_train"], atol=0.02 * moved)
    np.testing.assert_allclose(test, r["f_test"], atol=0.02 * moved)
    # The tolerance is meaningful: the prediction at 80% of the time is clearly off.
    early, _ = predict_fn(0.8 * t, r["f0"], r["f0t"], r["kt_full"])
    assert float(jnp.max(jnp.abs(early - r["f_train"]))) > 0.05 * moved


def test_per_output_kernel_matches_single_output_linearized_network():
    rng = np.random.default_rng(4)
    x, xt = jnp.asarray(rng.standard_normal((N, D))), jnp.asarray(rng.standard_normal((M, D)))
    y = jnp.asarray(rng.standard_normal((N, 1)))
    params0 = _mlp_init(rng, D, 32, 1)
    k = _jacobian_ntk(params0, x, x)[:, :, 0, 0]  # one output: the full kernel is (N, N)
    kt = _jacobian_ntk(params0, xt, x)[:, :, 0, 0]
    lr, steps = 0.005 * N / float(np.linalg.eigvalsh(np.asarray(k)).max()), 600
    p = _gd_on_linearized(params0, x, y, lr, steps)
    f0, f0t = _linear(params0, params0, x), _linear(params0, params0, xt)
    train, test = predict.gradient_descent_mse(k, y, lr)(steps, f0, f0t, kt)
    f_train, f_test = _linear(p, params0, x), _linear(p, params0, xt)
    moved = float(jnp.max(jnp.abs(f_train - f0)))
    assert moved > 0.3
    np.testing.assert_allclose(train, f_train, atol=0.01 * moved)
    np.testing.assert_allclose(test, f_test, atol=0.01 * moved)


# ---------------------------------------------------------------------------------------------
# max_learning_rate
# ---------------------------------------------------------------------------------------------


@pytest.mark.float64
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_max_learning_rate_separates_convergence_from_divergence(problem, momentum):
    k, y = problem["k"], problem["y"]
    lr_max = predict.max_learning_rate(k, y.size, momentum=momentum)
    np.testing.assert_allclose(lr_max, 2 * (1 + momentum) * y.size / np.linalg.eigvalsh(k).max(), rtol=1e-12)

    def final_residual(lr, steps=400):
        # Heavy-ball GD on the linear model in function space, loss ½·mean over N·O entries.
        r, v = y.copy(), np.zeros_like(y)
        for _ in range(steps):
            v = momentum * v + k @ r / y.size
            r = r - lr * v
        return np.abs(r).max()

    assert final_residual(0.9 * lr_max) < 1e-2 * np.abs(y).max()
    assert final_residual(1.1 * lr_max) > 1e3 * np.abs(y).max()


@pytest.mark.float64
def test_max_learning_rate_full_kernel_default_size(problem):
    k = problem["k"]
    k_full = np.einsum("nm,op->nmop", k, np.eye(3))
    np.testing.assert_allclose(predict.max_learning_rate(k_full), 2 * N * 3 / np.linalg.eigvalsh(k).max(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Infinite ensembles and GP inference
# ---------------------------------------------------------------------------------------------


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
def test_gp_inference_bare_array_and_train_points(problem):
    k, y = problem["k"], problem["y"]
    # The training points: N(y_train, 0); any non-None k_test_test asks for the covariance.
    post = predict.gp_inference(k, y, diag_reg=0.1)("nngp", None, True)
    np.testing.assert_allclose(post.mean, y, atol=1e-12)
    np.testing.assert_allclose(post.covariance, np.zeros((N, N)), atol=1e-12)
    # Without k_test_test the mean itself is returned.
    mean_only = predict.gp_inference(k, y)("ntk", problem["kt"])
    assert mean_only.shape == (M, 2)
    np.testing.assert_allclose(mean_only, problem["kt"] @ np.linalg.solve(k, y), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# gradient_descent (any loss, ODE)
# ---------------------------------------------------------------------------------------------


def _mse(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)


@pytest.mark.float64
def test_ode_with_mse_equals_closed_form(problem):
    k, kt, y, f0, f0t = problem["k"], problem["kt"], problem["y"], problem["f0"], problem["f0t"]
    lr = 1.3
    ts = jnp.array([5.0, 0.0, 1.0, 40.0])  # unsorted and including 0 on purpose
    a_train, a_test = predict.gradient_descent(_mse, k, y, lr)(ts, f0, f0t, kt)
    b_train, b_test = predict.gradient_descent_mse(k, y, lr)(ts, f0, f0t, kt)
    assert a_train.shape == (4, N, 2) and a_test.shape == (4, M, 2)
    np.testing.assert_allclose(a_train, b_train, atol=1e-7)
    np.testing.assert_allclose(a_test, b_test, atol=1e-7)
    # Full kernel path.
    k_full = np.einsum("nm,op->nmop", k, np.eye(2))
    c_train = predict.gradient_descent(_mse, k_full, y, lr)(ts, f0)
    np.testing.assert_allclose(c_train, b_train, atol=1e-7)


def test_ode_cross_entropy_decreases_the_loss(problem):
    k = problem["k"]
    rng = np.random.default_rng(7)
    labels = np.eye(3)[rng.integers(0, 3, N)]

    def xent(fx, y):
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(fx, -1), -1))

    ts = jnp.linspace(0.0, 15.0, 7)  # steps of 2.0: time up to 30
    fx = predict.gradient_descent(xent, k, labels, learning_rate=2.0)(ts)
    losses = np.array([float(xent(f, labels)) for f in fx])
    assert losses[0] == pytest.approx(math.log(3))
    assert np.all(np.diff(losses) < 0)
    assert losses[-1] < 0.5 * losses[0]
    # The ODE agrees with many small explicit Euler steps of df/dτ = −Θ ∇f loss to τ = 2.0 · 2.5.
    grad = jax.jit(jax.grad(xent))
    f, h = jnp.zeros((N, 3)), 0.01
    for _ in range(int(round(2.0 * float(ts[1]) / h))):
        f = f - h * jnp.asarray(k) @ grad(f, labels)
    np.testing.assert_allclose(fx[1], f, atol=5e-3 * float(jnp.abs(f).max()))


def test_momentum_ode_matches_discrete_heavy_ball(problem):
    k, kt, y = problem["k"], problem["kt"], problem["y"]
    mu = 0.9
    lam_max = np.linalg.eigvalsh(k).max()
    errors, moved = [], None
    for eta_scale in (0.02, 0.01):
        lr = eta_scale * y.size / lam_max  # η'λ_max small
        steps = int(round(2.0 / eta_scale))
        f, ft = np.zeros_like(y), np.zeros((M, 2))
        u, ut = np.zeros_like(f), np.zeros_like(ft)
        for _ in range(steps):  # optax sgd(lr, momentum=mu) in function space
            g = (f - y) / y.size
            u, ut = mu * u + k @ g, mu * ut + kt @ g
            f, ft = f - lr * u, ft - lr * ut
        train, test = predict.gradient_descent(_mse, k, y, lr, momentum=mu)(steps, 0.0, 0.0, kt)
        moved = np.abs(f).max()
        errors.append(max(np.abs(train - f).max(), np.abs(test - ft).max()))
    assert moved > 0.3
    assert errors[1] < 0.02 * moved
    # The gap is a discretization error: halving η shrinks it at least linearly (measured: 5.5×
    # from η'λ_max = 0.02 to 0.01, tending to 2× as η → 0).
    assert errors[0] / errors[1] > 1.8
    # Momentum matters: plain flow to the same time moves clearly less.
    plain = predict.gradient_descent_mse(k, y, lr)(steps)
    assert np.abs(plain - train).max() > 10 * errors[1]


@pytest.mark.float64
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_ode_t_none_integrates_to_convergence(problem, momentum):
    k, kt, y, f0, f0t = problem["k"], problem["kt"], problem["y"], problem["f0"], problem["f0t"]
    train, test = predict.gradient_descent(_mse, k, y, 0.7, momentum=momentum)(None, f0, f0t, kt)
    np.testing.assert_allclose(train, y, atol=1e-6)
    np.testing.assert_allclose(test, f0t + kt @ np.linalg.solve(k, y - f0), atol=1e-6)


@pytest.mark.float64
def test_ode_t_none_refuses_a_loss_without_minimizer(problem):
    labels = np.eye(2)[np.arange(N) % 2]

    def xent(fx, y):
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(fx, -1), -1))

    with pytest.raises(ValueError, match="does not converge"):
        predict.gradient_descent(xent, problem["k"], labels)(None)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(problem):
    k, y, kt = problem["k"], problem["y"], problem["kt"]
    with pytest.raises(ValueError, match=r"k_train_train must be square.*\(8, 5\)"):
        predict.gradient_descent_mse(k[:, :5], y)
    with pytest.raises(ValueError, match=r"y_train must have one row per training point.*\(7, 2\)"):
        predict.gradient_descent_mse(k, y[:7])
    bad = k.copy()
    bad[2, 3] = bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="k_train_train.*non-finite"):
        predict.gradient_descent_mse(bad, y)
    not_psd = k - 2 * np.linalg.eigvalsh(k).max() * np.outer(np.eye(N)[0], np.eye(N)[0])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        predict.gradient_descent_mse(not_psd, y)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        predict.gp_inference(not_psd, y)
    asym = k + 0.1 * np.triu(np.ones((N, N)), 1)
    with pytest.raises(ValueError, match="not symmetric"):
        predict.gradient_descent_mse(asym, y)
    predict_fn = predict.gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match=r"k_test_train must be \(M, N\) with N = 8"):
        predict_fn(1.0, 0.0, None, kt[:, :4])
    with pytest.raises(ValueError, match="fx_train_0"):
        predict_fn(1.0, np.zeros((N, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        predict_fn(-1.0)
    with pytest.raises(ValueError, match=r"y_train must be \(N, O\)"):
        predict.gradient_descent_mse(np.einsum("nm,op->nmop", k, np.eye(3)), y)
    with pytest.raises(ValueError, match="diag_reg"):
        predict.gradient_descent_mse(k, y, diag_reg=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        predict.gradient_descent(_mse, k, y, 1.0, momentum=1.0)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("t", [None, 2.0])
def test_non_finite_test_kernel_is_named(problem, value, t):
    """One entry is enough (its row of test outputs is non-finite); the error names the kernel."""
    kt = problem["kt"].copy()
    kt[1, 4] = value
    predict_fn = predict.gradient_descent_mse(problem["k"], problem["y"])
    with pytest.raises(ValueError, match=r"k_test_train \(shape .*\) has 1 non-finite entries"):
        predict_fn(t, 0.0, 0.0, kt)
    with pytest.raises(ValueError, match=r"k_test_train"):
        predict.gradient_descent(_mse, problem["k"], problem["y"])(1.0, 0.0, 0.0, kt)

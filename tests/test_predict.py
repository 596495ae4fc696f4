"""Tests of ntk_adapters.predict.gradient_descent_mse and max_learning_rate against independent
references: numerical integration of the ODE written in this file (RK4), gradient descent on a
linearized plain-jax network with its NTK from explicit Jacobians, and numpy solves.
"""

import functools
import math
from operator import itemgetter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_adapters import predict

N, M = 8, 5  # the train and test sizes of the predict_problem fixture (tests/conftest.py)
D = 3


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


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
def test_mse_matches_rk4_integration_of_the_ode(predict_problem):
    k, kt, y, f0, f0t = itemgetter("k", "kt", "y", "f0", "f0t")(predict_problem)
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
def test_t_none_is_the_kernel_regression_solve(predict_problem):
    k, kt, y, f0, f0t = itemgetter("k", "kt", "y", "f0", "f0t")(predict_problem)
    predict_fn = predict.gradient_descent_mse(k, y, learning_rate=1.0)
    train, test = predict_fn(None, f0, f0t, kt)
    np.testing.assert_allclose(train, y, atol=1e-12)
    np.testing.assert_allclose(test, f0t + kt @ np.linalg.solve(k, y - f0), atol=1e-10)
    # Zero initial test outputs, training outputs skipped (fx_train_0=None): K(x, X) K⁻¹ y.
    test0 = predict_fn(None, None, 0.0, kt)
    np.testing.assert_allclose(test0, kt @ np.linalg.solve(k, y), atol=1e-10)


@pytest.mark.float64
def test_diag_reg_is_ridge_scaled_by_mean_diagonal(predict_problem):
    k, kt, y = predict_problem["k"], predict_problem["kt"], predict_problem["y"]
    reg = 0.3
    ridge = k + reg * np.trace(k) / N * np.eye(N)
    test = predict.gradient_descent_mse(k, y, diag_reg=reg)(None, None, 0.0, kt)
    np.testing.assert_allclose(test, kt @ np.linalg.solve(ridge, y), atol=1e-10)
    absolute = k + reg * np.eye(N)
    test = predict.gradient_descent_mse(k, y, diag_reg=reg, diag_reg_absolute_scale=True)(None, None, 0.0, kt)
    np.testing.assert_allclose(test, kt @ np.linalg.solve(absolute, y), atol=1e-10)


@pytest.mark.float64
def test_full_kernel_kron_identity_equals_per_output(predict_problem):
    k, kt, y, f0, f0t = itemgetter("k", "kt", "y", "f0", "f0t")(predict_problem)
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
def test_trailing_output_axes_equal_flattened_outputs(predict_problem):
    k, kt = predict_problem["k"], predict_problem["kt"]
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
def test_learning_rate_only_sets_the_time_unit_and_warns_past_the_edge(predict_problem):
    k, kt, y = predict_problem["k"], predict_problem["kt"], predict_problem["y"]
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
def test_float32_inputs_stay_float32_and_agree_with_float64(predict_problem):
    k, kt, y = predict_problem["k"], predict_problem["kt"], predict_problem["y"]
    a_train, a_test = predict.gradient_descent_mse(k.astype(np.float32), y.astype(np.float32))(
        jnp.array([1.0, 5.0], jnp.float32), 0.0, 0.0, kt.astype(np.float32)
    )
    assert a_train.dtype == jnp.float32 and a_test.dtype == jnp.float32
    b_train, b_test = predict.gradient_descent_mse(k, y)(jnp.array([1.0, 5.0]), 0.0, 0.0, kt)
    assert b_train.dtype == jnp.float64
    np.testing.assert_allclose(a_train, b_train, atol=1e-4)
    np.testing.assert_allclose(a_test, b_test, atol=1e-4)


@pytest.mark.float64
def test_jit_over_time_matches_eager(predict_problem):
    k, kt, y, f0, f0t = itemgetter("k", "kt", "y", "f0", "f0t")(predict_problem)
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
def test_max_learning_rate_separates_convergence_from_divergence(predict_problem, momentum):
    k, y = predict_problem["k"], predict_problem["y"]
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
def test_max_learning_rate_full_kernel_default_size(predict_problem):
    k = predict_problem["k"]
    k_full = np.einsum("nm,op->nmop", k, np.eye(3))
    np.testing.assert_allclose(predict.max_learning_rate(k_full), 2 * N * 3 / np.linalg.eigvalsh(k).max(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(predict_problem):
    k, y, kt = predict_problem["k"], predict_problem["y"], predict_problem["kt"]
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


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("t", [None, 2.0])
def test_non_finite_test_kernel_is_named(predict_problem, value, t):
    """One entry is enough (its row of test outputs is non-finite); the error names the kernel."""
    kt = predict_problem["kt"].copy()
    kt[1, 4] = value
    predict_fn = predict.gradient_descent_mse(predict_problem["k"], predict_problem["y"])
    with pytest.raises(ValueError, match=r"k_test_train \(shape .*\) has 1 non-finite entries"):
        predict_fn(t, 0.0, 0.0, kt)

"""Tests of ntk_adapters.predict.gradient_descent (any loss, the ODE in function space) against
closed forms (MSE), explicit Euler steps, and discrete heavy-ball iterations."""

import math
from operator import itemgetter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_adapters import predict


def _mse(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)


@pytest.mark.float64
def test_ode_with_mse_equals_closed_form(predict_problem):
    k, kt, y, f0, f0t = itemgetter("k", "kt", "y", "f0", "f0t")(predict_problem)
    lr = 1.3
    ts = jnp.array([5.0, 0.0, 1.0, 40.0])  # unsorted and including 0 on purpose
    a_train, a_test = predict.gradient_descent(_mse, k, y, lr)(ts, f0, f0t, kt)
    b_train, b_test = predict.gradient_descent_mse(k, y, lr)(ts, f0, f0t, kt)
    assert a_train.shape == (4, *y.shape) and a_test.shape == (4, kt.shape[0], 2)
    np.testing.assert_allclose(a_train, b_train, atol=1e-7)
    np.testing.assert_allclose(a_test, b_test, atol=1e-7)
    # Full kernel path.
    k_full = np.einsum("nm,op->nmop", k, np.eye(2))
    c_train = predict.gradient_descent(_mse, k_full, y, lr)(ts, f0)
    np.testing.assert_allclose(c_train, b_train, atol=1e-7)


def test_ode_cross_entropy_decreases_the_loss(predict_problem):
    k = predict_problem["k"]
    rng = np.random.default_rng(7)
    labels = np.eye(3)[rng.integers(0, 3, k.shape[0])]

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
    f, h = jnp.zeros(labels.shape), 0.01
    for _ in range(int(round(2.0 * float(ts[1]) / h))):
        f = f - h * jnp.asarray(k) @ grad(f, labels)
    np.testing.assert_allclose(fx[1], f, atol=5e-3 * float(jnp.abs(f).max()))


def test_momentum_ode_matches_discrete_heavy_ball(predict_problem):
    k, kt, y = predict_problem["k"], predict_problem["kt"], predict_problem["y"]
    mu = 0.9
    lam_max = np.linalg.eigvalsh(k).max()
    errors, moved = [], None
    for eta_scale in (0.02, 0.01):
        lr = eta_scale * y.size / lam_max  # η'λ_max small
        steps = int(round(2.0 / eta_scale))
        f, ft = np.zeros_like(y), np.zeros((kt.shape[0], 2))
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
def test_ode_t_none_integrates_to_convergence(predict_problem, momentum):
    k, kt, y, f0, f0t = itemgetter("k", "kt", "y", "f0", "f0t")(predict_problem)
    train, test = predict.gradient_descent(_mse, k, y, 0.7, momentum=momentum)(None, f0, f0t, kt)
    np.testing.assert_allclose(train, y, atol=1e-6)
    np.testing.assert_allclose(test, f0t + kt @ np.linalg.solve(k, y - f0), atol=1e-6)


@pytest.mark.float64
def test_ode_t_none_refuses_a_loss_without_minimizer(predict_problem):
    labels = np.eye(2)[np.arange(predict_problem["k"].shape[0]) % 2]

    def xent(fx, y):
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(fx, -1), -1))

    with pytest.raises(ValueError, match="does not converge"):
        predict.gradient_descent(xent, predict_problem["k"], labels)(None)


def test_bad_arguments_and_non_finite_test_kernels_are_named(predict_problem):
    k, y = predict_problem["k"], predict_problem["y"]
    with pytest.raises(ValueError, match="momentum"):
        predict.gradient_descent(_mse, k, y, 1.0, momentum=1.0)
    kt = predict_problem["kt"].copy()
    kt[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"k_test_train \(shape .*\) has 1 non-finite entries"):
        predict.gradient_descent(_mse, k, y)(1.0, 0.0, 0.0, kt)

"""``ntk_adapters.predict`` called the way neural-tangents' documentation calls ``nt.predict``.

Each call below is copied from neural-tangents' README, examples or docstrings (only ``nt.`` is
dropped), and its values are checked against closed forms written here in numpy float64:
kernel regression by ``np.linalg.solve``, gradient flow by ``scipy.linalg.expm``, Gaussian
conditioning, the heavy-ball ODE solved mode by mode from its characteristic roots, and full-batch
gradient descent on a linear model (which is its own linearization). The conventions checked are
neural-tangents': ``t`` counts steps of ``learning_rate``; ``None`` initial outputs skip that set;
``gp_inference`` names ``'nngp'``, ``'ntk'`` and ``'ntkgp'``; the training points' posterior is
``N(y_train, 0)``; ``diag_reg`` regularizes the kernel that drives the dynamics.
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.nn import log_softmax

from ntk_adapters import predict

N, M, D, O = 10, 4, 3, 2
Kernel = collections.namedtuple("Kernel", "nngp ntk")


def _relu_kernels(x1, x2):
    """NNGP and NTK of f(x) = W2 relu(W1 x / √d) / √width at infinite width (arc-cosine kernels)."""
    d = x1.shape[1]
    dot = 2 * x1 @ x2.T / d
    q1, q2 = 2 * np.sum(x1**2, 1) / d, 2 * np.sum(x2**2, 1) / d
    norm = np.sqrt(np.outer(q1, q2))
    cos = np.clip(dot / norm, -1, 1)
    theta = np.arccos(cos)
    nngp = norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    return Kernel(nngp, nngp + (np.pi - theta) / (2 * np.pi) * dot)


def kernel_fn(x1, x2=None, get=None):
    k = _relu_kernels(np.asarray(x1), np.asarray(x1 if x2 is None else x2))
    if get is None:
        return k
    if isinstance(get, str):
        return getattr(k, get)
    return collections.namedtuple("Kernel", get)(*(getattr(k, g) for g in get))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    x_train, x_test = rng.standard_normal((N, D)), rng.standard_normal((M, D))
    y_train = rng.uniform(size=(N, O))
    return x_train, y_train, x_test


def _ridge(k, reg):
    return k + reg * np.trace(k) / k.shape[0] * np.eye(k.shape[0])


# ---------------------------------------------------------------------------------------------
# README: inference with infinite networks
# ---------------------------------------------------------------------------------------------


@pytest.mark.float64
def test_readme_ensemble_calls(data):
    x_train, y_train, x_test = data
    predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train)
    y_test_nngp = predict_fn(x_test=x_test, get="nngp")
    y_test_ntk = predict_fn(x_test=x_test, get="ntk")
    both = predict_fn(x_test=x_test, get=("nngp", "ntk"))
    k_dd, k_td = _relu_kernels(x_train, x_train), _relu_kernels(x_test, x_train)
    np.testing.assert_allclose(y_test_nngp, k_td.nngp @ np.linalg.solve(k_dd.nngp, y_train), rtol=1e-9)
    np.testing.assert_allclose(y_test_ntk, k_td.ntk @ np.linalg.solve(k_dd.ntk, y_train), rtol=1e-9)
    np.testing.assert_array_equal(both.nngp, y_test_nngp)
    np.testing.assert_array_equal(both.ntk, y_test_ntk)
    y_test_nngp, y_test_ntk = predict_fn(x_test=x_test, get=("nngp", "ntk"))
    assert y_test_nngp.shape == y_test_ntk.shape == (M, O)


@pytest.mark.float64
def test_examples_infinite_fcn_call(data):
    x_train, y_train, x_test = data
    predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, diag_reg=1e-3)
    fx_test_nngp, fx_test_ntk = predict_fn(x_test=x_test)
    k_dd, k_td = _relu_kernels(x_train, x_train), _relu_kernels(x_test, x_train)
    np.testing.assert_allclose(fx_test_nngp, k_td.nngp @ np.linalg.solve(_ridge(k_dd.nngp, 1e-3), y_train), rtol=1e-9)
    np.testing.assert_allclose(fx_test_ntk, k_td.ntk @ np.linalg.solve(_ridge(k_dd.ntk, 1e-3), y_train), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# README / examples/function_space.py: a linear model trained with gradient descent
# ---------------------------------------------------------------------------------------------


def apply_fn(params, x):
    W, b = params
    return jnp.dot(x, W) + b


@pytest.mark.float64
def test_readme_weight_space_example_is_gradient_flow_in_steps():
    rng = np.random.default_rng(1)
    x_train, x_test = rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
    y_train = rng.uniform(size=(3, 2))
    params = (jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.zeros((2,)))
    # The linear model's NTK per output: x·x' (weights) + 1 (bias).
    ntk_train_train, ntk_test_train = x_train @ x_train.T + 1, x_test @ x_train.T + 1
    mse_predictor = predict.gradient_descent_mse(ntk_train_train, y_train)
    t = 5.0
    y_train_0 = apply_fn(params, x_train)
    y_test_0 = apply_fn(params, x_test)
    y_train_t, y_test_t = mse_predictor(t, y_train_0, y_test_0, ntk_test_train)
    # df/dτ = −Θ (f − y)/(N·O) with τ = learning_rate · t = t.
    decay = scipy.linalg.expm(-t / y_train.size * ntk_train_train)
    r0 = np.asarray(y_train_0) - y_train
    np.testing.assert_allclose(y_train_t, y_train + decay @ r0, rtol=1e-10)
    moved = np.linalg.solve(ntk_train_train, decay @ r0 - r0)
    np.testing.assert_allclose(y_test_t, np.asarray(y_test_0) + ntk_test_train @ moved, rtol=1e-10)

    # examples/function_space.py: train for TRAIN_TIME / LEARNING_RATE steps of sgd(η) with
    # loss 0.5 · mean, then predict at t = TRAIN_TIME (learning_rate 1), or at that many steps of η.
    lr, steps = 0.05, 100
    train_time = steps * lr
    loss = lambda fx, y_hat: 0.5 * jnp.mean((fx - y_hat) ** 2)  # noqa: E731
    grad_loss = jax.jit(jax.grad(lambda p, x, y: loss(apply_fn(p, x), y)))
    p = params
    for _ in range(steps):
        p = jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grad_loss(p, x_train, y_train))
    by_time = mse_predictor(train_time, y_train_0, y_test_0, ntk_test_train)
    by_steps = predict.gradient_descent_mse(ntk_train_train, y_train, learning_rate=lr)(
        steps, y_train_0, y_test_0, ntk_test_train
    )
    for a, b in zip(by_time, by_steps):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    # Gradient descent at this step follows the flow to O(η) of the distance moved.
    moved_by = np.abs(np.asarray(apply_fn(p, x_train)) - np.asarray(y_train_0)).max()
    assert moved_by > 0.3
    np.testing.assert_allclose(by_steps[0], apply_fn(p, x_train), atol=0.02 * moved_by)
    np.testing.assert_allclose(by_steps[1], apply_fn(p, x_test), atol=0.02 * moved_by)


# ---------------------------------------------------------------------------------------------
# neural-tangents' tests/predict_test.py call patterns
# ---------------------------------------------------------------------------------------------


@pytest.mark.float64
def test_none_initial_outputs_skip_that_set(data):
    x_train, y_train, x_test = data
    k_dd, k_td = kernel_fn(x_train, None), kernel_fn(x_test, x_train)
    predict_fn_mse = predict.gradient_descent_mse(k_dd.ntk, y_train)
    lam, vec = np.linalg.eigh(k_dd.ntk)

    def flow(t):
        """Zero initial outputs: train (I − e^{−Θt/n}) y, test Θ(x,X) Θ⁻¹ (I − e^{−Θt/n}) y."""
        grown = vec @ np.diag(-np.expm1(-lam * t / y_train.size)) @ vec.T
        return grown @ y_train, k_td.ntk @ np.linalg.solve(k_dd.ntk, grown @ y_train)

    out_mse = predict_fn_mse(t=1.0, fx_train_0=None, fx_test_0=0.0, k_test_train=k_td.ntk)
    assert out_mse.shape == (M, O)  # test outputs only; zeros stand in for the training outputs
    np.testing.assert_allclose(out_mse, flow(1.0)[1], rtol=1e-9)
    out_mse = predict_fn_mse(t=0.5, fx_train_0=0.0, fx_test_0=None, k_test_train=k_td.ntk)
    assert out_mse.shape == (N, O)  # k_test_train is given but fx_test_0=None: no test outputs
    np.testing.assert_allclose(out_mse, flow(0.5)[0], rtol=1e-9)
    # The ensemble's means are the same closed forms.
    ensemble = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train)
    np.testing.assert_allclose(ensemble(t=1.0, get="ntk", x_test=x_test, compute_cov=False), flow(1.0)[1], rtol=1e-9)
    np.testing.assert_allclose(ensemble(t=0.5, get="ntk", x_test=None, compute_cov=False), flow(0.5)[0], rtol=1e-9)
    # t=None: the same conventions.
    test_inf = predict_fn_mse(None, None, 0.0, k_td.ntk)
    np.testing.assert_allclose(test_inf, k_td.ntk @ np.linalg.solve(k_dd.ntk, y_train), rtol=1e-9)
    np.testing.assert_allclose(predict_fn_mse(None, 0.0), y_train, rtol=1e-12)
    with pytest.raises(ValueError, match="both None"):
        predict_fn_mse(1.0, None, None)
    with pytest.raises(ValueError, match="k_test_train"):
        predict_fn_mse(1.0, 0.0, 0.0)
    # gradient_descent follows the same conventions.
    ode = predict.gradient_descent(lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2), k_dd.ntk, y_train)
    np.testing.assert_allclose(ode(1.0, None, 0.0, k_td.ntk), flow(1.0)[1], atol=1e-7)
    assert ode(1.0, 0.0, None, k_td.ntk).shape == (N, O)


@pytest.mark.float64
def test_gp_inference_equals_ensemble_at_infinity(data):
    x_train, y_train, x_test = data
    reg = 1e-5
    for get in [None, "nngp", "ntk", ("nngp",), ("ntk",), ("nngp", "ntk"), ("ntk", "nngp")]:
        k_dd = kernel_fn(x_train, None, get)
        gp_inference = predict.gp_inference(k_dd, y_train, diag_reg=reg)
        gd_ensemble = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, diag_reg=reg)
        for x in [None, x_test]:
            k_td = None if x is None else kernel_fn(x, x_train, get)
            for compute_cov in [True, False]:
                nngp_tt = (True if x is None else kernel_fn(x, None, "nngp")) if compute_cov else None
                out_ens = gd_ensemble(None, x, get, compute_cov)
                out_ens_inf = gd_ensemble(jnp.inf, x, get, compute_cov)
                _assert_tree_close(out_ens_inf, out_ens, 1e-6)
                names = ("nngp", "ntk") if get is None else (get,) if isinstance(get, str) else get
                if "nngp" not in names and compute_cov and k_td is not None:
                    with pytest.raises(ValueError, match="needs the NNGP"):
                        gp_inference(get=get, k_test_train=k_td, k_test_test=nngp_tt)
                    continue
                out_gp_inf = gp_inference(get=get, k_test_train=k_td, k_test_test=nngp_tt)
                _assert_tree_close(out_ens, out_gp_inf, 1e-9)
                if x is None:  # the training points: N(y_train, 0) whatever diag_reg
                    first = out_gp_inf if isinstance(get, str) else out_gp_inf[0]
                    mean = first.mean if compute_cov else first
                    np.testing.assert_allclose(mean, y_train, rtol=1e-12)
                    if compute_cov:
                        np.testing.assert_array_equal(first.covariance, np.zeros((N, N)))


def _assert_tree_close(a, b, tol):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


@pytest.mark.float64
def test_gp_inference_three_names(data):
    x_train, y_train, x_test = data
    reg = 1e-2
    k_dd, k_td, k_tt = kernel_fn(x_train, None), kernel_fn(x_test, x_train), kernel_fn(x_test, None)
    out = predict.gp_inference(k_dd, y_train, diag_reg=reg)(
        get=("nngp", "ntk", "ntkgp"), k_test_train=k_td, k_test_test=k_tt
    )
    for name, prior in (("nngp", "nngp"), ("ntkgp", "ntk")):
        # Gaussian conditioning on noisy observations, through the joint covariance.
        kk, kx, kxx = getattr(k_dd, prior), getattr(k_td, prior), getattr(k_tt, prior)
        noisy = _ridge(kk, reg)
        np.testing.assert_allclose(getattr(out, name).mean, kx @ np.linalg.solve(noisy, y_train), rtol=1e-9)
        np.testing.assert_allclose(getattr(out, name).covariance, kxx - kx @ np.linalg.solve(noisy, kx.T), atol=1e-10)
    # 'ntk': networks at initialization are GP(0, NNGP); trained to convergence with the NTK.
    a = np.linalg.solve(_ridge(k_dd.ntk, reg), k_td.ntk.T).T
    cov = k_tt.nngp - a @ k_td.nngp.T - k_td.nngp @ a.T + a @ k_dd.nngp @ a.T
    np.testing.assert_allclose(out.ntk.mean, a @ y_train, rtol=1e-9)
    np.testing.assert_allclose(out.ntk.covariance, cov, atol=1e-10)
    assert np.abs(np.asarray(out.ntk.covariance) - np.asarray(out.ntkgp.covariance)).max() > 1e-3
    # A bare array has no NNGP beside it: the 'ntk' covariance is refused, the 'ntkgp' one is not.
    bare = predict.gp_inference(k_dd.ntk, y_train, diag_reg=reg)
    with pytest.raises(ValueError, match="needs the NNGP"):
        bare("ntk", k_td.ntk, k_tt.ntk)
    np.testing.assert_allclose(bare("ntkgp", k_td.ntk, k_tt.ntk).covariance, out.ntkgp.covariance, atol=1e-12)
    with pytest.raises(ValueError, match="unknown kernel 'ntgk'"):
        bare("ntgk", k_td.ntk)
    # The regularized posterior at the training points: pass them as test points.
    at_train = predict.gp_inference(k_dd, y_train, diag_reg=reg)("nngp", k_dd, k_dd)
    np.testing.assert_allclose(at_train.mean, k_dd.nngp @ np.linalg.solve(_ridge(k_dd.nngp, reg), y_train), rtol=1e-9)


@pytest.mark.float64
def test_ensemble_covariance_puts_diag_reg_on_the_training_kernel_of_the_dynamics(data):
    x_train, y_train, x_test = data
    reg, t = 0.05, 3.0
    k_dd, k_td, k_tt = kernel_fn(x_train, None), kernel_fn(x_test, x_train), kernel_fn(x_test, None)
    lr = 0.5
    out = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, lr, diag_reg=reg)(
        t, x_test, compute_cov=True
    )
    tau = lr * t / y_train.size
    # 'ntk': A = Θ(x,X) Θ_r⁻¹ (I − e^{−Θ_r τ}), Θ_r = Θ + σ²; the prior K(X,X) is not regularized.
    theta_r = _ridge(k_dd.ntk, reg)
    a = k_td.ntk @ np.linalg.solve(theta_r, np.eye(N) - scipy.linalg.expm(-tau * theta_r))
    cov = k_tt.nngp - a @ k_td.nngp.T - k_td.nngp @ a.T + a @ k_dd.nngp @ a.T
    np.testing.assert_allclose(out.ntk.mean, a @ y_train, rtol=1e-9)
    np.testing.assert_allclose(out.ntk.covariance, cov, atol=1e-10)
    # 'nngp': K_r = K + σ² drives the readout and is the prior of the noisy outputs.
    k_r = _ridge(k_dd.nngp, reg)
    a = k_td.nngp @ np.linalg.solve(k_r, np.eye(N) - scipy.linalg.expm(-tau * k_r))
    cov = k_tt.nngp - k_td.nngp @ np.linalg.solve(k_r, np.eye(N) - scipy.linalg.expm(-2 * tau * k_r)) @ k_td.nngp.T
    np.testing.assert_allclose(out.nngp.mean, a @ y_train, rtol=1e-9)
    np.testing.assert_allclose(out.nngp.covariance, cov, atol=1e-10)
    # The training points: f_t(X) = e^{−Θ_r τ} f_0(X) + (I − e^{−Θ_r τ}) Y.
    train = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, lr, diag_reg=reg)(
        t, None, "ntk", compute_cov=True
    )
    e = scipy.linalg.expm(-tau * theta_r)
    np.testing.assert_allclose(train.mean, (np.eye(N) - e) @ y_train, rtol=1e-9)
    np.testing.assert_allclose(train.covariance, e @ k_dd.nngp @ e.T, atol=1e-10)


@pytest.mark.float64
def test_max_learning_rate(data):
    x_train, y_train, _ = data
    ntk = kernel_fn(x_train, None, "ntk")
    lr = predict.max_learning_rate(ntk, y_train_size=y_train.size)
    np.testing.assert_allclose(lr, 2 * y_train.size / np.linalg.eigvalsh(ntk)[-1], rtol=1e-10)
    np.testing.assert_allclose(predict.max_learning_rate(ntk, y_train.size, momentum=0.9), 1.9 * lr, rtol=1e-10)


@pytest.mark.float64
def test_trace_axes_are_checked_against_the_kernel(data):
    x_train, y_train, _ = data
    ntk = kernel_fn(x_train, None, "ntk")
    full = np.einsum("nm,op->nmop", ntk, np.eye(O))
    a = predict.gradient_descent_mse(ntk, y_train, trace_axes=(-1,))(2.0)
    b = predict.gradient_descent_mse(full, y_train, trace_axes=())(2.0)
    np.testing.assert_allclose(a, b, rtol=1e-10)
    with pytest.raises(ValueError, match=r"trace_axes=\(\) does not match"):
        predict.gradient_descent_mse(ntk, y_train, trace_axes=())


# ---------------------------------------------------------------------------------------------
# gradient_descent: the docstring's call, and NT's momentum ODE in closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.float64
def test_gradient_descent_docstring_call_with_momentum(data):
    x_train, y_train, x_test = data
    k_train_train, k_test_train = kernel_fn(x_train, None, "ntk"), kernel_fn(x_test, x_train, "ntk")
    t, learning_rate, momentum = 40.0, 1e-1, 0.9
    rng = np.random.default_rng(2)
    fx_train_0, fx_test_0 = rng.standard_normal((N, O)), rng.standard_normal((M, O))

    cross_entropy = lambda fx, y_hat: -jnp.mean(log_softmax(fx) * y_hat)  # noqa: E731
    predict_fn = predict.gradient_descent(cross_entropy, k_train_train, y_train, learning_rate, momentum)
    fx_train_t, fx_test_t = predict_fn(t, fx_train_0, fx_test_0, k_test_train)
    assert fx_train_t.shape == (N, O) and fx_test_t.shape == (M, O)
    assert float(cross_entropy(fx_train_t, y_train)) < float(cross_entropy(fx_train_0, y_train))

    # With MSE the momentum ODE η f'' + (1 − μ) f' = −Θ (f − y)/(N·O), f'(0) = 0, in τ = η t is
    # linear: each eigenmode is η r'' + (1 − μ) r' + (λ/(N·O)) r = 0, solved by its roots.
    mse = lambda fx, y_hat: 0.5 * jnp.mean((fx - y_hat) ** 2)  # noqa: E731
    fx_train_t, fx_test_t = predict.gradient_descent(mse, k_train_train, y_train, learning_rate, momentum)(
        t, fx_train_0, fx_test_0, k_test_train
    )
    lam, vec = np.linalg.eigh(k_train_train)
    tau, eta, fric = learning_rate * t, learning_rate, 1 - momentum
    disc = np.sqrt((fric**2 - 4 * eta * lam / y_train.size).astype(complex))
    s1, s2 = (-fric + disc) / (2 * eta), (-fric - disc) / (2 * eta)
    mode = ((s1 * np.exp(s2 * tau) - s2 * np.exp(s1 * tau)) / (s1 - s2)).real  # r(τ)/r(0)
    resid = vec @ (mode[:, None] * (vec.T @ (fx_train_0 - y_train)))
    np.testing.assert_allclose(fx_train_t, y_train + resid, atol=1e-6)
    # Test outputs move by Θ(x,X) Θ⁻¹ times what the training outputs moved (same ODE operator).
    want = fx_test_0 + k_test_train @ np.linalg.solve(k_train_train, y_train + resid - fx_train_0)
    np.testing.assert_allclose(fx_test_t, want, atol=1e-6)
    assert np.abs(mode).min() < 0.5  # the modes did move


@pytest.mark.float64
def test_gradient_descent_t_none_is_the_limit(data):
    x_train, y_train, x_test = data
    k_dd, k_td = kernel_fn(x_train, None, "ntk"), kernel_fn(x_test, x_train, "ntk")
    mse = lambda fx, y_hat: 0.5 * jnp.mean((fx - y_hat) ** 2)  # noqa: E731
    f0 = np.random.default_rng(4).standard_normal((N, O))
    train, test = predict.gradient_descent(mse, k_dd, y_train)(None, f0, 0.0, k_td)
    np.testing.assert_allclose(train, y_train, atol=1e-6)
    np.testing.assert_allclose(test, k_td @ np.linalg.solve(k_dd, y_train - f0), atol=1e-6)
    # Nothing is skipped or reordered: gradient_descent_mse says the same.
    train_mse, test_mse = predict.gradient_descent_mse(k_dd, y_train)(None, f0, 0.0, k_td)
    np.testing.assert_allclose(test, test_mse, atol=1e-6)
    assert math.isfinite(float(jnp.sum(train)))

"""Numerics of ``ntk_adapters.predict``: float32 against float64, singular kernels, jit, x64 off,
and losses that leave their domain.

References are numpy float64: Cholesky solves and eigendecompositions of the same kernels,
minimum-norm least squares on explicit features, and the closed-form path of a flow whose loss
stops being defined at a known time. The kernels are the infinite-width NTK of a one-hidden-layer
ReLU network (arc-cosine closed form, written here) and an RBF kernel, both ill-conditioned
enough that a float32 eigenvalue cut-off of ``N·eps·λ_max`` would discard hundreds of
eigenvalues, yet within ``cond·eps ≤ 1e-2``, where float32 must agree with float64 to ``1e-2``.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ntk_adapters import predict

EPS32 = float(np.finfo(np.float32).eps)


def relu_ntk(x1, x2):
    """NTK of f(x) = v·relu(W x/√d)/√width, W, v ~ N(0, 2), N(0, 1), at infinite width:
    κ1 (the readout's features) + x·x'·2/d · κ0 (the first layer), κ the arc-cosine kernels."""
    d = x1.shape[1]
    dot = 2 * x1 @ x2.T / d
    q1, q2 = 2 * np.sum(x1**2, 1) / d, 2 * np.sum(x2**2, 1) / d
    norm = np.sqrt(np.outer(q1, q2))
    cos = np.clip(dot / norm, -1, 1)
    theta = np.arccos(cos)
    return norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos) + (np.pi - theta) / (2 * np.pi) * dot


def rbf(x1, x2, length=1.0):
    d2 = np.sum(x1**2, 1)[:, None] + np.sum(x2**2, 1)[None] - 2 * x1 @ x2.T
    return np.exp(-np.maximum(d2, 0) / (2 * length**2))


def _case(name, n, m=300, seed=0):
    """(k_train, k_test_train, y, relative diag_reg) with cond(K + σ²)·eps32 of a few 1e-3."""
    rng = np.random.default_rng(seed)
    if name == "relu":
        x = rng.standard_normal((n + m, 10 if n <= 2000 else 14))
        k, reg = relu_ntk(x, x), 1e-4
    else:
        x = rng.standard_normal((n + m, 3))
        k = rbf(x, x)
        reg = (1e-2 if n <= 2000 else 2.5e-2) / np.mean(np.diag(k))
    return k[:n, :n], k[n:, :n], rng.standard_normal((n, 2)), reg


def _ridge(k, reg):
    return k + reg * np.trace(k) / k.shape[0] * np.eye(k.shape[0])


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _float32_prediction(k, kt, y, reg, t):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a nonsingular kernel must not warn
        predict_fn = predict.gradient_descent_mse(k.astype(np.float32), y.astype(np.float32), diag_reg=reg)
        return predict_fn(t, 0.0, 0.0, kt.astype(np.float32))


def _extreme_eigenvalues(k):
    """float64 λ_max (power iteration) and λ_min (inverse iteration on the Cholesky factor)."""
    factor = scipy.linalg.cho_factor(k, lower=True)
    v = np.ones(k.shape[0])
    for _ in range(30):
        v = k @ v
        v /= np.linalg.norm(v)
    w = np.random.default_rng(0).standard_normal(k.shape[0])
    for _ in range(20):
        w = scipy.linalg.cho_solve(factor, w)
        w /= np.linalg.norm(w)
    return v @ k @ v, w @ k @ w, factor


@pytest.mark.slow
def test_float32_matches_float64_at_any_time_relu_n2000():
    n = 2000
    k, kt, y, reg = _case("relu", n)
    kr = _ridge(k, reg)
    lam, vecs = np.linalg.eigh(kr)
    assert 1e-3 < lam[-1] / lam[0] * EPS32 <= 1e-2  # hard, yet where float32 must reach 1e-2
    assert np.count_nonzero(lam <= n * EPS32 * lam[-1]) > 100  # what an N·eps·λ_max cut-off drops
    rate = 1.0 / y.size
    steps = np.array([0.3, 3.0, 30.0]) / (rate * lam[0])  # from barely moved to converged
    train, test = _float32_prediction(k, kt, y, reg, jnp.asarray(steps, jnp.float32))
    assert train.dtype == test.dtype == jnp.float32
    coef = vecs.T @ y
    for i, s in enumerate(steps):
        grown = -np.expm1(-rate * lam * s)
        want_train = vecs @ (grown[:, None] * coef)
        want_test = kt @ (vecs @ ((grown / lam)[:, None] * coef))
        assert _rel(train[i], want_train) < 1e-2 and _rel(test[i], want_test) < 1e-2, (i, _rel(test[i], want_test))
    train, test = _float32_prediction(k, kt, y, reg, None)
    np.testing.assert_allclose(train, y, rtol=1e-6)  # the regularized flow ends at y_train
    assert _rel(test, kt @ scipy.linalg.cho_solve(scipy.linalg.cho_factor(kr), y)) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name, n", [("rbf", 2000), ("relu", 5000), ("rbf", 5000)])
def test_float32_matches_float64_at_infinite_time(name, n):
    k, kt, y, reg = _case(name, n, m=200, seed=1)
    kr = _ridge(k, reg)
    lam_max, lam_min, factor = _extreme_eigenvalues(kr)
    assert 1e-3 < lam_max / lam_min * EPS32 <= 1e-2
    assert lam_min < n * EPS32 * lam_max / 10  # an N·eps·λ_max cut-off would drop many modes
    train, test = _float32_prediction(k, kt, y, reg, None)
    np.testing.assert_allclose(train, y, rtol=1e-6)
    assert _rel(test, kt @ scipy.linalg.cho_solve(factor, y)) < 1e-2


# ---------------------------------------------------------------------------------------------
# Singular kernels: a warning that tells the truth, and the pseudo-inverse
# ---------------------------------------------------------------------------------------------


def test_singular_float32_kernel_warns_with_the_true_count_and_solves_by_pseudo_inverse():
    rng = np.random.default_rng(5)
    n, m, rank = 200, 30, 40
    phi = rng.standard_normal((n + m, rank))
    k_all = (phi @ phi.T / rank).astype(np.float32)
    k, kt = k_all[:n, :n], k_all[n:, :n]
    y = rng.standard_normal((n, 1)).astype(np.float32)
    with pytest.warns(UserWarning, match="singular to working precision") as record:
        predict_fn = predict.gradient_descent_mse(k, y)
    message = str(record[0].message)
    assert f"{n - rank} of {n} eigenvalues" in message
    train, test = predict_fn(None, 0.0, 0.0, kt)
    w = np.linalg.lstsq(phi[:n], y.astype(np.float64), rcond=None)[0]
    assert _rel(test, phi[n:] @ w) < 1e-3  # the minimum-norm (ridgeless) solution
    assert _rel(train, phi[:n] @ w) < 1e-3  # the flow's limit: y projected on the kernel's range
    late_train, late_test = predict_fn(1e12, 0.0, 0.0, kt)
    assert _rel(late_test, np.asarray(test, np.float64)) < 1e-3
    # The advice is right: the suggested diag_reg makes the kernel one float32 resolves.
    suggested = float(re.search(r"diag_reg ≥ ([0-9.e+-]+)", message).group(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regular = predict.gradient_descent_mse(k, y, diag_reg=suggested)(None, None, 0.0, kt)
    kr = _ridge(k.astype(np.float64), suggested)
    assert _rel(regular, kt.astype(np.float64) @ np.linalg.solve(kr, y)) < 1e-2


# ---------------------------------------------------------------------------------------------
# jit, and x64 off
# ---------------------------------------------------------------------------------------------


def _moderate(n=150, seed=2):
    """An RBF kernel with cond·eps32 ≈ 5e-3 (float64 eigendecomposition route) and targets."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + 40, 2))
    k = rbf(x, x, 0.7)
    reg = 3e-4
    y = rng.standard_normal((n, 2))
    return k[:n, :n], k[n:, :n], y, reg


def _predictions(k, kt, y, reg, t):
    predict_fn = predict.gradient_descent_mse(k, y, learning_rate=0.5, diag_reg=reg)
    return predict_fn(t, 0.0, 0.0, kt)


@pytest.mark.parametrize("kind", ["ill-conditioned", "singular"])
def test_jit_gives_the_same_numbers_as_eager(kind):
    k, kt, y, reg = _moderate()
    if kind == "singular":
        rng = np.random.default_rng(3)
        phi = rng.standard_normal((k.shape[0] + kt.shape[0], 12))
        k_all = phi @ phi.T
        k, kt, reg = k_all[: k.shape[0], : k.shape[0]], k_all[k.shape[0] :, : k.shape[0]], 0.0
    k, kt, y = (a.astype(np.float32) for a in (k, kt, y))
    steps = jnp.asarray([1.0, 1e3, 1e6], jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the singular kernel warns eagerly; under jit it cannot
        for t in (None, steps):
            eager = _predictions(k, kt, y, reg, t)
            jitted = jax.jit(lambda k, kt, y, t=t: _predictions(k, kt, y, reg, t))(k, kt, y)
            for a, b in zip(eager, jitted):
                assert b.dtype == jnp.float32
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))
        # gp_inference solves through the same factorizations.
        eager = predict.gp_inference(k, y, diag_reg=reg)("nngp", kt)
        jitted = jax.jit(lambda k, kt, y: predict.gp_inference(k, y, diag_reg=reg)("nngp", kt))(k, kt, y)
        np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-4 * float(jnp.abs(eager).max()))


def test_x64_off_uses_the_host_for_float64_and_works_under_jit():
    k, kt, y, reg = _moderate()
    kr = _ridge(k, reg)
    lam, vecs = np.linalg.eigh(kr)
    assert lam[-1] / lam[0] * EPS32 > 1e-3
    steps = np.array([10.0, 1e4])
    grown = -np.expm1(-0.5 * steps[:, None] * lam / y.size)
    want = np.einsum("mp,tp,pc->tmc", kt @ vecs, grown / lam, vecs.T @ y)
    with jax.enable_x64(False):
        args = tuple(a.astype(np.float32) for a in (k, kt, y))
        eager = _predictions(*args, reg, jnp.asarray(steps, jnp.float32))
        jitted = jax.jit(lambda k, kt, y, t: _predictions(k, kt, y, reg, t))(*args, jnp.asarray(steps, jnp.float32))
    for got in (eager[1], jitted[1]):
        assert got.dtype == jnp.float32
        for i in range(len(steps)):
            assert _rel(got[i], want[i]) < 1e-2
    np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# ---------------------------------------------------------------------------------------------
# Losses that are not scalars, or not defined along the path
# ---------------------------------------------------------------------------------------------


def test_loss_leaving_its_domain_is_dated():
    # Θ = c·I, one output: df/dτ = −(c/n)·½(f + 1)^{−1/2}, so with f_0 = 0, u = f + 1 follows
    # u^{3/2} = 1 − (3c/(4n)) τ and reaches the bound u = 0 (sqrt's domain) at τ* = 4n/(3c).
    n, c, lr = 4, 2.0, 0.5
    k, y = c * np.eye(n), np.zeros((n, 1))

    def sqrt_loss(fx, y):
        return jnp.mean(jnp.sqrt(fx + 1))

    tau_star = 4 * n / (3 * c)
    steps = np.array([0.5, 2.0]) * tau_star / lr
    predict_fn = predict.gradient_descent(sqrt_loss, k, y, learning_rate=lr)
    with pytest.raises(FloatingPointError, match="sqrt_loss") as err:
        predict_fn(steps)
    when = float(re.search(r"t ≈ ([0-9.e+-]+)", str(err.value)).group(1))
    assert abs(when * lr - tau_star) < 0.02 * tau_star
    early = predict_fn(steps[:1])
    np.testing.assert_allclose(early, (1 - 0.5 * 3 * c / (4 * n) * tau_star) ** (2 / 3) - 1, rtol=1e-5)
    jitted = jax.jit(predict_fn)(jnp.asarray(steps))
    np.testing.assert_allclose(jitted[0], early[0], rtol=1e-5)
    assert np.all(np.isnan(np.asarray(jitted[1])))
    with pytest.raises(FloatingPointError, match="at t = 0"):
        predict_fn(1.0, -2.0)


def test_loss_that_is_not_a_scalar_is_named():
    k, y = np.eye(3), np.zeros((3, 2))

    def per_entry(fx, y):
        return (fx - y) ** 2

    with pytest.raises(ValueError, match=r"loss '.*per_entry' must return a scalar.*shape \(3, 2\)"):
        predict.gradient_descent(per_entry, k, y)

    def broken(fx, y):
        return fx @ y  # (3, 2) @ (3, 2)

    with pytest.raises(TypeError, match=r"loss '.*broken' could not be evaluated"):
        predict.gradient_descent(broken, k, y)


# ---------------------------------------------------------------------------------------------
# The integrator's step budget: refused, never extrapolated
# ---------------------------------------------------------------------------------------------


def _stiff(n=6, spread=1e4, seed=7):
    """A float64 kernel with eigenvalues from 1 to ``spread`` and the closed-form MSE flow."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    lam = np.geomspace(1.0, spread, n)
    k = (q * lam) @ q.T
    y = rng.standard_normal((n, 1))

    def exact(tau):  # ½·mean loss: df/dτ = −K (f − y)/n from f_0 = 0
        return q @ (-np.expm1(-lam[:, None] * tau / n) * (q.T @ y))

    return k, y, exact, lam


def _mse_loss(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)


@pytest.mark.float64
def test_ode_out_of_steps_is_refused_with_the_times_and_the_remedy():
    k, y, exact, lam = _stiff()
    # The fastest mode limits an explicit step to ~3.3·n/λ_max; reaching τ = 10·n/λ_min takes
    # ~10⁴/3.3 ≈ 3000 steps, far beyond mxstep=200.
    tau = np.array([0.01, 10.0]) * k.shape[0] / lam[0]
    tight = predict.gradient_descent(_mse_loss, k, y, learning_rate=1.0, mxstep=200)
    with pytest.raises(RuntimeError, match=r"mxstep=200 steps and stopped before step t = ") as err:
        tight(tau)
    message = str(err.value)
    assert f"{tau[-1]:.4g}" in message and "larger mxstep" in message and "rtol" in message
    reached = float(re.search(r"having reached t ≥ ([0-9.e+-]*[0-9])", message).group(1))
    assert 0 <= reached < tau[-1]
    # Under jit it cannot raise: the times not reached are NaN, the others are right.
    jitted = jax.jit(tight)(jnp.asarray(tau))
    assert np.all(np.isnan(np.asarray(jitted[-1])))
    with pytest.raises(RuntimeError, match="mxstep=200"):
        tight(None)  # t → ∞ runs out of steps in its first chunks too
    # The same problem with the default budget: no error, and the exact flow.
    fine = predict.gradient_descent(_mse_loss, k, y, learning_rate=1.0)(tau)
    for i, s in enumerate(tau):
        np.testing.assert_allclose(fine[i], exact(s), atol=1e-6)
    np.testing.assert_allclose(jitted[0], exact(tau[0]), atol=1e-6)


@pytest.mark.float64
def test_ode_within_its_budget_does_not_complain():
    k, y, exact, _ = _stiff(spread=10.0)
    tau = np.array([0.0, 0.5, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = predict.gradient_descent(_mse_loss, k, y, learning_rate=0.5, mxstep=500)(tau / 0.5)
    for i, s in enumerate(tau):
        np.testing.assert_allclose(got[i], exact(s), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# What the Cholesky factor tells, and where float32's own eigh is used
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, reg", [("relu", 1e-4), ("relu", 1e-2), ("rbf", 1e-3), ("rbf", 0.0)])
def test_cholesky_bounds_bracket_the_spectrum(name, reg):
    from ntk_adapters.predict.linalg import TrainKernel

    k, _, _, _ = _case(name, 300, m=1, seed=4)
    kernel = TrainKernel(jnp.asarray(k), reg, False, "k")
    lam = np.linalg.eigvalsh(np.asarray(kernel.k, np.float64))
    chol = kernel.cholesky()
    assert float(chol.lam_max) <= lam[-1] * (1 + 1e-12)
    if bool(chol.nonsingular):
        assert float(chol.lam_min) >= lam[0] * (1 - 1e-12)
    # The power-iteration value: a Rayleigh quotient, at most λ_max up to the rounding of its dtype.
    rounding = 8 * float(np.finfo(np.asarray(kernel.k).dtype).eps)
    assert lam[-1] * 0.9 <= kernel.lam_max() <= lam[-1] * (1 + rounding)


@pytest.mark.parametrize(
    "name, reg, float32_enough",
    [("rbf", 3e-3, False), ("rbf", None, True), ("relu", None, True)],
    ids=["rbf-cond-9e-3", "rbf-cond-3e-3", "relu-cond-2e-3"],
)
def test_auto_keeps_the_float32_eigh_exactly_when_it_is_accurate_enough(name, reg, float32_enough):
    """All three kernels have ``cond·eps < 1e-2``; on the first a float32 ``eigh`` errs by more
    than 1e-2 at some time, on the others by well under the 5e-3 'auto' accepts."""
    k, kt, y, case_reg = _case(name, 1000)
    reg = case_reg if reg is None else reg
    lam, vecs = np.linalg.eigh(_ridge(k, reg))
    assert lam[-1] / lam[0] * EPS32 < 1e-2
    rate = 1.0 / y.size
    steps = np.geomspace(1e-2 / lam[-1], 1e3 / lam[0], 40) / rate  # barely moved to converged
    coef = vecs.T @ y

    def worst_error(outputs):
        errors = []
        for i, s in enumerate(steps):
            grown = -np.expm1(-rate * lam * s)
            errors.append(_rel(outputs[0][i], vecs @ (grown[:, None] * coef)))
            errors.append(_rel(outputs[1][i], kt @ (vecs @ ((grown / lam)[:, None] * coef))))
        return max(errors)

    args = (k.astype(np.float32), y.astype(np.float32))
    t32, kt32 = jnp.asarray(steps, jnp.float32), kt.astype(np.float32)
    got = {
        precision: predict.gradient_descent_mse(*args, diag_reg=reg, eigh_precision=precision)(t32, 0.0, 0.0, kt32)
        for precision in ("auto", "working", "float64")
    }
    working = worst_error(got["working"])
    assert (working > 1e-2) if not float32_enough else (working < 5e-3)
    assert worst_error(got["auto"]) < 1e-2
    for a, b in zip(got["auto"], got["working" if float32_enough else "float64"]):
        np.testing.assert_array_equal(a, b)
    # Under jit the check runs inside the computation and decides the same way.
    jitted = jax.jit(lambda k, y, t, kt: predict.gradient_descent_mse(k, y, diag_reg=reg)(t, 0.0, 0.0, kt))
    for a, b in zip(jitted(*args, t32, kt32), got["auto"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))

"""Training dynamics: optax-trained network vs linearized network vs NTK predictions.

Oracles used here are independent of ``ntk_adapters.dynamics``:

* the NTK is rebuilt from a Jacobian taken with ``jax.jacrev`` over the flattened parameters;
* discrete gradient descent (and heavy-ball momentum) of a linear model is iterated by hand in
  function space with numpy: ``r ← r − (η/(N·O)) Θ r`` is exactly what optax SGD does to the
  linearized network under the loss ½·mean over N·O entries;
* the closed form of gradient flow is evaluated with ``scipy.linalg.expm``;
* discrete GD and gradient flow differ per eigenmode by at most ``2k·e⁻²/(k−1)²`` of the initial
  residual after ``k`` steps when ``η ≤ η_max/2`` (derived in ``_flow_vs_gd_bound``).
"""

from __future__ import annotations

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from ntk_adapters import predict
from ntk_adapters.dynamics import TrainingComparison, compare_training, mse_loss

flax_linen = pytest.importorskip("flax.linen")
hk = pytest.importorskip("haiku")
import ntk_adapters.flax  # noqa: E402
import ntk_adapters.haiku  # noqa: E402

N, M, D, O = 16, 8, 4, 2


class MLP(flax_linen.Module):
    width: int

    @flax_linen.compact
    def __call__(self, x):
        x = flax_linen.relu(flax_linen.Dense(self.width)(x))
        return flax_linen.Dense(O)(x)


def _targets(x):
    return np.stack([np.sin(x[:, 0]), np.cos(x[:, 1])], axis=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    xt = rng.normal(size=(M, D))
    return x, _targets(x), xt, _targets(xt)


def _float64(model):
    return model.replace(params=jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), model.params))


def flax_model(width, x, seed=0):
    return _float64(ntk_adapters.flax.adapt(MLP(width), None, x, key=jax.random.PRNGKey(seed)))


def haiku_model(width, x, seed=0):
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([width, O])(x)))
    return _float64(ntk_adapters.haiku.adapt(net, None, x, key=jax.random.PRNGKey(seed)))


def jacobian_ntk(model, x):
    """Full NTK ``(n·O, n·O)`` of the inputs ``x`` (row index = example·O + output), from the
    Jacobian over the flattened parameters."""
    flat, unravel = jax.flatten_util.ravel_pytree(model.params)
    j = jax.jit(jax.jacrev(lambda p, x: model.apply_fn(unravel(p), x)))(flat, x)  # (n, O, P)
    j = np.asarray(j).reshape(-1, flat.size)
    return j @ j.T


def _flow_vs_gd_bound(k: int) -> float:
    """Largest |(1 − a)^k − e^{−ak}| over a ∈ [0, 1].

    e^{−ak} − (1−a)^k = (e^{−a} − (1−a)) Σ_j e^{−aj} (1−a)^{k−1−j} ≤ (a²/2) · k · e^{−a(k−1)},
    maximal at a = 2/(k−1): 2k·e⁻²/(k−1)². With a = η λ/(N·O) ≤ 1 for every eigenvalue λ
    (i.e. η ≤ η_max/2) this bounds the gap per eigenmode, hence in norm.
    """
    return 2 * k * math.exp(-2) / (k - 1) ** 2


def _rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


# --------------------------------------------------------------------------------------------
# Time axis and normalization, end to end (tight)
# --------------------------------------------------------------------------------------------


@pytest.mark.float64
def test_linearized_gd_matches_closed_form(data):
    x, y, xt, yt = data
    model = flax_model(128, x)
    full = jacobian_ntk(model, np.concatenate([x, xt]))
    theta, theta_st = full[: N * O, : N * O], full[N * O :, : N * O]
    lam_max = np.linalg.eigvalsh(theta)[-1]
    size = N * O
    lr = 0.4 * size / lam_max  # a = η λ/(N·O) ≤ 0.4 for every mode
    steps, every = 60, 6
    result = compare_training(
        model,
        x,
        y,
        xt,
        yt,
        learning_rate=lr,
        steps=steps,
        eval_every=every,
        kernel="full",
        infinite=False,
        progress=False,
    )
    assert isinstance(result, TrainingComparison)
    np.testing.assert_array_equal(result.step, np.arange(0, steps + 1, every))
    np.testing.assert_allclose(result.time, result.step * lr)

    f0 = np.asarray(model(model.params, x)).reshape(-1)
    f0_test = np.asarray(model(model.params, xt)).reshape(-1)
    yf = y.reshape(-1)

    # Discrete gradient descent of the linear model, by hand.
    f, ft = f0.copy(), f0_test.copy()
    disc, disc_test = [f.copy()], [ft.copy()]
    for _ in range(steps):
        r = f - yf
        f = f - lr / size * theta @ r
        ft = ft - lr / size * theta_st @ r
        disc.append(f.copy())
        disc_test.append(ft.copy())
    disc = np.stack(disc)[::every].reshape(-1, N, O)
    disc_test = np.stack(disc_test)[::every].reshape(-1, M, O)
    scale = _rms(f0 - yf)
    np.testing.assert_allclose(result.outputs_train["linearized"], disc, atol=1e-9 * scale, rtol=0)
    np.testing.assert_allclose(result.outputs_test["linearized"], disc_test, atol=1e-9 * scale, rtol=0)

    # Gradient flow in closed form, by scipy.
    flow, flow_test = [], []
    for t in result.time:
        decay = scipy.linalg.expm(-t / size * theta)  # df/dt = −Θ (f − y)/(N·O), t = k·η
        r_t = decay @ (f0 - yf)
        flow.append(yf + r_t)
        flow_test.append(f0_test - theta_st @ np.linalg.solve(theta, (f0 - yf) - r_t))
    flow = np.stack(flow).reshape(-1, N, O)
    flow_test = np.stack(flow_test).reshape(-1, M, O)
    np.testing.assert_allclose(result.outputs_train["ntk"], flow, atol=1e-7 * scale, rtol=0)
    np.testing.assert_allclose(result.outputs_test["ntk"], flow_test, atol=1e-6 * scale, rtol=0)

    # Gradient descent follows the flow within the derived discretization bound at every step.
    for i, k in enumerate(result.step):
        if k >= 2:
            gap = np.linalg.norm((result.outputs_train["linearized"][i] - result.outputs_train["ntk"][i]).ravel())
            assert gap <= _flow_vs_gd_bound(int(k)) * np.linalg.norm(f0 - yf) + 1e-9, (k, gap)
    # ... and the bound is not vacuous: training moved the outputs far more than that.
    assert _rms(result.outputs_train["ntk"][-1] - f0.reshape(N, O)) > 30 * _flow_vs_gd_bound(steps) * scale

    # Reported losses and discrepancies are what they say.
    np.testing.assert_allclose(result.loss_train["ntk"], [0.5 * np.mean((f - y) ** 2) for f in flow])
    np.testing.assert_allclose(result.loss_test["linearized"], [0.5 * np.mean((f - yt) ** 2) for f in disc_test])
    np.testing.assert_allclose(
        result.discrepancy_test["linearized-ntk"],
        [_rms(a - b) for a, b in zip(result.outputs_test["linearized"], result.outputs_test["ntk"])],
    )
    assert result.loss_train["network"][-1] < 0.5 * result.loss_train["network"][0]


@pytest.mark.float64
def test_momentum_matches_heavy_ball_prediction(data):
    x, y, _, _ = data
    model = haiku_model(64, x)
    theta = jacobian_ntk(model, x)
    size = N * O
    lam_max = np.linalg.eigvalsh(theta)[-1]
    lr, mu, steps = 0.005 * size / lam_max, 0.9, 600
    result = compare_training(
        model,
        x,
        y,
        learning_rate=lr,
        momentum=mu,
        steps=steps,
        eval_every=100,
        kernel="full",
        infinite=False,
        progress=False,
    )
    assert result.momentum == mu

    # optax heavy ball (v ← μ v + g, θ ← θ − η v) on the linear model, in function space.
    f0 = np.asarray(model(model.params, x)).reshape(-1)
    yf = y.reshape(-1)
    f, u = f0.copy(), np.zeros_like(f0)
    disc = [f.copy()]
    for _ in range(steps):
        u = mu * u + theta @ (f - yf) / size
        f = f - lr * u
        disc.append(f.copy())
    disc = np.stack(disc)[::100].reshape(-1, N, O)
    scale = _rms(f0 - yf)
    np.testing.assert_allclose(result.outputs_train["linearized"], disc, atol=1e-9 * scale, rtol=0)

    # The momentum ODE is within O(η) of the iteration (measured 0.16% of the initial residual
    # at this η, 2.4% at 4η): the stated tolerance is 0.5%, ...
    tol = 0.005 * scale
    gap = np.sqrt(np.mean((result.outputs_train["ntk"] - disc) ** 2, axis=(1, 2)))
    assert np.all(gap <= tol), gap
    # ... while plain gradient flow at the same η is far off (the test can tell them apart).
    plain = predict.gradient_descent_mse(theta.reshape(N, O, N, O).transpose(0, 2, 1, 3), y, lr)(
        jnp.asarray(result.step), f0.reshape(N, O)
    )
    assert _rms(np.asarray(plain)[-1] - disc[-1]) > 10 * tol


# --------------------------------------------------------------------------------------------
# Real networks approach the prediction as width grows (Flax and Haiku)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("build", [flax_model, haiku_model], ids=["flax", "haiku"])
def test_gap_to_prediction_shrinks_with_width(data, build):
    x, y, xt, yt = data
    gaps = {}
    for width in (32, 2048):
        model = build(width, x)
        # Standard parameterization: the NTK grows with width, so the rate is set relative to
        # the stability limit (η ∝ 1/width), the usual way such networks are trained.
        lr = 0.5 * predict.max_learning_rate(jacobian_ntk(model, x), N * O)
        result = compare_training(
            model, x, y, xt, yt, learning_rate=lr, steps=100, eval_every=20, infinite=False, progress=False
        )
        r0 = _rms(result.outputs_train["network"][0] - y)
        gaps[width] = (
            max(result.discrepancy_train["network-ntk"].max(), result.discrepancy_test["network-ntk"].max()) / r0
        )
        assert result.loss_train["network"][-1] < 0.2 * result.loss_train["network"][0]
    # Stated tolerance: a 2048-wide network stays within 2% (of the initial residual) of the
    # empirical-NTK prediction; the gap is at least 5 times smaller than at width 32.
    assert gaps[2048] < 0.02, gaps
    assert gaps[32] > 5 * gaps[2048], gaps


# --------------------------------------------------------------------------------------------
# Minibatches, reports, other optimizers, errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minibatch_result(data):
    x, y, xt, yt = data
    model = flax_model(1024, x)
    lr = 0.5 * predict.max_learning_rate(jacobian_ntk(model, x), N * O)
    return compare_training(
        model,
        x,
        y,
        xt,
        yt,
        learning_rate=lr,
        steps=80,
        eval_every=16,
        batch_size=4,
        key=jax.random.PRNGKey(3),
        infinite=False,
        progress=False,
    )


def test_minibatch_runs_and_reports(minibatch_result):
    r = minibatch_result
    assert r.batch_size == 4
    assert set(r.names) == {"network", "linearized", "ntk"}
    for table in (r.loss_train, r.loss_test, r.discrepancy_train, r.discrepancy_test):
        for v in table.values():
            assert v.shape == (6,) and np.all(np.isfinite(v))
    assert r.outputs_test["network"].shape == (6, M, O)
    assert any("minibatch" in n for n in r.notes)
    assert r.loss_train["network"][-1] < r.loss_train["network"][0]
    # Network and linearization see the same batches: at this width they stay much closer to
    # each other than to full-batch gradient flow, which minibatch noise moves them away from.
    assert r.discrepancy_train["network-linearized"][-1] < 0.1 * r.discrepancy_train["network-ntk"][-1]


def test_table_and_plot(minibatch_result, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    r = minibatch_result
    text = r.table()
    assert "[train]" in text and "[test]" in text
    assert "loss net" in text and "|net−eNTK|" in text and "minibatch 4" in text
    train_block = text.split("[train]")[1].split("[test]")[0].strip().splitlines()
    assert len(train_block) == 3 + len(r.step)  # title, header, rule, one row per evaluation
    assert len(r.table(max_rows=3).split("[train]")[1].split("[test]")[0].strip().splitlines()) == 3 + 3
    final = r.final()
    assert final["loss_train/network"] == pytest.approx(float(r.loss_train["network"][-1]))
    path = tmp_path / "sub" / "dyn.png"
    fig = r.plot(path)
    assert path.exists() and path.stat().st_size > 10_000
    assert len(fig.axes) == 4
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_arbitrary_optimizer_trains_without_prediction(data):
    x, y, _, _ = data
    model = flax_model(64, x)
    r = compare_training(model, x, y, optimizer=optax.adam(1e-2), steps=30, eval_every=10, progress=False)
    assert set(r.names) == {"network", "linearized"}
    assert r.learning_rate is None and r.kernel is None
    np.testing.assert_array_equal(r.time, r.step)
    assert any("no NTK prediction" in n for n in r.notes)
    assert r.loss_train["network"][-1] < r.loss_train["network"][0]
    assert "user optimizer" in r.table()


@pytest.mark.float64
def test_plain_function_model(data):
    x, y, _, _ = data
    w = jnp.asarray(np.random.default_rng(1).normal(size=(D, O)) / 2)

    def f(p, x):
        return x @ p["w"]

    # A linear model is its own linearization, and its NTK (x xᵀ ⊗ I) is exactly per-output, so
    # the traced kernel is exact too (computed here per example, vmap_axes=0).
    r = compare_training(
        f,
        x,
        y,
        params={"w": w},
        learning_rate=0.5,
        steps=20,
        eval_every=5,
        kernel="traced",
        vmap_axes=0,
        infinite=False,
        progress=False,
    )
    np.testing.assert_allclose(r.outputs_train["network"], r.outputs_train["linearized"], atol=1e-12)
    k = x @ x.T
    f0 = x @ np.asarray(w)
    expected = [y + scipy.linalg.expm(-t / (N * O) * k) @ (f0 - y) for t in r.time]
    np.testing.assert_allclose(r.outputs_train["ntk"], np.stack(expected), atol=1e-10)


def test_errors_name_the_argument(data):
    x, y, _, _ = data
    model = flax_model(8, x)
    with pytest.raises(ValueError, match="learning_rate"):
        compare_training(model, x, y, steps=3)
    with pytest.raises(ValueError, match="either optimizer"):
        compare_training(model, x, y, steps=3, learning_rate=0.1, optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="y_train"):
        compare_training(model, x, y[:, :1], steps=3, learning_rate=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        compare_training(model, x, y, steps=3, learning_rate=0.1, batch_size=N + 1)
    with pytest.raises(ValueError, match="momentum"):
        compare_training(model, x, y, steps=3, learning_rate=0.1, momentum=1.0)


def test_mse_loss_normalization():
    fx = jnp.zeros((4, 3))
    y = jnp.arange(12.0).reshape(4, 3)
    assert float(mse_loss(fx, y)) == pytest.approx(0.5 * np.mean(np.arange(12.0) ** 2))


def test_infinite_width_prediction_when_available(data):
    x, y, xt, yt = data
    model = flax_model(2048, x)
    try:
        from ntk_adapters.infinite import infinite_kernel_fn

        infinite_kernel_fn(model)(x[:2], None, get="ntk")
    except Exception as err:  # the engine is optional for dynamics
        with pytest.raises(type(err)):  # infinite=True re-raises the engine's error
            compare_training(model, x, y, learning_rate=1e-3, steps=2, infinite=True, progress=False)
        auto = compare_training(model, x, y, learning_rate=1e-3, steps=2, progress=False)
        assert "infinite" not in auto.names
        assert any("no infinite-width prediction" in n for n in auto.notes)
        pytest.skip(f"infinite-width engine does not handle this MLP: {type(err).__name__}: {err}")
    lr = 0.5 * predict.max_learning_rate(jacobian_ntk(model, x), N * O)
    r = compare_training(model, x, y, xt, yt, learning_rate=lr, steps=100, eval_every=20, infinite=True, progress=False)
    assert "infinite" in r.names
    r0 = _rms(r.outputs_train["network"][0] - y)
    # The infinite-width kernel differs from this network's empirical one by O(1/sqrt(width)).
    assert r.discrepancy_train["network-infinite"].max() < 0.05 * r0
    assert r.discrepancy_test["network-infinite"].max() < 0.1 * r0

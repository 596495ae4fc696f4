"""vmap_axes='auto' and checked vmap_axes: the per-example path is taken exactly when the traced
program proves that examples do not interact, and refused where they do, in every tool that
would otherwise compute a wrong kernel (empirical kernels, Monte Carlo, batch())."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters
import ntk_adapters.flax as ntk_flax
from ntk_adapters import (
    batch,
    compare_training,
    empirical_kernel_fn,
    empirical_ntk_fn,
    kernel_regression_cg,
    monte_carlo_kernel_fn,
)
from ntk_adapters.axes import OutputAxes
from ntk_adapters.inputs import BatchAxes, resolve_vmap_axes
from ntk_adapters.structured import structured_contributions

KEY = jax.random.PRNGKey(0)


def centred(p, x):
    """Centres its inputs over the batch: every example's output depends on all the others."""
    return jnp.tanh((x - x.mean(0)) @ p["w1"]) @ p["w2"]


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def init(key, x):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (x.shape[1], 8)) / np.sqrt(x.shape[1]),
        "w2": jax.random.normal(k2, (8, 3)) / np.sqrt(8),
    }


@pytest.fixture(scope="module")
def data():
    x1 = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    return init(KEY, x1), x1, x2


def test_auto_takes_the_per_example_path_only_when_proven(data):
    p, x1, _ = data
    assert resolve_vmap_axes(ntk_adapters.adapt(mlp, p), x1, "auto") == BatchAxes.of(0, 0)
    assert resolve_vmap_axes(ntk_adapters.adapt(centred, p), x1, "auto") is None


@pytest.mark.float64
def test_auto_gives_the_whole_batch_kernel_of_a_model_that_mixes_examples(data):
    p, x1, _ = data
    exact = empirical_ntk_fn(centred, vmap_axes=None, implementation="jacobian")(x1, None, p)
    per_example = sum(structured_contributions(centred, p, x1, None, OutputAxes.make(2, (-1,), ()), 0)) / 3
    assert not np.allclose(per_example, exact, rtol=1e-3)  # what trusting vmap_axes=0 would give
    for impl in ("auto", "jacobian", "structured", "ntvp"):
        np.testing.assert_allclose(empirical_ntk_fn(centred, implementation=impl)(x1, None, p), exact, rtol=1e-10)


@pytest.mark.parametrize("vmap_axes", [0, (0, 0, {})])
def test_declared_vmap_axes_on_a_mixing_model_is_refused_with_the_operation(data, vmap_axes):
    p, x1, _ = data
    with pytest.raises(ValueError, match="reduce_sum.*sums over the batch axis"):
        empirical_ntk_fn(centred, vmap_axes=vmap_axes)(x1, None, p)
    model = ntk_adapters.adapt(centred, p, x1, init_fn=init)
    with pytest.raises(ValueError, match="reduce_sum"):
        monte_carlo_kernel_fn(model, KEY, 2, vmap_axes=vmap_axes)(x1)


@pytest.mark.float64
def test_batch_refuses_to_tile_a_mixing_model_and_tiles_an_independent_one(data):
    p, x1, x2 = data
    with pytest.raises(ValueError, match="cannot be tiled.*reduce_sum"):
        batch(empirical_ntk_fn(centred), 2)(x1, None, params=p)
    with pytest.raises(ValueError, match="cannot be tiled.*reduce_sum"):
        kernel_regression_cg(empirical_kernel_fn(centred), x1, jnp.ones((5, 3)), batch_size=2, params=p)
    tiled = batch(empirical_ntk_fn(mlp), 2)(x1, x2, params=p)
    np.testing.assert_allclose(tiled, empirical_ntk_fn(mlp, vmap_axes=None)(x1, x2, p), rtol=1e-10)


class TrainModeBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=False)(nn.Dense(6)(x))
        return nn.Dense(2)(jnp.tanh(h))


def test_flax_batchnorm_in_training_mode_names_its_layer_and_gets_the_exact_kernel(data):
    _, x1, _ = data
    module = TrainModeBatchNorm()
    model = ntk_flax.adapt(module, module.init(KEY, x1), x1, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="BatchNorm_0"):
        empirical_ntk_fn(model, vmap_axes=0)(x1)
    # The whole-batch Jacobian written with jax.jacrev: an independent computation.
    jac = jax.jacrev(model.apply_fn)(model.params, x1)
    leaves = jax.tree_util.tree_leaves(jac)
    by_hand = (
        sum(
            jnp.einsum("ao...,bo...->ab", j.reshape(j.shape[:2] + (-1,)), j.reshape(j.shape[:2] + (-1,)))
            for j in leaves
        )
        / 2
    )
    # Flax initializes float32 parameters: the kernels agree to float32 round-off.
    np.testing.assert_allclose(empirical_ntk_fn(model)(x1), by_hand, rtol=1e-5, atol=1e-6)


def test_compare_training_with_tuple_inputs_and_diag_reg_reaches_the_ridge_solution():
    """t → ∞ with diag_reg: f_test = f0 + Θ_sX (Θ + λ·mean(diag Θ)·I)⁻¹ (y − f0), written out here."""
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    x = (jax.random.normal(k[0], (6, 3)), jax.random.uniform(k[1], (6,), minval=0.5, maxval=1.5))
    x_test = (jax.random.normal(k[2], (4, 3)), jnp.ones(4))
    y = jax.random.normal(k[3], (6, 2))

    def f(p, x):
        feats, w = x
        return (jnp.tanh(feats @ p["w1"]) * w[:, None]) @ p["w2"]

    p = {"w1": jax.random.normal(KEY, (3, 16)), "w2": jax.random.normal(k[3], (16, 2)) / 4}
    lam = 0.5
    result = compare_training(
        ntk_adapters.adapt(f, p),
        x,
        y,
        x_test,
        learning_rate=0.05,
        steps=4000,
        kernel="traced",
        diag_reg=lam,
        infinite=False,
        progress=False,
    )
    ntk = empirical_ntk_fn(f, vmap_axes=None, implementation="jacobian")
    k_tt, k_st = np.asarray(ntk(x, None, p)), np.asarray(ntk(x_test, x, p))
    reg = k_tt + lam * np.mean(np.diag(k_tt)) * np.eye(6)
    f0, f0_test = np.asarray(f(p, x)), np.asarray(f(p, x_test))
    want_test = f0_test + k_st @ np.linalg.solve(reg, np.asarray(y) - f0)
    np.testing.assert_allclose(result.outputs_test["ntk"][-1], want_test, rtol=1e-4, atol=1e-5)
    # As in neural-tangents, the training outputs evolve under the regularized kernel: they reach y.
    np.testing.assert_allclose(result.outputs_train["ntk"][-1], y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="diag_reg"):
        compare_training(
            ntk_adapters.adapt(f, p), x, y, learning_rate=0.05, momentum=0.9, steps=2, diag_reg=lam, progress=False
        )

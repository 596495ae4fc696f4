"""The Flax adapter (linen and NNX) and the empirical kernels of real Flax modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import ntk_adapters.flax as ntk_flax
from ntk_adapters.empirical import empirical_ntk_fn
from ntk_adapters.monte_carlo import monte_carlo_kernel_fn


class MLP(nn.Module):
    width: int = 8
    out: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.out)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="VALID")(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(jnp.tanh(x))


class TwoHeads(nn.Module):
    def setup(self):
        self.trunk = nn.Dense(6)
        self.logits = nn.Dense(3)
        self.value = nn.Dense(1)

    def features(self, x):
        return nn.tanh(self.trunk(x))

    def __call__(self, x):
        h = self.features(x)
        return {"logits": self.logits(h), "value": self.value(h)}


class Dropped(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool):
        x = nn.Dense(16)(x)
        return nn.Dense(1)(nn.Dropout(0.5, deterministic=deterministic)(x))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(0), (4, 5))


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6, 2))


def _agree(model, x1, x2=None, **kw):
    kernels = [empirical_ntk_fn(model, implementation=i, trace_axes=(), **kw)(x1, x2) for i in ("jacobian", "ntvp")]
    kernels.append(empirical_ntk_fn(model, vmap_axes=0, trace_axes=(), **kw)(x1, x2))
    for k in kernels[1:]:
        np.testing.assert_allclose(k, kernels[0], rtol=1e-4, atol=1e-5)
    return kernels[0]


def test_mlp_params_are_the_params_collection(x):
    variables = MLP().init(jax.random.PRNGKey(0), x)
    model = ntk_flax.adapt(MLP(), variables, x)
    assert model.framework == "flax.linen"
    assert set(model.params) == {"Dense_0", "Dense_1"}
    assert model.input_shape == (5,) and model.output_shape == (3,)
    np.testing.assert_allclose(model(model.params, x), MLP().apply(variables, x))


def test_implementations_agree_on_mlp_cnn_batchnorm_and_heads(x, images):
    _agree(ntk_flax.adapt(MLP(), None, x), x, x[:2])
    _agree(ntk_flax.adapt(CNN(), None, images), images)
    bn = BatchNormNet()
    variables = bn.init(jax.random.PRNGKey(0), x)
    # Non-trivial running statistics, as after training.
    variables = {**variables, "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.3, variables["batch_stats"])}
    model = ntk_flax.adapt(bn, variables, x, train=False)
    assert set(model.params) == {"Dense_0", "BatchNorm_0", "Dense_1"}
    assert "batch_stats" in model.info["variables"]
    _agree(model, x, x[:3])
    heads = ntk_flax.adapt(TwoHeads(), None, x, output="logits")
    assert heads.output_shape == (3,)
    _agree(heads, x)


def test_batchnorm_running_statistics_are_used_and_not_differentiated(x):
    bn = BatchNormNet()
    variables = bn.init(jax.random.PRNGKey(0), x)
    shifted = {**variables, "batch_stats": jax.tree_util.tree_map(lambda v: v + 1.0, variables["batch_stats"])}
    a = ntk_flax.adapt(bn, variables, x, train=False)
    b = ntk_flax.adapt(bn, shifted, x, train=False)
    assert not np.allclose(a(a.params, x), b(b.params, x))
    np.testing.assert_allclose(b(b.params, x), bn.apply(shifted, x, train=False), rtol=1e-6)


def test_training_mode_batchnorm_needs_mutable(x):
    bn = BatchNormNet()
    variables = bn.init(jax.random.PRNGKey(0), x)
    model = ntk_flax.adapt(bn, variables, x, train=True, mutable=["batch_stats"])
    # The batch statistics couple examples: per-example Jacobians would be wrong, so only
    # whole-batch implementations are used and they agree.
    k1 = empirical_ntk_fn(model, implementation="jacobian")(x)
    k2 = empirical_ntk_fn(model, implementation="ntvp")(x)
    np.testing.assert_allclose(k1, k2, rtol=1e-4, atol=1e-5)


def test_method_and_selectors(x):
    variables = TwoHeads().init(jax.random.PRNGKey(0), x)
    feats = ntk_flax.adapt(TwoHeads(), variables, x, method="features")
    np.testing.assert_allclose(
        feats(feats.params, x),
        jnp.tanh(x @ variables["params"]["trunk"]["kernel"] + variables["params"]["trunk"]["bias"]),
        rtol=1e-6,
    )
    by_fn = ntk_flax.adapt(TwoHeads(), variables, x, output=lambda out: out["value"])
    assert by_fn.output_shape == (1,)
    with pytest.raises(TypeError, match=r"TwoHeads.__call__ must return a single array"):
        ntk_flax.adapt(TwoHeads(), variables, x)
    with pytest.raises(KeyError, match="'policy' is not among the keys"):
        ntk_flax.adapt(TwoHeads(), variables, x, output="policy")


def test_variables_must_hold_params(x):
    variables = MLP().init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"pass \{'params': params\}"):
        ntk_flax.adapt(MLP(), variables["params"], x)


def test_dropout_rngs_are_closed_over(x):
    module = Dropped()
    model = ntk_flax.adapt(module, None, x, rngs={"dropout": jax.random.PRNGKey(3)}, deterministic=False)
    y1, y2 = model(model.params, x), model(model.params, x)
    np.testing.assert_array_equal(y1, y2)  # one fixed mask
    plain = ntk_flax.adapt(module, {"params": model.params}, x, deterministic=True)
    assert not np.allclose(y1, plain(plain.params, x))


def test_init_fn_draws_fresh_params_from_the_module_initializers(x):
    model = ntk_flax.adapt(MLP(width=256), None, x)
    p1, p2 = model.init(jax.random.PRNGKey(1), x), model.init(jax.random.PRNGKey(2), x)
    assert jax.tree_util.tree_structure(p1) == jax.tree_util.tree_structure(model.params)
    assert not np.allclose(p1["Dense_0"]["kernel"], p2["Dense_0"]["kernel"])
    # lecun_normal: Var = 1 / fan_in
    np.testing.assert_allclose(np.var(p1["Dense_1"]["kernel"]) * 256, 1.0, rtol=0.15)


class NnxMLP(nnx.Module):
    def __init__(self, rngs, width=8):
        self.hidden = nnx.Linear(5, width, rngs=rngs)
        self.out = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_nnx_module_matches_the_equivalent_linen_module(x):
    module = NnxMLP(nnx.Rngs(0))
    model = ntk_flax.adapt(module, None, x, init=lambda rngs: NnxMLP(rngs))
    assert model.framework == "flax.nnx"
    assert set(model.params) == {"hidden", "out"}
    linen_params = {"Dense_0": model.params["hidden"], "Dense_1": model.params["out"]}
    linen = ntk_flax.adapt(MLP(), {"params": linen_params}, x)
    np.testing.assert_allclose(model(model.params, x), linen(linen.params, x), rtol=1e-6)
    np.testing.assert_allclose(_agree(model, x), _agree(linen, x), rtol=1e-5, atol=1e-6)
    fresh = model.init(jax.random.PRNGKey(5), x)
    assert not np.allclose(fresh["hidden"]["kernel"], model.params["hidden"]["kernel"])


def test_nnx_without_init_has_no_init_fn(x):
    model = ntk_flax.adapt(NnxMLP(nnx.Rngs(0)), None, x)
    with pytest.raises(ValueError, match="has no init_fn"):
        model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="variables must be None for an NNX module"):
        ntk_flax.adapt(NnxMLP(nnx.Rngs(0)), {"params": {}}, x)


@pytest.mark.slow
def test_monte_carlo_nngp_of_wide_relu_layer_matches_arc_cosine(arccos_nngp):
    """E over inits of f(x1)·f(x2)/O for one hidden ReLU layer is the arc-cosine kernel at every
    width (lecun_normal: σw² = 1, zero bias); the Monte Carlo error shrinks as width grows."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    expected = arccos_nngp(x, x)
    errors = {}
    for width in (8, 2048):
        model = ntk_flax.adapt(MLP(width=width, out=256), None, x)
        estimate = monte_carlo_kernel_fn(model, jax.random.PRNGKey(7), 128, batch_size=64, get="nngp")(x)
        errors[width] = np.abs(np.asarray(estimate) - expected).max() / np.abs(expected).max()
    assert errors[2048] < errors[8] / 2
    assert errors[2048] < 0.03

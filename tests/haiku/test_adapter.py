"""The Haiku adapter and the empirical kernels of real Haiku modules."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters.haiku as ntk_haiku
from ntk_adapters.empirical import empirical_ntk_fn
from ntk_adapters.monte_carlo import monte_carlo_kernel_fn


def mlp_fn(x, width=8, out=3):
    return hk.nets.MLP([width, out])(x)


def cnn_fn(x):
    x = jax.nn.relu(hk.Conv2D(4, 3, padding="SAME")(x))
    x = jax.nn.relu(hk.Conv2D(4, 3, stride=2, padding="VALID")(x))
    return hk.Linear(2)(hk.Flatten()(x))


def batchnorm_fn(x, is_training):
    x = hk.Linear(6)(x)
    x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
    return hk.Linear(2)(jnp.tanh(x))


def heads_fn(x):
    h = jnp.tanh(hk.Linear(6)(x))
    return hk.Linear(3, name="logits")(h), hk.Linear(1, name="value")(h)


def dropout_fn(x):
    return hk.Linear(1)(hk.dropout(hk.next_rng_key(), 0.5, hk.Linear(16)(x)))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(0), (4, 5))


def _agree(model, x1, x2=None):
    kernels = [empirical_ntk_fn(model, implementation=i, trace_axes=())(x1, x2) for i in ("jacobian", "ntvp")]
    kernels.append(empirical_ntk_fn(model, vmap_axes=0, trace_axes=())(x1, x2))
    for k in kernels[1:]:
        np.testing.assert_allclose(k, kernels[0], rtol=1e-4, atol=1e-5)
    return kernels[0]


def test_transform_and_without_apply_rng(x):
    net = hk.transform(mlp_fn)
    params = net.init(jax.random.PRNGKey(0), x)
    model = ntk_haiku.adapt(net, params, x)
    assert model.framework == "haiku" and model.output_shape == (3,)
    np.testing.assert_allclose(model(params, x), net.apply(params, None, x))
    plain = ntk_haiku.adapt(hk.without_apply_rng(net), params, x)
    np.testing.assert_allclose(plain(params, x), model(params, x))


def test_implementations_agree_on_mlp_cnn_batchnorm_and_heads(x):
    _agree(ntk_haiku.adapt(hk.transform(mlp_fn), None, x), x, x[:2])
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6, 2))
    _agree(ntk_haiku.adapt(hk.transform(cnn_fn), None, images), images)
    bn = hk.transform_with_state(batchnorm_fn)
    params, state = bn.init(jax.random.PRNGKey(0), x, is_training=True)
    _, state = bn.apply(params, state, None, x + 1.0, is_training=True)  # non-trivial running stats
    model = ntk_haiku.adapt(bn, params, x, state=state, is_training=False)
    np.testing.assert_allclose(model(params, x), bn.apply(params, state, None, x, is_training=False)[0])
    _agree(model, x, x[:3])
    heads = ntk_haiku.adapt(hk.transform(heads_fn), None, x, output=0)
    assert heads.output_shape == (3,)
    _agree(heads, x)


def test_state_is_required_for_transform_with_state(x):
    bn = hk.transform_with_state(batchnorm_fn)
    params, _ = bn.init(jax.random.PRNGKey(0), x, is_training=True)
    with pytest.raises(ValueError, match="pass state="):
        ntk_haiku.adapt(bn, params, x, is_training=False)


def test_missing_rng_is_a_clear_error(x):
    net = hk.transform(dropout_fn)
    params = net.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"draws random numbers.*pass rng=jax.random.PRNGKey"):
        ntk_haiku.adapt(net, params, x)
    model = ntk_haiku.adapt(net, params, x, rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(model(params, x), model(params, x))


def test_tuple_output_needs_a_selector(x):
    with pytest.raises(TypeError, match="Pick one output with the adapter's output= selector"):
        ntk_haiku.adapt(hk.transform(heads_fn), None, x)
    with pytest.raises(TypeError, match="expects the result of hk.transform"):
        ntk_haiku.adapt(heads_fn, None, x)


def test_init_fn_uses_haikus_truncated_normal(x, haiku_truncated_variance):
    model = ntk_haiku.adapt(hk.transform(lambda v: mlp_fn(v, width=512)), None, x)
    fresh = model.init(jax.random.PRNGKey(3), x)
    w = np.asarray(fresh["mlp/~/linear_1"]["w"])
    assert np.abs(w).max() <= 2 / np.sqrt(512) + 1e-7
    np.testing.assert_allclose(np.var(w) * 512, haiku_truncated_variance, rtol=0.1)


@pytest.mark.slow
def test_monte_carlo_nngp_of_wide_relu_layer_matches_arc_cosine(arccos_nngp, haiku_truncated_variance):
    """Haiku's default Linear init is an uncorrected ±2σ truncated normal of std 1/√fan_in, so
    both layers have σw² ≈ 0.7737: the NNGP is σw² · arccos(σw² x·x'/d)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    s = haiku_truncated_variance
    expected = s * arccos_nngp(x, x, weight_var=s)
    errors = {}
    for width in (8, 2048):
        net = hk.transform(lambda v, w=width: mlp_fn(v, width=w, out=256))
        model = ntk_haiku.adapt(net, None, x)
        estimate = monte_carlo_kernel_fn(model, jax.random.PRNGKey(7), 128, batch_size=64, get="nngp")(x)
        errors[width] = np.abs(np.asarray(estimate) - expected).max() / np.abs(expected).max()
    assert errors[2048] < errors[8] / 2
    assert errors[2048] < 0.03

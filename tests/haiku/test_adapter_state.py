"""The Haiku adapter on functions whose init differs from their apply, and on functions taking
several inputs."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters.haiku as ntk_haiku


def batchnorm_fn(x, is_training):
    x = hk.Linear(4)(x)
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(0), (4, 5))


def test_batchnorm_initialized_in_eval_mode_says_to_pass_init_kwargs(x):
    net = hk.transform_with_state(batchnorm_fn)
    with pytest.raises(ValueError, match=r"pass init_kwargs=\{'is_training': True\}"):
        ntk_haiku.adapt(net, None, x, is_training=False)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_batchnorm_in_eval_mode_uses_the_moving_averages_of_init(x, dtype):
    x = x.astype(dtype)
    net = hk.transform_with_state(batchnorm_fn)
    model = ntk_haiku.adapt(net, None, x, is_training=False, init_kwargs={"is_training": True})
    params, state = model.params, model.info["state"]
    lin, bn = params["linear"], params["batch_norm"]
    mean = state["batch_norm/~/mean_ema"]["average"]
    var = state["batch_norm/~/var_ema"]["average"]
    h = x @ lin["w"] + lin["b"]
    expected = (h - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["offset"]  # hk.BatchNorm's eps
    rtol = 1e-5 if dtype == jnp.float32 else 1e-6
    np.testing.assert_allclose(model(params, x), expected, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(model(params, x), net.apply(params, state, None, x, is_training=False)[0], rtol=1e-6)
    fresh = model.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)


def classifier_fn(tokens, lengths):
    """Embeds tokens, averages the first ``lengths`` of them, and classifies."""
    emb = hk.Embed(11, 4)(tokens)
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    pooled = jnp.sum(emb * mask[..., None], 1) / lengths[:, None]
    return hk.Linear(3)(pooled)


def stateful_classifier_fn(tokens, lengths, is_training):
    logits = classifier_fn(tokens, lengths)
    hk.set_state("calls", hk.get_state("calls", (), jnp.int32, jnp.zeros) + 1)
    return hk.dropout(hk.next_rng_key(), 0.5, logits) if is_training else logits


@pytest.fixture(scope="module")
def text():
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 6), 0, 11)
    return tokens, jnp.array([6, 2, 4, 1])


def _by_hand(params, tokens, lengths):
    table = np.asarray(params["embed"]["embeddings"])
    pooled = np.stack([table[np.asarray(t[:n])].mean(0) for t, n in zip(tokens, lengths)])
    return pooled @ params["linear"]["w"] + params["linear"]["b"]


def test_classifier_takes_tokens_and_lengths_as_args_or_kwargs(text):
    tokens, lengths = text
    net = hk.transform(classifier_fn)
    as_args = ntk_haiku.adapt(net, None, (tokens, lengths), inputs="args")
    params = as_args.params
    expected = _by_hand(params, tokens, lengths)
    np.testing.assert_allclose(as_args(params, (tokens, lengths)), expected, rtol=1e-6)
    np.testing.assert_allclose(as_args(params, (tokens, lengths)), net.apply(params, None, tokens, lengths))
    as_kwargs = ntk_haiku.adapt(
        hk.without_apply_rng(net), params, {"tokens": tokens, "lengths": lengths}, inputs="kwargs"
    )
    np.testing.assert_allclose(as_kwargs(params, {"tokens": tokens, "lengths": lengths}), expected, rtol=1e-6)
    assert as_args.output_shape == (3,)
    # init_fn spreads the inputs too; the token ids stay integers, as hk.Embed requires.
    fresh = as_args.init(jax.random.PRNGKey(5), (tokens, lengths))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    assert not np.allclose(fresh["linear"]["w"], params["linear"]["w"])
    grads = jax.jit(jax.grad(lambda p: jnp.sum(as_args(p, (tokens, lengths)))))(params)
    assert grads["embed"]["embeddings"].shape == (11, 4)


def test_stateful_classifier_spreads_inputs_after_state_and_rng(text):
    tokens, lengths = text
    net = hk.transform_with_state(stateful_classifier_fn)
    rng = jax.random.PRNGKey(4)
    model = ntk_haiku.adapt(net, None, (tokens, lengths), inputs="args", rng=rng, is_training=True)
    state = model.info["state"]
    direct, updated = net.apply(model.params, state, rng, tokens, lengths, is_training=True)
    np.testing.assert_allclose(model(model.params, (tokens, lengths)), direct, rtol=1e-6)
    np.testing.assert_array_equal(model(model.params, (tokens, lengths)), model(model.params, (tokens, lengths)))
    # Each apply counts one call; the adapter discards the update, so its state stays init's.
    assert int(updated["~"]["calls"]) == int(state["~"]["calls"]) + 1
    np.testing.assert_array_equal(model.info["state"]["~"]["calls"], 0)
    kept = np.asarray(direct) != 0
    np.testing.assert_allclose(np.asarray(direct)[kept], 2 * _by_hand(model.params, tokens, lengths)[kept], rtol=1e-5)


def test_inputs_is_checked_against_the_sample(text):
    tokens, lengths = text
    net = hk.transform(classifier_fn)
    with pytest.raises(ValueError, match=r"inputs='args'.*must be a tuple or list.*got ArrayImpl"):
        ntk_haiku.adapt(net, None, tokens, inputs="args")
    with pytest.raises(ValueError, match=r"inputs='kwargs'.*must be a dict.*got tuple"):
        ntk_haiku.adapt(net, None, (tokens, lengths), inputs="kwargs")
    with pytest.raises(ValueError, match=r"inputs must be one of 'one', 'args', 'kwargs'; got 'many'"):
        ntk_haiku.adapt(net, None, (tokens, lengths), inputs="many")

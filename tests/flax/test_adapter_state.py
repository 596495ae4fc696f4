"""The Flax adapter on stateful NNX modules, linen BatchNorm over a named axis, partitioned
parameters and models taking several inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import ntk_adapters.flax as ntk_flax
from ntk_adapters.empirical import empirical_ntk_fn

EPS = 1e-5  # the default epsilon of linen's and NNX's BatchNorm


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(0), (4, 5))


def _batch_norm_by_hand(h, scale, bias):
    mean, var = jnp.mean(h, 0), jnp.var(h, 0)
    return (h - mean) / jnp.sqrt(var + EPS) * scale + bias


def _ntk_by_hand(f, params, x1, x2):
    """Θ[n, m, o, p] = Σ_θ ∂f(x1)[n, o]/∂θ · ∂f(x2)[m, p]/∂θ, from jax.jacrev of ``f``."""

    def flat(x):
        jac = jax.tree_util.tree_leaves(jax.jacrev(f)(params, x))
        return jnp.concatenate([j.reshape(j.shape[:2] + (-1,)) for j in jac], axis=-1)

    return jnp.einsum("noa,mpa->nmop", flat(x1), flat(x2))


def _state_arrays(module):
    """Every leaf of the module's full state as numpy (PRNG keys as their key data)."""

    def as_numpy(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.asarray(a)

    return jax.tree_util.tree_map(as_numpy, nnx.state(module))


def _assert_same_state(before, after):
    assert jax.tree_util.tree_structure(before) == jax.tree_util.tree_structure(after)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)


class Count(nnx.Variable):
    pass


class StatefulNet(nnx.Module):
    """Rngs, Dropout, BatchNorm and a counter of calls, as in Flax's NNX examples."""

    def __init__(self, rngs, width=6):
        self.hidden = nnx.Linear(5, width, rngs=rngs)
        self.norm = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(width, 2, rngs=rngs)
        self.count = Count(jnp.array(0))
        self.rngs = rngs

    def __call__(self, x):
        self.count[...] += 1
        noise = 0.1 * jax.random.normal(self.rngs.noise(), x.shape)
        return self.out(self.drop(jnp.tanh(self.norm(self.hidden(x + noise)))))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nnx_stateful_module_adapts_and_is_left_unchanged(x, mode):
    module = StatefulNet(nnx.Rngs(0, noise=1, dropout=2))
    getattr(module, mode)()
    before = _state_arrays(module)
    model = ntk_flax.adapt(module, None, x, init=lambda rngs: StatefulNet(rngs))
    assert model.output_shape == (2,)
    assert set(model.params) == {"hidden", "norm", "out"}
    ys = [model(model.params, x) for _ in range(3)] + [jax.jit(model.apply_fn)(model.params, x)]
    for y in ys[1:]:
        np.testing.assert_allclose(y, ys[0], rtol=1e-6)  # every call sees the same state
    # Its first eager call, on a copy, sees the same state the adapter closed over.
    np.testing.assert_allclose(ys[0], nnx.clone(module)(x), rtol=1e-6)
    empirical_ntk_fn(model, implementation="jacobian")(x)
    _assert_same_state(before, _state_arrays(module))
    fresh = model.init(jax.random.PRNGKey(3), x)
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(model.params)


def test_nnx_model_is_a_snapshot_that_later_use_of_the_module_does_not_change(x):
    module = StatefulNet(nnx.Rngs(0, noise=1, dropout=2))
    model = ntk_flax.adapt(module, None, x)
    y = model(model.params, x)
    module(x + 1.0)  # eagerly: moves the running statistics, the rng counts and the counter
    assert int(module.count[...]) == 1
    np.testing.assert_array_equal(model(model.params, x), y)


class Counter(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(5, 3, rngs=rngs)
        self.count = Count(jnp.array(0))

    def __call__(self, x):
        self.count[...] += 1
        return self.linear(x) * self.count[...]


def test_nnx_counter_starts_from_the_adapted_value_in_every_call(x):
    module = Counter(nnx.Rngs(0))
    module.count[...] = jnp.array(2)
    model = ntk_flax.adapt(module, None, x)
    expected = 3 * (x @ module.linear.kernel[...] + module.linear.bias[...])
    for y in (model(model.params, x), model(model.params, x), jax.jit(model.apply_fn)(model.params, x)):
        np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert int(module.count[...]) == 2


class NnxBatchNormNet(nnx.Module):
    def __init__(self, rngs, axis_name=None):
        self.linear = nnx.Linear(5, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, axis_name=axis_name, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float64, marks=pytest.mark.float64), jnp.float32])
def test_nnx_train_mode_batchnorm_uses_the_batch_statistics(x, dtype):
    module = NnxBatchNormNet(nnx.Rngs(0))
    module.train()
    x = x.astype(dtype)
    model = ntk_flax.adapt(module, None, x)
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    params = {
        **model.params,
        "norm": {"scale": 1.0 + jax.random.normal(key1, (4,)), "bias": jax.random.normal(key2, (4,))},
    }
    lin = params["linear"]
    expected = _batch_norm_by_hand(x @ lin["kernel"] + lin["bias"], params["norm"]["scale"], params["norm"]["bias"])
    rtol = 1e-5 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(model(params, x), expected, rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(module.norm.mean[...], 0.0)  # running statistics untouched
    module.eval()
    evaluated = ntk_flax.adapt(module, None, x)
    assert not np.allclose(evaluated(params, x), expected, atol=1e-3)


def test_nnx_dropout_sees_one_fixed_mask_unless_rng_key_redraws_it(x):
    module = nnx.Sequential(nnx.Linear(5, 64, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)))
    h = module.layers[0](x)
    fixed = ntk_flax.adapt(module, None, x)
    np.testing.assert_array_equal(fixed(fixed.params, x), fixed(fixed.params, x))

    redrawn = ntk_flax.adapt(module, None, x, rng_key=jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2)
    ys = jax.vmap(lambda k: redrawn.apply_fn(redrawn.params, x, rng_key=k))(keys)
    scaled = np.asarray(ys / h)  # inverted dropout: each unit is dropped (0) or kept and doubled (2)
    assert set(np.round(scaled, 6).ravel()) <= {0.0, 2.0}
    assert not np.array_equal(scaled[0], scaled[1])
    np.testing.assert_array_equal(redrawn(redrawn.params, x), redrawn(redrawn.params, x))
    np.testing.assert_array_equal(redrawn.apply_fn(redrawn.params, x, rng_key=keys[0]), ys[0])

    with pytest.raises(ValueError, match="rng_key was given, but Linear holds no rng stream"):
        ntk_flax.adapt(nnx.Linear(5, 2, rngs=nnx.Rngs(0)), None, x, rng_key=jax.random.key(0))


class CallTimeDropout(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(5, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, *, rngs):
        return self.drop(self.linear(x), rngs=rngs)


def test_nnx_rngs_given_as_call_keyword_are_copied_into_each_call(x):
    module, rngs = CallTimeDropout(nnx.Rngs(0)), nnx.Rngs(dropout=3)
    before = _state_arrays(rngs)
    model = ntk_flax.adapt(module, None, x, rngs=rngs)
    y = model(model.params, x)
    np.testing.assert_array_equal(jax.jit(model.apply_fn)(model.params, x), y)
    np.testing.assert_allclose(y, module(x, rngs=nnx.clone(rngs)), rtol=1e-6)
    _assert_same_state(before, _state_arrays(rngs))


@pytest.mark.float64
def test_nnx_batchnorm_over_a_named_axis_needs_axis_name(x):
    module = NnxBatchNormNet(nnx.Rngs(0), axis_name="batch")
    with pytest.raises(ValueError, match=r"axis name 'batch'.*pass axis_name='batch'"):
        ntk_flax.adapt(module, None, x)
    model = ntk_flax.adapt(module, None, x, axis_name="batch")
    lin = model.params["linear"]
    np.testing.assert_allclose(
        model(model.params, x), _batch_norm_by_hand(x @ lin["kernel"] + lin["bias"], 1.0, 0.0), rtol=1e-10, atol=1e-10
    )


class LinenBatchNormNet(nn.Module):
    """The normalization of Flax's ImageNet ResNet: statistics reduced over the 'batch' axis."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=not train, axis_name="batch")(x)


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float64, marks=pytest.mark.float64), jnp.float32])
def test_linen_train_mode_batchnorm_with_axis_name_uses_the_batch_statistics(x, dtype):
    x = x.astype(dtype)
    module = LinenBatchNormNet()
    variables = module.init(jax.random.PRNGKey(0), x)
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    params = {
        **variables["params"],
        "BatchNorm_0": {"scale": 1.0 + jax.random.normal(key1, (4,)), "bias": jax.random.normal(key2, (4,))},
    }
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    model = ntk_flax.adapt(
        module, {**variables, "params": params}, x, train=True, mutable=["batch_stats"], axis_name="batch"
    )

    def by_hand(p, x):
        dense, bn = p["Dense_0"], p["BatchNorm_0"]
        return _batch_norm_by_hand(x @ dense["kernel"] + dense["bias"], bn["scale"], bn["bias"])

    rtol = 1e-5 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(model(params, x), by_hand(params, x), rtol=rtol, atol=rtol)
    if dtype == jnp.float64:
        np.testing.assert_allclose(
            empirical_ntk_fn(model, implementation="jacobian", trace_axes=())(x),
            _ntk_by_hand(by_hand, params, x, x),
            rtol=1e-8,
            atol=1e-10,
        )
    # Evaluation mode reads the running averages and reduces over no axis.
    evaluated = ntk_flax.adapt(module, variables, x, train=False)
    np.testing.assert_allclose(evaluated(variables["params"], x), module.apply(variables, x, train=False), rtol=1e-6)


def test_unbound_axis_name_is_a_clear_error(x):
    module = LinenBatchNormNet()
    variables = module.init(jax.random.PRNGKey(0), x)
    with pytest.raises(
        ValueError,
        match=r"LinenBatchNormNet.__call__ reduces over the axis name 'batch'.*"
        r"pass axis_name='batch'",
    ):
        ntk_flax.adapt(module, variables, x, mutable=["batch_stats"])
    with pytest.raises(TypeError, match="axis_name must be a str or a tuple of str"):
        ntk_flax.adapt(module, variables, x, mutable=["batch_stats"], axis_name=3)


class TwoAxes(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3)(x)
        return h - jax.lax.pmean(jax.lax.psum(jnp.mean(h, 0), "model"), "batch")


def test_several_axis_names_are_all_bound(x):
    model = ntk_flax.adapt(TwoAxes(), None, x, axis_name=("batch", "model"))
    dense = model.params["Dense_0"]
    h = x @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(model(model.params, x), h - jnp.mean(h, 0), rtol=1e-10, atol=1e-12)


class Partitioned(nn.Module):
    """Parameters boxed with sharding names, as in Flax's LM1B model."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(
            6,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("mlp",)),
        )(x)
        return nn.Dense(2, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))(
            jnp.tanh(h)
        )


def _leaf_names(tree):
    return sorted(jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree))


def test_partitioned_params_are_unboxed_arrays(x):
    module = Partitioned()
    boxed = module.init(jax.random.PRNGKey(0), x)
    assert isinstance(boxed["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
    expected = ["['Dense_0']['bias']", "['Dense_0']['kernel']", "['Dense_1']['bias']", "['Dense_1']['kernel']"]
    for variables in (boxed, None):
        model = ntk_flax.adapt(module, variables, x)
        assert _leaf_names(model.params) == expected
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(model.params))
        assert _leaf_names(model.init(jax.random.PRNGKey(1), x)) == expected
        np.testing.assert_allclose(model(model.params, x), module.apply(boxed, x), rtol=1e-6)
    fresh = model.init(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(model(fresh, x), module.apply({"params": fresh}, x), rtol=1e-6)


class LinenClassifier(nn.Module):
    """Embeds tokens, averages the first ``lengths`` of them, and classifies."""

    @nn.compact
    def __call__(self, tokens, lengths):
        emb = nn.Embed(11, 4)(tokens)
        mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        pooled = jnp.sum(emb * mask[..., None], 1) / lengths[:, None]
        return nn.Dense(3)(pooled)


class NnxClassifier(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, tokens, lengths):
        mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        pooled = jnp.sum(self.embed(tokens) * mask[..., None], 1) / lengths[:, None]
        return self.out(pooled)


@pytest.fixture(scope="module")
def text():
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 6), 0, 11)
    return tokens, jnp.array([6, 2, 4, 1])


def _classifier_by_hand(table, kernel, bias, tokens, lengths):
    pooled = np.stack([np.asarray(table)[np.asarray(t[:n])].mean(0) for t, n in zip(tokens, lengths)])
    return pooled @ kernel + bias


def test_linen_classifier_takes_tokens_and_lengths_as_args_or_kwargs(text):
    tokens, lengths = text
    module = LinenClassifier()
    variables = module.init(jax.random.PRNGKey(0), tokens, lengths)
    as_args = ntk_flax.adapt(module, variables, (tokens, lengths), inputs="args")
    as_kwargs = ntk_flax.adapt(module, variables, {"tokens": tokens, "lengths": lengths}, inputs="kwargs")
    p = variables["params"]
    expected = _classifier_by_hand(
        p["Embed_0"]["embedding"], p["Dense_0"]["kernel"], p["Dense_0"]["bias"], tokens, lengths
    )
    np.testing.assert_allclose(as_args(p, (tokens, lengths)), expected, rtol=1e-6)
    np.testing.assert_allclose(as_kwargs(p, {"tokens": tokens, "lengths": lengths}), expected, rtol=1e-6)
    assert as_args.output_shape == (3,)
    # init_fn spreads the inputs too; the token ids stay integers, as nn.Embed requires.
    fresh = as_args.init(jax.random.PRNGKey(5), (tokens, lengths))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(p)
    assert not np.allclose(fresh["Dense_0"]["kernel"], p["Dense_0"]["kernel"])
    grads = jax.grad(lambda q: jnp.sum(as_args(q, (tokens, lengths))))(p)
    assert grads["Embed_0"]["embedding"].shape == (11, 4)
    # Tokens beyond each length do not matter.
    changed = tokens.at[1, 3].set((tokens[1, 3] + 1) % 11)
    np.testing.assert_allclose(as_args(p, (changed, lengths)), expected, rtol=1e-6)


def test_nnx_classifier_takes_tokens_and_lengths_as_args(text):
    tokens, lengths = text
    module = NnxClassifier(nnx.Rngs(0))
    model = ntk_flax.adapt(module, None, (tokens, lengths), inputs="args", init=lambda rngs: NnxClassifier(rngs))
    p = model.params
    expected = _classifier_by_hand(p["embed"]["embedding"], p["out"]["kernel"], p["out"]["bias"], tokens, lengths)
    np.testing.assert_allclose(model(p, (tokens, lengths)), expected, rtol=1e-6)
    np.testing.assert_allclose(model(p, [tokens, lengths]), expected, rtol=1e-6)
    kwargs_model = ntk_flax.adapt(module, None, {"tokens": tokens, "lengths": lengths}, inputs="kwargs")
    np.testing.assert_allclose(kwargs_model(p, {"tokens": tokens, "lengths": lengths}), expected, rtol=1e-6)


def test_inputs_is_checked_against_the_sample(x, text):
    tokens, lengths = text
    module = LinenClassifier()
    variables = module.init(jax.random.PRNGKey(0), tokens, lengths)
    with pytest.raises(ValueError, match=r"inputs='args'.*must be a tuple or list.*got ArrayImpl"):
        ntk_flax.adapt(module, variables, tokens, inputs="args")
    with pytest.raises(ValueError, match=r"inputs='kwargs'.*must be a dict.*got tuple"):
        ntk_flax.adapt(module, variables, (tokens, lengths), inputs="kwargs")
    with pytest.raises(ValueError, match=r"inputs must be one of 'one', 'args', 'kwargs'; got 'many'"):
        ntk_flax.adapt(module, variables, (tokens, lengths), inputs="many")
    with pytest.raises(ValueError, match=r"inputs='args'.*got ArrayImpl"):
        ntk_flax.adapt(NnxClassifier(nnx.Rngs(0)), None, tokens, inputs="args")
    with pytest.raises(ValueError, match=r"\['lengths'\] are keys of x and also fixed keyword arguments"):
        ntk_flax.adapt(module, variables, {"tokens": tokens, "lengths": lengths}, inputs="kwargs", lengths=lengths)

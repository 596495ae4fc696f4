"""Static proof that examples do not interact (ntk_adapters.independence), on real modules.

Every claim is also checked numerically: perturbing example 0 must leave the other rows of the
output unchanged for a model proven independent, and must change them for a coupled one.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import ntk_adapters
import ntk_adapters.flax as ntk_flax
import ntk_adapters.haiku as ntk_haiku
from ntk_adapters.independence import BatchCoupling, find_batch_coupling, find_model_coupling

N, D = 3, 4
KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (N, D))
IMAGES = jax.random.normal(KEY, (N, 6, 6, 2))
TOKENS = jnp.array([[1, 2, 3, 0], [4, 0, 1, 2], [3, 3, 1, 4]])
LENGTHS = jnp.array([4, 2, 3])
VOCAB = 5


def _perturb(x, in_axes=0):
    """x with example 0 changed: floats shifted, token ids cycled, lengths shortened."""
    leaves, tree = jax.tree_util.tree_flatten(x)
    axes = [in_axes] * len(leaves) if not isinstance(in_axes, dict) else [in_axes[k] for k in sorted(in_axes)]
    out = []
    for leaf, ax in zip(leaves, axes):
        if ax is None:
            out.append(leaf)
            continue
        row = jnp.moveaxis(leaf, ax, 0)
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            row = row.at[0].set(jnp.maximum(row[0] - 1, 1) if row.ndim == 1 else (row[0] + 1) % VOCAB)
        else:
            shift = 0.5 + jnp.arange(row[0].size).reshape(row[0].shape) / row[0].size
            row = row.at[0].add(shift.astype(row.dtype))
        out.append(jnp.moveaxis(row, 0, ax))
    return jax.tree_util.tree_unflatten(tree, out)


def _rows_changed(apply_fn, params, x, in_axes=0):
    """(row 0 changed, any other row changed) when example 0 is perturbed."""
    y, y2 = apply_fn(params, x), apply_fn(params, _perturb(x, in_axes))
    return (not np.allclose(y[0], y2[0], atol=1e-6), not np.allclose(y[1:], y2[1:], atol=1e-6))


def assert_independent(model, x, in_axes=0):
    coupling = find_model_coupling(model, x, in_axes)
    assert coupling is None, coupling.message()
    # The claim is true: only the perturbed example's row moves.
    assert _rows_changed(model.apply_fn, model.params, x, in_axes) == (True, False)


def assert_coupled(model, x, primitive, layer):
    coupling = find_model_coupling(model, x)
    assert coupling is not None and coupling.certain, coupling
    assert (coupling.primitive, coupling.layer) == (primitive, layer), coupling
    assert primitive in coupling.message() and (layer or "top level") in coupling.message()
    # The claim is true: perturbing example 0 moves the other rows too.
    assert _rows_changed(model.apply_fn, model.params, x)[1]


# ----------------------------------------------------------------------------------------------
# Flax linen models proven independent.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(5)(x)))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(3, (2, 2), strides=(1, 1), padding="VALID")(x))
        x = nn.avg_pool(x, (2, 2))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


class GlobalPoolCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        return nn.Dense(2)(x.mean(axis=(1, 2)))


class Norms(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5)(x)
        x = nn.BatchNorm(use_running_average=not self.train)(x)
        return nn.Dense(2)(nn.LayerNorm()(jnp.tanh(x)))


class Dropped(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=False)(nn.Dense(6)(x)))


class EmbedClassifier(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        e = nn.Embed(VOCAB, 3)(tokens)  # (N, T, 3)
        onehot = jax.nn.one_hot(tokens[:, 0], VOCAB)  # (N, VOCAB)
        return nn.Dense(2)(jnp.concatenate([e.reshape(e.shape[0], -1), onehot], axis=-1))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(VOCAB, 4)(tokens)
        mask = nn.make_causal_mask(tokens)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(h, h, mask=mask)
        return nn.Dense(2)(h.mean(axis=1))


class LSTMClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Embed(VOCAB, 3)(x["tokens"])
        states = nn.RNN(nn.OptimizedLSTMCell(4))(h)  # (N, T, 4)
        # The state after each example's last token.
        idx = (x["lengths"] - 1)[:, None, None]
        last = jnp.take_along_axis(states, idx, axis=1)[:, 0]
        return nn.Dense(2)(last)


def _linen(module, x, **kwargs):
    variables = module.init({"params": KEY, "dropout": KEY}, x)
    return ntk_flax.adapt(module, variables, x, **kwargs)


@pytest.mark.parametrize(
    "module, x",
    [
        (MLP(), X),
        (CNN(), IMAGES),
        (GlobalPoolCNN(), IMAGES),
        (Norms(), X),
        (EmbedClassifier(), TOKENS),
        (Attention(), TOKENS),
        (LSTMClassifier(), {"tokens": TOKENS, "lengths": LENGTHS}),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_flax_models_are_independent(module, x):
    assert_independent(_linen(module, x), x)


def assert_drawn_per_row(model, x):
    """A mask drawn in the batch's shape: rows independent, but not one function per row."""
    coupling = find_model_coupling(model, x)
    assert coupling is not None and not coupling.certain, coupling
    assert "random numbers drawn in the batch's shape" in coupling.reason
    assert _rows_changed(model.apply_fn, model.params, x) == (True, False)
    # Why per-example evaluation is refused: one example at a time gives other outputs.
    one_at_a_time = jax.vmap(lambda row: model.apply_fn(model.params, row[None])[0])(x)
    assert not np.allclose(one_at_a_time, model.apply_fn(model.params, x))


def test_flax_dropout_with_a_fixed_key_draws_per_row():
    model = _linen(Dropped(), X, rngs={"dropout": jax.random.PRNGKey(3)})
    assert_drawn_per_row(model, X)


def test_flax_batchnorm_in_training_mode_couples_in_its_layer():
    module = Norms(train=True)
    model = _linen(module, X, mutable=["batch_stats"])
    assert_coupled(model, X, "reduce_sum", "Norms/BatchNorm_0")
    assert find_model_coupling(model, X).reason == "sums over the batch axis"


class NnxNorms(nnx.Module):
    def __init__(self, train: bool):
        self.linear = nnx.Linear(D, 3, rngs=nnx.Rngs(0))
        self.bn = nnx.BatchNorm(3, use_running_average=not train, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_nnx_batchnorm_is_named_by_its_attribute_path():
    x = X.astype(jnp.float32)  # the dtype of the module's running statistics
    assert_independent(ntk_flax.adapt(NnxNorms(train=False), None, x), x)
    assert_coupled(ntk_flax.adapt(NnxNorms(train=True), None, x), x, "reduce_sum", "NnxNorms/bn")


# ----------------------------------------------------------------------------------------------
# Haiku models.


def _haiku(fn, x, with_state=False, **kwargs):
    t = hk.transform_with_state(fn) if with_state else hk.transform(fn)
    return ntk_haiku.adapt(t, None, x, **kwargs)


def hk_mlp(x):
    return hk.nets.MLP([5, 2])(x)


def hk_cnn(x):
    x = jax.nn.relu(hk.Conv2D(3, 3)(x))
    x = hk.MaxPool(window_shape=2, strides=2, padding="VALID")(x)
    return hk.Linear(2)(hk.Flatten()(x))


class HkNorms(hk.Module):
    def __init__(self, name=None):
        super().__init__(name=name)
        # Created in __init__, so Haiku names it 'net/~/batch_norm' (like hk.nets.ResNet's layers).
        self.batch_norm = hk.BatchNorm(True, True, 0.9)

    def __call__(self, x, is_training):
        x = hk.Linear(5)(x)
        x = self.batch_norm(x, is_training=is_training)
        return hk.Linear(2)(hk.LayerNorm(-1, True, True)(jnp.tanh(x)))


def hk_attention(tokens):
    h = hk.Embed(VOCAB, 4)(tokens)
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t)))[None, None]
    attention = hk.MultiHeadAttention(num_heads=2, key_size=2, w_init=hk.initializers.VarianceScaling(1.0))
    h = attention(h, h, h, mask=causal)
    return hk.Linear(2)(h.mean(axis=1))


def hk_lstm(x):
    h = hk.Embed(VOCAB, 3)(x["tokens"])
    core = hk.LSTM(4)
    time_major = jnp.swapaxes(h, 0, 1)  # (T, N, 3)
    states, _ = hk.dynamic_unroll(core, time_major, core.initial_state(h.shape[0]))
    states = jnp.swapaxes(states, 0, 1)  # (N, T, 4)
    last = jnp.take_along_axis(states, (x["lengths"] - 1)[:, None, None], axis=1)[:, 0]
    return hk.Linear(2)(last)


def hk_dropout(x):
    return hk.Linear(2)(hk.dropout(hk.next_rng_key(), 0.5, hk.Linear(6)(x)))


@pytest.mark.parametrize(
    "fn, x",
    [
        (hk_mlp, X),
        (hk_cnn, IMAGES),
        (hk_attention, TOKENS),
        (hk_lstm, {"tokens": TOKENS, "lengths": LENGTHS}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_haiku_models_are_independent(fn, x):
    assert_independent(_haiku(fn, x), x)


def test_haiku_dropout_draws_per_row_and_inference_batchnorm_is_independent():
    assert_drawn_per_row(_haiku(hk_dropout, X, rng=jax.random.PRNGKey(1)), X)
    norms = _haiku(
        lambda x, is_training: HkNorms(name="net")(x, is_training),
        X,
        with_state=True,
        is_training=False,
        init_kwargs={"is_training": True},
    )
    assert_independent(norms, X)


def test_haiku_batchnorm_in_training_couples_in_its_layer():
    model = _haiku(lambda x: HkNorms(name="net")(x, True), X, with_state=True)
    assert_coupled(model, X, "reduce_sum", "net/~/batch_norm")


# ----------------------------------------------------------------------------------------------
# Plain functions that couple examples.

W = jax.random.normal(KEY, (D, D))


@pytest.mark.parametrize(
    "fn, primitive",
    [
        (lambda p, x: x - x.mean(0), "reduce_sum"),
        (lambda p, x: x / jnp.linalg.norm(x, axis=0), "reduce_sum"),
        (lambda p, x: jnp.cumsum(x @ p, axis=0), "cumsum"),
        (lambda p, x: x @ x.T, "dot_general"),
        (lambda p, x: jax.nn.softmax(x @ p, axis=0), "reduce_max"),
        (lambda p, x: jnp.sort(x, axis=0), "sort"),
        (lambda p, x: x[::-1], "rev"),
        (lambda p, x: jax.lax.scan(lambda c, r: (c + r, c * r), jnp.zeros(D), x)[1], "scan"),
        # A loop carry that becomes coupled in the second iteration only.
        (
            lambda p, x: jax.lax.scan(lambda c, _: (c.sum(0, keepdims=True) + c, c), x, None, length=2)[1][1],
            "reduce_sum",
        ),
    ],
    ids=["centre", "norm", "cumsum", "gram", "softmax", "sort", "reverse", "scan-carry", "carry-reduce"],
)
def test_couplings_are_certain(fn, primitive):
    assert_coupled(ntk_adapters.adapt(fn, W), X, primitive, "")


def test_a_named_scope_is_the_layer_without_a_recorder():
    def fn(p, x):
        with jax.named_scope("centre"):
            return x - x.mean(0)

    coupling = find_batch_coupling(fn, {}, X)
    assert (coupling.layer, coupling.certain) == ("centre", True)
    assert coupling.message() == ("`reduce_sum` in layer 'centre' sums over the batch axis, so examples interact.")


@pytest.mark.parametrize(
    "fn, primitive",
    [
        (lambda p, x: x[jnp.array([1, 0, 2])], "gather"),  # a permutation of the examples
        (lambda p, x: jnp.roll(x, 1, axis=0), None),  # slices and concatenates the batch
        (lambda p, x: x.reshape(2, -1), "reshape"),  # splits the batch axis
        (lambda p, x: p, "output"),  # ignores the examples
        (lambda p, x: x.T @ jnp.ones((N, D)), "dot_general"),  # contracts the batch away
        (lambda p, x: jax.vmap(lambda r: r - jax.lax.pmean(r, "i"), axis_name="i")(x), "psum"),
        # Loop carries whose batch axis moves between iterations (fori_loop with a static trip count
        # is a scan).
        (lambda p, x: jax.lax.fori_loop(0, 2, lambda i, h: h.T, x[:, :N]), "scan"),
        (lambda p, x: jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1].T), (0, x[:, :N]))[1], "while"),
    ],
    ids=[
        "permute",
        "roll",
        "split-batch",
        "constant",
        "contract",
        "collective",
        "scan-carry-transpose",
        "while-carry-transpose",
    ],
)
def test_unproven_or_coupled_programs_are_never_cleared(fn, primitive):
    coupling = find_batch_coupling(fn, W, X)
    assert isinstance(coupling, BatchCoupling)
    if primitive is not None:
        assert coupling.primitive == primitive


def test_outputs_with_the_batch_elsewhere_are_uncertain():
    coupling = find_batch_coupling(lambda p, x: (x @ p).T, W, X)
    assert (coupling.primitive, coupling.certain) == ("transpose", False)
    assert "batch axis is 1" in coupling.reason
    assert find_batch_coupling(lambda p, x: (x @ p).T, W, X, out_axes=1) is None


def test_programs_that_keep_rows_apart_are_proven():
    fns = [
        lambda p, x: jax.lax.map(lambda r: jnp.tanh(r @ p), x),  # a scan over examples
        lambda p, x: x.at[:, 0].set(1.0) * jnp.sort(x, axis=1),
        lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p), x),
        lambda p, x: jax.lax.cond(True, lambda h: h * 2, jnp.sin, x),
        lambda p, x: (x.reshape(N * 2, 2) * 2).reshape(N, D),  # merge and split back
        lambda p, x: x.reshape(-1, 2).sum(1).reshape(N, -1),  # reduce within rows
        lambda p, x: jax.checkpoint(lambda h: jax.nn.softmax(h @ p, axis=-1))(x),
    ]
    for fn in fns:
        assert find_batch_coupling(fn, W, X) is None
        assert _rows_changed(fn, W, X) == (True, False)


def test_shared_inputs_with_in_axes_none():
    x = {"x": X, "shared": jnp.arange(D, dtype=X.dtype)}
    in_axes = {"x": 0, "shared": None}

    def fn(p, x):
        # The shared leaf is used by every example, also reduced over: it has no batch axis.
        return jnp.tanh(x["x"] @ p + x["shared"] / x["shared"].sum())

    assert find_batch_coupling(fn, W, x, in_axes) is None
    assert _rows_changed(fn, W, x, in_axes) == (True, False)
    # Declared batched, its sum is over "examples": coupled.
    coupling = find_batch_coupling(fn, W, {"x": X, "shared": jnp.ones((N, D))}, 0)
    assert coupling.certain
    with pytest.raises(ValueError, match="out of range"):
        find_batch_coupling(fn, W, x, {"x": 2, "shared": None})


def test_shape_structs_and_a_batch_of_one():
    structs = jax.ShapeDtypeStruct((1, D), X.dtype)
    assert find_batch_coupling(lambda p, x: x @ p, W, structs) is None
    # At one example nothing can interact, yet the program reduces over the batch axis.
    assert find_batch_coupling(lambda p, x: x - x.mean(0), W, structs).certain


# ----------------------------------------------------------------------------------------------
# Property: a program the analysis clears never lets example 0 move the other rows. (The converse
# is structural only: cumsum over the batch followed by centring is coupled step by step, yet the
# shift of every row cancels.)

_OPS = {
    "tanh": jnp.tanh,
    "dense": lambda x: x @ W,
    "row-sum": lambda x: x + x.sum(1, keepdims=True),
    "row-sort": lambda x: jnp.sort(x, 1),
    "row-cumsum": lambda x: jnp.cumsum(x, 1),
    "transpose-twice": lambda x: (x.T * 2).T,
    "regroup": lambda x: x.reshape(N * 2, 2)[:, ::-1].reshape(N, D),
    "centre": lambda x: x - x.mean(0),
    "batch-cumsum": lambda x: jnp.cumsum(x, 0),
    "roll": lambda x: jnp.roll(x, 1, 0),
    "gram": lambda x: x @ x.T @ x,
    "column-softmax": lambda x: jax.nn.softmax(x, 0),
    "first-row": lambda x: x + x[:1],
}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(sorted(_OPS)), min_size=1, max_size=4))
def test_cleared_programs_are_independent(names):
    def fn(p, x):
        for name in names:
            x = _OPS[name](x)
        return x

    if find_batch_coupling(fn, W, X) is None:
        assert not _rows_changed(fn, W, X)[1], names

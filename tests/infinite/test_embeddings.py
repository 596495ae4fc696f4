"""Embedding lookups (``nn.Embed``, ``nnx.Embed``, ``hk.Embed``) at infinite width.

A row of a table of i.i.d. entries of variance ``σ²`` is a zero-mean Gaussian value; two lookups
are correlated exactly when they read the same row: ``nngp = σ²·[id == id']`` and, the output
being ``one_hot(ids) @ E``, the table's gradient adds ``[id == id']`` to the NTK. Checked by hand
for tiny cases (a linear readout, a ReLU layer whose inputs have correlation 0 or 1, so the
arc-cosine kernel takes the values 1/2 and 1/(2π)) and by Monte Carlo over the real modules, with
the error falling as the width grows.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn
from ntk_adapters.infinite.embeddings import lookup

V = 5
IDS = jnp.array([[1, 2, 3], [3, 2, 1], [0, 0, 4], [2, 2, 2]], jnp.int32)


def test_lookup_by_hand():
    ids1 = jnp.array([[1, 2], [2, 2]])
    ids2 = jnp.array([[2, 0]])
    k = lookup(ids1, ids2, variance=0.5, dtype=jnp.float64)
    want = np.zeros((2, 1, 2, 2))
    want[0, 0, 1, 0] = 0.5  # example 0 position 1 (token 2) vs example 0' position 0 (token 2)
    want[1, 0, 0, 0] = want[1, 0, 1, 0] = 0.5
    np.testing.assert_array_equal(k.nngp, want)
    np.testing.assert_array_equal(k.ntk, want / 0.5)
    np.testing.assert_array_equal(k.cov1[1], np.full((2, 2), 0.5))
    np.testing.assert_array_equal(k.cov1[0], 0.5 * np.eye(2))
    np.testing.assert_array_equal(k.cov2[0], 0.5 * np.eye(2))
    assert k.is_gaussian and k.layout == "full" and k.nngp.dtype == jnp.float64
    d = lookup(ids1, ids2, variance=0.5, layout="diagonal")
    np.testing.assert_array_equal(d.nngp, np.einsum("abtt->abt", want))
    np.testing.assert_array_equal(d.cov1, np.full((2, 2), 0.5))
    assert d.nngp.dtype == jnp.float32


def test_negative_ids_read_the_last_rows():
    k = lookup(jnp.array([-1, 4, 0]), variance=1.0, vocab_size=V)
    np.testing.assert_array_equal(k.nngp, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


class Readout(nn.Module):
    """Embed -> Dense(1): nngp = σw² σ² [id == id'] + σb²."""

    features: int = 16
    table_init: object = nn.initializers.normal(1.0)
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, self.features, embedding_init=self.table_init, param_dtype=self.param_dtype)(ids)
        return nn.Dense(1, param_dtype=self.param_dtype)(h)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_linen_readout_by_hand(dtype):
    ids = jnp.array([0, 3, 3, 4], jnp.int32)
    model = nflax.adapt(Readout(param_dtype=dtype), None, ids)
    k = infinite_kernel_fn(model)(ids, ids[:2])
    same = np.asarray(ids[:, None] == ids[None, :2], float)
    # f = E[id]·w + b: ∂f/∂w = E[id] gives Σ_c E[id,c] E[id',c] (expectation 16·σ²·[id = id']),
    # ∂f/∂E[id] = w gives Σ_c w_c² [id = id'] (expectation 16 · 1/16), ∂f/∂b = 1
    np.testing.assert_allclose(k.nngp, same, rtol=1e-6)
    np.testing.assert_allclose(k.ntk, 16 * same + same + 1.0, rtol=1e-6)
    assert k.nngp.dtype == dtype


def test_flax_default_initializer_has_variance_one_over_features():
    # variance_scaling(1, 'fan_in', 'normal', out_axis=0) on a (V, D) table: fan_in = D
    ids = jnp.array([0, 3, 3], jnp.int32)
    for d in (4, 32):
        model = nflax.adapt(
            Readout(features=d, table_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)),
            None,
            ids,
        )
        k = infinite_kernel_fn(model)(ids)
        same = np.asarray(ids[:, None] == ids[None, :], float)
        np.testing.assert_allclose(k.nngp, same / d, rtol=1e-6)
        np.testing.assert_allclose(k.ntk, d * same / d + same + 1.0, rtol=1e-6)
    default = nflax.adapt(nn.Embed(V, 8), None, ids)
    np.testing.assert_allclose(infinite_kernel_fn(default)(ids).nngp, same / 8, rtol=1e-6)
    # the variance override replaces σ² = Var(E[v, c]) itself
    over = infinite_kernel_fn(default, weight_variance={"Embed": 2.0})(ids)
    np.testing.assert_allclose(over.nngp, 2.0 * same, rtol=1e-6)


def _relu_mean_by_hand(ids1, ids2, s2=1.0, hidden=None):
    """Embed(σ²) -> Dense(lecun, zero bias) -> relu -> mean over positions -> Dense(zero bias):
    pre-activations have variance σ² and correlation [id = id'] (1 or 0)."""
    same = np.asarray(ids1)[:, None, :, None] == np.asarray(ids2)[None, :, None, :]
    k_relu = np.where(same, s2 / 2, s2 / (2 * np.pi))
    return k_relu.mean((2, 3))


class SeqModel(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, self.width, embedding_init=nn.initializers.normal(1.0))(ids)
        h = nn.relu(nn.Dense(self.width)(h))
        return nn.Dense(8)(h.mean(1))


class NnxSeqModel(nnx.Module):
    def __init__(self, rngs, width=16):
        self.embed = nnx.Embed(V, width, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.hidden = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, 8, rngs=rngs)

    def __call__(self, ids):
        return self.out(nnx.relu(self.hidden(self.embed(ids))).mean(1))


def _haiku_seq(width, style):
    def f(ids):
        h = hk.Embed(V, width, lookup_style=style)(ids)
        h = jax.nn.relu(hk.Linear(width)(h))
        return hk.Linear(8)(h.mean(1))

    return hk.without_apply_rng(hk.transform(f))


# hk.Embed's default TruncatedNormal(1.0) has the variance of a standard normal truncated at ±2
_HK_S2 = 0.7737413


def _build(framework, width, ids):
    if framework == "linen":
        return nflax.adapt(SeqModel(width), None, ids)
    if framework == "nnx":
        return nflax.adapt(NnxSeqModel(nnx.Rngs(0), width), None, ids, init=lambda rngs: NnxSeqModel(rngs, width))
    return nhaiku.adapt(_haiku_seq(width, framework.split("-")[1]), None, ids)


@pytest.mark.parametrize("framework", ["linen", "nnx", "haiku-ARRAY_INDEX", "haiku-ONE_HOT"])
def test_sequence_model_by_hand(framework):
    model = _build(framework, 16, IDS)
    ids2 = IDS[1:3]
    k = infinite_kernel_fn(model)(IDS, ids2)
    s2 = _HK_S2 if framework.startswith("haiku") else 1.0
    # the readout Dense has σw² = 1 (lecun) or ≈ 0.7737 (Haiku's truncated default)
    s_out = _HK_S2 if framework.startswith("haiku") else 1.0
    np.testing.assert_allclose(k.nngp, s_out * _relu_mean_by_hand(IDS, ids2, s2 * s_out), rtol=2e-6)


def test_haiku_lookup_styles_agree():
    a = infinite_kernel_fn(_build("haiku-ARRAY_INDEX", 8, IDS))(IDS)
    b = infinite_kernel_fn(_build("haiku-ONE_HOT", 8, IDS))(IDS)
    np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-6)
    np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-6)


def test_embedding_of_float_values_is_refused():
    class FloatIntoEmbed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Embed(V, 4)((nn.Dense(3)(x) > 0).astype(jnp.int32))

    x = jnp.ones((2, 3))
    with pytest.raises(InfiniteWidthError, match="Embed_0"):
        infinite_kernel_fn(nflax.adapt(FloatIntoEmbed(), None, x))(x)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["linen", "nnx", "haiku-ARRAY_INDEX", "haiku-ONE_HOT"])
def test_embedding_models_converge_to_the_engine(mc, framework):
    # the Dense after the table sees Gaussian pre-activations only as the embedding width grows
    errs = []
    for w in (4, 256):
        model = _build(framework, w, IDS)
        k = infinite_kernel_fn(model)(IDS)
        nngp, _ = mc.monte_carlo(model, IDS, n_samples=2048, want_ntk=False, chunk=2048)
        _, ntk = mc.monte_carlo(model, IDS, n_samples=16, chunk=16)
        errs.append((mc.rel_err(nngp, k.nngp), mc.rel_err(ntk, k.ntk)))
    (n0, t0), (n1, t1) = errs
    assert n1 < n0 and t1 < t0, errs
    assert n1 < 0.05 and t1 < 0.08, errs


def test_lookup_with_two_position_axes_matches_the_definition():
    rng = np.random.default_rng(0)
    ids1, ids2 = rng.integers(0, 3, (2, 2, 3)), rng.integers(0, 3, (3, 2, 3))
    k = lookup(jnp.asarray(ids1), jnp.asarray(ids2), variance=2.0, dtype=jnp.float64)
    # brute force over (example, h, w) pairs, then the 'full' layout (N1, N2, H, H', W, W')
    want = np.zeros((2, 3, 2, 2, 3, 3))
    for a, b, h, h2, w, w2 in np.ndindex(*want.shape):
        want[a, b, h, h2, w, w2] = 2.0 * (ids1[a, h, w] == ids2[b, h2, w2])
    np.testing.assert_array_equal(k.nngp, want)
    cov = np.zeros((3, 2, 2, 3, 3))
    for b, h, h2, w, w2 in np.ndindex(*cov.shape):
        cov[b, h, h2, w, w2] = 2.0 * (ids2[b, h, w] == ids2[b, h2, w2])
    np.testing.assert_array_equal(k.cov2, cov)


def test_nnx_default_initializer_is_read_from_the_factory():
    class Table(nnx.Module):
        def __init__(self, rngs, d=8):
            self.embed = nnx.Embed(V, d, rngs=rngs)

        def __call__(self, ids):
            return self.embed(ids)

    ids = jnp.array([0, 3, 3], jnp.int32)
    model = nflax.adapt(Table(nnx.Rngs(0)), None, ids, init=Table)
    same = np.asarray(ids[:, None] == ids[None, :], float)
    np.testing.assert_allclose(infinite_kernel_fn(model)(ids).nngp, same / 8, rtol=1e-6)

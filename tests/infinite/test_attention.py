"""Multi-head attention at infinite width.

At a fixed number of heads with the ``1/sqrt(head_dim)`` logit scaling there is no Gaussian limit:
the attention weights stay random as the width grows and are shared by all channels of a head (a
property on the real module shows it), and the engine refuses every attention module by default,
naming the layer, the number of heads and the head dimension.

With ``attention='infinite_heads'`` the heads go to infinity with the width at the module's own head
dimension. The kernel is an expectation over one head's Gaussian queries and keys, estimated by
sampling; it is judged

* on deterministic input features, where the queries, keys and values of a hand-written attention
  layer are exactly Gaussian at any width, so the average over weight draws of the network's
  ``f f'ᵀ`` and empirical NTK equals the limit exactly (a z-test against a second, independent
  estimate);
* on the real Flax linen, NNX and Haiku modules behind a Dense layer and a LayerNorm, by Monte
  Carlo over the modules' own initializations, with the error falling as the width (and with it
  the number of heads) grows.
"""

import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn, layers
from ntk_adapters.infinite.attention import AttentionWeights, infinite_heads, no_limit_reason

T = 4
X = jax.random.normal(jax.random.PRNGKey(0), (3, T, 8))
IDS = jnp.array([[1, 2, 3, 0], [3, 2, 0, 0], [4, 4, 4, 1]], jnp.int32)
NO_LIMIT = r"num_heads=2, head_dim=4 and the standard 1/sqrt\(head_dim\) logit scaling has no Gaussian"


class LinenSelf(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        return nn.SelfAttention(num_heads=2, qkv_features=8, decode=False)(h, deterministic=True)


class LinenCrossMasked(nn.Module):
    """Cross-attention with a padding mask from the integer ids (three input-dependent inputs)."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(5, 8)(ids)
        mask = nn.make_attention_mask(ids > 0, ids > 0)
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(
            h, nn.Dense(8)(h), mask=mask, deterministic=True
        )


class NnxSelf(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)

    def __call__(self, x):
        return self.attn(x, deterministic=True)


def _haiku_causal(x):
    mask = jnp.tril(jnp.ones((1, 1, T, T)))
    return hk.MultiHeadAttention(num_heads=2, key_size=4, w_init=hk.initializers.VarianceScaling(1.0))(
        x, x, x, mask=mask
    )


CASES = {
    "linen-self": (
        lambda: nflax.adapt(LinenSelf(), None, X),
        X,
        "SelfAttention_0",
        "flax.linen.attention.SelfAttention",
    ),
    "linen-cross-masked": (
        lambda: nflax.adapt(LinenCrossMasked(), None, IDS),
        IDS,
        "MultiHeadDotProductAttention_0",
        "flax.linen.attention.MultiHeadDotProductAttention",
    ),
    "nnx": (
        lambda: nflax.adapt(NnxSelf(nnx.Rngs(0)), None, X, init=NnxSelf),
        X,
        "attn",
        "flax.nnx.nn.attention.MultiHeadAttention",
    ),
    "haiku-causal": (
        lambda: nhaiku.adapt(hk.without_apply_rng(hk.transform(_haiku_causal)), None, X),
        X,
        "multi_head_attention",
        "haiku._src.attention.MultiHeadAttention",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_is_refused_by_default_naming_the_layer_and_the_limit(case):
    build, x, path, type_name = CASES[case]
    with pytest.raises(InfiniteWidthError) as err:
        infinite_kernel_fn(build())(x)
    msg = str(err.value)
    assert f"layer `{path}` ({type_name})" in msg, msg
    assert re.search(NO_LIMIT, msg), msg
    assert "attention='infinite_heads'" in msg, msg


def test_cross_attention_is_refused_with_infinite_heads():
    build, x, path, _ = CASES["linen-cross-masked"]
    with pytest.raises(InfiniteWidthError, match=rf"layer `{path}`.*one input-dependent input"):
        infinite_kernel_fn(build(), attention="infinite_heads")(x)


def test_bad_attention_options_are_refused():
    model = CASES["linen-self"][0]()
    with pytest.raises(ValueError, match="attention must be 'refuse' or 'infinite_heads'"):
        infinite_kernel_fn(model, attention="heads")
    with pytest.raises(ValueError, match="attention_samples must be an integer >= 8"):
        infinite_kernel_fn(model, attention="infinite_heads", attention_samples=4)


def test_a_diagonal_layout_is_refused():
    with pytest.raises(InfiniteWidthError, match="covariances between positions"):
        infinite_kernel_fn(CASES["linen-self"][0](), attention="infinite_heads", spatial_layout="diagonal")(X)


def test_reason_names_the_configuration():
    assert "num_heads=8, head_dim=64 " in no_limit_reason(8, 64)
    assert "num_heads=3 and" in no_limit_reason(3, None)


@pytest.mark.slow
def test_standard_attention_weights_stay_random_as_width_grows(mc):
    # The property behind the default refusal, on the real module: over initializations, the
    # attention weight of one query on one key keeps a spread of order one as the input width grows
    # (the logits do not concentrate), unlike the normalized products x·x'/width a Dense layer's
    # kernel is made of.
    def spread(width, n=512):
        x = jax.random.normal(jax.random.PRNGKey(2), (1, T, width))
        module = nn.SelfAttention(num_heads=1, qkv_features=16, decode=False)

        def one(key):
            p = module.init(key, x, deterministic=True)
            _, state = module.apply(p, x, deterministic=True, sow_weights=True, mutable=["intermediates"])
            (w,) = jax.tree_util.tree_leaves(state["intermediates"])
            return w[0, 0, 0, 0]

        w = np.asarray(mc.jit(lambda k: jax.lax.map(one, k))(jax.random.split(jax.random.PRNGKey(3), n)), np.float64)
        return float(w.std())

    small, large = spread(16), spread(1024)
    # uniform attention would be exactly 1/T with zero spread
    assert small > 0.05 and large > 0.05 and large > 0.5 * small, (small, large)


# ----------------------------------------------------------------------------------------------
# The limit on deterministic inputs: exact at any width.

N, D, H, HEAD = 3, 6, 4, 3
SB = 0.3  # bias standard deviation: biases of every projection are part of the check
VARS = dict(query=1.5, key=0.8, value=1.0, out=2.0)


def _hand_attention(p, x, mask):
    """Self-attention written out: H heads of dimension HEAD, weights of variance σ²/fan_in."""
    q = jnp.einsum("ntd,dhc->nthc", x, p["query"]) + p["bq"]
    k = jnp.einsum("ntd,dhc->nthc", x, p["key"]) + p["bk"]
    v = jnp.einsum("ntd,dhc->nthc", x, p["value"]) + p["bv"]
    g = jnp.einsum("nthc,nuhc->nhtu", q, k) / np.sqrt(HEAD)
    a = jax.nn.softmax(jnp.where(mask[:, None], g, jnp.finfo(g.dtype).min), -1)
    heads = jnp.einsum("nhtu,nuhc->nthc", a, v).reshape(x.shape[0], x.shape[1], H * HEAD)
    return heads @ p["out"] + p["bo"]


def _hand_init(key):
    ks = jax.random.split(key, 8)
    w = lambda i, name, shape, fan: jax.random.normal(ks[i], shape) * np.sqrt(VARS[name] / fan)  # noqa: E731
    return dict(
        query=w(0, "query", (D, H, HEAD), D),
        key=w(1, "key", (D, H, HEAD), D),
        value=w(2, "value", (D, H, HEAD), D),
        out=w(3, "out", (H * HEAD, 1), H * HEAD),
        bq=SB * jax.random.normal(ks[4], (H, HEAD)),
        bk=SB * jax.random.normal(ks[5], (H, HEAD)),
        bv=SB * jax.random.normal(ks[6], (H, HEAD)),
        bo=SB * jax.random.normal(ks[7], (1,)),
    )


def test_infinite_heads_is_the_expectation_over_heads_on_deterministic_inputs(mc):
    x = jax.random.normal(jax.random.PRNGKey(7), (N, T, D))
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(N, 0).at[2, :, 3].set(False)

    def draw(key):
        p = _hand_init(key)
        f = lambda p: _hand_attention(p, x, mask).reshape(-1)  # noqa: E731
        jac = jax.jacrev(f)(p)
        j = jnp.concatenate([a.reshape(N * T, -1) for a in jax.tree_util.tree_leaves(jac)], 1)
        y = f(p)
        return jnp.outer(y, y), j @ j.T

    draws = 6000
    nngp_s, ntk_s = mc.jit(lambda keys: jax.lax.map(draw, keys, batch_size=500))(
        jax.random.split(jax.random.PRNGKey(1), draws)
    )
    weights = AttentionWeights(
        **{name: (VARS[name], SB**2, True) for name in VARS}, fan_in=D, num_heads=H, head_dim=HEAD, value_dim=HEAD
    )
    flat = lambda a: jnp.transpose(a, (0, 2, 1, 3)).reshape(N * T, N * T)  # noqa: E731
    k = layers.input_kernel(x, layout="full")
    # The engine's own spread, from independent estimates with different keys.
    runs = [
        infinite_heads(k, weights, mask=mask, n_samples=4000, key=jax.random.PRNGKey(s), chunk=200) for s in range(4)
    ]
    for field, samples in (("nngp", nngp_s), ("ntk", ntk_s)):
        ours = np.stack([np.asarray(flat(getattr(r, field))) for r in runs])
        mean = ours.mean(0)
        se = np.sqrt(np.asarray(samples.var(0)) / draws + ours.var(0, ddof=1) / len(runs))
        z = np.abs(mean - np.asarray(samples.mean(0))) / se
        assert z.max() < 4.5, (field, z.max())
        assert np.median(z) < 1.2, (field, np.median(z))


# ----------------------------------------------------------------------------------------------
# The real modules, by Monte Carlo over their own initializations.

C = 5
XS = jax.random.normal(jax.random.PRNGKey(0), (3, T, C))


class LinenMasked(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, inputs):
        x, ids = inputs
        mask = nn.combine_masks(nn.make_attention_mask(ids > 0, ids > 0), nn.make_causal_mask(ids))
        h = nn.LayerNorm()(nn.Dense(self.width)(x))
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True)(h, mask=mask)
        return nn.Dense(1)(h.mean(axis=1))


class NnxAttention(nnx.Module):
    def __init__(self, width, heads, rngs):
        self.dense = nnx.Linear(C, width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.attn(self.dense(x), deterministic=True).mean(axis=1))


def _haiku_attention(width, heads):
    def f(x):
        h = hk.Linear(width)(x)
        mask = jnp.tril(jnp.ones((1, 1, T, T)))  # a fixed causal mask, not computed from the input
        h = hk.MultiHeadAttention(
            num_heads=heads, key_size=width // heads, w_init=hk.initializers.VarianceScaling(1.0)
        )(h, h, h, mask=mask)
        return hk.Linear(1)(h.mean(axis=1))

    return nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, XS)


def _errors(mc, model, x, draws=800):
    k = infinite_kernel_fn(model, attention="infinite_heads", attention_samples=4096)(x, get="kernel")
    nngp, ntk = mc.monte_carlo(model, x, n_samples=draws)
    return mc.rel_err(k.nngp, nngp), mc.rel_err(k.ntk, ntk)


@pytest.mark.slow
def test_linen_attention_with_masks_converges_to_infinite_heads(mc):
    # Widening adds heads at a fixed head dimension (4): the limit the kernel describes. The Monte
    # Carlo noise of 800 draws is about 5 %, so the wide network's error is at that level.
    x = (XS, IDS)
    small = _errors(mc, nflax.adapt(LinenMasked(8, 2), None, x), x)
    large = _errors(mc, nflax.adapt(LinenMasked(128, 32), None, x), x)
    assert large[0] < 0.07 and large[1] < 0.07, (small, large)
    assert large[0] < 0.7 * small[0] and large[1] < 0.7 * small[1], (small, large)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["nnx", "haiku"])
def test_nnx_and_haiku_attention_agree_with_monte_carlo(mc, framework):
    if framework == "nnx":
        model = nflax.adapt(NnxAttention(128, 32, nnx.Rngs(0)), None, XS, init=lambda r: NnxAttention(128, 32, r))
    else:
        model = _haiku_attention(128, 32)
    nngp_err, ntk_err = _errors(mc, model, XS)
    # 800 draws: about 5 % noise; a missed mask or a wrong variance is off by 20 % or more.
    assert nngp_err < 0.1 and ntk_err < 0.1, (nngp_err, ntk_err)


def test_x2_is_the_block_of_one_joint_evaluation_and_stderr_bounds_the_seed_spread():
    x = (XS, IDS)
    model = nflax.adapt(LinenMasked(8, 2), None, x)
    kernel_fn = infinite_kernel_fn(model, attention="infinite_heads", attention_samples=512)
    x1 = jax.tree_util.tree_map(lambda a: a[:2], x)
    x2 = jax.tree_util.tree_map(lambda a: a[2:], x)
    joint = kernel_fn(x, get="ntk")
    np.testing.assert_allclose(kernel_fn(x1, x2, get="ntk"), joint[:2, 2:], rtol=1e-12)
    k0, se = kernel_fn(x, get=("nngp", "nngp_stderr"))
    k1 = infinite_kernel_fn(model, attention="infinite_heads", attention_samples=512, seed=1)(x, get="nngp")
    assert float(np.min(se)) > 0
    z = np.abs(np.asarray(k0 - k1)) / (np.sqrt(2) * np.asarray(se))
    assert z.max() < 5, z.max()
    # A model without sampled layers reports exact zeros.
    plain = infinite_kernel_fn(nflax.adapt(nn.Dense(1), None, XS[:, 0]), attention="infinite_heads")
    assert np.all(np.asarray(plain(XS[:, 0], get="ntk_stderr")) == 0)


def test_float32_inputs_give_a_float32_kernel_within_the_sampling_error():
    x64 = (XS, IDS)
    x32 = (XS.astype(jnp.float32), IDS)
    kernel_fn = infinite_kernel_fn(
        nflax.adapt(LinenMasked(8, 2), None, x64), attention="infinite_heads", attention_samples=1024
    )
    k64, se = kernel_fn(x64, get=("ntk", "ntk_stderr"))
    k32 = kernel_fn(x32, get="ntk")
    assert k32.dtype == jnp.float32
    z = np.abs(np.asarray(k32, np.float64) - np.asarray(k64)) / (np.sqrt(2) * np.asarray(se))
    assert z.max() < 5, z.max()

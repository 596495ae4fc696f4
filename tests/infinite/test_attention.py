"""Multi-head attention at infinite width: the standard configuration has no Gaussian limit.

With the ``1/sqrt(head_dim)`` logit scaling and a fixed number of heads, the attention weights stay
random as the width grows and are shared by all channels of a head, so the output is a mixture of
Gaussians. A property shows it on the real module: over initializations, an attention weight keeps a spread
of order one as the width grows.
The engine refuses every attention module, naming the layer, the number of heads and the head
dimension, whether the module has one input, several, or an integer mask.
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
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn
from ntk_adapters.infinite.attention import no_limit_reason

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
def test_attention_is_refused_naming_the_layer_and_the_limits(case):
    build, x, path, type_name = CASES[case]
    with pytest.raises(InfiniteWidthError) as err:
        infinite_kernel_fn(build())(x)
    msg = str(err.value)
    assert f"layer `{path}` ({type_name})" in msg, msg
    assert re.search(NO_LIMIT, msg), msg
    assert "number of heads goes to infinity" in msg and "1/head_dim logit scaling" in msg, msg


def test_reason_names_the_configuration():
    assert "num_heads=8, head_dim=64 " in no_limit_reason(8, 64)
    assert "num_heads=3 and" in no_limit_reason(3, None)


@pytest.mark.slow
def test_standard_attention_weights_stay_random_as_width_grows():
    # The property behind the refusal, on the real module: over initializations, the attention
    # weight of one query on one key keeps a spread of order one as the input width grows (the logits
    # do not concentrate), unlike the normalized products x·x'/width a Dense layer's kernel is made of.
    def spread(width, n=512):
        x = jax.random.normal(jax.random.PRNGKey(2), (1, T, width))
        module = nn.SelfAttention(num_heads=1, qkv_features=16, decode=False)

        def one(key):
            p = module.init(key, x, deterministic=True)
            _, state = module.apply(p, x, deterministic=True, sow_weights=True, mutable=["intermediates"])
            (w,) = jax.tree_util.tree_leaves(state["intermediates"])
            return w[0, 0, 0, 0]

        w = np.asarray(jax.lax.map(one, jax.random.split(jax.random.PRNGKey(3), n)), np.float64)
        return float(w.std())

    small, large = spread(16), spread(1024)
    # uniform attention would be exactly 1/T with zero spread
    assert small > 0.05 and large > 0.05 and large > 0.5 * small, (small, large)

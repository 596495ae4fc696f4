"""Fixed arrays added to a value entry by entry (sinusoidal position encodings), then normalized.

``y = h + c`` with ``c`` a fixed table ``(T, C)``: the channels of ``y`` have different means, so the
kernel carries second moments ``K_h + G`` (``G = c cᵀ / C``) and the channel means ``m = mean_c(c)``,
which LayerNorm subtracts. Checked against closed forms written here in numpy, against Monte Carlo
over the real modules of Flax's LM1B example (its ``AddPositionEmbs``) with the error falling as the
width grows (and a variant of the engine that forgets the mean failing the same check), and for the
refusals of what the kernel cannot describe.
"""

import pathlib
import sys

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn
from ntk_adapters.infinite.kernel import Kernel

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.zoo import flax_lm1b_models as lm1b  # noqa: E402

N, T, CIN, W = 3, 4, 5, 6
X = jax.random.normal(jax.random.PRNGKey(0), (N, T, CIN), jnp.float64)
TABLE = np.random.default_rng(1).normal(0.7, 1.0, (T, W))  # non-zero channel means


class _LinenNet(nn.Module):
    table: np.ndarray

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(W, use_bias=False, kernel_init=nn.initializers.normal(CIN**-0.5), param_dtype=x.dtype)(x)
        h = nn.LayerNorm(param_dtype=x.dtype)(h + self.table)
        return nn.Dense(1, kernel_init=nn.initializers.normal(W**-0.5), param_dtype=x.dtype)(h)


def _haiku_net(x):
    h = hk.Linear(W, with_bias=False, w_init=hk.initializers.RandomNormal(CIN**-0.5))(x)
    h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(jnp.asarray(TABLE, x.dtype) + h)
    return hk.Linear(1, w_init=hk.initializers.RandomNormal(W**-0.5))(h)


def _by_hand(x1, x2, eps):
    """Full-layout NNGP and NTK ``(N1, N2, T, T)`` of the nets above, in float64."""
    a, b = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    dots = lambda u, v: np.einsum("atc,bsc->abts", u, v)  # noqa: E731
    gram = TABLE @ TABLE.T / W
    m = TABLE.mean(1)

    def moments(u, v):
        return dots(u, v) / CIN + gram  # second moments of h + c: the cross terms have mean 0

    def var(u):
        return np.einsum("aatt->at", moments(u, u)) - m**2  # channel variance per example and position

    q1, q2 = var(a), var(b)
    scale = np.sqrt((q1[:, None, :, None] + eps) * (q2[None, :, None, :] + eps))
    k_hat = (moments(a, b) - m[:, None] * m[None, :]) / scale
    theta_ln = dots(a, b) / scale + k_hat + 1.0  # through h, the LN scale, the LN bias
    return k_hat, W * k_hat + theta_ln + 1.0  # readout: ∂/∂w = z, through z, bias


@pytest.mark.parametrize("layout", ["full", "diagonal"])
@pytest.mark.parametrize("framework", ["linen", "haiku"])
def test_layer_norm_of_a_shifted_value_by_hand(framework, layout):
    if framework == "linen":
        model, eps = nflax.adapt(_LinenNet(TABLE), None, X), 1e-6
    else:
        model, eps = nhaiku.adapt(hk.without_apply_rng(hk.transform(_haiku_net)), None, X), 1e-5
    k = infinite_kernel_fn(model, spatial_layout=layout)(X, X[1:])
    nngp, ntk = _by_hand(X, X[1:], eps)
    if layout == "diagonal":
        nngp, ntk = np.einsum("abtt->abt", nngp), np.einsum("abtt->abt", ntk)
    np.testing.assert_allclose(k.nngp, nngp, rtol=1e-10)
    np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10)


def test_float32_inputs_agree_with_float64_by_hand():
    x = X.astype(jnp.float32)
    model = nflax.adapt(_LinenNet(TABLE.astype(np.float32)), None, x)
    k = infinite_kernel_fn(model, spatial_layout="full")(x)
    assert k.nngp.dtype == jnp.float32
    nngp, ntk = _by_hand(x, x, 1e-6)
    np.testing.assert_allclose(k.nngp, nngp, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(k.ntk, ntk, rtol=2e-5, atol=2e-5)


def test_layer_norm_centres_with_the_channel_means():
    # One example, one position: second moment 5, channel mean 1 -> variance 4, centred 4 -> 1.
    one = jnp.ones((1, 1))
    k = Kernel(nngp=5 * one, ntk=one, cov1=5 * jnp.ones(1), cov2=5 * jnp.ones(1), mean1=jnp.ones(1))
    from ntk_adapters.infinite.layers import layer_norm

    out = layer_norm(k, epsilon=0.0, use_bias=False)
    np.testing.assert_allclose(out.nngp, [[1.0]])
    np.testing.assert_allclose(out.ntk, [[1.0 / 4 + 1.0]])  # Θ/σ² + the scale's x̂²
    assert not out.is_gaussian and out.mean1 is not None
    with pytest.raises(ValueError, match="channel means are known"):
        layer_norm(k.replace(mean1=None))


# -- Monte Carlo over Flax's LM1B modules --------------------------------------------------------

V, TM = 7, 5
IDS = jnp.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [1, 1, 6, 6, 0], [2, 3, 2, 3, 2]], jnp.int32)


class _PositionNet(nn.Module):
    """Embed -> AddPositionEmbs (LM1B's fixed sinusoidal table) -> LayerNorm -> Dense-ReLU -> mean -> Dense."""

    width: int

    @nn.compact
    def __call__(self, ids):
        config = lm1b.TransformerConfig(vocab_size=V, output_vocab_size=V, emb_dim=self.width, max_len=TM)
        h = nn.Embed(V, self.width, embedding_init=nn.initializers.normal(1.0))(ids)
        h = nn.LayerNorm()(lm1b.AddPositionEmbs(config=config)(h))
        h = nn.relu(nn.Dense(self.width, bias_init=nn.initializers.normal(0.3))(h))
        return nn.Dense(4)(h.mean(axis=1))


def _forget_the_means(monkeypatch):
    """The engine as it would be if LayerNorm took the second moments for covariances."""

    known = Kernel.channel_means

    def zeros(self):
        means = known(self)
        return None if means is None else tuple(jnp.zeros_like(m) for m in means)

    monkeypatch.setattr(Kernel, "channel_means", zeros)


def test_monte_carlo_over_lm1b_position_embeddings(mc, monkeypatch):
    errs, z = [], []
    for width, n_samples in ((4, 500), (256, 2000)):
        model = nflax.adapt(_PositionNet(width), None, IDS)
        k = infinite_kernel_fn(model)(IDS)
        mean, se = mc.nngp_with_stderr(model, IDS, n_samples)
        errs.append(mc.rel_err(mean, k.nngp))
        z.append(float(np.max(np.abs(mean - np.asarray(k.nngp)) / se)))
    assert errs[1] < errs[0], (errs, z)
    assert z[1] < 4.5 and errs[1] < 0.03, (errs, z)
    _, ntk = mc.monte_carlo(model, IDS, n_samples=16, chunk=16)
    assert mc.rel_err(ntk, k.ntk) < 0.08, mc.rel_err(ntk, k.ntk)

    # The same check fails for a kernel that ignores the table's channel means in the LayerNorm.
    with monkeypatch.context() as patch:
        _forget_the_means(patch)
        wrong = infinite_kernel_fn(model)(IDS).nngp
    z_wrong = float(np.max(np.abs(mean - np.asarray(wrong)) / se))
    assert z_wrong > 6 and mc.rel_err(mean, wrong) > 2 * errs[1], (z_wrong, mc.rel_err(mean, wrong), errs)


# -- refusals ------------------------------------------------------------------------------------


def _linen(extra):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(extra(nn.Dense(W)(x)))

    return nflax.adapt(Net(), None, X)


@pytest.mark.parametrize(
    "extra,match",
    [
        (lambda h: nn.relu(h) + TABLE, r"adds a fixed array of shape \(1, 4, 6\) .*not a zero-mean Gaussian"),
        (lambda h: (h + TABLE) - 2 * TABLE, r"adds a fixed array of shape \(1, 4, 6\) .*not a zero-mean Gaussian"),
        (lambda h: nn.relu(nn.LayerNorm()(h + TABLE)), r"elementwise nonlinearity applied to a value that is not"),
        (lambda h: h + jnp.arange(h.shape[0])[:, None, None] * TABLE, r"differs between the examples of the batch"),
        (lambda h: h.reshape(h.shape[0], -1) + np.arange(T * W), r"no channel axis of its own"),
    ],
)
def test_refusals(extra, match):
    with pytest.raises(InfiniteWidthError, match=match):
        infinite_kernel_fn(_linen(extra))(X)

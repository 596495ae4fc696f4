"""Transposed, grouped and depthwise convolutions (Flax linen and Haiku).

Exactness: a first layer is linear in its weights, so its NNGP over the weights' distribution is
``σ² J(x) J(x')ᵀ`` and its NTK ``J(x) J(x')ᵀ`` (plus the bias), with ``J`` the Jacobian of the
real module with respect to its weights (computed here by ``jax.jacrev``, per output channel,
averaged over channels), independent of the engine's window maps. Deeper networks: Monte Carlo over
the real modules, error falling with width.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn


def _first_layer_reference(apply_fn, params, x, weight_name, weight_var):
    """NNGP and NTK per output channel, ``(N, N, H, H', W, W')``, from the weight Jacobian
    (``weight_var`` = Var(W); no bias)."""

    def f(w):
        p = jax.tree_util.tree_map(lambda a: a, params)
        p = _set(p, weight_name, w)
        return apply_fn(p, x)  # (N, H, W, O)

    w0 = _get(params, weight_name)
    jac = jax.jacrev(f)(w0)  # (N, H, W, O, *w.shape)
    n, h, wd, o = jac.shape[:4]
    jac = jac.reshape(n, h, wd, o, -1)
    gram = np.einsum("ahwok,bxyok->abhxwy", jac, jac) / o
    return weight_var * gram, gram


def _get(params, name):
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jax.tree_util.keystr(leaf_path).endswith(f"['{name}']"):
            return leaf
    raise KeyError(name)


def _set(params, name, value):
    def put(path, leaf):
        return value if jax.tree_util.keystr(path).endswith(f"['{name}']") else leaf

    return jax.tree_util.tree_map_with_path(put, params)


# The modules compute in float32 (their parameters): agreement to float32 round-off.
X = np.random.default_rng(0).standard_normal((2, 3, 4, 3))
STD = 0.7


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 2), (0, 1))])
@pytest.mark.parametrize("strides", [(2, 2), (1, 2)])
def test_flax_conv_transpose_first_layer_is_exact(padding, strides):
    module = nn.ConvTranspose(
        5,
        (3, 2),
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_init=nn.initializers.normal(STD / np.sqrt(3 * 2 * 3)),
    )
    model = nflax.adapt(module, module.init(jax.random.PRNGKey(0), X), X)
    k = infinite_kernel_fn(model, spatial_layout="full")(X, get="kernel")
    nngp, ntk = _first_layer_reference(model.apply_fn, model.params, X, "kernel", STD**2 / (3 * 2 * 3))
    np.testing.assert_allclose(k.nngp, nngp, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(k.ntk, ntk, rtol=2e-5, atol=1e-9)


def test_haiku_conv_transpose_and_depthwise_first_layers_are_exact():
    for make, fan_in in [
        (lambda: hk.Conv2DTranspose(4, (2, 3), stride=2, padding="SAME", with_bias=False), 2 * 3 * 3),
        (lambda: hk.DepthwiseConv2D(2, (3, 3), with_bias=False), 3 * 3),
    ]:
        f = hk.without_apply_rng(hk.transform(lambda x, make=make: make()(x)))
        model = nhaiku.adapt(f, f.init(jax.random.PRNGKey(1), X), X)
        k = infinite_kernel_fn(model, spatial_layout="full")(X, get="kernel")
        # Haiku's default initializer: truncated normal with stddev 1/sqrt(fan_in), which has
        # variance (1/fan_in)·(1 − 4φ(2)/(Φ(2) − Φ(−2))) after truncation at two standard deviations.
        trunc = 1.0 - 4.0 * np.exp(-2.0) / np.sqrt(2 * np.pi) / jax.scipy.special.erf(2 / np.sqrt(2))
        nngp, ntk = _first_layer_reference(model.apply_fn, model.params, X, "w", trunc / fan_in)
        np.testing.assert_allclose(k.nngp, nngp, rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(k.ntk, ntk, rtol=2e-5, atol=1e-9)


def test_grouped_convolution_first_layer_is_exact():
    module = nn.Conv(
        6, (3, 3), feature_group_count=3, use_bias=False, kernel_init=nn.initializers.normal(STD / np.sqrt(3 * 3 * 1))
    )
    model = nflax.adapt(module, module.init(jax.random.PRNGKey(0), X), X)
    k = infinite_kernel_fn(model, spatial_layout="full")(X, get="kernel")
    nngp, ntk = _first_layer_reference(model.apply_fn, model.params, X, "kernel", STD**2 / (3 * 3 * 1))
    np.testing.assert_allclose(k.nngp, nngp, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(k.ntk, ntk, rtol=2e-5, atol=1e-9)


def test_depthwise_output_is_not_gaussian_and_a_nonlinearity_after_it_is_refused():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(8, (3, 3))(x)
            h = nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(h)
            return nn.Dense(2)(nn.relu(h).reshape(h.shape[0], -1))

    model = nflax.adapt(Net(), None, X)
    with pytest.raises(InfiniteWidthError, match="not a zero-mean Gaussian"):
        infinite_kernel_fn(model)(X)


def test_circular_padding_of_a_transposed_convolution_is_refused_naming_the_layer():
    module = nn.ConvTranspose(4, (3, 3), padding="CIRCULAR")
    model = nflax.adapt(module, module.init(jax.random.PRNGKey(0), X), X)
    with pytest.raises(InfiniteWidthError, match="circular padding"):
        infinite_kernel_fn(model)(X)


class _Decoder(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.ConvTranspose(self.width, (3, 3), strides=(2, 2))(x))
        h = nn.Conv(self.width, (3, 3), feature_group_count=2)(h)
        h = nn.Conv(self.width, (3, 3), feature_group_count=self.width)(nn.relu(h))
        return nn.Dense(8)(h.reshape(h.shape[0], -1))


def _haiku_decoder(width, x):
    def f(x):
        h = jax.nn.relu(hk.Conv2DTranspose(width, 3, stride=2, padding="VALID")(x))
        h = hk.DepthwiseConv2D(2, 3)(h)
        return hk.Linear(8)(h.reshape(h.shape[0], -1))

    return nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "build", [lambda w, x: nflax.adapt(_Decoder(w), None, x), _haiku_decoder], ids=["flax", "haiku"]
)
@pytest.mark.xdist_group("conv_calls_monte_carlo")
def test_transposed_grouped_depthwise_networks_agree_with_monte_carlo(mc, build):
    # The finite-width bias of these small networks is already within the Monte Carlo noise at
    # width 4 (measured: 1.6-3.5 % NNGP error), so this checks agreement at one width within the
    # noise (1024 draws for the NNGP, 12 for the NTK); the maps themselves are exact above.
    x = jnp.asarray(X[:, :2, :2, :2])
    model = build(48, x)
    k = infinite_kernel_fn(model)(x)
    nngp, _ = mc.monte_carlo(model, x, n_samples=1024, want_ntk=False, chunk=1024)
    _, ntk = mc.monte_carlo(model, x, n_samples=12, chunk=12)
    errs = mc.rel_err(nngp, k.nngp), mc.rel_err(ntk, k.ntk)
    assert errs[0] < 0.05 and errs[1] < 0.08, errs

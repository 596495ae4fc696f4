"""Refusals name the innermost module and the operation, and say what to use instead.

* An operation refused inside a module without a rule (a hand-written ``nn.Module``,
  ``nnx.Module`` or ``hk.Module``) names that module's path and class, and the primitive (or the
  function, ``relu``, for a call of a named function).
* A post-activation residual ``relu(x + f(x))`` with ``x`` already non-Gaussian has no exact
  kernel (the sum of a non-Gaussian value and an independent Gaussian is not Gaussian); the
  refusal names the pre-activation ordering, whose kernel is checked here against the recursion
  written out by hand.
* Max pooling has no exact kernel (no closed form for the expectation of a maximum of more than
  two correlated Gaussians); the refusal names average pooling.
"""

import re

import haiku as hk
import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn

RESIDUAL = (
    "a nonlinearity of a sum of a non-Gaussian value and a Gaussian branch has no exact kernel",
    "the pre-activation residual `x + f(relu(x))` (ResNet v2 ordering) has one",
)
MAX_POOL = "max pooling has no exact infinite-width kernel"
AVG_POOL = "average pooling (`nn.avg_pool` / `hk.avg_pool`) has one"


@pytest.fixture(scope="module")
def xv():
    return jax.random.normal(jax.random.PRNGKey(0), (3, 4))


@pytest.fixture(scope="module")
def img():
    return jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 2))


def _message(model, x) -> str:
    with pytest.raises(InfiniteWidthError) as info:
        infinite_kernel_fn(model)(x)
    msg = str(info.value)
    assert "monte_carlo_kernel_fn" in msg
    return msg


# ----------------------------------------------------------------------------------------------
# The innermost module without a rule.


class HandLinear(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], self.features))
        return x @ w


class Wrapper(nn.Module):
    @nn.compact
    def __call__(self, x):
        return HandLinear(2, name="inner")(x)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Wrapper(name="outer")(nn.relu(nn.Dense(8)(x)))


def test_linen_names_the_innermost_module_and_primitive(xv):
    msg = _message(nflax.adapt(LinenNet(), None, xv), xv)
    assert f"layer `outer/inner` ({__name__}.HandLinear) at primitive dot_general" in msg, msg


class NNXLinear(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)))

    def __call__(self, x):
        return x @ self.w.value


class NNXNet(nnx.Module):
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.head = NNXLinear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.hidden(x)))


def test_nnx_names_the_innermost_module_and_primitive(xv):
    model = nflax.adapt(NNXNet(rngs=nnx.Rngs(0)), None, xv, init=lambda rngs: NNXNet(rngs=rngs))
    msg = _message(model, xv)
    assert f"layer `head` ({__name__}.NNXLinear) at primitive dot_general" in msg, msg


class HaikuHandLinear(hk.Module):
    def __call__(self, x):
        w = hk.get_parameter("w", (x.shape[-1], 2), init=hk.initializers.RandomNormal())
        return x @ w


def test_haiku_names_the_innermost_module_and_primitive(xv):
    def f(x):
        return HaikuHandLinear(name="hand")(jax.nn.relu(hk.Linear(8)(x)))

    msg = _message(nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, xv), xv)
    assert f"layer `hand` ({__name__}.HaikuHandLinear) at primitive dot_general" in msg, msg


# ----------------------------------------------------------------------------------------------
# Post-activation residuals.


class PostActivationBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x + nn.Dense(x.shape[-1])(x))


class PreActivationBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(x.shape[-1])(nn.relu(x))


class LinenPost(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        return nn.Dense(2)(PostActivationBlock(name="block")(h))


class LinenPre(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        return nn.Dense(2)(nn.relu(PreActivationBlock(name="block")(h)))


def _assert_residual_refusal(msg: str, layer: str) -> None:
    assert f"layer `{layer}` (" in msg and "at `relu` (primitive custom_jvp_call" in msg, msg
    for part in RESIDUAL:
        assert part in msg, msg


def test_linen_post_activation_residual_is_refused_naming_the_block_and_the_variant(xv):
    msg = _message(nflax.adapt(LinenPost(), None, xv), xv)
    _assert_residual_refusal(msg, "block")
    assert f"{__name__}.PostActivationBlock" in msg


def test_haiku_post_activation_residual_is_refused_naming_the_block_and_the_variant(xv):
    class Block(hk.Module):
        def __call__(self, x):
            return jax.nn.relu(x + hk.Linear(x.shape[-1])(x))

    def f(x):
        return hk.Linear(2)(Block(name="block")(jax.nn.relu(hk.Linear(8)(x))))

    msg = _message(nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, xv), xv)
    _assert_residual_refusal(msg, "block")


def _relu_kernels(k):
    """E[relu(u) relu(v)] and E[step(u) step(v)] for (u, v) with covariance matrix k."""
    s = np.sqrt(np.outer(np.diag(k), np.diag(k)))
    theta = np.arccos(np.clip(k / s, -1.0, 1.0))
    j1 = s * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    return j1, (np.pi - theta) / (2 * np.pi)


def test_the_pre_activation_residual_has_the_kernel_of_the_recursion(xv):
    # x0 = Dense(x), x1 = x0 + Dense(relu(x0)) (a Gaussian: the branch is a fresh linear layer),
    # out = Dense(relu(x1)); Flax defaults σw² = 1, zero trainable biases, width 8
    x = np.asarray(xv, float)
    nngp, ntk = infinite_kernel_fn(nflax.adapt(LinenPre(), None, xv))(xv)
    width = 8
    k0 = x @ x.T / x.shape[1]
    t0 = x @ x.T + 1.0
    j1, j0 = _relu_kernels(k0)
    k1 = k0 + j1
    t1 = t0 + (width * j1 + j0 * t0 + 1.0)
    j1b, j0b = _relu_kernels(k1)
    np.testing.assert_allclose(nngp, j1b, rtol=1e-10)
    np.testing.assert_allclose(ntk, width * j1b + j0b * t1 + 1.0, rtol=1e-10)


def test_haiku_resnet_v1_names_the_relu_and_the_batchnorm_before_it(img):
    # hk.nets.ResNet (v1) in eval mode: the stem's relu follows a BatchNorm whose moving statistics
    # shift and scale each channel differently, so its input is not a zero-mean Gaussian process
    def f(x, is_training):
        net = hk.nets.ResNet(
            blocks_per_group=(1, 1, 1, 1),
            num_classes=2,
            channels_per_group=(2, 2, 2, 2),
            bottleneck=False,
            resnet_v2=False,
        )
        return net(x, is_training=is_training)

    t = hk.transform_with_state(f)
    params, state = t.init(jax.random.PRNGKey(0), img, is_training=True)
    model = nhaiku.adapt(t, params, img, state=state, is_training=False)
    msg = _message(model, img)
    assert re.search(r"layer `res_net` \(haiku\.[\w.]*ResNet\) at `relu` \(primitive custom_jvp_call", msg), msg
    assert "the output of layer `res_net/~/initial_batchnorm`" in msg, msg


# ----------------------------------------------------------------------------------------------
# Max pooling.


def test_linen_max_pooling_names_the_layer_and_average_pooling(img):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.max_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
            return nn.Dense(2)(h.reshape((h.shape[0], -1)))

    msg = _message(nflax.adapt(Net(), None, img), img)
    assert "layer `Net` (" in msg and "at primitive reduce_window_max" in msg, msg
    assert MAX_POOL in msg and AVG_POOL in msg, msg


def test_haiku_max_pooling_names_the_layer_and_average_pooling(img):
    class Stem(hk.Module):
        def __call__(self, x):
            return hk.max_pool(jax.nn.relu(hk.Conv2D(4, 3)(x)), window_shape=2, strides=2, padding="VALID")

    def f(x):
        return hk.Linear(2)(hk.Flatten()(Stem(name="stem")(x)))

    msg = _message(nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, img), img)
    assert f"layer `stem` ({__name__}." in msg and "at primitive reduce_window_max" in msg, msg
    assert MAX_POOL in msg and AVG_POOL in msg, msg


def test_the_average_pooling_variant_is_accepted(img):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
            return nn.Dense(2)(h.reshape((h.shape[0], -1)))

    nngp, ntk = infinite_kernel_fn(nflax.adapt(Net(), None, img))(img)
    assert nngp.shape == (2, 2) and np.all(np.isfinite(ntk)) and np.all(np.linalg.eigvalsh(nngp) > 0)

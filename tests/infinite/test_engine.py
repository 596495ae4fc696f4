"""Engine against closed-form oracles written out by hand, and its API."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.scipy.special import erf

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import expand_outputs, infinite_kernel_fn

# Variance of N(0, 1) truncated to [-2, 2], written out: 1 - 4 φ(2) / (Φ(2) - Φ(-2)).
_PHI2 = np.exp(-2.0) / np.sqrt(2 * np.pi)
_Z = float(jax.scipy.special.erf(2 / np.sqrt(2)))
HAIKU_SW2 = 1 - 4 * _PHI2 / _Z


def arccos_mlp(x1, x2, depth, sw2, sb2, widths, bias=True):
    """Hand-written arc-cosine recursion for a standard-parameterization ReLU MLP."""
    d = x1.shape[1]
    k12 = x1 @ x2.T / d
    q1 = np.sum(x1 * x1, 1) / d
    q2 = np.sum(x2 * x2, 1) / d
    ntk = np.zeros_like(k12)
    fan_in = d
    for layer in range(depth + 1):
        # linear layer
        ntk = fan_in * k12 + sw2 * ntk + (1.0 if bias else 0.0)
        k12, q1, q2 = sw2 * k12 + sb2, sw2 * q1 + sb2, sw2 * q2 + sb2
        if layer == depth:
            break
        s = np.sqrt(np.outer(q1, q2))
        rho = np.clip(k12 / s, -1, 1)
        th = np.arccos(rho)
        ntk = ntk * (np.pi - th) / (2 * np.pi)
        k12 = s * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
        q1, q2 = q1 / 2, q2 / 2
        fan_in = widths[layer]
    return k12, ntk


class ReluMLP(nn.Module):
    widths: tuple

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def xs():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return np.asarray(jax.random.normal(k1, (5, 7))), np.asarray(jax.random.normal(k2, (3, 7)))


def test_flax_relu_mlp_equals_arccos(xs):
    x1, x2 = xs
    widths = (16, 32)
    model = nflax.adapt(ReluMLP(widths), None, x1)
    k = infinite_kernel_fn(model)(x1, x2)
    nngp, ntk = arccos_mlp(x1, x2, 2, 1.0, 0.0, widths)  # lecun_normal: σw² = 1 exactly, zero bias
    np.testing.assert_allclose(k.nngp, nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10, atol=1e-12)


def test_haiku_relu_mlp_equals_arccos(xs):
    x1, x2 = xs
    widths = (16, 32)
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP(list(widths) + [3])(x)))
    model = nhaiku.adapt(net, None, x1)
    k = infinite_kernel_fn(model)(x1, x2)
    nngp, ntk = arccos_mlp(x1, x2, 2, HAIKU_SW2, 0.0, widths)
    np.testing.assert_allclose(k.nngp, nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10, atol=1e-12)


def test_he_normal_and_bias_variance_and_no_bias(xs):
    x1, x2 = xs

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(8, kernel_init=nn.initializers.he_normal(), bias_init=nn.initializers.normal(0.5))(x))
            return nn.Dense(2, use_bias=False, kernel_init=nn.initializers.he_normal())(x)

    model = nflax.adapt(Net(), None, x1)
    k = infinite_kernel_fn(model)(x1, x2)
    # by hand: layer 1 σw²=2, σb²=0.25, trainable bias; layer 2 σw²=2, no bias
    d = x1.shape[1]
    k12 = 2 * x1 @ x2.T / d + 0.25
    q1 = 2 * np.sum(x1**2, 1) / d + 0.25
    q2 = 2 * np.sum(x2**2, 1) / d + 0.25
    ntk = d * (x1 @ x2.T / d) + 1.0
    s = np.sqrt(np.outer(q1, q2))
    th = np.arccos(np.clip(k12 / s, -1, 1))
    j1 = s * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
    j0 = (np.pi - th) / (2 * np.pi)
    np.testing.assert_allclose(k.nngp, 2 * j1, rtol=1e-10)
    np.testing.assert_allclose(k.ntk, 8 * j1 + 2 * ntk * j0, rtol=1e-10)


def test_get_single_kernel_value_and_expand(xs):
    x1, x2 = xs
    model = nflax.adapt(ReluMLP((8,)), None, x1)
    kf = infinite_kernel_fn(model)
    ntk = kf(x1, x2, "ntk")
    assert ntk.shape == (5, 3)
    kern = kf(x1, get="kernel")
    assert kern.nngp.shape == (5, 5) and kern.cov1.shape == (5,)
    np.testing.assert_allclose(np.diag(kern.nngp), kern.cov1, rtol=1e-12)
    full = expand_outputs(ntk, 3)
    assert full.shape == (5, 3, 3, 3)
    np.testing.assert_allclose(full[:, :, 0, 1], 0.0)
    np.testing.assert_allclose(full[:, :, 2, 2], ntk)
    # jit-compatible from the outside too
    np.testing.assert_allclose(jax.jit(lambda a, b: kf(a, b, "ntk"))(x1, x2), ntk, rtol=1e-12)


def test_weight_variance_override(xs):
    x1, _ = xs
    model = nflax.adapt(ReluMLP(()), None, x1)  # a single Dense layer
    k = infinite_kernel_fn(model, weight_variance={"Dense_0": 3.0}, bias_variance=0.5)(x1, get="nngp")
    np.testing.assert_allclose(k, 3.0 * x1 @ x1.T / x1.shape[1] + 0.5, rtol=1e-12)


def test_dense_general_plain_projection_equals_dense(xs):
    x1, x2 = xs

    class A(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(3)(nn.relu(nn.DenseGeneral(16, axis=-1)(x)))

    k = infinite_kernel_fn(nflax.adapt(A(), None, x1))(x1, x2)
    nngp, ntk = arccos_mlp(x1, x2, 1, 1.0, 0.0, (16,))
    np.testing.assert_allclose(k.nngp, nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10, atol=1e-12)


class _ErfMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(erf(nn.Dense(16)(nn.relu(nn.Dense(16)(x)))))


class _PoolingCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # full layout: covariances between positions
        return nn.Dense(2)(nn.relu(nn.Conv(4, (3, 3))(x)).mean((1, 2)))


class _FlattenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # diagonal layout: one window sum per spatial axis
        h = nn.relu(nn.Conv(4, (3, 3), strides=(2, 1))(x))
        return nn.Dense(2)(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize(
    "module,shape",
    [(_ErfMLP(), (5, 3)), (_PoolingCNN(), (3, 4, 4, 2)), (_FlattenCNN(), (3, 5, 4, 2))],
    ids=["mlp", "pooling_cnn", "flatten_cnn"],
)
@pytest.mark.parametrize("same", [True, False], ids=["x_with_itself", "x1_x2"])
def test_input_gradients_match_central_differences(module, shape, same):
    """d/dx of the kernels (what dataset distillation and kernel-based attacks use), unit
    correlation on the diagonal of K(x, x) included, against central differences in float64."""
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal(shape))
    x2 = None if same else jnp.asarray(rng.standard_normal((2,) + shape[1:]))
    kernel_fn = infinite_kernel_fn(nflax.adapt(module, None, x1[:2]))
    w = jnp.asarray(rng.standard_normal((shape[0], shape[0] if same else 2)))
    direction = jnp.asarray(rng.standard_normal(shape))
    for get in ("nngp", "ntk"):
        loss = lambda x, get=get: jnp.sum(w * kernel_fn(x, x2, get=get))
        along = float(jnp.sum(jax.grad(loss)(x1) * direction))
        eps = 1e-5
        fd = float((loss(x1 + eps * direction) - loss(x1 - eps * direction)) / (2 * eps))
        assert abs(along - fd) <= 1e-7 * max(1.0, abs(fd)), (get, along, fd)

"""The registry and the errors: unsupported layers fail loudly, user rules plug in."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn, register_rule


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))


def _flax(fn, x):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return fn(x)

    return nflax.adapt(Net(), None, x)


def _raises(model, x, match):
    with pytest.raises(InfiniteWidthError, match=match) as info:
        infinite_kernel_fn(model)(x)
    msg = str(info.value)
    assert "monte_carlo_kernel_fn" in msg and "register_rule" in msg
    return msg


def test_max_pool_is_an_error(x):
    model = _flax(lambda h: nn.Dense(2)(nn.max_pool(nn.Conv(4, (3, 3))(h), (2, 2)).reshape((h.shape[0], -1))), x)
    _raises(model, x, "reduce_window_max")


def test_softmax_over_channels_is_an_error(x):
    model = _flax(lambda h: jax.nn.softmax(nn.Dense(4)(h.reshape((h.shape[0], -1)))), x)
    _raises(model, x, "reduce_max|exp|reduce_sum|softmax")


def test_attention_is_an_error(x):
    seq = x.reshape((3, 16, 2))
    model = _flax(
        lambda h: nn.Dense(2)(nn.SelfAttention(num_heads=1, qkv_features=4)(h).reshape((h.shape[0], -1))), seq
    )
    _raises(model, seq, "SelfAttention|MultiHeadDotProductAttention|dot_general|attention")


def test_batchnorm_training_mode_is_an_error():
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.Dense(2)(nn.relu(nn.BatchNorm(use_running_average=False)(nn.Dense(8)(h))))

    model = nflax.adapt(Net(), None, xv, mutable=["batch_stats"])
    _raises(model, xv, "training mode")


def test_haiku_batchnorm_training_mode_is_an_error():
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))

    def f(h, is_training):
        return hk.Linear(2)(hk.BatchNorm(True, True, 0.9)(hk.Linear(8)(h), is_training=is_training))

    net = hk.without_apply_rng(hk.transform_with_state(f))
    model = nhaiku.adapt(net, None, xv, is_training=True)
    _raises(model, xv, "training mode")


def test_layer_without_rule_names_the_layer():
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))

    class Weird(nn.Module):
        @nn.compact
        def __call__(self, h):
            w = self.param("w", nn.initializers.normal(1.0), (h.shape[-1], 5))
            return jnp.sin(h) @ w

    class Net(nn.Module):
        @nn.compact
        def __call__(self, h):
            return Weird(name="weird")(nn.Dense(8)(h))

    msg = _raises(nflax.adapt(Net(), None, xv), xv, "weird")
    assert "Net/weird" in msg or "weird" in msg


def test_dependent_residual_is_an_error():
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    # a + b with b = relu(Dense(a)): neither branch ends in a fresh linear layer the other does not use

    class Net(nn.Module):
        @nn.compact
        def __call__(self, h):
            a = nn.relu(nn.Dense(8)(h))
            b = nn.relu(nn.Dense(8)(a))
            return nn.Dense(2)(a + b)

    _raises(nflax.adapt(Net(), None, xv), xv, "not independent")


def test_function_of_one_gaussian_is_one_phi():
    # a + relu(a) is one elementwise function of the Gaussian a: exact, not an independence question
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, h):
            a = nn.Dense(8)(h)
            return nn.Dense(2)(a + nn.relu(a))

    k = infinite_kernel_fn(nflax.adapt(Net(), None, xv))(xv, get="nngp")
    # by hand: E[(u + relu u)(v + relu v)] = c + 2·(c/2) + J1 = 2c + J1
    c = xv @ xv.T / 3
    q = np.diag(c)
    s = np.sqrt(np.outer(q, q))
    th = np.arccos(np.clip(c / s, -1, 1))
    j1 = s * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
    # Gauss–Hermite quadrature of a function with a kink converges only algebraically (32 nodes)
    np.testing.assert_allclose(k, 2 * c + j1, atol=5e-3)


def test_elementwise_of_non_gaussian_is_an_error():
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    # a nonlinearity of the raw input: its kernel x·x'ᵀ/d does not determine tanh(x)·tanh(x')ᵀ
    _raises(_flax(lambda h: nn.Dense(2)(jnp.tanh(h)), xv), xv, "not a zero-mean Gaussian")
    # a nonlinearity after a sum of a ReLU branch and an independent branch (not Gaussian)
    _raises(
        _flax(lambda h: nn.Dense(2)(jnp.tanh(nn.relu(nn.Dense(8)(h)) + nn.Dense(8)(h))), xv),
        xv,
        "not a zero-mean Gaussian",
    )


def test_unknown_initializer_asks_for_override():
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    model = _flax(lambda h: nn.Dense(2, kernel_init=nn.initializers.orthogonal())(h), xv)
    with pytest.raises(InfiniteWidthError, match="weight_variance"):
        infinite_kernel_fn(model)(xv)
    k = infinite_kernel_fn(model, weight_variance={"Dense_0": 1.5})(xv, get="nngp")
    np.testing.assert_allclose(k, 1.5 * xv @ xv.T / 3, rtol=1e-12)


class Scale(nn.Module):
    alpha: float

    @nn.compact
    def __call__(self, h):
        return self.alpha * jnp.sin(h) * 0 + self.alpha * h  # the sin would otherwise need a rule


def test_register_rule_for_a_custom_layer():
    xv = jax.random.normal(jax.random.PRNGKey(1), (4, 3))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.Dense(2)(Scale(3.0)(nn.relu(nn.Dense(8)(h))))

    def scale_rule(k, call):
        a2 = call.module.alpha**2
        return k.replace(nngp=a2 * k.nngp, ntk=a2 * k.ntk, cov1=a2 * k.cov1, cov2=a2 * k.cov2)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.Dense(2)(nn.relu(nn.Dense(8)(h)))

    register_rule(Scale, scale_rule)
    k = infinite_kernel_fn(nflax.adapt(Net(), None, xv))(xv)
    ref = infinite_kernel_fn(nflax.adapt(Plain(), None, xv))(xv)
    # Dense after a ×3 scale: nngp ×9; the NTK of the first layer ×9, of the last layer's weights ×9
    np.testing.assert_allclose(k.nngp, 9 * ref.nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk, 9 * ref.ntk - 8 * 1.0, rtol=1e-12)


def test_spatial_layout_auto_and_override(x):
    def head(h):
        h = nn.relu(nn.Conv(4, (3, 3))(h))
        return nn.Dense(2)(jnp.mean(h, axis=(1, 2)))

    model = _flax(head, x)
    auto = infinite_kernel_fn(model)(x, get="kernel")
    assert auto.layout == "none"
    full = infinite_kernel_fn(model, spatial_layout="full")(x, get="nngp")
    np.testing.assert_allclose(auto.nngp, full, rtol=1e-12)
    with pytest.raises(InfiniteWidthError, match="spatial_layout='full'"):
        infinite_kernel_fn(model, spatial_layout="diagonal")(x)
    flat = _flax(lambda h: nn.Dense(2)(nn.relu(nn.Conv(4, (3, 3))(h)).reshape((h.shape[0], -1))), x)
    d = infinite_kernel_fn(flat)(x, get="nngp")
    f = infinite_kernel_fn(flat, spatial_layout="full")(x, get="nngp")
    np.testing.assert_allclose(d, f, rtol=1e-12)

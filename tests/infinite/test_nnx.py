"""Infinite-width kernels of Flax NNX models: module calls recorded without an interceptor and
initializers read from the model's init= factory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import ntk_adapters.flax as nflax
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn

_LECUN_NORMAL = nnx.initializers.lecun_normal()


class NnxMLP(nnx.Module):
    def __init__(self, rngs, width=16, kernel_init=_LECUN_NORMAL):
        self.hidden = nnx.Linear(6, width, kernel_init=kernel_init, rngs=rngs)
        self.mid = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.mid(nnx.relu(self.hidden(x)))))


class LinenMLP(nn.Module):
    kernel_init: object = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, kernel_init=self.kernel_init)(x))
        return nn.Dense(4)(jnp.tanh(nn.Dense(16)(x)))


class NnxCNN(nnx.Module):
    def __init__(self, rngs, width=8):
        self.conv = nnx.Conv(2, width, (3, 3), padding="CIRCULAR", rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.out = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.gelu(self.norm(self.conv(x)))
        return self.out(jnp.mean(h, axis=(1, 2)))


@pytest.mark.parametrize("kernel_init", ["lecun_normal", "he_uniform"])
def test_nnx_mlp_equals_the_same_linen_mlp(x_vec, kernel_init):
    nnx_init = getattr(nnx.initializers, kernel_init)()
    linen_init = getattr(nn.initializers, kernel_init)()
    model = nflax.adapt(
        NnxMLP(nnx.Rngs(0), kernel_init=nnx_init), None, x_vec, init=lambda rngs: NnxMLP(rngs, kernel_init=nnx_init)
    )
    k = infinite_kernel_fn(model)(x_vec, x_vec[:2] + 0.5)
    ref = infinite_kernel_fn(nflax.adapt(LinenMLP(linen_init), None, x_vec))(x_vec, x_vec[:2] + 0.5)
    np.testing.assert_allclose(k.nngp, ref.nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk, ref.ntk, rtol=1e-12)


def test_without_init_factory_the_initializers_are_unknown(x_vec):
    module = NnxMLP(nnx.Rngs(0))
    model = nflax.adapt(module, None, x_vec)
    with pytest.raises(InfiniteWidthError, match=r"layer `hidden`.*adapt the model with init="):
        infinite_kernel_fn(model)
    assert not hasattr(module.hidden, "kernel_init")  # the user's module is left untouched
    # Explicit variances are the alternative: lecun_normal weights (σw² = 1), zero biases.
    with_init = nflax.adapt(module, None, x_vec, init=lambda rngs: NnxMLP(rngs))
    explicit = infinite_kernel_fn(model, weight_variance=1.0, bias_variance=0.0)(x_vec)
    np.testing.assert_allclose(explicit.ntk, infinite_kernel_fn(with_init)(x_vec).ntk, rtol=1e-12)


def test_factory_of_another_architecture_is_rejected(x_vec):
    model = nflax.adapt(NnxMLP(nnx.Rngs(0)), None, x_vec, init=lambda rngs: NnxMLP(rngs, width=8))
    with pytest.raises(ValueError, match="builds a different architecture"):
        infinite_kernel_fn(model)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_nnx_models_converge_to_the_engine(mc, x_vec, x_img, case):
    if case == "mlp":
        x, build = x_vec, lambda w: NnxMLP(nnx.Rngs(0), width=w)
        factory = lambda w: lambda rngs: NnxMLP(rngs, width=w)
        widths = (8, 256)
    else:
        x = x_img[:, :4, :4]
        build = lambda w: NnxCNN(nnx.Rngs(0), width=w)
        factory = lambda w: lambda rngs: NnxCNN(rngs, width=w)
        widths = (4, 128)
    errs = []
    for w in widths:
        model = nflax.adapt(build(w), None, x, init=factory(w))
        k = infinite_kernel_fn(model)(x)
        nngp, _ = mc.monte_carlo(model, x, n_samples=2048, want_ntk=False, chunk=2048)
        _, ntk = mc.monte_carlo(model, x, n_samples=16, chunk=16)
        errs.append((mc.rel_err(nngp, k.nngp), mc.rel_err(ntk, k.ntk)))
    (n0, t0), (n1, t1) = errs
    assert n1 < n0 and t1 < t0, errs
    assert n1 < 0.05 and t1 < 0.08, errs

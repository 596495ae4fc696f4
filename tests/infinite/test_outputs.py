"""Only what the selected output depends on is interpreted.

A model adapted with ``output=`` to pick one head has the kernel of the model without the other
heads, even when the other heads hold operations without an infinite-width rule; the Flax VAE
encoder of the example zoo, adapted to its mean head, has the kernel of one hidden ReLU layer
written out by hand (the arc-cosine formulas).
"""

import pathlib
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the zoo lives in examples/, next to the package
    sys.path.insert(0, str(ROOT))

WIDTH = 16


def _arc_cosine(q11, q22, q12):
    """E[relu(u) relu(v)] and E[step(u) step(v)] for (u, v) ~ N(0, [[q11, q12], [q12, q22]])."""
    s = np.sqrt(np.multiply.outer(q11, q22))
    theta = np.arccos(np.clip(q12 / s, -1.0, 1.0))
    return s * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi), (np.pi - theta) / (2 * np.pi)


def _one_hidden_relu_layer(x1, x2, hidden):
    """NNGP and NTK of Dense(hidden) -> relu -> Dense, Flax defaults (σw² = 1, zero trainable biases),
    standard parameterization."""
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    d = x1.shape[1]
    q12 = x1 @ x2.T / d
    k_relu, k_step = _arc_cosine(np.sum(x1 * x1, 1) / d, np.sum(x2 * x2, 1) / d, q12)
    ntk_hidden = d * q12 + 1.0
    return k_relu, hidden * k_relu + k_step * ntk_hidden + 1.0


class _Trunk(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(WIDTH, name="trunk")(x))


class TwoHeads(nn.Module):
    """Head ``a`` is a Dense; head ``b`` takes a max over channels, which has no infinite-width rule."""

    as_dict: bool = True

    @nn.compact
    def __call__(self, x):
        h = _Trunk(name="body")(x)
        a = nn.Dense(3, name="head_a")(h)
        b = nn.Dense(2, name="head_b")(h).max(axis=-1, keepdims=True)
        return {"a": a, "b": b} if self.as_dict else (b, a)


class OneHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head_a")(_Trunk(name="body")(x))


@pytest.fixture(scope="module")
def xs():
    x1 = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    x2 = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    return x1, x2


@pytest.mark.parametrize("as_dict, output", [(True, "a"), (False, 1)])
def test_picking_one_head_gives_the_kernel_of_the_one_head_model(xs, as_dict, output):
    x1, x2 = xs
    two = infinite_kernel_fn(nflax.adapt(TwoHeads(as_dict=as_dict), None, x1, output=output))
    one = infinite_kernel_fn(nflax.adapt(OneHead(), None, x1))
    for got, want in zip(two(x1, x2), one(x1, x2)):
        np.testing.assert_array_equal(got, want)
    nngp, ntk = one(x1, x2)
    want_nngp, want_ntk = _one_hidden_relu_layer(x1, x2, WIDTH)
    np.testing.assert_allclose(nngp, want_nngp, rtol=1e-10)
    np.testing.assert_allclose(ntk, want_ntk, rtol=1e-10)


def test_the_unused_head_itself_is_refused(xs):
    # what the selection skips would have been refused: the test above is not vacuous
    x1, _ = xs
    with pytest.raises(InfiniteWidthError, match="reduce_max"):
        infinite_kernel_fn(nflax.adapt(TwoHeads(), None, x1, output="b"))


def test_haiku_output_index_ignores_the_other_head(xs):
    x1, x2 = xs

    def two(x):
        h = jax.nn.relu(hk.Linear(WIDTH, name="trunk")(x))
        return jnp.max(hk.Linear(2, name="head_b")(h), axis=-1), hk.Linear(3, name="head_a")(h)

    def one(x):
        return hk.Linear(3, name="head_a")(jax.nn.relu(hk.Linear(WIDTH, name="trunk")(x)))

    k_two = infinite_kernel_fn(nhaiku.adapt(hk.without_apply_rng(hk.transform(two)), None, x1, output=1))
    k_one = infinite_kernel_fn(nhaiku.adapt(hk.without_apply_rng(hk.transform(one)), None, x1))
    for got, want in zip(k_two(x1, x2), k_one(x1, x2)):
        np.testing.assert_array_equal(got, want)


def test_unused_module_inside_a_jitted_function_is_ignored(xs):
    # both heads pass through one jax.jit program, of which only the first output is used: the
    # call needs only the inputs its used output reads, so head b (a max over channels, which
    # has no rule) is never interpreted
    x1, x2 = xs

    class Jitted(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = _Trunk(name="body")(x)
            a = nn.Dense(3, name="head_a")(h)
            b = jnp.max(nn.Dense(2, name="head_b")(h), axis=-1)
            return jax.jit(lambda a, b: (a * 1.0, b * 2.0))(a, b)[0]

    got = infinite_kernel_fn(nflax.adapt(Jitted(), None, x1))(x1, x2)
    want = infinite_kernel_fn(nflax.adapt(OneHead(), None, x1))(x1, x2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def test_zoo_vae_encoder_mean_head_is_one_hidden_relu_layer():
    from examples.zoo import catalog

    entry = catalog.get("flax_linen_vae_encoder_mean")
    built = entry.make()
    model = nflax.adapt(built["module"], built["variables"], built["x"], **built["adapt_kwargs"])
    # float64 inputs give float64 kernels (in float32, arccos near 1 loses digits on the diagonal)
    x = np.asarray(built["x"], np.float64)
    nngp, ntk = infinite_kernel_fn(model)(x)
    hidden = built["variables"]["params"]["encoder"]["fc1"]["kernel"].shape[1]
    want_nngp, want_ntk = _one_hidden_relu_layer(x, x, hidden)
    np.testing.assert_allclose(nngp, want_nngp, rtol=1e-10)
    np.testing.assert_allclose(ntk, want_ntk, rtol=1e-10)

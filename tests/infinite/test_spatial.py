"""The window machinery of convolutions in the 'full' layout: values against loops over positions,
and compiled programs that grow linearly with depth."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_adapters.infinite import elementwise as E
from ntk_adapters.infinite import layers as L
from ntk_adapters.infinite.spatial import _window_sum


def _diagonal_window_by_loops(x, k, stride, dilation, pad, mode):
    """``Σ_t xpad[i·s + t·d, j·s + t·d]`` over axes (1, 2), one output entry at a time."""
    xp = np.pad(x, [(0, 0), pad, pad, (0, 0)], mode=mode)
    n = xp.shape[1]
    out = (n - (k - 1) * dilation - 1) // stride + 1
    r = np.zeros((x.shape[0], out, out, x.shape[3]))
    for i, j in itertools.product(range(out), range(out)):
        r[:, i, j] = sum(xp[:, i * stride + t * dilation, j * stride + t * dilation] for t in range(k))
    return r


CASES = [
    # size, window, stride, dilation, pads, mode
    (1, 1, 1, 1, (0, 0), "constant"),
    (5, 3, 1, 1, (1, 1), "constant"),
    (8, 3, 1, 1, (1, 1), "constant"),
    (8, 3, 2, 1, (1, 1), "constant"),
    (9, 3, 3, 1, (0, 0), "constant"),
    (8, 3, 1, 2, (2, 2), "constant"),
    (7, 2, 1, 1, (0, 1), "constant"),
    (6, 5, 2, 1, (2, 1), "constant"),
    (5, 2, 2, 2, (1, 0), "constant"),
    (8, 3, 1, 1, (1, 1), "wrap"),
    (8, 5, 1, 1, (2, 2), "reflect"),
    (6, 3, 2, 1, (1, 1), "reflect"),
]


@pytest.mark.parametrize("n,k,stride,dilation,pad,mode", CASES)
def test_diagonal_window_sum_matches_loops_over_positions(n, k, stride, dilation, pad, mode):
    x = np.random.default_rng(n * 100 + k * 10 + stride).normal(size=(2, n, n, 3))
    got = _window_sum(jnp.asarray(x), (1, 2), k, stride, dilation, pad, mode)
    np.testing.assert_allclose(
        np.asarray(got), _diagonal_window_by_loops(x, k, stride, dilation, pad, mode), rtol=1e-12, atol=1e-12
    )


def test_diagonal_window_sum_refuses_axes_it_cannot_pair():
    with pytest.raises(ValueError, match="adjacent axes of one size"):
        _window_sum(jnp.ones((2, 4, 3, 4)), (1, 3), 3, 1, 1, (1, 1), "constant")


def _compiled_instructions(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"^\s+%\S+ = ", text, re.M))


def _cnn(layout, phi, readout):
    """A stack of ``phi`` + 3×3 convolutions in ``layout``, read out by ``readout``."""

    def build(depth):
        def ntk(x):
            k = L.conv(L.input_kernel(x, layout=layout), window_shape=(3, 3), fan_in=27)
            for _ in range(depth):
                k = L.conv(E.apply_elementwise(k, phi), window_shape=(3, 3), fan_in=9 * 64)
            return readout(k).ntk

        return ntk, jnp.ones((2, 6, 6, 3))

    return build


def _residual_cnn(depth):
    def ntk(x):
        k = L.conv(L.input_kernel(x, layout="full"), window_shape=(3, 3), fan_in=27)
        for _ in range(depth):
            branch = L.conv(E.apply_elementwise(k, "relu"), window_shape=(3, 3), fan_in=9 * 64)
            k = L.add(k, L.conv(E.apply_elementwise(branch, "relu"), window_shape=(3, 3), fan_in=9 * 64))
        return L.spatial_mean(k).ntk

    return ntk, jnp.ones((2, 6, 6, 3))


def _mlp(depth):
    def ntk(x):
        k = L.dense(L.input_kernel(x), fan_in=3)
        for _ in range(depth):
            k = L.dense(E.apply_elementwise(k, "relu"), fan_in=64)
        return k.ntk

    return ntk, jnp.ones((4, 3))


STACKS = {
    "pooling_cnn": _cnn("full", "relu", L.spatial_mean),
    "residual_cnn": _residual_cnn,
    "flatten_cnn": _cnn("diagonal", "gelu", L.flatten),
    "mlp": _mlp,
}


@pytest.mark.parametrize("stack", STACKS.values(), ids=STACKS.keys())
def test_deep_kernels_compile_to_programs_linear_in_depth(stack):
    """Each layer adds the same instructions to the compiled program. A convolution's window over
    position pairs written as slices of the padded covariance let XLA recompute every earlier layer
    inside each later one: the pooling CNN's program grew quadratically (1439, 4685, 16482
    instructions at depths 2, 4, 8) and ran 25× slower than a loop over the same layers at depth 21."""
    c2, c4, c8 = (_compiled_instructions(*stack(d)) for d in (2, 4, 8))
    per_layer_early, per_layer_late = (c4 - c2) / 2, (c8 - c4) / 4
    assert per_layer_late <= 1.25 * per_layer_early, (c2, c4, c8)

"""The Kernel record: the variances carried beside the per-input covariances in the 'full' layout.

A map computes ``var1``/``var2`` from the previous variances alone; the position diagonals of the
``cov1``/``cov2`` it computes from the full covariances are a second implementation of the same
numbers.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_adapters import flax as nflax
from ntk_adapters.infinite import elementwise as E
from ntk_adapters.infinite import infinite_kernel_fn
from ntk_adapters.infinite import layers as L
from ntk_adapters.infinite.fixed_arrays import add_fixed
from ntk_adapters.infinite.kernel import position_diagonal
from ntk_adapters.infinite.learned_arrays import add_array


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(3)
    return jnp.asarray(rng.standard_normal((3, 5, 4, 2))), jnp.asarray(rng.standard_normal((2, 5, 4, 2)))


def _steps():
    """Every map that computes the variances on its own, in a chain that reaches each from a
    kernel with non-trivial variances (non-zero channel means included, for the normalization)."""
    conv = dict(fan_in=2, window_shape=(3, 3), strides=(1, 1), padding="SAME", weight_var=1.5, bias_var=0.1)
    strided = {**conv, "strides": (2, 1), "dilation": (1, 2), "padding": "CIRCULAR"}
    return [
        ("conv", lambda k: L.conv(k, **conv)),
        ("positions scaled", lambda k: L.scale_positions(k, np.linspace(0.5, 1.5, 20).reshape(5, 4))),
        ("learned array added", lambda k: add_array(k, 0.3)),
        ("relu", lambda k: E.apply_elementwise(k, "relu")),
        ("strided dilated conv", lambda k: L.conv(k, **strided)),
        ("gelu", lambda k: E.apply_elementwise(k, "gelu")),
        ("dense", lambda k: L.dense(k, fan_in=4, weight_var=2.0, bias_var=0.3)),
        ("dropout", lambda k: L.dropout(k, 0.25)),
        ("channel affine", lambda k: L.channel_affine(k, np.array([0.5, 2.0]), np.array([0.1, -0.2]))),
        ("scale", lambda k: L.scale(k, 1.7)),
        ("add", lambda k: L.add(k, L.scale(k, 0.5))),
        ("concatenate", lambda k: L.concatenate([k, L.scale(k, 2.0)], channels=[3, 1])),
        ("conv, input dilation", lambda k: L.conv(k, **{**conv, "input_dilation": (2, 1), "padding": "VALID"})),
        ("fixed array added", lambda k: add_fixed(k, np.linspace(-1.0, 2.0, 18).reshape(3, 2, 3))),
        ("layer norm, centred", lambda k: L.layer_norm(k, epsilon=1e-3)),
        ("rms norm over positions", lambda k: L.rms_norm(k, epsilon=1e-3, over_spatial=True)),
        ("dense", lambda k: L.dense(k, fan_in=4)),
    ]


def test_each_map_carries_variances_equal_to_its_covariances_diagonals(pair):
    x1, x2 = pair
    k = L.input_kernel(x1, x2, layout="full")
    for name, step in [("input", lambda k: k)] + _steps():
        k = step(k)
        assert k.var1 is not None and k.var2 is not None, name
        assert k.var1.shape == (3, *k.spatial) and k.var2.shape == (2, *k.spatial), name
        np.testing.assert_allclose(k.var1, position_diagonal(k.cov1), rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(k.var2, position_diagonal(k.cov2), rtol=1e-12, atol=1e-14, err_msg=name)


def test_the_kernels_do_not_depend_on_the_carried_variances(pair):
    """The same chain with the variances dropped before every map (each then reads the covariances'
    diagonals) gives the same kernels: the variances replace those reads, nothing else."""
    x1, x2 = pair
    carried = dropped = L.input_kernel(x1, x2, layout="full")
    for name, step in _steps():
        carried, dropped = step(carried), step(dataclasses.replace(dropped, var1=None, var2=None))
        np.testing.assert_allclose(carried.nngp, dropped.nngp, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(carried.ntk, dropped.ntk, rtol=1e-12, atol=1e-14, err_msg=name)


def test_variances_of_a_kernel_with_itself_are_its_nngp_diagonal(pair):
    x1, _ = pair
    k = E.apply_elementwise(L.conv(L.input_kernel(x1, layout="full"), fan_in=2, window_shape=(3, 3)), "relu")
    assert not k.carries_variances and k.var1 is None
    v1, v2 = k.variances()
    expected = np.stack([position_diagonal(k.nngp[i, i][None])[0] for i in range(3)])
    assert v1 is v2
    np.testing.assert_array_equal(v1, expected)
    np.testing.assert_allclose(v1, position_diagonal(k.cov1), rtol=1e-12)


def test_replace_drops_stale_variances(pair):
    x1, x2 = pair
    k = L.input_kernel(x1, x2, layout="full")
    assert k.replace(nngp=2 * k.nngp).var1 is k.var1  # the covariances did not change
    changed = k.replace(cov1=2 * k.cov1)
    assert changed.var1 is None and changed.var2 is k.var2
    np.testing.assert_allclose(changed.variances()[0], 2 * k.var1, rtol=1e-15)
    assert L.to_diagonal(k).var1 is None and L.spatial_mean(k).var2 is None


class _PoolingCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(1)(x.mean((1, 2)))


def test_compiled_kernel_function_leaves_out_the_per_input_covariances(pair):
    """For ``x1 ≠ x2`` of a model that reads the per-input covariances only at their diagonals, the
    compiled program of ``get='ntk'`` holds no ``(N, H, H', W, W')`` array at all, and the kernel
    function's own compiled call returns the NTK alone; asking for ``cov1`` brings it back (the
    check sees such arrays)."""
    x1, x2 = pair
    kernel_fn = infinite_kernel_fn(nflax.adapt(_PoolingCNN(), None, x1[:2]))

    def program(get):
        return jax.jit(lambda a, b: kernel_fn(a, b, get=get)).lower(x1, x2).compile().as_text()

    def has_array(text, n):
        return re.search(rf"f64\[{n},5,5,4,4\]", text) is not None

    def returned_shapes(get):
        (call,) = jax.make_jaxpr(lambda a, b: kernel_fn(a, b, get=get))(x1, x2).jaxpr.eqns
        return sorted(v.aval.shape for v in call.outvars)

    assert has_array(program("cov1"), 3)
    assert has_array(program(("nngp", "cov2")), 2)
    ntk_only = program("ntk")
    assert not has_array(ntk_only, 3) and not has_array(ntk_only, 2)
    assert returned_shapes("ntk") == [(3, 2)]
    assert returned_shapes(("ntk", "cov1")) == [(3,), (3, 2)]  # the output's layout has no positions
    np.testing.assert_allclose(kernel_fn(x1, x2, get="ntk"), kernel_fn(x1, x2, get="kernel").ntk, rtol=1e-12)
    # the per-input variances asked for alone are those of each input with itself
    cov1, cov2 = kernel_fn(x1, x2, get=("cov1", "cov2"))
    np.testing.assert_allclose(cov1, np.diag(kernel_fn(x1, get="nngp")), rtol=1e-12)
    np.testing.assert_allclose(cov2, np.diag(kernel_fn(x2, get="nngp")), rtol=1e-12)

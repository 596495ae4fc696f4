"""Exact checks of the linear rules (convolutions, pooling, flatten) against the real modules.

A network that is linear in its weights, ``f(x) = J(x) θ``, has ``E_θ[f(x1) f(x2)ᵀ] = Var(W)·J_W(x1)
J_W(x2)ᵀ`` and an NTK ``J(x1) J(x2)ᵀ`` that does not depend on θ, so the engine must equal the
Jacobians of the real Flax / Haiku module exactly, at any width, with no Monte Carlo.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import infinite_kernel_fn


def _jacobian_kernels(model, x, weight_names):
    """(Var-weighted weight-Jacobian Gram, full NTK) averaged over all output entries."""

    def flat(p):
        return model.apply_fn(p, x).reshape(x.shape[0], -1)

    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.params)
    jac = jax.jacrev(flat)(params)
    o = flat(params).shape[1]
    ntk = 0.0
    nngp = 0.0
    for path, j in jax.tree_util.tree_leaves_with_path(jac):
        g = jnp.einsum("ia...,ja...->ij", j, j) / o
        ntk = ntk + g
        name = jax.tree_util.keystr(path)
        for key, var in weight_names.items():
            if key in name:
                nngp = nngp + var * g
    return np.asarray(nngp), np.asarray(ntk)


def _flax_single(conv, head):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return head(conv()(x))

    return Net()


CASES = [
    ("conv2d_same_gap", (2, 6, 6, 3), lambda: nn.Conv(5, (3, 3)), lambda h: jnp.mean(h, axis=(1, 2))),
    (
        "conv2d_valid_stride_flatten",
        (2, 7, 7, 2),
        lambda: nn.Conv(4, (3, 2), strides=(2, 1), padding="VALID"),
        lambda h: h.reshape((h.shape[0], -1)),
    ),
    (
        "conv2d_circular_dilated_avgpool",
        (2, 6, 6, 2),
        lambda: nn.Conv(4, (3, 3), padding="CIRCULAR", kernel_dilation=2),
        lambda h: jnp.sum(nn.avg_pool(h, (2, 2), strides=(2, 2)), axis=(1, 2)),
    ),
    (
        "conv1d_same_sumpool",
        (2, 9, 2),
        lambda: nn.Conv(4, (3,)),
        lambda h: nn.pooling.pool(h, 0.0, jax.lax.add, (3,), (2,), "VALID").reshape((h.shape[0], -1)),
    ),
    (
        "conv3d_same_stride_gap",
        (2, 4, 4, 4, 1),
        lambda: nn.Conv(3, (2, 2, 2), strides=2),
        lambda h: jnp.mean(h, axis=(1, 2, 3)),
    ),
    ("conv2d_full_output", (2, 5, 5, 2), lambda: nn.Conv(3, (3, 3), padding="VALID"), lambda h: h),
    (
        "conv2d_avgpool_same_without_padding_counts",
        (2, 5, 5, 2),
        lambda: nn.Conv(3, (3, 3)),
        lambda h: nn.avg_pool(h, (3, 3), strides=(2, 2), padding="SAME", count_include_pad=False).reshape(
            (h.shape[0], -1)
        ),
    ),
]


@pytest.mark.parametrize("name,shape,conv,head", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("layout", ["auto", "full"])
def test_flax_linear_rules_exact(name, shape, conv, head, layout):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    model = nflax.adapt(_flax_single(conv, head), None, x)
    k = infinite_kernel_fn(model, spatial_layout=layout)(x)
    c_in = shape[-1]
    window = model.params["Conv_0"]["kernel"].shape[:-2]
    var_w = 1.0 / (c_in * np.prod(window))  # lecun_normal: Var(W) = 1/fan_in exactly
    nngp, ntk = _jacobian_kernels(model, x, {"kernel": var_w})
    nngp_k, ntk_k = np.asarray(k.nngp), np.asarray(k.ntk)
    if nngp_k.ndim > 2:  # a model with spatial outputs: average the per-position kernels
        if layout == "full" or nngp_k.ndim == 6:
            nngp_k = np.einsum("ijaabb->ij", nngp_k) / (nngp_k.shape[2] * nngp_k.shape[4])
            ntk_k = np.einsum("ijaabb->ij", ntk_k) / (ntk_k.shape[2] * ntk_k.shape[4])
        else:
            nngp_k, ntk_k = nngp_k.mean((2, 3)), ntk_k.mean((2, 3))
    np.testing.assert_allclose(nngp_k, nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ntk_k, ntk, rtol=1e-10, atol=1e-12)


HAIKU_CASES = [
    ("conv2d_same_gap", (2, 6, 6, 3), lambda h: jnp.mean(hk.Conv2D(4, 3)(h), axis=(1, 2))),
    (
        "conv1d_valid_stride_dilated",
        (2, 11, 2),
        lambda h: hk.Conv1D(3, 3, stride=2, rate=2, padding="VALID")(h).reshape((h.shape[0], -1)),
    ),
    ("conv3d_same", (2, 4, 4, 4, 1), lambda h: jnp.sum(hk.Conv3D(3, 2)(h), axis=(1, 2, 3))),
    (
        "conv2d_avgpool",
        (2, 6, 6, 2),
        lambda h: hk.avg_pool(hk.Conv2D(3, 3)(h), (1, 2, 2, 1), (1, 2, 2, 1), "VALID").reshape((h.shape[0], -1)),
    ),
    # 'SAME' pooling divides each position by its own window count
    (
        "conv2d_avgpool_same",
        (2, 5, 5, 2),
        lambda h: hk.avg_pool(hk.Conv2D(3, 3)(h), (1, 3, 3, 1), (1, 2, 2, 1), "SAME").reshape((h.shape[0], -1)),
    ),
    (
        "conv2d_avgpool_same_gap",
        (2, 5, 5, 2),
        lambda h: jnp.mean(hk.avg_pool(hk.Conv2D(3, 3)(h), (1, 3, 3, 1), (1, 1, 1, 1), "SAME"), axis=(1, 2)),
    ),
]


@pytest.mark.parametrize("name,shape,fn", HAIKU_CASES, ids=[c[0] for c in HAIKU_CASES])
def test_haiku_linear_rules_exact(name, shape, fn):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    model = nhaiku.adapt(hk.without_apply_rng(hk.transform(fn)), None, x)
    k = infinite_kernel_fn(model)(x)
    (w,) = [v["w"] for v in model.params.values()]
    fan_in = np.prod(w.shape[:-1])
    # Haiku's default TruncatedNormal(1/sqrt(fan_in)) at ±2σ: Var = 0.7737413/fan_in (no correction)
    var_w = (1 - 4 * np.exp(-2.0) / np.sqrt(2 * np.pi) / math.erf(np.sqrt(2.0))) / fan_in
    nngp, ntk = _jacobian_kernels(model, x, {"'w'": var_w})
    np.testing.assert_allclose(k.nngp, nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10, atol=1e-12)

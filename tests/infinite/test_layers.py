"""Layer kernel maps against exact expectations computed through the real Flax / lax operations.

Every linear layer is linear in its weights, so the expectation over random weights can be
computed exactly without sampling: apply the real layer (``flax.linen.Conv``, ``nn.avg_pool``,
``jnp.mean``, ``reshape``) to the input features with an identity filter bank, and take the
channel inner products of the results. Nonlinear steps (LayerNorm, ReLU between convolutions,
dropout masks) are checked by Monte Carlo over wide random layers and sampled masks, and a loop
over positions gives a second, independent implementation of the window average.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_adapters.infinite import elementwise as E
from ntk_adapters.infinite import layers as L
from ntk_adapters.infinite.kernel import Kernel

LETTERS = "hwd"


def _pair_products(f1, f2, full):
    """``Σ_c f1[x, p, c] f2[y, p', c] / C`` as ``(N1, N2, *pairs)`` via one matrix product."""
    n1, *sp, c = f1.shape
    n2 = f2.shape[0]
    d = len(sp)
    g = np.tensordot(f1.reshape(n1, -1, c), f2.reshape(n2, -1, c), axes=([2], [2])) / c  # (N1, P, N2, P')
    g = g.reshape([n1, *sp, n2, *sp])
    if full:  # (N1, N2, h, H, w, W)
        order = [0, d + 1] + [a for i in range(d) for a in (1 + i, d + 2 + i)]
        return g.transpose(order)
    # equal positions only: (N1, N2, *sp)
    g = g.reshape(n1, -1, n2, int(np.prod(sp, dtype=int)))
    return np.einsum("apbp->abp", g).reshape([n1, n2, *sp])


def _self_products(f, full):
    n, *sp, c = f.shape
    if full:
        g = np.stack([_pair_products(f[i : i + 1], f[i : i + 1], True)[0, 0] for i in range(n)])
        return g
    return (f * f).mean(-1)


def feature_kernel(f1, f2=None, layout="full", gaussian=False):
    """Exact kernel of explicit features ``(N, *spatial, C)``: channel-averaged inner products."""
    same = f2 is None
    f2 = f1 if same else f2
    full = layout == "full"
    nngp = _pair_products(f1, f2, full)
    return Kernel(
        nngp=jnp.asarray(nngp),
        ntk=jnp.zeros(nngp.shape),
        cov1=jnp.asarray(_self_products(f1, full)),
        cov2=jnp.asarray(_self_products(f2, full)),
        layout=layout,
        is_gaussian=gaussian,
        same_inputs=same,
    )


def identity_conv_patches(x, window, strides, padding, dilation):
    """The real ``flax.linen.Conv`` with an identity filter bank: every window element as a channel."""
    c = x.shape[-1]
    k = math.prod(window)
    bank = np.eye(k * c).reshape(*window, c, k * c)
    conv = nn.Conv(
        features=k * c, kernel_size=window, strides=strides, padding=padding, kernel_dilation=dilation, use_bias=False
    )
    return np.asarray(conv.apply({"params": {"kernel": jnp.asarray(bank)}}, jnp.asarray(x)))


CONV_CASES = [
    # (input shape (N, *spatial, C), window, strides, padding, dilation)
    ((2, 7, 2), (3,), (2,), "SAME", (1,)),
    ((2, 7, 2), (3,), (1,), "CIRCULAR", (2,)),
    ((2, 6, 2), (2,), (1,), "CAUSAL", (1,)),
    ((2, 5, 4, 2), (3, 3), (1, 1), "SAME", (1, 1)),
    ((2, 6, 5, 2), (3, 2), (2, 1), "VALID", (1, 2)),
    ((2, 5, 4, 2), (3, 3), (1, 2), "CIRCULAR", (1, 1)),
    ((2, 5, 5, 1), (2, 3), (2, 2), "SAME", (2, 1)),
    ((2, 5, 4, 2), (3, 2), (1, 1), ((1, 0), (2, 1)), (1, 1)),
    ((2, 5, 4, 2), (3, 3), (1, 1), "REFLECT", (1, 1)),
    ((2, 4, 3, 3, 2), (3, 2, 2), (1, 2, 1), "SAME", (1, 1, 1)),
]


@pytest.mark.parametrize("shape,window,strides,padding,dilation", CONV_CASES)
def test_conv_first_layer_exact(shape, window, strides, padding, dilation):
    """One conv layer on the raw input: nngp and ntk are deterministic functions of the patches."""
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal(shape)
    x2 = rng.standard_normal((3,) + shape[1:])
    c = shape[-1]
    k = math.prod(window)
    weight_var, bias_var = 1.7, 0.3
    p1 = identity_conv_patches(x1, window, strides, padding, dilation)
    p2 = identity_conv_patches(x2, window, strides, padding, dilation)
    # z = Σ_j W_j P_j + b with Var(W_j) = σw²/(C k): E[z z'] = σw²/(C k) P·P' + σb²; ∂z/∂W_j = P_j, ∂z/∂b = 1.
    ref = feature_kernel(p1, p2)
    ref_nngp = weight_var * ref.nngp + bias_var
    ref_ntk = ref.nngp * (k * c) + 1.0
    for layout in ("full", "diagonal"):
        kin = feature_kernel(x1, x2, layout=layout)
        out = L.conv(
            kin,
            window_shape=window,
            fan_in=c * k,
            strides=strides,
            padding=padding,
            dilation=dilation,
            weight_var=weight_var,
            bias_var=bias_var,
        )
        exp_nngp, exp_ntk, exp_cov1 = ref_nngp, ref_ntk, weight_var * ref.cov1 + bias_var
        if layout == "diagonal":
            d = len(window)
            sp = LETTERS[:d]
            pairs = "".join(a + a for a in sp)
            exp_nngp = np.einsum(f"xy{pairs}->xy{sp}", np.asarray(ref_nngp))
            exp_ntk = np.einsum(f"xy{pairs}->xy{sp}", np.asarray(ref_ntk))
            exp_cov1 = np.einsum(f"x{pairs}->x{sp}", np.asarray(exp_cov1))
        np.testing.assert_allclose(out.nngp, exp_nngp, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out.ntk, exp_ntk, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out.cov1, exp_cov1, rtol=1e-10, atol=1e-12)
        assert out.is_gaussian and out.layout == layout


def _loop_window_average(K, n_in, window, stride, dilation, pads, mode, out_n):
    """Second implementation of A for one spatial dimension of a (P, P') covariance, by loops."""
    lo, _ = pads
    res = np.zeros((out_n, out_n))
    for i in range(out_n):
        for j in range(out_n):
            total = 0.0
            for t in range(window):
                a = i * stride + t * dilation - lo
                b = j * stride + t * dilation - lo
                if mode == "wrap":
                    a, b = a % n_in, b % n_in
                elif not (0 <= a < n_in and 0 <= b < n_in):
                    continue
                total += K[a, b]
            res[i, j] = total / window
    return res


@pytest.mark.parametrize(
    "padding,stride,dilation", [("SAME", 1, 1), ("VALID", 2, 1), ("CIRCULAR", 2, 2), ("SAME", 3, 2)]
)
def test_conv_propagates_ntk_like_loop_reference(padding, stride, dilation):
    """ntk ← fan_in·A(nngp) + σw²·A(ntk) + 1 for an arbitrary (not input-derived) kernel, 1-D."""
    rng = np.random.default_rng(1)
    n_in, window = 7, 3
    a = rng.standard_normal((n_in, 5))
    K = a @ a.T / 5
    b = rng.standard_normal((n_in, 5))
    T = b @ b.T / 5 + 0.1
    kin = Kernel(
        nngp=jnp.asarray(K)[None, None],
        ntk=jnp.asarray(T)[None, None],
        cov1=jnp.asarray(K)[None],
        cov2=jnp.asarray(K)[None],
        layout="full",
        is_gaussian=True,
        same_inputs=True,
    )
    span = (window - 1) * dilation + 1
    if padding == "SAME":
        out_n = -(-n_in // stride)
        total = max((out_n - 1) * stride + span - n_in, 0)
        pads, mode = (total // 2, total - total // 2), "constant"
    elif padding == "VALID":
        out_n = (n_in - span) // stride + 1
        pads, mode = (0, 0), "constant"
    else:
        pads, mode = ((span - 1) // 2, span // 2), "wrap"
        out_n = (n_in + span - 1 - span) // stride + 1
    out = L.conv(
        kin,
        window_shape=(window,),
        fan_in=4 * window,
        strides=stride,
        padding=padding,
        dilation=dilation,
        weight_var=2.0,
        bias_var=0.5,
    )
    aK = _loop_window_average(K, n_in, window, stride, dilation, pads, mode, out_n)
    aT = _loop_window_average(T, n_in, window, stride, dilation, pads, mode, out_n)
    np.testing.assert_allclose(out.nngp[0, 0], 2.0 * aK + 0.5, rtol=1e-12)
    np.testing.assert_allclose(out.ntk[0, 0], 4 * window * aK + 2.0 * aT + 1.0, rtol=1e-12)
    out_ntkp = L.conv(
        kin,
        window_shape=(window,),
        fan_in=4 * window,
        strides=stride,
        padding=padding,
        dilation=dilation,
        weight_var=2.0,
        bias_var=0.5,
        parameterization="ntk",
    )
    np.testing.assert_allclose(out_ntkp.ntk[0, 0], 2.0 * aK + 0.5 + 2.0 * aT, rtol=1e-12)


def test_conv_relu_monte_carlo():
    """ReLU after a convolution, 'full' layout, vs 20000 random filters applied with lax (2-D)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 4, 3))
    width = 20000
    w1 = rng.standard_normal((3, 3, 3, width)) * math.sqrt(2.0 / 27)
    h = jax.lax.conv_general_dilated(
        jnp.asarray(x), jnp.asarray(w1), (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = np.maximum(np.asarray(h), 0)
    emp = feature_kernel(y)
    k = feature_kernel(x, layout="full")
    k = L.conv(k, window_shape=(3, 3), fan_in=27, strides=(2, 1), padding="SAME", has_bias=False, weight_var=2.0)
    k = E.apply_elementwise(k, "relu")
    assert k.nngp.shape == emp.nngp.shape
    scale = float(np.abs(emp.nngp).max())
    np.testing.assert_allclose(k.nngp, emp.nngp, atol=0.03 * scale)
    np.testing.assert_allclose(k.cov1, emp.cov1, atol=0.03 * scale)


def test_diagonal_and_full_layouts_agree_through_a_network():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 6, 5, 2))

    def net(k):
        k = L.conv(k, window_shape=(3, 3), fan_in=18, padding="SAME", weight_var=2.0, bias_var=0.1)
        k = E.apply_elementwise(k, "relu")
        k = L.conv(k, window_shape=(2, 3), fan_in=6 * 64, strides=(2, 1), dilation=(1, 2), padding="CIRCULAR")
        k = E.apply_elementwise(k, "erf")
        k = L.layer_norm(L.conv(k, window_shape=(1, 1), fan_in=64, padding="VALID"))
        return k

    full = L.to_diagonal(net(feature_kernel(x, layout="full")))
    diag = net(feature_kernel(x, layout="diagonal"))
    for f in ("nngp", "ntk", "cov1", "cov2"):
        np.testing.assert_allclose(getattr(full, f), getattr(diag, f), rtol=1e-10, atol=1e-12)
    flat_full = L.flatten(net(feature_kernel(x, layout="full")))
    flat_diag = L.flatten(diag)
    np.testing.assert_allclose(flat_full.nngp, flat_diag.nngp, rtol=1e-10)
    assert flat_full.layout == "none" and not flat_full.is_gaussian


@pytest.mark.parametrize(
    "window,strides,padding,count_include_pad",
    [
        ((2, 2), (2, 2), "VALID", True),
        ((3, 2), (1, 1), "SAME", True),
        ((3, 3), (2, 1), "SAME", False),
        ((2, 3), (1, 2), ((1, 1), (0, 2)), False),
    ],
)
def test_avg_pool_matches_flax(window, strides, padding, count_include_pad):
    rng = np.random.default_rng(4)
    x1 = rng.standard_normal((2, 5, 6, 3))
    x2 = rng.standard_normal((3, 5, 6, 3))
    k = feature_kernel(x1, x2)
    k = k.replace(ntk=2.0 * k.nngp)
    out = L.avg_pool(k, window, strides=strides, padding=padding, count_include_pad=count_include_pad)
    pool = lambda x: np.asarray(
        nn.avg_pool(
            jnp.asarray(x),
            window,
            strides=strides,
            padding=padding,  # noqa: E731
            count_include_pad=count_include_pad,
        )
    )
    ref = feature_kernel(pool(x1), pool(x2))
    np.testing.assert_allclose(out.nngp, ref.nngp, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out.ntk, 2.0 * ref.nngp, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out.cov1, ref.cov1, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out.cov2, ref.cov2, rtol=1e-10, atol=1e-13)


def test_sum_pool_matches_reduce_window():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 3))
    k = feature_kernel(x)
    out = L.sum_pool(k, (3,), strides=(2,), padding="SAME")
    pooled = np.asarray(jax.lax.reduce_window(jnp.asarray(x), 0.0, jax.lax.add, (1, 3, 1), (1, 2, 1), "SAME"))
    np.testing.assert_allclose(out.nngp, feature_kernel(pooled).nngp, rtol=1e-10)


def test_pooling_needs_full_layout():
    k = feature_kernel(np.ones((2, 4, 4, 1)), layout="diagonal")
    with pytest.raises(ValueError, match="layout 'full'"):
        L.avg_pool(k, (2, 2))
    with pytest.raises(ValueError, match="layout 'full'"):
        L.spatial_mean(k)


def test_spatial_mean_sum_and_flatten_match_features():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 5, 2))
    k = feature_kernel(x)
    g = L.spatial_mean(k)
    assert g.layout == "none"
    np.testing.assert_allclose(g.nngp, feature_kernel(x.mean((1, 2)), layout="none").nngp, rtol=1e-10)
    np.testing.assert_allclose(g.cov1, feature_kernel(x.mean((1, 2)), layout="none").cov1, rtol=1e-10)
    s = L.spatial_sum(k, axes=(1, 2))
    np.testing.assert_allclose(s.nngp, feature_kernel(x.sum((1, 2)), layout="none").nngp, rtol=1e-10)
    part = L.spatial_mean(k, axes=-2)  # mean over W of (N, H, W, C)
    assert part.layout == "full"
    np.testing.assert_allclose(part.nngp, feature_kernel(x.mean(2)).nngp, rtol=1e-10)
    flat = L.flatten(k)
    xf = x.reshape(3, -1)
    np.testing.assert_allclose(flat.nngp, xf @ xf.T / xf.shape[1], rtol=1e-10)
    np.testing.assert_allclose(flat.cov1, (xf * xf).mean(1), rtol=1e-10)
    with pytest.raises(ValueError, match="not a spatial axis"):
        L.spatial_mean(k, axes=3)


def test_dense_formulas_and_monte_carlo():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 6))
    k = feature_kernel(x, layout="none")
    k = k.replace(ntk=jnp.asarray(np.full((3, 3), 0.25)))
    out = L.dense(k, fan_in=6, weight_var=2.0, bias_var=0.5)
    K = x @ x.T / 6
    np.testing.assert_allclose(out.nngp, 2.0 * K + 0.5, rtol=1e-12)
    np.testing.assert_allclose(out.ntk, 6 * K + 2.0 * 0.25 + 1.0, rtol=1e-12)
    out = L.dense(k, fan_in=6, weight_var=2.0, bias_var=0.5, parameterization="ntk")
    np.testing.assert_allclose(out.ntk, 2.0 * K + 0.5 + 2.0 * 0.25, rtol=1e-12)
    out = L.dense(k, fan_in=6, weight_var=2.0, bias_var=0.5, has_bias=False)
    np.testing.assert_allclose(out.nngp, 2.0 * K, rtol=1e-12)
    np.testing.assert_allclose(out.ntk, 6 * K + 0.5, rtol=1e-12)
    # Monte Carlo over 100k random units: z = x W + b.
    n = 100_000
    w = rng.standard_normal((6, n)) * math.sqrt(2.0 / 6)
    b = rng.standard_normal(n) * math.sqrt(0.5)
    z = x @ w + b
    out = L.dense(k, fan_in=6, weight_var=2.0, bias_var=0.5)
    np.testing.assert_allclose(out.nngp, z @ z.T / n, atol=0.05)
    with pytest.raises(ValueError, match="parameterization"):
        L.dense(k, fan_in=6, parameterization="mup")


def _layer_norm(h, eps):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + eps)


def test_layer_norm_nngp_and_ntk_monte_carlo():
    """x → Dense(n) → LayerNorm(γ, β) → readout: NTK w.r.t. the Dense and LayerNorm parameters."""
    rng = np.random.default_rng(8)
    d, n, eps = 4, 8192, 1e-3
    x = jnp.asarray(rng.standard_normal((3, d)) * np.array([[1.0], [0.5], [2.0]]))
    params = dict(
        w=jnp.asarray(rng.standard_normal((d, n)) / math.sqrt(d)), b=jnp.zeros(n), g=jnp.full(n, 1.5), beta=jnp.zeros(n)
    )
    v = jnp.asarray(rng.choice([-1.0, 1.0], n))  # ±1 readout: Σ v²/n = 1 exactly, cross terms average out

    def ln_out(p, x):
        return _layer_norm(x @ p["w"] + p["b"], eps) * p["g"] + p["beta"]

    y = ln_out(params, x)
    emp_nngp = np.asarray(y @ y.T / n)
    f = lambda p, x: ln_out(p, x) @ v / math.sqrt(n)  # noqa: E731
    jac = jax.jacrev(f)(params, x)
    emp_ntk = sum(np.asarray(j).reshape(3, -1) @ np.asarray(j).reshape(3, -1).T for j in jax.tree_util.tree_leaves(jac))

    k = feature_kernel(np.asarray(x)[:, None, :], layout="diagonal")  # one position, to cover spatial layouts
    k = L.dense(k, fan_in=d, bias_var=0.0)
    k = L.layer_norm(k, epsilon=eps, scale_init=1.5, bias_init=0.0)
    np.testing.assert_allclose(k.nngp[..., 0], emp_nngp, atol=0.03)
    np.testing.assert_allclose(k.ntk[..., 0], emp_ntk, rtol=0.02, atol=0.05)
    assert k.is_gaussian


def test_layer_norm_full_layout_and_rms_norm():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 4))
    k = feature_kernel(x, gaussian=True)
    k = k.replace(ntk=k.nngp)
    out = L.layer_norm(k, epsilon=0.0, use_scale=False, use_bias=False)
    q = (x * x).mean(-1)  # per-position variances (N, H)
    ref = np.einsum("ahc,bHc->abhH", x, x) / 4 / np.sqrt(q[:, None, :, None] * q[None, :, None, :])
    np.testing.assert_allclose(out.nngp, ref, rtol=1e-10)
    np.testing.assert_allclose(out.ntk, ref, rtol=1e-10)
    np.testing.assert_allclose(np.einsum("ahh->ah", np.asarray(out.cov1)), 1.0, rtol=1e-10)
    rms = L.rms_norm(k.replace(is_gaussian=False), epsilon=0.0, scale_init=2.0)
    np.testing.assert_allclose(rms.nngp, 4.0 * ref, rtol=1e-10)
    np.testing.assert_allclose(rms.ntk, 4.0 * ref + ref, rtol=1e-10)
    with pytest.raises(ValueError, match="zero-mean Gaussian"):
        L.layer_norm(k.replace(is_gaussian=False))
    over = L.layer_norm(k, epsilon=0.0, use_scale=False, use_bias=False, over_spatial=True)
    qm = q.mean(1)
    expected = np.einsum("ahc,bHc->abhH", x, x) / 4 / np.sqrt(qm[:, None, None, None] * qm[None, :, None, None])
    np.testing.assert_allclose(over.nngp, expected, rtol=1e-10)


@pytest.mark.parametrize("layout", ["none", "diagonal", "full"])
def test_dropout_monte_carlo(layout):
    rng = np.random.default_rng(10)
    rate = 0.3
    shape = (3, 4) if layout == "none" else (3, 2, 4)
    x = rng.standard_normal(shape)
    k = feature_kernel(x, layout=layout if layout != "none" else "full")
    if layout == "none":
        k = Kernel(
            nngp=jnp.asarray(x @ x.T / 4),
            ntk=jnp.asarray(x @ x.T / 4),
            cov1=jnp.asarray((x * x).mean(1)),
            cov2=jnp.asarray((x * x).mean(1)),
            layout="none",
            same_inputs=True,
        )
    else:
        k = k.replace(ntk=k.nngp)
    out = L.dropout(k, rate)
    # Monte Carlo: 20000 independent mask draws of every element (channels are the 4 features).
    reps = 20000
    masks = rng.random((reps,) + shape) >= rate
    y = masks * x / (1 - rate)
    if layout == "none":
        emp = np.einsum("rac,rbc->ab", y, y) / (4 * reps)
    elif layout == "diagonal":
        emp = np.einsum("rahc,rbhc->abh", y, y) / (4 * reps)
    else:
        emp = np.einsum("rahc,rbHc->abhH", y, y) / (4 * reps)
    np.testing.assert_allclose(out.nngp, emp, atol=0.05)
    np.testing.assert_allclose(out.ntk, out.nngp, rtol=1e-12)
    if layout == "full":
        np.testing.assert_allclose(out.cov1, np.einsum("rahc,raHc->ahH", y, y) / (4 * reps), atol=0.05)
    assert not out.is_gaussian
    assert L.dropout(k, rate, deterministic=True) is k
    # Two different batches: masks independent, kernel unchanged.
    k2 = k.replace(same_inputs=False)
    np.testing.assert_allclose(L.dropout(k2, rate).nngp, k2.nngp)


def test_scale_concatenate_add():
    rng = np.random.default_rng(11)
    a = rng.standard_normal((3, 5, 4))
    b = rng.standard_normal((3, 5, 2))
    ka, kb = feature_kernel(a, gaussian=True), feature_kernel(b, gaussian=True)
    cat = L.concatenate([ka, kb], channels=[4, 2])
    np.testing.assert_allclose(cat.nngp, feature_kernel(np.concatenate([a, b], -1)).nngp, rtol=1e-12)
    np.testing.assert_allclose(cat.cov1, feature_kernel(np.concatenate([a, b], -1)).cov1, rtol=1e-12)
    assert not cat.is_gaussian
    sc = L.scale(ka, -3.0)
    np.testing.assert_allclose(sc.nngp, feature_kernel(-3.0 * a).nngp, rtol=1e-12)
    assert sc.is_gaussian
    s = L.add(ka, kb)
    np.testing.assert_allclose(s.nngp, ka.nngp + kb.nngp, rtol=1e-12)
    assert s.is_gaussian
    # Independent branches: the kernel of a·u + b·v with independent unit-variance mixing weights.
    n = 200_000
    wa = rng.standard_normal((4, n)) / 2
    wb = rng.standard_normal((2, n)) / math.sqrt(2)
    z = np.einsum("ahc,cn->ahn", a, wa) + np.einsum("ahc,cn->ahn", b, wb)
    summed = L.add(L.dense(ka, fan_in=4, has_bias=False), L.dense(kb, fan_in=2, has_bias=False))
    np.testing.assert_allclose(summed.nngp, np.einsum("ahn,bHn->abhH", z, z) / n, atol=0.05)
    with pytest.raises(ValueError, match="differ"):
        L.add(ka, feature_kernel(a, layout="diagonal"))


def test_input_kernel_and_to_diagonal():
    rng = np.random.default_rng(12)
    x1 = rng.standard_normal((2, 3, 4, 5))
    x2 = rng.standard_normal((3, 3, 4, 5))
    full = L.input_kernel(jnp.asarray(x1), jnp.asarray(x2), layout="full")
    ref = feature_kernel(x1, x2)
    np.testing.assert_allclose(full.nngp, ref.nngp, rtol=1e-12)
    np.testing.assert_allclose(full.cov2, ref.cov2, rtol=1e-12)
    assert full.spatial == (3, 4) and not full.is_gaussian and not full.same_inputs
    diag = L.input_kernel(jnp.asarray(x1), jnp.asarray(x2), layout="diagonal")
    td = L.to_diagonal(full)
    for f in ("nngp", "cov1", "cov2"):
        np.testing.assert_allclose(getattr(td, f), getattr(diag, f), rtol=1e-12)
    assert td.layout == "diagonal"
    with pytest.raises(ValueError, match="layout 'none' needs inputs"):
        L.input_kernel(jnp.asarray(x1))


def test_conv_jits_and_errors():
    x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 6, 6, 2)))
    f = jax.jit(lambda x: L.conv(L.input_kernel(x, layout="full"), window_shape=(3, 3), fan_in=18, strides=2).nngp)
    assert f(x).shape == (2, 2, 3, 3, 3, 3)
    k = L.input_kernel(x, layout="diagonal")
    with pytest.raises(ValueError, match="one entry per spatial dimension"):
        L.conv(k, window_shape=(3,), fan_in=6)
    with pytest.raises(ValueError, match="padding"):
        L.conv(k, window_shape=(3, 3), fan_in=18, padding="BOGUS")
    with pytest.raises(ValueError, match="does not fit"):
        L.conv(k, window_shape=(7, 7), fan_in=98, padding="VALID")
    with pytest.raises(ValueError, match="needs spatial axes"):
        L.conv(L.input_kernel(x[:, 0, 0]), window_shape=(3,), fan_in=6)

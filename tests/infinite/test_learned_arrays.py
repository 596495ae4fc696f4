"""Learned parameter arrays added to a value entry by entry (learned positional embeddings).

``h + P`` with ``P`` a parameter of the value's per-example shape ``(T, D)``, i.i.d. entries of
variance ``v`` shared by every example: the NNGP gains ``v·δ(t, t')`` for every pair of examples and
the NTK ``δ(t, t')`` (``∂(h + P)/∂P = 1``). Checked against closed forms written here, against
Monte Carlo over real Haiku initializations (the error falling as the width grows), and for the
refusals of everything that is not the parameter itself.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.learned_arrays import add_array, carry

V, T, D, CIN = 5, 3, 6, 4
IDS = jnp.array([[1, 2, 3], [3, 2, 1], [0, 0, 4], [2, 2, 2]], jnp.int32)
X = jax.random.normal(jax.random.PRNGKey(7), (4, T, CIN), jnp.float64)

# Variance of a standard normal truncated at ±2 (Haiku's TruncatedNormal does not rescale it).
_PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
_TRUNC = 1.0 - 4.0 * _PHI2 / math.erf(2.0 / math.sqrt(2.0))
INITS = {
    "trunc0.02": (hk.initializers.TruncatedNormal(0.02), 0.02**2 * _TRUNC),
    "normal0.5": (hk.initializers.RandomNormal(0.5), 0.25),
}
S2_B1 = 0.09  # variance of the first Linear's bias, RandomNormal(0.3)
S2_B = 0.25  # variance of the readout's bias, RandomNormal(0.5)


def _net(kind, pos_init, width=D, extra=None):
    """``Embed(ids)`` or ``Linear(x)`` (width ``width``) + ``pos`` (T, width) -> Linear(1) at every position."""

    def f(x):
        if kind == "embed":
            h = hk.Embed(V, width, w_init=hk.initializers.RandomNormal(1.0))(x)
        else:
            h = hk.Linear(width, w_init=hk.initializers.RandomNormal(1.0), b_init=hk.initializers.RandomNormal(0.3))(x)
        pos = hk.get_parameter("pos", [T, width], init=pos_init)
        h = h + pos if extra is None else extra(h, pos)
        return hk.Linear(1, w_init=hk.initializers.RandomNormal(1.0), b_init=hk.initializers.RandomNormal(0.5))(h)

    return hk.without_apply_rng(hk.transform(f))


def _by_hand(kind, x1, x2, v, width=D):
    """Full-layout NNGP and NTK ``(N1, N2, T, T)`` of ``_net`` in float64."""
    if kind == "embed":
        a, b = np.asarray(x1), np.asarray(x2)
        same = (a[:, None, :, None] == b[None, :, None, :]).astype(float)
        k1, t1 = 1.0 * same, same  # table variance 1; ∂h/∂E = one-hot
    else:
        a, b = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
        dots = np.einsum("atc,bsc->abts", a, b)
        # σw² = CIN·1 on x·x'/CIN; the bias is shared by every position (all pairs)
        k1, t1 = dots + S2_B1, dots + 1.0
    eye = np.eye(T)
    k2, t2 = k1 + v * eye, t1 + eye
    # readout: σw² = width · 1, σb² = 0.25; NTK = width·K + σw²·Θ + 1
    return width * k2 + S2_B, width * k2 + width * t2 + 1.0


CASES = [("embed", "trunc0.02"), ("embed", "normal0.5"), ("linear", "normal0.5")]


@pytest.mark.parametrize("layout", ["diagonal", "full"])
@pytest.mark.parametrize("kind,init", CASES)
def test_readout_by_hand(kind, init, layout):
    pos_init, v = INITS[init]
    x = IDS if kind == "embed" else X
    model = nhaiku.adapt(_net(kind, pos_init), None, x)
    assert ("~", "pos") in model.info["param_initializers"]
    k = infinite_kernel_fn(model, spatial_layout=layout)(x, x[1:3], get="kernel")
    nngp, ntk = _by_hand(kind, x, x[1:3], v)
    nngp1, _ = _by_hand(kind, x, x, v)
    nngp2, _ = _by_hand(kind, x[1:3], x[1:3], v)
    cov1, cov2 = np.einsum("aatu->atu", nngp1), np.einsum("aatu->atu", nngp2)
    if layout == "diagonal":
        nngp, ntk = np.einsum("abtt->abt", nngp), np.einsum("abtt->abt", ntk)
        cov1, cov2 = np.einsum("att->at", cov1), np.einsum("att->at", cov2)
    rtol = 1e-6 if kind == "embed" else 1e-12  # hk.Embed's table is float32
    np.testing.assert_allclose(k.nngp, nngp, rtol=rtol)
    np.testing.assert_allclose(k.ntk, ntk, rtol=rtol)
    np.testing.assert_allclose(k.cov1, cov1, rtol=rtol)
    np.testing.assert_allclose(k.cov2, cov2, rtol=rtol)
    assert k.layout == layout and k.is_gaussian


def test_the_sum_is_gaussian_for_a_nonlinearity():
    # relu(E[id] + P) right after the sum: E[relu(u) relu(u')] of the Gaussian sum (arc-cosine kernel)
    model = nhaiku.adapt(_net("embed", INITS["normal0.5"][0], extra=lambda h, p: jax.nn.relu(h + p)), None, IDS)
    k = infinite_kernel_fn(model, spatial_layout="diagonal")(IDS)
    a = np.asarray(IDS)
    c = (a[:, None, :] == a[None, :, :]) + 0.25  # covariance of E + P at equal positions
    var = 1.25
    theta = np.arccos(np.clip(c / var, -1, 1))
    relu = var / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
    np.testing.assert_allclose(k.nngp, D * relu + S2_B, rtol=1e-6)


def test_add_array_layouts():
    n = jnp.zeros((2, 3))
    k = add_array(Kernel(nngp=n, ntk=n, cov1=jnp.zeros(2), cov2=jnp.zeros(3), layout="none"), 0.5)
    np.testing.assert_array_equal(k.nngp, np.full((2, 3), 0.5))  # a bias: v everywhere
    np.testing.assert_array_equal(k.ntk, np.ones((2, 3)))
    np.testing.assert_array_equal(k.cov2, np.full(3, 0.5))
    z = jnp.zeros((1, 1, 2, 2, 3, 3))
    f = add_array(Kernel(nngp=z, ntk=None, cov1=z[0], cov2=z[0], layout="full"), 2.0)
    want = 2.0 * np.einsum("ab,cd->abcd", np.eye(2), np.eye(3))
    np.testing.assert_array_equal(f.nngp[0, 0], want)
    np.testing.assert_array_equal(f.cov1[0], want)
    assert f.ntk is None


def test_carry_keeps_only_the_leaf_itself():
    bid = "broadcast_in_dim"
    assert carry(bid, {"broadcast_dimensions": (1, 2)}, (3, 8), (1, 3, 8), False) is False
    assert carry(bid, {"broadcast_dimensions": (1, 2)}, (3, 8), (4, 3, 8), False) is True
    assert carry(bid, {"broadcast_dimensions": (0, 1, 2)}, (1, 3, 8), (4, 3, 8), False) is True
    assert carry(bid, {"broadcast_dimensions": (1, 2)}, (3, 1), (1, 3, 1), False) is False
    assert carry(bid, {"broadcast_dimensions": (0, 1, 2)}, (1, 3, 1), (1, 3, 8), False) is None  # over channels
    assert carry("reshape", {"dimensions": None}, (24,), (1, 3, 8), False) is False
    assert carry("reshape", {"dimensions": None}, (4, 3, 8), (12, 8), True) is None  # examples would differ
    assert carry("reshape", {"dimensions": None}, (4, 3, 8), (4, 24), True) is True
    assert carry("slice", {}, (5, 8), (3, 8), False) is None


def _mc_net(width):
    def f(ids):
        h = hk.Embed(V, width, w_init=hk.initializers.RandomNormal(1.0))(ids)
        h = h + hk.get_parameter("pos", [T, width], init=hk.initializers.RandomNormal(0.5))
        h = jax.nn.relu(hk.Linear(width)(h))
        return hk.Linear(8)(h.mean(1))

    return hk.without_apply_rng(hk.transform(f))


@pytest.mark.slow
def test_monte_carlo_over_haiku_initializations(mc):
    # the Linear after the sum sees Gaussian pre-activations only as the width grows
    errs, z = [], []
    for width in (4, 256):
        model = nhaiku.adapt(_mc_net(width), None, IDS)
        k = infinite_kernel_fn(model)(IDS)
        mean, se = mc.nngp_with_stderr(model, IDS, 2048)
        errs.append(mc.rel_err(mean, k.nngp))
        z.append(float(np.max(np.abs(mean - np.asarray(k.nngp)) / se)))
    assert errs[1] < errs[0], (errs, z)
    assert z[1] < 4.5 and errs[1] < 0.03, (errs, z)
    _, ntk = mc.monte_carlo(model, IDS, n_samples=32, chunk=16)
    assert mc.rel_err(ntk, k.ntk) < 0.08, mc.rel_err(ntk, k.ntk)


def _refused(extra, shape=(T, D)):
    def f(ids):
        h = hk.Embed(V, D)(ids)
        pos = hk.get_parameter("pos", list(shape), init=hk.initializers.RandomNormal(0.5))
        return hk.Linear(1)(extra(h, pos))

    return nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, IDS)


@pytest.mark.parametrize(
    "extra,shape,match",
    [
        (lambda h, p: h + p, (T, 1), r"parameter `~/pos` broadcast over the value's positions or channels"),
        (lambda h, p: h + p, (D,), r"parameter `~/pos` broadcast over the value's positions or channels"),
        (lambda h, p: h + p[:T], (T + 2, D), r"sliced"),
        (lambda h, p: h + 2.0 * p, (T, D), r"scaled"),
        (lambda h, p: h + p + p, (T, D), r"already depends on parameter `~/pos`"),
    ],
    ids=["over-channels", "over-positions", "slice", "scaled", "twice"],
)
def test_refusals(extra, shape, match):
    model = _refused(extra, shape)
    with pytest.raises(InfiniteWidthError, match=r"adds a parameter array of shape .* entry by entry.*" + match):
        infinite_kernel_fn(model)(IDS)


def test_unknown_initializer_names_the_path_and_the_override():
    model = nhaiku.adapt(_net("embed", INITS["normal0.5"][0]), None, IDS)
    bare = model.replace(info={k: v for k, v in model.info.items() if k != "param_initializers"})
    with pytest.raises(
        InfiniteWidthError, match=r"initializer of parameter `~/pos` is not known.*bias_variance=\{'~/pos': v\}"
    ):
        infinite_kernel_fn(bare)(IDS)
    want = infinite_kernel_fn(model)(IDS)
    for key in ("~/pos", "pos"):
        got = infinite_kernel_fn(bare, bias_variance={key: 0.25})(IDS)
        np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-6)
        np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-6)


def test_float32_inputs_give_a_float32_kernel():
    x = X.astype(jnp.float32)
    model = nhaiku.adapt(_net("linear", INITS["trunc0.02"][0]), None, x)
    k = infinite_kernel_fn(model, spatial_layout="full")(x)
    assert k.nngp.dtype == jnp.float32 and k.ntk.dtype == jnp.float32
    nngp, ntk = _by_hand("linear", x, x, INITS["trunc0.02"][1])
    np.testing.assert_allclose(k.nngp, nngp, rtol=2e-5)
    np.testing.assert_allclose(k.ntk, ntk, rtol=2e-5)

"""Masks computed from integer inputs are constants of the input.

``tokens != 0`` is one fixed 0/1 array per example. Multiplying a value by it position by position
(the same factor for every channel) scales each kernel entry by ``m1[n, t] · m2[n', t']``, so a
masked mean over positions has the kernel ``Σ_{t,t'} m1[t] m2[t'] K[t, t'] / (|m1| |m2|)``:
checked against the arc-cosine formulas written out here and against Monte Carlo over the real
modules. Masks that vary over channels, and other uses of integers, are refused naming the leaf.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters
import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn

T, D, WIDTH = 5, 3, 8


def _tokens(n, lengths, seed):
    ids = np.random.default_rng(seed).integers(1, 9, (n, T))
    ids[np.arange(T)[None, :] >= np.asarray(lengths)[:, None]] = 0
    return jnp.asarray(ids, jnp.int32)


def _inputs(n, lengths, seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, T, D))
    return {"ids": _tokens(n, lengths, seed), "x": x}


@pytest.fixture(scope="module")
def batches():
    # x2 smaller and larger than x1: masks are computed with the program traced for x1's batch
    return _inputs(4, (5, 3, 1, 4), 0), _inputs(3, (2, 5, 3), 1), _inputs(6, (1, 2, 3, 4, 5, 2), 2)


def _masked_mean_by_hand(in1, in2, hidden, weight_var=1.0, weights=None):
    """Dense(hidden) -> relu -> masked mean over positions -> Dense, by hand (zero trainable biases,
    weights of variance weight_var / fan_in, standard parameterization). ``weights(ids)`` gives
    other per-position factors ``w`` and divisors ``c`` than the mask ``ids != 0`` and its count."""
    x1, x2 = np.asarray(in1["x"], float), np.asarray(in2["x"], float)
    if weights is None:

        def weights(ids):
            m = ids != 0
            return m, np.maximum(m.sum(1), 1)

    (m1, c1), (m2, c2) = weights(np.asarray(in1["ids"])), weights(np.asarray(in2["ids"]))
    q12 = weight_var * np.einsum("atd,bsd->atbs", x1, x2) / D  # (N1, T, N2, T)
    q11 = weight_var * np.einsum("atd,atd->at", x1, x1) / D
    q22 = weight_var * np.einsum("bsd,bsd->bs", x2, x2) / D
    s = np.sqrt(q11[:, :, None, None] * q22[None, None])
    theta = np.arccos(np.clip(q12 / s, -1, 1))
    k_relu = s * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    k_step = (np.pi - theta) / (2 * np.pi)
    # first layer: fan_in · (x·x'/fan_in) from the weights, 1 from the bias
    ntk_hidden = np.einsum("atd,bsd->atbs", x1, x2) + 1.0
    ntk_relu = k_step * ntk_hidden

    def pool(k):
        return np.einsum("at,bs,atbs->ab", m1, m2, k) / np.outer(c1, c2)

    nngp = weight_var * pool(k_relu)
    ntk = hidden * pool(k_relu) + weight_var * pool(ntk_relu) + 1.0
    return nngp, ntk


class MaskedMean(nn.Module):
    width: int = WIDTH
    outputs: int = 2
    use_where: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width)(x["x"]))
        mask = x["ids"] != 0
        masked = jnp.where(mask[..., None], h, 0.0) if self.use_where else h * mask[..., None]
        count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1)
        return nn.Dense(self.outputs)(masked.sum(axis=1) / count)


@pytest.mark.parametrize("use_where", [False, True])
def test_flax_masked_mean_pooling_matches_the_formula(batches, use_where):
    b1, b2, b3 = batches
    kernel_fn = infinite_kernel_fn(nflax.adapt(MaskedMean(use_where=use_where), None, b1))
    for other in (b1, b2, b3):
        nngp, ntk = kernel_fn(b1, None if other is b1 else other)
        want_nngp, want_ntk = _masked_mean_by_hand(b1, other, WIDTH)
        np.testing.assert_allclose(nngp, want_nngp, rtol=1e-10)
        np.testing.assert_allclose(ntk, want_ntk, rtol=1e-10)
    # x2 = x1 given explicitly, the same kernel
    np.testing.assert_allclose(kernel_fn(b1, b1)[0], kernel_fn(b1)[0], rtol=1e-12)


def test_masked_positions_do_not_matter(batches):
    b1, _, _ = batches
    kernel_fn = infinite_kernel_fn(nflax.adapt(MaskedMean(), None, b1))
    changed = dict(b1, x=jnp.where((b1["ids"] == 0)[..., None], 100.0, b1["x"]))
    for a, b in zip(kernel_fn(b1), kernel_fn(changed)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_flax_masked_mean_pooling_matches_monte_carlo(batches, mc):
    b1, b2, _ = batches
    model = nflax.adapt(MaskedMean(width=512, outputs=64), None, b1)
    nngp, ntk = infinite_kernel_fn(model)(b1, b2)
    mc_nngp, mc_ntk = mc.monte_carlo(model, b1, b2, n_samples=16, chunk=8)
    assert mc.rel_err(mc_nngp, nngp) < 0.1
    assert mc.rel_err(mc_ntk, ntk) < 0.05


def test_haiku_masked_sum_matches_the_formula(batches, haiku_truncated_variance):
    b1, b2, _ = batches

    def f(x):
        h = jax.nn.relu(hk.Linear(WIDTH)(x["x"]))
        mask = jnp.not_equal(x["ids"], 0).astype(h.dtype)
        count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        return hk.Linear(2)(jnp.sum(h * mask[:, :, None], axis=1) / count)

    model = nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, b1)
    nngp, ntk = infinite_kernel_fn(model)(b1, b2)
    want_nngp, want_ntk = _masked_mean_by_hand(b1, b2, WIDTH, weight_var=haiku_truncated_variance)
    np.testing.assert_allclose(nngp, want_nngp, rtol=1e-10)
    np.testing.assert_allclose(ntk, want_ntk, rtol=1e-10)


def test_a_constant_varying_over_channels_is_refused(batches):
    b1, _, _ = batches

    class OneHot(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(9)(x["x"])
            return nn.Dense(2)((h * jax.nn.one_hot(x["ids"], 9)).sum(axis=1))

    with pytest.raises(InfiniteWidthError, match=r"x\['ids'\].*varies along the channel axis") as info:
        infinite_kernel_fn(nflax.adapt(OneHot(), None, b1))
    assert "layer `OneHot`" in str(info.value) and "primitive mul" in str(info.value)


def test_masking_a_flattened_value_is_refused(batches):
    b1, _, _ = batches

    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x["x"]).reshape((x["x"].shape[0], -1))
            mask = jnp.repeat(x["ids"] != 0, 4, axis=1)
            return nn.Dense(2)(h * mask)

    with pytest.raises(InfiniteWidthError, match="flattened"):
        infinite_kernel_fn(nflax.adapt(Flat(), None, b1))


def test_a_model_returning_a_mask_is_refused(batches):
    b1, _, _ = batches
    model = ntk_adapters.adapt(lambda p, x: (x["ids"] > 0).astype(jnp.float32) * 2.0, {"unused": jnp.ones(2)})
    with pytest.raises(InfiniteWidthError, match=r"x\['ids'\].*alone"):
        infinite_kernel_fn(model)(b1)


def test_functions_of_integers_reaching_a_dense_are_input_features():
    # a float function of the integers alone (here a per-position indicator) is a deterministic
    # feature of the input: the Dense after it sees nngp = f·f'/C exactly
    ids = _tokens(3, (5, 2, 4), 3)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(4)((ids > 0).astype(jnp.float64) * 3.0 - 1.0)

    nngp, ntk = infinite_kernel_fn(nflax.adapt(Net(), None, ids))(ids)
    f = (np.asarray(ids) > 0) * 3.0 - 1.0
    np.testing.assert_allclose(nngp, f @ f.T / T, rtol=1e-12)
    np.testing.assert_allclose(ntk, f @ f.T + 1.0, rtol=1e-12)


def test_one_mask_as_a_dense_input_and_as_a_mask(batches):
    # the Dense sees the mask as an input feature (nngp = m·m'/T); afterwards the same mask still
    # scales positions; the two branches end in independent Dense layers, so their kernels add
    b1, b2, _ = batches

    class Both(nn.Module):
        @nn.compact
        def __call__(self, x):
            m = (x["ids"] != 0).astype(jnp.float64)
            first = nn.Dense(2)(m)
            h = nn.relu(nn.Dense(WIDTH)(x["x"]))
            pooled = (h * m[..., None]).sum(axis=1) / jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
            return first + nn.Dense(2)(pooled)

    nngp, ntk = infinite_kernel_fn(nflax.adapt(Both(), None, b1))(b1, b2)
    m1, m2 = [(np.asarray(b["ids"]) != 0).astype(float) for b in (b1, b2)]
    want_nngp, want_ntk = _masked_mean_by_hand(b1, b2, WIDTH)
    np.testing.assert_allclose(nngp, m1 @ m2.T / T + want_nngp, rtol=1e-10)
    np.testing.assert_allclose(ntk, m1 @ m2.T + 1.0 + want_ntk, rtol=1e-10)


def test_a_constant_table_indexed_by_token_ids_weighs_positions(batches):
    # TABLE[ids] is a fixed array per example (the table is a constant of the model, not a parameter)
    b1, b2, b3 = batches
    table = np.linspace(0.0, 2.0, 9)

    class Weighted(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(WIDTH)(x["x"]))
            w = jnp.asarray(table)[x["ids"]]
            return nn.Dense(2)((h * w[..., None]).sum(axis=1) / T)

    kernel_fn = infinite_kernel_fn(nflax.adapt(Weighted(), None, b1))
    for other in (b2, b3):
        nngp, ntk = kernel_fn(b1, other)
        want_nngp, want_ntk = _masked_mean_by_hand(b1, other, WIDTH, weights=lambda ids: (table[ids], T))
        np.testing.assert_allclose(nngp, want_nngp, rtol=1e-10)
        np.testing.assert_allclose(ntk, want_ntk, rtol=1e-10)


def test_a_per_pixel_mask_agrees_between_spatial_layouts():
    # flatten + Dense needs only the covariances of equal positions: the 'full' layout (factors on
    # both position axes of every spatial dimension) must give what the 'diagonal' one gives
    rng = np.random.default_rng(5)
    n1, n2 = 3, 2
    imgs = jax.random.normal(jax.random.PRNGKey(5), (n1 + n2, 4, 5, 2))
    seg = jnp.asarray(rng.integers(0, 3, (n1 + n2, 4, 5)), jnp.int32)
    b1 = {"img": imgs[:n1], "seg": seg[:n1]}
    b2 = {"img": imgs[n1:], "seg": seg[n1:]}

    class Segmented(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(4, (3, 3))(x["img"])) * (x["seg"] > 0)[..., None]
            return nn.Dense(2)(h.reshape((h.shape[0], -1)))

    model = nflax.adapt(Segmented(), None, b1)
    full = infinite_kernel_fn(model, spatial_layout="full")(b1, b2)
    diagonal = infinite_kernel_fn(model, spatial_layout="diagonal")(b1, b2)
    for f, d in zip(full, diagonal):
        np.testing.assert_allclose(f, d, rtol=1e-10)
    # the mask matters: without it the kernel differs
    unmasked = infinite_kernel_fn(model, spatial_layout="full")(b1, dict(b2, seg=jnp.ones_like(b2["seg"])))
    assert np.abs(np.asarray(unmasked[0]) - np.asarray(full[0])).max() > 1e-3 * np.abs(np.asarray(full[0])).max()

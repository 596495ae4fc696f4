"""Positions mixed by a constant matrix of the model (graph aggregation, fixed token mixing).

* Linear models, closed forms by hand: the input kernel ``x·x'ᵀ / C`` per pair of positions, the
  Dense recursion of standard parameterization, the matrix applied on both position axes, a
  flatten into the last Dense; in 1-D and along either axis of 2-D positions, float64 and float32;
  and a residual ``h + mix(Dense(h))`` (the mixed fresh branch is independent of ``h``).
* Monte Carlo over the real Flax linen and Haiku modules (a Gaussian and a non-Gaussian value
  mixed, a weighted sum over positions): the error falls as the width grows.
* Every spelling (``einsum`` either way round, ``@``, ``tensordot`` + ``moveaxis``, a transpose,
  a product and a transpose back, the matrix computed in the model, inside ``jax.jit``) gives the
  same kernel.
* Refusals: contracting the channel axis, the layout ``'diagonal'`` forced, a matrix of the
  model's parameters (the message of hand-written linear layers), a value left in another axis
  order, permuted values that would pass for canonical ones.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn

T = 5


def _adjacency(t: int, seed: int) -> np.ndarray:
    """A fixed row-normalized adjacency matrix with self-loops: ``(A @ h)[j]`` averages neighbours."""
    rng = np.random.default_rng(seed)
    a = (rng.random((t, t)) < 0.5).astype(np.float64)
    a = np.maximum(a, a.T) + np.eye(t)
    return a / a.sum(1, keepdims=True)


ADJ = _adjacency(T, 0)
ADJ_W = _adjacency(4, 1)


@pytest.fixture(scope="module")
def x_seq():
    return jax.random.normal(jax.random.PRNGKey(7), (3, T, 3))


# ----------------------------------------------------------------------------------------------
# Linear models: closed forms by hand.


# Fixed matrices that are not stochastic (a mean over positions after a row-stochastic one would
# not see it) and not square (positions T -> 3).
MIX_T = np.random.default_rng(2).normal(size=(T, 3))
MIX_W = np.random.default_rng(3).normal(size=(4, 4))


class LinearMix(nn.Module):
    """Dense -> y[j] = Σ_i M[i, j] h[i] along ``axis`` -> flatten -> Dense."""

    width: int
    axis: int = 1

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width)(x)
        if x.ndim == 3:
            h = jnp.einsum("nic,ij->njc", h, MIX_T)
        elif self.axis == 1:
            h = jnp.einsum("nhwc,hk->nkwc", h, MIX_T)
        else:
            h = jnp.einsum("wk,nhwc->nhkc", MIX_W, h)
        return nn.Dense(2)(h.reshape((h.shape[0], -1)))


def _linear_by_hand(x, width, axis):
    """NNGP and NTK of :class:`LinearMix` at infinite width, from the recursion written out here.

    Flax's Dense: lecun_normal weights (``σw² = 1``), zero-initialized trainable bias (``σb² = 0``,
    NTK ``+ 1``); standard parameterization: ``ntk ← fan_in·nngp + σw²·ntk + 1``, ``nngp ← σw²·nngp``.
    The last Dense sees ``P`` positions × ``width`` channels: its ``nngp`` is the average over
    positions of the diagonal ``nngp[p, p]`` and its fan-in is ``P · width``.
    """
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    if x.ndim == 3:
        k0 = np.einsum("nic,mjc->nmij", x, x) / c  # (N, N, T, T')
        mix = lambda k: np.einsum("nmab,aj,bk->nmjk", k, MIX_T, MIX_T)  # noqa: E731
        diag = lambda k: np.einsum("nmjj->nmj", k).reshape(k.shape[0], k.shape[1], -1)  # noqa: E731
    else:
        k0 = np.einsum("nhwc,mgvc->nmhgwv", x, x) / c  # (N, N, H, H', W, W')
        if axis == 1:
            mix = lambda k: np.einsum("nmabwv,aj,bk->nmjkwv", k, MIX_T, MIX_T)  # noqa: E731
        else:
            mix = lambda k: np.einsum("nmhgab,aj,bk->nmhgjk", k, MIX_W, MIX_W)  # noqa: E731
        diag = lambda k: np.einsum("nmhhww->nmhw", k).reshape(k.shape[0], k.shape[1], -1)  # noqa: E731
    nngp1, ntk1 = k0, c * k0 + 1.0
    d_nngp, d_ntk = diag(mix(nngp1)), diag(mix(ntk1))
    positions = d_nngp.shape[-1]
    nngp = d_nngp.mean(-1)
    return nngp, positions * width * nngp + d_ntk.mean(-1) + 1.0


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize(
    "shape,axis", [((3, T, 3), 1), ((3, T, 4, 2), 1), ((3, 5, 4, 2), 2)], ids=["1d", "2d-rows", "2d-cols"]
)
def test_linear_mixing_closed_form(shape, axis, dtype):
    x = jax.random.normal(jax.random.PRNGKey(3), shape, dtype)
    model = nflax.adapt(LinearMix(16, axis), None, x)
    k = infinite_kernel_fn(model)(x)
    nngp, ntk = _linear_by_hand(x, 16, axis)
    assert k.nngp.dtype == dtype
    rtol = 1e-10 if dtype == jnp.float64 else 2e-5
    np.testing.assert_allclose(k.nngp, nngp, rtol=rtol)
    np.testing.assert_allclose(k.ntk, ntk, rtol=rtol)


MIX_S = np.random.default_rng(4).normal(size=(T, T))


class ResidualMix(nn.Module):
    """h + mixed(Dense(h)): the mixed output of a fresh Dense is still independent of h."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)
        h = h + jnp.einsum("nic,ij->njc", nn.Dense(16)(h), MIX_S)
        return nn.Dense(2)(h.reshape((h.shape[0], -1)))


def test_residual_with_mixed_fresh_branch(x_seq):
    """By hand: the branch b = Dense(h) has nngp K1 and ntk 16·K1 + ntk1 + 1; the sum adds h's kernel and
    the mixed branch's, and the cross terms vanish (b's weights have mean zero)."""
    x = np.asarray(x_seq, np.float64)
    k1 = np.einsum("nic,mjc->nmij", x, x) / x.shape[-1]
    ntk1 = x.shape[-1] * k1 + 1.0
    mix = lambda k: np.einsum("nmab,aj,bk->nmjk", k, MIX_S, MIX_S)  # noqa: E731
    nngp_s, ntk_s = k1 + mix(k1), ntk1 + mix(16 * k1 + ntk1 + 1.0)
    nngp = np.einsum("nmjj->nmj", nngp_s).mean(-1)
    ntk = T * 16 * nngp + np.einsum("nmjj->nmj", ntk_s).mean(-1) + 1.0
    k = infinite_kernel_fn(nflax.adapt(ResidualMix(), None, x_seq))(x_seq)
    np.testing.assert_allclose(k.nngp, nngp, rtol=1e-10)
    np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10)


def test_mixing_rows_and_columns_differ():
    """Mixing along H and along W are different maps (the test above would not notice an axis swap
    if they coincided)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 4, 2))
    rows, cols = _linear_by_hand(x, 16, 1)[0], _linear_by_hand(x, 16, 2)[0]
    plain = np.einsum("nhwc,mhwc->nm", x, x) / (2 * 5 * 4)  # no mixing at all
    assert np.abs(rows - plain).max() > 1e-2 * np.abs(plain).max()
    assert np.abs(rows - cols).max() > 1e-3 * np.abs(rows).max()


# ----------------------------------------------------------------------------------------------
# Every spelling of the same product.

SPELLINGS = {
    "einsum": lambda h: jnp.einsum("nic,ij->njc", h, ADJ),
    "einsum-matrix-first": lambda h: jnp.einsum("ji,njc->nic", ADJ, h),
    "matmul": lambda h: ADJ.T @ h,
    "tensordot-moveaxis": lambda h: jnp.moveaxis(jnp.tensordot(h, ADJ, axes=([1], [0])), -1, 1),
    "transpose-matmul-transpose": lambda h: jnp.swapaxes(jnp.swapaxes(h, 1, 2) @ ADJ, 1, 2),
    # the matrix computed in the model, and the product inside a jitted function
    "computed-matrix": lambda h: jnp.swapaxes(jnp.swapaxes(h, 1, 2) @ (jnp.asarray(ADJ) * 1.0), 1, 2),
    "jitted": lambda h: jax.jit(lambda u: jnp.swapaxes(jnp.swapaxes(u, 1, 2) @ ADJ, 1, 2))(h),
}


class Spelled(nn.Module):
    spelling: str

    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(SPELLINGS[self.spelling](nn.Dense(8)(x)))
        return nn.Dense(2)(h.mean(axis=1))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_spellings_agree(x_seq, dtype):
    x = x_seq.astype(dtype)
    names = list(SPELLINGS) if dtype == jnp.float64 else ["einsum", "transpose-matmul-transpose"]
    ks = {s: infinite_kernel_fn(nflax.adapt(Spelled(s), None, x))(x) for s in names}
    ref = ks["einsum"]
    rtol = 1e-12 if dtype == jnp.float64 else 1e-5
    for s, k in ks.items():
        np.testing.assert_allclose(k.nngp, ref.nngp, rtol=rtol, err_msg=s)
        np.testing.assert_allclose(k.ntk, ref.ntk, rtol=rtol, err_msg=s)


# ----------------------------------------------------------------------------------------------
# Monte Carlo over the real modules.

WIDTHS = (2, 128)
N_NNGP, N_NTK = 4096, 16
TOL_NNGP, TOL_NTK = 0.05, 0.08


class FlaxGraph(nn.Module):
    """Dense -> row-normalized adjacency -> relu -> Dense -> relu -> mean over positions -> Dense."""

    width: int

    @nn.compact
    def __call__(self, x):
        h = jnp.einsum("ij,njc->nic", ADJ, nn.Dense(self.width)(x))
        h = nn.relu(nn.Dense(self.width)(nn.relu(h)))
        return nn.Dense(4)(h.mean(axis=1))


def flax_graph(width, x):
    return nflax.adapt(FlaxGraph(width), None, x)


def haiku_graph(width, x):
    """hk.Linear -> relu -> A @ h (a non-Gaussian value mixed) -> hk.Linear -> erf -> weighted sum
    over positions (a vector contraction) -> hk.Linear."""
    w = np.linspace(0.5, 1.5, T)

    def f(x):
        h = ADJ @ jax.nn.relu(hk.Linear(width)(x))
        h = jax.scipy.special.erf(hk.Linear(width)(h))
        return hk.Linear(4)(jnp.einsum("nic,i->nc", h, w))

    return nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, x)


@pytest.mark.slow
@pytest.mark.parametrize("build", [flax_graph, haiku_graph], ids=["flax", "haiku"])
def test_mixing_converges(mc, build, x_seq):
    mc.check_convergence(build, x_seq, widths=WIDTHS, tol_nngp=TOL_NNGP, tol_ntk=TOL_NTK, n_nngp=N_NNGP, n_ntk=N_NTK)


# ----------------------------------------------------------------------------------------------
# Refusals.


def _message(model, x, **kwargs) -> str:
    with pytest.raises(InfiniteWidthError) as info:
        infinite_kernel_fn(model, **kwargs)(x)
    msg = str(info.value)
    assert "monte_carlo_kernel_fn" in msg, msg
    return msg


class ChannelMix(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x) @ np.full((6, 6), 1.0 / 6)
        return nn.Dense(2)(h.mean(axis=1))


def test_channel_contraction_refused(x_seq):
    msg = _message(nflax.adapt(ChannelMix(), None, x_seq), x_seq)
    assert "at primitive dot_general" in msg and "contracts the channel axis" in msg, msg


def test_diagonal_layout_forced_refused(x_seq):
    model = flax_graph(8, x_seq)
    msg = _message(model, x_seq, spatial_layout="diagonal")
    assert "needs the covariance between positions" in msg and "spatial_layout='full'" in msg, msg


class ParamMix(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = self.param("mix", nn.initializers.normal(1.0), (x.shape[1], x.shape[1]))
        return jnp.einsum("nic,ij->njc", x, a)


class ParamNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(ParamMix(name="mixer")(nn.Dense(6)(x)).mean(axis=1))


def test_parameter_matrix_message_unchanged(x_seq):
    msg = _message(nflax.adapt(ParamNet(), None, x_seq), x_seq)
    assert f"layer `mixer` ({__name__}.ParamMix) at primitive dot_general" in msg, msg
    assert (
        "a matrix product outside every layer with a rule (a hand-written linear layer) has no "
        "infinite-width rule: register a rule for its module" in msg
    ), msg


class LeftPermuted(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tensordot(nn.Dense(6)(x), ADJ, axes=([1], [0]))  # (N, C, J): positions last
        return nn.Dense(2)(h.mean(axis=1))


def test_value_left_in_another_axis_order_refused(x_seq):
    msg = _message(nflax.adapt(LeftPermuted(), None, x_seq), x_seq)
    assert "not in the order (batch, *positions, channels)" in msg and "transpose the value back" in msg, msg


class Scrambled(nn.Module):
    """Permuted values that must not pass for canonical ones."""

    case: str

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(T)(x)  # (N, T, T): channels as many as positions, so shapes cannot tell them apart
        if self.case == "reshape-then-transpose":
            t = jnp.tensordot(h, ADJ, axes=([1], [0]))  # (N, C, J)
            # a flatten and back: harmless here, but refused, as no rule can tell it from one that scrambles
            h = jnp.swapaxes(t.reshape((t.shape[0], T * T)).reshape(t.shape), 1, 2)
        else:
            h = h * jnp.swapaxes(h, 1, 2)
        return nn.Dense(2)(h.mean(axis=1))


@pytest.mark.parametrize("case", ["reshape-then-transpose", "entrywise-with-its-transpose"])
def test_permuted_values_do_not_pass_for_canonical(x_seq, case):
    msg = _message(nflax.adapt(Scrambled(case), None, x_seq), x_seq)
    expected = "reshapes or broadcasts" if case.startswith("reshape") else "combines two different input-dependent"
    assert expected in msg, msg

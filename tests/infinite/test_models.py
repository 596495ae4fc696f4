"""Monte Carlo convergence of whole models, Flax and Haiku: the engine's kernels against the
average over random initializations of the real modules, at two widths."""

import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import infinite_kernel_fn

WIDTHS = (8, 128)
N_NNGP, N_NTK = 1024, 8
TOL_NNGP, TOL_NTK = 0.05, 0.08  # at the largest width: MC noise ~1-3 % plus O(1/width) bias


class FlaxMLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = jnp.tanh(nn.Dense(self.width)(x))
        return nn.Dense(8)(x)


def flax_mlp(width, x):
    return nflax.adapt(FlaxMLP(width), None, x)


def haiku_mlp(width, x):
    def f(x):
        x = jax.nn.relu(hk.Linear(width)(x))
        x = jax.nn.gelu(hk.Linear(width)(x))
        return hk.Linear(8)(x)

    return nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, x)


def check_convergence(mc, build, x, widths=WIDTHS, tol_nngp=TOL_NNGP, tol_ntk=TOL_NTK, n_nngp=N_NNGP, n_ntk=N_NTK):
    errs = []
    for w in widths:
        model = build(w, x)
        k = infinite_kernel_fn(model)(x)
        nngp, _ = mc.monte_carlo(model, x, n_samples=n_nngp, want_ntk=False, chunk=512)
        _, ntk = mc.monte_carlo(model, x, n_samples=n_ntk, chunk=n_ntk)
        errs.append((mc.rel_err(nngp, k.nngp), mc.rel_err(ntk, k.ntk)))
    (n0, t0), (n1, t1) = errs[0], errs[-1]
    assert n1 < n0 and t1 < t0, errs
    assert n1 < tol_nngp and t1 < tol_ntk, errs
    return errs


@pytest.mark.slow
@pytest.mark.parametrize("build", [flax_mlp, haiku_mlp], ids=["flax", "haiku"])
def test_mlp_converges(mc, build, x_vec):
    check_convergence(mc, build, x_vec)

"""Shared helpers for the infinite-width tests: Monte Carlo kernels of the real modules.

The Monte Carlo judge is independent of the engine: fresh parameters from the model's own
``init_fn`` (the framework's initializers), the NNGP as the average of ``f(x1) f(x2)ᵀ / O`` and
the NTK as the average over initializations of the empirical NTK ``J(x1) J(x2)ᵀ / O`` computed
here with ``jax.jacrev``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


#: The suite compiles with XLA's backend optimizations off (tests/conftest.py), which suits programs
#: that run once. A Monte Carlo estimate runs its program over thousands of initializations of wide
#: layers, and unoptimized convolutions and Jacobians run 10-50x slower (measured: 2 NTK draws of a
#: width-64 conv net, 9 s unoptimized against 0.3 s at level 2, for 2 s more compilation), so the
#: sampling programs are compiled with optimizations on. The results agree to float round-off.
MC_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def mc_jit(fun=None, **kwargs):
    """``jax.jit`` for Monte Carlo sampling programs: optimized compilation (``MC_COMPILER_OPTIONS``)."""
    if fun is None:
        return functools.partial(mc_jit, **kwargs)
    return jax.jit(fun, compiler_options=MC_COMPILER_OPTIONS, **kwargs)


def _flat_out(y):
    return y.reshape(y.shape[0], -1)


@functools.partial(mc_jit, static_argnums=(0, 1, 5))
def _mc_chunk(apply_fn, init_fn, keys, x1, x2, want_ntk):
    def one(key):
        p = init_fn(key, x1)
        y1 = _flat_out(apply_fn(p, x1))
        y2 = _flat_out(apply_fn(p, x2))
        o = y1.shape[1]
        nngp = y1 @ y2.T / o
        if not want_ntk:
            return nngp, jnp.zeros_like(nngp)
        j1 = jax.jacrev(lambda q: _flat_out(apply_fn(q, x1)))(p)
        j2 = jax.jacrev(lambda q: _flat_out(apply_fn(q, x2)))(p)
        ntk = (
            sum(
                jnp.einsum("ia...,ja...->ij", a, b)
                for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2))
            )
            / o
        )
        return nngp, ntk

    nngp, ntk = jax.lax.map(one, keys)
    return nngp.sum(0), ntk.sum(0)


def monte_carlo(model, x1, x2=None, *, n_samples=64, seed=0, want_ntk=True, chunk=16):
    """Average NNGP and empirical NTK of ``model`` over ``n_samples`` fresh initializations."""
    x2 = x1 if x2 is None else x2
    keys = jax.random.split(jax.random.PRNGKey(seed), n_samples)
    tot_n = tot_k = 0.0
    for s in range(0, n_samples, chunk):
        a, b = _mc_chunk(model.apply_fn, model.init_fn, keys[s : s + chunk], x1, x2, want_ntk)
        tot_n, tot_k = tot_n + a, tot_k + b
    return np.asarray(tot_n) / n_samples, np.asarray(tot_k) / n_samples


def nngp_with_stderr(model, x, n_samples, seed=0):
    """Mean and standard error over ``n_samples`` fresh initializations of ``f(x) f(x)ᵀ / O``
    (``f(x)`` of shape ``(N, O)``), in float64."""

    def one(key):
        y = model.apply_fn(model.init_fn(key, x), x)
        return y @ y.T / y.shape[1]

    keys = jax.random.split(jax.random.PRNGKey(seed), n_samples)
    draws = np.asarray(mc_jit(lambda k: jax.lax.map(one, k))(keys), np.float64)
    return draws.mean(0), draws.std(0, ddof=1) / np.sqrt(n_samples)


def check_convergence(build, x, *, widths, tol_nngp, tol_ntk, n_nngp, n_ntk):
    """The engine against Monte Carlo over ``build(width, x)``'s own initializations: the NNGP and
    NTK errors fall from the first width to the last, and are below the tolerances there."""
    from ntk_adapters.infinite import infinite_kernel_fn

    errs = []
    for w in widths:
        model = build(w, x)
        k = infinite_kernel_fn(model)(x)
        # Compilation dominates the cost, so each estimate is one compiled call over all its samples.
        nngp, _ = monte_carlo(model, x, n_samples=n_nngp, want_ntk=False, chunk=n_nngp)
        _, ntk = monte_carlo(model, x, n_samples=n_ntk, chunk=n_ntk)
        errs.append((rel_err(nngp, k.nngp), rel_err(ntk, k.ntk)))
    (n0, t0), (n1, t1) = errs[0], errs[-1]
    assert n1 < n0 and t1 < t0, errs
    assert n1 < tol_nngp and t1 < tol_ntk, errs


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def x_vec():
    return jax.random.normal(jax.random.PRNGKey(42), (4, 6))


@pytest.fixture(scope="session")
def x_img():
    return jax.random.normal(jax.random.PRNGKey(43), (3, 6, 6, 2))


class _Helpers:
    monte_carlo = staticmethod(monte_carlo)
    nngp_with_stderr = staticmethod(nngp_with_stderr)
    check_convergence = staticmethod(check_convergence)
    rel_err = staticmethod(rel_err)
    jit = staticmethod(mc_jit)


@pytest.fixture(scope="session")
def mc():
    """``mc.monte_carlo(model, x1, x2=None, ...)``, ``mc.nngp_with_stderr(model, x, n)``,
    ``mc.check_convergence(build, x, ...)``,
    ``mc.rel_err(a, b)`` and ``mc.jit`` (for hand-written sampling loops)."""
    return _Helpers

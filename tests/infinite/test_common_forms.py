"""The short closed forms of piecewise-linear functions and scaled error functions
(``ntk_adapters.infinite.common_forms``) against the term-by-term route of the same family
(``form_kernels.term_by_term``), itself checked against an independent integrator in
``test_elementwise_exact.py``."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

from ntk_adapters.infinite import forms as F
from ntk_adapters.infinite.common_forms import common_expectations
from ntk_adapters.infinite.form_kernels import form_expectations, term_by_term

FUNCTIONS = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2),
    "abs": jnp.abs,
    "slopes 2 and -0.5": lambda x: jnp.where(x > 0, 2.0 * x, -0.5 * x),
    "3 x": lambda x: 3.0 * x,
    "erf": erf,
    "1.5 erf(2x)": lambda x: 1.5 * erf(2.0 * x),
}


def _grid(dtype):
    """Covariances across the whole range of correlations, ρ = ±1 exactly, and zero variances."""
    q1 = np.array([0.0, 0.3, 1.0, 2.5, 1.0, 4.0])
    q2 = np.array([1.7, 0.0, 1.0, 0.4, 1.0, 4.0])
    rho = np.linspace(-1.0, 1.0, 9)
    c = rho[:, None] * np.sqrt(q1 * q2)[None, :]
    c[:, 2] = rho * 1.0  # q1 = q2 = 1: ρ = ±1 hit exactly
    c[-1, 5], c[0, 5] = 4.0, -4.0
    as_array = lambda a: jnp.asarray(np.broadcast_to(a, c.shape), dtype)
    return as_array(c), as_array(q1[None, :]), as_array(q2[None, :])


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_functions_of_real_models_take_the_short_form(name):
    form = F.analyze(FUNCTIONS[name])
    assert form is not None
    c, q1, q2 = _grid(jnp.float64)
    assert common_expectations(form, c, q1, q2, True) is not None


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-6)])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_short_forms_equal_the_term_by_term_kernels(name, dtype, tol):
    form = F.analyze(FUNCTIONS[name])
    c, q1, q2 = _grid(dtype)
    short = form_expectations(form, c, q1, q2)
    long = term_by_term(form, c, q1, q2)
    scale = float(jnp.max(jnp.abs(long[0]))) or 1.0
    for got, want, what in zip(short, long, ("E[f f]", "E[f' f']")):
        assert got.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=tol, atol=tol * max(scale, 1.0), err_msg=what
        )


@pytest.mark.parametrize("name", ["relu", "abs", "erf"])
def test_gradients_are_finite_and_agree_inside(name):
    """Derivatives in the covariance: finite at ρ = ±1 (where the infinite derivatives of the angle
    and of sqrt(q1 q2 − c²) cancel), equal to the term-by-term route's for |ρ| < 1."""
    form = F.analyze(FUNCTIONS[name])
    grad = lambda fn, c: jax.grad(lambda c: fn(form, c, jnp.float64(1.0), jnp.float64(1.0))[0])(c)
    for c in (-1.0, -0.6, 0.0, 0.35, 0.9, 1.0):
        g = grad(form_expectations, jnp.float64(c))
        assert np.isfinite(g), (name, c)
        if abs(c) < 1:
            np.testing.assert_allclose(g, grad(term_by_term, jnp.float64(c)), rtol=1e-10)


def test_other_members_keep_the_term_by_term_route():
    c, q1, q2 = _grid(jnp.float64)
    for fn in (lambda x: jax.nn.relu(x) + 1.0, lambda x: jax.nn.relu(x) ** 2, lambda x: erf(x) + 0.5 * x):
        assert common_expectations(F.analyze(fn), c, q1, q2, True) is None


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_gradients_are_finite_at_a_zero_variance(name):
    form = F.analyze(FUNCTIONS[name])
    for argnum in (0, 1):
        g = jax.grad(lambda c, q: sum(jnp.sum(k) for k in form_expectations(form, c, q, q)), argnum)(
            jnp.array([0.0, 0.3]), jnp.array([0.0, 1.0])
        )
        assert np.all(np.isfinite(g)), (name, argnum, g)


_UNIT_CORRELATION = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from ntk_adapters.infinite.common_forms import piecewise_linear_kernels
worst = 0.0
for dtype in (jnp.float32, jnp.float64):
    eps = float(jnp.finfo(dtype).eps)
    q = jnp.asarray(np.random.default_rng(0).uniform(0.01, 100.0, (64, 64)), dtype)
    for p, n in ((1.0, 0.0), (1.0, 0.2), (1.0, -1.0)):
        run = jax.jit(lambda c, q1, q2: piecewise_linear_kernels(p, n, 0.0, c, q1, q2))
        for sign, e_ff, e_dd in ((1.0, (p * p + n * n) / 2, (p * p + n * n) / 2), (-1.0, -p * n, p * n)):
            nngp, dd = run(sign * q, q, q)
            err_ff = float(jnp.max(jnp.abs(nngp - e_ff * q) / q))
            worst = max(worst, err_ff / eps, float(jnp.max(jnp.abs(dd - e_dd))) / eps)
print(worst)
"""


def test_unit_correlation_is_exact_when_compiled():
    """c = ±q1 = ±q2 bitwise gives θ = 0 or π to an ulp in the compiled map. Formed as q1 q2 − c²,
    y² keeps the rounding of c² or of an FMA the compiler forms, and the angle becomes sqrt(ε)
    (E[f' f'] off by 4e-5 in float32). Run with XLA's default optimizations, which form the FMAs
    (the suite's conftest turns them off to compile faster)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _UNIT_CORRELATION], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) <= 8.0, out.stdout

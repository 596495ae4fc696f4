"""``kernel_regression_cg``: any test-set size, and honest reporting of non-convergence.

References are direct solves (``np.linalg.solve``) on the full kernel matrix, and the Krylov
property of conjugate gradients (at most as many iterations as ``K + λI`` has distinct
eigenvalues, in exact arithmetic).
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from ntk_adapters import kernel_regression_cg
from ntk_adapters.kernel_regression import CGConvergenceWarning, KernelRegressionResult


def rbf(x1, x2=None):
    x2 = x1 if x2 is None else x2
    return jnp.exp(-0.5 * jnp.sum((x1[:, None, :] - x2[None, :, :]) ** 2, -1))


def linear(x1, x2=None):
    x2 = x1 if x2 is None else x2
    return x1 @ x2.T


def _rbf_np(a, b):
    return np.exp(-0.5 * np.sum((a[:, None, :] - b[None, :, :]) ** 2, -1))


def _data(n, seed, d=4, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


@pytest.mark.parametrize("n_test", [1, 3, 8, 13, 16, 50])
def test_any_number_of_test_rows_matches_direct_solve(n_test):
    # 37 training rows in tiles of 8 (5 tiles, the last padded); test sets smaller than a tile,
    # equal to one, not a multiple of it, a multiple of it, and larger than the training set.
    n, reg = 37, 1e-2
    x, xt = _data(n, 0), _data(n_test, 1)
    y = np.random.default_rng(2).normal(size=(n, 2))
    res = kernel_regression_cg(rbf, x, y, xt, diag_reg=reg, batch_size=8, tol=1e-13, get=None)
    assert isinstance(res, KernelRegressionResult)
    alpha = np.linalg.solve(_rbf_np(x, x) + reg * np.eye(n), y)
    want = _rbf_np(xt, x) @ alpha
    assert res.test.shape == (n_test, 2)
    np.testing.assert_allclose(res.alpha, alpha, atol=1e-9 * np.abs(alpha).max())
    np.testing.assert_allclose(res.test, want, atol=1e-9 * np.abs(want).max())
    assert res.converged and float(res.residual) < 1e-11


def test_readme_case_float32_test_set_smaller_than_a_tile():
    # Fewer test rows (50) than batch_size (256), float32 inputs and targets.
    x = _data(300, 3, d=8, dtype=np.float32)
    y = np.sin(x[:, :2])
    xt = x[:50] + np.float32(0.1)
    res = kernel_regression_cg(rbf, x, y, xt, diag_reg=1e-2, batch_size=256, get=None)
    assert res.alpha.dtype == jnp.float32 and res.test.dtype == jnp.float32
    assert res.test.shape == (50, 2)
    x64, xt64, y64 = x.astype(float), xt.astype(float), y.astype(float)
    alpha = np.linalg.solve(_rbf_np(x64, x64) + 1e-2 * np.eye(300), y64)
    want = _rbf_np(xt64, x64) @ alpha
    # tol=1e-6 on the residual and κ(K + 0.01 I) ≤ (300 + 0.01)/0.01 bound the error loosely; the
    # predictions are smooth averages and land far closer.
    np.testing.assert_allclose(res.test, want, atol=1e-3 * np.abs(want).max())
    # "converged" is a statement about the returned α, not about CG's running estimate.
    assert res.converged and float(res.residual) <= 1e-6


def test_converged_means_the_true_residual_meets_tol_in_float32():
    # Float32 with a ridge small against the spectrum: the running residual drifts from the true
    # one. Whatever CG does, the flag must agree with a residual recomputed here.
    base = _data(60, 15, dtype=np.float32)
    x = np.concatenate([base, base + np.float32(1e-3)])
    y = np.random.default_rng(16).normal(size=120).astype(np.float32)
    for reg, tol in ((1e-2, 1e-6), (1e-2, 1e-3), (1e-1, 1e-5)):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res = kernel_regression_cg(rbf, x, y, diag_reg=reg, batch_size=32, tol=tol, get=None)
        k = _rbf_np(x.astype(float), x.astype(float))
        alpha = np.asarray(res.alpha, float)
        true = np.linalg.norm(k @ alpha + reg * alpha - y) / np.linalg.norm(y)
        # The reported residual is itself a float32 product: good to float32 round-off of ‖Kα‖.
        np.testing.assert_allclose(float(res.residual), true, rtol=1e-2, atol=1e-5)
        assert res.converged == (float(res.residual) <= tol)
        if res.converged:
            assert true <= tol + 1e-5
        assert res.converged == (not any(issubclass(w.category, CGConvergenceWarning) for w in rec))


def test_one_training_row_and_one_test_row():
    x, xt, y = _data(1, 4), _data(1, 5), np.array([2.0])
    res = kernel_regression_cg(rbf, x, y, xt, diag_reg=0.5, batch_size=4, tol=1e-14, get=None)
    # K = [[1]]: α = y / 1.5, test = k(xt, x) α.
    np.testing.assert_allclose(res.alpha, [2.0 / 1.5], rtol=1e-14)
    np.testing.assert_allclose(res.test, _rbf_np(xt, x)[0] * 2.0 / 1.5, rtol=1e-14)


def test_cg_iterations_bounded_by_distinct_eigenvalues():
    # Linear kernel of 3 features plus λI has 4 distinct eigenvalues (3 + λ's): CG needs at most
    # 4 iterations in exact arithmetic, far fewer than the default cap 10·N.
    n = 40
    x = _data(n, 6, d=3)
    y = np.random.default_rng(7).normal(size=n)
    res = kernel_regression_cg(linear, x, y, diag_reg=0.3, batch_size=16, tol=1e-12, get=None)
    assert res.converged and 1 <= res.iterations <= 5
    np.testing.assert_allclose(res.alpha, np.linalg.solve(x @ x.T + 0.3 * np.eye(n), y), rtol=1e-9, atol=1e-11)


def test_duplicated_points_warn_and_report_the_residual():
    # 10 distinct inputs, each twice, with different targets: K (rank ≤ 10) cannot fit both
    # copies, so (K + 0·I) α = y has no solution and CG cannot reach its tolerance.
    base = _data(10, 8)
    x = np.concatenate([base, base])
    y = np.random.default_rng(9).normal(size=20)
    with pytest.warns(CGConvergenceWarning, match=r"relative residual .* after \d+ iterations") as rec:
        res = kernel_regression_cg(rbf, x, y, diag_reg=0.0, batch_size=8, get=None, maxiter=60)
    message = str(rec[0].message)
    assert "diag_reg" in message and "maxiter" in message
    assert not res.converged and 1 <= res.iterations <= 60
    # The reported residual is the true one of the returned α, recomputed here from K.
    k = _rbf_np(x, x)
    alpha = np.asarray(res.alpha)
    true_residual = np.linalg.norm(k @ alpha - y) / np.linalg.norm(y)
    np.testing.assert_allclose(float(res.residual), true_residual, rtol=1e-6)
    # Half the targets' energy, at least, is orthogonal to range(K): the pairs' differences.
    assert float(res.residual) > 0.1
    assert f"{float(res.residual):.3g}" in message

    # A ridge makes the same system well posed: no warning, and the direct solve's answer.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CGConvergenceWarning)
        res = kernel_regression_cg(rbf, x, y, diag_reg=1e-3, batch_size=8, tol=1e-12, get=None)
    assert res.converged
    alpha = np.linalg.solve(k + 1e-3 * np.eye(20), y)
    np.testing.assert_allclose(res.alpha, alpha, atol=1e-7 * np.abs(alpha).max())


def test_too_few_iterations_warn_with_the_count():
    x = _data(30, 10)
    y = np.random.default_rng(11).normal(size=30)
    with pytest.warns(CGConvergenceWarning, match="after 2 iterations") as rec:
        res = kernel_regression_cg(rbf, x, y, diag_reg=1e-3, batch_size=8, maxiter=2, get=None)
    assert "maxiter" in str(rec[0].message)
    assert res.iterations == 2 and not res.converged


def test_float32_duplicates_also_warn():
    base = _data(12, 12, dtype=np.float32)
    x = np.concatenate([base, base])
    y = np.random.default_rng(13).normal(size=(24, 2)).astype(np.float32)
    with pytest.warns(CGConvergenceWarning):
        res = kernel_regression_cg(rbf, x, y, batch_size=16, get=None, maxiter=100)
    assert res.alpha.dtype == jnp.float32 and not res.converged


def test_zero_targets_and_argument_errors():
    x = _data(9, 14)
    res = kernel_regression_cg(rbf, x, np.zeros(9), batch_size=4, get=None)
    assert res.converged and res.iterations == 0 and float(res.residual) == 0.0
    np.testing.assert_array_equal(res.alpha, np.zeros(9))
    with pytest.raises(ValueError, match="maxiter"):
        kernel_regression_cg(rbf, x, np.ones(9), maxiter=-1, get=None)
    with pytest.raises(ValueError, match="x_test"):
        kernel_regression_cg(rbf, x, np.ones(9), np.ones((0, 4)), get=None)

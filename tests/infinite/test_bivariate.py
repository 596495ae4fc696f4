"""The arc functions behind every closed-form kernel (``ntk_adapters.infinite.bivariate``) against
numpy's and XLA's own ``arctan2`` / ``arccos`` / ``arcsin``: values, signed zeros, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_adapters.infinite.bivariate import _angle, _arcsin, _atan2

SPECIAL_Y = [0.0, 1.0, 2.5, 1e-30, 3e38]
SPECIAL_X = [0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 3e38, -3e38]


def _upper_half_plane(dtype):
    """Points with y ≥ 0 over many scales, the axes, zeros and the diagonals |x| = y."""
    rng = np.random.default_rng(0)
    random = rng.standard_normal((4000, 2)) * np.exp(rng.uniform(-8, 8, (4000, 1)))
    random[:, 0] = np.abs(random[:, 0])
    special = np.array([(y, x) for y in SPECIAL_Y for x in SPECIAL_X])
    diagonal = np.array([(1.0, 1.0), (1.0, -1.0), (3.0, 3.0), (3.0, -3.0)])
    pts = np.concatenate([random, special, diagonal]).astype(dtype)
    return pts[:, 0], pts[:, 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_atan2_equals_numpy_on_the_upper_half_plane(dtype):
    y, x = _upper_half_plane(dtype)
    got = np.asarray(_atan2(jnp.asarray(y), jnp.asarray(x)))
    assert got.dtype == dtype
    np.testing.assert_allclose(got, np.arctan2(y, x), rtol=0, atol=4 * np.finfo(dtype).eps * np.pi)
    assert np.all(got >= 0) and np.all(got <= dtype(np.pi))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_atan2_gradients_equal_those_of_arctan2_and_are_finite_at_the_origin(dtype):
    y, x = _upper_half_plane(dtype)
    keep = (np.maximum(y, np.abs(x)) > 1e-15) & (y < 1e15) & (np.abs(x) < 1e15)
    y, x = y[keep], x[keep]
    mine = jax.vmap(jax.grad(_atan2, (0, 1)))(jnp.asarray(y), jnp.asarray(x))
    r2 = x.astype(np.float64) ** 2 + y.astype(np.float64) ** 2
    for got, by_hand in zip(mine, (x / r2, -y / r2)):
        scale = np.abs(by_hand) + np.finfo(dtype).tiny
        assert np.max(np.abs(np.asarray(got) - by_hand) / scale) < 20 * np.finfo(dtype).eps
    zero = jnp.zeros((), dtype)
    assert float(_atan2(zero, zero)) == 0.0
    assert all(np.isfinite(float(g)) for g in jax.grad(_atan2, (0, 1))(zero, zero))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_angle_and_arcsin_match_numpy_up_to_rho_one(dtype):
    # near ρ = ±1 the angle is ~sqrt(2(1 − |ρ|)): the sine is formed as (1 − ρ)(1 + ρ), exactly
    near = 1 - np.logspace(-1, -np.finfo(dtype).precision, 40)
    rho = np.concatenate([np.linspace(-1, 1, 201), near, -near]).astype(dtype)
    theta, sin_t = (np.asarray(a) for a in _angle(jnp.asarray(rho)))
    r64 = rho.astype(np.float64)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(theta, np.arccos(r64), rtol=4 * eps, atol=4 * eps)
    np.testing.assert_allclose(sin_t, np.sqrt((1 - r64) * (1 + r64)), rtol=4 * eps, atol=4 * eps)
    np.testing.assert_allclose(np.asarray(_arcsin(jnp.asarray(rho))), np.arcsin(r64), rtol=4 * eps, atol=4 * eps)
    grads = jax.vmap(jax.grad(lambda r: _angle(r)[0] + _arcsin(r)))(jnp.asarray(rho))
    assert np.all(np.isfinite(np.asarray(grads)))

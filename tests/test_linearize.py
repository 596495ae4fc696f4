"""linearize and taylor_expand: exact at the expansion point, error O(|δ|^(degree+1))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters
from ntk_adapters.linearize import linearize, taylor_expand


def net(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.sin(h @ params["w2"])


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {
        "w1": jax.random.normal(k[0], (3, 6)),
        "b1": jax.random.normal(k[1], (6,)),
        "w2": jax.random.normal(k[2], (6, 2)),
    }
    direction = jax.tree_util.tree_map(lambda p: jax.random.normal(k[3], p.shape), params)
    x = jax.random.normal(k[4], (5, 3))
    return params, direction, x


def _moved(params, direction, eps):
    return jax.tree_util.tree_map(lambda p, d: p + eps * d, params, direction)


@pytest.mark.parametrize("degree", [1, 2, pytest.param(3, marks=pytest.mark.float64)])
def test_taylor_error_shrinks_with_the_right_order(setup, degree):
    params, direction, x = setup
    approx = taylor_expand(net, params, degree)
    errors = []
    for eps in (1e-2, 5e-3):
        moved = _moved(params, direction, eps)
        errors.append(float(jnp.max(jnp.abs(approx(moved, x) - net(moved, x)))))
    order = np.log2(errors[0] / errors[1])
    assert abs(order - (degree + 1)) < 0.2, (errors, order)


@pytest.mark.float64
def test_linearize_is_degree_one_and_exact_at_the_expansion_point(setup):
    params, direction, x = setup
    lin = linearize(net, params)
    np.testing.assert_allclose(lin(params, x), net(params, x), rtol=1e-14)
    moved = _moved(params, direction, 0.3)
    np.testing.assert_allclose(lin(moved, x), taylor_expand(net, params, 1)(moved, x), rtol=1e-12)
    # Linear in the parameters: f_lin(p0 + 2δ) − f_lin(p0) = 2 (f_lin(p0 + δ) − f_lin(p0)).
    twice = _moved(params, direction, 0.6)
    np.testing.assert_allclose(lin(twice, x) - lin(params, x), 2 * (lin(moved, x) - lin(params, x)), rtol=1e-10)


def test_degree_zero_is_constant(setup):
    params, direction, x = setup
    const = taylor_expand(net, params, 0)
    np.testing.assert_allclose(const(_moved(params, direction, 1.0), x), net(params, x))


@pytest.mark.float64
def test_model_in_model_out_and_same_ntk_at_the_expansion_point(setup):
    params, _, x = setup
    model = ntk_adapters.adapt(net, params, x)
    lin = linearize(model, params)
    assert isinstance(lin, ntk_adapters.Model) and lin.framework == "function"
    ntk = ntk_adapters.empirical.empirical_ntk_fn
    np.testing.assert_allclose(ntk(lin)(x), ntk(model)(x), rtol=1e-10)


def test_bad_arguments(setup):
    params, _, x = setup
    with pytest.raises(ValueError, match="degree must be a non-negative int"):
        taylor_expand(net, params, -1)
    model = ntk_adapters.adapt(net, params, x)
    with pytest.raises(ValueError, match="params0 do not match the model"):
        linearize(model, {"w1": params["w1"]})

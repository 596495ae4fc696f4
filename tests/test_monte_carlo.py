"""monte_carlo_kernel_fn: running means over initializations, checked against a direct loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters
from ntk_adapters.empirical import empirical_nngp_fn, empirical_ntk_fn
from ntk_adapters.monte_carlo import monte_carlo_kernel_fn


def net(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"] / np.sqrt(params["w1"].shape[1])


def init(key, x):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (x.shape[1], 16)), "w2": jax.random.normal(k2, (16, 2))}


@pytest.fixture(scope="module")
def model_and_x():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    return ntk_adapters.adapt(net, init(jax.random.PRNGKey(1), x), x, init_fn=init), x


@pytest.mark.float64
def test_running_estimates_equal_the_mean_of_per_sample_kernels(model_and_x):
    model, x = model_and_x
    x2 = x[:2] + 1.0
    key = jax.random.PRNGKey(5)
    out = monte_carlo_kernel_fn(model, key, [2, 5], batch_size=2)(x, x2)
    samples = [init(jax.random.fold_in(key, i), x) for i in range(5)]
    nngps = [empirical_nngp_fn(model)(x, x2, p) for p in samples]
    ntks = [empirical_ntk_fn(model)(x, x2, p) for p in samples]
    for count in (2, 5):
        np.testing.assert_allclose(out[count].nngp, np.mean(nngps[:count], 0), rtol=1e-10)
        np.testing.assert_allclose(out[count].ntk, np.mean(ntks[:count], 0), rtol=1e-10)


def test_single_count_and_get(model_and_x):
    model, x = model_and_x
    fn = monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), 3, get="ntk", trace_axes=())
    assert fn(x).shape == (3, 3, 2, 2)
    assert fn(x, get="nngp").shape == (3, 3, 2, 2)


def test_bad_arguments(model_and_x):
    model, x = model_and_x
    with pytest.raises(ValueError, match="increasing list"):
        monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), [4, 2])
    with pytest.raises(ValueError, match="needs a model that can draw fresh parameters"):
        monte_carlo_kernel_fn(ntk_adapters.adapt(net, model.params), jax.random.PRNGKey(0), 2)
    with pytest.raises(ValueError, match="unknown kernel 'cov'"):
        monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), 2)(x, get="cov")


def test_a_kernel_function_resolves_each_input_shape_and_request_once(monkeypatch, model_and_x):
    """Output axes, vmap_axes and the implementation follow from shapes, dtypes and the kernels
    asked for: worked out on the first such call and reused after, with the same estimates."""
    import ntk_adapters.monte_carlo as MC

    model, x = model_and_x
    calls = []
    original = MC.output_axes
    monkeypatch.setattr(MC, "output_axes", lambda *a, **k: calls.append(1) or original(*a, **k))
    fn = monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), 3)
    first = fn(x)
    np.testing.assert_allclose(fn(x + 0.0).ntk, first.ntk, rtol=1e-12)
    assert len(calls) == 1
    fn(x, get="nngp")  # another request: resolved again
    fn(x[:2])  # another batch size
    fn(x, get="nngp")
    assert len(calls) == 3

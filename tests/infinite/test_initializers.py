"""Exact initializer variances against large-sample variances of the real initializers."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ntk_adapters.infinite import initializers

SHAPE = (40, 30)
CONV_SHAPE = (3, 3, 8, 5)
N_SAMPLES = 400  # 400 draws of a 1200-entry weight: 480k samples, relative std of a variance ~0.3%


def _sample_jax(init, shape):
    keys = jax.random.split(jax.random.PRNGKey(0), N_SAMPLES)
    return np.asarray(jax.vmap(lambda k: init(k, shape, jnp.float64))(keys))


def _sample_haiku(init, shape):
    f = hk.transform(lambda: hk.get_parameter("w", shape, jnp.float64, init=init))
    keys = jax.random.split(jax.random.PRNGKey(1), N_SAMPLES)
    return np.asarray(jax.vmap(lambda k: f.init(k)["~"]["w"])(keys))


JAX_CASES = [
    ("lecun_normal", nn.initializers.lecun_normal(), SHAPE),
    ("he_normal", nn.initializers.he_normal(), SHAPE),
    ("glorot_uniform", nn.initializers.glorot_uniform(), SHAPE),
    ("glorot_normal_conv", nn.initializers.glorot_normal(), CONV_SHAPE),
    ("he_uniform_conv", nn.initializers.he_uniform(), CONV_SHAPE),
    ("variance_scaling_fan_out_normal", nn.initializers.variance_scaling(3.0, "fan_out", "normal"), SHAPE),
    ("normal", nn.initializers.normal(0.3), SHAPE),
    ("truncated_normal", nn.initializers.truncated_normal(0.5), SHAPE),
    ("truncated_normal_asym", nn.initializers.truncated_normal(0.5, lower=-1.0, upper=3.0), SHAPE),
    ("lecun_uniform", nn.initializers.lecun_uniform(), CONV_SHAPE),
]

HAIKU_CASES = [
    ("TruncatedNormal", hk.initializers.TruncatedNormal(0.7), SHAPE),
    ("TruncatedNormal_mean", hk.initializers.TruncatedNormal(0.7, mean=0.2), SHAPE),
    ("RandomNormal", hk.initializers.RandomNormal(0.4), SHAPE),
    ("RandomUniform", hk.initializers.RandomUniform(-0.3, 0.5), SHAPE),
    ("VarianceScaling", hk.initializers.VarianceScaling(2.0), SHAPE),
    ("VarianceScaling_avg_uniform", hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform"), CONV_SHAPE),
    ("VarianceScaling_normal_conv", hk.initializers.VarianceScaling(1.5, "fan_in", "normal"), CONV_SHAPE),
]


def _check(samples, mean, var):
    n = samples.size
    emp_mean, emp_var = samples.mean(), samples.var()
    # Tolerances: 5 standard errors of the sample mean and of the sample variance.
    assert abs(emp_mean - mean) < 5 * np.sqrt(var / n) + 1e-12
    fourth = np.mean((samples - emp_mean) ** 4)
    assert abs(emp_var - var) < 5 * np.sqrt((fourth - emp_var**2) / n)


@pytest.mark.parametrize("name,init,shape", JAX_CASES, ids=[c[0] for c in JAX_CASES])
def test_jax_initializer_moments(name, init, shape):
    mean, var = initializers.moments(init, shape)
    _check(_sample_jax(init, shape), mean, var)


@pytest.mark.parametrize("name,init,shape", HAIKU_CASES, ids=[c[0] for c in HAIKU_CASES])
def test_haiku_initializer_moments(name, init, shape):
    mean, var = initializers.moments(init, shape)
    _check(_sample_haiku(init, shape), mean, var)


def test_truncated_normal_closed_form():
    # Var of N(0,1) truncated to [-2, 2]: 1 - 4 phi(2) / (Phi(2) - Phi(-2)), by hand.
    phi2 = np.exp(-2.0) / np.sqrt(2 * np.pi)
    from math import erf

    z = erf(2 / np.sqrt(2))
    mean, var = initializers.truncated_normal_moments(-2.0, 2.0)
    assert mean == pytest.approx(0.0, abs=1e-15)
    assert var == pytest.approx(1 - 4 * phi2 / z, rel=1e-14)
    assert var == pytest.approx(0.7737413, abs=1e-7)


def test_flax_lecun_normal_is_exactly_one_over_fan_in():
    assert initializers.variance(nn.initializers.lecun_normal(), (64, 7)) == pytest.approx(1 / 64, rel=1e-12)


def test_zeros_ones_constant():
    assert initializers.moments(nn.initializers.zeros, (3,)) == (0.0, 0.0)
    assert initializers.moments(nn.initializers.zeros_init(), (3,)) == (0.0, 0.0)
    assert initializers.moments(nn.initializers.ones, (3,)) == (1.0, 0.0)
    assert initializers.moments(nn.initializers.constant(0.5), (3,)) == (0.5, 0.0)
    assert initializers.moments(jnp.zeros, (3,)) == (0.0, 0.0)
    assert initializers.moments(hk.initializers.Constant(2.0), (3,)) == (2.0, 0.0)


def test_unknown_initializer_is_an_error():
    with pytest.raises(initializers.UnknownInitializerError, match="weight_variance"):
        initializers.moments(lambda key, shape, dtype=None: jnp.zeros(shape), (3, 3))
    with pytest.raises(initializers.UnknownInitializerError):
        initializers.moments(nn.initializers.orthogonal(), (3, 3))


def test_nonzero_mean_is_an_error_for_variance():
    with pytest.raises(initializers.UnknownInitializerError, match="non-zero mean"):
        initializers.variance(nn.initializers.ones, (3,))

"""No reduced-precision product in a kernel, or in a solve with one.

A CPU computes float32 products exactly whatever the precision says, so TensorFloat-32 (the GPU
default) cannot be seen in the values here. What reaches the compiler can: every matrix product
and convolution of the lowered program (StableHLO) carries its precision. These tests lower each
kernel function (empirical, Monte Carlo, infinite width) and each predictor and solver that uses
a kernel, and require HIGHEST on every ``dot_general`` and ``convolution`` (the model's forward
and backward products and the library's contractions alike), and require that
``precision='default'`` removes it where the argument exists, so that the check itself can fail.
"""

from __future__ import annotations

import re

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters.flax
import ntk_adapters.haiku
from ntk_adapters import (
    empirical_kernel_fn,
    empirical_nngp_fn,
    empirical_ntk_fn,
    kernel_regression_cg,
    monte_carlo_kernel_fn,
    predict,
)
from ntk_adapters.axes import OutputAxes
from ntk_adapters.infinite import infinite_kernel_fn
from ntk_adapters.structured import structured_contributions

_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b")
_DOT = re.compile(r"precision = \[(\w+), (\w+)\]")
_CONV = re.compile(r"precision_config = \[#stablehlo<precision (\w+)>, #stablehlo<precision (\w+)>\]")


_GROUPS = re.compile(r"feature_group_count = (\d+)")


def product_precisions(fn, *args, grouped: bool = False) -> list[tuple]:
    """``(op, (lhs, rhs) precision)`` of every matrix product and convolution ``fn`` lowers to;
    an op printed without a precision has the DEFAULT one. ``grouped`` adds whether a
    convolution is grouped (``feature_group_count > 1``)."""
    return precisions_in(jax.jit(fn).lower(*args).as_text(), grouped)


def precisions_in(text: str, grouped: bool = False) -> list[tuple]:
    """:func:`product_precisions` of a lowered program's text."""
    found = []
    for line in text.splitlines():
        op = _OP.search(line)
        if op is None:
            continue
        m = (_DOT if op.group(1) == "dot_general" else _CONV).search(line)
        entry = (op.group(1), m.groups() if m else ("DEFAULT", "DEFAULT"))
        if grouped:
            g = _GROUPS.search(line)
            entry += (bool(g and int(g.group(1)) > 1),)
        found.append(entry)
    return found


def assert_all_highest(found):
    assert found, "the program has no matrix product: the check would be vacuous"
    low = [f for f in found if f[1] != ("HIGHEST", "HIGHEST")]
    assert not low, f"{len(low)} of {len(found)} products are not HIGHEST: {low[:3]}"


def assert_some_default(found):
    assert any(f[1] == ("DEFAULT", "DEFAULT") for f in found), found[:3]


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def conv_net(p, x):
    y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y).reshape(x.shape[0], -1) @ p["w"]


def _mlp_case():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {
        "w1": jax.random.normal(k[0], (6, 16), jnp.float32),
        "b1": jnp.zeros(16, jnp.float32),
        "w2": jax.random.normal(k[1], (16, 3), jnp.float32) / 4,
    }
    return mlp, p, jax.random.normal(k[2], (5, 6), jnp.float32)


def _conv_case():
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    p = {
        "k": jax.random.normal(k[0], (3, 3, 2, 4), jnp.float32) / 4,
        "w": jax.random.normal(k[1], (5 * 5 * 4, 2), jnp.float32) / 10,
    }
    return conv_net, p, jax.random.normal(k[2], (3, 5, 5, 2), jnp.float32)


CASES = {"mlp": _mlp_case, "conv": _conv_case}
IMPLEMENTATIONS = [("jacobian", None), ("jacobian", 0), ("ntvp", None), ("structured", None), ("structured", 0)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("implementation,vmap_axes", IMPLEMENTATIONS)
def test_every_product_of_the_ntk_is_highest_by_default(case, implementation, vmap_axes):
    f, p, x = CASES[case]()
    ntk = empirical_ntk_fn(f, implementation=implementation, vmap_axes=vmap_axes)
    found = product_precisions(lambda x: ntk(x, None, p), x)
    assert_all_highest(found)
    if case == "conv":
        assert any(op == "convolution" for op, _ in found)
    # The cross kernel traces the model on two inputs and contracts two different Jacobians.
    x2 = x[:2] + 1
    assert_all_highest(product_precisions(lambda a, b: ntk(a, b, p), x, x2))


@pytest.mark.parametrize("implementation,vmap_axes", IMPLEMENTATIONS)
def test_precision_default_leaves_products_to_jax(implementation, vmap_axes):
    f, p, x = _conv_case()
    ntk = empirical_ntk_fn(f, implementation=implementation, vmap_axes=vmap_axes, precision="default")
    found = product_precisions(lambda x: ntk(x, None, p), x, grouped=True)
    assert any(pr == ("DEFAULT", "DEFAULT") for _, pr, _ in found), found[:3]
    # What stays HIGHEST is only the extraction of convolution patches ('structured'): a grouped
    # convolution with a one-hot filter, an exact copy that rounding would spoil.
    kept = [(op, pr, g) for op, pr, g in found if pr != ("DEFAULT", "DEFAULT")]
    assert all(op == "convolution" and g and pr == ("HIGHEST", "HIGHEST") for op, pr, g in kept), kept


def test_high_and_lax_precision_values():
    f, p, x = _mlp_case()
    high = product_precisions(lambda x: empirical_ntk_fn(f, precision="high")(x, None, p), x)
    assert high and all(pr == ("HIGH", "HIGH") for _, pr in high)
    lax_highest = empirical_ntk_fn(f, precision=jax.lax.Precision.HIGHEST)
    assert_all_highest(product_precisions(lambda x: lax_highest(x, None, p), x))


def test_trace_axes_empty_and_by_layer_are_highest():
    f, p, x = _conv_case()
    full = empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)
    assert_all_highest(product_precisions(lambda x: full(x, None, p), x))
    layers = empirical_ntk_fn(f, by_layer=True, vmap_axes=0, implementation="structured")
    assert_all_highest(product_precisions(lambda x: layers(x, None, p), x))


def test_nngp_and_kernel_fn():
    f, p, x = _conv_case()
    nngp = empirical_nngp_fn(f)
    assert_all_highest(product_precisions(lambda x: nngp(x, None, p), x))
    assert_some_default(product_precisions(lambda x: empirical_nngp_fn(f, precision="default")(x, None, p), x))
    both = empirical_kernel_fn(f, vmap_axes=0)
    assert_all_highest(product_precisions(lambda x: tuple(both(x, None, ("nngp", "ntk"), p)), x))


def test_structured_contributions_directly():
    f, p, x = _conv_case()
    axes = OutputAxes.make(2, (-1,), ())
    parts = lambda prec: lambda x: structured_contributions(f, p, x, None, axes, 0, precision=prec)
    assert_all_highest(product_precisions(parts("highest"), x))
    assert_some_default(product_precisions(parts("default"), x))


class _LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def linen_model():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 5, 2)), jnp.float32)
    module = _LinenCNN()
    return ntk_adapters.flax.adapt(module, module.init(jax.random.PRNGKey(0), x), x), x


def test_linen_layers_and_monte_carlo(linen_model):
    model, x = linen_model
    for impl in ("structured", "jacobian", "ntvp"):
        ntk = empirical_ntk_fn(model, implementation=impl)
        assert_all_highest(product_precisions(lambda x, ntk=ntk: ntk(x), x))
    mc = monte_carlo_kernel_fn(model, jax.random.PRNGKey(1), 2, batch_size=2)
    assert_all_highest(product_precisions(lambda x: tuple(mc(x)), x))
    mc_default = monte_carlo_kernel_fn(model, jax.random.PRNGKey(1), 2, batch_size=2, precision="default")
    assert_some_default(product_precisions(lambda x: tuple(mc_default(x)), x))


def test_haiku_layers():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)), jnp.float32)
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 2])(x)))
    model = ntk_adapters.haiku.adapt(net, net.init(jax.random.PRNGKey(0), x), x)
    assert_all_highest(product_precisions(lambda x: empirical_ntk_fn(model)(x), x))


def test_a_layer_with_its_own_precision_keeps_it():
    # Documented: the context only reaches products that do not choose a precision themselves.
    f = lambda p, x: jnp.dot(x, p["w"], precision=jax.lax.Precision.DEFAULT)
    p = {"w": jnp.ones((4, 2), jnp.float32)}
    x = jnp.ones((3, 4), jnp.float32)
    found = product_precisions(lambda x: empirical_ntk_fn(f, implementation="jacobian")(x, None, p), x)
    assert ("dot_general", ("DEFAULT", "DEFAULT")) in found
    assert ("dot_general", ("HIGHEST", "HIGHEST")) in found  # the library's J1 J2ᵀ


@pytest.mark.float64  # needs 64-bit floats for its reference
@pytest.mark.parametrize("implementation,vmap_axes", IMPLEMENTATIONS)
def test_float32_kernel_matches_float64(implementation, vmap_axes):
    # The precision plumbing must not change values: float32 against the float64 kernel.
    f, p, x = _conv_case()
    ntk32 = np.asarray(empirical_ntk_fn(f, implementation=implementation, vmap_axes=vmap_axes)(x, None, p))
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
    ntk64 = np.asarray(
        empirical_ntk_fn(f, implementation=implementation, vmap_axes=vmap_axes)(x.astype(jnp.float64), None, p64)
    )
    assert ntk32.dtype == np.float32 and ntk64.dtype == np.float64
    np.testing.assert_allclose(ntk32, ntk64, rtol=2e-5, atol=2e-5 * np.abs(ntk64).max())


def test_bad_precision_names_the_argument():
    f, p, x = _mlp_case()
    with pytest.raises(ValueError, match="precision='fp32'"):
        empirical_ntk_fn(f, precision="fp32")
    with pytest.raises(ValueError, match="precision='low'"):
        empirical_nngp_fn(f, precision="low")


# --------------------------------------------------------------------------------------------
# Infinite width: the rules' input Grams, the quadrature of elementwise functions, ...


class _InfiniteMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(16)(x))  # no closed form: Gauss–Hermite quadrature, a matrix product
        return nn.Dense(2)(jnp.sin(nn.Dense(16)(x)))


class _InfiniteCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(2)(x.mean((1, 2)))


@pytest.fixture(scope="module")
def infinite_models():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    images = jnp.asarray(rng.standard_normal((3, 5, 5, 2)), jnp.float32)
    return [
        (ntk_adapters.flax.adapt(_InfiniteMLP(), None, x), x),
        (ntk_adapters.flax.adapt(_InfiniteCNN(), None, images), images),
    ]


def test_infinite_width_kernels_are_highest_by_default(infinite_models):
    for model, x in infinite_models:
        kernel_fn = infinite_kernel_fn(model)
        assert_all_highest(product_precisions(lambda a, k=kernel_fn: tuple(k(a)), x))
        assert_all_highest(product_precisions(lambda a, b, k=kernel_fn: tuple(k(a, b)), x, x[:2] + 1))


def test_infinite_width_precision_default_leaves_products_to_jax(infinite_models):
    model, x = infinite_models[0]
    found = product_precisions(lambda a: tuple(infinite_kernel_fn(model, precision="default")(a)), x)
    assert_some_default(found)
    high = product_precisions(lambda a: tuple(infinite_kernel_fn(model, precision="high")(a)), x)
    assert high and all(pr == ("HIGH", "HIGH") for _, pr in high)
    with pytest.raises(ValueError, match="precision='fp32'"):
        infinite_kernel_fn(model, precision="fp32")


# --------------------------------------------------------------------------------------------
# Predictors and solvers: each product with a kernel, whatever the kernel's own precision was.


def _train_kernels():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 6))
    k = jnp.asarray(a @ a.T / 6 + np.eye(6), jnp.float32)
    return (
        k,
        jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((3, 6)), jnp.float32),
    )


@pytest.mark.parametrize("t", [None, 1.0, [0.5, 2.0]])
def test_gradient_descent_mse_is_highest(t):
    k, y, kt = _train_kernels()
    fn = lambda k, y, kt: predict.gradient_descent_mse(k, y)(t, 0.0, 0.0, kt)
    assert_all_highest(product_precisions(fn, k, y, kt))


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_gradient_descent_ode_is_highest(momentum):
    k, y, kt = _train_kernels()
    loss = lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)
    fn = lambda k, y, kt: predict.gradient_descent(loss, k, y, momentum=momentum)(1.0, 0.0, 0.0, kt)
    assert_all_highest(product_precisions(fn, k, y, kt))


def test_gp_inference_and_ensemble_are_highest(infinite_models):
    k, y, kt = _train_kernels()
    fn = lambda k, y, kt: predict.gp_inference(k, y, diag_reg=1e-3)("nngp", kt, jnp.eye(3))
    assert_all_highest(product_precisions(fn, k, y, kt))
    model, x = infinite_models[0]
    kernel_fn = infinite_kernel_fn(model)
    for t in (None, 1.0):
        ens = lambda x, y, xt, t=t: predict.gradient_descent_mse_ensemble(kernel_fn, x, y)(
            t, xt, "ntk", compute_cov=True
        )
        assert_all_highest(product_precisions(ens, x, y[:4], x[:2] + 1))


def test_kernel_regression_cg_is_highest(infinite_models, monkeypatch):
    model, x = infinite_models[0]
    kernel_fn = infinite_kernel_fn(model)
    y = jnp.ones((4, 2), jnp.float32)
    # The solve is one compiled program, built inside the call: record it and its arguments.
    calls = []
    original = jax.jit

    def recording_jit(fn, *args, **kwargs):
        jitted = original(fn, *args, **kwargs)
        if getattr(fn, "__name__", "") != "solve":
            return jitted

        def call(*a, **k):
            calls.append((jitted, a, k))
            return jitted(*a, **k)

        return call

    monkeypatch.setattr(jax, "jit", recording_jit)
    kernel_regression_cg(kernel_fn, x, y, x[:2] + 1, batch_size=2)
    monkeypatch.undo()
    assert len(calls) == 1
    jitted, args, kwargs = calls[0]
    assert_all_highest(precisions_in(jitted.lower(*args, **kwargs).as_text()))

"""The library on the example zoo: models copied from the official Flax and Haiku examples.

For every entry: it adapts with its documented keyword arguments; the batch-independence analysis
agrees with the framework-level fact recorded in the catalog (and refuses vmap_axes=0 where
examples provably interact); the empirical NTK of every implementation agrees with the
whole-batch Jacobian contraction; by_layer adds up; the linearization is first-order accurate;
Monte Carlo over one initialization is the empirical NTK at that initialization; the
infinite-width kernel exists or is refused with an error naming the layer and the operation.
A few entries are also trained beside their linearization with compare_training.
"""

from __future__ import annotations

import functools
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters
import ntk_adapters.flax
import ntk_adapters.haiku
from ntk_adapters import InfiniteWidthError, compare_training, empirical_ntk_fn, linearize, monte_carlo_kernel_fn
from ntk_adapters.independence import find_model_coupling
from ntk_adapters.inputs import rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the zoo lives in examples/, next to the package
    sys.path.insert(0, str(ROOT))

from examples.zoo import catalog  # noqa: E402

NAMES = [entry.name for entry in catalog.ENTRIES]

# What the infinite-width engine says where the catalog expects a refusal: the layer it names and
# a pattern of the operation and the reason. Every refusal must name both.
MAX_POOL = (
    r"at primitive reduce_window_max: max pooling has no exact infinite-width kernel .*; average pooling "
    r"\(`nn\.avg_pool` / `hk\.avg_pool`\) has one"
)
EMBEDDING = r"at primitive gather.*: an embedding lookup \(a parameter table indexed by integer ids\)"
REFUSALS = {
    "flax_linen_resnet18_train": ("bn_init", "BatchNorm in training mode"),
    "flax_linen_resnet18_eval": ("ResNet", MAX_POOL),
    "flax_linen_sst2_lstm": (
        "embedder",
        r"computed from input leaf x\[0\] .*" + EMBEDDING + r" outside every embedding layer with a rule",
    ),
    "flax_linen_vae_reconstruction": ("VAE", "at primitive mul: .*non-scalar constant"),
    "flax_nnx_mnist_cnn_train": ("batch_norm1", "BatchNorm in training mode"),
    "flax_nnx_count_mlp": (
        "linear1",
        r"\(examples\.zoo\.flax_nnx_functional_api\.Linear\) at primitive dot_general: "
        r"a matrix product outside every layer with a rule",
    ),
    "haiku_resnet18_train": ("res_net", MAX_POOL),
    "haiku_resnet18_eval": ("res_net", MAX_POOL),
}

# Kernels are float32 (the examples' parameters): agreement to float32 round-off of the largest entry.
RTOL = 2e-5


def adapt(entry, built):
    adapter = ntk_adapters.haiku.adapt if entry.framework == "haiku" else ntk_adapters.flax.adapt
    return adapter(built["module"], built["variables"], built["x"], **built["adapt_kwargs"])


@functools.lru_cache(maxsize=None)
def _built(name):
    # Cached by name rather than by fixture scope: pytest tears a parametrized fixture down
    # whenever the next test uses another entry, and rebuilding means recompiling.
    entry = catalog.get(name)
    built = entry.make()
    model = adapt(entry, built)
    reference = np.asarray(empirical_ntk_fn(model, vmap_axes=None, implementation="jacobian")(built["x"]))
    return entry, model, built["x"], reference


# One xdist group per entry: its tests share the adapted model and reference kernel on one worker
# (pytest runs with --dist loadgroup).
@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in NAMES])
def zoo(request):
    return _built(request.param)


def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * max(np.abs(b).max(), 1e-6))


def test_adapts_with_the_recorded_output_shape(zoo):
    entry, model, x, reference = zoo
    assert model.output_shape == entry.output_shape[1:]
    n = entry.output_shape[0]
    assert reference.shape[:2] == (n, n)
    assert np.all(np.isfinite(reference)) and np.abs(reference).max() > 0


def test_batch_independence_analysis_agrees_with_the_framework(zoo):
    entry, model, x, _ = zoo
    coupling = find_model_coupling(model, x)
    if coupling is None:
        assert entry.batch_independent, f"{entry.name}: proven independent, but the catalog says otherwise"
    elif coupling.certain:
        assert not entry.batch_independent, coupling.message()
        with pytest.raises(ValueError, match=re.escape(coupling.layer)):
            empirical_ntk_fn(model, vmap_axes=0)(x)
    # An uncertain coupling (random draws in the batch's shape) keeps the exact whole-batch path.


@pytest.mark.parametrize("implementation", ["structured", "ntvp"])
def test_every_implementation_agrees_with_the_jacobian_contraction(zoo, implementation):
    entry, model, x, reference = zoo
    if implementation == "structured":
        parts = empirical_ntk_fn(model, implementation="structured", by_layer=True)(x)
        assert len(parts) >= 2
        got = sum(parts.values())
    else:
        got = empirical_ntk_fn(model, implementation="ntvp")(x)
    close(got, reference)


def test_linearization_error_is_second_order(zoo):
    """The linearization equals the model at params0, and its error shrinks much faster than the
    step (Taylor: 16× for a 4× smaller step; an error linear in the step would shrink 4×)."""
    entry, model, x, _ = zoo
    params = model.params
    lin = jax.jit(linearize(model, params).apply_fn)
    f = jax.jit(model.apply_fn)
    f0 = np.asarray(f(params, x))
    np.testing.assert_allclose(lin(params, x), f0, rtol=1e-6, atol=1e-6)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    direction = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, p.shape, p.dtype) * (jnp.std(p) + 0.1) for k, p in zip(keys, leaves)]
    )

    def error(scale):
        moved = jax.tree_util.tree_map(lambda p, d: p + scale * d, params, direction)
        return np.abs(np.asarray(lin(moved, x)) - np.asarray(f(moved, x))).max()

    large, small = error(0.04), error(0.01)
    scale = max(np.abs(f0).max(), 1e-3)
    assert large > 1e-5 * scale, "the step must move the model beyond float32 round-off"
    assert large / small > 8 or small < 1e-5 * scale, (large, small)


def test_monte_carlo_of_one_draw_is_the_empirical_ntk_at_that_draw(zoo):
    entry, model, x, _ = zoo
    key = jax.random.PRNGKey(7)
    mc = monte_carlo_kernel_fn(model, key, 1, get="ntk", batch_size=1)(x)
    drawn = model.init_fn(jax.random.fold_in(key, 0), x)
    # The reference kernel's settings: its compiled program is reused (the implementations agree,
    # as checked above).
    close(mc, empirical_ntk_fn(model, vmap_axes=None, implementation="jacobian")(x, None, drawn))


def test_infinite_width_kernel_or_a_refusal_naming_layer_and_operation(zoo):
    entry, model, x, _ = zoo
    if entry.name not in REFUSALS:
        assert entry.infinite_width == catalog.OK
        if entry.infinite_kwargs:
            # Attention: refused by default, a kernel in the limit the entry names.
            with pytest.raises(InfiniteWidthError, match="attention='infinite_heads'"):
                ntk_adapters.infinite_kernel_fn(model)(x)
        k = ntk_adapters.infinite_kernel_fn(model, **entry.infinite_kwargs)(x)
        n = entry.output_shape[0]
        assert k.ntk.shape[:2] == (n, n) and np.all(np.isfinite(k.ntk)) and np.all(np.isfinite(k.nngp))
        return
    layer, operation = REFUSALS[entry.name]
    with pytest.raises(InfiniteWidthError) as err:
        ntk_adapters.infinite_kernel_fn(model)(x)
    assert re.search(operation, str(err.value)), str(err.value)
    assert f"`{layer}" in str(err.value) or not layer, str(err.value)


@pytest.mark.parametrize("name", ["flax_linen_mnist_cnn", "haiku_mnist_mlp"])
def test_compare_training_follows_the_linearization_for_a_few_small_steps(name):
    entry = catalog.get(name)
    built = entry.make()
    model = adapt(entry, built)
    x = built["x"]
    n = entry.output_shape[0]
    train, test = rows(x, slice(0, n - 1)), rows(x, slice(n - 1, n))
    y = jax.random.normal(jax.random.PRNGKey(1), (n - 1,) + entry.output_shape[1:])
    size = (n - 1) * int(np.prod(entry.output_shape[1:]))
    full = np.asarray(empirical_ntk_fn(model, trace_axes=())(train))  # (N, N, O, O)
    lam = np.linalg.eigvalsh(full.transpose(0, 2, 1, 3).reshape(size, size)).max()
    eta = 0.1 * 2 * size / lam  # a tenth of η_max
    result = compare_training(
        model, train, y, test, learning_rate=eta, steps=10, eval_every=1, infinite=False, progress=False
    )
    network = result.outputs_train["network"]
    first, moved = np.abs(network[1] - network[0]).max(), np.abs(network[-1] - network[0]).max()
    assert first > 0
    # One small step: the network and its linearization differ at second order only. (These tiny
    # networks are far from their linearization after many steps; wide ones are tested elsewhere.)
    assert np.sqrt(np.mean((network[1] - result.outputs_train["linearized"][1]) ** 2)) < 0.1 * first
    # The linearization follows the closed-form NTK prediction up to the discretization of time.
    assert result.discrepancy_train["linearized-ntk"][-1] < 0.1 * moved

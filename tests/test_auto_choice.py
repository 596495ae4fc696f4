"""``implementation='auto'``: the cost model and the choice it makes, on shapes where the answer is
clear by arithmetic. No timing here (speed is measured by ``benchmarks/auto_choice.py``).

Hand-derived facts used below, for ``N`` examples, ``O`` outputs, ``P`` parameters and ``F`` the
multiply-adds of one example's forward pass: the per-example Jacobian costs ``N·O`` backward
passes (``2F`` each) plus ``N²·O·P`` for ``J Jᵀ``; NTK-vector products cost ``N·O`` pairs of a
VJP and a JVP over the whole batch, ``4·N²·O·F``; so with ``P ≫ N·O`` NTK-vector products are
about ``N`` times the work and must not be chosen.
"""

from __future__ import annotations

import math
import pathlib
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_adapters import implementations
from ntk_adapters.axes import OutputAxes
from ntk_adapters.implementations import choose, implementation_costs, resolve_memory_budget
from ntk_adapters.inputs import parse_vmap_axes, resolve_vmap_axes

TRACED = OutputAxes.make(2, (-1,), ())
PER_EXAMPLE = parse_vmap_axes(0)


def linear(p, x):
    return x @ p["w"]


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_costs_of_a_linear_model_match_the_hand_count():
    n, d, o = 6, 1000, 50
    p, x = {"w": spec((d, o))}, spec((n, d))
    costs = implementation_costs(linear, p, x, None, TRACED, PER_EXAMPLE)
    f, params = d * o, d * o
    jac = n * o * 2 * f + n * n * o * params
    ntvp = 4 * n * n * o * f
    # The model's few shape-only steps (reshape, squeeze) add a little to the matrix product.
    assert costs["jacobian"]["flops"] == pytest.approx(jac, rel=0.05)
    assert costs["ntvp"]["flops"] == pytest.approx(ntvp, rel=0.05)
    # Jacobians stored: N·O·P float32 values.
    assert costs["jacobian"]["bytes"] >= n * o * params * 4
    # 'ntvp' with chunk ≥ N·O basis vectors holds N·O parameter-sized tangents: no saving.
    assert costs["ntvp"]["bytes"] >= n * o * params * 4


def test_whole_batch_costs_grow_with_the_batch():
    # Without vmap_axes each of the N·O cotangents runs through the whole batch: N² backward passes.
    p = {"w": spec((200, 10))}
    small = implementation_costs(linear, p, spec((4, 200)), None, TRACED, None)["jacobian"]["flops"]
    large = implementation_costs(linear, p, spec((8, 200)), None, TRACED, None)["jacobian"]["flops"]
    assert large / small == pytest.approx(4, rel=0.05)
    assert "structured" not in implementation_costs(linear, p, spec((4, 200)), None, TRACED, None)


def wide_mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


@pytest.mark.parametrize("batch", [PER_EXAMPLE, None])
def test_ntvp_costs_more_with_many_parameters_and_few_outputs(batch):
    p = {"w1": spec((512, 2048)), "w2": spec((2048, 2))}  # P ≈ 1.05 M ≫ N·O = 8
    x = spec((4, 512))
    costs = implementation_costs(wide_mlp, p, x, None, TRACED, batch)
    # F ≈ P per example. Per example: 4·N²·O·P against 2·N·O·P + N²·O·P, 16/6 for N = 4; whole
    # batch (every cotangent through all N examples): 4·N²·O·P against 2·N²·O·P + N²·O·P, 4/3.
    ratio = costs["ntvp"]["flops"] / costs["jacobian"]["flops"]
    assert ratio == pytest.approx(4 / 3 if batch is None else 16 / 6, rel=0.05)
    if batch is not None:
        assert choose("auto", wide_mlp, p, x, None, TRACED, batch, None, 2**30) in ("jacobian", "structured")


def test_full_size_haiku_resnet18_on_8_images_is_jacobian_based():
    # hk.nets.ResNet18 (11 M parameters), 8 images 32×32, 10 classes: abstract shapes only.
    net = hk.transform_with_state(lambda x, t: hk.nets.ResNet18(10)(x, is_training=t))
    x = spec((8, 32, 32, 3))
    params, state = jax.eval_shape(lambda k, x: net.init(k, x, True), jax.random.PRNGKey(0), x)
    state = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    apply = lambda p, x: net.apply(p, state, None, x, False)[0]
    n_params = sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(params))
    assert n_params > 10**7
    for budget in (2**30, 35 * 2**30):  # CPU default; a quarter of an H200
        for batch in (PER_EXAMPLE, None):
            assert choose("auto", apply, params, x, None, TRACED, batch, None, budget) != "ntvp", (budget, batch)
    costs = implementation_costs(apply, params, x, None, TRACED, PER_EXAMPLE)
    assert costs["ntvp"]["time"] > 4 * costs["jacobian"]["time"]


def many_outputs(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def test_the_memory_budget_decides_between_fitting_implementations():
    p = {"w1": spec((64, 128)), "w2": spec((128, 64))}  # P = 16 384, O = 64
    x = spec((4, 64))
    costs = implementation_costs(many_outputs, p, x, None, TRACED, None, ntvp_chunk=1)
    jac, ntvp = costs["jacobian"]["bytes"], costs["ntvp"]["bytes"]
    assert ntvp < jac  # one tangent at a time against N·O = 256 Jacobian rows
    pick = lambda budget: choose("auto", many_outputs, p, x, None, TRACED, None, None, budget, ntvp_chunk=1)
    assert pick((jac + ntvp) / 2) == "ntvp"
    assert pick(ntvp / 2) == "ntvp"  # nothing fits: the least memory
    fastest = min(costs, key=lambda k: costs[k]["time"])
    assert pick(10 * jac) == fastest


def test_structured_wins_estimates_within_ten_percent(monkeypatch):
    """Its batched contractions beat per-example Jacobians at equal estimated cost (measured by
    benchmarks/auto_choice.py), so 'auto' takes it up to 1.1x the Jacobian estimate, not beyond,
    and never when it does not fit."""

    def with_costs(structured_time, structured_bytes=1.0):
        costs = {
            "jacobian": {"flops": 100.0, "bytes": 1.0, "time": 100.0},
            "structured": {"flops": structured_time, "bytes": structured_bytes, "time": structured_time},
            "ntvp": {"flops": 1e4, "bytes": 1.0, "time": 1e4},
        }
        monkeypatch.setattr(implementations, "implementation_costs", lambda *a, **k: costs)
        return choose("auto", linear, {"w": spec((8, 2))}, spec((3, 8)), None, TRACED, PER_EXAMPLE, None, 10.0)

    assert with_costs(90.0) == "structured"
    assert with_costs(109.0) == "structured"
    assert with_costs(111.0) == "jacobian"
    assert with_costs(50.0, structured_bytes=100.0) == "jacobian"  # over the memory budget


def test_an_explicit_implementation_is_kept():
    p, x = {"w": spec((8, 2))}, spec((3, 8))
    for impl in ("jacobian", "ntvp", "structured"):
        assert choose(impl, linear, p, x, None, TRACED, PER_EXAMPLE, None, 1.0) == impl


def test_default_memory_budget(monkeypatch):
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(implementations.jax, "devices", lambda: [Device({"bytes_limit": 8 * 2**30})])
    assert resolve_memory_budget(None) == 2 * 2**30
    monkeypatch.setattr(implementations.jax, "devices", lambda: [Device(None)])  # CPUs report nothing
    assert resolve_memory_budget(None) == 2**30
    assert resolve_memory_budget(123.0) == 123.0
    with pytest.raises(ValueError, match="memory_budget=0"):
        resolve_memory_budget(0)


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["haiku_resnet18_eval", "flax_linen_mnist_cnn"])
def test_zoo_models_are_not_ntvp(name):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import ntk_adapters.flax
    import ntk_adapters.haiku
    from examples.zoo import catalog

    entry = catalog.get(name)
    built = entry.make()
    adapter = ntk_adapters.haiku.adapt if entry.framework == "haiku" else ntk_adapters.flax.adapt
    model = adapter(built["module"], built["variables"], built["x"], **built["adapt_kwargs"])
    x = built["x"]
    batch = resolve_vmap_axes(model, x, "auto")
    assert batch is not None  # both are batch-independent in these modes
    for b in (batch, None):
        assert choose("auto", model.apply_fn, model.params, x, None, TRACED, b, None, 2**30) != "ntvp"


def test_auto_kernel_equals_the_jacobian_kernel():
    from ntk_adapters import empirical_ntk_fn

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {"w1": jax.random.normal(k[0], (16, 32)), "w2": jax.random.normal(k[1], (32, 3)) / 6}
    x = jax.random.normal(k[2], (5, 16))
    auto = empirical_ntk_fn(wide_mlp, vmap_axes=0)(x, None, p)
    ref = empirical_ntk_fn(wide_mlp, implementation="jacobian", vmap_axes=None)(x, None, p)
    np.testing.assert_allclose(auto, ref, rtol=1e-10, atol=1e-12)

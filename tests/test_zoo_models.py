"""The example zoo (examples/zoo) at the framework level: every entry builds, its module applies
on its batch with its keyword arguments, and the output has the recorded shape, is finite, and is
batch-independent exactly where the entry says so. No ntk_adapters call is made here."""

from __future__ import annotations

import inspect
import pathlib
import sys

import haiku as hk
import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the zoo lives in examples/, next to the package
    sys.path.insert(0, str(ROOT))

from examples.zoo import catalog  # noqa: E402

ZOO = ROOT / "examples" / "zoo"

# Options of the adapter calls; every other key of adapt_kwargs is a keyword argument of the model.
ADAPTER_OPTIONS = {
    "flax.linen": {"method", "rngs", "output", "mutable", "axis_name", "inputs", "key"},
    "flax.nnx": {"init", "output", "inputs"},
    "haiku": {"state", "rng", "output", "inputs", "key", "init_kwargs"},
}

# Compile without LLVM's optimizations: each program here runs once.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _spread(x, inputs):
    """Positional and keyword arguments of a call on ``x`` (the adapters' ``inputs`` option)."""
    if inputs == "args":
        return tuple(x), {}
    if inputs == "kwargs":
        return (), dict(x)
    return (x,), {}


def _select(out, output):
    if output is None:
        return out
    return output(out) if callable(output) else out[output]


def forward_fn(entry, built):
    """``f(variables, x) -> output`` calling the entry's module as its framework does."""
    module, kw = built["module"], dict(built["adapt_kwargs"])
    opts = {k: kw.pop(k) for k in ADAPTER_OPTIONS[entry.framework] if k in kw}
    inputs, output = opts.get("inputs"), opts.get("output")

    if entry.framework == "flax.linen":
        mutable = opts.get("mutable", False)

        def call(variables, x):
            args, xkw = _spread(x, inputs)
            out = module.apply(
                variables, *args, method=opts.get("method"), rngs=opts.get("rngs"), mutable=mutable, **xkw, **kw
            )
            return _select(out[0] if mutable is not False else out, output)

        if "axis_name" in opts:
            # As under the example's pmap: each example is one replica's batch, and BatchNorm
            # averages its statistics over the named axis.
            def named(variables, x):
                per = jax.vmap(
                    lambda xi: call(variables, jax.tree.map(lambda a: a[None], xi)), axis_name=opts["axis_name"]
                )(x)
                return per[:, 0]

            return named
        return call

    if entry.framework == "flax.nnx":
        graphdef = nnx.graphdef(module)

        def call(state, x):
            args, xkw = _spread(x, inputs)
            # copy=True: fresh Variables in the current trace, which the call may update (Count,
            # BatchStat) also under vmap.
            return _select(nnx.merge(graphdef, state, copy=True)(*args, **xkw, **kw), output)

        return call

    def call(params, x):
        args, xkw = _spread(x, inputs)
        if isinstance(module, hk.TransformedWithState):
            out, _ = module.apply(params, opts["state"], opts.get("rng"), *args, **xkw, **kw)
        elif "rng" in inspect.signature(module.apply).parameters:
            out = module.apply(params, opts.get("rng"), *args, **xkw, **kw)
        else:
            out = module.apply(params, *args, **xkw, **kw)
        return _select(out, output)

    return call


def _variables(entry, built):
    if entry.framework == "flax.nnx":
        return nnx.split(built["module"])[1]
    return built["variables"]


def _batch_size(x) -> int:
    return jax.tree.leaves(x)[0].shape[0]


def _shifted(x):
    """``x[1:]`` followed by ``x[1]`` again: every kept example moves up one row and the batch
    loses ``x[0]``. Same shapes, so the same compiled program runs on it."""
    return jax.tree.map(lambda a: np.concatenate([np.asarray(a)[1:], np.asarray(a)[1:2]]), x)


def _compile(entry, built):
    """``run(variables) -> (output on x, output on _shifted(x))``, compiled once."""
    f = forward_fn(entry, built)
    x = built["x"]
    compiled = jax.jit(f).lower(_variables(entry, built), x).compile(_FAST_COMPILE)
    return lambda variables: (jax.device_get(compiled(variables, x)), jax.device_get(compiled(variables, _shifted(x))))


@pytest.fixture(scope="module", params=catalog.ENTRIES, ids=lambda e: e.name)
def zoo(request):
    entry = request.param
    built = entry.make()
    run = _compile(entry, built)
    return entry, built, run, run(_variables(entry, built))


def test_make_returns_what_an_adapter_call_needs(zoo):
    entry, built, _, _ = zoo
    assert set(built) == {"module", "variables", "x", "adapt_kwargs"}
    kinds = {"flax.linen": nn.Module, "flax.nnx": nnx.Module, "haiku": (hk.Transformed, hk.TransformedWithState)}
    assert isinstance(built["module"], kinds[entry.framework])
    if entry.framework == "flax.nnx":
        assert built["variables"] is None
        assert callable(built["adapt_kwargs"]["init"])
    elif entry.framework == "flax.linen":
        assert "params" in built["variables"]
    leaves = jax.tree.leaves(built["x"])
    assert leaves and all(leaf.shape[0] == _batch_size(built["x"]) for leaf in leaves)
    assert _batch_size(built["x"]) in (3, 4)
    if isinstance(built["x"], tuple):
        assert built["adapt_kwargs"].get("inputs") == "args"


def test_output_shape_and_finite(zoo):
    entry, _, _, (out, _) = zoo
    assert out.shape == entry.output_shape
    assert np.all(np.isfinite(out))


def test_batch_independence_is_as_recorded(zoo):
    """An example's output stays the same when it moves to another row of a batch with other
    examples exactly where the entry records batch independence (no BatchNorm statistics, no
    random draw shaped by the batch)."""
    entry, built, run, (out, shifted) = zoo
    if entry.name.startswith("haiku_resnet18"):
        # hk.nets.ResNet zero-initializes its logits layer, so every output is 0 whatever the
        # batch; with nonzero readout weights the coupling of training-mode BatchNorm shows.
        params = hk.data_structures.map(
            lambda m, n, p: np.ones(p.shape, p.dtype) if m.endswith("logits") and n == "w" else p, built["variables"]
        )
        out, shifted = run(params)
        assert np.any(out != 0)
    moved, kept = shifted[:-1], out[1:]
    same = np.allclose(moved, kept, rtol=1e-5, atol=1e-6)
    assert same == entry.batch_independent, np.max(np.abs(moved - kept))
    if not same:
        assert np.max(np.abs(moved - kept)) > 1e-4


def test_fixed_random_draws_repeat(zoo):
    """Keys are fixed: calling twice gives the same output (dropout masks, VAE noise)."""
    entry, built, run, (out, _) = zoo
    again, _ = run(_variables(entry, built))
    np.testing.assert_array_equal(out, again)


def test_nnx_count_variable_counts_calls():
    built = catalog.get("flax_nnx_count_mlp").make()
    model = built["module"]
    from examples.zoo.flax_nnx_functional_api import Count

    assert int(model.count[...]) == 0
    graphdef, params, counts = nnx.split(model, nnx.Param, Count)

    @jax.jit
    def step(params, counts, x):
        m = nnx.merge(graphdef, params, counts)
        y = m(x)
        return y, nnx.state(m, Count)

    _, counts = step(params, counts, built["x"])
    _, counts = step(params, counts, built["x"])
    assert int(nnx.merge(graphdef, params, counts).count[...]) == 2


def test_vae_entries_select_reconstruction_and_mean():
    recon = catalog.get("flax_linen_vae_reconstruction").make()
    mean = catalog.get("flax_linen_vae_encoder_mean").make()
    module, x = recon["module"], recon["x"]

    @jax.jit
    def outputs(variables, x):
        full = module.apply(variables, x, recon["adapt_kwargs"]["z_rng"])
        picked = (
            forward_fn(catalog.get("flax_linen_vae_reconstruction"), recon)(variables, x),
            forward_fn(catalog.get("flax_linen_vae_encoder_mean"), mean)(variables, x),
        )
        return full, picked

    (recon_x, mean_x, logvar_x), (picked_recon, picked_mean) = outputs(recon["variables"], x)
    np.testing.assert_array_equal(picked_recon, recon_x)
    np.testing.assert_allclose(picked_mean, mean_x, rtol=1e-6)
    assert recon_x.shape == x.shape and logvar_x.shape == mean_x.shape


def test_catalog_records():
    names = [e.name for e in catalog.ENTRIES]
    assert len(set(names)) == len(names)
    assert set(catalog.EXPECTED) == set(names)
    for entry in catalog.ENTRIES:
        assert entry.framework in ADAPTER_OPTIONS
        assert entry.source.startswith(("github.com/google/flax", "github.com/google-deepmind/dm-haiku"))
        assert entry.infinite_width
        assert catalog.get(entry.name) is entry
    with pytest.raises(KeyError, match="no zoo entry"):
        catalog.get("no_such_model")


def test_copied_files_carry_licence_and_source():
    files = sorted(p for p in ZOO.glob("*.py") if p.name not in ("__init__.py", "catalog.py"))
    assert len(files) == 11
    for path in files:
        head = path.read_text().splitlines()[:25]
        text = "\n".join(head)
        assert "Licensed under the Apache License, Version 2.0" in text, path.name
        assert "Copyright" in head[0], path.name
        assert "From github.com/" in text, path.name
    for path in ZOO.glob("*.py"):
        text = path.read_text()
        assert "import ntk_adapters" not in text and "from ntk_adapters" not in text, path.name

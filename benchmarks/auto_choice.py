"""Does ``implementation='auto'`` pick a fast implementation? Every implementation on the zoo models.

Not a test: for each entry of the example zoo (``examples/zoo/catalog.py``, tiny sizes) prints the
median time of each implementation of ``empirical_ntk_fn`` (compiled beforehand), which one
``'auto'`` picks, its estimated cost (``implementation_costs``' time proxy) and ``auto / best``,
the ratio of the picked implementation's time to the fastest one's in the same run (the target
is ≤ 1.5). States the machine and the device.

Implementations timed (``vmap_axes='auto'`` resolves as the library does: per example where the
traced program proves examples independent, else the whole batch):
  jacobian-batch   implementation='jacobian', vmap_axes=None (whole-batch Jacobians)
  jacobian         implementation='jacobian', vmap_axes='auto'
  structured       implementation='structured', vmap_axes='auto' (only where examples are independent)
  ntvp             implementation='ntvp'

On an accelerator without ``--small`` (or with ``--full-resnet``) a full-size Haiku ResNet-18
(``hk.nets.ResNet18``, 11 M parameters, 8 images
of 32×32, 10 classes) is added, whose per-example Jacobians take ~3.6 GB: meant for a GPU.

Run:
  .venv/bin/python benchmarks/auto_choice.py --small      # a few entries, ~2 minutes on 2 CPU cores
  .venv/bin/python benchmarks/auto_choice.py              # every entry, ~5 minutes on 2 CPU cores
  .venv/bin/python benchmarks/auto_choice.py              # on a GPU: every entry + full ResNet-18
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import compile_fn, describe_machine, round_robin, table  # noqa: E402

import ntk_adapters.flax  # noqa: E402
import ntk_adapters.haiku  # noqa: E402
from ntk_adapters.empirical import empirical_ntk_fn, output_axes  # noqa: E402
from ntk_adapters.implementations import choose, implementation_costs, resolve_memory_budget  # noqa: E402
from ntk_adapters.inputs import resolve_vmap_axes  # noqa: E402

SMALL = ("flax_linen_mnist_cnn", "haiku_mnist_mlp", "haiku_resnet18_eval", "flax_linen_lm1b_transformer")


def tiled(x, n):
    """The zoo batch repeated up to ``n`` examples (timing only: duplicates cost the same)."""

    def grow(a):
        reps = -(-n // a.shape[0])
        return jnp.concatenate([a] * reps, 0)[:n]

    return jax.tree_util.tree_map(grow, x)


def zoo_models(names, n):
    from examples.zoo import catalog

    for entry in catalog.ENTRIES:
        if names and entry.name not in names:
            continue
        built = entry.make()
        adapter = ntk_adapters.haiku.adapt if entry.framework == "haiku" else ntk_adapters.flax.adapt
        model = adapter(built["module"], built["variables"], built["x"], **built["adapt_kwargs"])
        yield entry.name, model, tiled(built["x"], n)


def full_resnet18():
    import haiku as hk

    net = hk.transform_with_state(lambda x, is_training: hk.nets.ResNet18(10)(x, is_training=is_training))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3), jnp.float32)
    params, state = net.init(jax.random.PRNGKey(0), x, True)
    model = ntk_adapters.adapt(lambda p, x: net.apply(p, state, None, x, False)[0], params)
    return "hk.nets.ResNet18 (11M) 8×32×32", model, x


def run(name, model, x, repeats, budget):
    axes = output_axes(model.apply_fn, model.params, x, None, (-1,), ())
    batch = resolve_vmap_axes(model, x, "auto")
    pick = choose("auto", model.apply_fn, model.params, x, None, axes, batch, None, budget)
    costs = implementation_costs(model.apply_fn, model.params, x, None, axes, batch, None, budget)
    methods = {"jacobian-batch": ("jacobian", None), "ntvp": ("ntvp", "auto")}
    if batch is not None:  # without independent examples 'jacobian' is the whole-batch one
        methods.update({"jacobian": ("jacobian", "auto"), "structured": ("structured", "auto")})
    compiled, compiles = {}, {}
    for label, (impl, vmap_axes) in methods.items():
        fn = empirical_ntk_fn(
            model, implementation=impl, vmap_axes=vmap_axes, check_finite_values=False, memory_budget=budget
        )
        compiled[label], compiles[label] = compile_fn(lambda x, fn=fn: fn(x), x)
    times = round_robin(compiled, (x,), repeats)
    picked = pick if pick != "jacobian" or batch is not None else "jacobian-batch"
    best = min(times, key=times.get)
    n_params = sum(l.size for l in jax.tree_util.tree_leaves(model.params))
    est = lambda k: f"{costs[k]['time']:.1e}" if k in costs else "-"
    cells = [name, f"{n_params:,}", "0" if batch is not None else "None"]
    for label in ("jacobian-batch", "jacobian", "structured", "ntvp"):
        cells.append(f"{times[label] * 1e3:.2f}" if label in times else "-")
    cells += [
        picked,
        f"{est('jacobian')}/{est('structured')}/{est('ntvp')}",
        best,
        f"{times[picked] / times[best]:.2f}",
        f"{sum(compiles.values()):.0f}",
    ]
    return cells


def best_ms(row) -> float:
    return min(float(c) for c in row[3:7] if c != "-")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="four zoo entries, fewer repeats (CPU, ~2 min)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--full-resnet",
        action="store_true",
        help="add hk.nets.ResNet18 at full width (default on accelerators without --small)",
    )
    parser.add_argument("--batch", type=int, default=None, help="examples per kernel (default 16, 8 with --small)")
    parser.add_argument("--entries", nargs="*", default=None, help="zoo entry names (default: all, or the small set)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.small else 7)
    n = args.batch or (8 if args.small else 16)
    names = args.entries if args.entries is not None else (SMALL if args.small else ())
    budget = resolve_memory_budget(None)
    print(describe_machine())
    print(
        f"float32 kernels of {n} examples (zoo batches repeated), trace_axes=(-1,), x2=None; "
        f"memory_budget {budget / 2**30:.2f} GiB (the default); "
        f"times: median of {repeats} round-robin runs after a compiled warm-up, ms"
    )
    rows = [run(name, model, x, repeats, budget) for name, model, x in zoo_models(names, n)]
    if args.full_resnet or (not args.small and jax.devices()[0].platform != "cpu"):
        rows.append(run(*full_resnet18(), repeats, budget))
    header = [
        "entry",
        "params",
        "vmap",
        "jac-batch",
        "jacobian",
        "structured",
        "ntvp",
        "auto",
        "est. jac/str/ntvp",
        "best",
        "auto/best",
        "compile s",
    ]
    print(table(header, rows))
    worst = max(float(r[-2]) for r in rows)
    timed = [float(r[-2]) for r in rows if best_ms(r) >= 1.0]
    print(
        f"worst auto/best: {worst:.2f} over all rows; {max(timed, default=float('nan')):.2f} over rows whose best "
        "takes ≥ 1 ms (below that, dispatch overhead rather than the kernel is timed); target ≤ 1.5"
    )


if __name__ == "__main__":
    main()

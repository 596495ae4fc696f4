"""Empirical NTK implementations side by side: time and memory on an MLP and a small CNN.

Not a test: prints, per model and output-axes setting, the median wall time of each method (jitted
and compiled beforehand; ``--repeats`` runs taken round-robin across methods after a first run, or
that single first run when it takes over 5 s), its ratio to the naive Jacobian contraction, and
the compiled peak memory (``memory_analysis()`` of the compiled function: temporaries + outputs,
in MiB). Also prints which implementation ``'auto'`` picks and its cost estimates.

Methods:
  naive        jax.jacrev of the batched model, then one einsum over the flattened parameters
  by-hand      (MLP only) activation Gram × cotangent Gram per layer, written for this exact MLP
  jacobian / ntvp / structured   ntk_adapters.empirical.empirical_ntk_fn(implementation=...),
               with vmap_axes=0 (examples are independent in both models)

Run:
  .venv/bin/python benchmarks/empirical_ntk.py            # about 5 minutes on 2 CPU cores, ~10 GiB RAM
  .venv/bin/python benchmarks/empirical_ntk.py --small    # MLP 784-256-256-10, N1=32, N2=16: ~1 GiB, ~1 minute
  .venv/bin/python benchmarks/empirical_ntk.py --repeats 3
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import describe_machine  # noqa: E402

from ntk_adapters.axes import OutputAxes  # noqa: E402
from ntk_adapters.empirical import empirical_ntk_fn  # noqa: E402
from ntk_adapters.implementations import choose, implementation_costs, resolve_memory_budget  # noqa: E402
from ntk_adapters.inputs import parse_vmap_axes  # noqa: E402


def mlp_params(key, widths=(784, 512, 512, 10)):
    keys = jax.random.split(key, len(widths) - 1)
    return [jax.random.normal(k, (a, b)) / np.sqrt(a) for k, a, b in zip(keys, widths[:-1], widths[1:])]


def mlp(params, x):
    h = x
    for w in params[:-1]:
        h = jnp.tanh(h @ w)
    return h @ params[-1]


def mlp_by_hand(params, x1, x2, full: bool):
    """Σ_l (h1_{l-1} h2_{l-1}ᵀ) ⊙ (g1_l g2_lᵀ) with g_l[n, o, :] = ∂f_o(x_n)/∂z_l, z_l = h_{l-1} W_l."""

    def forward(x):
        hs, zs, h = [x], [], x
        for w in params[:-1]:
            z = h @ w
            zs.append(z)
            h = jnp.tanh(z)
            hs.append(h)
        return hs, zs

    def cotangents(zs):
        n, o = zs[0].shape[0], params[-1].shape[1]
        g = jnp.broadcast_to(jnp.eye(o), (n, o, o))  # ∂f/∂z_last
        gs = [g]
        for w, z in zip(params[:0:-1], zs[::-1]):
            g = jnp.einsum("noj,ij->noi", g, w) * (1 - jnp.tanh(z) ** 2)[:, None, :]
            gs.append(g)
        return gs[::-1]

    hs1, zs1 = forward(x1)
    hs2, zs2 = forward(x2)
    gs1, gs2 = cotangents(zs1), cotangents(zs2)
    out = 0.0
    for h1, h2, g1, g2 in zip(hs1, hs2, gs1, gs2):
        if full:
            out = out + (h1 @ h2.T)[:, :, None, None] * jnp.einsum("naj,mbj->nmab", g1, g2)
        else:
            out = out + (h1 @ h2.T) * jnp.einsum("naj,maj->nm", g1, g2) / g1.shape[1]
    return out


class CNN:
    """conv 3×3 (32) – relu – conv 3×3 (32) – relu – flatten – dense (10), SAME padding, no biases."""

    @staticmethod
    def init(key, channels=32, classes=10, hw=8, c_in=3):
        k1, k2, k3 = jax.random.split(key, 3)
        return [
            jax.random.normal(k1, (3, 3, c_in, channels)) / np.sqrt(9 * c_in),
            jax.random.normal(k2, (3, 3, channels, channels)) / np.sqrt(9 * channels),
            jax.random.normal(k3, (hw * hw * channels, classes)) / np.sqrt(hw * hw * channels),
        ]

    @staticmethod
    def apply(params, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, params[0], (1, 1), "SAME", dimension_numbers=dn))
        h = jax.nn.relu(jax.lax.conv_general_dilated(h, params[1], (1, 1), "SAME", dimension_numbers=dn))
        return h.reshape(h.shape[0], -1) @ params[2]


def naive(apply_fn, full: bool):
    def ntk(params, x1, x2):
        j1 = jnp.concatenate([j.reshape(j.shape[:2] + (-1,)) for j in jax.jacrev(apply_fn)(params, x1)], -1)
        j2 = jnp.concatenate([j.reshape(j.shape[:2] + (-1,)) for j in jax.jacrev(apply_fn)(params, x2)], -1)
        if full:
            return jnp.einsum("nap,mbp->nmab", j1, j2)
        return jnp.einsum("nap,map->nm", j1, j2) / j1.shape[1]

    return ntk


def library(apply_fn, implementation: str, full: bool):
    ntk = empirical_ntk_fn(
        apply_fn,
        trace_axes=() if full else (-1,),
        vmap_axes=0,
        implementation=implementation,
        check_finite_values=False,
    )
    return lambda params, x1, x2: ntk(x1, x2, params)


def compile_and_run(fn, args):
    """``(compiled, peak MiB, first-run seconds, output)``; the compile is not timed."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        mem = compiled.memory_analysis()
        peak = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
    except Exception:  # memory_analysis is backend-dependent
        peak = float("nan")
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return compiled, peak, time.perf_counter() - t, out


def run_case(title, methods, args, repeats, reference="naive"):
    """Time every method; fast ones round-robin (so a busy machine slows them alike), slow ones once."""
    print(f"\n{title}")
    runs = {name: compile_and_run(fn, args) for name, fn in methods.items()}
    times = {name: [] for name, (_, _, first, _) in runs.items() if first <= 5.0}
    for _ in range(repeats):
        for name in times:
            t = time.perf_counter()
            jax.block_until_ready(runs[name][0](*args))
            times[name].append(time.perf_counter() - t)
    median = {name: statistics.median(times[name]) if name in times else runs[name][2] for name in runs}
    print(f"{'method':<12} {'median ms':>10} {'× naive':>9} {'× by-hand':>10} {'peak MiB':>9} {'max |Δ| vs naive':>17}")
    ref_out = runs[reference][3]
    for name, (_, peak, _, out) in runs.items():
        err = float(jnp.max(jnp.abs(out - ref_out)))
        by_hand = f"{median[name] / median['by-hand']:10.2f}" if "by-hand" in median else f"{'':>10}"
        runs_note = "" if name in times else "  (1 run)"
        print(
            f"{name:<12} {median[name] * 1e3:10.2f} {median[reference] / median[name]:8.1f}× {by_hand} "
            f"{peak:9.1f} {err:17.2e}{runs_note}"
        )


def auto_choice(apply_fn, params, x1, x2, full: bool) -> str:
    axes = OutputAxes.make(2, () if full else (-1,), ())
    batch = parse_vmap_axes(0)
    pick = choose("auto", apply_fn, params, x1, x2, axes, batch, None, None)
    costs = implementation_costs(apply_fn, params, x1, x2, axes, batch, None, resolve_memory_budget(None))
    est = ", ".join(f"{k} {v['time']:.2e} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in costs.items())
    return f"'auto' (vmap_axes=0) picks {pick}; estimated time proxy (memory): {est}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="default 9, 3 with --small")
    parser.add_argument(
        "--small",
        action="store_true",
        help="MLP width 256 and a quarter of the batches (fits in ~1 GiB, about a minute)",
    )
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.small else 9)
    width, n1, n2 = (256, 32, 16) if args.small else (512, 128, 64)
    c1, c2 = (8, 4) if args.small else (32, 16)
    print(describe_machine() + "; float32")
    print(
        "times: median of --repeats round-robin runs of each compiled function (a single run where the "
        "first takes over 5 s); '× naive' = naive time / method time (higher is faster); '× by-hand' = "
        "method time / by-hand time (lower is faster); peak = compiled temp + output bytes"
    )

    key = jax.random.PRNGKey(0)
    params = mlp_params(key, (784, width, width, 10))
    x1 = jax.random.normal(jax.random.PRNGKey(1), (n1, 784))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (n2, 784))
    for full in (False, True):
        methods = {
            "naive": naive(mlp, full),
            "by-hand": lambda p, a, b, full=full: mlp_by_hand(p, a, b, full),
            "jacobian": library(mlp, "jacobian", full),
            "ntvp": library(mlp, "ntvp", full),
            "structured": library(mlp, "structured", full),
        }
        what = f"full O×O, ({n1}, {n2}, 10, 10)" if full else f"traced, ({n1}, {n2})"
        run_case(
            f"MLP 784-{width}-{width}-10, tanh, no biases, N1={n1}, N2={n2}, {what}",
            methods,
            (params, x1, x2),
            args.repeats,
        )
        print(auto_choice(mlp, params, x1, x2, full))

    params = CNN.init(key)
    x1 = jax.random.normal(jax.random.PRNGKey(1), (c1, 8, 8, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (c2, 8, 8, 3))
    for full in (False, True):
        methods = {
            "naive": naive(CNN.apply, full),
            "jacobian": library(CNN.apply, "jacobian", full),
            "ntvp": library(CNN.apply, "ntvp", full),
            "structured": library(CNN.apply, "structured", full),
        }
        what = f"full O×O, ({c1}, {c2}, 10, 10)" if full else f"traced, ({c1}, {c2})"
        run_case(
            f"CNN 8×8×3 → conv3×3(32) → conv3×3(32) → dense(10), N1={c1}, N2={c2}, {what}",
            methods,
            (params, x1, x2),
            args.repeats,
        )
        print(auto_choice(CNN.apply, params, x1, x2, full))


if __name__ == "__main__":
    main()

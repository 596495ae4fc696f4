"""One script for an accelerator (and, with ``--small``, a CPU): the library's kernels against
baselines run in the same process, printed as tables. States the device it ran on.

Not a test. Four tables, each a ratio against a baseline measured in this run:

1. **Infinite-width engine vs hand-written recursion**: ``ntk_adapters.infinite.infinite_kernel_fn``
   on an unchanged Flax MLP (Dense 512-512-10, ReLU) and CNN (conv 3×3 (64) ×2, ReLU, global
   average pooling, Dense 10) against the arc-cosine recursion for the same architecture written
   out below; ratio engine / hand-written, and the largest relative difference of the NTKs.
2. **Structured empirical NTK vs naive Jacobian contraction**: ``empirical_ntk_fn`` (structured,
   per example; and ``'auto'``) against ``jax.jacrev`` of the whole batch contracted with one einsum,
   and per-example Jacobians (``vmap(jacrev)``) contracted with einsum, on an MLP 784-W-W-10 and on
   the CNN 2×conv(32)+flatten+dense(10) on 8×8×3 (N1=32, N2=16).
3. **Tiling**: ``ntk_adapters.batch`` (tiles assembled on the host, and on the device) against the untiled kernel (one
   call, then copied to the host) and against a plain device-to-host copy of a result-sized array:
   kernel entries per second, and the copy's bandwidth (GB/s).
4. **21-layer CNN** (3×3 SAME convolutions, ReLU, 32×32×3 inputs): infinite NTK time per kernel
   entry with a global-average-pooling readout and with a flatten readout, engine and hand-written,
   beside neural-tangents' published figures (V100, float32: 2.70 ms per entry with pooling,
   0.00465 ms with flatten; a different machine, for scale only), and against a memory roofline:
   the time to read and write the NNGP and NTK once per layer at the bandwidth an elementwise pass
   over arrays of their size reaches on this device. With ``--small`` the pooling case uses 8×8
   images (its cost grows with the square of the number of positions).

Kernels are float32 with ``precision='highest'`` semantics: the hand-written recursions use
``precision=HIGHEST`` in their products, and the process runs under
``jax.default_matmul_precision('highest')`` so that TensorFloat-32 does not make the baselines
cheaper than the library on GPUs.

Run:
  .venv/bin/python benchmarks/gpu.py --small      # CPU: about a minute, < 2 GiB
  python benchmarks/gpu.py                        # GPU: under 5 minutes
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import compile_fn, describe_machine, relu_maps, table, time_compiled  # noqa: E402

import ntk_adapters.flax  # noqa: E402
from ntk_adapters import batch, empirical_ntk_fn  # noqa: E402
from ntk_adapters.infinite import infinite_kernel_fn  # noqa: E402

HI = jax.lax.Precision.HIGHEST
NT_V100_MS_PER_ENTRY = {"gap": 2.70, "flatten": 0.00465}


# --------------------------------------------------------------------------------------------
# Models (Flax defaults: lecun_normal kernels, zero biases, so σw² = 1, σb² = 0, biases trained).


class MLP(nn.Module):
    width: int = 512

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class DeepCNN(nn.Module):
    depth: int = 2
    channels: int = 64
    readout: str = "gap"

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        x = jnp.mean(x, axis=(1, 2)) if self.readout == "gap" else x.reshape(x.shape[0], -1)
        return nn.Dense(10)(x)


# --------------------------------------------------------------------------------------------
# Hand-written infinite-width recursions (standard parameterization, as the Flax models above).


@jax.jit
def mlp_by_hand(x1, x2):
    d = x1.shape[1]
    k = jnp.matmul(x1, x2.T, precision=HI) / d
    q1, q2 = jnp.sum(x1 * x1, 1) / d, jnp.sum(x2 * x2, 1) / d
    ntk = jnp.zeros_like(k)
    fan_in = d
    for width in (512, 512, None):
        ntk = fan_in * k + ntk + 1.0  # weight (fan_in · input covariance) + downstream + bias
        if width is None:
            break
        j1, j0 = relu_maps(k, q1[:, None], q2[None, :])
        k, ntk, q1, q2, fan_in = j1, ntk * j0, q1 / 2, q2 / 2, width
    return ntk


def _window_full(a, lead):
    """3×3 SAME window mean of a full-layout (.., H, H', W, W') covariance: the same shift on both sides."""
    p = jnp.pad(a, [(0, 0)] * lead + [(1, 1)] * 4)
    h, w = a.shape[lead], a.shape[lead + 2]
    out = 0.0
    for dh in range(3):
        for dw in range(3):
            out = (
                out
                + p[
                    (slice(None),) * lead + (slice(dh, dh + h), slice(dh, dh + h), slice(dw, dw + w), slice(dw, dw + w))
                ]
            )
    return out / 9.0


def _window_diag(a, lead):
    """The same on a diagonal-layout (.., H, W) covariance (positions paired with themselves)."""
    p = jnp.pad(a, [(0, 0)] * lead + [(1, 1)] * 2)
    h, w = a.shape[lead], a.shape[lead + 1]
    out = 0.0
    for dh in range(3):
        for dw in range(3):
            out = out + p[(slice(None),) * lead + (slice(dh, dh + h), slice(dw, dw + w))]
    return out / 9.0


def cnn_by_hand(x1, x2, depth: int, channels: int, readout: str):
    """NTK of ``DeepCNN`` at infinite channels. ``'gap'`` needs covariances between all position
    pairs (N1, N2, H, H, W, W); ``'flatten'`` only of each position with itself (N1, N2, H, W)."""
    c_in = x1.shape[-1]
    v1 = _window_diag(jnp.einsum("nhwc,nhwc->nhw", x1, x1, precision=HI) / c_in, 1)  # (N, H, W)
    v2 = _window_diag(jnp.einsum("nhwc,nhwc->nhw", x2, x2, precision=HI) / c_in, 1)
    if readout == "gap":
        k = jnp.einsum("iabz,jcdz->ijacbd", x1, x2, precision=HI) / c_in
        window = lambda a: _window_full(a, 2)
        q1 = lambda v: v[:, None, :, None, :, None]
        q2 = lambda v: v[None, :, None, :, None, :]
    else:
        k = jnp.einsum("iabz,jabz->ijab", x1, x2, precision=HI) / c_in
        window = lambda a: _window_diag(a, 2)
        q1 = lambda v: v[:, None]
        q2 = lambda v: v[None]

    def layer(fan_in, k, ntk, v1, v2):
        k = window(k)
        ntk = fan_in * k + window(ntk) + 1.0
        j1, j0 = relu_maps(k, q1(v1), q2(v2))
        # Variances after ReLU halve, then the next convolution averages them over its window.
        return j1, ntk * j0, _window_diag(v1 / 2, 1), _window_diag(v2 / 2, 1)

    state = layer(9 * c_in, k, jnp.zeros_like(k), v1, v2)
    # The later layers are identical: a loop keeps the program (and its compile time) small.
    state = jax.lax.fori_loop(0, depth - 1, lambda _, st: layer(9 * channels, *st), state)
    k, ntk = state[0], state[1]
    h, w = x1.shape[1:3]
    axes = tuple(range(2, k.ndim))
    k_read, ntk_read = k.mean(axes), ntk.mean(axes)
    return (channels if readout == "gap" else h * w * channels) * k_read + ntk_read + 1.0


# --------------------------------------------------------------------------------------------
# Timing helpers.


#: A timed round of one function lasts at least this long: sub-millisecond programs are run several
#: times per round, so that timer resolution and scheduling noise do not decide their ratios.
_MIN_ROUND_S = 0.02


def timed_pair(fns: dict, args: tuple, repeats: int) -> dict:
    """Compile each function, then time them in alternating rounds (each round one untimed run and
    ``calls`` timed runs of each, the median over at least ``repeats`` rounds per run), returning
    seconds, outputs and compile seconds. Alternating puts a load change on the machine on both
    sides of a ratio. A function whose first run takes over 5 s is timed by that run alone."""
    compiled, first, out = {}, {}, {}
    for name, fn in fns.items():
        compiled[name], compile_s = compile_fn(fn, *args)
        first[name] = time_compiled(compiled[name], args, 1)
        out[name] = (jax.block_until_ready(compiled[name](*args)), compile_s)
    calls = {name: max(1, math.ceil(_MIN_ROUND_S / max(t, 1e-6))) for name, t in first.items()}
    runs = {name: [t] if t > 5.0 else [] for name, t in first.items()}
    # Short programs get more rounds (up to 15 in about half a second): on a shared machine the
    # noise comes in bursts that a median of 3 short rounds does not outvote.
    round_s = sum(calls[name] * first[name] for name in fns if first[name] <= 5.0)
    for _ in range(max(repeats, min(15, int(0.5 / max(round_s, 1e-9))))):
        for name in fns:
            if first[name] > 5.0:
                continue
            # untimed: the first run after a neighbour that used much memory pays for the pages the
            # allocator gave back (measured 67 ms against 0.8 ms for a small empirical NTK)
            jax.block_until_ready(compiled[name](*args))
            t = time.perf_counter()
            for _ in range(calls[name]):
                result = compiled[name](*args)
            jax.block_until_ready(result)
            runs[name].append((time.perf_counter() - t) / calls[name])
    return {name: (statistics.median(runs[name]), *out[name]) for name in fns}


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def engine_ntk(module, x_init):
    model = ntk_adapters.flax.adapt(module, None, x_init, key=jax.random.PRNGKey(0))
    kf = infinite_kernel_fn(model)
    return lambda a, b: kf(a, b, get="ntk")


# --------------------------------------------------------------------------------------------
# Sections.


def section_infinite(s, repeats):
    rows = []
    x = jax.random.normal(jax.random.PRNGKey(0), (s["mlp_n"], 32), jnp.float32)
    res = timed_pair({"engine": engine_ntk(MLP(), x[:2]), "by hand": mlp_by_hand}, (x, x), repeats)
    rows.append((f"MLP 32-512-512-10, {s['mlp_n']}²", res))
    xi = jax.random.normal(jax.random.PRNGKey(1), (s["cnn_n"], 8, 8, 3), jnp.float32)
    hand = jax.jit(lambda a, b: cnn_by_hand(a, b, 2, 64, "gap"))
    res = timed_pair({"engine": engine_ntk(DeepCNN(2, 64, "gap"), xi[:2]), "by hand": hand}, (xi, xi), repeats)
    rows.append((f"CNN conv-conv-GAP-dense 8×8×3, {s['cnn_n']}²", res))
    print("\n1. Infinite-width NTK: engine vs hand-written recursion (same process)")
    print(
        table(
            ["case", "engine ms", "by hand ms", "engine/hand", "max rel diff", "compile s"],
            [
                (
                    name,
                    f"{r['engine'][0] * 1e3:.2f}",
                    f"{r['by hand'][0] * 1e3:.2f}",
                    f"{r['engine'][0] / r['by hand'][0]:.2f}",
                    f"{rel_diff(r['engine'][1], r['by hand'][1]):.1e}",
                    f"{r['engine'][2]:.1f}",
                )
                for name, r in rows
            ],
        )
    )


def naive_whole_batch(apply_fn):
    def ntk(params, x1, x2):
        flat = lambda j: jnp.concatenate([l.reshape(l.shape[:2] + (-1,)) for l in jax.tree_util.tree_leaves(j)], -1)
        j1, j2 = flat(jax.jacrev(apply_fn)(params, x1)), flat(jax.jacrev(apply_fn)(params, x2))
        return jnp.einsum("nap,map->nm", j1, j2, precision=HI) / j1.shape[1]

    return ntk


def naive_per_example(apply_fn):
    def ntk(params, x1, x2):
        one = lambda p, x: apply_fn(p, x[None])[0]
        jac = jax.vmap(jax.jacrev(one), in_axes=(None, 0))
        flat = lambda j: jnp.concatenate([l.reshape(l.shape[:2] + (-1,)) for l in jax.tree_util.tree_leaves(j)], -1)
        j1, j2 = flat(jac(params, x1)), flat(jac(params, x2))
        return jnp.einsum("nap,map->nm", j1, j2, precision=HI) / j1.shape[1]

    return ntk


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), use_bias=False)(x))
        x = nn.relu(nn.Conv(32, (3, 3), use_bias=False)(x))
        return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))


def section_empirical(s, repeats):
    cases = []
    w, n1, n2 = s["mlp_width"], s["emp_n1"], s["emp_n2"]
    x1 = jax.random.normal(jax.random.PRNGKey(2), (n1, 784), jnp.float32)
    x2 = jax.random.normal(jax.random.PRNGKey(3), (n2, 784), jnp.float32)
    cases.append((f"MLP 784-{w}-{w}-10, {n1}×{n2}", MLP(w), x1, x2))
    y1 = jax.random.normal(jax.random.PRNGKey(4), (32, 8, 8, 3), jnp.float32)
    y2 = jax.random.normal(jax.random.PRNGKey(5), (16, 8, 8, 3), jnp.float32)
    cases.append(("CNN 2×conv(32)+flatten+dense, 8×8×3, 32×16", SmallCNN(), y1, y2))
    rows = []
    for name, module, a, b in cases:
        params = module.init(jax.random.PRNGKey(0), a[:1])
        apply_fn = module.apply
        lib = {
            impl: empirical_ntk_fn(apply_fn, vmap_axes=0, implementation=impl, check_finite_values=False)
            for impl in ("structured", "auto")
        }
        fns = {
            "naive": naive_whole_batch(apply_fn),
            "per-example": naive_per_example(apply_fn),
            "structured": lambda p, a, b, lib=lib: lib["structured"](a, b, p),
            "auto": lambda p, a, b, lib=lib: lib["auto"](a, b, p),
        }
        res = timed_pair(fns, (params, a, b), repeats)
        t = {k: v[0] for k, v in res.items()}
        rows.append(
            (
                name,
                *(f"{t[k] * 1e3:.2f}" for k in fns),
                f"{t['naive'] / t['structured']:.1f}×",
                f"{t['structured'] / t['per-example']:.2f}",
                f"{t['auto'] / min(t.values()):.2f}",
                f"{rel_diff(res['structured'][1], res['naive'][1]):.1e}",
            )
        )
    print("\n2. Empirical NTK (trace over outputs): structured vs naive Jacobian contractions, ms")
    print(
        table(
            [
                "case",
                "naive",
                "per-example",
                "structured",
                "auto",
                "naive/struct",
                "struct/per-ex",
                "auto/best",
                "max rel diff",
            ],
            rows,
        )
    )


def section_tiling(s, repeats):
    n, tile = s["tile_n"], s["tile"]
    x = jax.random.normal(jax.random.PRNGKey(6), (n, 32), jnp.float32)
    kernel = lambda a, b=None: mlp_by_hand(a, a if b is None else b)
    tiled = batch(kernel, tile, store_on_host=True)
    tiled(x[: 2 * tile])  # compiles the diagonal and off-diagonal tile programs
    on_device = batch(kernel, tile)
    jax.block_until_ready(on_device(x[: 2 * tile]))  # and the in-place tile placement
    untiled = jax.jit(lambda a: mlp_by_hand(a, a))
    jax.block_until_ready(untiled(x))
    # Fresh device arrays: JAX keeps the host copy of an array once made, so each is copied once.
    fresh = [jax.block_until_ready(jnp.full((n, n), float(i), jnp.float32)) for i in range(max(repeats, 1) + 1)]
    np.array(fresh.pop(), copy=True)

    def best_of(fn):
        times = []
        for _ in range(max(repeats, 1)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_tiled = best_of(lambda: tiled(x))
    t_untiled = best_of(lambda: np.asarray(untiled(x)))
    t_tiled_dev = best_of(lambda: jax.block_until_ready(on_device(x)))
    t_untiled_dev = best_of(lambda: jax.block_until_ready(untiled(x)))
    t_copy = best_of(lambda: np.array(fresh.pop(), copy=True))
    entries = n * n
    print(f"\n3. Tiling: {n}×{n} float32 MLP NTK ({entries * 4 / 1e6:.0f} MB), tiles {tile}², best of {repeats}")
    rows = [
        ("batch() tiled, host result", f"{t_tiled:.3f}", f"{entries / t_tiled:.3g}", f"{t_tiled / t_copy:.2f}"),
        (
            "untiled, one call + copy to host",
            f"{t_untiled:.3f}",
            f"{entries / t_untiled:.3g}",
            f"{t_untiled / t_copy:.2f}",
        ),
        (
            f"device→host copy only ({entries * 4 / t_copy / 1e9:.2f} GB/s)",
            f"{t_copy:.3f}",
            f"{entries / t_copy:.3g}",
            "1.00",
        ),
    ]
    rows += [
        ("batch() tiled, device result", f"{t_tiled_dev:.3f}", f"{entries / t_tiled_dev:.3g}", ""),
        ("untiled, device result", f"{t_untiled_dev:.3f}", f"{entries / t_untiled_dev:.3g}", ""),
    ]
    print(table(["run", "seconds", "entries/s", "× copy time"], rows))
    print(
        f"host results: tiled / untiled throughput {t_untiled / t_tiled:.2f}, tiled / copy bandwidth "
        f"{t_copy / t_tiled:.2f}; device results: tiled / untiled throughput {t_untiled_dev / t_tiled_dev:.2f}"
    )


def copy_bandwidth(shape, repeats) -> float:
    """Bytes per second of a jitted elementwise pass over a float32 array of ``shape`` (one read,
    one write): the memory bandwidth this device reaches on arrays of the covariances' size."""
    a = jnp.ones(shape, jnp.float32)
    compiled, _ = compile_fn(lambda v: v * 2.0, a)
    return 2 * a.size * 4 / time_compiled(compiled, (a,), max(repeats, 5))


def section_deep_cnn(s, repeats):
    rows = []
    depth = 21
    for readout, n, hw in (("gap", s["deep_gap_n"], s["deep_gap_hw"]), ("flatten", s["deep_flat_n"], 32)):
        x = jax.random.normal(jax.random.PRNGKey(7), (n, hw, hw, 3), jnp.float32)
        hand = jax.jit(lambda a, b, r=readout: cnn_by_hand(a, b, depth, 64, r))
        fns = {"by hand": hand}
        try:
            fns["engine"] = engine_ntk(DeepCNN(depth, 64, readout), x[:2])
        except Exception as err:  # report and keep the hand-written figure
            print(f"engine failed on the 21-layer CNN ({readout}): {type(err).__name__}: {err}")
        res = timed_pair(fns, (x, x), repeats)
        per = {k: v[0] * 1e3 / (n * n) for k, v in res.items()}
        diff = rel_diff(res["engine"][1], res["by hand"][1]) if "engine" in res else float("nan")
        # Memory roofline: every layer reads and writes the NNGP and the NTK at least once each.
        positions = (hw * hw) ** 2 if readout == "gap" else hw * hw
        bandwidth = copy_bandwidth((n, n, positions), repeats)
        roofline_ms = depth * 4 * positions * 4 / bandwidth * 1e3
        rows.append(
            (
                f"{readout}, {n}² entries, {hw}×{hw}×3",
                f"{per['engine']:.4g}" if "engine" in per else "-",
                f"{per['by hand']:.4g}",
                f"{per['engine'] / per['by hand']:.2f}" if "engine" in per else "-",
                f"{roofline_ms:.3g} ({bandwidth / 1e9:.0f} GB/s)",
                f"{per['engine'] / roofline_ms:.1f}" if "engine" in per else "-",
                f"{NT_V100_MS_PER_ENTRY[readout]:g}",
                f"{diff:.1e}",
                "/".join(f"{res[k][2]:.0f}" for k in ("engine", "by hand") if k in res),
            )
        )
    print(
        f"\n4. {depth}-layer 3×3 SAME ReLU CNN, infinite NTK, ms per kernel entry (NT's figures are for 32×32;"
        " pooling costs grow with (H·W)², so a smaller image is not comparable with them). Roofline: reading"
        " and writing the NNGP and NTK once per layer at the bandwidth of an elementwise pass over arrays"
        " of their size"
    )
    print(
        table(
            [
                "readout",
                "engine",
                "by hand",
                "engine/hand",
                "roofline (bandwidth)",
                "engine/roofline",
                "NT V100 (published)",
                "max rel diff",
                "compile s eng/hand",
            ],
            rows,
        )
    )


SIZES = {
    "full": dict(
        mlp_n=2000,
        cnn_n=64,
        mlp_width=512,
        emp_n1=128,
        emp_n2=64,
        tile_n=20000,
        tile=2500,
        deep_gap_hw=32,
        deep_gap_n=8,
        deep_flat_n=256,
    ),
    "small": dict(
        mlp_n=300,
        cnn_n=8,
        mlp_width=256,
        emp_n1=32,
        emp_n2=16,
        tile_n=3000,
        tile=500,
        deep_gap_hw=8,
        deep_gap_n=4,
        deep_flat_n=8,
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="sizes for a CPU: ~2 minutes, < 2 GiB")
    parser.add_argument("--repeats", type=int, default=None, help="default 5, 3 with --small")
    parser.add_argument("--sections", default="1234", help="which tables to print, e.g. 24")
    args = parser.parse_args()
    s = SIZES["small" if args.small else "full"]
    repeats = args.repeats or (3 if args.small else 5)
    print(describe_machine())
    print(
        f"sizes: {'--small' if args.small else 'full'}; float32; after a compiled warm-up, the median of at "
        f"least {repeats} rounds alternating between the functions compared (rounds of 20 ms or more) "
        "unless stated"
    )
    start = time.perf_counter()
    with jax.default_matmul_precision("highest"):
        for key, fn in (
            ("1", section_infinite),
            ("2", section_empirical),
            ("3", section_tiling),
            ("4", section_deep_cnn),
        ):
            if key in args.sections:
                fn(s, repeats)
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s on {jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
    )


if __name__ == "__main__":
    main()

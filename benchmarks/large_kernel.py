"""Benchmark: a large infinite-width MLP NTK computed tile by tile (not a test).

Computes the N × N NTK (default N = 20,000: 1.6 GB in float32) of a 3-layer ReLU MLP with
:func:`ntk_adapters.batching.batch`, keeping the result on the host (a NumPy array, or a ``.npy``
memory map with ``--memmap``), and prints a table with wall time, throughput (kernel entries
per second) and the process's peak resident memory relative to the size of the result.

The kernel is ``ntk_adapters.infinite.infinite_kernel_fn`` of a Flax MLP when that is available
(``--kernel auto``/``infinite``), otherwise the closed-form arc-cosine recursion written below
(``--kernel closed-form``). With ``--baseline`` (default for N ≤ 4000) the same kernel is also
evaluated untiled, in one call, after the tiled run, and the throughput ratio is printed.

Usage::

    python benchmarks/large_kernel.py                   # N = 20,000, in host memory
    python benchmarks/large_kernel.py --memmap /tmp/k.npy
    python benchmarks/large_kernel.py --n 2000          # quick
    python benchmarks/large_kernel.py --small           # N = 3000 with the untiled baseline
    python benchmarks/large_kernel.py --devices 2       # 2 host devices (sets XLA_FLAGS)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def _parse() -> argparse.Namespace:
    small = "--small" in sys.argv[1:]  # smaller defaults; explicit options still win
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="N = 3000, tiles of 500 (36 MB result, seconds)")
    p.add_argument("--n", type=int, default=3_000 if small else 20_000, help="number of inputs (kernel is n × n)")
    p.add_argument("--d", type=int, default=32, help="input dimension")
    p.add_argument("--batch-size", type=int, default=500 if small else 1_000, help="tile edge")
    p.add_argument("--memmap", default=None, help="assemble the result in this .npy memory map")
    p.add_argument("--devices", type=int, default=None, help="number of host (CPU) devices to shard tiles over")
    p.add_argument("--kernel", choices=["auto", "infinite", "closed-form"], default="auto")
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the untiled kernel (default: on for n <= 4000)",
    )
    p.add_argument("--progress", action="store_true")
    return p.parse_args()


ARGS = _parse()
if ARGS.devices:
    # Must be set before JAX initializes its backends.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    ).strip()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ntk_adapters.batching import batch  # noqa: E402
from ntk_adapters.outputs import pack  # noqa: E402

W_VAR, B_VAR, DEPTH, WIDTH = 2.0, 0.01, 3, 512


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss as a fallback)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def closed_form_mlp_kernel(x1, x2=None, get=("nngp", "ntk")):
    """NNGP/NTK of Dense-ReLU-Dense-ReLU-Dense at infinite width, NTK parameterization.

    Per layer: ``nngp ← σw² nngp + σb²``, ``ntk ← nngp + σw² ntk`` (after the dense layer);
    ReLU: arc-cosine maps ``E[relu(u) relu(v)] = √(q1 q2)(sin θ + (π − θ) cos θ)/(2π)``,
    ``E[relu'(u) relu'(v)] = (π − θ)/(2π)`` with ``cos θ = nngp/√(q1 q2)``.
    """
    same = x2 is None
    x2 = x1 if same else x2
    d = x1.shape[-1]
    nngp = x1 @ x2.T / d
    q1, q2 = jnp.sum(x1 * x1, -1) / d, jnp.sum(x2 * x2, -1) / d
    ntk = jnp.zeros_like(nngp)
    for layer in range(DEPTH):
        nngp, q1, q2 = W_VAR * nngp + B_VAR, W_VAR * q1 + B_VAR, W_VAR * q2 + B_VAR
        ntk = nngp + W_VAR * ntk
        if layer == DEPTH - 1:
            break
        norm = jnp.sqrt(q1[:, None] * q2[None, :])
        cos = jnp.clip(nngp / norm, -1.0, 1.0)
        if same:
            cos = jnp.where(jnp.eye(cos.shape[0], dtype=bool), 1.0, cos)
        theta = jnp.arccos(cos)
        ntk = ntk * (jnp.pi - theta) / (2 * jnp.pi)
        nngp = norm * (jnp.sin(theta) + (jnp.pi - theta) * cos) / (2 * jnp.pi)
        q1, q2 = q1 / 2, q2 / 2
    return pack(get, dict(nngp=nngp, ntk=ntk))


def library_mlp_kernel():
    """``infinite_kernel_fn`` of the same MLP written in Flax, or ``None`` if unavailable."""
    try:
        import flax.linen as nn

        from ntk_adapters.flax import adapt
        from ntk_adapters.infinite import infinite_kernel_fn
    except ImportError:
        return None

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(DEPTH - 1):
                x = nn.relu(nn.Dense(WIDTH)(x))
            return nn.Dense(1)(x)

    try:
        model = adapt(MLP(), None, jnp.zeros((2, ARGS.d), jnp.float32), key=jax.random.PRNGKey(0))
        kernel_fn = infinite_kernel_fn(model)
        kernel_fn(jnp.ones((3, ARGS.d), jnp.float32), get="ntk")
    except Exception as err:  # report and fall back: the benchmark measures tiling, not the engine
        print(
            f"infinite_kernel_fn failed on the Flax MLP ({type(err).__name__}: {err}); using the closed form",
            file=sys.stderr,
        )
        return None
    return kernel_fn


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ARGS.n, ARGS.d)).astype(np.float32)

    kernel_fn, source = None, "closed-form arc-cosine recursion (benchmarks/large_kernel.py)"
    if ARGS.kernel in ("auto", "infinite"):
        kernel_fn = library_mlp_kernel()
        if kernel_fn is not None:
            source = "ntk_adapters.infinite.infinite_kernel_fn(Flax MLP)"
        elif ARGS.kernel == "infinite":
            sys.exit("ntk_adapters.infinite.infinite_kernel_fn or ntk_adapters.flax.adapt is not available")
    if kernel_fn is None:
        kernel_fn = closed_form_mlp_kernel

    devices = jax.local_devices()
    rss_before = peak_rss_bytes()
    # Compile both tile programs (diagonal and off-diagonal) on a small input with the same tile
    # shape, so the timing below measures evaluation only.
    warm = min(ARGS.n, 2 * ARGS.batch_size)
    batch(kernel_fn, ARGS.batch_size, store_on_host=True, devices=devices)(x[:warm], get="ntk")
    batched = batch(
        kernel_fn, ARGS.batch_size, store_on_host=True, memmap_path=ARGS.memmap, progress=ARGS.progress, devices=devices
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    k = batched(x, get="ntk")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_bytes()
    result_bytes = k.nbytes
    assert k.shape == (ARGS.n, ARGS.n) and k.dtype == np.float32, (k.shape, k.dtype)
    finite = bool(np.isfinite(k[:: max(1, ARGS.n // 100)]).all())

    rows = [
        (
            f"tiled {ARGS.batch_size}² on {len(devices)} dev, " + ("memmap" if ARGS.memmap else "host numpy"),
            seconds,
            cpu_seconds,
            ARGS.n**2 / seconds,
            peak / result_bytes,
            (peak - rss_before) / result_bytes,
        )
    ]

    baseline = ARGS.n <= 4000 if ARGS.baseline is None else ARGS.baseline
    if baseline:
        untiled = jax.jit(lambda a: kernel_fn(a, None, get="ntk"))
        jax.block_until_ready(untiled(x[:8]))
        untiled(x).block_until_ready()  # compile for the full shape
        start, cpu_start = time.perf_counter(), time.process_time()
        k_full = np.asarray(untiled(x).block_until_ready())
        base_seconds, base_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        max_err = float(np.max(np.abs(k_full - np.asarray(k))) / np.max(np.abs(k_full)))
        rows.append(
            (
                "untiled, one call (baseline)",
                base_seconds,
                base_cpu,
                ARGS.n**2 / base_seconds,
                float("nan"),
                float("nan"),
            )
        )

    print(
        f"\nkernel: {source}; n = {ARGS.n}, d = {ARGS.d}, float32; jax {jax.__version__}, "
        f"{os.cpu_count()} CPU cores, devices: {[str(d) for d in devices]}"
    )
    print(f"result: {ARGS.n} × {ARGS.n} float32 = {result_bytes / 1e9:.3f} GB; all finite (sampled rows): {finite}")
    print(f"peak RSS (VmHWM) {peak / 1e9:.3f} GB; before the kernel call {rss_before / 1e9:.3f} GB")
    print(
        "entries/s = n² / wall seconds (the x2=None path evaluates the diagonal and upper tiles only); "
        "CPU s = process CPU time, all threads\n"
    )
    header = (
        f"| {'run':<42} | {'wall s':>7} | {'CPU s':>7} | {'entries/s':>10} | {'peak RSS / result':>17} | "
        f"{'(peak − start) / result':>23} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, secs, cpu, rate, ratio, extra in rows:
        print(f"| {name:<42} | {secs:7.2f} | {cpu:7.2f} | {rate:10.3g} | {ratio:17.2f} | {extra:23.2f} |")
    if baseline:
        print(
            f"\ntiled / untiled throughput: {rows[0][3] / rows[1][3]:.2f} (wall), "
            f"{rows[1][2] / rows[0][2]:.2f} (CPU); "
            f"max relative difference {max_err:.2e}"
        )


if __name__ == "__main__":
    main()

"""Benchmark: what the tile record of a resumable memory-mapped kernel costs (not a test).

Evaluates the same tiled kernel (the closed-form NTK of a one-hidden-layer ReLU network, in
float32) three ways in one process, each ``--repeats`` times, and prints the median wall time and
its ratio to the host-memory baseline:

* ``store_on_host``: assembled in a NumPy array (the baseline);
* ``memmap_path`` fresh: written into a ``.npy`` memory map, committing the tile record (flush
  the map, then replace the record) every ``tile_store.COMMIT_EVERY_S`` seconds (the default),
  after every group of tiles (``0``), or only at the end of each phase (``inf``);
* ``memmap_path`` resumed, nothing left: the same call again (hashing the inputs, reading the
  record), as a cluster job rerun after completion would do.

Usage::

    python benchmarks/resumable_kernel.py                 # N = 4000, tiles of 256 (136 tiles)
    python benchmarks/resumable_kernel.py --n 8000 --tile 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters import batch, tile_store


def relu_ntk(x1, x2=None):
    x2 = x1 if x2 is None else x2
    d = x1.shape[-1]
    s12 = x1 @ x2.T / d + 0.1
    n1 = jnp.sum(x1 * x1, -1) / d + 0.1
    n2 = jnp.sum(x2 * x2, -1) / d + 0.1
    norm = jnp.sqrt(n1[:, None] * n2[None, :])
    cos = jnp.clip(s12 / norm, -1.0, 1.0)
    theta = jnp.arccos(cos)
    nngp = norm * (jnp.sin(theta) + (jnp.pi - theta) * cos) / (2 * jnp.pi) + 0.1
    return nngp + s12 * (jnp.pi - theta) / (2 * jnp.pi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    x = np.random.default_rng(0).normal(size=(args.n, 32)).astype(np.float32)
    t = -(-args.n // args.tile)
    batch(relu_ntk, args.tile, store_on_host=True)(x[: 2 * args.tile])  # compile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:

        def timed(fn):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        base = timed(lambda: batch(relu_ntk, args.tile, store_on_host=True)(x))
        counter = iter(range(10**6))

        def fresh_with(every):
            tile_store.COMMIT_EVERY_S, default = every, tile_store.COMMIT_EVERY_S
            try:
                return timed(
                    lambda: batch(relu_ntk, args.tile, memmap_path=os.path.join(tmp, f"k{next(counter)}.npy"))(x)
                )
            finally:
                tile_store.COMMIT_EVERY_S = default

        every_group = fresh_with(0.0)
        phase_ends = fresh_with(float("inf"))
        fresh = fresh_with(tile_store.COMMIT_EVERY_S)
        path = os.path.join(tmp, "done.npy")
        batch(relu_ntk, args.tile, memmap_path=path)(x)
        rerun = timed(lambda: batch(relu_ntk, args.tile, memmap_path=path)(x))
        rows = [
            ("store_on_host (baseline)", base),
            (f"memmap_path, commit every {tile_store.COMMIT_EVERY_S:g} s (default)", fresh),
            ("memmap_path, commit after every group", every_group),
            ("memmap_path, commit at phase ends only", phase_ends),
            ("memmap_path, rerun when complete", rerun),
        ]

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"device: {jax.devices()[0].device_kind} × {len(jax.local_devices())}; jax {jax.__version__}"
    )
    print(f"N = {args.n}, tile {args.tile}: {t * (t + 1) // 2} tiles evaluated, float32, median of {args.repeats}")
    print(f"{'variant':44s} {'seconds':>9s} {'ratio':>7s}")
    for name, sec in rows:
        print(f"{name:44s} {sec:9.3f} {sec / base:7.2f}")


if __name__ == "__main__":
    main()

"""Monte Carlo kernels: ``monte_carlo_kernel_fn`` against a naive loop and one empirical NTK.

Not a test: prints, for a Flax MLP 784-512-512-10 (the case of neural-tangents' published
comparison) on 64×64 inputs and 8 initializations, the median wall time (after a compiled first
run) of

  monte_carlo    ntk_adapters.monte_carlo_kernel_fn(model, key, 8) (NNGP and NTK; 'auto'
                 implementation, which is structured derivatives here)
  structured×8   8 × one ntk_adapters.empirical_ntk_fn(model) call (structured, per example):
                 the target is monte_carlo ≤ 2 × this
  naive loop     a Python loop over the 8 draws: model.init_fn, then the whole-batch Jacobian
                 contraction (implementation='jacobian', vmap_axes=None) — how the library
                 computed Monte Carlo kernels before it shared the implementation choice; timed
                 on --naive-samples draws and scaled to 8

and the ratio of each to monte_carlo. States the machine and the device.

Run:
  .venv/bin/python benchmarks/monte_carlo.py                 # about 2 minutes on 2 CPU cores
  .venv/bin/python benchmarks/monte_carlo.py --small         # 16 + 16 inputs, 4 draws, < 1 minute
  .venv/bin/python benchmarks/monte_carlo.py --repeats 5 --naive-samples 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
from flax import linen as nn

import ntk_adapters
import ntk_adapters.flax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (512, 512):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    small = "--small" in sys.argv[1:]  # smaller defaults; explicit options still win
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="16 + 16 inputs, 4 initializations (< 1 GiB)")
    parser.add_argument("--repeats", type=int, default=2 if small else 3)
    parser.add_argument("--samples", type=int, default=4 if small else 8)
    parser.add_argument("--naive-samples", type=int, default=1)
    parser.add_argument("--n", type=int, default=16 if small else 64, help="inputs per side")
    args = parser.parse_args()

    x1 = jax.random.normal(jax.random.PRNGKey(0), (args.n, 784))
    x2 = jax.random.normal(jax.random.PRNGKey(1), (args.n, 784))
    module = MLP()
    model = ntk_adapters.flax.adapt(module, module.init(jax.random.PRNGKey(2), x1), x1)
    key = jax.random.PRNGKey(3)

    mc = ntk_adapters.monte_carlo_kernel_fn(model, key, args.samples)
    ntk = ntk_adapters.empirical_ntk_fn(model)
    naive_ntk = ntk_adapters.empirical_ntk_fn(model, implementation="jacobian", vmap_axes=None)

    def naive():
        out = []
        for i in range(args.naive_samples):
            params = model.init_fn(jax.random.fold_in(key, i), x1)
            out.append(naive_ntk(x1, x2, params))
        return out

    t_mc = timed(lambda: mc(x1, x2), args.repeats)
    t_one = timed(lambda: ntk(x1, x2), args.repeats)
    t_naive = timed(naive, 1) * args.samples / args.naive_samples

    rows = [
        ("monte_carlo", t_mc),
        (f"structured×{args.samples}", t_one * args.samples),
        ("naive loop", t_naive),
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); jax {jax.__version__}"
    )
    print(f"MLP 784-512-512-10, x1 {args.n}, x2 {args.n}, {args.samples} initializations, float32, NNGP + NTK")
    print(f"{'method':<16}{'seconds':>10}{'÷ monte_carlo':>16}")
    for name, t in rows:
        print(f"{name:<16}{t:>10.3f}{t / t_mc:>16.2f}")
    print(
        f"target: monte_carlo ≤ 2 × structured×{args.samples}: "
        f"{'met' if t_mc <= 2 * t_one * args.samples else 'missed'} ({t_mc / (t_one * args.samples):.2f}×)"
    )


if __name__ == "__main__":
    main()

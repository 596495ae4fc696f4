"""compare_training on the Flax MNIST example CNN at its upstream size, on scikit-learn's digits.

Not a test: trains the linen CNN of Flax's MNIST example (conv 32 → avg-pool → conv 64 →
avg-pool → dense 256 → dense 10, the upstream sizes) on 200 training digits (8×8, one channel)
with optax SGD beside its linearization and the closed-form empirical-NTK prediction, evaluated on
200 test digits, and prints the wall time of each phase: adapting, the empirical NTK of the 400
stacked inputs (the step that dominated before examples were proven independent), and the whole
``compare_training`` call, with the implementation ``'auto'`` chose. Also times the whole-batch
NTK (``vmap_axes=None``, the previous default) on 100 + 100 digits as the baseline in the same
process. States the machine and the device.

Run:
  .venv/bin/python benchmarks/compare_training.py                 # about 2 minutes on 2 CPU cores
  .venv/bin/python benchmarks/compare_training.py --small         # 50 + 50 digits, under a minute
  .venv/bin/python benchmarks/compare_training.py --steps 500 --skip-baseline
"""

# The model below is the class CNN of github.com/google/flax examples/mnist/train.py at commit
# 772d99741458a843bb86c875ac3480bc1ac63656 (the last linen version), Copyright 2024 The Flax
# Authors, Apache License 2.0 (http://www.apache.org/licenses/LICENSE-2.0); the reduced-size copy
# used by the tests is examples/zoo/flax_mnist_linen.py.

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import linen as nn
from sklearn.datasets import load_digits

import ntk_adapters.flax
from ntk_adapters import compare_training, empirical_ntk_fn
from ntk_adapters.empirical import output_axes
from ntk_adapters.implementations import choose
from ntk_adapters.inputs import resolve_vmap_axes


class CNN(nn.Module):
    """A simple CNN model."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def main() -> None:
    small = "--small" in sys.argv[1:]  # smaller defaults; explicit options still win
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="50 + 50 digits, 50 steps (~1 GiB, under a minute)")
    parser.add_argument("--n", type=int, default=50 if small else 200, help="training and test digits each")
    parser.add_argument("--steps", type=int, default=50 if small else 200)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    labels = np.eye(10, dtype=np.float32)[digits.target]
    x_train, x_test = images[: args.n], images[args.n : 2 * args.n]
    y_train, y_test = labels[: args.n], labels[args.n : 2 * args.n]

    module = CNN()
    model, t_adapt = timed(lambda: ntk_adapters.flax.adapt(module, None, x_train))
    stacked = np.concatenate([x_train, x_test])
    batch = resolve_vmap_axes(model, stacked, "auto")
    impl = choose(
        "auto",
        model.apply_fn,
        model.params,
        stacked,
        None,
        output_axes(model.apply_fn, model.params, stacked, None, (), ()),
        batch,
        None,
        None,
    )
    _, t_ntk = timed(lambda: empirical_ntk_fn(model, trace_axes=())(stacked))
    k = np.asarray(empirical_ntk_fn(model, trace_axes=())(x_train))
    size = k.shape[0] * k.shape[2]
    eta = 0.5 * 2 * size / np.linalg.eigvalsh(k.transpose(0, 2, 1, 3).reshape(size, size)).max()
    result, t_compare = timed(
        lambda: compare_training(
            model, x_train, y_train, x_test, y_test, learning_rate=float(eta), steps=args.steps, progress=False
        )
    )

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); jax {jax.__version__}"
    )
    print(
        f"Flax MNIST CNN (upstream sizes), {args.n} train + {args.n} test digits 8×8, float32, "
        f"{args.steps} SGD steps at η = ½·η_max = {eta:.3g}"
    )
    print(f"  batch axes proven: {batch is not None}; 'auto' implementation: {impl}")
    print(f"{'phase':<52}{'seconds':>10}")
    print(f"{'adapt':<52}{t_adapt:>10.1f}")
    print(f"{f'empirical NTK (N, N, O, O) of {2 * args.n} stacked inputs':<52}{t_ntk:>10.1f}")
    print(f"{'compare_training (kernels, training, predictions)':<52}{t_compare:>10.1f}")
    if not args.skip_baseline:
        half = np.concatenate([x_train[: args.n // 2], x_test[: args.n // 2]])
        _, t_base = timed(lambda: empirical_ntk_fn(model, trace_axes=(), vmap_axes=None)(half))
        _, t_new = timed(lambda: empirical_ntk_fn(model, trace_axes=())(half))
        print(f"{f'whole-batch NTK (vmap_axes=None), {args.n} stacked':<52}{t_base:>10.1f}")
        print(f"{f'default NTK, {args.n} stacked':<52}{t_new:>10.1f}   ({t_base / t_new:.0f}× faster)")
    print("final:", {k: round(v, 4) for k, v in result.final().items() if "test" in k})


if __name__ == "__main__":
    main()

"""Train a Flax MLP on scikit-learn's digits with optax SGD and compare it with the NTK predictions.

Four trajectories on one time axis (optax step k ↔ t = k·η, loss = ½·mean over all N·O entries):

* the network, trained with ``optax.sgd``;
* its linearization around the initial parameters, trained the same way;
* the closed-form gradient-flow prediction from the empirical NTK at initialization;
* the same with the exact infinite-width NTK of this architecture (when the engine supports it).

Runs in about a minute on 2 CPU cores; the data ship with scikit-learn (no download)::

    python examples/digits_dynamics.py                      # writes out/digits_dynamics.png
    python examples/digits_dynamics.py --width 2048 --steps 2000 --plot out/wide.png
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np
from sklearn.datasets import load_digits

import ntk_adapters.flax
from ntk_adapters.dynamics import compare_training
from ntk_adapters.empirical import empirical_ntk_fn
from ntk_adapters.predict import max_learning_rate


class MLP(nn.Module):
    """Two hidden ReLU layers, Flax defaults (LeCun-normal weights, zero biases)."""

    width: int
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.classes)(x)


def digits(n_train: int, n_test: int, seed: int = 0):
    """Standardized 8×8 digit images ``(n, 64)`` and centred one-hot targets ``(n, 10)``."""
    data = load_digits()
    x = data.data.astype(np.float32)
    labels = data.target
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    # Border pixels are nearly constant; a floor on their scale keeps rare test values bounded.
    mean, std = x[train].mean(0), np.maximum(x[train].std(0), 1.0)
    x = (x - mean) / std
    onehot = np.eye(10, dtype=np.float32)[labels] - 0.1  # zero mean per row, like the NT examples
    return x[train], onehot[train], labels[train], x[test], onehot[test], labels[test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument(
        "--lr-fraction", type=float, default=0.5, help="learning rate as a fraction of the stability limit 2·N·O/λ_max"
    )
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: full batch)")
    parser.add_argument(
        "--kernel",
        default="auto",
        choices=("traced", "full", "auto"),
        help="empirical NTK of the prediction: per-output (N, N), cheaper; or the exact "
        "(N, N, O, O); auto: full when N·O ≤ 3000",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="out/digits_dynamics.png")
    args = parser.parse_args()

    start = time.perf_counter()
    x_train, y_train, l_train, x_test, y_test, l_test = digits(args.n_train, args.n_test, args.seed)
    model = ntk_adapters.flax.adapt(MLP(args.width), None, x_train, key=jax.random.PRNGKey(args.seed))

    # Standard parameterization: the NTK grows with width, so pick η relative to the largest
    # stable rate of full-batch gradient descent on the linearized network.
    # vmap_axes=0: examples are independent (no batch statistics), which makes the kernel cheap.
    ntk_train = empirical_ntk_fn(model, trace_axes=(), vmap_axes=0)(x_train)  # (N, N, O, O)
    eta_max = max_learning_rate(ntk_train, y_train.size, momentum=args.momentum or 0.0)
    lr = args.lr_fraction * eta_max

    result = compare_training(
        model,
        x_train,
        y_train,
        x_test,
        y_test,
        learning_rate=lr,
        momentum=args.momentum,
        steps=args.steps,
        eval_every=args.eval_every,
        kernel=args.kernel,
        vmap_axes=0,
        batch_size=args.batch_size,
        key=jax.random.PRNGKey(args.seed + 1),
    )
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test, MLP width {args.width}, "
        f"η = {args.lr_fraction:g}·η_max = {lr:.4g}"
    )
    print(result.table(max_rows=11))
    print()
    for name in result.names:
        acc = np.mean(result.outputs_test[name][-1].argmax(-1) == l_test)
        print(f"test accuracy after {args.steps} steps, {name:>10}: {acc:.3f}")
    result.plot(
        args.plot,
        title=f"digits, Flax MLP width {args.width}, optax sgd η={lr:.3g}, {len(x_train)} train / {len(x_test)} test",
    )
    print(f"\nplot written to {args.plot}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

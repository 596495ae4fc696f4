"""How wide is wide enough? The gap between a trained network and the NTK prediction vs width.

For each width, a Flax MLP (two hidden ReLU layers) is trained on a slice of scikit-learn's
digits with full-batch optax SGD at half its stability limit (η = ½·η_max, so η ∝ 1/width in the
standard parameterization) for a fixed number of steps, next to its linearization and the
closed-form prediction from its empirical NTK at initialization (and the infinite-width NTK when
the engine supports the model). The largest RMS output discrepancy over training, relative to
the RMS of the initial residual, is reported per width, with the fitted power law::

    python examples/width_sweep.py                 # writes out/width_sweep.png
    python examples/width_sweep.py --widths 64 256 1024 --steps 500
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import ntk_adapters.flax
from ntk_adapters.dynamics import compare_training
from ntk_adapters.empirical import empirical_ntk_fn
from ntk_adapters.predict import max_learning_rate

from digits_dynamics import MLP, digits  # the neighbouring example script

COLUMNS = (
    ("network-ntk", "test", "net vs eNTK pred (test)"),
    ("network-ntk", "train", "net vs eNTK pred (train)"),
    ("network-linearized", "test", "net vs linearized (test)"),
    ("network-infinite", "test", "net vs ∞-width pred (test)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="out/width_sweep.png")
    args = parser.parse_args()

    start = time.perf_counter()
    x_train, y_train, _, x_test, y_test, _ = digits(args.n_train, args.n_test, args.seed)
    rows = []
    for width in args.widths:
        model = ntk_adapters.flax.adapt(MLP(width), None, x_train, key=jax.random.PRNGKey(args.seed))
        ntk_train = empirical_ntk_fn(model, trace_axes=(), vmap_axes=0)(x_train)  # (N, N, O, O)
        eta_max = max_learning_rate(ntk_train, y_train.size)
        lr = args.lr_fraction * eta_max
        result = compare_training(
            model,
            x_train,
            y_train,
            x_test,
            y_test,
            learning_rate=lr,
            steps=args.steps,
            eval_every=max(1, args.steps // 30),
            vmap_axes=0,
            progress=False,
        )
        scale = {
            "train": np.sqrt(np.mean((result.outputs_train["network"][0] - y_train) ** 2)),
            "test": np.sqrt(np.mean((result.outputs_test["network"][0] - y_test) ** 2)),
        }
        row = {"width": width, "lr": lr, "loss": result.loss_test["network"][-1]}
        for pair, split, _ in COLUMNS:
            gaps = (result.discrepancy_test if split == "test" else result.discrepancy_train).get(pair)
            row[(pair, split)] = np.nan if gaps is None else float(np.max(gaps)) / scale[split]
        rows.append(row)
        print(f"width {width:>5}: η = {lr:.3g}, done ({time.perf_counter() - start:.0f} s)", flush=True)

    print(
        f"\nmax over {args.steps} steps of RMS(f_a − f_b) / RMS(f_0 − y); "
        f"{len(x_train)} train / {len(x_test)} test digits, η = {args.lr_fraction:g}·η_max\n"
    )
    head = f"{'width':>6} {'η':>9} {'test loss':>10}" + "".join(f" {title:>27}" for _, _, title in COLUMNS)
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row['width']:>6} {row['lr']:>9.3g} {row['loss']:>10.4g}"
            + "".join(f" {row[(p, s)]:>27.3g}" for p, s, _ in COLUMNS)
        )
    widths = np.array([r["width"] for r in rows], dtype=float)
    print()
    for pair, split, title in COLUMNS:
        gaps = np.array([r[(pair, split)] for r in rows])
        ok = np.isfinite(gaps) & (gaps > 0)
        if ok.sum() >= 2:
            slope = np.polyfit(np.log(widths[ok]), np.log(gaps[ok]), 1)[0]
            print(f"fitted gap ∝ width^{slope:.2f}   [{title}]")

    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    styles = ["o-", "s--", "^:", "d-."]
    for (pair, split, title), style in zip(COLUMNS, styles):
        gaps = np.array([r[(pair, split)] for r in rows])
        if np.any(np.isfinite(gaps)):
            ax.plot(widths, gaps, style, lw=1.8, ms=6, label=title)
    ref = np.array([r[("network-ntk", "test")] for r in rows])
    ax.plot(widths, ref[0] * np.sqrt(widths[0] / widths), color="0.6", lw=1, label="∝ 1/√width (guide)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("hidden width")
    ax.set_ylabel("max over training of RMS(f_a − f_b) / RMS(f_0 − y)")
    ax.set_title(f"digits, 2-hidden-layer Flax MLP, optax sgd η = {args.lr_fraction:g}·η_max, {args.steps} steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"\nplot written to {args.plot}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

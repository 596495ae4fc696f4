"""The record :func:`ntk_adapters.dynamics.compare_training` returns: the trajectories of the
network, its linearization and the kernel predictions, with their discrepancies, a printed report
and a plot."""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NAMES", "PAIRS", "TrainingComparison", "mse_loss", "pair_name"]

NAMES = ("network", "linearized", "ntk", "infinite")
#: Output discrepancies reported (root mean square over all entries of the difference).
PAIRS = (("network", "linearized"), ("network", "ntk"), ("linearized", "ntk"), ("network", "infinite"))

_LABELS = {
    "network": "network",
    "linearized": "linearized",
    "ntk": "eNTK pred.",
    "infinite": "∞-width pred.",
}
_SHORT = {"network": "net", "linearized": "lin", "ntk": "eNTK", "infinite": "inf"}


def mse_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
    """The library's loss: ``½ · mean over all entries of (fx − y)²`` (a scalar).

    Example::

      mse_loss(jnp.zeros((4, 3)), jnp.ones((4, 3)))    # 0.5
    """
    return 0.5 * jnp.mean((fx - y) ** 2)


def pair_name(a: str, b: str) -> str:
    """Key of the discrepancy between trajectories ``a`` and ``b``, e.g. ``'network-ntk'``."""
    return f"{a}-{b}"


@dataclasses.dataclass
class TrainingComparison:
    """Trajectories of a trained network, its linearization and the NTK predictions.

    ``E`` is the number of evaluations (step 0, every ``eval_every`` steps, and the last step),
    ``N``/``M`` the numbers of training/test examples, ``out`` the per-example output shape.
    Dictionaries are keyed by trajectory name (``'network'``, ``'linearized'``, ``'ntk'``,
    ``'infinite'``; absent when not computed) or, for discrepancies, by ``'a-b'`` pair names.

    Attributes:
      step: ``(E,)`` int, the optimizer steps at which everything was evaluated.
      time: ``(E,)`` float, the physical time ``τ = step · learning_rate`` of gradient flow (the
        step itself when no learning rate is known, i.e. a user-supplied optimizer); the
        predictors themselves are asked for ``step`` steps of ``learning_rate``.
      loss_train: name → ``(E,)`` training loss (½·mean squared error over all N·O entries).
      loss_test: name → ``(E,)`` test loss; empty without ``y_test``.
      discrepancy_train: pair → ``(E,)`` RMS over all N·O entries of ``f_a − f_b`` on the
        training inputs.
      discrepancy_test: the same on the test inputs; empty without ``x_test``.
      outputs_train: name → ``(E, N, *out)`` outputs on the training inputs.
      outputs_test: name → ``(E, M, *out)`` outputs on the test inputs; empty without ``x_test``.
      learning_rate: ``η``, or ``None`` with a user-supplied optimizer.
      momentum: ``μ`` or ``None``.
      batch_size: minibatch size, ``None`` for full batch.
      kernel: ``'full'`` or ``'traced'``: which empirical NTK the ``'ntk'`` prediction used.
      max_learning_rate: the largest stable full-batch rate ``2(1 + μ)·N·O / λ_max(Θ)`` of the
        linearized network, when the empirical NTK was computed.
      notes: human-readable remarks (what was skipped and why, stability warnings).
    """

    step: np.ndarray
    time: np.ndarray
    loss_train: dict[str, np.ndarray]
    loss_test: dict[str, np.ndarray]
    discrepancy_train: dict[str, np.ndarray]
    discrepancy_test: dict[str, np.ndarray]
    outputs_train: dict[str, np.ndarray]
    outputs_test: dict[str, np.ndarray]
    learning_rate: Optional[float]
    momentum: Optional[float]
    batch_size: Optional[int]
    kernel: Optional[str]
    max_learning_rate: Optional[float] = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        """The trajectories present, in report order."""
        return tuple(n for n in NAMES if n in self.outputs_train)

    @property
    def pairs(self) -> tuple[str, ...]:
        """The discrepancy keys present, in report order."""
        return tuple(pair_name(a, b) for a, b in PAIRS if pair_name(a, b) in self.discrepancy_train)

    def final(self) -> dict[str, float]:
        """Last-evaluation values as a flat dict, e.g. ``{'loss_train/network': ..., 'rms_test/network-ntk': ...}``."""
        out: dict[str, float] = {}
        for prefix, table in (
            ("loss_train", self.loss_train),
            ("loss_test", self.loss_test),
            ("rms_train", self.discrepancy_train),
            ("rms_test", self.discrepancy_test),
        ):
            for k, v in table.items():
                out[f"{prefix}/{k}"] = float(v[-1])
        return out

    def table(self, max_rows: Optional[int] = 12) -> str:
        """The comparison as fixed-width text: one block for train, one for test.

        Each block has a row per evaluation (at most ``max_rows``, evenly spaced, always with the
        first and last; ``None`` for all) with the step, the physical time ``τ = k·η``, the loss
        of each trajectory and the RMS output discrepancies (``|net−lin|`` is the RMS of
        ``f_network − f_linearized`` over all entries).
        """
        rows = _row_indices(len(self.step), max_rows)
        blocks = [self._header()]
        for split, losses, gaps in (
            ("train", self.loss_train, self.discrepancy_train),
            ("test", self.loss_test, self.discrepancy_test),
        ):
            if not losses and not gaps:
                continue
            cols: list[tuple[str, np.ndarray]] = [(f"loss {_SHORT[n]}", losses[n]) for n in self.names if n in losses]
            cols += [(f"|{_SHORT[a]}−{_SHORT[b]}|", gaps[pair_name(a, b)]) for a, b in PAIRS if pair_name(a, b) in gaps]
            head = f"{'step':>7} {'τ':>9}" + "".join(f" {name:>10}" for name, _ in cols)
            lines = [f"[{split}]  loss = ½·mean (f − y)²;  |a−b| = RMS of f_a − f_b", head, "-" * len(head)]
            for i in rows:
                line = f"{int(self.step[i]):>7} {_fmt(self.time[i]):>9}"
                line += "".join(f" {_fmt(v[i]):>10}" for _, v in cols)
                lines.append(line)
            blocks.append("\n".join(lines))
        if self.notes:
            blocks.append("\n".join(f"note: {n}" for n in self.notes))
        return "\n\n".join(blocks)

    def _header(self) -> str:
        if self.learning_rate is None:
            opt = "user optimizer (no prediction)"
        else:
            opt = f"sgd(η={self.learning_rate:g}" + (f", momentum={self.momentum:g})" if self.momentum else ")")
        batch = "full batch" if self.batch_size is None else f"minibatch {self.batch_size}"
        parts = [opt, batch, f"{int(self.step[-1])} steps"]
        if self.kernel:
            parts.append(f"{self.kernel} empirical NTK")
        if self.max_learning_rate is not None:
            parts.append(f"η_max≈{self.max_learning_rate:.3g}")
        return "training comparison: " + ", ".join(parts)

    def __str__(self) -> str:
        return self.table()

    def plot(
        self,
        path: Optional[Union[str, os.PathLike]] = None,
        *,
        title: Optional[str] = None,
        xscale: str = "linear",
        dpi: int = 120,
    ):
        """Loss curves and output discrepancies against time, as a matplotlib figure.

        Top row: training (and test) loss of every trajectory on a log scale; bottom row: RMS
        output discrepancies between them (exact zeros, e.g. at step 0, are not drawn). The x
        axis is the physical time ``τ = k·η``; on a linear x axis and a log y axis exponential
        decay is a straight line.

        Args:
          path: where to save the figure (its directory is created); ``None`` only returns it.
          title: figure title; a summary of the run by default.
          xscale: ``'linear'``, ``'log'`` or ``'symlog'`` (log-like, but shows t = 0).
          dpi: resolution of the saved file.

        Returns:
          The ``matplotlib.figure.Figure``. Needs matplotlib (``pip install 'ntk_adapters[plot]'``).
        """
        if xscale not in ("linear", "log", "symlog"):
            raise ValueError(f"xscale must be 'linear', 'log' or 'symlog'; got {xscale!r}")
        plt = _pyplot()
        has_test = bool(self.loss_test) or bool(self.discrepancy_test)
        ncols = 2 if has_test else 1
        width_in = 6.2 * ncols + (1.4 if ncols == 1 else 0.0)
        fig, axes = plt.subplots(2, ncols, figsize=(width_in, 8.0), squeeze=False, sharex=True)
        styles = {
            "network": dict(color="C0", lw=2.2, ls="-"),
            "linearized": dict(color="C1", lw=2.0, ls="--"),
            "ntk": dict(color="k", lw=1.4, ls=":"),
            "infinite": dict(color="C2", lw=1.6, ls="-."),
        }
        pair_styles = {
            "network-linearized": dict(color="C1", ls="--"),
            "network-ntk": dict(color="C0", ls="-"),
            "linearized-ntk": dict(color="k", ls=":"),
            "network-infinite": dict(color="C2", ls="-."),
        }
        x = np.asarray(self.time, dtype=float)
        xlabel = "τ = step · η" if self.learning_rate is not None else "step"
        splits = [("train", self.loss_train, self.discrepancy_train, self.outputs_train)]
        if has_test:
            splits.append(("test", self.loss_test, self.discrepancy_test, self.outputs_test))
        for col, (split, losses, gaps, outs) in enumerate(splits):
            ax = axes[0, col]
            for n in self.names:
                if n in losses:
                    ax.plot(x, _positive(losses[n]), label=_LABELS[n], **styles[n])
            ax.set_yscale("log")
            n_ex = next(iter(outs.values())).shape[1] if outs else 0
            ax.set_title(f"{split} loss ({n_ex} examples)")
            ax.set_ylabel("½·mean (f − y)²")
            if losses:
                ax.legend(fontsize=9)
            else:
                ax.text(0.5, 0.5, "no targets given", ha="center", va="center", transform=ax.transAxes)
            ax.grid(True, which="both", alpha=0.3)
            ax = axes[1, col]
            for p in self.pairs:
                if p in gaps:
                    a, b = p.split("-")
                    ax.plot(x, _positive(gaps[p]), lw=1.8, label=f"{_LABELS[a]} − {_LABELS[b]}", **pair_styles[p])
            ax.set_yscale("log")
            ax.set_title(f"{split} outputs: RMS discrepancy")
            ax.set_ylabel("RMS of f_a − f_b")
            ax.set_xlabel(xlabel)
            if gaps:
                ax.legend(fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        for ax in axes.ravel():
            if xscale == "symlog":
                ax.set_xscale("symlog", linthresh=max(float(x[1]) if len(x) > 1 else 1.0, 1e-12))
            else:
                ax.set_xscale(xscale)
            ax.set_xlim(left=float(x[0]) if xscale == "linear" else None, right=float(x[-1]))
        heading = title if title is not None else self._header()
        fig.suptitle(textwrap.fill(heading, width=int(width_in * 13)), fontsize=10)
        fig.tight_layout()
        if path is not None:
            path = os.fspath(path)
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            fig.savefig(path, dpi=dpi)
        return fig


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "TrainingComparison.plot needs matplotlib, which is not installed. Install it with "
            "`pip install 'ntk_adapters[plot]'` (or `pip install matplotlib`); "
            "TrainingComparison.table() works without it."
        ) from err
    return plt


def _positive(v: np.ndarray) -> np.ndarray:
    """Values for a log axis: exact zeros (step 0 discrepancies) are not drawn."""
    v = np.asarray(v, dtype=float)
    return np.where(v > 0, v, np.nan)


def _fmt(v: float) -> str:
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    return f"{v:.2e}"


def _row_indices(n: int, max_rows: Optional[int]) -> list[int]:
    if max_rows is None or n <= max_rows:
        return list(range(n))
    if max_rows < 2:
        return [n - 1]
    return sorted(set(np.round(np.linspace(0, n - 1, max_rows)).astype(int).tolist()))

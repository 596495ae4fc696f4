"""The value the infinite-width engine propagates through a model.

A :class:`Kernel` describes the joint distribution, at infinite width, of one channel of a
hidden layer evaluated on two batches of inputs ``x1`` (N1 rows) and ``x2`` (N2 rows). Channels
are i.i.d., so one channel says everything: the full kernel over O output units is
``K ⊗ I_O``.

Spatial layouts (``spatial`` is the tuple of spatial sizes, e.g. ``(H, W)``):

* ``'none'`` (no spatial axes): ``nngp``/``ntk`` ``(N1, N2)``, ``cov1`` ``(N1,)``, ``cov2`` ``(N2,)``.
* ``'diagonal'``: only covariances between equal positions are kept:
  ``nngp`` ``(N1, N2, H, W)``, ``cov1`` ``(N1, H, W)``, ``cov2`` ``(N2, H, W)``.
* ``'full'``: covariances between every pair of positions, axes interleaved per spatial
  dimension: ``nngp`` ``(N1, N2, H1, H2, W1, W2)``, ``cov1`` ``(N1, H, H', W, W')``,
  ``cov2`` ``(N2, H, H', W, W')``. Costs ``(H·W)²`` per pair of inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

LAYOUTS = ("none", "diagonal", "full")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """NNGP, NTK and per-input variances of one channel of an infinitely wide layer.

    Attributes:
      nngp: covariance between ``x1`` and ``x2`` entries; shape per ``layout`` (module docstring).
      ntk: neural tangent kernel, same shape as ``nngp``; ``None`` when not tracked.
      cov1: variance (``'diagonal'``) or covariance (``'full'``) of the ``x1`` entries,
        ``(N1, ...)``.
      cov2: the same for ``x2``, ``(N2, ...)``; equal to ``cov1`` when ``x2`` is ``x1``.
      layout: ``'none'``, ``'diagonal'`` or ``'full'`` (static).
      is_gaussian: ``True`` when the channels are zero-mean jointly Gaussian processes (the output
        of a random linear layer), which elementwise nonlinearities and normalizations require
        (static).
      same_inputs: ``True`` when ``x2`` is ``x1`` (static).
      mean1: for a value that is not a zero-mean process but whose means are known, the average
        over channels of each entry's expectation, ``(N1, *spatial)`` (then ``nngp`` and the
        covariances are second moments, not covariances); ``None`` when unknown, and implied zero
        when ``is_gaussian``. Set by :func:`ntk_adapters.infinite.fixed_arrays.add_fixed` (a fixed
        array added to a Gaussian value has channels with different means); read by
        :func:`ntk_adapters.infinite.layers.layer_norm`, which subtracts the channel mean.
      mean2: the same for ``x2``, ``(N2, *spatial)``.
    """

    nngp: jax.Array
    ntk: Optional[jax.Array]
    cov1: jax.Array
    cov2: jax.Array
    layout: str = dataclasses.field(default="none", metadata=dict(static=True))
    is_gaussian: bool = dataclasses.field(default=False, metadata=dict(static=True))
    same_inputs: bool = dataclasses.field(default=False, metadata=dict(static=True))
    mean1: Optional[jax.Array] = None
    mean2: Optional[jax.Array] = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {self.layout!r}")

    @property
    def spatial(self) -> tuple[int, ...]:
        """Spatial sizes ``(H, W, ...)``; ``()`` for layout ``'none'``."""
        if self.layout == "none":
            return ()
        if self.layout == "diagonal":
            return tuple(self.cov1.shape[1:])
        return tuple(self.cov1.shape[1::2])

    def replace(self, **changes) -> "Kernel":
        """A copy with ``changes``. The channel means are dropped unless given again: a map that
        does not say what it does to them would otherwise leave stale means behind."""
        changes.setdefault("mean1", None)
        changes.setdefault("mean2", None)
        return dataclasses.replace(self, **changes)

    def channel_means(self) -> Optional[tuple[jax.Array, jax.Array]]:
        """``(mean1, mean2)`` of the value's entries averaged over channels, zeros for a zero-mean
        Gaussian process, ``None`` when they are not known."""
        if self.mean1 is not None:
            return self.mean1, self.mean1 if self.mean2 is None else self.mean2
        if not self.is_gaussian:
            return None
        dtype = self.nngp.dtype
        n1, n2 = self.cov1.shape[0], self.cov2.shape[0]
        spatial = self.spatial
        return jnp.zeros((n1, *spatial), dtype), jnp.zeros((n2, *spatial), dtype)


jax.tree_util.register_dataclass(
    Kernel,
    data_fields=["nngp", "ntk", "cov1", "cov2", "mean1", "mean2"],
    meta_fields=["layout", "is_gaussian", "same_inputs"],
)

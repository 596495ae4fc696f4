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

The nonlinearities of the ``'full'`` layout read the per-input covariances only at their position
diagonals, the variances ``(N, H, W)``. For ``K(x, x)`` (``same_inputs``) these are taken from
``nngp`` itself, whose entries of an input with itself then have correlation exactly one (the
derivative kernels of ReLU-like maps are singular there: a variance that differed from them in
its last bit would cost ``sqrt(ε)`` in the kernels and the input gradients). For ``x1 ≠ x2`` they
are carried on their own, ``var1`` ``(N1, H, W)`` and ``var2``, each map computing them from the
previous variances. Either way a compiled kernel function whose layers never read a per-input
covariance off its diagonal (no pooling before a nonlinearity) drops ``cov1``/``cov2`` altogether,
a fraction ``(N1 + N2) / (N1·N2)`` of the work.
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
      var1: layout ``'full'`` with ``x1 ≠ x2`` only: the position diagonal of ``cov1``,
        ``(N1, *spatial)``, when the map that made ``cov1`` computed it without reading ``cov1``
        (module docstring); ``None`` otherwise. Read it through :meth:`variances`.
      var2: the same for ``cov2``.
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
    var1: Optional[jax.Array] = None
    var2: Optional[jax.Array] = None

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
        """A copy with ``changes``. The channel means are dropped unless given again, and so are the
        separate variances of a covariance that changes: a map that does not say what it does to
        them would otherwise leave stale values behind."""
        changes.setdefault("mean1", None)
        changes.setdefault("mean2", None)
        carried = changes.get("layout", self.layout) == "full" and not changes.get("same_inputs", self.same_inputs)
        for cov, var in (("cov1", "var1"), ("cov2", "var2")):
            if cov in changes or not carried:
                changes.setdefault(var, None)
        return dataclasses.replace(self, **changes)

    @property
    def carries_variances(self) -> bool:
        """Whether maps compute ``var1``/``var2`` (layout ``'full'`` with ``x1 ≠ x2``)."""
        return self.layout == "full" and not self.same_inputs

    def variances(self) -> tuple[jax.Array, jax.Array]:
        """The per-position variances of the ``x1`` and ``x2`` entries, ``(N1, *spatial)`` and
        ``(N2, *spatial)`` (``(N,)`` without positions): ``cov1``/``cov2`` themselves, or, in the
        ``'full'`` layout, ``nngp``'s entries of each input with itself (``same_inputs``), else
        ``var1``/``var2`` or the position diagonals of ``cov1``/``cov2``."""
        if self.layout != "full":
            return self.cov1, self.cov2
        if self.same_inputs:
            v = position_diagonal(jnp.moveaxis(jnp.diagonal(self.nngp, axis1=0, axis2=1), -1, 0))
            return v, v
        v1 = self.var1 if self.var1 is not None else position_diagonal(self.cov1)
        return v1, self.var2 if self.var2 is not None else position_diagonal(self.cov2)

    def map_variances(self, fn) -> dict:
        """``{'var1': fn(v1), 'var2': fn(v2)}`` of :meth:`variances` when the kernel
        :attr:`carries_variances`, else ``{}``: what a map passes to :meth:`replace` when the position
        diagonal of its new ``cov1``/``cov2`` is ``fn`` of the old one (an affine map, a window sum
        of the diagonal, a nonlinearity's second moment)."""
        if not self.carries_variances:
            return {}
        v1, v2 = self.variances()
        return {"var1": fn(v1), "var2": fn(v2)}

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


def position_diagonal(cov: jax.Array) -> jax.Array:
    """``(N, H, H', W, W')`` → ``(N, H, W)``: the entries of a ``'full'`` per-input covariance between
    each position and itself."""
    for _ in range((cov.ndim - 1) // 2):
        cov = jnp.diagonal(cov, axis1=1, axis2=2)
    return cov


jax.tree_util.register_dataclass(
    Kernel,
    data_fields=["nngp", "ntk", "cov1", "cov2", "mean1", "mean2", "var1", "var2"],
    meta_fields=["layout", "is_gaussian", "same_inputs"],
)

"""The output-axes convention shared by every empirical kernel.

A kernel between ``f(x1)`` of shape ``(N1, *O)`` and ``f(x2)`` of shape ``(N2, *O)`` pairs each
output axis of the first with the same axis of the second:

* an axis in ``trace_axes`` is contracted and **averaged** (the mean over the diagonal, so a
  traced kernel is the per-output kernel, comparable with an infinite-width one);
* an axis in ``diagonal_axes`` is kept once (only equal indices are paired);
* any other axis appears twice, for ``x1`` and for ``x2``, and the pairs are interleaved:
  outputs ``(N, H, C)`` with ``trace_axes=()`` give ``(N1, N2, H1, H2, C1, C2)``.

Axis 0 is the batch axis; it is normally neither traced nor diagonal, which gives the
``(N1, N2, ...)`` layout.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence, Union

import jax.numpy as jnp

Axes = Union[int, Sequence[int]]


def _as_tuple(axes: Axes) -> tuple[int, ...]:
    if isinstance(axes, int):
        return (axes,)
    return tuple(axes)


def canonical_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    """Non-negative, sorted, checked version of ``axes`` for an output with ``ndim`` axes."""
    out = []
    for a in _as_tuple(axes):
        if not isinstance(a, (int,)) or isinstance(a, bool):
            raise TypeError(f"{name} must contain ints; got {a!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={_as_tuple(axes)} has axis {a}, out of range for the model output with {ndim} "
                f"axes (batch axis included); valid axes are {-ndim}..{ndim - 1}"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={_as_tuple(axes)} names the same axis twice")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class OutputAxes:
    """Resolved trace/diagonal axes for outputs of a given rank."""

    ndim: int
    trace: tuple[int, ...]
    diagonal: tuple[int, ...]

    @classmethod
    def make(cls, ndim: int, trace_axes: Axes, diagonal_axes: Axes) -> "OutputAxes":
        trace = canonical_axes(trace_axes, ndim, "trace_axes")
        diagonal = canonical_axes(diagonal_axes, ndim, "diagonal_axes")
        both = sorted(set(trace) & set(diagonal))
        if both:
            raise ValueError(
                f"axes {both} are in both trace_axes={trace} and diagonal_axes={diagonal}; "
                "an axis is either traced (averaged) or diagonal (kept once), not both"
            )
        return cls(ndim, trace, diagonal)

    def letters(self) -> tuple[str, str, str]:
        """Einsum subscripts ``(first, second, result)`` for the output axes of the two sides."""
        pool = iter(string.ascii_letters)
        first, second, result = [], [], []
        for axis in range(self.ndim):
            a = next(pool)
            if axis in self.trace:
                first.append(a)
                second.append(a)
            elif axis in self.diagonal:
                first.append(a)
                second.append(a)
                result.append(a)
            else:
                b = next(pool)
                first.append(a)
                second.append(b)
                result.extend((a, b))
        return "".join(first), "".join(second), "".join(result)

    def trace_size(self, shape: Sequence[int]) -> int:
        size = 1
        for a in self.trace:
            size *= shape[a]
        return size

    def check_shapes(self, shape1: Sequence[int], shape2: Sequence[int]) -> None:
        """Paired axes must agree in size, except untraced, non-diagonal ones."""
        for a in self.trace + self.diagonal:
            if shape1[a] != shape2[a]:
                which = "trace_axes" if a in self.trace else "diagonal_axes"
                raise ValueError(
                    f"output axis {a} is in {which} but has size {shape1[a]} for x1 and {shape2[a]} "
                    f"for x2 (outputs {tuple(shape1)} and {tuple(shape2)}); paired axes must have equal sizes"
                )

    def result_shape(self, shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
        out: list[int] = []
        for a in range(self.ndim):
            if a in self.trace:
                continue
            if a in self.diagonal:
                out.append(shape1[a])
            else:
                out.extend((shape1[a], shape2[a]))
        return tuple(out)

    def reduce_full(self, full: jnp.ndarray) -> jnp.ndarray:
        """Apply trace/diagonal to a kernel with every axis paired, ``(a1, a2, b1, b2, ...)``."""
        first, second, result = self.letters()
        interleaved = "".join(x + y for x, y in zip(first, second))
        out = jnp.einsum(f"{interleaved}->{result}", full)
        return out / self.trace_size(full.shape[::2])

    def outer(self, y1: jnp.ndarray, y2: jnp.ndarray) -> jnp.ndarray:
        """``y1 ⊗ y2`` over the output axes with this convention (the NNGP of one draw)."""
        first, second, result = self.letters()
        return jnp.einsum(f"{first},{second}->{result}", y1, y2) / self.trace_size(y1.shape)

"""The infinite-width kernel of an embedding lookup (framework-free).

A table ``E`` of shape ``(V, D)`` with i.i.d. entries of mean zero and variance ``σ²`` maps a
token id ``i`` to the row ``E[i]``. For any width ``D`` each channel ``c`` of the output is a
zero-mean Gaussian value (for a Gaussian initializer; otherwise Gaussian in the limit of the
layers after it), channels are i.i.d., and two lookups are correlated exactly when they read the
same row::

    nngp[(n, p), (n', p')] = σ² · [ids1[n, p] == ids2[n', p']]

for examples ``n``, ``n'`` and positions ``p``, ``p'`` of the id arrays. The output is the table's
rows, ``f = one_hot(ids) @ E``, so in the standard parameterization (what Flax and Haiku do) the
gradient of channel ``c`` with respect to ``E[v, c]`` is ``[ids == v]`` and the table adds

    ntk[(n, p), (n', p')] = [ids1[n, p] == ids2[n', p']]

to the NTK (nothing comes before the table). ``σ²`` is the variance of one entry of the table at
its actual shape: Flax's default ``variance_scaling(1, 'fan_in', 'normal', out_axis=0)`` draws
entries of variance ``1/D``, so the NNGP of an unchanged Flax embedding is ``[id == id'] / D``,
exactly the expectation over initializations at the model's ``D`` (and it shrinks as ``D`` grows;
an initializer of fixed variance such as ``normal(1.0)`` has a width-independent kernel).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite.kernel import Kernel

__all__ = ["lookup"]


def _normalize(ids, vocab_size: Optional[int]):
    ids = jnp.asarray(ids)
    if vocab_size is not None:
        # jnp.take and x[ids] read a negative id -k as row V - k: equal rows must compare equal
        ids = jnp.where(ids < 0, ids + vocab_size, ids)
    return ids


def _same_row(a, b, batch_axes: int, layout: str):
    """``[a[n, p] == b[n', p']]`` laid out as a kernel entry: ``(N1, N2, *pairs)`` for ``batch_axes=2``,
    ``(N, *pairs)`` with ``a``, ``b`` the same examples for ``batch_axes=1``."""
    if layout == "diagonal":
        if batch_axes == 2:
            return a[:, None] == b[None, :]
        return jnp.ones(a.shape, bool)
    # 'full': spatial axis i of the first operand at 2i, of the second at 2i + 1
    ea = a.reshape(a.shape[:1] + (1,) * (batch_axes - 1) + tuple(s for n in a.shape[1:] for s in (n, 1)))
    eb_shape = [s for n in b.shape[1:] for s in (1, n)]
    eb = b.reshape(((1, b.shape[0]) if batch_axes == 2 else (b.shape[0],)) + tuple(eb_shape))
    return ea == eb


def lookup(
    ids1,
    ids2=None,
    *,
    variance: float,
    layout: str = "full",
    dtype=jnp.float32,
    vocab_size: Optional[int] = None,
    ntk: bool = True,
) -> Kernel:
    """Kernel of one channel of ``E[ids]`` for a table ``E`` with i.i.d. entries of variance ``variance``.

    Args:
      ids1: integer ids ``(N1,)`` (one token per example: layout ``'none'``) or ``(N1, *positions)``.
      ids2: the same for ``x2``, ``(N2, *positions)``; ``None`` when ``x2`` is ``x1``.
      variance: ``σ² = Var(E[v, c])``.
      layout: ``'full'`` (covariances between all pairs of positions) or ``'diagonal'`` for ids with
        positions; ignored for ids ``(N,)``.
      dtype: the float dtype of the kernel (the table's).
      vocab_size: ``V``, to read negative ids as the framework does (``-1`` is row ``V - 1``).
      ntk: track the NTK contribution of the table.

    Returns:
      A Gaussian :class:`Kernel` (``is_gaussian=True``): ``nngp = σ²·[id == id']``,
      ``ntk = [id == id']``. For ids ``(N, T)`` and ``'full'``: ``nngp`` ``(N1, N2, T, T)``,
      ``cov1`` ``(N1, T, T)``.

    Example::

        k = lookup(jnp.array([[1, 2], [2, 2]]), variance=0.5)
        k.nngp[0, 1]   # [[0, 0], [0.5, 0.5]]: token 2 of example 0 matches both of example 1
    """
    same = ids2 is None
    a = _normalize(ids1, vocab_size)
    b = a if same else _normalize(ids2, vocab_size)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"ids1 {a.shape} and ids2 {b.shape} must agree in every axis but the first")
    if a.ndim == 1:
        layout = "none"
        eq = (a[:, None] == b[None, :]).astype(dtype)
        c1 = jnp.ones(a.shape, dtype)
        c2 = c1 if same else jnp.ones(b.shape, dtype)
    else:
        if layout not in ("full", "diagonal"):
            raise ValueError(f"layout must be 'full' or 'diagonal' for ids with positions; got {layout!r}")
        eq = _same_row(a, b, 2, layout).astype(dtype)
        c1 = _same_row(a, a, 1, layout).astype(dtype)
        c2 = c1 if same else _same_row(b, b, 1, layout).astype(dtype)
    v = np.asarray(variance, dtype=np.dtype(dtype)).item()
    return Kernel(
        nngp=v * eq,
        ntk=eq if ntk else None,
        cov1=v * c1,
        cov2=v * c2,
        layout=layout,
        is_gaussian=True,
        same_inputs=same,
    )

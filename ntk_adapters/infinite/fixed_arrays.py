"""Fixed arrays added entry by entry to a value (sinusoidal position encodings) at infinite width.

Flax's LM1B and WMT Transformers add a fixed table to their token embeddings, ``y = h + c`` with
``c`` a constant of the per-example shape ``(*spatial, C)`` of ``h``, the same for every example.
The channels of ``y`` are then no longer identically distributed: channel ``k`` at position ``p``
has mean ``c[p, k]``. What the layers after it need is still finite:

* a random linear layer over channels (Dense, convolution, the projections of attention) sees
  only the channel averages of the second moments; for a zero-mean ``h``::

      (1/C) Σ_k E[y(x, p, k) y(x', p', k)] = K_h(x, x', p, p') + G(p, p'),
      G(p, p') = (1/C) Σ_k c[p, k] c[p', k]

  (the cross terms vanish because ``h`` has mean zero), so the kernel stores second moments;
* a normalization over channels subtracts the channel mean, which converges to
  ``m(p) = (1/C) Σ_k c[p, k]`` (:attr:`Kernel.mean1 <ntk_adapters.infinite.kernel.Kernel>`;
  :func:`~ntk_adapters.infinite.layers.layer_norm` centres with it).

``G`` and ``m`` are those of the model's own table at its own width (the table is fixed: it is an
input feature of the layers after it, as the raw input is of the first layer). The NTK is
unchanged (``c`` has no parameters). The result is not a zero-mean Gaussian process: elementwise
nonlinearities are refused until a random linear layer has mixed the channels again, and so is a
second fixed array added to it (the cross terms with the first would need both tables).

Only example-independent arrays are accepted (a leading axis of size one, or of the batch size
with identical slices); an array that differs between the examples of the traced batch would tie
the kernel to the batch layout and is refused.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.values import Concrete, Value, is_value, new_id

__all__ = ["add_fixed", "fixed_array_add"]


def _interleave(g: np.ndarray, spatial: tuple) -> np.ndarray:
    """``(*spatial, *spatial)`` → the 'full' layout's interleaved ``(S1, S1', S2, S2', ...)``."""
    d = len(spatial)
    order = [a for i in range(d) for a in (i, d + i)]
    return np.transpose(g, order)


def add_fixed(kernel: Kernel, c) -> Kernel:
    """The kernel of ``h + c`` for ``h`` a zero-mean Gaussian value and ``c`` a fixed array.

    Args:
      kernel: the kernel of ``h``, ``is_gaussian=True``, any layout.
      c: the fixed array, of the per-example shape ``(*spatial, C)`` of ``h`` (``(C,)`` for layout
        ``'none'``).

    Returns:
      Second moments ``nngp + G``, ``cov + G`` with ``G`` the channel average of ``c ⊗ c`` over the
      pairs of positions the layout keeps, the NTK unchanged, ``is_gaussian=False`` and the channel
      means ``mean1``/``mean2`` set to the channel average of ``c`` at each position.

    Example::

        >>> import numpy as np
        >>> from ntk_adapters.infinite.layers import input_kernel
        >>> k = input_kernel(np.ones((2, 3)))            # is_gaussian=False: mark it as a layer output
        >>> k = add_fixed(k.replace(is_gaussian=True), np.array([1.0, -1.0, 2.0]))
        >>> print(f"{float(k.nngp[0, 0]):.4f} {float(k.mean1[0]):.4f}")  # 1 + (1 + 1 + 4)/3, (1 - 1 + 2)/3
        3.0000 0.6667
    """
    if not kernel.is_gaussian:
        raise ValueError("add_fixed needs a zero-mean Gaussian kernel (is_gaussian=True)")
    c = np.asarray(c, dtype=np.float64)
    spatial = kernel.spatial
    if c.ndim != len(spatial) + 1 or c.shape[:-1] != spatial:
        raise ValueError(f"the fixed array has shape {c.shape}; the kernel's positions are {spatial} (plus channels)")
    n_channels = c.shape[-1]
    m = c.mean(axis=-1)
    if kernel.layout == "full":
        flat = c.reshape(-1, n_channels)
        g = _interleave((flat @ flat.T / n_channels).reshape(spatial + spatial), spatial)
    else:
        g = np.mean(c * c, axis=-1)
    dtype = kernel.nngp.dtype
    gram = jnp.asarray(g, dtype)
    n1, n2 = kernel.cov1.shape[0], kernel.cov2.shape[0]
    means = jnp.asarray(m, dtype)
    return kernel.replace(
        nngp=kernel.nngp + gram,
        ntk=kernel.ntk,
        cov1=kernel.cov1 + gram,
        cov2=kernel.cov2 + gram,
        **kernel.map_variances(lambda v: v + jnp.asarray(np.mean(c * c, axis=-1), dtype)),
        is_gaussian=False,
        mean1=jnp.broadcast_to(means, (n1, *spatial)),
        mean2=jnp.broadcast_to(means, (n2, *spatial)),
    )


def fixed_array_add(eqn, invals, ctx: _rules.PrimitiveContext) -> list:
    """The rule for ``h ± c`` (or ``c ± h``) with ``c`` a fixed, non-scalar array of the model."""
    (h,) = [v for v in invals if is_value(v)]
    (c,) = [v for v in invals if isinstance(v, Concrete)]
    try:
        table = np.asarray(c.value)
    except Exception:  # noqa: BLE001  (a traced array: not fixed)
        raise ctx.error(eqn, "adds an array that is not a fixed constant to an input-dependent value") from None
    head = f"adds a fixed array of shape {table.shape} to an input-dependent value entry by entry"
    if table.ndim > len(h.shape):
        if table.shape[0] not in (1, ctx.batch) or not np.all(table == table[:1]):
            raise ctx.error(
                eqn,
                f"{head}, and the array differs between the examples of the batch: only arrays shared by every "
                "example (position encodings, per-unit shifts) are supported",
            )
        table = table[0]
    try:
        table = np.broadcast_to(table, h.shape)
    except ValueError:
        raise ctx.error(eqn, f"{head}: it does not broadcast to the value's per-example shape {h.shape}") from None
    if eqn.primitive.name == "sub" and is_value(invals[0]):
        table = -table
    if h.flat or not h.shape:
        raise ctx.error(eqn, f"{head}: the value has no channel axis of its own (flattened or one number per example)")
    h = ctx.materialize(h, eqn)
    if not h.kernel.is_gaussian:
        raise ctx.error(
            eqn,
            f"{head}, and the value is not a zero-mean Gaussian process (the output of a nonlinearity, a "
            "normalization or another fixed array): the second moments of the sum need the products of its "
            "means with the array, which the kernel does not track. Add the array right after a Dense/Conv "
            "or an embedding",
        )
    k = add_fixed(h.kernel, table)
    # ``c − h`` has the kernel of ``c + h``: ``h`` is symmetric.
    return [Value(kernel=k, shape=h.shape, flat=h.flat, base=new_id(), fresh=None, deps=h.deps, source=h.source)]

"""Parameter-free kernel maps over spatial axes, and the window machinery convolutions share.

Average and sum pooling, spatial means and sums, the position diagonal, flatten and its inverse,
per-position scaling. Shapes and conventions are those of :mod:`ntk_adapters.infinite.layers`,
which re-exports every public map here: use them as ``layers.avg_pool``, ``layers.flatten``, ...
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_adapters.infinite.kernel import Kernel

Array = jax.Array
Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]

__all__ = [
    "avg_pool",
    "flatten",
    "resolve_padding",
    "scale_positions",
    "spatial_mean",
    "spatial_sum",
    "sum_pool",
    "to_diagonal",
    "unflatten",
]


# ----------------------------------------------------------------------------------------------
# Window machinery shared by convolution and pooling.


def _canonical_tuple(value, d: int, name: str, default: int = 1) -> tuple[int, ...]:
    if value is None:
        return (default,) * d
    if isinstance(value, (int, np.integer)):
        return (int(value),) * d
    value = tuple(int(v) for v in value)
    if len(value) != d:
        raise ValueError(f"{name} must have one entry per spatial dimension ({d}); got {value}")
    return value


def resolve_padding(
    padding: Padding,
    in_sizes: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
) -> tuple[list[tuple[int, int]], str]:
    """Explicit ``(low, high)`` pads per spatial dimension and the ``jnp.pad`` mode.

    Follows Flax ``nn.Conv`` / ``nn.avg_pool`` and Haiku: ``'SAME'`` / ``'VALID'`` as ``lax``
    computes them, ``'CIRCULAR'`` (wrap) and ``'REFLECT'`` with pads
    ``((k_d − 1)//2, k_d//2)`` of the dilated window ``k_d``, ``'CAUSAL'`` ``(k_d − 1, 0)`` (1-D), an
    int or a sequence of ints / pairs.

    Returns:
      ``(pads, mode)`` with ``mode`` in ``'constant'`` (zeros), ``'wrap'``, ``'reflect'``.
    """
    d = len(in_sizes)
    dilated = [(k - 1) * r + 1 for k, r in zip(window, dilation)]
    if isinstance(padding, str):
        name = padding.upper()
        if name in ("SAME", "VALID", "SAME_LOWER"):
            pads = lax.padtype_to_pads(tuple(in_sizes), dilated, tuple(strides), name)
            return [(lo, hi) for lo, hi in pads], "constant"
        if name in ("CIRCULAR", "REFLECT"):
            return [((k - 1) // 2, k // 2) for k in dilated], {"CIRCULAR": "wrap", "REFLECT": "reflect"}[name]
        if name == "CAUSAL":
            if d != 1:
                raise ValueError(f"'CAUSAL' padding is only defined for 1-D windows; got window {tuple(window)}")
            return [(dilated[0] - 1, 0)], "constant"
        raise ValueError(
            f"padding {padding!r} is not supported; use 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL', an "
            "int or a sequence of (low, high) pairs"
        )
    if isinstance(padding, (int, np.integer)):
        pads = [(int(padding), int(padding))] * d
    else:
        pads = []
        for p in padding:
            if isinstance(p, (int, np.integer)):
                pads.append((int(p), int(p)))
            else:
                lo, hi = p
                pads.append((int(lo), int(hi)))
        if len(pads) != d:
            raise ValueError(f"padding {padding!r} must have one entry per spatial dimension ({d})")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"negative padding {pads} is not supported")
    return pads, "constant"


def _output_size(padded: int, k: int, stride: int, dilation: int) -> int:
    out = (padded - ((k - 1) * dilation + 1)) // stride + 1
    if out <= 0:
        raise ValueError(
            f"window of size {k} (dilation {dilation}) does not fit a spatial axis of padded size {padded}"
        )
    return out


def _window_sum(
    x: Array, axes: Sequence[int], k: int, stride: int, dilation: int, pad: tuple[int, int], mode: str
) -> Array:
    """``out[i] = Σ_t xpad[i·stride + t·dilation]`` along all ``axes`` *simultaneously* (diagonal shift).

    With one axis this is an ordinary window sum; with two axes (a position pair of a 'full'
    covariance) it sums ``K[i+t, j+t]``, the diagonal window of a convolution.
    """
    widths = [(0, 0)] * x.ndim
    for a in axes:
        widths[a] = pad
    if any(pad):
        x = jnp.pad(x, widths, mode=mode)
    n = x.shape[axes[0]]
    out = _output_size(n, k, stride, dilation)
    if len(axes) == 1:
        # One reduce-window instead of k slices and k - 1 sums: the same arithmetic in fewer,
        # larger XLA operations, which deep convolutional kernels compile much faster.
        window, strides, dilations = [1] * x.ndim, [1] * x.ndim, [1] * x.ndim
        window[axes[0]], strides[axes[0]], dilations[axes[0]] = k, stride, dilation
        # a concrete zero makes it a window sum, which has a derivative (a traced zero would not)
        zero = np.zeros((), x.dtype)
        return lax.reduce_window(x, zero, lax.add, tuple(window), tuple(strides), "VALID", None, tuple(dilations))
    return _diagonal_window_sum(x, axes, k, stride, dilation, out)


def _diagonal_window_sum(x: Array, axes: Sequence[int], k: int, stride: int, dilation: int, out: int) -> Array:
    """``out[i, j] = Σ_t x[i·stride + t·dilation, j·stride + t·dilation]`` over two adjacent axes of
    one (padded) size ``n``: one slice per offset of the pair flattened to ``n²`` entries, where the
    step ``(+dilation, +dilation)`` is ``dilation·(n + 1)``.

    Slicing the padded pair directly would give XLA's simplifier the centre offset as the unpadded
    operand itself; that operand is then recomputed inside every consumer instead of stored, and
    through a stack of convolutions the recomputation compounds (a 21-layer pooling CNN ran 25×
    slower, and compiled in 30 s instead of 1). Slices of the flattened pair are not simplified.
    """
    a, b = axes
    if b != a + 1 or x.shape[a] != x.shape[b]:
        raise ValueError(f"a diagonal window needs two adjacent axes of one size, got axes {axes} of {x.shape}")
    n = x.shape[a]
    rows = (out - 1) * stride + 1  # the (i, j) grid before subsampling by the stride
    # Offsets and the entries needed end within the flattened pair: (t·dilation + rows − 1)·(n + 1) < n².
    length, step = (rows - 1) * n + rows, dilation * (n + 1)
    flat = x.reshape(x.shape[:a] + (n * n,) + x.shape[b + 1 :])
    acc = lax.slice_in_dim(flat, 0, length, axis=a)
    for t in range(1, k):
        acc = acc + lax.slice_in_dim(flat, t * step, t * step + length, axis=a)
    widths = [(0, 0)] * acc.ndim
    widths[a] = (0, rows * n - length)
    grid = jnp.pad(acc, widths).reshape(x.shape[:a] + (rows, n) + x.shape[b + 1 :])
    idx = [slice(None)] * grid.ndim
    idx[a], idx[b] = slice(0, rows, stride), slice(0, rows, stride)
    return grid[tuple(idx)]


def _axes_per_dim(layout: str, d: int, batch_axes: int) -> list[tuple[int, ...]]:
    """For each spatial dimension, the array axes that hold it (2 in 'full' layout, 1 in 'diagonal')."""
    if layout == "full":
        return [(batch_axes + 2 * i, batch_axes + 2 * i + 1) for i in range(d)]
    return [(batch_axes + i,) for i in range(d)]


def _map_all(kernel: Kernel, fn) -> tuple[Array, Optional[Array], Array, Array]:
    """Apply ``fn(array, batch_axes)`` to nngp, ntk (2 batch axes) and cov1, cov2 (1 batch axis)."""
    nngp = fn(kernel.nngp, 2)
    ntk = None if kernel.ntk is None else fn(kernel.ntk, 2)
    cov1 = fn(kernel.cov1, 1)
    cov2 = cov1 if kernel.same_inputs else fn(kernel.cov2, 1)
    return nngp, ntk, cov1, cov2


def _spatial_or_raise(kernel: Kernel, what: str) -> tuple[int, ...]:
    if kernel.layout == "none":
        raise ValueError(f"{what} needs spatial axes; got a kernel with layout 'none'")
    return kernel.spatial


# ----------------------------------------------------------------------------------------------
# Pooling and spatial reductions (parameter-free linear maps).


def _pool(kernel, window_shape, strides, padding, count_include_pad, average, name):
    spatial = _spatial_or_raise(kernel, name)
    d = len(spatial)
    window = _canonical_tuple(window_shape, d, "window_shape")
    strides = _canonical_tuple(strides, d, "strides")
    if kernel.layout != "full" and math.prod(window) > 1:
        raise ValueError(
            f"{name} with window {window} mixes different positions: it needs the kernel in layout 'full' "
            f"(got {kernel.layout!r}); compute the input kernel with layout='full'"
        )
    dilation = (1,) * d
    pads, mode = resolve_padding(padding, spatial, window, strides, dilation)
    for i in range(d):
        _output_size(spatial[i] + sum(pads[i]), window[i], strides[i], 1)
    return _pool_jit(
        kernel,
        window=window,
        strides=strides,
        pads=tuple(tuple(p) for p in pads),
        mode=mode,
        count_include_pad=bool(count_include_pad),
        average=bool(average),
    )


@functools.partial(jax.jit, static_argnames=("window", "strides", "pads", "mode", "count_include_pad", "average"))
def _pool_jit(kernel, *, window, strides, pads, mode, count_include_pad, average):
    spatial = kernel.spatial
    d = len(spatial)
    counts = []
    for i in range(d):
        if not average:
            counts.append(None)
        elif count_include_pad:
            counts.append(float(window[i]))
        else:
            ones = jnp.ones((spatial[i],), dtype=kernel.nngp.dtype)
            counts.append(_window_sum(ones, (0,), window[i], strides[i], 1, pads[i], "constant"))

    def pool_map(x, batch_axes):
        for i, axes in enumerate(_axes_per_dim(kernel.layout, d, batch_axes)):
            for a in axes:  # independent windows for the two positions of a pair
                x = _window_sum(x, (a,), window[i], strides[i], 1, pads[i], mode)
                if counts[i] is not None:
                    c = counts[i]
                    if not isinstance(c, float):
                        c = c.reshape((-1,) + (1,) * (x.ndim - a - 1))
                    x = x / c
        return x

    nngp, ntk, cov1, cov2 = _map_all(kernel, pool_map)
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)


def avg_pool(
    kernel: Kernel,
    window_shape: Sequence[int],
    strides: Union[int, Sequence[int], None] = None,
    padding: Padding = "VALID",
    count_include_pad: bool = True,
) -> Kernel:
    """Average pooling (Flax ``nn.avg_pool`` semantics), layout 'full'.

    ``K'[p, p'] = (1/(n_p n_p')) Σ_{δ, δ'} K[p+δ, p'+δ']`` with ``n_p = |window|``
    (``count_include_pad=True``, Flax's default) or the number of in-bounds window elements at
    ``p`` (``count_include_pad=False``, which is what Haiku's ``hk.avg_pool`` does for 'SAME'
    padding). Strides default to 1 (Flax); pass ``strides=window_shape`` for Haiku-style
    non-overlapping pooling if that is what the model does. The NTK transforms the same way.

    Example::

        k = avg_pool(k, (2, 2), strides=(2, 2))    # nngp (N1, N2, 8, 8, 8, 8) -> (N1, N2, 4, 4, 4, 4)
    """
    return _pool(kernel, window_shape, strides, padding, count_include_pad, True, "avg_pool")


def sum_pool(
    kernel: Kernel,
    window_shape: Sequence[int],
    strides: Union[int, Sequence[int], None] = None,
    padding: Padding = "VALID",
) -> Kernel:
    """Sum pooling (``lax.reduce_window`` with ``lax.add``): :func:`avg_pool` without the division."""
    return _pool(kernel, window_shape, strides, padding, True, False, "sum_pool")


def _spatial_reduce(kernel: Kernel, axes, mean: bool, name: str) -> Kernel:
    spatial = _spatial_or_raise(kernel, name)
    d = len(spatial)
    if axes is None:
        dims = tuple(range(d))
    else:
        axes = (axes,) if isinstance(axes, int) else tuple(axes)
        picked: list[int] = []
        for a in axes:
            a = a + d + 2 if a < 0 else a
            if not 1 <= a <= d:
                raise ValueError(
                    f"{name}: axis {a} of an activation (N, *spatial, C) with {d} spatial axes is not a spatial "
                    f"axis; only axes 1..{d} can be reduced by this map"
                )
            picked.append(a - 1)
        dims = tuple(sorted(set(picked)))
    if kernel.layout == "diagonal" and any(spatial[i] > 1 for i in dims):
        raise ValueError(
            f"{name} over spatial axes of sizes {[spatial[i] for i in dims]} needs the covariance between "
            "different positions: layout 'full' (got 'diagonal'); compute the input kernel with layout='full'"
        )

    return _reduce_jit(kernel, dims=dims, mean=bool(mean))


@functools.partial(jax.jit, static_argnames=("dims", "mean"))
def _reduce_jit(kernel, *, dims, mean):
    d = len(kernel.spatial)

    def reduce(x, batch_axes):
        per_dim = _axes_per_dim(kernel.layout, d, batch_axes)
        red = tuple(a for i in dims for a in per_dim[i])
        return jnp.mean(x, axis=red) if mean else jnp.sum(x, axis=red)

    nngp, ntk, cov1, cov2 = _map_all(kernel, reduce)
    layout = "none" if len(dims) == d else kernel.layout
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, layout=layout)


def spatial_mean(kernel: Kernel, axes: Union[int, Sequence[int], None] = None) -> Kernel:
    """Mean over spatial axes of the activation (e.g. ``jnp.mean(x, axis=(1, 2))``), layout 'full'.

    ``K'[...] = mean_{p, p'} K[p, p']`` over the reduced axes. Reducing every spatial axis (global
    average pooling) gives layout ``'none'``.

    Args:
      kernel: layout 'full' (or 'diagonal' when the reduced axes have size 1).
      axes: axes of the activation ``(N, *spatial, C)`` (``1..D``, negative counted from the
        channel axis ``-1``); ``None`` for all spatial axes.

    Example::

        k = spatial_mean(k)     # (N1, N2, H, H, W, W) -> (N1, N2), cov1 -> (N1,)
    """
    return _spatial_reduce(kernel, axes, True, "spatial_mean")


def spatial_sum(kernel: Kernel, axes: Union[int, Sequence[int], None] = None) -> Kernel:
    """Sum over spatial axes: :func:`spatial_mean` times ``(Π sizes)²``."""
    return _spatial_reduce(kernel, axes, False, "spatial_sum")


def to_diagonal(kernel: Kernel) -> Kernel:
    """Layout 'full' → 'diagonal': keep the covariances between equal positions only."""
    if kernel.layout == "diagonal":
        return kernel
    if kernel.layout != "full":
        raise ValueError(f"to_diagonal needs layout 'full' or 'diagonal'; got {kernel.layout!r}")
    return _to_diagonal_jit(kernel)


@jax.jit
def _to_diagonal_jit(kernel):
    d = len(kernel.spatial)

    def diag(x, batch_axes):
        for _ in range(d):
            x = jnp.diagonal(x, axis1=batch_axes, axis2=batch_axes + 1)
        return x

    # the diagonal layout's covariances are the variances (carried or extracted)
    cov1, cov2 = kernel.variances()
    nngp = diag(kernel.nngp, 2)
    ntk = None if kernel.ntk is None else diag(kernel.ntk, 2)
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, layout="diagonal")


def flatten(kernel: Kernel) -> Kernel:
    """Reshape ``(N, *spatial, C) → (N, Π spatial · C)``: layout 'none', for a following dense layer.

    A dense layer sums over all flattened features, so it only needs their average covariance
    ``mean_p K[p, p]`` (the spatial diagonal; works from 'diagonal' and 'full'). The flattened
    features are not identically distributed, so the result is marked ``is_gaussian=False``: a
    nonlinearity must come before the flatten, not between it and the dense layer.

    Example::

        k = flatten(k)        # (N1, N2, H, W) -> (N1, N2); the next dense has fan_in = H·W·C
    """
    if kernel.layout == "none":
        return kernel
    return _flatten_jit(kernel)


@jax.jit
def _flatten_jit(kernel):
    k = to_diagonal(kernel)
    d = len(k.spatial)

    def mean(x, batch_axes):
        return jnp.mean(x, axis=tuple(range(batch_axes, batch_axes + d)))

    nngp, ntk, cov1, cov2 = _map_all(k, mean)
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, layout="none", is_gaussian=False)


def unflatten(kernel: Kernel, spatial: Sequence[int], *, layout: str = "diagonal") -> Kernel:
    """Reshape of the i.i.d. units of a layer without spatial axes into positions × channels,
    ``(N, P·C) → (N, *spatial, C)``.

    The units of a dense layer are i.i.d., so different positions are independent: each
    position has the kernel of one unit and two different positions have covariance zero.
    Keeps ``is_gaussian``.

    Args:
      kernel: layout ``'none'``.
      spatial: the new spatial sizes, e.g. ``(H, W)``.
      layout: ``'diagonal'`` (the kernel tiled over positions) or ``'full'`` (zero off the
        position diagonal).

    Example::

        k = unflatten(dense(k, fan_in=16), (4, 4), layout="full")    # nngp (N1, N2, 4, 4, 4, 4)
    """
    if kernel.layout != "none":
        raise ValueError(f"unflatten needs a kernel with layout 'none'; got {kernel.layout!r}")
    if layout not in ("diagonal", "full"):
        raise ValueError(f"unflatten's layout must be 'diagonal' or 'full'; got {layout!r}")
    spatial = tuple(int(s) for s in spatial)
    d = len(spatial)

    if layout == "full":

        def place(x, batch_axes):
            out = x.reshape(x.shape + (1,) * (2 * d))
            for i, size in enumerate(spatial):
                shape = [1] * (batch_axes + 2 * d)
                shape[batch_axes + 2 * i] = size
                shape[batch_axes + 2 * i + 1] = size
                out = out * jnp.eye(size, dtype=x.dtype).reshape(shape)
            return out
    else:

        def place(x, batch_axes):
            return jnp.broadcast_to(x.reshape(x.shape + (1,) * d), x.shape + spatial)

    nngp, ntk, cov1, cov2 = _map_all(kernel, place)
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, layout=layout)


# ----------------------------------------------------------------------------------------------
# Per-position scaling.


def scale_positions(kernel: Kernel, s) -> Kernel:
    """Multiplication of each position ``p`` by its own constant ``s[p]``, the same for every channel
    (average pooling with 'SAME' padding divides each position by its own window count).

    Channels stay identically distributed, and the entry of positions ``(p, p')`` is multiplied
    by ``s[p] · s[p']``. Keeps ``is_gaussian``.

    Args:
      kernel: layout ``'diagonal'`` or ``'full'``.
      s: a concrete array of the kernel's spatial shape ``(*spatial)``.

    Example::

        k = scale_positions(k, 1.0 / counts)      # counts (H, W): in-bounds window sizes
    """
    spatial = _spatial_or_raise(kernel, "scale_positions")
    s = np.asarray(s, dtype=np.float64)
    if s.shape != tuple(spatial):
        raise ValueError(f"scale_positions: factors of shape {s.shape} for spatial shape {tuple(spatial)}")
    if kernel.layout == "diagonal":
        pair = s * s  # (*spatial), matching nngp (N1, N2, *spatial) and cov (N, *spatial)
    else:
        # interleaved (p1, p2) per spatial dimension: outer product s[p] s[p'] reordered
        d = len(spatial)
        pair = np.transpose(np.multiply.outer(s, s), [i for j in range(d) for i in (j, d + j)])
    pair = jnp.asarray(pair, kernel.nngp.dtype)
    return kernel.replace(
        nngp=pair * kernel.nngp,
        ntk=None if kernel.ntk is None else pair * kernel.ntk,
        cov1=pair * kernel.cov1,
        cov2=pair * kernel.cov2,
        **kernel.map_variances(lambda v: jnp.asarray(s * s, v.dtype) * v),
    )

"""Building blocks shared by the tiled kernel evaluators: inputs cut into padded tiles, keyword
arguments split into compiled constants and traced arrays, and the symmetry of a kernel's trailing
axes (which transpose of a tile gives its mirror image below the diagonal).

This module is framework-free: it never imports Flax or Haiku.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

AXIS = "tiles"

Symmetry = Union[str, Sequence[int]]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _num_rows(x: Any, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError(f"{name} has no arrays; pass an array (or pytree of arrays) of shape (N, ...)")
    sizes: set[Optional[int]] = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{name}: every array must have the same leading (example) axis; got shapes "
            f"{[np.shape(leaf) for leaf in leaves]}"
        )
    n = cast(int, sizes.pop())
    if n == 0:
        raise ValueError(f"{name} has no examples (leading axis of size 0)")
    return n


def _refuse_coupled(kernel_fn: Callable, x: Any, params: Any) -> None:
    """Tiles of a kernel whose model mixes examples are not blocks of the whole kernel: refuse.

    The library's kernel functions carry ``batch_coupling(x)``; other functions are trusted.
    """
    probe = getattr(kernel_fn, "batch_coupling", None)
    coupling = None if probe is None else probe(x, params)
    if coupling is not None and coupling.certain:
        raise ValueError(
            f"this kernel cannot be tiled: {coupling.message().rstrip('.')}. The kernel of such a "
            "model depends on the whole batch, so its tiles are not blocks of it. Evaluate it untiled, "
            "or adapt the model in a mode where examples are independent (e.g. BatchNorm with running "
            "averages)"
        )


def _as_tiles(x: Any, n_tiles: int, tile: int) -> Any:
    """Pad the example axis to ``n_tiles * tile`` rows and reshape to ``(n_tiles, tile, ...)``.

    Padding repeats the last example rather than inserting zeros: kernels that normalize by the
    input norm (arc-cosine, cosine) would return NaN on zero rows, and although padded entries
    are discarded, NaNs can slow some backends down and trip NaN debugging.
    """

    def one(leaf):
        leaf = np.asarray(leaf)
        pad = n_tiles * tile - leaf.shape[0]
        if pad:
            leaf = np.concatenate([leaf, np.repeat(leaf[-1:], pad, axis=0)], axis=0)
        return leaf.reshape((n_tiles, tile) + leaf.shape[1:])

    return jax.tree_util.tree_map(one, x)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def _split_kwargs(kwargs: dict) -> tuple[Any, tuple, list]:
    """Split keyword arguments into a hashable static part and a list of array leaves.

    Arrays (e.g. ``params=``) are passed to the compiled tile program as arguments; everything
    else (``get=``, flags, Python numbers) is baked into it, and must be hashable.
    """
    leaves, treedef = jax.tree_util.tree_flatten(kwargs)
    static, dynamic = [], []
    for k, leaf in enumerate(leaves):
        if _is_array(leaf):
            dynamic.append(leaf)
        else:
            try:
                hash(leaf)
            except TypeError:
                raise TypeError(
                    f"keyword argument leaf {leaf!r} of type {type(leaf).__name__} is neither an "
                    "array nor hashable; pass arrays for data and hashable values for options"
                ) from None
            static.append((k, leaf))
    return treedef, tuple(static), dynamic


def _join_kwargs(treedef: Any, static: tuple, dynamic: Sequence[Any]) -> dict:
    n = treedef.num_leaves
    leaves: list = [None] * n
    for k, leaf in static:
        leaves[k] = leaf
    it = iter(dynamic)
    static_idx = {k for k, _ in static}
    for k in range(n):
        if k not in static_idx:
            leaves[k] = next(it)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------------
# Symmetry of the trailing axes
# --------------------------------------------------------------------------------------------


def _pair_swap(trailing: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """The permutation swapping interleaved pairs ``(a, a, b, b, ...)``, or ``None``."""
    if not trailing or len(trailing) % 2:
        return None
    if any(trailing[2 * k] != trailing[2 * k + 1] for k in range(len(trailing) // 2)):
        return None
    perm: list[int] = []
    for k in range(len(trailing) // 2):
        perm += [2 * k + 1, 2 * k]
    return tuple(perm)


def _transpose_tile(tile: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
    return np.transpose(tile, (1, 0) + tuple(2 + p for p in perm))


def _is_symmetric_under(tile: np.ndarray, perm: tuple[int, ...]) -> bool:
    """Whether ``K[j, i, perm(...)] == K[i, j, ...]`` on a diagonal tile, to round-off."""
    other = _transpose_tile(tile, perm)
    if not np.issubdtype(tile.dtype, np.inexact):
        return bool(np.array_equal(tile, other))
    scale = float(np.max(np.abs(tile))) if tile.size else 0.0
    if not np.isfinite(scale):
        return False
    tol = math.sqrt(np.finfo(tile.dtype).eps) * max(scale, np.finfo(tile.dtype).tiny)
    return bool(np.max(np.abs(tile - other), initial=0.0) <= tol)


def _candidate_perms(trailing: tuple[int, ...]) -> list[tuple[int, ...]]:
    identity = tuple(range(len(trailing)))
    swap = _pair_swap(trailing)
    return [swap, identity] if swap is not None else [identity]


@functools.lru_cache(maxsize=64)
def _tile_program(kernel_fn: Callable, devices: tuple, same: bool, treedef: Any, static: tuple) -> Callable:
    """The compiled program evaluating one tile per device; cached so that every ``batch`` of the
    same kernel function (and each call) reuses it."""
    mesh = Mesh(np.array(devices), (AXIS,))

    def per_device(a, b, dynamic):
        kwargs = _join_kwargs(treedef, static, dynamic)
        a = jax.tree_util.tree_map(lambda t: t[0], a)
        b = None if same else jax.tree_util.tree_map(lambda t: t[0], b)
        out = kernel_fn(a, b, **kwargs)
        return jax.tree_util.tree_map(lambda t: jnp.asarray(t)[None], out)

    spec = PartitionSpec(AXIS)
    return jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=spec, check_vma=False)
    )


# --------------------------------------------------------------------------------------------
# Assembly on a device
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("perms",))
def _place(bufs: tuple, outs: tuple, rows: jax.Array, cols: jax.Array, perms: tuple) -> tuple:
    """Write tile ``k`` of every output at ``(rows[k], cols[k])`` of its buffer, in place (the
    buffers are donated), and its mirror image at ``(cols[k], rows[k])`` where ``perms`` gives the
    trailing-axis permutation (``None``: no mirror)."""
    placed = []
    for buf, out, perm in zip(bufs, outs, perms):
        zeros = (jnp.int32(0),) * (buf.ndim - 2)
        for k in range(out.shape[0]):
            buf = jax.lax.dynamic_update_slice(buf, out[k], (rows[k], cols[k]) + zeros)
            if perm is not None:
                mirror = jnp.transpose(out[k], (1, 0) + tuple(2 + p for p in perm))
                buf = jax.lax.dynamic_update_slice(buf, mirror, (cols[k], rows[k]) + zeros)
        placed.append(buf)
    return tuple(placed)


@functools.lru_cache(maxsize=64)
def _zeros_on(shape: tuple, dtype: np.dtype, device) -> Callable:
    # Allocated where the buffer lives, by a program compiled once per shape (a fresh jit of a
    # fresh partial compiled again on every batch() call: ~35 ms each on CPU).
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=jax.sharding.SingleDeviceSharding(device))


class DeviceTiles:
    """The outputs of a tiled kernel assembled in buffers on one device.

    Each group of tiles is placed by one compiled in-place update, dispatched asynchronously
    like the tiles themselves, so the host only enqueues work: nothing is copied to host memory,
    and the result is a device array without a final transfer. The buffers are padded to whole
    tiles and cut to ``(n1, n2)`` once at the end.
    """

    def __init__(self, shapes: Sequence[tuple], dtypes: Sequence[Any], tile: tuple[int, int], grid: tuple, device):
        self.tile = tile
        self.device = device
        self.bufs = tuple(
            _zeros_on((grid[0] * tile[0], grid[1] * tile[1]) + tuple(s[2:]), np.dtype(d), device)()
            for s, d in zip(shapes, dtypes)
        )

    def write(self, tiles: Sequence[tuple[int, int]], outs: Any, perms: Optional[Sequence] = None) -> None:
        """Place ``tiles`` (``(i, j)`` tile indices) from ``outs`` (leaves ``(d, b1, b2, ...)``,
        ``d ≥ len(tiles)``: entries past ``len(tiles)`` repeat the last tile), mirrored across the
        diagonal with ``perms`` (one trailing-axis permutation per output) when given."""
        leaves = [jax.device_put(leaf, self.device) for leaf in jax.tree_util.tree_leaves(outs)]
        d = leaves[0].shape[0]
        padded = list(tiles) + [tiles[-1]] * (d - len(tiles))
        rows = jnp.asarray([i * self.tile[0] for i, _ in padded], jnp.int32)
        cols = jnp.asarray([j * self.tile[1] for _, j in padded], jnp.int32)
        perms_t = tuple(perms) if perms is not None else (None,) * len(leaves)
        self.bufs = _place(self.bufs, tuple(leaves), rows, cols, perms_t)

    def result(self, n1: int, n2: int) -> list:
        """The assembled outputs, ``(n1, n2, ...)`` each."""
        return [b if b.shape[:2] == (n1, n2) else b[:n1, :n2] for b in self.bufs]

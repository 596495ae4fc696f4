"""Tiled, device-sharded kernel evaluation, and kernel regression without storing the kernel.

:func:`batch` turns any kernel function ``kernel_fn(x1, x2=None, **kwargs)`` (empirical,
Monte Carlo, infinite-width, or hand-written) into one with the same signature and output
structure that evaluates the kernel in ``batch_size × batch_size`` tiles over ``x1 × x2``:

* tiles are padded to one fixed shape, so the tile program is compiled once, however many
  tiles there are and whether or not ``batch_size`` divides the number of examples;
* groups of tiles are stacked along a leading axis that is sharded over a one-dimensional
  :class:`jax.sharding.Mesh` of devices with :func:`jax.shard_map`: each device evaluates the
  unchanged ``kernel_fn`` on its own tile, so the numbers do not depend on the device count;
* with ``x2=None`` only the diagonal and upper tiles are evaluated; the lower ones are their
  transposes (trailing paired axes, e.g. the ``(O, O)`` of an empirical kernel with
  ``trace_axes=()``, swapped too);
* results are assembled on the host (a NumPy array, or a ``.npy`` memory map on disk when
  ``memmap_path`` is given), so the kernel may be larger than device memory.

:func:`kernel_regression_cg` solves ``(K + λ I) α = y`` with conjugate gradients and predicts
``K(x_test, X) α`` without ever holding ``K``: every matrix-vector product recomputes the tiles.

Multi-host use (``jax.distributed.initialize``): :func:`batch` only uses the devices of the
calling process (``jax.local_devices()`` by default), so on several hosts give each process its
own slab of rows and let it write its slab (for instance into its own memory map)::

    jax.distributed.initialize()            # once per process, before any computation
    rows = np.array_split(np.arange(len(x1)), jax.process_count())[jax.process_index()]
    k_rows = batch(kernel_fn, 512, memmap_path=f"k_rows_{jax.process_index()}.npy")(x1[rows], x2)

Stacking the slabs in process order gives the full kernel. With ``x2=None`` pass ``x2=x1``
explicitly for the slabs (a slab of rows is not symmetric).

This module is framework-free: it never imports Flax or Haiku.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["batch", "kernel_regression_cg", "KernelRegressionResult"]

_AXIS = "tiles"

Symmetry = Union[str, Sequence[int]]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _num_rows(x: Any, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError(f"{name} has no arrays; pass an array (or pytree of arrays) of shape (N, ...)")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{name}: every array must have the same leading (example) axis; got shapes "
            f"{[np.shape(leaf) for leaf in leaves]}"
        )
    n = sizes.pop()
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


# --------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------


def _memmap_paths(path: Union[str, os.PathLike], treedef: Any, n_leaves: int) -> list[str]:
    path = os.fspath(path)
    if n_leaves == 1:
        return [path]
    root, ext = os.path.splitext(path)
    ext = ext or ".npy"
    example = jax.tree_util.tree_unflatten(treedef, list(range(n_leaves)))
    fields = getattr(example, "_fields", None)
    names = list(fields) if fields is not None and len(fields) == n_leaves else [str(k) for k in range(n_leaves)]
    return [f"{root}_{name}{ext}" for name in names]


@functools.lru_cache(maxsize=64)
def _tile_program(kernel_fn: Callable, devices: tuple, same: bool, treedef: Any, static: tuple) -> Callable:
    """The compiled program evaluating one tile per device; cached so that every ``batch`` of the
    same kernel function (and each call) reuses it."""
    mesh = Mesh(np.array(devices), (_AXIS,))

    def per_device(a, b, dynamic):
        kwargs = _join_kwargs(treedef, static, dynamic)
        a = jax.tree_util.tree_map(lambda t: t[0], a)
        b = None if same else jax.tree_util.tree_map(lambda t: t[0], b)
        out = kernel_fn(a, b, **kwargs)
        return jax.tree_util.tree_map(lambda t: jnp.asarray(t)[None], out)

    spec = PartitionSpec(_AXIS)
    return jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=spec, check_vma=False)
    )


def batch(
    kernel_fn: Callable[..., Any],
    batch_size: int,
    *,
    store_on_host: bool = False,
    memmap_path: Optional[Union[str, os.PathLike]] = None,
    progress: bool = False,
    devices: Optional[Sequence[jax.Device]] = None,
    symmetry: Symmetry = "auto",
) -> Callable[..., Any]:
    """Evaluate ``kernel_fn`` in ``batch_size × batch_size`` tiles, sharded over devices.

    Args:
      kernel_fn: ``kernel_fn(x1, x2=None, **kwargs)`` returning an array or a named tuple of
        arrays (``get=('nngp', 'ntk')``, see :mod:`ntk_adapters.outputs`), each with leading axes
        ``(N1, N2)`` and possibly trailing axes (e.g. ``(O, O)`` for an empirical kernel with
        ``trace_axes=()``). It must be traceable by :func:`jax.jit` and **separable per example**:
        entry ``[i, j]`` may depend only on ``x1[i]``, ``x2[j]`` and the keyword arguments. A
        kernel that uses batch statistics (batch normalization in training mode, inputs
        standardized over the batch, ...) gives different numbers on a tile than on the whole
        batch and cannot be tiled.
      batch_size: tile edge. Need not divide ``N1`` or ``N2``: the last tile is padded to the same
        shape (so one compiled program serves every tile) and the padding sliced away.
      store_on_host: return NumPy arrays (assembled in host memory) instead of device arrays. The
        result is always assembled on the host; this only skips the final transfer to the first
        device (which on a CPU backend briefly holds a second copy), so the kernel may exceed
        device memory.
      memmap_path: assemble the result in a ``.npy`` memory map at this path (readable later with
        ``np.load(path, mmap_mode='r')``) and return it; implies ``store_on_host``. With several
        outputs (a named tuple) each field ``f`` goes to ``<stem>_<f>.npy``.
      progress: show a ``tqdm`` progress bar over tiles.
      devices: devices to shard tiles over (a 1-D mesh); ``None`` means ``jax.local_devices()``.
        Every device runs the same tile program, so results equal those of one device.
      symmetry: how ``K(x, x)`` is filled when ``x2`` is ``None``. ``'auto'`` (default): compute
        the diagonal and upper tiles only and fill the lower ones by transposition, where the
        trailing axes allow it: trailing axes that come in interleaved pairs ``(a, a, b, b, ...)``
        are swapped within each pair, other trailing axes (e.g. spatial diagonal axes) are kept;
        the choice is checked on the diagonal tiles (to ``√eps`` relative to the largest entry),
        and when neither fits, every tile is computed. ``'none'``: always compute every tile.
        A tuple ``perm`` of trailing-axis indices: assert
        ``K(x2, x1)[j, i] == K(x1, x2)[i, j].transpose(perm)`` without checking.

    Returns:
      ``batched(x1, x2=None, **kwargs)`` with the signature and output structure of
      ``kernel_fn``; keyword arguments (``get=``, ``params=``, ...) are passed through (arrays as
      traced arguments, everything else as compile-time constants).

    Example:
      >>> def rbf(x1, x2=None):
      ...     x2 = x1 if x2 is None else x2
      ...     return jnp.exp(-jnp.sum((x1[:, None] - x2[None]) ** 2, -1))
      >>> k = batch(rbf, 64)(jnp.ones((100, 3)))         # (100, 100), 2×2 tiles, 3 computed
      >>> k = batch(rbf, 64, store_on_host=True)(jnp.ones((100, 3)), jnp.ones((70, 3)))
      >>> type(k), k.shape
      (<class 'numpy.ndarray'>, (100, 70))
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    batch_size = int(batch_size)
    if isinstance(symmetry, str):
        if symmetry not in ("auto", "none"):
            raise ValueError(f"symmetry must be 'auto', 'none' or a tuple of trailing axes; got {symmetry!r}")
    else:
        symmetry = tuple(int(a) for a in symmetry)
        if sorted(symmetry) != list(range(len(symmetry))):
            raise ValueError(f"symmetry={symmetry!r} is not a permutation of the trailing axes 0..{len(symmetry) - 1}")

    devs = tuple(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("devices is empty; pass None (all local devices) or a non-empty sequence")
    mesh = Mesh(np.array(devs), (_AXIS,))
    tiled = NamedSharding(mesh, PartitionSpec(_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())

    def batched(x1: Any, x2: Any = None, **kwargs) -> Any:
        _refuse_coupled(kernel_fn, x1, kwargs.get("params"))
        n1 = _num_rows(x1, "x1")
        same = x2 is None
        n2 = n1 if same else _num_rows(x2, "x2")
        b1 = min(batch_size, n1)
        b2 = b1 if same else min(batch_size, n2)
        t1 = -(-n1 // b1)
        t2 = t1 if same else -(-n2 // b2)
        x1_tiles = _as_tiles(x1, t1, b1)
        x2_tiles = x1_tiles if same else _as_tiles(x2, t2, b2)

        treedef, static, dynamic = _split_kwargs(kwargs)
        dynamic = [jax.device_put(leaf, replicated) for leaf in dynamic]

        state: dict = dict(buffers=None, treedef=None, perms=None)

        def allocate(outs):
            leaves, out_def = jax.tree_util.tree_flatten(outs)
            for leaf in leaves:
                if leaf.ndim < 3 or tuple(leaf.shape[1:3]) != (b1, b2):
                    raise ValueError(
                        f"kernel_fn returned an array of shape {tuple(leaf.shape[1:])} for a tile of "
                        f"{b1} × {b2} inputs; every output of a tiled kernel must have leading axes "
                        "(N1, N2) (per-input quantities such as variances cannot be tiled)"
                    )
            shapes = [(n1, n2) + tuple(leaf.shape[3:]) for leaf in leaves]
            dtypes = [leaf.dtype for leaf in leaves]
            if memmap_path is not None:
                paths = _memmap_paths(memmap_path, out_def, len(leaves))
                bufs = [
                    np.lib.format.open_memmap(p, mode="w+", dtype=d, shape=s)
                    for p, d, s in zip(paths, dtypes, shapes)
                ]
            else:
                bufs = [np.empty(s, d) for s, d in zip(shapes, dtypes)]
            state.update(buffers=bufs, treedef=out_def)

        def write(tiles, outs, mirror):
            if state["buffers"] is None:
                allocate(outs)
            host = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(outs)]
            for k, (i, j) in enumerate(tiles):
                r0, r1 = i * b1, min((i + 1) * b1, n1)
                c0, c1 = j * b2, min((j + 1) * b2, n2)
                for buf, leaf, perm in zip(state["buffers"], host, state["perms"] or [None] * len(host)):
                    block = leaf[k, : r1 - r0, : c1 - c0]
                    buf[r0:r1, c0:c1] = block
                    if mirror and i != j:
                        buf[c0:c1, r0:r1] = _transpose_tile(block, perm)

        bar = None
        n_total = t1 * t2 if not same else t1 * (t1 + 1) // 2

        def run(tiles, is_diag, mirror):
            prog = _tile_program(kernel_fn, devs, is_diag, treedef, static)
            pending = []
            d = len(devs)
            for g in range(0, len(tiles), d):
                group = tiles[g : g + d]
                padded = group + [group[-1]] * (d - len(group))
                idx1 = np.array([i for i, _ in padded])
                idx2 = np.array([j for _, j in padded])
                a = jax.tree_util.tree_map(lambda t: jax.device_put(t[idx1], tiled), x1_tiles)
                b = a if is_diag else jax.tree_util.tree_map(lambda t: jax.device_put(t[idx2], tiled), x2_tiles)
                # Dispatch the next group before fetching the previous one, so that the host copy
                # overlaps with device work.
                pending.append((group, prog(a, b, dynamic)))
                if len(pending) > 1:
                    done_tiles, outs = pending.pop(0)
                    write(done_tiles, outs, mirror)
                    if bar is not None:
                        bar.update(len(done_tiles))
            for done_tiles, outs in pending:
                write(done_tiles, outs, mirror)
                if bar is not None:
                    bar.update(len(done_tiles))

        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_total, unit="tile", desc="kernel tiles")
        try:
            if same:
                run([(i, i) for i in range(t1)], is_diag=True, mirror=False)
                upper = [(i, j) for i in range(t1) for j in range(i + 1, t1)]
                if upper:
                    perms = resolve_perms(state["buffers"], b1, n1)
                    if perms is None:
                        lower = [(j, i) for i, j in upper]
                        if bar is not None:
                            bar.total = t1 * t1
                            bar.refresh()
                        run(upper + lower, is_diag=False, mirror=False)
                    else:
                        state["perms"] = perms
                        run(upper, is_diag=False, mirror=True)
            else:
                run([(i, j) for i in range(t1) for j in range(t2)], is_diag=False, mirror=False)
        finally:
            if bar is not None:
                bar.close()

        bufs = state["buffers"]
        if memmap_path is not None:
            for buf in bufs:
                buf.flush()
        elif not store_on_host:
            bufs = [jax.device_put(buf, devs[0]) for buf in bufs]
        return jax.tree_util.tree_unflatten(state["treedef"], bufs)

    def resolve_perms(buffers, b, n):
        """Trailing-axis permutation per output making ``K`` symmetric, or ``None``."""
        if symmetry == "none":
            return None
        perms = []
        for buf in buffers:
            trailing = tuple(buf.shape[2:])
            if symmetry != "auto":
                if len(symmetry) != len(trailing) or any(trailing[p] != s for p, s in zip(symmetry, trailing)):
                    raise ValueError(
                        f"symmetry={symmetry!r} does not fit trailing kernel axes {trailing}: it must "
                        "permute them into a shape-preserving order"
                    )
                perms.append(symmetry)
                continue
            diag_tiles = [np.asarray(buf[r : r + b, r : r + b]) for r in range(0, n, b)]
            for perm in _candidate_perms(trailing):
                if all(_is_symmetric_under(t, perm) for t in diag_tiles):
                    perms.append(perm)
                    break
            else:
                return None
        return perms

    batched.__doc__ = (
        f"Tiled ({batch_size}×{batch_size}) version of {getattr(kernel_fn, '__name__', 'kernel_fn')}; "
        "see ntk_adapters.batching.batch."
    )
    return batched


# --------------------------------------------------------------------------------------------
# Kernel regression with conjugate gradients
# --------------------------------------------------------------------------------------------


class KernelRegressionResult(NamedTuple):
    """Result of :func:`kernel_regression_cg`.

    Attributes:
      alpha: ``(K + diag_reg·I)⁻¹ y``, shape of ``y_train`` ``(N, ...)``.
      train: ``K α`` on the training inputs, ``(N, ...)``.
      test: ``K(x_test, X) α``, ``(N_test, ...)``; ``None`` without ``x_test``.
      residual: relative residual ``‖(K + diag_reg·I) α − y‖ / ‖y‖`` of the returned ``α``
        (CG reports no convergence flag; this is the honest check).
    """

    alpha: jax.Array
    train: jax.Array
    test: Optional[jax.Array]
    residual: jax.Array


def kernel_regression_cg(
    kernel_fn: Callable[..., Any],
    x_train: Any,
    y_train: jax.Array,
    x_test: Any = None,
    *,
    diag_reg: float = 0.0,
    batch_size: int = 256,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
    get: Optional[str] = "ntk",
    devices: Optional[Sequence[jax.Device]] = None,
    **kernel_kwargs: Any,
) -> KernelRegressionResult:
    """Kernel regression ``α = (K + diag_reg·I)⁻¹ y`` by conjugate gradients, never storing ``K``.

    Each matrix-vector product ``K v`` is accumulated tile by tile
    (``batch_size × batch_size``), recomputing the tiles with ``kernel_fn`` every time; only the
    diagonal and upper tiles are evaluated (``K`` is symmetric), so memory is
    ``O(batch_size² + N)`` per device and each product costs ``≈ N²/2`` kernel entries, split
    evenly over ``devices``. The solver is
    :func:`jax.scipy.sparse.linalg.cg`; ``K`` must be positive semi-definite and
    ``K + diag_reg·I`` positive definite. Several output columns (``y_train`` of shape
    ``(N, O)``) are solved together: the kernel is ``K ⊗ I_O``, as for infinite-width kernels
    and empirical kernels with the default ``trace_axes=(-1,)``.

    With ``diag_reg = 0`` and ``kernel_fn`` an NTK, ``test`` is the ``t → ∞`` prediction of
    gradient flow on the MSE loss ``½ · mean (f(x) − y)²`` started from a zero-output network
    (add ``f_0`` back yourself when it is not zero).

    Args:
      kernel_fn: ``kernel_fn(x1, x2, get=get, **kernel_kwargs)`` returning an ``(N1, N2)`` array
        (a per-example separable kernel; see :func:`batch`). With ``get=None`` it is called
        without ``get``.
      x_train: training inputs ``(N, ...)`` (or a pytree of such arrays).
      y_train: targets ``(N,)`` or ``(N, O)`` (any trailing shape).
      x_test: optional test inputs ``(N_test, ...)``.
      diag_reg: ``λ`` added to the diagonal.
      batch_size: tile edge.
      tol, atol: CG stopping rule ``‖r‖ ≤ max(tol·‖y‖, atol)``.
      maxiter: CG iteration cap (``None``: JAX's default, ``10·N·O``).
      get: which kernel to request from ``kernel_fn``.
      devices: devices over which the tile pairs of every product are split (each device sums
        its share, then one all-reduce); ``None`` means ``jax.local_devices()``.
      **kernel_kwargs: passed to ``kernel_fn`` (e.g. ``params=``).

    Returns:
      :class:`KernelRegressionResult` ``(alpha, train, test, residual)``.

    Example:
      >>> res = kernel_regression_cg(kernel_fn, x, y, x_test, diag_reg=1e-4, batch_size=512)
      >>> res.alpha.shape, res.test.shape, float(res.residual)   # (N, O), (N_test, O), ~1e-6
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    devs = tuple(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("devices is empty; pass None (all local devices) or a non-empty sequence")
    mesh = Mesh(np.array(devs), (_AXIS,))
    _refuse_coupled(kernel_fn, x_train, kernel_kwargs.get("params"))
    n = _num_rows(x_train, "x_train")
    y_train = jnp.asarray(y_train)
    if y_train.ndim == 0 or y_train.shape[0] != n:
        raise ValueError(f"y_train must have shape (N={n}, ...) to match x_train; got {y_train.shape}")
    out_shape = y_train.shape[1:]
    k_cols = int(np.prod(out_shape, dtype=int))

    b = min(int(batch_size), n)
    nt = -(-n // b)
    xs = jax.tree_util.tree_map(jnp.asarray, _as_tiles(x_train, nt, b))
    if x_test is not None:
        n_test = _num_rows(x_test, "x_test")
        bt = min(int(batch_size), n_test)
        mt = -(-n_test // bt)
        xts = jax.tree_util.tree_map(jnp.asarray, _as_tiles(x_test, mt, bt))
    kw = dict(kernel_kwargs) if get is None else dict(kernel_kwargs, get=get)

    def tile(t, i):
        return jax.tree_util.tree_map(lambda leaf: leaf[i], t)

    def k_fn(a, c):
        k = kernel_fn(a, c, **kw)
        if not isinstance(k, jax.Array) or k.ndim != 2:
            raise ValueError(
                f"kernel_regression_cg needs kernel_fn(x1, x2, get={get!r}) to return an (N1, N2) array; "
                f"got {jax.tree_util.tree_map(jnp.shape, k)}. Ask for a single kernel (get='ntk') whose "
                "output axes are traced (trace_axes=(-1,)) or an infinite-width kernel."
            )
        return k

    def pair_schedule(pairs):
        """Split the tile pairs evenly over the devices: ``(D, P, 2)`` indices and a validity mask."""
        per = -(-len(pairs) // len(devs))
        padded = np.zeros((len(devs) * per, 2), np.int32)
        padded[: len(pairs)] = pairs
        valid = np.zeros(len(devs) * per, bool)
        valid[: len(pairs)] = True
        return padded.reshape(len(devs), per, 2), valid.reshape(len(devs), per)

    def tiled_product(rows, pairs, valid, v, n_rows, symmetric):
        """``Σ_j K(rows_i, X_j) v_j`` over the scheduled tile pairs, each device summing its share.

        With ``symmetric`` (rows is X, pairs with i ≤ j), tile ``(i, j)`` also contributes
        ``K_ijᵀ v_i`` to row block ``j``, so only half of ``K`` is ever evaluated.
        """

        def local(pairs_l, valid_l, v):
            def step(acc, item):
                (i, j), ok = item
                if symmetric:
                    # Diagonal tiles as kernel_fn(x, None), like the untiled kernel: kernels may
                    # treat identical inputs specially (exact unit correlation, a noise term).
                    k = jax.lax.cond(
                        i == j,
                        lambda: k_fn(tile(rows, i), None),
                        lambda: k_fn(tile(rows, i), tile(xs, j)),
                    )
                else:
                    k = k_fn(tile(rows, i), tile(xs, j))
                k = k.astype(v.dtype)
                acc = acc.at[i].add(jnp.where(ok, k @ v[j], 0))
                if symmetric:
                    acc = acc.at[j].add(jnp.where(ok & (i != j), k.T @ v[i], 0))
                return acc, None

            acc0 = jnp.zeros((n_rows,) + v.shape[1:], v.dtype)
            acc, _ = jax.lax.scan(step, acc0, (pairs_l[0], valid_l[0]))
            return jax.lax.psum(acc, _AXIS)

        spec = PartitionSpec(_AXIS)
        return jax.shard_map(
            local, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=PartitionSpec(), check_vma=False
        )(pairs, valid, v)

    train_pairs = pair_schedule(np.array([(i, j) for i in range(nt) for j in range(i, nt)], np.int32))
    mask = (jnp.arange(nt * b) < n).reshape(nt, b, 1)

    def kmv(v):
        """``K v`` for ``v`` of shape ``(nt, b, k)`` whose padded rows are zero."""
        return tiled_product(xs, *map(jnp.asarray, train_pairs), v, nt, symmetric=True) * mask

    def predict(alpha):
        test_pairs = pair_schedule(np.array([(i, j) for i in range(mt) for j in range(nt)], np.int32))
        return tiled_product(xts, *map(jnp.asarray, test_pairs), alpha, mt, symmetric=False)

    @jax.jit
    def solve(y):
        yp = jnp.concatenate([y, jnp.zeros((nt * b - n, k_cols), y.dtype)]).reshape(nt, b, k_cols)
        alpha, _ = jax.scipy.sparse.linalg.cg(
            lambda v: kmv(v) + diag_reg * v, yp, tol=tol, atol=atol, maxiter=maxiter
        )
        train = kmv(alpha)
        residual = jnp.linalg.norm(train + diag_reg * alpha - yp) / jnp.linalg.norm(yp)
        test = predict(alpha) if x_test is not None else None
        return alpha, train, test, residual

    k_dtype = jax.eval_shape(k_fn, tile(xs, 0), tile(xs, 0)).dtype
    dtype = jnp.result_type(y_train.dtype, k_dtype, jnp.float32)
    alpha, train, test, residual = solve(y_train.reshape(n, k_cols).astype(dtype))
    alpha = alpha.reshape(nt * b, k_cols)[:n].reshape((n,) + out_shape)
    train = train.reshape(nt * b, k_cols)[:n].reshape((n,) + out_shape)
    if test is not None:
        test = test.reshape(mt * bt, k_cols)[:n_test].reshape((n_test,) + out_shape)
    return KernelRegressionResult(alpha, train, test, residual)

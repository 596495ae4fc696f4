"""Tiled, device-sharded kernel evaluation, resumable, across processes.

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
* results are assembled on the first device by in-place updates dispatched with the tiles (no
  copy to the host, no final transfer), or, with ``store_on_host=True`` or ``memmap_path``, on
  the host (a NumPy array or a ``.npy`` memory map on disk), so the kernel may be larger than
  device memory; each group's copy to the host starts as soon as it is dispatched, overlapping
  the next group's computation;
* a memory-mapped computation records its finished tiles (:mod:`ntk_adapters.tile_store`), and
  the same call after a crash computes only the missing ones;
* after ``jax.distributed.initialize`` the same call in every process splits the tiles over all
  processes, each writing its own into the shared memory map.

:func:`kernel_regression_cg` (:mod:`ntk_adapters.kernel_regression`) solves ``(K + λ I) α = y``
without ever holding ``K``.

This module is framework-free: it never imports Flax or Haiku.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union, cast

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntk_adapters import distributed as _dist
from ntk_adapters import tile_store
from ntk_adapters.kernel_regression import CGConvergenceWarning, KernelRegressionResult, kernel_regression_cg
from ntk_adapters.tiling import (
    AXIS,
    DeviceTiles,
    Symmetry,
    _as_tiles,
    _candidate_perms,
    _is_symmetric_under,
    _num_rows,
    _refuse_coupled,
    _split_kwargs,
    _tile_program,
    _transpose_tile,
)

__all__ = ["batch", "kernel_regression_cg", "KernelRegressionResult", "CGConvergenceWarning"]


_NOT_SHARED = (
    "memmap_path must be on a file system that every process sees (the same files under the same "
    "path), since each process writes its own tiles into them"
)


def _memmap_paths(path: str, treedef: Any, n_leaves: int) -> list[str]:
    if n_leaves == 1:
        return [path]
    root, ext = os.path.splitext(path)
    ext = ext or ".npy"
    example = jax.tree_util.tree_unflatten(treedef, list(range(n_leaves)))
    fields = getattr(example, "_fields", None)
    names = list(fields) if fields is not None and len(fields) == n_leaves else [str(k) for k in range(n_leaves)]
    return [f"{root}_{name}{ext}" for name in names]


def batch(
    kernel_fn: Callable[..., Any],
    batch_size: int,
    *,
    store_on_host: bool = False,
    memmap_path: Optional[Union[str, os.PathLike]] = None,
    resume: bool = True,
    progress: bool = False,
    devices: Optional[Sequence[jax.Device]] = None,
    symmetry: Symmetry = "auto",
    distributed: Optional[bool] = None,
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
      store_on_host: assemble the result in host memory and return NumPy arrays, so the kernel
        may exceed device memory. The default (``False``) assembles it on the first device of
        ``devices`` (padded to whole tiles while it is filled: up to one tile edge more rows and
        columns) and returns device arrays.
      memmap_path: assemble the result in a ``.npy`` memory map at this path (readable later with
        ``np.load(path, mmap_mode='r')``) and return it; implies ``store_on_host``. With several
        outputs (a named tuple) each field ``f`` goes to ``<stem>_<f>.npy``. Finished tiles are
        recorded in ``<memmap_path>.tiles.json`` (see ``resume``).
      resume: with ``memmap_path``, continue a computation whose tile record is on disk: only the
        tiles not yet recorded are computed, and the result is bit for bit that of an
        uninterrupted run. A record of a different call (other inputs, keyword arguments, shapes,
        dtypes, ``batch_size``, ``symmetry`` or kernel function name) raises ``ValueError``
        instead of mixing the two. ``False``: start over, overwriting the files.
      progress: show a ``tqdm`` progress bar over tiles (on process 0 only).
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
      distributed: share the call between all processes of ``jax.distributed.initialize``: every
        process makes the same call with the same inputs, the tiles still to do are dealt out
        round-robin to the processes (each runs its share on its local devices) and written into
        ``memmap_path``, which must then be on a file system all processes see; process 0 creates
        the files. ``None`` (default): when there are several processes and ``devices`` is
        ``None``. ``False``: this process alone, on its own devices.

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

      With ``memmap_path="k.npy"`` the same call, run again after a crash, computes only the
      tiles missing from ``k.npy``.
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
    multi = _dist.use_all_processes(distributed, devices)
    if multi and memmap_path is None:
        raise ValueError(
            "with several processes batch() writes every process's tiles into one shared file: pass "
            "memmap_path= on a file system all processes see (or distributed=False to compute the "
            "whole kernel in each process)"
        )
    devs = tuple(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("devices is empty; pass None (all local devices) or a non-empty sequence")
    mesh = Mesh(np.array(devs), (AXIS,))
    tiled = NamedSharding(mesh, PartitionSpec(AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    rank, n_proc = (jax.process_index(), jax.process_count()) if multi else (0, 1)

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

        treedef, static, dynamic_host = _split_kwargs(kwargs)
        dynamic = [jax.device_put(leaf, replicated) for leaf in dynamic_host]

        # The output layout is known before any tile is computed (a resumed run may have none
        # left to compute); the tile program's own trace serves, so kernel_fn is traced once.
        def group_spec(tiles):
            return jax.tree_util.tree_map(
                lambda t: jax.ShapeDtypeStruct((len(devs),) + t.shape[1:], t.dtype, sharding=tiled), tiles
            )

        out_spec = jax.eval_shape(
            _tile_program(kernel_fn, devs, same, treedef, static),
            group_spec(x1_tiles),
            group_spec(x2_tiles),
            dynamic,
        )
        leaves, out_def = jax.tree_util.tree_flatten(out_spec)
        for leaf in leaves:
            if len(leaf.shape) < 3 or tuple(leaf.shape[1:3]) != (b1, b2):
                raise ValueError(
                    f"kernel_fn returned an array of shape {tuple(leaf.shape[1:])} for a tile of "
                    f"{b1} × {b2} inputs; every output of a tiled kernel must have leading axes "
                    "(N1, N2) (per-input quantities such as variances cannot be tiled)"
                )
        shapes = [(n1, n2) + tuple(leaf.shape[3:]) for leaf in leaves]
        dtypes = [leaf.dtype for leaf in leaves]

        record = None
        done = np.zeros((t1, t2), bool)
        on_device = None
        bufs: list = []  # host buffers; a device result lives in on_device.bufs, replaced at every write
        if memmap_path is None and not store_on_host:
            on_device = DeviceTiles(shapes, dtypes, (b1, b2), (t1, t2), devs[0])
        elif memmap_path is None:
            bufs = [np.empty(s, d) for s, d in zip(shapes, dtypes)]
        else:
            bufs, record, done = open_store(
                os.fspath(memmap_path), out_def, shapes, dtypes, (t1, t2), x1, x2, dynamic_host, static
            )
        state: dict = dict(perms=None)

        def write(tiles, outs, mirror):
            if on_device is not None:
                on_device.write(tiles, outs, state["perms"] if mirror else None)
                return
            host = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(outs)]
            for k, (i, j) in enumerate(tiles):
                r0, r1 = i * b1, min((i + 1) * b1, n1)
                c0, c1 = j * b2, min((j + 1) * b2, n2)
                for buf, leaf, perm in zip(bufs, host, state["perms"] or [None] * len(host)):
                    block = leaf[k, : r1 - r0, : c1 - c0]
                    buf[r0:r1, c0:c1] = block
                    if mirror and i != j:
                        buf[c0:c1, r0:r1] = _transpose_tile(block, perm)
            if record is not None:
                record.mark_done(tiles)

        bar = None

        def share(tiles):
            """This process's part of the tiles still to do."""
            todo = [t for t in tiles if not done[t]]
            return todo[rank::n_proc]

        def run(tiles, is_diag, mirror):
            if not tiles:
                return
            prog = _tile_program(kernel_fn, devs, is_diag, treedef, static)
            pending = []
            d = len(devs)
            for g in range(0, len(tiles), d):
                group = tiles[g : g + d]
                padded = group + [group[-1]] * (d - len(group))
                idx1 = np.array([i for i, _ in padded])
                idx2 = np.array([j for _, j in padded])
                a = jax.tree_util.tree_map(lambda t, idx=idx1: jax.device_put(t[idx], tiled), x1_tiles)
                b = (
                    a
                    if is_diag
                    else jax.tree_util.tree_map(lambda t, idx=idx2: jax.device_put(t[idx], tiled), x2_tiles)
                )
                # Dispatch the next group before fetching the previous one, so that the host copy
                # overlaps with device work.
                outs = prog(a, b, dynamic)
                if on_device is None:
                    # Start the copy to host memory now: it proceeds while the next group computes.
                    for leaf in jax.tree_util.tree_leaves(outs):
                        leaf.copy_to_host_async()
                pending.append((group, outs))
                if len(pending) > 1:
                    done_tiles, outs = pending.pop(0)
                    write(done_tiles, outs, mirror)
                    if bar is not None:
                        bar.update(len(done_tiles))
            for done_tiles, outs in pending:
                write(done_tiles, outs, mirror)
                if bar is not None:
                    bar.update(len(done_tiles))
            if record is not None:
                record.commit()

        diag = [(i, i) for i in range(t1)] if same else []
        upper = [(i, j) for i in range(t1) for j in range(i + 1, t1)] if same else []
        lower = [(j, i) for i, j in upper]
        everything = diag + upper + lower if same else [(i, j) for i in range(t1) for j in range(t2)]
        if progress and rank == 0:
            from tqdm.auto import tqdm

            first = share(diag + upper) if same else share(everything)
            desc = "kernel tiles" if n_proc == 1 else f"kernel tiles (process 0 of {n_proc})"
            bar = tqdm(total=len(first), unit="tile", desc=desc)
        try:
            if same:
                run(share(diag), is_diag=True, mirror=False)
                if any(not done[t] for t in upper + lower):
                    # Every process must see every diagonal tile before judging the symmetry.
                    _dist.barrier("ntk_adapters.batch: diagonal tiles done")
                    if on_device is not None:
                        written = list(on_device.bufs)
                    else:
                        written = reopen(bufs) if multi else bufs
                    perms = resolve_perms(written, b1, n1)
                    if perms is None:
                        todo = share(upper + lower)
                        if bar is not None:
                            bar.total = len(share(diag)) + len(todo)
                            bar.refresh()
                        run(todo, is_diag=False, mirror=False)
                    else:
                        state["perms"] = perms
                        run(share(upper), is_diag=False, mirror=True)
            else:
                run(share(everything), is_diag=False, mirror=False)
        finally:
            if record is not None:
                record.commit()  # keep what was finished when interrupted (KeyboardInterrupt, ...)
            if bar is not None:
                bar.close()

        if memmap_path is not None:
            for buf in bufs:
                cast(np.memmap, buf).flush()
            if multi:
                _dist.barrier("ntk_adapters.batch: all tiles done")
                bufs = reopen(bufs)
        elif on_device is not None:
            bufs = on_device.result(n1, n2)
        return jax.tree_util.tree_unflatten(out_def, bufs)

    def open_store(path, out_def, shapes, dtypes, grid, x1, x2, dynamic_host, static):
        """The data files and this process's tile record, fresh or resumed; with several
        processes, process 0 creates the files and everyone agrees on the plan first."""
        paths = _memmap_paths(path, out_def, len(shapes))
        fp = tile_store.fingerprint(kernel_fn, x1, x2, dynamic_host, static, batch_size, symmetry, shapes, dtypes)
        if multi:
            _dist.same_on_all_processes(repr(sorted(fp.items())), f"the call writing memmap_path={path!r}")
        try:
            done, error = tile_store.plan(path, fp, grid, resume), None
        except ValueError as e:
            done, error = None, e
        if multi:
            # A memory map on a disk of its own in each process would silently hold only that
            # process's tiles: compare what every process found.
            _dist.same_on_all_processes(
                "error" if error is not None else "fresh" if done is None else np.packbits(done).tobytes().hex(),
                f"the tile record found at memmap_path={path!r}",
                _NOT_SHARED,
            )
        if error is not None:
            raise error
        if done is None:
            if rank == 0:
                bufs = tile_store.create(paths, shapes, dtypes, path)
            _dist.barrier("ntk_adapters.batch: files created")
            failed = ""
            if rank != 0:
                try:
                    bufs = tile_store.open_existing(paths, shapes, dtypes, path)
                except ValueError as e:
                    failed = str(e)
            if multi:
                where = f"opening the files that process 0 created at {path!r}"
                _dist.same_on_all_processes(failed and "failed", where, _NOT_SHARED)
            done = np.zeros(grid, bool)
        else:
            bufs = tile_store.open_existing(paths, shapes, dtypes, path)
        record = tile_store.TileRecord(path, rank, fp, done, bufs)
        if rank == 0 and not done.any():
            record.save()
        return bufs, record, done

    def reopen(bufs):
        """Fresh mappings of the shared files, which other processes have written to."""
        return [np.load(buf.filename, mmap_mode="r+") for buf in bufs]

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
            diag_tiles = [np.asarray(buf[r : min(r + b, n), r : min(r + b, n)]) for r in range(0, n, b)]
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

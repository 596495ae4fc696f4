"""``.npy`` memory maps that a tiled kernel is written into, with a record of the finished tiles,
so that a computation killed midway resumes where it stopped.

Next to the data (``k.npy``, or ``k_nngp.npy`` and ``k_ntk.npy`` for a named tuple) lies a small
JSON record ``k.npy.tiles.json``: a fingerprint of the call (shapes, dtypes, tile size, symmetry
option, kernel function's name, digests of the inputs and array keyword arguments) and a bitmap
of the tiles whose data is on disk. The bitmap is rewritten atomically (a temporary file, then
:func:`os.replace`) after the tiles' data has been flushed, every couple of seconds, so after a
crash every tile marked done is complete; tiles written but not yet marked are computed again. With several
processes each writes its own record (``k.npy.tiles.<process>.json``) and a rerun takes the
union of all of them.

This module is framework-free: it never imports Flax or Haiku.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

_FORMAT = 1


def digest_tree(tree: Any) -> str:
    """SHA-256 of a pytree's structure, shapes, dtypes and bytes."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.data)
    return h.hexdigest()


def fingerprint(
    kernel_fn: Any,
    x1: Any,
    x2: Any,
    dynamic: Sequence[Any],
    static: tuple,
    batch_size: int,
    symmetry: Any,
    shapes: Sequence[tuple],
    dtypes: Sequence[Any],
) -> dict:
    """What must agree between a run and its resumption (JSON-serializable)."""
    name = f"{getattr(kernel_fn, '__module__', '?')}.{getattr(kernel_fn, '__qualname__', type(kernel_fn).__name__)}"
    return {
        "kernel_fn": name,
        "x1": digest_tree(x1),
        "x2": None if x2 is None else digest_tree(x2),
        "array keyword arguments": digest_tree(list(dynamic)),
        "other keyword arguments": repr(static),
        "batch_size": int(batch_size),
        "symmetry": symmetry if isinstance(symmetry, str) else list(symmetry),
        "output shapes": [list(s) for s in shapes],
        "output dtypes": [np.dtype(d).str for d in dtypes],
    }


def record_path(memmap_path: str, writer: int) -> str:
    return f"{memmap_path}.tiles.json" if writer == 0 else f"{memmap_path}.tiles.{writer}.json"


def _write_json_atomically(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_records(memmap_path: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(glob.escape(memmap_path) + ".tiles*.json")):
        try:
            with open(path) as f:
                out.append((path, json.load(f)))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"memmap_path={memmap_path!r}: the tile record {path} cannot be read ({e}); delete it "
                "to start over, or pass resume=False"
            ) from None
    return out


def plan(memmap_path: str, fp: dict, grid: tuple[int, int], resume: bool) -> Optional[np.ndarray]:
    """The tiles already done (a ``grid``-shaped bool array) when resuming, ``None`` for a fresh
    start. Raises when the records on disk belong to a different call."""
    if not resume:
        return None
    records = _read_records(memmap_path)
    if not records:
        return None
    done = np.zeros(grid, bool)
    for path, rec in records:
        old = rec.get("fingerprint", {})
        if rec.get("format") != _FORMAT or tuple(rec.get("grid", ())) != tuple(grid) or old != fp:
            differ = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            if tuple(rec.get("grid", ())) != tuple(grid):
                differ.append("tile grid")
            raise ValueError(
                f"memmap_path={memmap_path!r} holds part of a different kernel computation (record "
                f"{path}; differs in: {', '.join(differ) or 'record format'}). Refusing to mix the "
                "two: rerun with the same kernel_fn, inputs, keyword arguments, batch_size and "
                "symmetry to resume, or pass resume=False (or another memmap_path) to start over"
            )
        bits = np.unpackbits(np.frombuffer(base64.b64decode(rec["done"]), np.uint8))
        done |= bits[: grid[0] * grid[1]].reshape(grid).astype(bool)
    return done


def create(paths: Sequence[str], shapes: Sequence[tuple], dtypes: Sequence[Any], memmap_path: str) -> list[np.memmap]:
    """Fresh data files; stale tile records of ``memmap_path`` are removed first, so that a crash
    before the first record leaves nothing that claims to be done."""
    for old in glob.glob(glob.escape(memmap_path) + ".tiles*.json"):
        os.remove(old)
    return [np.lib.format.open_memmap(p, mode="w+", dtype=d, shape=s) for p, d, s in zip(paths, dtypes, shapes)]


def open_existing(
    paths: Sequence[str], shapes: Sequence[tuple], dtypes: Sequence[Any], memmap_path: str
) -> list[np.memmap]:
    bufs = []
    for p, s, d in zip(paths, shapes, dtypes):
        try:
            buf = np.load(p, mmap_mode="r+")
        except OSError as e:
            raise ValueError(
                f"memmap_path={memmap_path!r}: its tile record says part of the kernel is done, but "
                f"the data file {p} cannot be opened ({e}); pass resume=False to start over"
            ) from None
        if buf.shape != tuple(s) or buf.dtype != np.dtype(d):
            raise ValueError(
                f"memmap_path={memmap_path!r}: data file {p} has shape {buf.shape} and dtype "
                f"{buf.dtype}, expected {tuple(s)} and {np.dtype(d)}; pass resume=False to start over"
            )
        bufs.append(buf)
    return bufs


COMMIT_EVERY_S = 2.0


class TileRecord:
    """One process's record of the tiles it finished. It starts from the tiles already done (by
    any process), since rewriting it must not forget them.

    Committing (flush the data, then atomically replace the record) costs a disk sync, so it
    happens at most every :data:`COMMIT_EVERY_S` seconds and at the end of each phase: a crash
    loses at most that much work, and never leaves a tile on record whose data is not on disk.
    """

    def __init__(self, memmap_path: str, writer: int, fp: dict, done: np.ndarray, buffers: Sequence[np.memmap]):
        self.path = record_path(memmap_path, writer)
        self.fp = fp
        self.grid = tuple(done.shape)
        self.buffers = buffers
        self.mine = np.array(done, bool)
        self.pending: list[tuple[int, int]] = []
        self.last_commit = time.monotonic()

    def mark_done(self, tiles: Sequence[tuple[int, int]]) -> None:
        """Note ``tiles`` as written; commit when the last commit is old enough."""
        self.pending.extend(tiles)
        if time.monotonic() - self.last_commit >= COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        """Flush the data, then record the noted tiles (in that order: a tile on record is on disk)."""
        if self.pending:
            for buf in self.buffers:
                buf.flush()
            for i, j in self.pending:
                self.mine[i, j] = True
            self.pending = []
            self.save()
        self.last_commit = time.monotonic()

    def save(self) -> None:
        bits = base64.b64encode(np.packbits(self.mine.ravel()).tobytes()).decode()
        _write_json_atomically(
            self.path, {"format": _FORMAT, "grid": list(self.grid), "fingerprint": self.fp, "done": bits}
        )

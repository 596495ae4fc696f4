"""Which processes share a tiled computation, and how they meet.

With ``jax.distributed.initialize`` every process sees all devices (``jax.devices()``) but can
only feed and read its own (``jax.local_devices()``). The tiled evaluators run one call in every
process: :func:`batch` splits the tiles over processes (each evaluates its share on its local
devices and writes it into a shared memory map), :func:`kernel_regression_cg` runs one SPMD
program over a mesh of all devices. This module holds the small amount of glue both need.

This module is framework-free: it never imports Flax or Haiku.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Sharding

__all__ = ["use_all_processes", "barrier", "same_on_all_processes", "global_array", "local_view"]


def use_all_processes(distributed: Optional[bool], devices: Optional[Sequence[jax.Device]]) -> bool:
    """Whether a call is shared by every process: ``distributed=None`` means "when there are
    several processes and no explicit ``devices``"."""
    n = jax.process_count()
    if distributed is None:
        return n > 1 and devices is None
    if distributed and devices is not None:
        raise ValueError(
            "distributed=True uses every process's local devices; pass devices=None (or "
            "distributed=False to keep the call in this process, on the given devices)"
        )
    return bool(distributed) and n > 1


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_words(words: np.ndarray) -> np.ndarray:
    """``(P, k)``: every process's ``(k,)`` int32 vector, on every process."""
    from jax.experimental import multihost_utils

    out = multihost_utils.process_allgather(np.asarray(words, np.int32)[None], tiled=True)
    return np.asarray(out).reshape(jax.process_count(), -1)


def digest_words(text: str) -> np.ndarray:
    """A 256-bit digest of ``text`` as eight int32 words (what collectives can carry)."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.int32).copy()


_SAME_CALL = (
    "with several processes every process must make the same call with the same inputs; to give "
    "each process its own inputs, pass distributed=False"
)


def same_on_all_processes(text: str, what: str, hint: str = _SAME_CALL) -> None:
    """Raise on every process (not just the odd one out, which would leave the others waiting)
    unless ``text`` is the same on all of them."""
    if jax.process_count() == 1:
        return
    words = gather_words(digest_words(text))
    differ = [p for p in range(len(words)) if not np.array_equal(words[p], words[0])]
    if differ:
        raise ValueError(f"{what} differs between processes (processes {differ} disagree with process 0): {hint}")


def global_array(x: Any, sharding: Sharding) -> jax.Array:
    """A global array of host data ``x`` (the same full array in every process) laid out by
    ``sharding``; each process places only its own devices' pieces."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def local_view(x: jax.Array) -> jax.Array:
    """This process's copy of a replicated global array (the array itself when fully addressable)."""
    if x.is_fully_addressable:
        return x
    return x.addressable_shards[0].data

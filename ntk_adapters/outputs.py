"""How kernel functions return what ``get`` asked for.

Every kernel function in the library (empirical, Monte Carlo, infinite-width) takes
``get``: a single name such as ``'ntk'`` returns that array; a tuple such as
``('nngp', 'ntk')`` returns a named tuple with those fields, in that order.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Mapping, Sequence, Union

Get = Union[str, Sequence[str], None]

KERNEL_NAMES = ("nngp", "ntk")


@functools.lru_cache(maxsize=None)
def _kernels_type(fields: tuple[str, ...]):
    return collections.namedtuple("Kernels", fields)


def normalize_get(get: Get, allowed: Sequence[str] = KERNEL_NAMES) -> tuple[tuple[str, ...], bool]:
    """Return ``(names, single)``: the requested names and whether a bare array is wanted."""
    if get is None:
        get = tuple(allowed)
    single = isinstance(get, str)
    names: tuple[str, ...] = (get,) if isinstance(get, str) else tuple(get)
    if not names:
        raise ValueError(f"get must name at least one of {tuple(allowed)}; got {get!r}")
    for name in names:
        if name not in allowed:
            raise ValueError(f"get={get!r}: unknown kernel {name!r}; choose from {tuple(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"get={get!r} names a kernel twice")
    return names, single


def pack(get: Get, values: Mapping[str, Any], allowed: Sequence[str] = KERNEL_NAMES) -> Any:
    """Return ``values[get]`` for a single name, else a named tuple of the requested values."""
    names, single = normalize_get(get, allowed)
    if single:
        return values[names[0]]
    return _kernels_type(names)(*(values[n] for n in names))

"""NaN/Inf checks of concrete arrays, shared by the kernel functions and the predictors.

Arrays in host memory are read in place; accelerator arrays are reduced where they live, by one
program for all of them, so that only a flag per array crosses to the host (copying the
parameters to the host on every call would cost more than a small kernel). Tracers are skipped:
under ``jit`` values are not known.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (its value, and so its finiteness, is not known yet)."""
    return isinstance(x, jax.core.Tracer)


_finite_flags = jax.jit(lambda leaves: [jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _in_host_memory(leaf) -> bool:
    return not isinstance(leaf, jax.Array) or all(d.platform == "cpu" for d in leaf.devices())


def finite_flags(leaves: list) -> np.ndarray:
    """One flag per concrete array of ``leaves``: whether all its entries are finite."""
    flags = np.ones(len(leaves), bool)
    on_device = []
    for i, leaf in enumerate(leaves):
        if _in_host_memory(leaf):
            flags[i] = np.isfinite(np.asarray(leaf)).all()
        else:
            on_device.append(i)
    if on_device:
        flags[on_device] = np.asarray(_finite_flags([leaves[i] for i in on_device]))
    return flags


def _dtype(leaf):
    # an array's own dtype is read directly: jnp.result_type costs microseconds per leaf and call
    return leaf.dtype if isinstance(leaf, (jax.Array, np.ndarray)) else jnp.result_type(leaf)


def check_finite(tree: PyTree, name: str, *more: Any) -> None:
    """Raise ``ValueError`` if a concrete array in ``tree`` has NaN or Inf (tracers are skipped).

    ``more`` continues with further ``tree, name`` pairs, all checked by one device program.
    """
    named = [(tree, name), *zip(more[::2], more[1::2])]
    checked = [
        (label, path, leaf)
        for t, label in named
        for path, leaf in jax.tree_util.tree_leaves_with_path(t)
        if not is_traced(leaf) and jnp.issubdtype(_dtype(leaf), jnp.inexact)
    ]
    if not checked:
        return
    flags = finite_flags([leaf for _, _, leaf in checked])
    if not flags.all():
        label, path, _ = checked[int(np.argmin(flags))]
        where = f" at {jax.tree_util.keystr(path)}" if path else ""
        raise ValueError(
            f"{label}{where} contains NaN or Inf; kernels of non-finite values are meaningless. "
            "Clean the data, or pass check_finite_values=False to let NaNs propagate."
        )


class KnownFinite:
    """The parameter leaves a kernel function last found finite, by weak reference: JAX arrays are
    immutable, so the same objects need no second look on the next call (NumPy arrays can change
    in place and are always checked)."""

    def __init__(self):
        self.refs: tuple = ()

    def covers(self, leaves: list) -> bool:
        return len(leaves) == len(self.refs) and all(r() is leaf for r, leaf in zip(self.refs, leaves))

    def remember(self, leaves: list) -> None:
        concrete = all(isinstance(leaf, jax.Array) and not is_traced(leaf) for leaf in leaves)
        self.refs = tuple(weakref.ref(leaf) for leaf in leaves) if concrete else ()

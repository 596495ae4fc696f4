"""Validation of the predictors' inputs and the flat layouts they compute in.

Every check names the argument it refuses. Checks on *values* (finite, symmetric, non-negative
times) run only on concrete arrays; under ``jit`` only shapes are checked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.finite import finite_flags, is_traced

ArrayLike = Union[jax.Array, np.ndarray, float]


def concrete(x: Any) -> Optional[np.ndarray]:
    """The value of ``x`` as numpy, or ``None`` while tracing (value checks are then skipped)."""
    if is_traced(x):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def as_float(x: Any, name: str) -> jax.Array:
    if x is None:
        raise ValueError(f"{name} is None; pass an array")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(f"{name} has complex dtype {x.dtype}; kernels and targets must be real")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def working_dtype(*dtypes: Any) -> Any:
    """The common float dtype, at least float32: half precision cannot hold a factorization."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def check_finite(x: jax.Array, name: str) -> None:
    if is_traced(x) or not jnp.issubdtype(x.dtype, jnp.inexact) or finite_flags([x])[0]:
        return
    value = np.asarray(x)
    if not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise ValueError(
            f"{name} (shape {tuple(x.shape)}) has {bad} non-finite entries (NaN or inf); "
            "recompute it (float64 with jax_enable_x64 helps when the kernel overflows)"
        )


def check_positive(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    v = concrete(value)
    if v is None:
        return
    if v.ndim or not np.isfinite(v) or not v > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")


def check_non_negative(value: Any, name: str) -> None:
    v = concrete(value)
    if v is None:
        return
    if v.ndim or not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative number; got {value!r}")


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _reshaped(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # An eager reshape is a dispatch even when it changes nothing (most calls).
    return x if tuple(x.shape) == tuple(shape) else x.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a training set's kernel and targets map to flat matrices.

    Per-output kernels work on ``(N, N)`` with targets ``(N, C)``, ``C = prod(out)``; full kernels
    on ``(N·O, N·O)`` with targets ``(N·O, 1)``.
    """

    n: int
    out_shape: tuple[int, ...]
    full: bool

    @property
    def n_out(self) -> int:
        return int(math.prod(self.out_shape))

    @property
    def size(self) -> int:
        """``N·O``: the number of entries the loss averages over."""
        return self.n * self.n_out

    def targets(self, y: jax.Array) -> jax.Array:
        m = y.shape[0]
        return _reshaped(y, (m * self.n_out, 1) if self.full else (m, self.n_out))

    def outputs(self, f: jax.Array, m: int) -> jax.Array:
        """``(..., rows, C)`` flat predictions back to ``(..., m, *out)``."""
        return _reshaped(f, f.shape[:-2] + (m,) + self.out_shape)

    def kernel(self, k: jax.Array) -> jax.Array:
        """``(A, B)`` or ``(A, B, O, O)`` kernel to the flat ``(rows(A), rows(B))`` matrix."""
        if not self.full:
            return k
        a, b, o = k.shape[0], k.shape[1], self.n_out
        return jnp.transpose(k, (0, 2, 1, 3)).reshape(a * o, b * o)

    def covariance(self, c: jax.Array, m: int) -> jax.Array:
        """``(..., rows(m), rows(m))`` back to ``(..., m, m)`` or ``(..., m, m, O, O)``."""
        if not self.full:
            return c
        o = self.n_out
        lead = c.shape[:-2]
        c = c.reshape(lead + (m, o, m, o))
        nl = len(lead)
        return jnp.transpose(c, tuple(range(nl)) + (nl, nl + 2, nl + 1, nl + 3))


def _check_trace_axes(trace_axes: Optional[Sequence[int]], layout: Layout, y_ndim: int, k_name: str) -> None:
    """``trace_axes`` (neural-tangents' name) must describe the layout the kernel's shape implies."""
    if trace_axes is None:
        return
    try:
        axes = sorted({int(a) % y_ndim for a in trace_axes})
    except (TypeError, ZeroDivisionError):
        raise ValueError(f"trace_axes must be a tuple of output axes of y_train; got {trace_axes!r}") from None
    want = [] if layout.full else list(range(1, y_ndim))
    if axes != want:
        implied = "()" if layout.full else f"{tuple(range(1, y_ndim))} (every output axis)"
        raise ValueError(
            f"trace_axes={tuple(trace_axes)!r} does not match {k_name}: its shape implies "
            f"trace_axes={implied}. An (N, N) kernel is per output (the full kernel is K ⊗ I over "
            "all output axes); an (N, N, O, O) kernel has no traced axes"
        )


def train_layout(
    k: jax.Array, y: jax.Array, k_name: str, y_name: str, trace_axes: Optional[Sequence[int]] = None
) -> Layout:
    if k.ndim == 2:
        if k.shape[0] != k.shape[1]:
            raise ValueError(
                f"{k_name} must be square, (N, N) per output or (N, N, O, O) over outputs; got shape {tuple(k.shape)}"
            )
        n = k.shape[0]
        if y.ndim == 0 or y.shape[0] != n:
            raise ValueError(
                f"{y_name} must have one row per training point, shape ({n}, ...) to match "
                f"{k_name} {tuple(k.shape)}; got shape {tuple(y.shape)}"
            )
        layout = Layout(n, tuple(y.shape[1:]), False)
    elif k.ndim == 4:
        if k.shape[0] != k.shape[1] or k.shape[2] != k.shape[3]:
            raise ValueError(
                f"{k_name} with 4 axes must be (N, N, O, O) (an empirical kernel with "
                f"trace_axes=()); got shape {tuple(k.shape)}"
            )
        n, o = k.shape[0], k.shape[2]
        if y.shape != (n, o):
            raise ValueError(
                f"{y_name} must be (N, O) = ({n}, {o}) to match the full kernel {k_name} "
                f"{tuple(k.shape)}; got shape {tuple(y.shape)}. For other output shapes use a "
                "per-output kernel (trace_axes=(-1,)) or flatten the outputs"
            )
        layout = Layout(n, (o,), True)
    else:
        raise ValueError(
            f"{k_name} must be (N, N) per output or (N, N, O, O) over outputs; got shape "
            f"{tuple(k.shape)} ({k.ndim} axes)"
        )
    _check_trace_axes(trace_axes, layout, max(y.ndim, 1), k_name)
    return layout


def check_cross(k: jax.Array, layout: Layout, name: str, train_name: str = "k_train_train", finite: bool = True) -> int:
    """Validate a test-train kernel against the training layout (``finite``: its values too);
    returns M."""
    want = "(M, N, O, O)" if layout.full else "(M, N)"
    ok = k.ndim == (4 if layout.full else 2) and k.shape[1] == layout.n
    if ok and layout.full:
        ok = k.shape[2:] == (layout.n_out, layout.n_out)
    if not ok:
        raise ValueError(
            f"{name} must be {want} with N = {layout.n} training points"
            + (f" and O = {layout.n_out}" if layout.full else "")
            + f" (the layout of {train_name}); got shape {tuple(k.shape)}"
        )
    if finite:
        check_finite(k, name)
    return k.shape[0]


def check_square_test(k: jax.Array, layout: Layout, m: int, name: str) -> None:
    want = (m, m, layout.n_out, layout.n_out) if layout.full else (m, m)
    if tuple(k.shape) != want:
        raise ValueError(f"{name} must have shape {want} to match the test points; got {tuple(k.shape)}")
    check_finite(k, name)


def broadcast_outputs(f0: Any, shape: tuple[int, ...], dtype: Any, name: str) -> jax.Array:
    f0 = jnp.asarray(f0, dtype=dtype)
    try:
        return jnp.broadcast_to(f0, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {tuple(f0.shape)} does not broadcast to the output shape {shape}") from None


def times(t: Any, dtype: Any, allow_inf: bool = True) -> jax.Array:
    """Checked training times ``t`` (steps of ``learning_rate``) as an array of ``dtype``."""
    t = jnp.asarray(t, dtype=dtype)
    value = concrete(t)
    if value is not None:
        if np.any(np.isnan(value)):
            raise ValueError("t has NaN entries; pass steps ≥ 0 (t=None for t → ∞)")
        if not allow_inf and np.any(np.isinf(value)):
            raise ValueError("t has infinite entries; pass t=None for t → ∞")
        if np.any(value < 0):
            raise ValueError(f"t must be non-negative (training steps); got min {value.min()}")
    return t


def train_inputs(k_train_train: Any, y_train: Any, trace_axes: Optional[Sequence[int]] = None):
    """Checked training kernel and targets in one float dtype: ``(k, y, dtype, layout)``."""
    k = as_float(k_train_train, "k_train_train")
    y = as_float(y_train, "y_train")
    dtype = working_dtype(k.dtype, y.dtype)
    k, y = k.astype(dtype), y.astype(dtype)
    layout = train_layout(k, y, "k_train_train", "y_train", trace_axes)
    check_finite(y, "y_train")
    return k, y, dtype, layout


class Initial(NamedTuple):
    """Initial outputs in the flat layout and which sets to return.

    ``f0`` is zeros when ``fx_train_0=None`` (train outputs not returned); ``ft0`` and ``kt`` are
    empty ``(0, ·)`` arrays when no test outputs are asked (one code path).
    """

    f0: jax.Array
    ft0: jax.Array
    kt: jax.Array
    m: Optional[int]
    train: bool
    test: bool


def initial_outputs(
    layout: Layout, y_shape, dtype, fx_train_0, fx_test_0, k_test_train, check_test_kernel: bool = True
) -> Initial:
    """neural-tangents' conventions: ``None`` initial outputs skip that set. ``check_test_kernel=False``
    leaves the finiteness of ``k_test_train`` to :func:`check_test_outputs` (for predictors whose
    test outputs are linear in it: any non-finite entry makes them non-finite)."""
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError(
            "fx_train_0 and fx_test_0 are both None: nothing to predict (None skips that set's "
            "outputs; pass 0. for zero initial outputs)"
        )
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError("fx_test_0 was given without k_test_train; pass the test-train kernel")
    train = fx_train_0 is not None
    f0 = layout.targets(broadcast_outputs(0.0 if fx_train_0 is None else fx_train_0, y_shape, dtype, "fx_train_0"))
    if k_test_train is not None:
        kt = as_float(k_test_train, "k_test_train").astype(dtype)
        m = check_cross(kt, layout, "k_test_train", finite=check_test_kernel)
    if fx_test_0 is None:
        return Initial(f0, jnp.zeros((0, f0.shape[1]), dtype), jnp.zeros((0, f0.shape[0]), dtype), None, train, False)
    ft0 = layout.targets(broadcast_outputs(fx_test_0, (m,) + layout.out_shape, dtype, "fx_test_0"))
    return Initial(f0, ft0, layout.kernel(kt), m, train, True)


def check_test_outputs(init: Initial, test: jax.Array, k_test_train: Any) -> None:
    """After a call made with ``check_test_kernel=False``: one reduction of the (small) test outputs
    instead of one over ``k_test_train``; the error still names the kernel."""
    if init.test and not is_traced(test) and not finite_flags([test])[0]:
        check_finite(jnp.asarray(k_test_train), "k_test_train")


def returned(init: Initial, train: Any, test: Any) -> Any:
    """``(fx_train_t, fx_test_t)``, or the one set that was asked for."""
    if init.train and init.test:
        return train, test
    return train if init.train else test


# --------------------------------------------------------------------------------------------
# Kernels given as named tuples or by a kernel function
# --------------------------------------------------------------------------------------------


def has_kernel(kernels: Any, name: str) -> bool:
    if isinstance(kernels, (jax.Array, np.ndarray)):
        return True
    if isinstance(kernels, Mapping):
        return kernels.get(name) is not None
    return getattr(kernels, name, None) is not None


def pick(kernels: Any, name: str, arg: str) -> Union[jax.Array, np.ndarray]:
    if isinstance(kernels, (jax.Array, np.ndarray)):
        return kernels
    if isinstance(kernels, Mapping):
        if kernels.get(name) is not None:
            return kernels[name]
    elif getattr(kernels, name, None) is not None:
        return getattr(kernels, name)
    raise ValueError(f"{arg} has no {name!r} kernel; pass an array or a (named tuple / dict) with .{name}")


def call_kernel_fn(kernel_fn: Callable, x1: Any, x2: Any, names: Sequence[str], kwargs: Mapping) -> dict:
    out = kernel_fn(x1, x2, get=tuple(names), **kwargs)
    return {name: pick(out, name, "kernel_fn's result") for name in names}

"""Predictions of training dynamics from kernels: gradient flow, GP inference, learning rates.

Everything here works on kernel *matrices* (empirical, Monte Carlo or infinite-width) and never
on a network, so it is framework-free.

Loss normalization and time axis (the same everywhere in the library)
---------------------------------------------------------------------
With ``N`` training points and ``O`` outputs per point the mean-squared-error loss is

    L(θ) = ½ · mean over all N·O entries of (f(x) − y)².

Gradient descent ``θ ← θ − η ∇L`` (optax ``sgd(η)``) is placed on the time axis ``t = k·η``
(step ``k``). As ``η → 0`` it follows gradient flow ``dθ/dt = −∇L``, under which the outputs of
a linearized model move as

    df/dt = −(1/(N·O)) Θ (f − y),

``Θ`` the per-output NTK (the output-averaged kernel of ``trace_axes=(-1,)``, whose full kernel
over outputs is ``Θ ⊗ I_O``). Counted in steps ``k = t/η`` this is ``df/dk = −η' Θ (f − y)`` with
``η' = η/(N·O)``, the form of Lee et al. 2019: ``e^{−η' Θ k} = e^{−Θ t/(N·O)}``. Hence for MSE
the prediction at a given ``t`` does not depend on ``η``; ``η`` matters for the momentum ODE
(:func:`gradient_descent`) and for stability (:func:`max_learning_rate`; the MSE predictors warn
when ``learning_rate`` is past the edge, where real gradient descent diverges).

Kernel shapes
-------------
* ``(N, N)``: per-output kernel; the full kernel is ``K ⊗ I_O`` and ``y_train`` is
  ``(N, *out)`` with any trailing output shape (``O = prod(out)``), or ``(N,)``.
* ``(N, N, O, O)``: full output-output kernel (an empirical kernel with ``trace_axes=()``);
  ``y_train`` must be ``(N, O)``. It is flattened to ``(N·O, N·O)`` internally.

Test kernels ``k_test_train`` follow the training layout: ``(M, N)`` or ``(M, N, O, O)``.
Covariances over test points are ``(M, M)`` (identical for every output) or ``(M, M, O, O)``.

Numerics
--------
Inputs are validated eagerly when they are concrete: finite entries, symmetric training kernel
(to ``sqrt(eps)`` relative), positive semi-definite (smallest eigenvalue at least
``−10·sqrt(eps)·λ_max``). ``diag_reg`` adds ``diag_reg · mean(diag K) · I`` to the training
kernel (``diag_reg · I`` with ``diag_reg_absolute_scale=True``). Eigenvalues at or below
``P·eps·λ_max`` (``P`` the flattened size) are treated as exact zeros: gradient flow does not
move those directions and ``t = None`` uses the pseudo-inverse, with a warning. Computations stay
in the inputs' dtype (float64 when ``jax_enable_x64`` is on and the kernels are float64).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsp_linalg
import numpy as np
from jax.experimental.ode import odeint

from ntk_adapters.outputs import Get, normalize_get, pack

ArrayLike = Union[jax.Array, np.ndarray, float]

__all__ = [
    "Gaussian",
    "gradient_descent_mse",
    "gradient_descent_mse_ensemble",
    "gp_inference",
    "gradient_descent",
    "max_learning_rate",
]


class Gaussian(NamedTuple):
    """Mean and covariance of a Gaussian over outputs.

    ``mean`` has the shape of the predicted outputs ``(..., M, *out)``; ``covariance`` is
    ``(..., M, M)`` for per-output kernels (the same for every output, outputs independent) or
    ``(..., M, M, O, O)`` for full kernels; leading ``...`` is the time axis when one was asked.
    """

    mean: jax.Array
    covariance: Optional[jax.Array]


# --------------------------------------------------------------------------------------------
# Validation and layouts
# --------------------------------------------------------------------------------------------


def _concrete(x: Any) -> Optional[np.ndarray]:
    """The value of ``x`` as numpy, or ``None`` while tracing (checks on values are skipped)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _as_float(x: Any, name: str) -> jax.Array:
    if x is None:
        raise ValueError(f"{name} is None; pass an array")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(f"{name} has complex dtype {x.dtype}; kernels and targets must be real")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_finite(x: jax.Array, name: str) -> None:
    value = _concrete(x)
    if value is not None and not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise ValueError(
            f"{name} (shape {tuple(x.shape)}) has {bad} non-finite entries (NaN or inf); "
            "recompute it (float64 with jax_enable_x64 helps when the kernel overflows)"
        )


def _eps(dtype: Any) -> float:
    return float(jnp.finfo(dtype).eps)


@dataclasses.dataclass(frozen=True)
class _Layout:
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

    def rows(self, m: int) -> int:
        return m * self.n_out if self.full else m

    def targets(self, y: jax.Array) -> jax.Array:
        m = y.shape[0]
        return y.reshape(m * self.n_out, 1) if self.full else y.reshape(m, self.n_out)

    def outputs(self, f: jax.Array, m: int) -> jax.Array:
        """``(..., rows, C)`` flat predictions back to ``(..., m, *out)``."""
        return f.reshape(f.shape[:-2] + (m,) + self.out_shape)

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


def _train_layout(k: jax.Array, y: jax.Array, k_name: str, y_name: str) -> _Layout:
    if k.ndim == 2:
        if k.shape[0] != k.shape[1]:
            raise ValueError(
                f"{k_name} must be square, (N, N) per output or (N, N, O, O) over outputs; "
                f"got shape {tuple(k.shape)}"
            )
        n = k.shape[0]
        if y.ndim == 0 or y.shape[0] != n:
            raise ValueError(
                f"{y_name} must have one row per training point, shape ({n}, ...) to match "
                f"{k_name} {tuple(k.shape)}; got shape {tuple(y.shape)}"
            )
        return _Layout(n, tuple(y.shape[1:]), False)
    if k.ndim == 4:
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
        return _Layout(n, (o,), True)
    raise ValueError(
        f"{k_name} must be (N, N) per output or (N, N, O, O) over outputs; got shape "
        f"{tuple(k.shape)} ({k.ndim} axes)"
    )


def _check_cross(k: jax.Array, layout: _Layout, name: str, train_name: str = "k_train_train") -> int:
    """Validate a test-train kernel against the training layout; returns M."""
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
    _check_finite(k, name)
    return k.shape[0]


def _check_square_test(k: jax.Array, layout: _Layout, m: int, name: str) -> None:
    want = (m, m, layout.n_out, layout.n_out) if layout.full else (m, m)
    if tuple(k.shape) != want:
        raise ValueError(f"{name} must have shape {want} to match the test points; got {tuple(k.shape)}")
    _check_finite(k, name)


def _broadcast_outputs(f0: Any, shape: tuple[int, ...], dtype: Any, name: str) -> jax.Array:
    f0 = jnp.asarray(f0, dtype=dtype)
    try:
        return jnp.broadcast_to(f0, shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {tuple(f0.shape)} does not broadcast to the output shape {shape}"
        ) from None


def _times(t: Any, dtype: Any) -> jax.Array:
    t = jnp.asarray(t, dtype=dtype)
    value = _concrete(t)
    if value is not None:
        if not np.all(np.isfinite(value)):
            raise ValueError("t must be finite; use t=None for t → infinity")
        if np.any(value < 0):
            raise ValueError(f"t must be non-negative (training times); got min {value.min()}")
    return t


@dataclasses.dataclass(frozen=True)
class _Factor:
    """Eigendecomposition (and Cholesky factor when nonsingular) of a training kernel.

    Built once by :func:`_factor`; predictions at any time reuse it. A pytree, so the jitted
    cores below take it as an argument. ``k`` is the symmetrized, regularized ``(P, P)``
    matrix, ``lam`` its eigenvalues with the numerically-zero ones set to 0 and ``keep`` marking
    the others, ``vecs`` the eigenvectors (columns), ``chol`` the lower Cholesky factor or
    ``None`` (singular, or traced).
    """

    k: jax.Array
    vecs: jax.Array
    lam: jax.Array
    keep: jax.Array
    chol: Optional[jax.Array]

    def coefficients(self, t: Optional[jax.Array], rate: Any) -> tuple[jax.Array, jax.Array]:
        """``(1 − e^{−rate λ t}, (1 − e^{−rate λ t}) / λ)`` per eigenvalue; ``t=None`` is the limit.

        ``t`` broadcasts against the eigenvalue axis (pass ``t[:, None]`` for many times).
        """
        safe = jnp.where(self.keep, self.lam, 1)
        if t is None:
            grown = self.keep.astype(self.lam.dtype)
            return grown, jnp.where(self.keep, 1 / safe, 0)
        # expm1 keeps 1 − e^{−a} accurate when a = rate·λ·t is tiny.
        grown = -jnp.expm1(-rate * t * self.lam)
        return grown, jnp.where(self.keep, grown / safe, 0)

    def solve(self, b: jax.Array) -> jax.Array:
        """``K⁻¹ b`` (Cholesky) or the pseudo-inverse when ``K`` is singular."""
        if self.chol is not None:
            return jsp_linalg.cho_solve((self.chol, True), b)
        _, g = self.coefficients(None, 0.0)
        return self.vecs @ (g[:, None] * (self.vecs.T @ b))


jax.tree_util.register_dataclass(
    _Factor, data_fields=["k", "vecs", "lam", "keep", "chol"], meta_fields=[]
)


@functools.partial(jax.jit, static_argnames="absolute")
def _factorize(k: jax.Array, diag_reg: Any, absolute: bool):
    p = k.shape[0]
    k = (k + k.T) / 2
    scale = 1.0 if absolute else jnp.trace(k) / p
    k = k + diag_reg * scale * jnp.eye(p, dtype=k.dtype)
    lam, vecs = jnp.linalg.eigh(k)
    keep = lam > p * jnp.finfo(k.dtype).eps * jnp.maximum(lam[-1], 0)
    return k, lam, vecs, keep


_cholesky = jax.jit(jnp.linalg.cholesky)


def _factor(
    k: jax.Array, name: str, diag_reg: float, absolute: bool, warn_singular: bool = True
) -> _Factor:
    """Validate a flat ``(P, P)`` training kernel and factor it (see :class:`_Factor`)."""
    p = k.shape[0]
    eps = _eps(k.dtype)
    if p == 0:
        raise ValueError(f"{name} is empty (no training points)")
    if diag_reg < 0:
        raise ValueError(f"diag_reg must be non-negative; got {diag_reg}")
    value = _concrete(k)
    if value is not None:
        scale = np.max(np.abs(value))
        asym = np.max(np.abs(value - value.T))
        if asym > math.sqrt(eps) * max(scale, np.finfo(value.dtype).tiny):
            raise ValueError(
                f"{name} is not symmetric: max |K − Kᵀ| = {asym:.3g} vs max |K| = {scale:.3g}. "
                "A training kernel must be evaluated on the same inputs twice "
                "(kernel_fn(x_train, None)); a test-train kernel is not a training kernel"
            )
    k, lam, vecs, keep = _factorize(k, diag_reg, absolute)
    fac = _Factor(k, vecs, jnp.where(keep, lam, 0), keep, None)
    lam_value = _concrete(lam)
    if lam_value is None:
        # Under tracing nothing can be decided from values: the pseudo-inverse path is used.
        return fac
    top = max(float(lam_value[-1]), 0.0)
    low = float(lam_value[0])
    tol = 10 * math.sqrt(eps) * top
    if low < -tol or (top == 0.0 and low < 0):
        raise ValueError(
            f"{name} is not positive semi-definite: smallest eigenvalue {low:.3g}, largest "
            f"{top:.3g} (tolerance {tol:.3g}). A kernel of one set of inputs must be PSD: "
            "check that it is a training kernel (same inputs on both sides), recompute it in "
            "float64, or pass diag_reg > 0 (adds diag_reg · mean diagonal to the diagonal)"
        )
    rank = int(np.count_nonzero(np.asarray(keep)))
    if rank == p:
        chol = _cholesky(k)
        if np.all(np.isfinite(np.asarray(chol))):
            return dataclasses.replace(fac, chol=chol)
    if warn_singular:
        warnings.warn(
            f"{name} is singular to working precision: {p - rank} of {p} eigenvalues are "
            f"treated as zero (at or below {p} · eps · λ_max). Gradient flow does not move those "
            "directions and t=None uses the pseudo-inverse; pass diag_reg > 0 for a ridge "
            "solution instead",
            stacklevel=3,
        )
    return fac


def _warn_unstable(fac: _Factor, learning_rate: Optional[float], size: int, name: str) -> None:
    """Warn when discrete gradient descent at ``learning_rate`` would diverge on this kernel."""
    lam = _concrete(fac.lam)
    if learning_rate is None or lam is None or not lam.size or lam.max() <= 0:
        return
    edge = 2.0 * size / float(lam.max())
    if learning_rate >= edge:
        warnings.warn(
            f"learning_rate={learning_rate:g} is at or past the stability edge 2·N·O/λ_max({name}) "
            f"= {edge:.4g}: gradient descent with this step diverges, while the prediction describes "
            "gradient flow (η → 0). Use a smaller learning rate (see max_learning_rate)",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Gradient descent on MSE: closed form
# --------------------------------------------------------------------------------------------


def _train_inputs(k_train_train, y_train):
    """Checked training kernel and targets in one float dtype: ``(k, y, dtype, layout)``."""
    k = _as_float(k_train_train, "k_train_train")
    y = _as_float(y_train, "y_train")
    dtype = jnp.result_type(k.dtype, y.dtype)
    k, y = k.astype(dtype), y.astype(dtype)
    layout = _train_layout(k, y, "k_train_train", "y_train")
    _check_finite(k, "k_train_train")
    _check_finite(y, "y_train")
    return k, y, dtype, layout


def _initial_outputs(layout, y_shape, dtype, fx_train_0, fx_test_0, k_test_train):
    """Initial train/test outputs and the test kernel in the flat layout; empty test arrays when no
    test kernel is given (one code path). Returns ``(f0, ft0, kt, m)`` with ``m`` the number of test
    points, or ``None`` without a test kernel."""
    f0 = layout.targets(_broadcast_outputs(fx_train_0, y_shape, dtype, "fx_train_0"))
    if k_test_train is None:
        if fx_test_0 is not None:
            raise ValueError("fx_test_0 was given without k_test_train; pass the test-train kernel")
        return f0, jnp.zeros((0, f0.shape[1]), dtype), jnp.zeros((0, f0.shape[0]), dtype), None
    kt = _as_float(k_test_train, "k_test_train").astype(dtype)
    m = _check_cross(kt, layout, "k_test_train")
    ft0 = 0.0 if fx_test_0 is None else fx_test_0
    ft0 = layout.targets(_broadcast_outputs(ft0, (m,) + layout.out_shape, dtype, "fx_test_0"))
    return f0, ft0, layout.kernel(kt), m


def gradient_descent_mse(
    k_train_train: ArrayLike,
    y_train: ArrayLike,
    learning_rate: Optional[float] = None,
    diag_reg: float = 0.0,
    *,
    diag_reg_absolute_scale: bool = False,
) -> Callable[..., Any]:
    """Outputs of a linearized model trained by gradient flow on MSE, in closed form.

    Lee et al. 2019 (eqs. 9–16) on the library's time axis ``t = k·η`` (loss ½·mean over all
    N·O entries, so the flow is ``df/dt = −Θ (f − y) / (N·O)``):

        f_t(X) = f_0(X) + (I − e^{−Θ t/(N·O)}) (Y − f_0(X)),
        f_t(x) = f_0(x) + Θ(x, X) Θ⁻¹ (I − e^{−Θ t/(N·O)}) (Y − f_0(X)).

    (Per step: ``e^{−η' Θ k}`` with ``η' = η/(N·O)`` and ``k = t/η``.)

    The eigendecomposition of ``Θ = k_train_train`` is computed once, here; the exponential is
    elementwise in its eigenbasis. ``t=None`` (t → ∞) is a Cholesky solve, not an exponential
    (the pseudo-inverse when Θ is singular, with a warning).

    Args:
      k_train_train: NTK of the training inputs, ``(N, N)`` per output or ``(N, N, O, O)``.
      y_train: targets ``(N, *out)`` (``(N, O)`` for a full kernel).
      learning_rate: ``η`` of the gradient descent being described, or ``None``; optax
        ``sgd(η)`` step ``k`` corresponds to ``t = k·η``. The flow at a given ``t`` does not
        depend on it; when given, a warning is issued if it is at or past
        ``max_learning_rate`` (discrete descent diverges there).
      diag_reg: adds ``diag_reg · mean(diag Θ)`` to the training kernel's diagonal (kernel ridge
        regression at ``t=None``); the training predictions then converge to ``y_train``
        under the regularized dynamics.
      diag_reg_absolute_scale: add ``diag_reg`` itself, not scaled by the mean diagonal.

    Returns:
      ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``: ``t`` a scalar,
      an array of times (outputs get ``t.shape`` in front) or ``None``; ``fx_train_0``
      broadcastable to ``y_train``; ``fx_test_0`` (``None`` means zeros) broadcastable to
      ``(M, *out)``; ``k_test_train`` ``(M, N)`` or ``(M, N, O, O)``. It returns ``fx_train_t``, or
      ``(fx_train_t, fx_test_t)`` when ``k_test_train`` is given. Jit-friendly in ``t`` and the
      arrays (``t=None`` is a static choice).

    Example::

      predict = gradient_descent_mse(ntk_train_train, y_train, learning_rate=0.1)   # (N, N), (N, O)
      steps = jnp.array([10, 100])
      fx_train, fx_test = predict(steps * 0.1, fx_train_0, fx_test_0, ntk_test_train)
      # fx_train: (2, N, O), fx_test: (2, M, O): after 10 and 100 steps of sgd(0.1)
    """
    k, y, dtype, layout = _train_inputs(k_train_train, y_train)
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive (or None); got {learning_rate}")
    fac = _factor(layout.kernel(k), "k_train_train", diag_reg, diag_reg_absolute_scale)
    _warn_unstable(fac, learning_rate, layout.size, "k_train_train")
    y_flat = layout.targets(y)
    rate = 1.0 / layout.size

    def predict_fn(
        t: Optional[ArrayLike] = None,
        fx_train_0: ArrayLike = 0.0,
        fx_test_0: Optional[ArrayLike] = None,
        k_test_train: Optional[ArrayLike] = None,
    ):
        f0, ft0, kt, m = _initial_outputs(layout, y.shape, dtype, fx_train_0, fx_test_0, k_test_train)
        test = m is not None

        if t is None:
            train, test_out = _mse_infinite(fac, y_flat, f0, ft0, kt)
        else:
            times = _times(t, dtype)
            train, test_out = _mse_at(fac, rate, times.reshape(-1), y_flat, f0, ft0, kt)
            train = train.reshape(times.shape + train.shape[1:])
            test_out = test_out.reshape(times.shape + test_out.shape[1:])
        train = layout.outputs(train, layout.n)
        if not test:
            return train
        return train, layout.outputs(test_out, m)

    return predict_fn


@jax.jit
def _mse_at(fac: _Factor, rate, times, y_flat, f0, ft0, kt):
    """Closed-form outputs at the 1-D ``times``: ``(T, P, C)`` train and ``(T, Q, C)`` test."""
    resid = fac.vecs.T @ (y_flat - f0)
    grown, g = fac.coefficients(times[:, None], rate)
    train = f0 + jnp.einsum("pq,tqc->tpc", fac.vecs, grown[:, :, None] * resid)
    test = ft0 + jnp.einsum("mq,tqc->tmc", kt @ fac.vecs, g[:, :, None] * resid)
    return train, test


@jax.jit
def _mse_infinite(fac: _Factor, y_flat, f0, ft0, kt):
    """Outputs at t → ∞: a Cholesky solve, or the pseudo-inverse for a singular kernel."""
    if fac.chol is not None:
        return jnp.broadcast_to(y_flat, f0.shape), ft0 + kt @ fac.solve(y_flat - f0)
    resid = fac.vecs.T @ (y_flat - f0)
    grown, g = fac.coefficients(None, 0.0)
    return f0 + fac.vecs @ (grown[:, None] * resid), ft0 + (kt @ fac.vecs) @ (g[:, None] * resid)


# --------------------------------------------------------------------------------------------
# Infinite ensembles: mean and covariance over initializations
# --------------------------------------------------------------------------------------------


def _pick(kernels: Any, name: str, arg: str) -> jax.Array:
    if isinstance(kernels, (jax.Array, np.ndarray)):
        return kernels
    if isinstance(kernels, Mapping):
        if name in kernels:
            return kernels[name]
    elif hasattr(kernels, name):
        value = getattr(kernels, name)
        if value is not None:
            return value
    raise ValueError(f"{arg} has no {name!r} kernel; pass an array or a (named tuple / dict) with .{name}")


def _call_kernel_fn(kernel_fn: Callable, x1: Any, x2: Any, names: Sequence[str], kwargs: Mapping) -> dict:
    out = kernel_fn(x1, x2, get=tuple(names), **kwargs)
    return {name: _pick(out, name, "kernel_fn's result") for name in names}


def _ensemble_moments(
    fac: _Factor,
    rate: float,
    t: Optional[jax.Array],
    theta_xX: Optional[jax.Array],
    k_xX: Optional[jax.Array],
    k_xx: Optional[jax.Array],
    prior: jax.Array,
    y_flat: jax.Array,
    compute_cov: bool,
) -> tuple[jax.Array, Optional[jax.Array]]:
    """Mean and covariance of ``f_t = f_0 − A f_0(X) + A Y`` with ``f_0 ~ GP(0, K)``.

    ``A = Θ(x, X) Θ⁻¹ (I − e^{−rate Θ t})``; ``prior`` is ``K(X, X)``. ``theta_xX=None`` means the
    training points themselves, where ``I − A = V diag(e^{−rate λ t}) Vᵀ``.
    """
    vecs = fac.vecs
    if theta_xX is None:
        grown, _ = fac.coefficients(t, rate)
        stay = 1 - grown  # 1 − (I − e^{−rate Θ t}) in the eigenbasis; 1 on the frozen directions
        mean = y_flat - vecs @ (stay[:, None] * (vecs.T @ y_flat))
        if not compute_cov:
            return mean, None
        rest = vecs * stay[None, :]  # (I − A) = V diag(stay) Vᵀ
        cov = rest @ (vecs.T @ prior @ vecs) @ rest.T
        return mean, (cov + cov.T) / 2
    if t is None and fac.chol is not None:
        a = fac.solve(theta_xX.T).T
    else:
        _, g = fac.coefficients(t, rate)
        a = ((theta_xX @ vecs) * g[None, :]) @ vecs.T
    mean = a @ y_flat
    if not compute_cov:
        return mean, None
    ak = a @ k_xX.T
    cov = k_xx - ak - ak.T + a @ prior @ a.T
    return mean, (cov + cov.T) / 2


@functools.partial(jax.jit, static_argnames="compute_cov")
def _ensemble_at(fac, rate, times, theta_xX, k_xX, k_xx, prior, y_flat, compute_cov):
    """:func:`_ensemble_moments` at every time of the 1-D ``times`` (leading axis)."""

    def at(s):
        return _ensemble_moments(fac, rate, s, theta_xX, k_xX, k_xx, prior, y_flat, compute_cov)

    return jax.vmap(at)(times)


@functools.partial(jax.jit, static_argnames="compute_cov")
def _ensemble_infinite(fac, theta_xX, k_xX, k_xx, prior, y_flat, compute_cov):
    return _ensemble_moments(fac, 0.0, None, theta_xX, k_xX, k_xx, prior, y_flat, compute_cov)


def gradient_descent_mse_ensemble(
    kernel_fn: Callable[..., Any],
    x_train: Any,
    y_train: ArrayLike,
    learning_rate: Optional[float] = None,
    diag_reg: float = 0.0,
    *,
    diag_reg_absolute_scale: bool = False,
    get: Get = ("nngp", "ntk"),
    **kernel_fn_kwargs: Any,
) -> Callable[..., Any]:
    """Mean and covariance over random initializations of infinitely many trained networks.

    At initialization the outputs are a Gaussian process ``f_0 ~ GP(0, K)`` (``K`` the NNGP, per
    output, outputs independent). A linearized network trained by gradient flow on MSE (loss
    ½·mean over N·O entries, time ``t = k·η``) gives, with
    ``A_t(x) = Θ(x, X) Θ⁻¹ (I − e^{−Θ t/(N·O)})`` (M×N):

        f_t(x) = f_0(x) − A_t f_0(X) + A_t Y,
        mean   = A_t Y,
        cov    = K(x, x) − A_t K(X, x) − K(x, X) A_tᵀ + A_t K(X, X) A_tᵀ   (Lee et al. 2019, eq. 16).

    ``'ntk'``: ``Θ`` is the NTK (all layers trained). ``'nngp'``: ``Θ`` is replaced by ``K``
    itself, the dynamics of training only a readout layer whose features give the NNGP; then
    ``cov = K(x,x) − K(x,X) K⁻¹ (I − e^{−2 K t/(N·O)}) K(X,x)``, which at ``t = ∞`` is the exact
    Bayesian GP posterior. ``diag_reg`` adds ``diag_reg · mean diagonal`` to the training block of
    both kernels, everywhere it appears (for ``'nngp'`` at ``t = ∞``: GP regression with that
    observation-noise variance).

    Args:
      kernel_fn: ``kernel_fn(x1, x2=None, get=('nngp', 'ntk'), **kernel_fn_kwargs)`` returning a
        named tuple (or dict) of ``(N1, N2)`` per-output or ``(N1, N2, O, O)`` kernels; called
        with ``x2=None`` for a kernel of ``x1`` with itself.
      x_train: training inputs ``(N, ...)``.
      y_train: targets ``(N, *out)``.
      learning_rate: ``η`` or ``None``; optax ``sgd(η)`` step ``k`` is ``t = k·η`` (only checked
        for stability, as in :func:`gradient_descent_mse`).
      diag_reg, diag_reg_absolute_scale: as in :func:`gradient_descent_mse`.
      get: kernels the predictions may use; the training kernels for these are computed here,
        once (``'ntk'`` also needs the NNGP, for the covariance).

    Returns:
      ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``: ``t`` scalar, array (outputs
      get ``t.shape`` in front) or ``None`` (t → ∞); ``x_test=None`` predicts on the training
      points; ``get`` a name or tuple (default: the constructor's). Each requested kernel gives the
      mean ``(..., M, *out)``, or with ``compute_cov`` a :class:`Gaussian` whose covariance is
      ``(..., M, M)`` (``(..., M, M, O, O)`` for full kernels); a single name returns that value, a
      tuple a named tuple (see ``ntk_adapters.outputs.pack``).

    Example::

      predict = gradient_descent_mse_ensemble(kernel_fn, x_train, y_train)   # (N, d), (N, O)
      out = predict(t=None, x_test=x_test, get='ntk', compute_cov=True)
      out.mean.shape, out.covariance.shape     # (M, O), (M, M)
    """
    names, _ = normalize_get(get)
    need = ("nngp", "ntk") if "ntk" in names else ("nngp",)
    ktt = _call_kernel_fn(kernel_fn, x_train, None, need, kernel_fn_kwargs)
    y = _as_float(y_train, "y_train")
    dtype = jnp.result_type(y.dtype, *(jnp.asarray(v).dtype for v in ktt.values()))
    y = y.astype(dtype)
    ktt = {n: _as_float(v, f"kernel_fn(x_train).{n}").astype(dtype) for n, v in ktt.items()}
    layout = _train_layout(ktt["nngp"], y, "kernel_fn(x_train).nngp", "y_train")
    _check_finite(y, "y_train")
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive (or None); got {learning_rate}")
    facs = {}
    for n, v in ktt.items():
        if v.shape != ktt["nngp"].shape:
            raise ValueError(
                f"kernel_fn(x_train).{n} has shape {tuple(v.shape)} but .nngp has "
                f"{tuple(ktt['nngp'].shape)}; both kernels must share a layout"
            )
        _check_finite(v, f"kernel_fn(x_train).{n}")
        facs[n] = _factor(layout.kernel(v), f"kernel_fn(x_train).{n}", diag_reg, diag_reg_absolute_scale)
    for n in names:
        _warn_unstable(facs[n], learning_rate, layout.size, f"kernel_fn(x_train).{n}")
    prior = facs["nngp"].k
    y_flat = layout.targets(y)
    rate = 1.0 / layout.size
    default_get = get

    def predict_fn(
        t: Optional[ArrayLike] = None,
        x_test: Any = None,
        get: Get = None,
        compute_cov: bool = False,
    ):
        req, _ = normalize_get(default_get if get is None else get)
        missing = [n for n in req if n not in names]
        if missing:
            raise ValueError(
                f"get={get!r} asks for {missing}, but this predictor was built with get={default_get!r}; "
                "pass get=... to gradient_descent_mse_ensemble"
            )
        if x_test is None:
            m = layout.n
            cross = {n: None for n in req}
            k_xX = k_xx = None
        else:
            cross_names = tuple(sorted(set(req) | ({"nngp"} if compute_cov else set())))
            cross = _call_kernel_fn(kernel_fn, x_test, x_train, cross_names, kernel_fn_kwargs)
            cross = {n: _as_float(v, f"kernel_fn(x_test, x_train).{n}").astype(dtype) for n, v in cross.items()}
            m = None
            for n, v in cross.items():
                m = _check_cross(v, layout, f"kernel_fn(x_test, x_train).{n}", "kernel_fn(x_train)")
            cross = {n: layout.kernel(v) for n, v in cross.items()}
            k_xX = cross.get("nngp")
            k_xx = None
            if compute_cov:
                k_xx = _as_float(
                    _call_kernel_fn(kernel_fn, x_test, None, ("nngp",), kernel_fn_kwargs)["nngp"],
                    "kernel_fn(x_test).nngp",
                ).astype(dtype)
                _check_square_test(k_xx, layout, m, "kernel_fn(x_test).nngp")
                k_xx = layout.kernel(k_xx)
        times = None if t is None else _times(t, dtype)

        values = {}
        for n in req:
            args = (cross[n], k_xX, k_xx, prior, y_flat)
            if times is None:
                mean, cov = _ensemble_infinite(facs[n], *args, compute_cov=compute_cov)
            else:
                mean, cov = _ensemble_at(facs[n], rate, times.reshape(-1), *args, compute_cov=compute_cov)
                mean = mean.reshape(times.shape + mean.shape[1:])
                if compute_cov:
                    cov = cov.reshape(times.shape + cov.shape[1:])
            mean = layout.outputs(mean, m)
            values[n] = Gaussian(mean, layout.covariance(cov, m)) if compute_cov else mean
        return pack(get if get is not None else default_get, values)

    return predict_fn


# --------------------------------------------------------------------------------------------
# GP inference
# --------------------------------------------------------------------------------------------


def gp_inference(
    k_train_train: Any,
    y_train: ArrayLike,
    diag_reg: float = 0.0,
    *,
    diag_reg_absolute_scale: bool = False,
) -> Callable[..., Any]:
    """Exact Gaussian-process posterior with a kernel (NNGP or NTK) as prior covariance.

    For a prior ``f ~ GP(0, K)`` and observations ``Y = f(X) + noise`` with noise variance
    ``σ² = diag_reg · mean(diag K)`` (``diag_reg`` itself with ``diag_reg_absolute_scale``):

        mean(x) = K(x, X) (K(X, X) + σ² I)⁻¹ Y,
        cov(x)  = K(x, x) − K(x, X) (K(X, X) + σ² I)⁻¹ K(X, x).

    With ``'nngp'`` this is Bayesian inference with an infinitely wide network prior (equal to the
    ``t=None`` NNGP ensemble of :func:`gradient_descent_mse_ensemble`); with ``'ntk'`` the NTK is
    used as if it were a prior covariance (its mean equals the ``t=None`` NTK ensemble mean, its
    covariance does not equal that ensemble's).

    Args:
      k_train_train: ``(N, N)`` / ``(N, N, O, O)`` kernel (used for every requested name), or a
        named tuple / dict / ``Kernel`` with fields ``nngp`` and/or ``ntk``.
      y_train: targets ``(N, *out)``.
      diag_reg, diag_reg_absolute_scale: observation-noise variance, as above.

    Returns:
      ``predict(get=None, k_test_train=None, k_test_test=None)`` returning, per requested name, a
      :class:`Gaussian`: mean ``(M, *out)`` and covariance ``(M, M)`` (``(M, M, O, O)`` for full
      kernels), the covariance ``None`` unless ``k_test_test`` is given. ``k_test_train=None``
      predicts at the training points (then the covariance is always computed). ``get=None``
      means every kernel available.

    Example::

      predict = gp_inference(kernels_train, y_train, diag_reg=1e-4)   # .nngp (N, N), y (N, O)
      post = predict('nngp', kernels_test_train, kernels_test_test)
      post.mean.shape, post.covariance.shape   # (M, O), (M, M)
    """
    y = _as_float(y_train, "y_train")
    bare = isinstance(k_train_train, (jax.Array, np.ndarray))
    available = ("nngp", "ntk")
    if bare:
        kernels = {n: k_train_train for n in available}
    else:
        kernels = {}
        for n in available:
            try:
                kernels[n] = _pick(k_train_train, n, "k_train_train")
            except ValueError:
                pass
        if not kernels:
            raise ValueError(
                "k_train_train must be an array or carry .nngp and/or .ntk; got "
                f"{type(k_train_train).__name__}"
            )
        available = tuple(kernels)
    dtype = jnp.result_type(y.dtype, *(jnp.asarray(v).dtype for v in kernels.values()))
    y = y.astype(dtype)
    kernels = {n: _as_float(v, f"k_train_train.{n}").astype(dtype) for n, v in kernels.items()}
    first = next(iter(kernels.values()))
    layout = _train_layout(first, y, "k_train_train", "y_train")
    _check_finite(y, "y_train")
    facs: dict[str, _Factor] = {}
    for n, v in kernels.items():
        label = "k_train_train" if bare else f"k_train_train.{n}"
        if v.shape != first.shape:
            raise ValueError(f"{label} has shape {tuple(v.shape)}, expected {tuple(first.shape)}")
        if bare and facs:
            facs[n] = next(iter(facs.values()))
            continue
        _check_finite(v, label)
        facs[n] = _factor(layout.kernel(v), label, diag_reg, diag_reg_absolute_scale)
    y_flat = layout.targets(y)

    def predict(get: Get = None, k_test_train: Any = None, k_test_test: Any = None):
        names, _ = normalize_get(available if get is None else get, available)
        values = {}
        for n in names:
            fac = facs[n]
            k_train = layout.kernel(kernels[n])
            if k_test_train is None:
                m, k_xX, k_xx = layout.n, k_train, k_train
            else:
                k_xX = _as_float(_pick(k_test_train, n, "k_test_train"), f"k_test_train.{n}").astype(dtype)
                m = _check_cross(k_xX, layout, f"k_test_train.{n}")
                k_xX = layout.kernel(k_xX)
                k_xx = None
                if k_test_test is not None:
                    k_xx = _as_float(_pick(k_test_test, n, "k_test_test"), f"k_test_test.{n}").astype(dtype)
                    _check_square_test(k_xx, layout, m, f"k_test_test.{n}")
                    k_xx = layout.kernel(k_xx)
            mean, cov = _posterior(fac, y_flat, k_xX, k_xx)
            mean = layout.outputs(mean, m)
            values[n] = Gaussian(mean, None if cov is None else layout.covariance(cov, m))
        return pack(available if get is None else get, values, available)

    return predict


@jax.jit
def _posterior(fac: _Factor, y_flat, k_xX, k_xx):
    mean = k_xX @ fac.solve(y_flat)
    if k_xx is None:
        return mean, None
    cov = k_xx - k_xX @ fac.solve(k_xX.T)
    return mean, (cov + cov.T) / 2


# --------------------------------------------------------------------------------------------
# Gradient descent on any loss: ODE in function space
# --------------------------------------------------------------------------------------------


def gradient_descent(
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    k_train_train: ArrayLike,
    y_train: ArrayLike,
    learning_rate: float,
    momentum: Optional[float] = None,
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    mxstep: int = 100_000,
) -> Callable[..., Any]:
    """Outputs of a linearized model trained by gradient flow on any loss, by ODE integration.

    On the library's time axis ``t = k·η`` (optax ``sgd(η)`` step ``k``) parameters follow
    ``dθ/dt = −∇_θ loss(f(θ), y)``, so in function space

        df(X)/dt = −Θ(X, X) ∇_f loss,      df(x)/dt = −Θ(x, X) ∇_f loss,

    with ``∇_f loss`` the gradient of ``loss`` with respect to the training outputs. The loss sets
    its own normalization: ``loss = ½·mean((f − y)²)`` reproduces :func:`gradient_descent_mse`.
    Without momentum the flow at a given ``t`` does not depend on ``η``.

    Momentum ``μ`` (heavy ball, optax ``sgd(η, momentum=μ)``: ``v ← μ v + g``, ``θ ← θ − η v``).
    In function space the iteration is ``u_{k+1} = μ u_k + Θ ∇_f loss(f_k)``,
    ``f_{k+1} = f_k − η u_{k+1}``. With ``t = k·η`` (the library's time axis) its continuous
    limit is

        df/dt = −u,     du/dt = (Θ ∇_f loss(f) − (1 − μ) u) / η,     u(0) = 0,

    i.e. ``η f'' + (1 − μ) f' = −Θ ∇_f loss(f)`` with ``f'(0) = 0``. It agrees with the discrete
    iteration up to ``O(η)`` at fixed ``t``, includes the build-up of the velocity over about
    ``1/(1 − μ)`` steps, and as ``η → 0`` reduces to plain flow sped up by ``1/(1 − μ)``.

    Integration: ``jax.experimental.ode.odeint`` (adaptive Dormand–Prince 5(4) with error
    control), so accuracy is set by ``rtol``/``atol`` rather than a hand-picked step, the
    momentum ODE's fast ``(1 − μ)/η`` relaxation is resolved automatically, any output times are
    served from one integration, and it is jit- and reverse-mode-friendly. Default tolerances:
    ``sqrt(eps)/10`` of the dtype.

    Args:
      loss: ``loss(fx, y) -> scalar`` with ``fx`` and ``y`` shaped like ``y_train``.
      k_train_train: NTK ``(N, N)`` per output or ``(N, N, O, O)``.
      y_train: targets ``(N, *out)`` (``(N, O)`` for a full kernel; one-hot labels for
        cross-entropy).
      learning_rate: ``η`` (the inertia ``η`` of the momentum ODE; unused without momentum).
      momentum: ``μ`` in ``[0, 1)``, or ``None`` for plain gradient flow.
      rtol, atol, mxstep: integrator tolerances and step limit.

    Returns:
      ``predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None)``: ``t`` a non-negative
      scalar or array (outputs get ``t.shape`` in front; ``t=None`` is refused, there is no closed
      form at infinity for a general loss). Returns ``fx_train_t`` or ``(fx_train_t, fx_test_t)``.

    Example::

      xent = lambda fx, y: -jnp.mean(jnp.sum(y * jax.nn.log_softmax(fx), -1))
      predict = gradient_descent(xent, ntk_train_train, y_onehot, learning_rate=1.0)
      fx_train = predict(jnp.linspace(0., 10., 5))        # (5, N, O)
    """
    k, y, dtype, layout = _train_inputs(k_train_train, y_train)
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate}")
    if momentum is not None and not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1) (or None); got {momentum}")
    # Validates symmetry and PSD; the factorization itself is not needed by the ODE.
    fac = _factor(layout.kernel(k), "k_train_train", 0.0, False, warn_singular=False)
    k_flat = fac.k
    tol = math.sqrt(_eps(dtype)) / 10
    rtol = tol if rtol is None else rtol
    atol = tol if atol is None else atol

    def grad_flat(f_flat: jax.Array) -> jax.Array:
        fx = layout.outputs(f_flat, layout.n)
        g = jax.grad(lambda fx_: jnp.asarray(loss(fx_, y)).astype(dtype).reshape(()))(fx)
        return layout.targets(g)

    friction = None if momentum is None else 1.0 - momentum

    def dynamics(state, _, kt):
        if friction is None:
            g = grad_flat(state[0])
            return (-(k_flat @ g), -(kt @ g))
        f, ft, u, ut = state
        g = grad_flat(f)
        return (
            -u,
            -ut,
            (k_flat @ g - friction * u) / learning_rate,
            (kt @ g - friction * ut) / learning_rate,
        )

    @jax.jit
    def integrate(flat_t, f0, ft0, kt):
        state0 = (f0, ft0) if friction is None else (f0, ft0, jnp.zeros_like(f0), jnp.zeros_like(ft0))
        order = jnp.argsort(flat_t)
        sorted_t = flat_t[order]
        # odeint interpolates inside its last step; a request at t = 0 comes before any step
        # (0/0), so it is asked at the smallest positive time and then set to the initial state.
        at_start = sorted_t == 0
        grid = jnp.concatenate(
            [jnp.zeros((1,), dtype), jnp.where(at_start, jnp.finfo(dtype).tiny, sorted_t)]
        )
        sol = odeint(dynamics, state0, grid, kt, rtol=rtol, atol=atol, mxstep=mxstep)
        inverse = jnp.argsort(order)

        def pick(path, start):
            return jnp.where(at_start[:, None, None], start[None], path[1:])[inverse]

        return pick(sol[0], f0), pick(sol[1], ft0)

    def predict_fn(
        t: ArrayLike,
        fx_train_0: ArrayLike = 0.0,
        fx_test_0: Optional[ArrayLike] = None,
        k_test_train: Optional[ArrayLike] = None,
    ):
        if t is None:
            raise ValueError(
                "gradient_descent integrates an ODE and needs finite times t; for t → ∞ with MSE "
                "use gradient_descent_mse"
            )
        times = _times(t, dtype)
        f0, ft0, kt, m = _initial_outputs(layout, y.shape, dtype, fx_train_0, fx_test_0, k_test_train)
        test = m is not None

        train, test_out = integrate(times.reshape(-1), f0, ft0, kt)
        train = layout.outputs(train.reshape(times.shape + f0.shape), layout.n)
        if not test:
            return train
        return train, layout.outputs(test_out.reshape(times.shape + ft0.shape), m)

    return predict_fn


# --------------------------------------------------------------------------------------------
# Learning rates
# --------------------------------------------------------------------------------------------


def max_learning_rate(
    k_train_train: ArrayLike,
    y_train_size: Optional[int] = None,
    momentum: float = 0.0,
    eps: float = 1e-12,
) -> Union[float, jax.Array]:
    """Largest stable learning rate of full-batch gradient descent on MSE (linearized model).

    With the library's loss (½·mean over ``y_train_size = N·O`` entries) one step maps the
    training residual as ``r ← (I − η Θ / (N·O)) r``, stable iff ``η λ_max(Θ) / (N·O) < 2``;
    with heavy-ball momentum ``μ`` the bound is ``2 (1 + μ)``. Hence

        η_max = 2 (1 + μ) · N·O / λ_max(Θ).

    Args:
      k_train_train: NTK ``(N, N)`` per output or ``(N, N, O, O)``.
      y_train_size: ``N·O``, the number of target entries the loss averages over; default ``N``
        for an ``(N, N)`` kernel (one output) and ``N·O`` for ``(N, N, O, O)``.
      momentum: heavy-ball ``μ`` in ``[0, 1)``.
      eps: floor on ``λ_max`` so a zero kernel gives a huge but finite rate.

    Example::

      lr = max_learning_rate(ntk_train_train, y_train.size)   # (N, N), (N, O) targets
      optax.sgd(0.5 * lr)                                      # safely below the edge
    """
    k = _as_float(k_train_train, "k_train_train")
    if k.ndim == 2 and k.shape[0] == k.shape[1]:
        flat, default = k, k.shape[0]
    elif k.ndim == 4 and k.shape[0] == k.shape[1] and k.shape[2] == k.shape[3]:
        layout = _Layout(k.shape[0], (k.shape[2],), True)
        flat, default = layout.kernel(k), layout.size
    else:
        raise ValueError(
            f"k_train_train must be (N, N) or (N, N, O, O); got shape {tuple(k.shape)}"
        )
    _check_finite(k, "k_train_train")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}")
    size = default if y_train_size is None else y_train_size
    if size <= 0:
        raise ValueError(f"y_train_size must be positive; got {y_train_size}")
    fac = _factor(flat, "k_train_train", 0.0, False, warn_singular=False)
    lam_max = jnp.maximum(jnp.max(fac.lam) if flat.shape[0] else 0.0, eps)
    rate = 2.0 * (1.0 + momentum) * size / lam_max
    value = _concrete(rate)
    return float(value) if value is not None else rate

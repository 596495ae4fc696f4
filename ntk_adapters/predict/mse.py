"""Gradient descent on MSE in closed form, and the largest stable learning rate."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Optional, Protocol, Sequence, Union

import jax
import jax.numpy as jnp

from ntk_adapters.predict.checks import (
    ArrayLike,
    Initial,
    Layout,
    as_float,
    check_positive,
    check_test_outputs,
    concrete,
    initial_outputs,
    returned,
    times,
    train_inputs,
)
from ntk_adapters.predict.linalg import (
    Cholesky,
    Eigen,
    EighPrecision,
    EighRoute,
    TrainKernel,
    _cho_solve,
    _eigen,
    _highest,
    _pinv_solve,
)


class PredictFn(Protocol):
    """``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``."""

    def __call__(
        self,
        t: Optional[ArrayLike] = None,
        fx_train_0: Optional[ArrayLike] = 0.0,
        fx_test_0: Optional[ArrayLike] = None,
        k_test_train: Optional[ArrayLike] = None,
    ) -> Union[jax.Array, tuple[jax.Array, jax.Array]]: ...


def warn_unstable(kernel: TrainKernel, learning_rate: Any, size: int, name: str, stacklevel: int = 3) -> None:
    """Warn when discrete gradient descent at ``learning_rate`` would diverge on this kernel."""
    lam_max, lr = kernel.lam_max(), concrete(learning_rate)
    if lam_max is None or lr is None or not lam_max > 0:
        return
    edge = 2.0 * size / lam_max
    if float(lr) >= edge:
        warnings.warn(
            f"learning_rate={float(lr):g} is at or past the stability edge 2·N·O/λ_max({name}) "
            f"= {edge:.4g}: gradient descent with this step diverges, while the prediction describes "
            "gradient flow. Use a smaller learning rate (see max_learning_rate)",
            stacklevel=stacklevel,
        )


def gradient_descent_mse(
    k_train_train: ArrayLike,
    y_train: ArrayLike,
    learning_rate: Optional[float] = None,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Optional[Sequence[int]] = None,
    *,
    eigh_precision: EighPrecision = "auto",
) -> PredictFn:
    """Outputs of a linearized model trained by gradient descent on MSE, in closed form.

    ``t`` counts steps of ``learning_rate`` (neural-tangents' convention): the physical time is
    ``τ = learning_rate · t`` and, with the loss ``½·mean`` over all ``N·O`` entries, gradient flow
    moves the outputs as ``df/dτ = −Θ (f − y)/(N·O)`` (Lee et al. 2019, eqs. 9–16)::

        f_t(X) = f_0(X) + (I − e^{−η t Θ/(N·O)}) (Y − f_0(X)),
        f_t(x) = f_0(x) + Θ(x, X) Θ⁻¹ (I − e^{−η t Θ/(N·O)}) (Y − f_0(X)),

    ``η = learning_rate``, ``Θ = k_train_train + diag_reg · mean(diag) · I``. So ``predict_fn(k)``
    is the flow after ``k`` steps of ``optax.sgd(η)``, which full-batch SGD follows up to O(η).

    ``t=None`` (t → ∞) is a Cholesky solve; finite times use the eigendecomposition of ``Θ``,
    computed once when first needed and reused (the exponential is elementwise in its basis).
    At ``t=None`` the training outputs are ``y_train`` (the regularized flow converges there).

    Args:
      k_train_train: NTK of the training inputs, ``(N, N)`` per output or ``(N, N, O, O)``.
      y_train: targets ``(N, *out)`` (``(N, O)`` for a full kernel).
      learning_rate: ``η``, the unit of ``t``; ``None`` means 1.0 (neural-tangents' default)
        without the stability check. When given, a warning is issued if it is at or past
        ``max_learning_rate`` (discrete descent diverges there; the flow does not).
      diag_reg: adds ``diag_reg · mean(diag Θ)`` to the training kernel's diagonal (kernel ridge
        regression at ``t=None``).
      diag_reg_absolute_scale: add ``diag_reg`` itself, not scaled by the mean diagonal.
      trace_axes: accepted for neural-tangents compatibility and checked against the kernel's
        shape (``(N, N)`` means every output axis is traced, ``(N, N, O, O)`` means ``()``).
      eigh_precision: how finite times eigendecompose a float32 kernel. ``'auto'`` (default):
        one float32 ``eigh``, as neural-tangents does, kept when the error it makes in this call's
        outputs (measured against a refined solve, a few matrix-vector products) is at most
        ``5e-3``, otherwise a float64 one, so float32 predictions stay within ``1e-2`` of float64
        ones whenever ``cond·eps ≤ 1e-2``; ``'float64'``: always in float64; ``'working'``: in
        the kernel's dtype, unchecked (errors of about ``cond·eps``). ``t=None`` is a Cholesky
        solve in the kernel's dtype either way.

    Returns:
      ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``: ``t`` a scalar,
      an array of steps (outputs get ``t.shape`` in front; ``inf`` entries are the limit) or
      ``None``; ``fx_train_0`` broadcastable to ``y_train``; ``fx_test_0`` broadcastable to
      ``(M, *out)``; ``k_test_train`` ``(M, N)`` or ``(M, N, O, O)``. ``fx_train_0=None`` skips
      the training outputs (zeros are used as their initial value), ``fx_test_0=None`` skips the
      test outputs. Returns ``(fx_train_t, fx_test_t)``, or the one that was asked for.
      Jit-friendly in ``t`` and the arrays.

    Example::

      predict_fn = gradient_descent_mse(ntk_train_train, y_train, learning_rate=0.1)  # (N, N), (N, O)
      fx_train, fx_test = predict_fn(jnp.array([10, 100]), fx_train_0, fx_test_0, ntk_test_train)
      # (2, N, O), (2, M, O): after 10 and 100 steps of optax.sgd(0.1)
    """
    k, y, dtype, layout = train_inputs(k_train_train, y_train, trace_axes)
    check_positive(learning_rate, "learning_rate", allow_none=True)
    lr = 1.0 if learning_rate is None else learning_rate
    kernel = TrainKernel(layout.kernel(k), diag_reg, diag_reg_absolute_scale, "k_train_train", eigh_precision)
    kernel.validate()
    if learning_rate is not None:
        warn_unstable(kernel, learning_rate, layout.size, "k_train_train")
    y_flat = layout.targets(y)
    rate = 1.0 / layout.size

    def predict_fn(
        t: Optional[ArrayLike] = None,
        fx_train_0: Optional[ArrayLike] = 0.0,
        fx_test_0: Optional[ArrayLike] = None,
        k_test_train: Optional[ArrayLike] = None,
    ):
        init = initial_outputs(layout, y.shape, dtype, fx_train_0, fx_test_0, k_test_train, check_test_kernel=False)
        if t is None:
            train, test = mse_limit(kernel, y_flat, init)
        else:
            steps = times(t, dtype)
            train, test = _mse_at(
                kernel.eigen_for(y_flat - init.f0, init.kt if init.test else None),
                rate * lr,
                steps.reshape(-1),
                y_flat,
                init.f0,
                init.ft0,
                init.kt,
                train=init.train,
                test=init.test,
            )
            train = train.reshape(steps.shape + train.shape[1:])
            test = test.reshape(steps.shape + test.shape[1:])
        train_out = layout.outputs(train, layout.n) if init.train else None
        test_out = layout.outputs(test, init.m) if init.test else None
        check_test_outputs(init, test, k_test_train)
        return returned(init, train_out, test_out)

    return predict_fn


@functools.partial(jax.jit, static_argnames=("train", "test"))
@_highest
def _mse_at(eig: Eigen, rate, steps, y_flat, f0, ft0, kt, train: bool, test: bool):
    """Closed-form outputs at the 1-D ``steps``: ``(T, P, C)`` train and ``(T, Q, C)`` test."""
    resid = eig.vecs.T @ (y_flat - f0)
    a = rate * steps[:, None] * eig.lam[None, :]
    # expm1 keeps 1 − e^{−a} accurate for tiny a; frozen (noise-level) modes do not move, also at
    # t = inf where 0·inf would be nan.
    grown = jnp.where(eig.keep, -jnp.expm1(-jnp.where(eig.keep, a, 0)), 0)
    n_t = steps.shape[0]
    out_train = jnp.zeros((n_t, 0, f0.shape[1]), f0.dtype)
    out_test = jnp.zeros((n_t,) + ft0.shape, ft0.dtype)
    if train:
        out_train = f0 + jnp.einsum("pq,tqc->tpc", eig.vecs, grown[:, :, None] * resid)
    if test:
        g = jnp.where(eig.keep, grown / jnp.where(eig.keep, eig.lam, 1), 0)
        coef = g[:, :, None] * resid
        if n_t * f0.shape[1] <= kt.shape[0]:  # fewer right-hand sides than test points: skip kt @ V
            out_test = ft0 + jnp.einsum("mp,tpc->tmc", kt, jnp.einsum("pq,tqc->tpc", eig.vecs, coef))
        else:
            out_test = ft0 + jnp.einsum("mq,tqc->tmc", kt @ eig.vecs, coef)
    return out_train, out_test


@jax.jit
@_highest
def _limit_from_eigen(eig: Eigen, y_flat, f0, ft0, kt):
    """t → ∞ of a singular kernel: frozen directions stay, the others converge."""
    resid = eig.vecs.T @ (y_flat - f0)
    train = f0 + eig.vecs @ (eig.keep[:, None] * resid)
    return train, ft0 + kt @ _pinv_solve(eig, y_flat - f0)


@jax.jit
@_highest
def _limit_from_cholesky(factor, y_flat, f0, ft0, kt):
    return jnp.broadcast_to(y_flat, f0.shape), ft0 + kt @ _cho_solve(factor, y_flat - f0)


@functools.partial(jax.jit, static_argnames="route")
def _limit_traced(k, chol: Cholesky, y_flat, f0, ft0, kt, route: EighRoute):
    def singular(o):
        return _limit_from_eigen(_eigen(o[0], route), *o[2:])

    def regular(o):
        return _limit_from_cholesky(o[1].factor, *o[2:])

    return jax.lax.cond(chol.nonsingular, regular, singular, (k, chol, y_flat, f0, ft0, kt))


def mse_limit(kernel: TrainKernel, y_flat: jax.Array, init: Initial) -> tuple[jax.Array, jax.Array]:
    """Train and test outputs at t → ∞ (flat layout)."""
    if kernel.traced:
        return _limit_traced(kernel.k, kernel.cholesky(), y_flat, init.f0, init.ft0, init.kt, kernel._route())
    if kernel.nonsingular():
        return _limit_from_cholesky(kernel.cholesky().factor, y_flat, init.f0, init.ft0, init.kt)
    return _limit_from_eigen(kernel.eigen(), y_flat, init.f0, init.ft0, init.kt)


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

    With the loss ``½·mean`` over ``y_train_size = N·O`` entries one step maps the training
    residual as ``r ← (I − η Θ / (N·O)) r``, stable iff ``η λ_max(Θ) / (N·O) < 2``; with
    heavy-ball momentum ``μ`` the bound is ``2 (1 + μ)``. Hence

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
    k = as_float(k_train_train, "k_train_train")
    if k.ndim == 2 and k.shape[0] == k.shape[1]:
        flat, default = k, k.shape[0]
    elif k.ndim == 4 and k.shape[0] == k.shape[1] and k.shape[2] == k.shape[3]:
        layout = Layout(k.shape[0], (k.shape[2],), True)
        flat, default = layout.kernel(k), layout.size
    else:
        raise ValueError(f"k_train_train must be (N, N) or (N, N, O, O); got shape {tuple(k.shape)}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}")
    size = default if y_train_size is None else y_train_size
    if size <= 0:
        raise ValueError(f"y_train_size must be positive; got {y_train_size}")
    kernel = TrainKernel(flat, 0.0, False, "k_train_train", factor=False)
    lam = jax.jit(jnp.linalg.eigvalsh)(kernel.k)
    value = concrete(lam)
    if value is not None:
        top, low = max(float(value[-1]), 0.0), float(value[0])
        tol = 10 * math.sqrt(kernel.eps) * top
        if low < -tol:
            raise ValueError(
                f"k_train_train is not positive semi-definite: smallest eigenvalue {low:.3g}, "
                f"largest {top:.3g} (tolerance {tol:.3g}); pass a training kernel (same inputs on "
                "both sides)"
            )
    rate = 2.0 * (1.0 + momentum) * size / jnp.maximum(lam[-1], eps)
    value = concrete(rate)
    return float(value) if value is not None else rate

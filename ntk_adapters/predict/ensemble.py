"""Infinite ensembles of trained networks and Gaussian-process inference with NNGP / NTK kernels."""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.outputs import normalize_get, pack
from ntk_adapters.predict.checks import (
    ArrayLike,
    Layout,
    as_float,
    call_kernel_fn,
    check_cross,
    check_finite,
    check_positive,
    check_square_test,
    has_kernel,
    pick,
    times,
    train_layout,
    working_dtype,
)
from ntk_adapters.predict.linalg import (
    Eigen,
    EighPrecision,
    EighRoute,
    TrainKernel,
    _eigen,
    _highest,
)
from ntk_adapters.predict.mse import warn_unstable

EnsembleName = Literal["nngp", "ntk"]
GpName = Literal["nngp", "ntk", "ntkgp"]
EnsembleGet = Union[EnsembleName, Sequence[EnsembleName], None]
GpGet = Union[GpName, Sequence[GpName], None]

_GP_NAMES = ("nngp", "ntk", "ntkgp")


class Gaussian(NamedTuple):
    """Mean and covariance of a Gaussian over outputs.

    ``mean`` has the shape of the predicted outputs ``(..., M, *out)``; ``covariance`` is
    ``(..., M, M)`` for per-output kernels (the same for every output, outputs independent) or
    ``(..., M, M, O, O)`` for full kernels; leading ``...`` is the time axis when one was asked.
    """

    mean: jax.Array
    covariance: Optional[jax.Array]


def _sym(c: jax.Array) -> jax.Array:
    return (c + jnp.swapaxes(c, -1, -2)) / 2


# --------------------------------------------------------------------------------------------
# Moments in the flat layout
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("name", "compute_cov"))
@_highest
def _moments_at(eig: Eigen, rate, steps, y_flat, theta_xX, k_xX, k_xx, prior, name, compute_cov):
    """Mean and covariance of ``f_t = f_0 − A_t f_0(X) + A_t Y`` over ``f_0 ~ GP(0, K)`` at every
    entry of the 1-D ``steps`` (leading axis); ``theta_xX=None`` means the training points."""
    vecs, lam = eig.vecs, eig.lam
    coef_y = vecs.T @ y_flat
    cross = None if theta_xX is None else theta_xX @ vecs

    def at(s):
        a = jnp.where(eig.keep, rate * s * lam, 0)
        if cross is None:
            # I − A_t = V diag(e^{−a}) Vᵀ; frozen (noise-level) modes keep e^{−a} = 1.
            stay = jnp.where(eig.keep, jnp.exp(-a), 1)
            mean = y_flat - vecs @ (stay[:, None] * coef_y)
            if not compute_cov:
                return mean, None
            if name == "nngp":  # the prior is the regularized kernel itself: V diag(λ) Vᵀ
                return mean, _sym((vecs * (lam * stay**2)) @ vecs.T)
            rest = (vecs * stay) @ vecs.T
            return mean, _sym(rest @ prior @ rest.T)
        g = jnp.where(eig.keep, -jnp.expm1(-a) / jnp.where(eig.keep, lam, 1), 0)
        mean = (cross * g) @ coef_y
        if not compute_cov:
            return mean, None
        if name == "nngp":
            # 2A − A K Aᵀ collapses to K(x,X) K⁻¹ (I − e^{−2Kt}) K(X,x): one coefficient, no cancellation.
            h = jnp.where(eig.keep, -jnp.expm1(-2 * a) / jnp.where(eig.keep, lam, 1), 0)
            return mean, _sym(k_xx - (cross * h) @ cross.T)
        a_t = (cross * g) @ vecs.T
        ak = a_t @ k_xX.T
        return mean, _sym(k_xx - ak - ak.T + a_t @ prior @ a_t.T)

    return jax.vmap(at)(steps)


@functools.partial(jax.jit, static_argnames=("name", "compute_cov"))
@_highest
def _moments_solved(y_flat, theta_xX, k_xX, k_xx, prior, solved_y, solved_cross, name, compute_cov):
    """t → ∞ moments on test points from solves ``Θ⁻¹ Y`` and ``Θ⁻¹ Θ(X, x)`` (Cholesky or
    pseudo-inverse): ``'nngp'`` / ``'ntkgp'`` are GP posteriors, ``'ntk'`` the trained ensemble."""
    mean = theta_xX @ solved_y
    if not compute_cov:
        return mean, None
    if name in ("nngp", "ntkgp"):
        return mean, _sym(k_xx - theta_xX @ solved_cross)
    a_t = solved_cross.T
    ak = a_t @ k_xX.T
    return mean, _sym(k_xx - ak - ak.T + a_t @ prior @ a_t.T)


def _checked_outputs(y_flat, theta_xX, compute_cov):
    """What a float32 ``eigh`` is checked on (:meth:`TrainKernel.eigen_for`): the mean's solve
    ``Θ⁻¹ Y`` seen through ``Θ(x, X)``, and for a covariance also ``Θ⁻¹ Θ(X, x)`` (each block scaled
    to unit norm, so neither hides the other's error)."""
    if not compute_cov or theta_xX is None:
        return y_flat, theta_xX
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a), jnp.finfo(a.dtype).tiny)
    return jnp.concatenate([unit(y_flat), unit(theta_xX.T)], axis=1), theta_xX


@functools.partial(jax.jit, static_argnames=("name", "compute_cov", "route"))
def _train_limit_traced(k, chol, y_flat, prior, name, compute_cov, route: EighRoute):
    def regular(_):
        return y_flat, (jnp.zeros_like(prior) if compute_cov else None)

    def singular(_):
        eig = _eigen(k, route)
        mean, cov = _moments_at(
            eig,
            1.0,
            jnp.full((1,), jnp.inf, k.dtype),
            y_flat,
            None,
            None,
            None,
            prior,
            name=name,
            compute_cov=compute_cov,
        )
        return mean[0], (cov[0] if compute_cov else None)

    return jax.lax.cond(chol.nonsingular, regular, singular, None)


def _train_limit(kernel: TrainKernel, y_flat, prior, name, compute_cov):
    """t → ∞ on the training points: ``N(y_train, 0)``, or the flow's limit for a singular kernel."""
    if kernel.traced:
        return _train_limit_traced(kernel.k, kernel.cholesky(), y_flat, prior, name, compute_cov, kernel._route())
    if kernel.nonsingular():
        return y_flat, (jnp.zeros_like(prior) if compute_cov else None)
    inf = jnp.full((1,), jnp.inf, kernel.dtype)
    mean, cov = _moments_at(
        kernel.eigen(), 1.0, inf, y_flat, None, None, None, prior, name=name, compute_cov=compute_cov
    )
    return mean[0], (cov[0] if compute_cov else None)


def _test_limit(kernel: TrainKernel, y_flat, theta_xX, k_xX, k_xx, prior, name, compute_cov):
    solved_y = kernel.solve(y_flat)
    solved_cross = kernel.solve(theta_xX.T) if compute_cov else None
    return _moments_solved(
        y_flat, theta_xX, k_xX, k_xx, prior, solved_y, solved_cross, name=name, compute_cov=compute_cov
    )


# --------------------------------------------------------------------------------------------
# GP inference
# --------------------------------------------------------------------------------------------


def gp_inference(
    k_train_train: Any,
    y_train: ArrayLike,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Optional[Sequence[int]] = None,
) -> Callable[..., Any]:
    """Posteriors of infinitely wide networks at infinite training time, in closed form.

    With ``σ² = diag_reg · mean(diag)`` added to the training kernels (``diag_reg`` itself with
    ``diag_reg_absolute_scale``), ``K`` the NNGP and ``Θ`` the NTK, on test points ``x``:

    * ``'nngp'``: the Bayesian posterior of the infinitely wide network (NNGP prior, observation
      noise ``σ²``): mean ``K(x,X) (K + σ²)⁻¹ Y``, covariance ``K(x,x) − K(x,X) (K + σ²)⁻¹ K(X,x)``.
    * ``'ntk'``: the infinite ensemble of networks trained by gradient flow to convergence on MSE
      (Lee et al. 2019, eq. 16 at t → ∞): mean ``Θ(x,X) (Θ + σ²)⁻¹ Y``, covariance
      ``K(x,x) − A K(X,x) − K(x,X) Aᵀ + A K(X,X) Aᵀ`` with ``A = Θ(x,X) (Θ + σ²)⁻¹`` and the
      *unregularized* NNGP ``K(X,X)`` (the prior at initialization).
    * ``'ntkgp'``: the GP posterior with the NTK as prior covariance (He et al. 2020, "Bayesian
      deep ensembles via the neural tangent kernel").

    These are neural-tangents' three names and formulas; the solves are Cholesky solves.

    Args:
      k_train_train: ``(N, N)`` / ``(N, N, O, O)`` kernel (used for every requested name), or a
        named tuple / dict / ``Kernel`` with fields ``nngp`` and/or ``ntk``.
      y_train: targets ``(N, *out)``.
      diag_reg, diag_reg_absolute_scale: observation-noise variance, as above.
      trace_axes: neural-tangents' argument, checked against the kernel's shape.

    Returns:
      ``predict_fn(get=None, k_test_train=None, k_test_test=None)``. Per requested name: the mean
      ``(M, *out)``, or with ``k_test_test`` a :class:`Gaussian` whose covariance is ``(M, M)``
      (``(M, M, O, O)`` for full kernels). ``k_test_train=None`` gives the training points, where
      the posterior is ``N(y_train, 0)`` (pass any non-``None`` ``k_test_test``, e.g. ``True``, for
      the zero covariance; for the regularized posterior at the training points pass
      ``k_test_train=k_train_train``). ``k_test_test`` supplies the NNGP for ``'nngp'`` / ``'ntk'``
      and the NTK for ``'ntkgp'``. ``get=None`` means every kernel given (``'nngp'`` and
      ``'ntk'``); a single name returns that value, a tuple a named tuple.

    Example::

      predict_fn = gp_inference(kernels_train, y_train, diag_reg=1e-4)   # .nngp/.ntk (N, N), y (N, O)
      post = predict_fn('nngp', kernels_test_train, kernels_test_test)
      post.mean.shape, post.covariance.shape   # (M, O), (M, M)
      mean = predict_fn('ntk', kernels_test_train)                       # (M, O)
    """
    y = as_float(y_train, "y_train")
    bare = isinstance(k_train_train, (jax.Array, np.ndarray))
    present = ("nngp", "ntk") if bare else tuple(n for n in ("nngp", "ntk") if has_kernel(k_train_train, n))
    if not present:
        raise ValueError(
            f"k_train_train must be an array or carry .nngp and/or .ntk; got {type(k_train_train).__name__}"
        )
    raw = {
        n: as_float(pick(k_train_train, n, "k_train_train"), "k_train_train" if bare else f"k_train_train.{n}")
        for n in present
    }
    dtype = working_dtype(y.dtype, *(v.dtype for v in raw.values()))
    y = y.astype(dtype)
    raw = {n: v.astype(dtype) for n, v in raw.items()}
    first = raw[present[0]]
    layout = train_layout(first, y, "k_train_train", "y_train", trace_axes)
    check_finite(y, "y_train")
    kernels: dict[str, TrainKernel] = {}
    for n, v in raw.items():
        label = "k_train_train" if bare else f"k_train_train.{n}"
        if v.shape != first.shape:
            raise ValueError(f"{label} has shape {tuple(v.shape)}, expected {tuple(first.shape)}")
        if bare and kernels:
            kernels[n] = next(iter(kernels.values()))
            continue
        kernels[n] = TrainKernel(layout.kernel(v), diag_reg, diag_reg_absolute_scale, label)
        kernels[n].validate(stacklevel=4)
    allowed = present + (("ntkgp",) if "ntk" in present else ())
    y_flat = layout.targets(y)

    def flat(kernels_arg: Any, name: str, arg: str, m: Optional[int] = None) -> tuple[jax.Array, int]:
        label = arg if isinstance(kernels_arg, (jax.Array, np.ndarray)) else f"{arg}.{name}"
        k = as_float(pick(kernels_arg, name, arg), label).astype(dtype)
        if m is None:
            m = check_cross(k, layout, label)
        else:
            check_square_test(k, layout, m, label)
        return layout.kernel(k), m

    def predict_fn(get: GpGet = None, k_test_train: Any = None, k_test_test: Any = None):
        names, _ = normalize_get(present if get is None else get, _GP_NAMES)
        for n in names:
            if n not in allowed:
                raise ValueError(
                    f"get={get!r} asks for {n!r}, which needs k_train_train.{'nngp' if n == 'nngp' else 'ntk'}; "
                    f"k_train_train carries {present}"
                )
        values: dict[str, Union[jax.Array, Gaussian]] = {}
        for n in names:
            base = "nngp" if n == "nngp" else "ntk"
            if k_test_train is None:
                mean = layout.outputs(y_flat, layout.n)
                if k_test_test is None:
                    values[n] = mean
                else:
                    zeros = jnp.zeros((y_flat.shape[0],) * 2, dtype)
                    values[n] = Gaussian(mean, layout.covariance(zeros, layout.n))
                continue
            theta_xX, m = flat(k_test_train, base, "k_test_train")
            compute_cov = k_test_test is not None
            k_xX = k_xx = prior = None
            if compute_cov:
                if n == "ntk":
                    if (
                        bare
                        or "nngp" not in present
                        or not has_kernel(k_test_train, "nngp")
                        or isinstance(k_test_train, (jax.Array, np.ndarray))
                    ):
                        raise ValueError(
                            "the 'ntk' covariance (the trained ensemble) needs the NNGP as well as the "
                            "NTK: pass k_train_train and k_test_train with both .nngp and .ntk"
                        )
                    k_xX, _ = flat(k_test_train, "nngp", "k_test_train")
                    prior = _sym(layout.kernel(raw["nngp"]))
                k_xx, _ = flat(k_test_test, "ntk" if n == "ntkgp" else "nngp", "k_test_test", m)
            mean, cov = _test_limit(kernels[base], y_flat, theta_xX, k_xX, k_xx, prior, n, compute_cov)
            mean = layout.outputs(mean, m)
            values[n] = Gaussian(mean, layout.covariance(cov, m)) if compute_cov else mean
        return pack(present if get is None else get, values, _GP_NAMES)

    return predict_fn


# --------------------------------------------------------------------------------------------
# Infinite ensembles at any time
# --------------------------------------------------------------------------------------------


def gradient_descent_mse_ensemble(
    kernel_fn: Callable[..., Any],
    x_train: Any,
    y_train: ArrayLike,
    learning_rate: Optional[float] = None,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Optional[Sequence[int]] = None,
    *,
    get: EnsembleGet = ("nngp", "ntk"),
    eigh_precision: EighPrecision = "auto",
    **kernel_fn_kwargs: Any,
) -> Callable[..., Any]:
    """Mean and covariance over random initializations of infinitely many trained networks.

    At initialization the outputs are a Gaussian process ``f_0 ~ GP(0, K)`` (``K`` the NNGP, per
    output, outputs independent). A linearized network trained by gradient flow on MSE for ``t``
    steps of ``learning_rate = η`` (loss ½·mean over N·O entries; physical time ``η t``) gives,
    with ``A_t(x) = Θ(x, X) Θ⁻¹ (I − e^{−η t Θ/(N·O)})`` (M×N, ``Θ`` regularized),

        f_t(x) = f_0(x) − A_t f_0(X) + A_t Y,
        mean   = A_t Y,
        cov    = K(x, x) − A_t K(X, x) − K(x, X) A_tᵀ + A_t K(X, X) A_tᵀ   (Lee et al. 2019, eq. 16).

    ``'ntk'``: ``Θ`` is the NTK (all layers trained) with ``diag_reg`` added to it; the prior
    ``K(X, X)`` is the unregularized NNGP. ``'nngp'``: ``Θ`` is the NNGP itself (training only a
    readout whose features give the NNGP) and ``diag_reg`` acts as observation noise, so
    ``cov = K(x,x) − K(x,X) K⁻¹ (I − e^{−2η t K/(N·O)}) K(X,x)`` with ``K`` regularized, which at
    ``t = ∞`` is the exact Bayesian posterior. This is where neural-tangents puts ``diag_reg``.
    ``t=None`` uses Cholesky solves (equal to :func:`gp_inference`), finite ``t`` one
    eigendecomposition per kernel, computed when first needed and reused.

    Args:
      kernel_fn: ``kernel_fn(x1, x2=None, get=('nngp', 'ntk'), **kernel_fn_kwargs)`` returning a
        named tuple (or dict) of ``(N1, N2)`` per-output or ``(N1, N2, O, O)`` kernels; called
        with ``x2=None`` for a kernel of ``x1`` with itself.
      x_train: training inputs ``(N, ...)``.
      y_train: targets ``(N, *out)``.
      learning_rate: ``η``, the unit of ``t``; ``None`` means 1.0 without the stability check
        (as in :func:`gradient_descent_mse`).
      diag_reg, diag_reg_absolute_scale: as above.
      trace_axes: neural-tangents' argument, checked against the kernels' shape.
      get: kernels the predictions may use; their training kernels are computed here, once
        (``'ntk'`` also needs the NNGP, for the covariance).
      eigh_precision: as in :func:`gradient_descent_mse` (finite times of float32 kernels).

    Returns:
      ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``: ``t`` steps (scalar, array
      — outputs get ``t.shape`` in front — or ``None`` for t → ∞); ``x_test=None`` predicts on the
      training points (where ``t=None`` gives ``N(y_train, 0)``); ``get`` a name or tuple (default:
      the constructor's). Each requested kernel gives the mean ``(..., M, *out)``, or with
      ``compute_cov`` a :class:`Gaussian` whose covariance is ``(..., M, M)`` (``(..., M, M, O, O)``
      for full kernels); a single name returns that value, a tuple a named tuple.

    Example::

      predict_fn = gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, diag_reg=1e-4)
      nngp_mean, ntk_mean = predict_fn(x_test=x_test)                  # (M, O) each
      out = predict_fn(t=100., x_test=x_test, get='ntk', compute_cov=True)
      out.mean.shape, out.covariance.shape                               # (M, O), (M, M)
    """
    names, _ = normalize_get(get)
    need = ("nngp", "ntk") if "ntk" in names else ("nngp",)
    ktt = call_kernel_fn(kernel_fn, x_train, None, need, kernel_fn_kwargs)
    y = as_float(y_train, "y_train")
    dtype = working_dtype(y.dtype, *(jnp.asarray(v).dtype for v in ktt.values()))
    y = y.astype(dtype)
    ktt = {n: as_float(v, f"kernel_fn(x_train).{n}").astype(dtype) for n, v in ktt.items()}
    layout = train_layout(ktt["nngp"], y, "kernel_fn(x_train).nngp", "y_train", trace_axes)
    check_finite(y, "y_train")
    check_positive(learning_rate, "learning_rate", allow_none=True)
    lr = 1.0 if learning_rate is None else learning_rate
    kernels: dict[str, TrainKernel] = {}
    for n, v in ktt.items():
        if v.shape != ktt["nngp"].shape:
            raise ValueError(
                f"kernel_fn(x_train).{n} has shape {tuple(v.shape)} but .nngp has "
                f"{tuple(ktt['nngp'].shape)}; both kernels must share a layout"
            )
        kernels[n] = TrainKernel(
            layout.kernel(v), diag_reg, diag_reg_absolute_scale, f"kernel_fn(x_train).{n}", eigh_precision
        )
        kernels[n].validate(stacklevel=4)
    if learning_rate is not None:
        for n in names:
            warn_unstable(kernels[n], learning_rate, layout.size, f"kernel_fn(x_train).{n}", stacklevel=4)
    priors = {"nngp": kernels["nngp"].k}
    if "ntk" in names:
        priors["ntk"] = _sym(layout.kernel(ktt["nngp"]))
    y_flat = layout.targets(y)
    rate = 1.0 / layout.size
    default_get = get

    def predict_fn(
        t: Optional[ArrayLike] = None, x_test: Any = None, get: EnsembleGet = None, compute_cov: bool = False
    ):
        req, _ = normalize_get(default_get if get is None else get)
        missing = [n for n in req if n not in names]
        if missing:
            raise ValueError(
                f"get={get!r} asks for {missing}, but this predictor was built with get={default_get!r}; "
                "pass get=... to gradient_descent_mse_ensemble"
            )
        m, cross, k_xX, k_xx = _test_kernels(
            kernel_fn, x_test, x_train, req, compute_cov, layout, dtype, kernel_fn_kwargs
        )
        steps = None if t is None else times(t, dtype)
        values = {}
        for n in req:
            theta_xX = None if x_test is None else cross[n]
            args = (y_flat, theta_xX, k_xX, k_xx, priors[n])
            if steps is None and x_test is None:
                mean, cov = _train_limit(kernels[n], y_flat, priors[n], n, compute_cov)
            elif steps is None:
                mean, cov = _test_limit(kernels[n], *args, n, compute_cov)
            else:
                eig = kernels[n].eigen_for(*_checked_outputs(y_flat, theta_xX, compute_cov))
                mean, cov = _moments_at(eig, rate * lr, steps.reshape(-1), *args, name=n, compute_cov=compute_cov)
                mean = mean.reshape(steps.shape + mean.shape[1:])
                if compute_cov:
                    cov = cov.reshape(steps.shape + cov.shape[1:])
            mean = layout.outputs(mean, m)
            values[n] = Gaussian(mean, layout.covariance(cov, m)) if compute_cov else mean
        return pack(default_get if get is None else get, values)

    return predict_fn


def _test_kernels(kernel_fn, x_test, x_train, req, compute_cov, layout: Layout, dtype, kwargs):
    """``(M, cross kernels by name, cross NNGP, test NNGP)`` in the flat layout."""
    if x_test is None:
        return layout.n, {}, None, None
    cross_names = tuple(sorted(set(req) | ({"nngp"} if compute_cov else set())))
    cross = call_kernel_fn(kernel_fn, x_test, x_train, cross_names, kwargs)
    cross = {n: as_float(v, f"kernel_fn(x_test, x_train).{n}").astype(dtype) for n, v in cross.items()}
    m = None
    for n, v in cross.items():
        m = check_cross(v, layout, f"kernel_fn(x_test, x_train).{n}", "kernel_fn(x_train)")
    cross = {n: layout.kernel(v) for n, v in cross.items()}
    k_xx = None
    if compute_cov:
        k_xx = as_float(call_kernel_fn(kernel_fn, x_test, None, ("nngp",), kwargs)["nngp"], "kernel_fn(x_test).nngp")
        k_xx = k_xx.astype(dtype)
        assert m is not None  # the cross kernels include the NNGP when a covariance is wanted
        check_square_test(k_xx, layout, m, "kernel_fn(x_test).nngp")
        k_xx = layout.kernel(k_xx)
    return m, cross, cross.get("nngp"), k_xx

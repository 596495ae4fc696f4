"""Factorizations of a regularized training kernel, computed once, on demand, in enough precision.

:class:`TrainKernel` holds ``K + σ² I`` (symmetrized) and hands out

* a Cholesky factor (``jax.scipy.linalg.cho_factor``), with estimates of ``λ_max`` (block power
  iteration) and ``λ_min`` (one block inverse iteration on the factor, then Rayleigh–Ritz; high
  by at most ~3× on the kernels tried): the ``t = ∞`` solves, the positive-definiteness check and
  the stability warning need nothing more;
* an eigendecomposition, only when finite times are asked for.

Precision. Eigenvalues of a float32 matrix from a float32 ``eigh`` are accurate to a few
``eps·λ_max`` (measured 3–5 at N = 2000–5000), so a mode with eigenvalue ``λ`` has relative error
about ``eps·λ_max/λ``; a Cholesky solve is accurate to a small fraction of ``cond·eps``. A float32
kernel whose estimated ``cond·eps`` exceeds :data:`FLOAT64_EIGH_ABOVE` is therefore
eigendecomposed in float64 (on the device when ``jax_enable_x64`` is on, else on the host through
``jax.pure_callback``, which also works under ``jit``), and the eigenpairs are rounded back to
float32: rounding keeps each eigenvalue to ``eps`` of *itself*. Everything else stays in the
kernel's dtype, with matrix products at the highest precision (float32 products on recent NVIDIA
GPUs default to TF32, far too coarse for a kernel that is inverted).

Singularity. The regularized kernel is *singular to working precision* when its Cholesky
factorization breaks down or its estimated smallest eigenvalue is at or below the rounding level
``CUTOFF·eps·λ_max``. Then (and only then) eigenvalues at or below that level are treated as exact
zeros: gradient flow leaves those directions where they start, ``t = ∞`` is the pseudo-inverse,
and a warning says so. The decision is made inside the computation (``lax.cond``), so a predictor
traced under ``jit`` gives the same numbers as one run eagerly; only the checks that raise or warn
need concrete values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsp_linalg
import numpy as np

from ntk_adapters.predict.checks import check_finite, check_non_negative, concrete, is_traced

#: Eigenvalues at or below ``CUTOFF·eps·λ_max`` are rounding noise (a float32 ``eigh`` is off by
#: 3–5·eps·λ_max at N = 2000–5000; the margin keeps noise out at larger N). A kernel that
#: satisfies ``cond·eps ≤ 1e-2`` has every eigenvalue at 100·eps·λ_max or above, well clear of it.
CUTOFF = 32.0
#: A float32 kernel whose estimated ``cond·eps`` is above this is eigendecomposed in float64
#: (a float32 ``eigh`` is then off by about ``0.5·cond·eps``; the estimate may be 3× low).
FLOAT64_EIGH_ABOVE = 3e-4
_POWER_STEPS = 8
_BLOCK = 4

_highest = jax.default_matmul_precision("highest")

EighRoute = Literal["working", "device64", "host64"]
#: How finite-time predictors eigendecompose a float32 kernel: ``'auto'`` in float64 when the
#: estimated ``cond·eps`` exceeds :data:`FLOAT64_EIGH_ABOVE` (accurate to ``1e-2`` whenever
#: ``cond·eps ≤ 1e-2``), ``'float64'`` always, ``'working'`` in the kernel's dtype like
#: neural-tangents (fastest; errors of about ``cond·eps`` at finite times).
EighPrecision = Literal["auto", "float64", "working"]


def _eps(dtype: Any) -> float:
    return float(jnp.finfo(dtype).eps)


def _x64() -> bool:
    return jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)


def eigh_route(dtype: Any, precision: EighPrecision = "auto") -> EighRoute:
    """Where an ill-conditioned kernel of ``dtype`` is eigendecomposed (decided at call time:
    ``jax_enable_x64`` can change between calls)."""
    if jnp.dtype(dtype) == jnp.float64 or precision == "working":
        return "working"
    return "device64" if _x64() else "host64"


# --------------------------------------------------------------------------------------------
# Jitted cores on factor pytrees
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cholesky:
    """Upper Cholesky factor ``U`` (``K = UᵀU``) of the regularized kernel and what it tells about
    the spectrum.

    ``lam_max`` is a lower estimate of the largest eigenvalue, ``lam_min`` an upper estimate of the
    smallest (``nan`` when the factorization broke down); ``nonsingular`` is the decision above.
    """

    factor: jax.Array
    lam_max: jax.Array
    lam_min: jax.Array
    nonsingular: jax.Array


@dataclasses.dataclass(frozen=True)
class Eigen:
    """Eigenpairs of the regularized kernel: ``lam`` ascending with the noise-level ones (and any
    negative rounding) set to 0, ``keep`` marking the others, ``vecs`` the eigenvectors as columns,
    ``low`` the smallest computed eigenvalue and ``top`` the largest (for the diagnosis)."""

    lam: jax.Array
    vecs: jax.Array
    keep: jax.Array
    low: jax.Array
    top: jax.Array


jax.tree_util.register_dataclass(Cholesky, data_fields=["factor", "lam_max", "lam_min", "nonsingular"], meta_fields=[])
jax.tree_util.register_dataclass(Eigen, data_fields=["lam", "vecs", "keep", "low", "top"], meta_fields=[])


@functools.partial(jax.jit, static_argnames="absolute")
def _regularize(k: jax.Array, diag_reg: Any, absolute: bool):
    """``(K + Kᵀ)/2 + σ² I``, the mean diagonal, and ``max |K − Kᵀ|`` and ``max |K|`` for the
    checks (the latter is NaN or inf exactly when ``K`` has a non-finite entry)."""
    p = k.shape[0]
    sym = (k + k.T) / 2
    stats = (2 * jnp.max(jnp.abs(k - sym)), jnp.max(jnp.abs(k)))
    scale = jnp.trace(sym) / p
    shift = jnp.asarray(diag_reg * (1.0 if absolute else scale)).astype(k.dtype)
    diagonal = jnp.arange(p)
    return sym.at[diagonal, diagonal].add(shift), scale, stats


def _start(p: int, dtype: Any) -> jax.Array:
    """A fixed, well-spread start block: the constant vector (kernels' dominant direction) and
    deterministic oscillations, so every run and every trace sees the same numbers."""
    i = jnp.arange(1, p + 1, dtype=dtype)[:, None]
    j = jnp.arange(1, _BLOCK, dtype=dtype)[None, :]
    waves = jnp.cos(i * j * 0.7548776662 + j * 1.3247179572)
    return jnp.concatenate([jnp.ones((p, 1), dtype), waves], axis=1)


def _orth(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


def _top_ritz(x: jax.Array, ax: jax.Array) -> jax.Array:
    h = x.T @ ax
    return jnp.linalg.eigvalsh((h + h.T) / 2)[-1]


@jax.jit
@_highest
def _cholesky(k: jax.Array) -> Cholesky:
    p = k.shape[0]
    eps = _eps(k.dtype)
    # The upper factor: on CPU it skips a transposition and is ~1.4× faster than the lower one.
    factor, _ = jsp_linalg.cho_factor(k, lower=False)
    # A failed factorization is all NaN; a non-positive pivot shows on the diagonal.
    broke = ~jnp.all(jnp.diagonal(factor) > 0)
    x0 = _orth(_start(p, k.dtype)[:, : min(_BLOCK, p)])
    x = jax.lax.fori_loop(0, _POWER_STEPS, lambda _, v: _orth(k @ v), x0)
    lam_max = _top_ritz(x, k @ x)

    def smallest(factor):
        # Triangular solves are latency-bound on CPU (as slow for 4 columns as for 64): one
        # inverse iteration, then Rayleigh–Ritz with K itself (a bound from above on λ_min).
        x = _orth(jsp_linalg.cho_solve((factor, False), x0))
        h = x.T @ (k @ x)
        return jnp.maximum(jnp.linalg.eigvalsh((h + h.T) / 2)[0], 0)

    lam_min = jax.lax.cond(broke, lambda _: jnp.full((), jnp.nan, k.dtype), smallest, factor)
    nonsingular = ~broke & (lam_min > CUTOFF * eps * lam_max)
    return Cholesky(factor, lam_max, lam_min, nonsingular)


def _eigh_host(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    dtype = k.dtype

    def host(a):
        lam, vecs = np.linalg.eigh(np.asarray(a, np.float64))
        return lam.astype(dtype), vecs.astype(dtype)

    shapes = (jax.ShapeDtypeStruct(k.shape[:1], dtype), jax.ShapeDtypeStruct(k.shape, dtype))
    return jax.pure_callback(host, shapes, k, vmap_method="sequential")


def _eigh_working(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    lam, vecs = jnp.linalg.eigh(k)
    return lam, vecs


def _eigh_device64(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    lam, vecs = jnp.linalg.eigh(k.astype(jnp.float64))
    return lam.astype(k.dtype), vecs.astype(k.dtype)


@functools.partial(jax.jit, static_argnames=("route", "always"))
def _eigen(k: jax.Array, cond_eps: jax.Array, route: EighRoute, always: bool = False) -> Eigen:
    if route == "working":
        lam, vecs = _eigh_working(k)
    elif always:
        lam, vecs = (_eigh_host if route == "host64" else _eigh_device64)(k)
    else:
        precise = _eigh_host if route == "host64" else _eigh_device64
        # `not (x ≤ limit)` sends an unknown condition number (nan) to the precise branch.
        lam, vecs = jax.lax.cond(cond_eps <= FLOAT64_EIGH_ABOVE, _eigh_working, precise, k)
    top = jnp.maximum(lam[-1], 0)
    keep = lam > CUTOFF * _eps(k.dtype) * top
    return Eigen(jnp.where(keep, lam, 0), vecs, keep, lam[0], top)


@jax.jit
def _cho_solve(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``K⁻¹ b``. Iterative refinement in the same precision was tried and bought nothing
    measurable: float32 Cholesky solves of these kernels were already 5–30× better than
    ``cond·eps``, and refinement cannot beat the factor's own backward error."""
    return jsp_linalg.cho_solve((factor, False), b)


@jax.jit
@_highest
def _pinv_solve(eig: Eigen, b: jax.Array) -> jax.Array:
    inv = jnp.where(eig.keep, 1 / jnp.where(eig.keep, eig.lam, 1), 0)
    return eig.vecs @ (inv[:, None] * (eig.vecs.T @ b))


@functools.partial(jax.jit, static_argnames=("route", "always"))
def _solve_traced(k: jax.Array, chol: Cholesky, b: jax.Array, route: EighRoute, always: bool) -> jax.Array:
    def fallback(operands):
        k, chol, b = operands
        return _pinv_solve(_eigen(k, _cond_eps(chol), route, always), b)

    return jax.lax.cond(chol.nonsingular, lambda o: _cho_solve(o[1].factor, o[2]), fallback, (k, chol, b))


def _cond_eps(chol: Cholesky) -> jax.Array:
    return chol.lam_max / chol.lam_min * _eps(chol.factor.dtype)


# --------------------------------------------------------------------------------------------
# The training kernel
# --------------------------------------------------------------------------------------------


class TrainKernel:
    """``K + σ² I`` for one flat ``(P, P)`` training kernel, with its factorizations on demand.

    ``σ² = diag_reg · mean(diag K)`` (``diag_reg`` itself with ``absolute``). Built from concrete
    arrays, the factorizations are computed once (also when first asked for inside a ``jit``
    trace: they are evaluated eagerly then) and reused; built from traced arrays they are
    recomputed per use and never cached (a cached tracer would outlive its trace).
    """

    def __init__(self, k: jax.Array, diag_reg: Any, absolute: bool, name: str, eigh_precision: EighPrecision = "auto"):
        p = k.shape[0]
        if p == 0:
            raise ValueError(f"{name} is empty (no training points)")
        check_non_negative(diag_reg, "diag_reg")
        if eigh_precision not in ("auto", "float64", "working"):
            raise ValueError(f"eigh_precision must be 'auto', 'float64' or 'working'; got {eigh_precision!r}")
        self.name = name
        self.dtype = k.dtype
        self.eps = _eps(k.dtype)
        self.size = p
        self.diag_reg = diag_reg
        self.precision = eigh_precision
        self.traced = is_traced(k) or is_traced(diag_reg)
        if self.traced:
            self.k, self.scale, _ = _regularize(k, diag_reg, bool(absolute))
            return
        with jax.ensure_compile_time_eval():
            self.k, self.scale, stats = _regularize(k, diag_reg, bool(absolute))
        asym, top = (float(v) for v in stats)
        if not math.isfinite(top):
            check_finite(k, name)
        if asym > math.sqrt(self.eps) * max(top, float(np.finfo(np.dtype(k.dtype)).tiny)):
            raise ValueError(
                f"{name} is not symmetric: max |K − Kᵀ| = {asym:.3g} vs max |K| = {top:.3g}. "
                "A training kernel must be evaluated on the same inputs twice "
                "(kernel_fn(x_train, None)); a test-train kernel is not a training kernel"
            )

    _chol: Optional[Cholesky] = None
    _eig: Optional[Eigen] = None

    def _route(self) -> tuple[EighRoute, bool]:
        return eigh_route(self.dtype, self.precision), self.precision == "float64"

    def _compute(self, fn, *args):
        """``fn(*args)``, evaluated eagerly for a concrete kernel even inside a trace: under
        ``jit`` every operation is staged out, so the arguments are formed inside as well."""
        if self.traced:
            return fn(*args)
        with jax.ensure_compile_time_eval():
            return fn(*args)

    def cholesky(self) -> Cholesky:
        if self._chol is not None:
            return self._chol
        chol = self._compute(_cholesky, self.k)
        if not self.traced:
            self._chol = chol
        return chol

    def eigen(self) -> Eigen:
        if self._eig is not None:
            return self._eig
        eig = self._compute(lambda: _eigen(self.k, _cond_eps(self.cholesky()), *self._route()))
        if not self.traced:
            self._eig = eig
        return eig

    def nonsingular(self) -> Optional[bool]:
        """Whether the Cholesky path is used; ``None`` while traced (decided inside the trace)."""
        if self.traced:
            return None
        return bool(self.cholesky().nonsingular)

    def lam_max(self) -> Optional[float]:
        if self.traced:
            return None
        return float(self.cholesky().lam_max)

    def solve(self, b: jax.Array) -> jax.Array:
        """``(K + σ² I)⁻¹ b``, or its pseudo-inverse when the kernel is singular."""
        if self.traced:
            return _solve_traced(self.k, self.cholesky(), b, *self._route())
        if self.nonsingular():
            return _cho_solve(self.cholesky().factor, b)
        return _pinv_solve(self.eigen(), b)

    def validate(self, warn: bool = True, stacklevel: int = 3) -> None:
        """Refuse a kernel that is not positive semi-definite; warn when it is singular.

        One Cholesky factorization decides for a positive-definite kernel; the eigenvalues are
        computed only when it breaks down, to tell an indefinite kernel from a singular one.
        """
        if self.traced or self.nonsingular():
            return
        eig = self.eigen()
        low, top = float(eig.low), float(eig.top)
        tol = 10 * math.sqrt(self.eps) * top
        if low < -tol or (top == 0.0 and low < 0):
            raise ValueError(
                f"{self.name} is not positive semi-definite: smallest eigenvalue {low:.3g}, largest "
                f"{top:.3g} (tolerance {tol:.3g}). A kernel of one set of inputs must be PSD: "
                "check that it is a training kernel (same inputs on both sides), recompute it in "
                "float64, or pass diag_reg > 0 (adds diag_reg · mean diagonal to the diagonal)"
            )
        if warn:
            warnings.warn(self._singular_message(eig), stacklevel=stacklevel)

    def _singular_message(self, eig: Eigen) -> str:
        low, top = float(eig.low), float(eig.top)
        count = int(self.size - np.count_nonzero(np.asarray(eig.keep)))
        level = CUTOFF * self.eps * top
        dtype = jnp.dtype(self.dtype).name
        reg = concrete(self.diag_reg)
        reg_value = 0.0 if reg is None else float(reg)
        regularized = reg_value > 0
        what = f"{self.name} + diag_reg · mean(diag)" if regularized else self.name
        scale = float(self.scale) if float(self.scale) > 0 else 1.0
        needed = 100 * self.eps * top / scale
        advice = (
            f"diag_reg={reg_value:g} is too small for {dtype}; " if regularized else ""
        ) + f"diag_reg ≥ {needed:.2g} (relative to the mean diagonal) makes cond·eps ≤ 1e-2"
        if jnp.dtype(self.dtype) != jnp.float64:
            advice += ", or compute the kernel in float64"
        return (
            f"{what} is singular to working precision ({dtype}): {count} of {self.size} "
            f"eigenvalues are at or below the rounding level {CUTOFF:g}·eps·λ_max = {level:.3g} "
            f"(λ_max = {top:.3g}, smallest computed {low:.3g}). Those directions are treated as "
            "exact zeros: gradient flow leaves them where they start and t=None is the "
            f"pseudo-inverse solution (the t → ∞ limit). For a ridge solution instead: {advice}"
        )

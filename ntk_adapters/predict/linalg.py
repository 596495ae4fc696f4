"""Factorizations of a regularized training kernel, computed once, on demand, in enough precision.

:class:`TrainKernel` holds ``K + σ² I`` (its upper triangle is what every factorization reads:
the input is symmetric to within its check, and no symmetrized or transposed copy of ``K`` is
formed) and hands out

* a Cholesky factor (``jax.scipy.linalg.cho_factor``), computed when the kernel is built, and
  what the factor itself tells about the spectrum: the smallest squared pivot bounds ``λ_min``
  from above and ``max(max K_ii, 1ᵀK1/P)`` bounds ``λ_max`` from below (within 1.0–1.5× and
  0.8–0.95× on the regularized ReLU-NTK and RBF kernels measured), so the ``t = ∞`` solves, the
  positive-definiteness check and the singularity decision cost one factorization;
* an eigendecomposition, only when finite times are asked for;
* ``λ_max`` by block power iteration, only for the learning-rate check and the ODE's time unit.

Precision. A float32 ``eigh`` is backward stable: its eigenpairs are exact for ``K + E`` with
``‖E‖`` a few ``eps·λ_max``, so finite-time predictions have relative errors of about
``cond·eps``, but how much depends on the spectrum: measured worst case over 40 times (from barely
moved to converged, test and train, against float64), an RBF kernel's test error is
0.8–1.6·``cond·eps`` (1.2e-2 at ``cond·eps = 9.4e-3``, N = 1000), the ReLU NTK's about 0.6·``cond·eps``.
A threshold on ``cond`` alone must therefore either waste float64 on kernels a float32 ``eigh``
serves well or break the 1e-2 promise on others. Instead the error is *measured*, per call, on
that call's own outputs: the ``t = ∞`` solution ``K⁻¹ r`` through the float32 eigenpairs is compared
with the same solution after two steps of iterative refinement (the eigenpairs precondition, the
residual is computed against ``K``; each step contracts the error by about that error itself),
seen through the test kernel (the test outputs ``K(x, X) K⁻¹ r``) and through ``K`` (the residual,
which bounds the training outputs' error: 1.4–2.4× above it measured). By the divided-difference
bound ``|[g_t](λ_i, λ_j)| ≤ 1/(λ_i λ_j)`` of ``g_t(λ) = (1 − e^{−tλ})/λ`` the first-order error at
any finite time is at most the ``t = ∞`` one; measured, the estimate is within 2 % of the worst
finite-time test error on every kernel above. When it exceeds :data:`WORKING_EIGH_ERROR` = 5e-3
(half the 1e-2 promise) the kernel is eigendecomposed in float64 (on the device when
``jax_enable_x64`` is on, else on the host through ``jax.pure_callback``, which also works under
``jit``), and the eigenpairs are rounded back to float32: rounding keeps each eigenvalue to ``eps``
of *itself*. The check costs a few matrix-vector products; the float32 and float64
eigendecompositions are each computed once and reused. Everything else stays in the kernel's
dtype, with matrix products at the highest precision (float32 products on recent NVIDIA GPUs
default to TF32, far too coarse for a kernel that is inverted).

Singularity. The regularized kernel is *singular to working precision* when its Cholesky
factorization breaks down or its smallest squared pivot is at or below the rounding level
``CUTOFF·eps·λ_max`` (then ``λ_min`` is too: the decision never claims a singularity that is not
there). Then (and only then) eigenvalues at or below that level are treated as exact zeros:
gradient flow leaves those directions where they start, ``t = ∞`` is the pseudo-inverse, and a
warning says so. The decision is made inside the computation (``lax.cond``), so a predictor
traced under ``jit`` gives the same numbers as one run eagerly; only the checks that raise or warn
need concrete values.
"""

from __future__ import annotations

import contextlib
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
#: A float32 ``eigh`` is kept for a call when the relative error it makes in that call's ``t = ∞``
#: outputs, measured against a refined solve, is at most this: half the 1e-2 promise (the estimate
#: is within 2 % of the worst finite-time error measured on ReLU-NTK and RBF kernels).
WORKING_EIGH_ERROR = 5e-3
#: Above this lower bound on ``cond·eps`` (from the Cholesky pivots) a float32 ``eigh`` is not
#: tried: it would err by more than :data:`WORKING_EIGH_ERROR` on every kernel measured.
WORKING_EIGH_HOPELESS = 2e-2
_REFINE_STEPS = 2
_POWER_STEPS = 8
_BLOCK = 4

_highest = jax.default_matmul_precision("highest")

EighRoute = Literal["working", "device64", "host64"]
#: How finite-time predictors eigendecompose a float32 kernel: ``'auto'`` in float32 when the
#: error measured on the call's outputs is at most :data:`WORKING_EIGH_ERROR`, else in float64
#: (accurate to ``1e-2`` whenever ``cond·eps ≤ 1e-2``); ``'float64'`` always; ``'working'`` in the
#: kernel's dtype like neural-tangents (errors of about ``cond·eps`` at finite times).
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

    ``lam_max`` is a lower bound on the largest eigenvalue, ``lam_min`` an upper bound on the
    smallest (the smallest squared pivot; ``nan`` when the factorization broke down);
    ``nonsingular`` is the decision above.
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


def _diagonal(k: jax.Array) -> jax.Array:
    # A strided slice of the flat matrix: `jnp.diagonal` is a gather, markedly slower on CPU.
    return k.reshape(-1)[:: k.shape[0] + 1]


def _probes(p: int, dtype: Any) -> jax.Array:
    """Four fixed unit vectors with pseudo-random signs and sizes, the same in every run."""
    i = jnp.arange(1, p + 1, dtype=jnp.float32)[:, None]
    j = jnp.arange(1, 5, dtype=jnp.float32)[None, :]
    v = jnp.sin(i * (j * 12.9898 + 78.233)) * 43758.5453
    v = (v - jnp.floor(v) - 0.5).astype(dtype)
    return v / jnp.linalg.norm(v, axis=0)


def _shift(k: jax.Array, diag_reg: Any, absolute: bool) -> tuple[jax.Array, jax.Array]:
    scale = jnp.sum(_diagonal(k)) / k.shape[0]
    return scale, jnp.asarray(diag_reg * (1.0 if absolute else scale)).astype(k.dtype)


@functools.partial(jax.jit, static_argnames="absolute")
@_highest
def _checks(k: jax.Array, diag_reg: Any, absolute: bool):
    """The mean diagonal, the shift ``σ²`` and, for the checks, ``‖(K − Kᵀ) v‖`` and ``‖K v‖`` on
    four probe vectors: for unit vectors with independent entries both are ``‖·‖_F/√P`` on
    average, so their ratio estimates ``‖K − Kᵀ‖_F/‖K‖_F`` from two thin products (no transposed
    copy of ``K``); both are non-finite when ``K`` has a non-finite entry."""
    p = k.shape[0]
    scale, shift = _shift(k, diag_reg, absolute)
    v = _probes(p, k.dtype)
    kv, ktv = k @ v, (v.T @ k).T  # `k.T @ v` would form the transpose first
    # λ_max(K + σ² I) from below: Rayleigh quotients of the unit vectors and of the constant vector
    # (kernels' dominant direction).
    lam_max = jnp.maximum(jnp.max(_diagonal(k)), jnp.sum(k) / p) + shift
    return scale, shift, lam_max, (jnp.linalg.norm(kv - ktv), jnp.linalg.norm(kv))


@jax.jit
def _shifted(k: jax.Array, shift: jax.Array) -> jax.Array:
    d = jnp.arange(k.shape[0])
    return k.at[d, d].add(shift)


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


@functools.partial(jax.jit, static_argnames="absolute")
def _factor_of(k: jax.Array, diag_reg: Any, absolute: bool) -> jax.Array:
    """:func:`_factor` with the shift formed inside (no wait for :func:`_checks`)."""
    return _factor(k, _shift(k, diag_reg, absolute)[1])


@jax.jit
def _factor(k: jax.Array, shift: jax.Array) -> jax.Array:
    # The upper factor of K + σ² I, reading K's upper triangle: the shift fuses into the
    # factorization's input and no symmetrized or transposed copy of K is formed (on CPU each
    # costs about as much as the factorization's own overhead).
    # An added identity fuses into the factorization's input where a scatter to the diagonal
    # would be materialized first (measured ~20% of the factorization on CPU).
    return jsp_linalg.cho_factor(k + shift * jnp.eye(k.shape[0], dtype=k.dtype), lower=False)[0]


@jax.jit
def _pivot_bounds(factor: jax.Array, lam_max: jax.Array) -> tuple[jax.Array, jax.Array]:
    pivots = _diagonal(factor)
    # A failed factorization is all NaN; a non-positive pivot shows on the diagonal.
    broke = ~jnp.all(pivots > 0)
    # U_ii² is the Schur complement 1/((K_{≤i})⁻¹)_ii ≥ λ_min(K_{≤i}) ≥ λ_min(K) (interlacing).
    lam_min = jnp.where(broke, jnp.nan, jnp.min(pivots) ** 2)
    nonsingular = ~broke & (lam_min > CUTOFF * _eps(factor.dtype) * lam_max)
    return lam_min, nonsingular


def _bounds(factor: jax.Array, lam_max: jax.Array) -> Cholesky:
    """What the factor tells about the spectrum. A separate program that returns scalars only:
    read inside the factorization's program the pivots cost a second pass over the factor, and a
    program that returns its input array copies it."""
    lam_min, nonsingular = _pivot_bounds(factor, lam_max)
    return Cholesky(factor, lam_max, lam_min, nonsingular)


def _cholesky(k: jax.Array, shift: jax.Array, lam_max: jax.Array) -> Cholesky:
    return _bounds(_factor(k, shift), lam_max)


@jax.jit
@_highest
def _top_eigenvalue(k: jax.Array) -> jax.Array:
    """``λ_max`` from below by block power iteration and Rayleigh–Ritz (a few matrix products)."""
    p = k.shape[0]
    x0 = _orth(_start(p, k.dtype)[:, : min(_BLOCK, p)])
    x = jax.lax.fori_loop(0, _POWER_STEPS, lambda _, v: _orth(k @ v), x0)
    return jnp.maximum(_top_ritz(x, k @ x), jnp.max(jnp.diagonal(k)))


def _eigh_host(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    dtype = k.dtype

    def host(a):
        lam, vecs = np.linalg.eigh(np.asarray(a, np.float64), UPLO="U")
        return lam.astype(dtype), vecs.astype(dtype)

    shapes = (jax.ShapeDtypeStruct(k.shape[:1], dtype), jax.ShapeDtypeStruct(k.shape, dtype))
    return jax.pure_callback(host, shapes, k, vmap_method="sequential")


def _eigh_working(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The upper triangle, as the Cholesky factor reads it (the input is symmetric to its checks).
    vecs, lam = jax.lax.linalg.eigh(k, lower=False, symmetrize_input=False)
    return lam, vecs


def _eigh_device64(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    vecs, lam = jax.lax.linalg.eigh(k.astype(jnp.float64), lower=False, symmetrize_input=False)
    return lam.astype(k.dtype), vecs.astype(k.dtype)


@functools.partial(jax.jit, static_argnames="route")
def _eigen(k: jax.Array, route: EighRoute) -> Eigen:
    lam, vecs = {"working": _eigh_working, "host64": _eigh_host, "device64": _eigh_device64}[route](k)
    top = jnp.maximum(lam[-1], 0)
    keep = lam > CUTOFF * _eps(k.dtype) * top
    return Eigen(jnp.where(keep, lam, 0), vecs, keep, lam[0], top)


def _relative(diff: jax.Array, ref: jax.Array) -> jax.Array:
    return jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(ref), jnp.finfo(ref.dtype).tiny)


@jax.jit
@_highest
def _working_error(eig: Eigen, k: jax.Array, b: jax.Array, kt: Optional[jax.Array]) -> jax.Array:
    """Relative error of ``K⁻¹ b`` through these eigenpairs: through ``K`` (the residual, on ``b``
    and on the probe vectors) and, given the test kernel ``kt``, through ``kt`` against two steps of
    iterative refinement (the eigenpairs as preconditioner)."""
    probed = jnp.concatenate([b, _probes(k.shape[0], k.dtype)], axis=1)
    x0 = _pinv_solve(eig, probed)
    residual = probed - k @ x0
    c = b.shape[1]
    error = jnp.maximum(_relative(residual[:, :c], b), _relative(residual[:, c:], probed[:, c:]))
    if kt is None or kt.shape[0] == 0:
        return error
    x = x0[:, :c]
    for _ in range(_REFINE_STEPS):
        x = x + _pinv_solve(eig, b - k @ x)
    return jnp.maximum(error, _relative(kt @ (x0[:, :c] - x), kt @ x))


@functools.partial(jax.jit, static_argnames="route")
def _keep_or_redo(eig: Eigen, error: jax.Array, k: jax.Array, route: EighRoute) -> Eigen:
    # `not (error ≤ limit)` sends a non-finite estimate to the precise branch.
    return jax.lax.cond(error <= WORKING_EIGH_ERROR, lambda: eig, lambda: _eigen(k, route))


@functools.partial(jax.jit, static_argnames="route")
def _eigen_for_traced(k: jax.Array, chol: "Cholesky", b: jax.Array, kt: Optional[jax.Array], route: EighRoute) -> Eigen:
    def attempt(_):
        eig = _eigen(k, "working")
        return _keep_or_redo(eig, _working_error(eig, k, b, kt), k, route)

    hopeful = chol.nonsingular & (_cond_eps(chol) <= WORKING_EIGH_HOPELESS)
    return jax.lax.cond(hopeful, attempt, lambda _: _eigen(k, route), None)


@jax.jit
def _cho_solve(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``K⁻¹ b``. Iterative refinement in the same precision was tried and bought nothing
    measurable: float32 Cholesky solves of these kernels were already 5–30× better than
    ``cond·eps``, and refinement cannot beat the factor's own backward error."""
    # LAPACK's triangular solves read column-major operands: the row-major upper factor U is Uᵀ
    # in column-major order, so solving with the lower factor Uᵀ reads U's buffer as it is (the
    # upper form would transpose all N² entries on every call).
    return jsp_linalg.cho_solve((factor.T, True), b)


@jax.jit
@_highest
def _pinv_solve(eig: Eigen, b: jax.Array) -> jax.Array:
    inv = jnp.where(eig.keep, 1 / jnp.where(eig.keep, eig.lam, 1), 0)
    return eig.vecs @ (inv[:, None] * (eig.vecs.T @ b))


@functools.partial(jax.jit, static_argnames="route")
def _solve_traced(k: jax.Array, chol: Cholesky, b: jax.Array, route: EighRoute) -> jax.Array:
    def fallback(operands):
        k, chol, b = operands
        return _pinv_solve(_eigen(k, route), b)

    return jax.lax.cond(chol.nonsingular, lambda o: _cho_solve(o[1].factor, o[2]), fallback, (k, chol, b))


def _cond_eps(chol: Cholesky) -> jax.Array:
    return chol.lam_max / chol.lam_min * _eps(chol.factor.dtype)


# --------------------------------------------------------------------------------------------
# The training kernel
# --------------------------------------------------------------------------------------------


def _eagerly() -> contextlib.AbstractContextManager:
    """Evaluate now even inside a ``jit`` trace; outside one, nothing (the context costs ~20 ms of
    lost asynchronous dispatch per factorization on CPU)."""
    inside = isinstance(jnp.zeros(()), jax.core.Tracer)
    return jax.ensure_compile_time_eval() if inside else contextlib.nullcontext()


class TrainKernel:
    """``K + σ² I`` for one flat ``(P, P)`` training kernel, with its factorizations on demand.

    ``σ² = diag_reg · mean(diag K)`` (``diag_reg`` itself with ``absolute``). ``factor=True``
    computes the Cholesky factor at once (every predictor needs it); ``factor=False`` leaves it
    for later (``max_learning_rate`` needs only eigenvalues). Built from concrete arrays, the
    factorizations are computed once (also when first asked for inside a ``jit``
    trace: they are evaluated eagerly then) and reused; built from traced arrays they are
    recomputed per use and never cached (a cached tracer would outlive its trace).
    """

    def __init__(
        self,
        k: jax.Array,
        diag_reg: Any,
        absolute: bool,
        name: str,
        eigh_precision: EighPrecision = "auto",
        factor: bool = True,
    ):
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
        self.raw = k
        if self.traced:
            self.scale, self.shift, self.lam_max_low, _ = _checks(k, diag_reg, bool(absolute))
            return
        with _eagerly():
            # Every use needs the factor (validate, t = ∞): dispatched first, so that the checks
            # can run beside it.
            early = _factor_of(k, diag_reg, bool(absolute)) if factor else None
            self.scale, self.shift, self.lam_max_low, stats = _checks(k, diag_reg, bool(absolute))
            if early is not None:
                self._chol = _bounds(early, self.lam_max_low)
        asym, norm = (float(v) for v in stats)
        if not (math.isfinite(asym) and math.isfinite(norm)):
            check_finite(k, name)
        if asym > math.sqrt(self.eps) * max(norm, float(np.finfo(np.dtype(k.dtype)).tiny)):
            raise ValueError(
                f"{name} is not symmetric: ‖K − Kᵀ‖_F / ‖K‖_F ≈ {asym / norm:.3g} (estimated on four "
                f"probe vectors; at most √eps = {math.sqrt(self.eps):.2g} is rounding). A training "
                "kernel must be evaluated on the same inputs twice (kernel_fn(x_train, None)); a "
                "test-train kernel is not a training kernel"
            )

    _chol: Optional[Cholesky] = None
    _eigs: Optional[dict[EighRoute, Eigen]] = None
    _top: Optional[jax.Array] = None
    _k: Optional[jax.Array] = None

    @property
    def k(self) -> jax.Array:
        """``K + σ² I`` (its upper triangle is what the factorizations read)."""
        if self._k is not None:
            return self._k
        k = self._compute(_shifted, self.raw, self.shift)
        if not self.traced:
            self._k = k
        return k

    def _route(self) -> EighRoute:
        return eigh_route(self.dtype, self.precision)

    def _compute(self, fn, *args):
        """``fn(*args)``, evaluated eagerly for a concrete kernel even inside a trace: under
        ``jit`` every operation is staged out, so the arguments are formed inside as well."""
        if self.traced:
            return fn(*args)
        with _eagerly():
            return fn(*args)

    def cholesky(self) -> Cholesky:
        if self._chol is not None:
            return self._chol
        chol = self._compute(_cholesky, self.raw, self.shift, self.lam_max_low)
        if not self.traced:
            self._chol = chol
        return chol

    def eigen(self) -> Eigen:
        """The eigenpairs for a use with no outputs to check against (a singular kernel's
        pseudo-inverse): in float64 for a float32 kernel unless ``eigh_precision='working'``."""
        return self._eigen_by(self._route())

    def _eigen_by(self, route: EighRoute) -> Eigen:
        cached = self._eigs.get(route) if self._eigs is not None else None
        if cached is not None:
            return cached
        eig = self._compute(lambda: _eigen(self.k, route))
        if not self.traced:
            self._eigs = {**(self._eigs or {}), route: eig}
        return eig

    def eigen_for(self, b: jax.Array, kt: Optional[jax.Array] = None) -> Eigen:
        """The eigenpairs for finite-time outputs with training residual ``b`` ``(P, C)`` and test
        kernel ``kt`` ``(Q, P)`` (``None``: training outputs only). Under ``'auto'`` the float32
        ones when their error, measured on these outputs, is at most :data:`WORKING_EIGH_ERROR`."""
        route = self._route()
        if route == "working" or self.precision == "float64":
            return self._eigen_by(route)
        if self.traced:
            return _eigen_for_traced(self.k, self.cholesky(), b, kt, route)
        chol = self.cholesky()
        if not (bool(chol.nonsingular) and float(_cond_eps(chol)) <= WORKING_EIGH_HOPELESS):
            return self._eigen_by(route)
        eig = self._eigen_by("working")
        error = _working_error(eig, self.k, b, kt)
        if is_traced(error):  # outputs traced under `jit`: decided inside the computation
            return _keep_or_redo(eig, error, self.k, route)
        return eig if float(error) <= WORKING_EIGH_ERROR else self._eigen_by(route)

    def nonsingular(self) -> Optional[bool]:
        """Whether the Cholesky path is used; ``None`` while traced (decided inside the trace)."""
        if self.traced:
            return None
        return bool(self.cholesky().nonsingular)

    def top_eigenvalue(self) -> jax.Array:
        """``λ_max`` (from below, to the accuracy of a few power steps), computed once."""
        if self._top is not None:
            return self._top
        top = self._compute(lambda: _top_eigenvalue(self.raw) + self.shift)
        if not self.traced:
            self._top = top
        return top

    def lam_max(self) -> Optional[float]:
        if self.traced:
            return None
        return float(self.top_eigenvalue())

    def solve(self, b: jax.Array) -> jax.Array:
        """``(K + σ² I)⁻¹ b``, or its pseudo-inverse when the kernel is singular."""
        if self.traced:
            return _solve_traced(self.k, self.cholesky(), b, self._route())
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

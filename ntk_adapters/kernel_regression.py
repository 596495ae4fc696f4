"""Kernel regression by conjugate gradients, never storing the kernel.

:func:`kernel_regression_cg` solves ``(K + λ I) α = y`` where every product ``K v`` recomputes
the kernel tile by tile (only the diagonal and upper tiles: ``K`` is symmetric), with the tile
pairs split over a mesh of devices, and reports whether CG reached its tolerance. After
``jax.distributed.initialize`` the mesh spans every process's devices: each process makes the
same call, evaluates its share of the tiles, and the partial products meet in one all-reduce.

This module is framework-free: it never imports Flax or Haiku.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntk_adapters import distributed as _dist
from ntk_adapters.tile_store import digest_tree
from ntk_adapters.tiling import AXIS, _as_tiles, _join_kwargs, _num_rows, _refuse_coupled, _split_kwargs

__all__ = ["kernel_regression_cg", "KernelRegressionResult", "CGConvergenceWarning"]

# CG's products and inner products in full float32: TensorFloat-32 (the GPU default) would stall
# it near 1e-3.
_HIGHEST = jax.lax.Precision.HIGHEST
_vdot = functools.partial(jnp.vdot, precision=_HIGHEST)


class CGConvergenceWarning(UserWarning):
    """Conjugate gradients stopped without reaching the requested tolerance."""


class KernelRegressionResult(NamedTuple):
    """Result of :func:`kernel_regression_cg`.

    Attributes:
      alpha: ``(K + diag_reg·I)⁻¹ y``, shape of ``y_train`` ``(N, ...)``.
      train: ``K α`` on the training inputs, ``(N, ...)``.
      test: ``K(x_test, X) α``, ``(N_test, ...)``; ``None`` without ``x_test``.
      residual: relative residual ``‖(K + diag_reg·I) α − y‖ / ‖y‖`` of the returned ``α``,
        from a fresh product (not CG's running estimate, which drifts in finite precision).
      iterations: number of CG iterations (each one kernel pass, ``≈ N²/2`` entries).
      converged: whether ``residual`` meets the rule ``‖(K + diag_reg·I)α − y‖ ≤
        max(tol·‖y‖, atol)`` within ``maxiter`` iterations. It fails when CG breaks down
        (``pᵀ(K + λI)p ≤ 0``: ``K + diag_reg·I`` singular to working precision), runs out of
        iterations, or stalls at the precision of the dtype.
    """

    alpha: jax.Array
    train: jax.Array
    test: Optional[jax.Array]
    residual: jax.Array
    iterations: int
    converged: bool


_PASSES = 4


def _cg(matvec: Callable, b: jax.Array, tol: float, atol: float, maxiter: int):
    """Conjugate gradients from ``x = 0``, restarted from the true residual ``b − A x``.

    In finite precision CG's running residual drifts away from the true one, and can report
    convergence that ``A x`` does not bear out (common in float32); each pass therefore ends with
    a fresh product ``A x``, and a new pass starts from that residual while it misses the rule
    ``‖b − A x‖ ≤ max(tol·‖b‖, atol)`` (at most ``_PASSES`` passes, ``maxiter`` iterations in all).
    Written out, rather than :func:`jax.scipy.sparse.linalg.cg`, for the iteration count, the
    breakdown test (``pᵀAp ≤ 0``: ``A`` singular to working precision) and the restarts.

    Returns ``(x, A x, iterations, passes, met_rule, broke_down)``.
    """
    threshold = jnp.maximum(tol**2 * _vdot(b, b), atol**2)

    def cg_pass(x, r, k):
        def cond(s):
            _, _, _, rr, k, broke = s
            return (rr > threshold) & (k < maxiter) & ~broke

        def body(s):
            x, r, p, rr, k, _ = s
            ap = matvec(p)
            pap = _vdot(p, ap)
            broke = ~(pap > 0)
            step = jnp.where(broke, 0.0, rr / jnp.where(broke, 1.0, pap)).astype(b.dtype)
            x = x + step * p
            r = r - step * ap
            rr_new = _vdot(r, r)
            p = r + (rr_new / rr).astype(b.dtype) * p
            return x, r, p, jnp.where(broke, rr, rr_new), k + 1, broke

        x, _, _, _, k, broke = jax.lax.while_loop(cond, body, (x, r, r, _vdot(r, r), k, jnp.bool_(False)))
        return x, k, broke

    def outer_cond(s):
        x, ax, k, passes, broke = s
        r = b - ax
        return (_vdot(r, r) > threshold) & (k < maxiter) & ~broke & (passes < _PASSES)

    def outer_body(s):
        x, ax, k, passes, _ = s
        x, k, broke = cg_pass(x, b - ax, k)
        return x, matvec(x), k, passes + 1, broke

    zero = jnp.zeros_like(b)
    x, ax, k, passes, broke = jax.lax.while_loop(
        outer_cond, outer_body, (zero, zero, jnp.int32(0), jnp.int32(0), jnp.bool_(False))
    )
    r = b - ax
    return x, ax, k, passes, _vdot(r, r) <= threshold, broke


def kernel_regression_cg(
    kernel_fn: Callable[..., Any],
    x_train: Any,
    y_train: jax.Array,
    x_test: Any = None,
    *,
    diag_reg: float = 0.0,
    batch_size: int = 256,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
    get: Optional[str] = "ntk",
    devices: Optional[Sequence[jax.Device]] = None,
    distributed: Optional[bool] = None,
    **kernel_kwargs: Any,
) -> KernelRegressionResult:
    """Kernel regression ``α = (K + diag_reg·I)⁻¹ y`` by conjugate gradients, never storing ``K``.

    Each matrix-vector product ``K v`` is accumulated tile by tile
    (``batch_size × batch_size``), recomputing the tiles with ``kernel_fn`` every time; only the
    diagonal and upper tiles are evaluated (``K`` is symmetric), so memory is
    ``O(batch_size² + N)`` per device and each product costs ``≈ N²/2`` kernel entries, split
    evenly over ``devices``. ``K`` must be positive semi-definite and ``K + diag_reg·I``
    positive definite. Several output columns (``y_train`` of shape ``(N, O)``) are solved
    together: the kernel is ``K ⊗ I_O``, as for infinite-width kernels and empirical kernels with
    the default ``trace_axes=(-1,)``. When CG stops short of its tolerance (duplicated training
    inputs with ``diag_reg=0`` make ``K`` singular) a :class:`CGConvergenceWarning` names the
    residual reached; ``residual``, ``iterations`` and ``converged`` are in the result.

    With ``diag_reg = 0`` and ``kernel_fn`` an NTK, ``test`` is the ``t → ∞`` prediction of
    gradient flow on the MSE loss ``½ · mean (f(x) − y)²`` started from a zero-output network
    (add ``f_0`` back yourself when it is not zero).

    Args:
      kernel_fn: ``kernel_fn(x1, x2, get=get, **kernel_kwargs)`` returning an ``(N1, N2)`` array
        (a per-example separable kernel; see :func:`ntk_adapters.batching.batch`). With
        ``get=None`` it is called without ``get``.
      x_train: training inputs ``(N, ...)`` (or a pytree of such arrays).
      y_train: targets ``(N,)`` or ``(N, O)`` (any trailing shape).
      x_test: optional test inputs ``(N_test, ...)``, any ``N_test ≥ 1``.
      diag_reg: ``λ`` added to the diagonal.
      batch_size: tile edge (test inputs are cut into tiles of the same edge).
      tol, atol: CG stopping rule ``‖r‖ ≤ max(tol·‖y‖, atol)``.
      maxiter: CG iteration cap (``None``: ``10·N·O``).
      get: which kernel to request from ``kernel_fn``.
      devices: devices over which the tile pairs of every product are split (each device sums
        its share, then one all-reduce); ``None`` means ``jax.local_devices()``, or
        ``jax.devices()`` when shared between processes.
      distributed: share the call between all processes of ``jax.distributed.initialize`` (every
        process calls with the same arguments and gets the same result). ``None`` (default): when
        there are several processes and ``devices`` is ``None``.
      **kernel_kwargs: passed to ``kernel_fn`` (e.g. ``params=``).

    Returns:
      :class:`KernelRegressionResult` ``(alpha, train, test, residual, iterations, converged)``.

    Example:
      >>> res = kernel_regression_cg(kernel_fn, x, y, x_test, diag_reg=1e-4, batch_size=512)
      >>> res.alpha.shape, res.test.shape, float(res.residual)   # (N, O), (N_test, O), ~1e-6
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if maxiter is not None and (not isinstance(maxiter, (int, np.integer)) or maxiter < 0):
        raise ValueError(f"maxiter must be a non-negative integer or None; got {maxiter!r}")
    multi = _dist.use_all_processes(distributed, devices)
    devs = tuple(devices if devices is not None else jax.devices() if multi else jax.local_devices())
    if not devs:
        raise ValueError("devices is empty; pass None (all local devices) or a non-empty sequence")
    mesh = Mesh(np.array(devs), (AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(AXIS))
    _refuse_coupled(kernel_fn, x_train, kernel_kwargs.get("params"))
    n = _num_rows(x_train, "x_train")
    y_host = np.asarray(y_train)
    if y_host.ndim == 0 or y_host.shape[0] != n:
        raise ValueError(f"y_train must have shape (N={n}, ...) to match x_train; got {y_host.shape}")
    out_shape = y_host.shape[1:]
    k_cols = int(np.prod(out_shape, dtype=int))
    n_test = None if x_test is None else _num_rows(x_test, "x_test")

    # One tile edge for training and test rows: one compiled kernel tile serves both, and the
    # accumulator of a test row block has the same shape as that of a training row block.
    b = min(int(batch_size), n)
    nt = -(-n // b)
    xs = _as_tiles(x_train, nt, b)
    mt = 0 if n_test is None else -(-n_test // b)
    xts = None if x_test is None else _as_tiles(x_test, mt, b)
    kw = dict(kernel_kwargs) if get is None else dict(kernel_kwargs, get=get)
    treedef, static, dynamic = _split_kwargs(kw)
    if multi:
        _dist.same_on_all_processes(
            repr((n, n_test, diag_reg, batch_size, tol, atol, maxiter, get, len(devs), repr(static)))
            + digest_tree([x_train, y_host, x_test, list(dynamic)]),
            "the kernel_regression_cg call",
        )

    def tile(t, i):
        return jax.tree_util.tree_map(lambda leaf: leaf[i], t)

    def k_fn(a, c, dyn):
        k = kernel_fn(a, c, **_join_kwargs(treedef, static, dyn))
        if not isinstance(k, jax.Array) or k.ndim != 2:
            raise ValueError(
                f"kernel_regression_cg needs kernel_fn(x1, x2, get={get!r}) to return an (N1, N2) array; "
                f"got {jax.tree_util.tree_map(jnp.shape, k)}. Ask for a single kernel (get='ntk') whose "
                "output axes are traced (trace_axes=(-1,)) or an infinite-width kernel."
            )
        return k

    def pair_schedule(pairs):
        """Split the tile pairs evenly over the devices: ``(D, P, 2)`` indices and a validity mask."""
        pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
        per = max(1, -(-len(pairs) // len(devs)))
        padded = np.zeros((len(devs) * per, 2), np.int32)
        padded[: len(pairs)] = pairs
        valid = np.zeros(len(devs) * per, bool)
        valid[: len(pairs)] = True
        return (
            _dist.global_array(padded.reshape(len(devs), per, 2), sharded),
            _dist.global_array(valid.reshape(len(devs), per), sharded),
        )

    def tiled_product(rows, pairs, valid, cols, v, dyn, symmetric):
        """``Σ_j K(rows_i, X_j) v_j`` over the scheduled tile pairs, each device summing its share.

        With ``symmetric`` (rows is X, pairs with i ≤ j), tile ``(i, j)`` also contributes
        ``K_ijᵀ v_i`` to row block ``j``, so only half of ``K`` is ever evaluated.
        """
        n_rows = jax.tree_util.tree_leaves(rows)[0].shape[0]

        def local(pairs_l, valid_l, rows, cols, v, dyn):
            def step(acc, item):
                (i, j), ok = item
                if symmetric:
                    # Diagonal tiles as kernel_fn(x, None), like the untiled kernel: kernels may
                    # treat identical inputs specially (exact unit correlation, a noise term).
                    k = jax.lax.cond(
                        i == j,
                        lambda: k_fn(tile(rows, i), None, dyn),
                        lambda: k_fn(tile(rows, i), tile(cols, j), dyn),
                    )
                else:
                    k = k_fn(tile(rows, i), tile(cols, j), dyn)
                k = k.astype(v.dtype)
                acc = acc.at[i].add(jnp.where(ok, jnp.matmul(k, v[j], precision=_HIGHEST), 0))
                if symmetric:
                    acc = acc.at[j].add(jnp.where(ok & (i != j), jnp.matmul(k.T, v[i], precision=_HIGHEST), 0))
                return acc, None

            acc0 = jnp.zeros((n_rows,) + v.shape[1:], v.dtype)
            acc, _ = jax.lax.scan(step, acc0, (pairs_l[0], valid_l[0]))
            # Gathering the partial sums and adding them in device order (rather than psum,
            # whose reduction order belongs to the collective's implementation) makes the result
            # independent of how the devices are spread over processes.
            return jnp.sum(jax.lax.all_gather(acc, AXIS), axis=0)

        spec, rep = PartitionSpec(AXIS), PartitionSpec()
        return jax.shard_map(
            local, mesh=mesh, in_specs=(spec, spec, rep, rep, rep, rep), out_specs=rep, check_vma=False
        )(pairs, valid, rows, cols, v, dyn)

    train_pairs = pair_schedule([(i, j) for i in range(nt) for j in range(i, nt)])
    test_pairs = None if x_test is None else pair_schedule([(i, j) for i in range(mt) for j in range(nt)])
    mask = (jnp.arange(nt * b) < n).reshape(nt, b, 1)
    limit = 10 * n * k_cols if maxiter is None else int(maxiter)

    @jax.jit
    def solve(xs, xts, train_pairs, test_pairs, dyn, y):
        def kmv(v):
            """``K v`` for ``v`` of shape ``(nt, b, k)`` whose padded rows are zero."""
            return tiled_product(xs, *train_pairs, xs, v, dyn, symmetric=True) * mask

        yp = jnp.concatenate([y, jnp.zeros((nt * b - n, k_cols), y.dtype)]).reshape(nt, b, k_cols)
        alpha, a_alpha, iterations, passes, met, broke = _cg(lambda v: kmv(v) + diag_reg * v, yp, tol, atol, limit)
        train = a_alpha - diag_reg * alpha
        y_norm = jnp.linalg.norm(yp)
        r_norm = jnp.linalg.norm(a_alpha - yp)
        residual = jnp.where(y_norm > 0, r_norm / jnp.where(y_norm > 0, y_norm, 1), r_norm)
        test = None if xts is None else tiled_product(xts, *test_pairs, xs, alpha, dyn, symmetric=False)
        return alpha, train, test, residual, iterations, passes, met, broke

    k_dtype = jax.eval_shape(
        lambda a, c, dyn: k_fn(a, c, dyn), tile(xs, 0), tile(xs, 0), [jnp.asarray(d) for d in dynamic]
    ).dtype
    dtype = jnp.result_type(y_host.dtype, k_dtype, jnp.float32)
    put = lambda tree: jax.tree_util.tree_map(lambda leaf: _dist.global_array(leaf, replicated), tree)
    out = solve(
        put(xs), put(xts), train_pairs, test_pairs, put(list(dynamic)), put(y_host.reshape(n, k_cols).astype(dtype))
    )
    alpha_p, train_p, test_p, residual_p, n_iter, passes, met_rule, broke = out
    view = _dist.local_view
    alpha = view(alpha_p).reshape(nt * b, k_cols)[:n].reshape((n,) + out_shape)
    train = view(train_p).reshape(nt * b, k_cols)[:n].reshape((n,) + out_shape)
    test = (
        None if test_p is None else view(test_p).reshape(mt * b, k_cols)[: int(n_test or 0)].reshape((-1,) + out_shape)
    )
    residual = view(residual_p)
    iterations, met, res = int(view(n_iter)), bool(view(met_rule)), float(residual)
    if not met:
        if bool(view(broke)):
            why = "broke down: pᵀ(K + diag_reg·I)p ≤ 0"
        elif iterations >= limit:
            why = f"stopped at maxiter={limit}"
        else:
            why = f"stalled at {np.dtype(alpha.dtype).name} precision, restarted {int(view(passes)) - 1} times"
        warnings.warn(
            f"kernel_regression_cg did not converge: relative residual ‖(K + diag_reg·I)α − y‖/‖y‖ = "
            f"{res:.3g} after {iterations} iterations (tol={tol:g}, atol={atol:g}; CG {why}). "
            f"K + diag_reg·I is singular or ill-conditioned (duplicated training inputs make K "
            f"singular): increase diag_reg (now {diag_reg:g}; try ~1e-6 to 1e-3 × the mean of "
            "diag K), raise maxiter, or use float64 (jax_enable_x64).",
            CGConvergenceWarning,
            stacklevel=2,
        )
    return KernelRegressionResult(alpha, train, test, residual, iterations, met)

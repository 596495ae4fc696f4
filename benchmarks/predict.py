"""Speed (and accuracy) of ``predict.gradient_descent_mse`` against two baselines, in one run.

Problem: the infinite-width NTK of a one-hidden-layer ReLU network (arc-cosine closed form) on
2000 training and 500 test points in 10 dimensions, ``diag_reg=1e-4`` (condition number 4.2·10⁴),
two outputs, float32 — the case where an ``N·eps·λ_max`` eigenvalue cut-off loses most of the
spectrum.

Compared, each jitted and warmed up (compiled) before timing:

* ``library``: ``ntk_adapters.predict.gradient_descent_mse`` (finite times: a float32 ``eigh``,
  kept because the error it is measured to make in the call's outputs, 2.9·10⁻³ on this kernel
  with ``cond·eps = 5·10⁻³``, is within the 5·10⁻³ it accepts; otherwise a float64 one);
* ``lib 'working'``: the same with ``eigh_precision='working'`` (a float32 ``eigh``, unchecked);
* ``NT algorithm``: neural-tangents' published ``gradient_descent_mse`` algorithm written out here:
  a Cholesky factorization (``cho_factor``/``cho_solve``) of the regularized kernel for ``t=None``,
  ``eigh`` (in the kernel's dtype) for finite times, each computed when first needed;
* ``previous``: this library's earlier approach, also written out here: ``eigh`` of the
  regularized kernel at construction for every use, eigenvalues at or below ``N·eps·λ_max``
  treated as zero, a Cholesky factor as well when none is.

Rows: ``t=None`` including the factorization (predictor built and called), the ``t=None`` call
alone (predictor already built), and 20 finite times (built and called). Medians over
``--repeats``, taken round robin. The last two rows are the relative errors of the test
predictions against float64 (a Cholesky solve for ``t=None``, the eigendecomposition for the 20
times, the largest over them).

Run:  .venv/bin/python benchmarks/predict.py [--repeats 7] [--n 2000] [--m 500]
      .venv/bin/python benchmarks/predict.py --small                 # N = 500, seconds
(``OPENBLAS_NUM_THREADS=1`` on a shared machine: multithreaded OpenBLAS stalls under contention.)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import scipy.linalg

from ntk_adapters import predict

DIAG_REG = 1e-4


def relu_ntk(x1, x2):
    d = x1.shape[1]
    dot = 2 * x1 @ x2.T / d
    q1, q2 = 2 * np.sum(x1**2, 1) / d, 2 * np.sum(x2**2, 1) / d
    norm = np.sqrt(np.outer(q1, q2))
    cos = np.clip(dot / norm, -1, 1)
    theta = np.arccos(cos)
    return norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos) + (np.pi - theta) / (2 * np.pi) * dot


def _regularized(k):
    return k + DIAG_REG * jnp.trace(k) / k.shape[0] * jnp.eye(k.shape[0], dtype=k.dtype)


# --------------------------------------------------------------------------------------------
# Baseline 1: neural-tangents' algorithm (Cholesky for t=None, eigh for finite t, both lazy)
# --------------------------------------------------------------------------------------------


@jax.jit
def _nt_cholesky(k):
    return jsl.cho_factor(_regularized(k), lower=False)[0]


@jax.jit
def _nt_eigh(k):
    return jnp.linalg.eigh(_regularized(k))


@jax.jit
def _nt_inf(c, y, f0, ft0, kt):
    return y, ft0 + kt @ jsl.cho_solve((c, False), y - f0)


@jax.jit
def _nt_finite(evals, evecs, t, y, f0, ft0, kt):
    size = y.size
    expm1 = jnp.expm1(-jnp.maximum(evals, 0.0)[None] * t[:, None] / size)  # (T, P)
    inv_expm1 = expm1 / jnp.abs(evals)[None]
    rhs = evecs.T @ (f0 - y)
    train = f0 + jnp.einsum("ji,ti,ic->tjc", evecs, expm1, rhs)
    test = ft0 + jnp.einsum("lj,ji,ti,ic->tlc", kt, evecs, inv_expm1, rhs)
    return train, test


class NTAlgorithm:
    def __init__(self, k, y):
        self.k, self.y, self._c, self._e = k, y, None, None

    def __call__(self, t, f0, ft0, kt):
        if t is None:
            if self._c is None:
                self._c = _nt_cholesky(self.k)
            return _nt_inf(self._c, self.y, f0, ft0, kt)
        if self._e is None:
            self._e = _nt_eigh(self.k)
        return _nt_finite(*self._e, t, self.y, f0, ft0, kt)


# --------------------------------------------------------------------------------------------
# Baseline 2: the previous approach (eigh at construction, N·eps·λ_max cut-off)
# --------------------------------------------------------------------------------------------


@jax.jit
def _prev_factor(k):
    k = _regularized((k + k.T) / 2)
    lam, vecs = jnp.linalg.eigh(k)
    keep = lam > k.shape[0] * jnp.finfo(k.dtype).eps * jnp.maximum(lam[-1], 0)
    return k, jnp.where(keep, lam, 0), vecs, keep


@jax.jit
def _prev_inf(vecs, lam, keep, y, f0, ft0, kt):
    resid = vecs.T @ (y - f0)
    inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
    return f0 + vecs @ (keep[:, None] * resid), ft0 + (kt @ vecs) @ (inv[:, None] * resid)


@jax.jit
def _prev_inf_chol(chol, y, f0, ft0, kt):
    return jnp.broadcast_to(y, f0.shape), ft0 + kt @ jsl.cho_solve((chol, True), y - f0)


@jax.jit
def _prev_finite(vecs, lam, keep, t, y, f0, ft0, kt):
    rate = 1.0 / y.size
    safe = jnp.where(keep, lam, 1)
    grown = -jnp.expm1(-rate * t[:, None] * lam)
    g = jnp.where(keep, grown / safe, 0)
    resid = vecs.T @ (y - f0)
    train = f0 + jnp.einsum("pq,tqc->tpc", vecs, grown[:, :, None] * resid)
    test = ft0 + jnp.einsum("mq,tqc->tmc", kt @ vecs, g[:, :, None] * resid)
    return train, test


class Previous:
    def __init__(self, k, y):
        self.y = y
        k_reg, self.lam, self.vecs, self.keep = _prev_factor(k)
        self.chol = None
        if bool(jnp.all(self.keep)):
            self.chol = jax.jit(jnp.linalg.cholesky)(k_reg)

    def __call__(self, t, f0, ft0, kt):
        if t is None:
            if self.chol is not None:
                return _prev_inf_chol(self.chol, self.y, f0, ft0, kt)
            return _prev_inf(self.vecs, self.lam, self.keep, self.y, f0, ft0, kt)
        return _prev_finite(self.vecs, self.lam, self.keep, t, self.y, f0, ft0, kt)


def _library(k, y):
    return predict.gradient_descent_mse(k, y, diag_reg=DIAG_REG)


def _library_working(k, y):
    return predict.gradient_descent_mse(k, y, diag_reg=DIAG_REG, eigh_precision="working")


# --------------------------------------------------------------------------------------------


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main() -> None:
    small = "--small" in sys.argv[1:]  # smaller defaults; explicit options still win
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="N = 500, M = 100, 3 repeats (seconds)")
    parser.add_argument("--n", type=int, default=500 if small else 2000)
    parser.add_argument("--m", type=int, default=100 if small else 500)
    parser.add_argument("--repeats", type=int, default=3 if small else 7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n + args.m, 10))
    k_all = relu_ntk(x, x)
    k64, kt64 = k_all[: args.n, : args.n], k_all[args.n :, : args.n]
    y64 = rng.standard_normal((args.n, 2))
    f0 = jnp.zeros((args.n, 2), jnp.float32)
    ft0 = jnp.zeros((args.m, 2), jnp.float32)
    k, kt, y = (jnp.asarray(a, jnp.float32) for a in (k64, kt64, y64))
    steps = jnp.asarray(np.geomspace(1.0, 1e7, 20), jnp.float32)

    kr = k64 + DIAG_REG * np.trace(k64) / args.n * np.eye(args.n)
    reference = kt64 @ scipy.linalg.cho_solve(scipy.linalg.cho_factor(kr), y64)
    lam, vecs = np.linalg.eigh(kr)
    grown = -np.expm1(-np.asarray(steps, np.float64)[:, None] * lam / y64.size)
    reference_t = np.einsum("mp,tp,pc->tmc", kt64 @ vecs, grown / lam, vecs.T @ y64)

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))

    impls = {
        "library": (_library, lambda p, t: p(t, 0.0, 0.0, kt)),
        "library, eigh_precision='working'": (_library_working, lambda p, t: p(t, 0.0, 0.0, kt)),
        "NT algorithm": (NTAlgorithm, lambda p, t: p(t, f0, ft0, kt)),
        "previous": (Previous, lambda p, t: p(t, f0, ft0, kt)),
    }
    cases = ("t=None incl. factorization", "t=None call alone", "20 times incl. factorization")
    samples = {case: {name: [] for name in impls} for case in cases}
    errors = {"t=None: test error vs float64": {}, "20 times: max test error": {}}
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the previous approach warns about its cut-off
        for name, (build, call) in impls.items():
            jax.block_until_ready(call(build(k, y), None))  # compile
            jax.block_until_ready(call(build(k, y), steps))
            built[name] = build(k, y)
            errors["t=None: test error vs float64"][name] = rel(call(built[name], None)[1], reference)
            test_t = call(built[name], steps)[1]
            errors["20 times: max test error"][name] = max(rel(test_t[i], reference_t[i]) for i in range(len(steps)))
        # Round robin, so that a change in the machine's load hits every implementation alike.
        for _ in range(args.repeats):
            for name, (build, call) in impls.items():
                fresh = lambda t, build=build, call=call: call(build(k, y), t)  # noqa: E731
                samples[cases[0]][name].append(_seconds(fresh, None))
                samples[cases[1]][name].append(_seconds(call, built[name], None))
                samples[cases[2]][name].append(_seconds(fresh, steps))
    rows = {case: {name: float(np.median(v)) for name, v in r.items()} for case, r in samples.items()}

    try:
        load = f"load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, {load}, "
        f"OPENBLAS_NUM_THREADS={threads}; device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"jax {jax.__version__}"
    )
    print(
        f"kernel: ReLU NTK, N={args.n} train, M={args.m} test, float32, diag_reg={DIAG_REG:g}, "
        f"cond = {lam[-1] / lam[0]:.2g}; medians of {args.repeats} (seconds)\n"
    )
    short = {
        "library": "library",
        "library, eigh_precision='working'": "lib 'working'",
        "NT algorithm": "NT algo.",
        "previous": "previous",
    }
    head = f"{'':<31}" + "".join(f" {short[n]:>13}" for n in impls) + f" {'lib/NT':>7} {'lib/prev':>9}"
    print(head)
    print("-" * len(head))
    for case, r in rows.items():
        line = f"{case:<31}" + "".join(f" {r[n]:>13.3f}" for n in impls)
        print(line + f" {r['library'] / r['NT algorithm']:>7.2f} {r['library'] / r['previous']:>9.2f}")
    for case, r in errors.items():
        print(f"{case:<31}" + "".join(f" {r[n]:>13.1e}" for n in impls))


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmarks: the machine and device they ran on, and timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """One line: JAX version, platform, device kind and count, CPU model and core count."""
    d = jax.devices()[0]
    return (
        f"jax {jax.__version__}; platform {d.platform}; device {d.device_kind} ×{jax.device_count()}; "
        f"CPU {cpu_model()} ({os.cpu_count()} cores); x64 {'on' if jax.config.jax_enable_x64 else 'off'}"
    )


def compile_fn(fn: Callable, *args):
    """``(compiled, compile seconds)`` of ``jax.jit(fn)`` for these arguments."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def time_compiled(compiled, args: Sequence, repeats: int, slow: float = 5.0) -> float:
    """Median seconds of ``repeats`` runs after one warm-up run (that single run when it exceeds ``slow``)."""
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t
    if first > slow or repeats <= 1:
        return first
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def peak_mib(compiled) -> float:
    try:
        mem = compiled.memory_analysis()
        return (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
    except Exception:  # memory_analysis is backend-dependent
        return float("nan")


def table(header: Sequence[str], rows: Sequence[Sequence], widths: Sequence[int] = ()) -> str:
    """A plain text table; the first column left-aligned, the others right-aligned."""
    widths = list(widths) or [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: " ".join(
        f"{str(c):<{w}}" if i == 0 else f"{str(c):>{w}}" for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def round_robin(compiled: dict, args: Sequence, repeats: int, slow: float = 5.0) -> dict:
    """Median seconds of each compiled function, runs taken in turn so that load drift on a shared
    machine hits every function alike; a function whose warm-up run exceeds ``slow`` runs once."""
    first = {}
    for name, fn in compiled.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[name] = time.perf_counter() - t
    runs = {name: [] for name in compiled if first[name] <= slow}
    for _ in range(repeats):
        for name in runs:
            t = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            runs[name].append(time.perf_counter() - t)
    return {name: statistics.median(runs[name]) if runs.get(name) else first[name] for name in compiled}


def relu_maps(k12, q1, q2):
    """E[relu(u) relu(v)] and E[relu'(u) relu'(v)] for covariance k12 and variances q1, q2: the
    arc-cosine kernels of a hand-written recursion, in the cheapest form. The angle
    θ = atan2(y, k12), y = sqrt(q1 q2 − k12²) ≥ 0, is one arctan of a ratio in [−1, 1] (XLA's
    atan2 costs about three times as much on a CPU); no correlation is formed."""
    y = jnp.sqrt(jnp.maximum(q1 * q2 - k12 * k12, 0.0))
    steep = jnp.abs(k12) < y
    den = jnp.where(steep, y, jnp.where(k12 == 0, 1.0, k12))
    th = jnp.where(steep, jnp.pi / 2, jnp.where(k12 < 0, jnp.pi, 0.0)) + jnp.arctan(jnp.where(steep, -k12, y) / den)
    return (y + (jnp.pi - th) * k12) / (2 * jnp.pi), (jnp.pi - th) / (2 * jnp.pi)

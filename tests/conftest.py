"""Shared test configuration: float64 everywhere, so kernel comparisons are limited by the
mathematics (Monte Carlo error, quadrature) and not by float32 round-off.

``NTK_ADAPTERS_TEST_X64=0`` leaves 64-bit floats off (JAX's default), to check that the library
works as most users run it; tests marked ``float64`` (tight comparisons with closed forms, which
float32 round-off alone would fail) are then skipped.
"""

import os

# The suite compiles hundreds of small programs and runs each a few times: XLA's CPU backend
# spends most of that time in LLVM's optimizations, which do not change the results.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax

X64 = os.environ.get("NTK_ADAPTERS_TEST_X64", "1").strip().lower() not in ("0", "false", "no", "off")
jax.config.update("jax_enable_x64", X64)

# Both xdist workers, and later runs, reuse each other's expensive compilations (the same model
# programs recur across test files). NTK_ADAPTERS_TEST_COMPILATION_CACHE= (empty) turns it off.
_CACHE = os.environ.get(
    "NTK_ADAPTERS_TEST_COMPILATION_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax-compilation"),
)
if _CACHE:
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)

import math

import numpy as np
import pytest


def relu_nngp_by_hand(x1, x2, weight_var=1.0, bias_var=0.0):
    """NNGP of one hidden ReLU layer, written out by hand (arc-cosine kernel of degree 1).

    First layer: q = σw² x·x'/d + σb²; E[relu(u) relu(v)] = √(q11 q22)/(2π) (sin θ + (π − θ) cos θ)
    with cos θ = q12/√(q11 q22).
    """
    x1, x2 = np.asarray(x1, float), np.asarray(x2, float)
    d = x1.shape[1]
    q12 = weight_var * x1 @ x2.T / d + bias_var
    q11 = weight_var * np.sum(x1 * x1, 1) / d + bias_var
    q22 = weight_var * np.sum(x2 * x2, 1) / d + bias_var
    norm = np.sqrt(np.outer(q11, q22))
    cos = np.clip(q12 / norm, -1.0, 1.0)
    theta = np.arccos(cos)
    return norm / (2 * math.pi) * (np.sin(theta) + (math.pi - theta) * cos)


@pytest.fixture(scope="session")
def predict_problem():
    """A generic PSD kernel on 8 train + 5 test points (from random features), targets and initial
    outputs with 2 output units: ``k`` ``(8, 8)``, ``kt`` ``(5, 8)``, ``ktt`` ``(5, 5)``, ``y``, ``f0``
    ``(8, 2)``, ``f0t`` ``(5, 2)``."""
    n, m = 8, 5
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((n + m, 30))
    k = phi @ phi.T / 30 + 0.05 * np.eye(n + m)  # jitter keeps the train block well conditioned
    k_train, k_test_train, k_test = k[:n, :n], k[n:, :n], k[n:, n:]
    y = rng.standard_normal((n, 2))
    f0 = rng.standard_normal((n, 2))
    f0_test = rng.standard_normal((m, 2))
    return dict(k=k_train, kt=k_test_train, ktt=k_test, y=y, f0=f0, f0t=f0_test)


# Var of N(0, 1) truncated to [-2, 2], uncorrected (Haiku's default Linear initializer):
# 1 − 2·2·φ(2)/(Φ(2) − Φ(−2)).
HAIKU_TRUNCATED_VARIANCE = 1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2))


def pytest_collection_modifyitems(config, items):
    if X64:
        return
    skip = pytest.mark.skip(reason="needs float64 (NTK_ADAPTERS_TEST_X64=0 leaves x64 off)")
    for item in items:
        if item.get_closest_marker("float64") is not None:
            item.add_marker(skip)


def _version(module) -> tuple[int, ...]:
    return tuple(int(part) for part in module.__version__.split(".")[:2] if part.isdigit())


def pytest_configure(config):
    # pytest 9.2 stores node ids where pytest-xdist (3.8) cannot append the group, so --dist
    # loadgroup silently ignores xdist_group and every worker rebuilds the shared fixtures.
    if hasattr(config, "workerinput") or getattr(config.option, "dist", "no") != "loadgroup":
        return
    import xdist

    if _version(pytest) >= (9, 2) and _version(xdist) <= (3, 8):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} ignores xdist_group "
            "under --dist loadgroup; install the versions pinned in pyproject.toml ('.[test]')"
        )


@pytest.fixture(scope="session")
def arccos_nngp():
    return relu_nngp_by_hand


@pytest.fixture(scope="session")
def haiku_truncated_variance():
    return HAIKU_TRUNCATED_VARIANCE

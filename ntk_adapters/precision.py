"""Precision of the matrix products behind a kernel.

On NVIDIA GPUs (Ampere and later) JAX multiplies float32 matrices in TensorFloat-32 by default:
operands rounded to 10 mantissa bits, relative errors around ``1e-3`` per product. A kernel
computed that way is off by ~``3e-4`` relative, which is more than enough to spoil the linear
solves of kernel regression (the kernel's small eigenvalues are where the predictions come
from). CPUs ignore the setting; TPUs round to bfloat16 by default.

Every kernel function (empirical, Monte Carlo, ``infinite_kernel_fn``) therefore takes
``precision=`` (``'highest'`` by default) and applies it to

* the contractions the library writes (``J1 J2ᵀ``, the activation and cotangent Grams of
  ``'structured'``, the NNGP outer product), through the ``precision=`` of each ``einsum``;
* the model's own forward and backward products while the kernel is traced, through
  :func:`jax.default_matmul_precision`; a layer that sets its own ``precision=`` keeps it;
* the products of the infinite-width rules (input Grams, quadrature, fixed arrays, attention),
  traced in the same context.

Solves with a kernel (``predict``, ``kernel_regression_cg``) have no such argument: their
products are always HIGHEST.

``'high'`` allows three-pass bfloat16 (TPU) or TF32 (GPU) products, ``'default'`` leaves every
product to JAX's setting (``jax_default_matmul_precision``, TF32 on GPU unless changed). On CPU
all three give the same float32 results. One product is HIGHEST whatever is asked: the
extraction of convolution patches in ``'structured'``, a copy through a one-hot filter that
any rounding would turn into an error of its own.
"""

from __future__ import annotations

import contextlib
from typing import Literal, Optional, Union

import jax

PrecisionName = Literal["highest", "high", "default"]
PrecisionLike = Union[PrecisionName, jax.lax.Precision]

_BY_NAME = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH, "default": jax.lax.Precision.DEFAULT}


def canonical(precision: PrecisionLike) -> jax.lax.Precision:
    """``precision`` as a :class:`jax.lax.Precision`, with an error naming the argument otherwise."""
    if isinstance(precision, jax.lax.Precision):
        return precision
    if isinstance(precision, str) and precision in _BY_NAME:
        return _BY_NAME[precision]
    raise ValueError(
        f"precision={precision!r}; choose 'highest' (full float32, the default), 'high', 'default' "
        "(JAX's own setting: TensorFloat-32 on NVIDIA GPUs) or a jax.lax.Precision value"
    )


def einsum_precision(precision: PrecisionLike) -> Optional[jax.lax.Precision]:
    """What to pass as ``precision=`` to the library's einsums: ``None`` for ``'default'`` so
    that JAX's global setting applies there too."""
    p = canonical(precision)
    return None if p == jax.lax.Precision.DEFAULT else p


def matmul_precision(precision: PrecisionLike):
    """Context in which the model's own products (those without an explicit precision) are traced."""
    p = canonical(precision)
    if p == jax.lax.Precision.DEFAULT:
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest" if p == jax.lax.Precision.HIGHEST else "high")

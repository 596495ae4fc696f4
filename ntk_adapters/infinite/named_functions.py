"""The elementwise functions the engine knows by name: each one's function and, where it exists,
its closed-form kernel ``(E[φ(u)φ(v)], E[φ'(u)φ'(v)])`` for broadcastable ``c, q1, q2`` (the
covariance and the variances of the Gaussian pair); the others are integrated by quadrature
(:mod:`ntk_adapters.infinite.elementwise`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ntk_adapters.infinite.bivariate import _arcsin, _corr
from ntk_adapters.infinite.common_forms import erf_kernels, piecewise_linear_kernels

Array = jax.Array

__all__ = ["CLOSED_FORMS", "QUADRATURE_NAMES", "named_spec"]


# ----------------------------------------------------------------------------------------------
# Closed forms: each returns (E[phi(u)phi(v)], E[phi'(u)phi'(v)]) for broadcastable c, q1, q2.


def _cf_affine(c, q1, q2, a=1.0, b=0.0):
    nngp = a * a * c + b * b
    return nngp, jnp.full_like(nngp, a * a)


def _cf_identity(c, q1, q2):
    return _cf_affine(c, q1, q2)


# jax.nn.relu'(0) = 0, jax.nn.leaky_relu'(0) = 1 (``x >= 0`` takes the identity branch), abs'(0) = 0.
def _cf_relu(c, q1, q2):
    return piecewise_linear_kernels(1.0, 0.0, 0.0, c, q1, q2)


def _cf_leaky_relu(c, q1, q2, negative_slope=0.01):
    return piecewise_linear_kernels(1.0, negative_slope, 1.0, c, q1, q2)


def _cf_abs(c, q1, q2):
    return piecewise_linear_kernels(1.0, -1.0, 0.0, c, q1, q2)


def _cf_sign(c, q1, q2):
    _, rho, positive = _corr(c, q1, q2)
    nngp = jnp.where(positive, (2 / jnp.pi) * _arcsin(rho), 0.0)
    return nngp, jnp.zeros_like(nngp)


def _cf_erf(c, q1, q2, a=1.0):
    return erf_kernels(1.0, math.sqrt(2.0) * a, c, q1, q2)


def _sin_moment(c, q1, q2, a, b):
    a2 = a * a
    return 0.5 * (jnp.exp(-a2 * (q1 + q2 - 2 * c) / 2) - jnp.cos(2 * b) * jnp.exp(-a2 * (q1 + q2 + 2 * c) / 2))


def _cf_sin(c, q1, q2, a=1.0, b=0.0):
    return _sin_moment(c, q1, q2, a, b), a * a * _sin_moment(c, q1, q2, a, b + jnp.pi / 2)


def _cf_cos(c, q1, q2, a=1.0, b=0.0):
    return _cf_sin(c, q1, q2, a, b + jnp.pi / 2)


def _cf_exp(c, q1, q2, a=1.0):
    nngp = jnp.exp(a * a * (q1 + q2 + 2 * c) / 2)
    return nngp, a * a * nngp


def _cf_square(c, q1, q2):
    return q1 * q2 + 2 * c * c, 4 * c


# ----------------------------------------------------------------------------------------------
# The functions themselves (for quadrature, tests and the engine's pattern matching).


@dataclasses.dataclass(frozen=True)
class _Spec:
    fn: Callable[..., Array]  # fn(x, **params)
    closed_form: Optional[Callable[..., tuple[Array, Array]]]
    linear: bool = False  # phi(x) = a x: a zero-mean GP stays one


def _sign(x):
    return jnp.sign(x)


_SPECS: dict[str, _Spec] = {
    "identity": _Spec(lambda x: x, _cf_identity, linear=True),
    "affine": _Spec(lambda x, a=1.0, b=0.0: a * x + b, _cf_affine, linear=True),
    "relu": _Spec(jax.nn.relu, _cf_relu),
    "leaky_relu": _Spec(lambda x, negative_slope=0.01: jax.nn.leaky_relu(x, negative_slope), _cf_leaky_relu),
    "abs": _Spec(jnp.abs, _cf_abs),
    "sign": _Spec(_sign, _cf_sign),
    "erf": _Spec(lambda x, a=1.0: jax.scipy.special.erf(a * x), _cf_erf),
    "sin": _Spec(lambda x, a=1.0, b=0.0: jnp.sin(a * x + b), _cf_sin),
    "cos": _Spec(lambda x, a=1.0, b=0.0: jnp.cos(a * x + b), _cf_cos),
    "exp": _Spec(lambda x, a=1.0: jnp.exp(a * x), _cf_exp),
    "square": _Spec(jnp.square, _cf_square),
    # No closed form: quadrature of the very function Flax / Haiku / jax.nn use.
    "tanh": _Spec(jnp.tanh, None),
    "sigmoid": _Spec(jax.nn.sigmoid, None),
    "softplus": _Spec(jax.nn.softplus, None),
    "gelu": _Spec(lambda x, approximate=True: jax.nn.gelu(x, approximate=approximate), None),
    "silu": _Spec(jax.nn.silu, None),
    "swish": _Spec(jax.nn.silu, None),
    "elu": _Spec(lambda x, alpha=1.0: jax.nn.elu(x, alpha), None),
    "selu": _Spec(jax.nn.selu, None),
    "celu": _Spec(lambda x, alpha=1.0: jax.nn.celu(x, alpha), None),
    "softsign": _Spec(jax.nn.soft_sign, None),
    "relu6": _Spec(jax.nn.relu6, None),
    "hard_tanh": _Spec(jax.nn.hard_tanh, None),
    "log_sigmoid": _Spec(jax.nn.log_sigmoid, None),
    "mish": _Spec(lambda x: x * jnp.tanh(jax.nn.softplus(x)), None),
}

#: Names with a closed-form kernel.
CLOSED_FORMS: tuple[str, ...] = tuple(k for k, v in _SPECS.items() if v.closed_form is not None)
#: Names computed by Gauss–Hermite quadrature of the named ``jax.nn`` / ``jnp`` function.
QUADRATURE_NAMES: tuple[str, ...] = tuple(k for k, v in _SPECS.items() if v.closed_form is None)


def named_spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown elementwise function {name!r}; known names: {sorted(_SPECS)}. "
            "Pass the function itself (a jnp-traceable callable) to use quadrature."
        ) from None

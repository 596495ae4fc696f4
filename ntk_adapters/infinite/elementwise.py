"""Gaussian expectations of elementwise nonlinearities: the infinite-width kernel of ``phi``.

At infinite width, a channel ``u`` of a hidden layer evaluated on two inputs is a zero-mean
Gaussian pair ``(u, v) ~ N(0, [[q1, c], [c, q2]])``, where ``c`` is the NNGP between the two
inputs and ``q1``, ``q2`` their variances. An elementwise nonlinearity ``phi`` maps the kernel to

* ``nngp  ← E[phi(u) phi(v)]``          (the second moment the next random linear layer sees),
* ``ntk   ← E[phi'(u) phi'(v)] · ntk``  (the chain rule, averaged over the infinitely many channels),
* ``q     ← E[phi(u)²]``                (the new per-input variances).

``phi(u)`` is not zero-mean in general (e.g. ReLU). That is fine: a following linear layer with
zero-mean weights sees exactly the *uncentred* second moment ``E[phi(u) phi(v)]``, which is what
is computed here; the output is marked ``is_gaussian=False`` because it is no longer a zero-mean
Gaussian process and a second nonlinearity cannot be applied to it before another linear layer.

Closed forms (derived by hand; ``s = sqrt(q1 q2)``, ``ρ = c / s`` clipped to ``[-1, 1]``,
``θ = arccos ρ``):

==================  ===========================================  ==========================================
``phi``             ``E[phi(u) phi(v)]``                         ``E[phi'(u) phi'(v)]``
==================  ===========================================  ==========================================
``identity``        ``c``                                        ``1``
``affine`` a·x+b    ``a² c + b²``                                ``a²``
``relu``            ``s (sin θ + (π − θ) cos θ) / (2π)``  (J1)   ``(π − θ) / (2π)``  (J0)
``leaky_relu`` α    ``α c + (1 − α)² J1``                        ``α + (1 − α)² J0``
``abs``             ``4 J1 − c``                                 ``(2/π) arcsin ρ``
``sign``            ``(2/π) arcsin ρ``                           ``0`` (zero almost everywhere)
``erf`` erf(a·x)    ``(2/π) arcsin(2a²c / sqrt((1+2a²q1)(1+2a²q2)))``  ``(4a²/π) / sqrt((1+2a²q1)(1+2a²q2) − 4a⁴c²)``
``sin`` sin(a·x+b)  ``½ (e^{−a²(q1+q2−2c)/2} − cos 2b · e^{−a²(q1+q2+2c)/2})``  ``a²`` × the same with ``b + π/2``
``cos`` cos(a·x+b)  ``sin`` with ``b + π/2``                     ``a²`` × ``sin`` with ``b + π``
``exp`` exp(a·x)    ``e^{a²(q1+q2+2c)/2}``                       ``a²`` × the same
``square`` x²       ``q1 q2 + 2c²``                              ``4c``
==================  ===========================================  ==========================================

(``E[u relu(v)] = c/2`` by the symmetry ``(u, v) → (−u, −v)``, which gives the leaky ReLU and
``abs = 2 relu(x) − x`` rows from the ReLU row; ``sin``/``cos`` follow from
``sin A sin B = ½(cos(A−B) − cos(A+B))`` and ``E cos(w) = e^{−Var(w)/2}``; ``erf`` is the classic
Williams (1997) integral.) ``sign`` has derivative zero almost everywhere, so it contributes
nothing to the NTK of the layers before it: ``ntk ← 0``.

When a variance is zero the corresponding value is the constant ``0``, so the expectation factors:
``E[phi(0) phi(v)] = phi(0) E[phi(v)]``; the same holds for the derivative, with ``phi'(0)`` taken
as JAX defines it (``relu'(0) = 0``, ``leaky_relu'(0) = 1``, ``sign(0) = 0``). All formulas are
written with ``jnp.where`` guards so that no NaN appears there, under ``jit`` too.

Any other ``phi`` (``tanh``, ``gelu``, ``silu``, ``softplus``, ``sigmoid``, a user function, ...)
uses two-dimensional Gauss–Hermite quadrature: with probabilists' Hermite nodes ``z_i`` and
weights ``w_i`` (normalized to sum to one),
``E[f(u) f(v)] ≈ Σ_ij w_i w_j f(σ1 z_i) f(σ2 (ρ z_i + sqrt(1 − ρ²) z_j))`` (a Cholesky
factorization of the 2×2 covariance, taking the input with the larger variance first so that
the result is exactly symmetric in the two inputs), with ``phi'`` obtained by forward-mode differentiation
(``jax.jvp``) of ``phi``. It is exact for polynomials up to degree ``2n − 1`` in each variable
and converges exponentially for smooth ``phi``; for ``phi`` with a kink (ReLU-like) it converges
only algebraically. Measured absolute errors ``|quadrature − closed form|`` with the default
``n_points=32`` (float64, ``q1 = q2 = 1``; ``E[phi phi]`` / ``E[phi' phi']``; reproduced by
``tests/infinite/test_elementwise.py::test_quadrature_accuracy_table``):

=========  ===================  ===================  ===================
``phi``    ``ρ = 0.3``          ``ρ = 0.99``         ``ρ = −0.999``
=========  ===================  ===================  ===================
sin        1e-16 / 1e-16        2e-16 / 1e-16        1e-16 / 1e-16
erf        3e-11 / 3e-10        8e-8 / 2e-6          1e-7 / 2e-6
relu       1.5e-3 / 2.0e-2      8e-5 / 1.3e-2        5e-6 / 7e-3
=========  ===================  ===================  ===================

With ``n_points=64`` erf is at 1e-13 / 5e-12 and relu at 9e-4 / 1.4e-2: a kinked ``phi`` barely
improves, so it should use its closed form (the names above do). ``relu6``, ``hard_tanh`` have kinks
and get the same ~1e-2 accuracy for the derivative kernel; ``tanh``, ``gelu``, ``silu``,
``softplus``, ``sigmoid`` are smooth and behave like ``erf``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite.kernel import Kernel

Array = jax.Array
Phi = Union[str, Callable[[Array], Array]]

#: Default number of Gauss–Hermite nodes per dimension (``n_points²`` evaluations per entry).
DEFAULT_QUADRATURE_POINTS = 32

__all__ = [
    "CLOSED_FORMS",
    "DEFAULT_QUADRATURE_POINTS",
    "QUADRATURE_NAMES",
    "apply_elementwise",
    "elementwise_fn",
    "gaussian_expectations",
    "gaussian_variance",
    "has_closed_form",
]


# ----------------------------------------------------------------------------------------------
# Small numerically safe helpers.


def _safe_sqrt(x: Array) -> Array:
    """``sqrt(max(x, 0))`` with a zero (not NaN) gradient at 0."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _corr(c: Array, q1: Array, q2: Array) -> tuple[Array, Array, Array]:
    """``(s, ρ, positive)`` with ``s = sqrt(q1 q2)``, ``ρ = c/s`` clipped; ``ρ = 0`` where ``s = 0``."""
    positive = (q1 > 0) & (q2 > 0)
    # sqrt(q1·q2) is exactly q when q1 = q2 = q (so a diagonal entry has ρ = 1 exactly, where
    # arccos/arcsin would turn a rounding error ε into sqrt(ε)); sqrt(q1)·sqrt(q2) only where the
    # product of two tiny variances would underflow.
    qq = q1 * q2
    normal = qq >= jnp.finfo(qq.dtype).tiny
    s = jnp.where(normal, _safe_sqrt(jnp.where(normal, qq, 1.0)), _safe_sqrt(q1) * _safe_sqrt(q2))
    s_safe = jnp.where(positive, s, 1.0)
    rho = jnp.where(positive, jnp.clip(c / s_safe, -1.0, 1.0), 0.0)
    return s, rho, positive


def _factor_if_degenerate(value, positive, q1, q2, mean_pos, at_zero):
    """Where one variance is zero, replace ``value`` by ``E[f(u)] E[f(v)]``.

    ``mean_pos`` is ``E[f(w)]`` for ``w`` with positive variance and ``at_zero`` is ``f(0)``.
    """
    m1 = jnp.where(q1 > 0, mean_pos, at_zero)
    m2 = jnp.where(q2 > 0, mean_pos, at_zero)
    return jnp.where(positive, value, m1 * m2)


def _angle(rho: Array) -> tuple[Array, Array]:
    """``(θ, sin θ)`` for ``θ = arccos ρ``, with finite gradients at ``ρ = ±1``.

    At ``|ρ| = 1`` the infinite derivatives of ``arccos`` and ``sqrt(1 − ρ²)`` cancel in every
    kernel below (e.g. ``d/dρ (sin θ − θ ρ) = −θ``); dropping both there gives the exact gradient.
    """
    inside = jnp.abs(rho) < 1.0
    r = jnp.where(inside, rho, 0.0)
    theta = jnp.where(inside, jnp.arccos(r), jnp.where(rho > 0, 0.0, jnp.pi))
    sin_t = jnp.where(inside, jnp.sqrt(1.0 - r * r), 0.0)
    return theta, sin_t


def _arccos_terms(c, q1, q2):
    s, rho, positive = _corr(c, q1, q2)
    theta, sin_t = _angle(rho)
    j1 = s * (sin_t + (jnp.pi - theta) * rho) / (2 * jnp.pi)
    j0 = (jnp.pi - theta) / (2 * jnp.pi)
    return s, rho, positive, j1, j0


def _arcsin(rho: Array) -> Array:
    """``arcsin ρ`` on ``[-1, 1]`` with a finite (zero) gradient at ``ρ = ±1``."""
    inside = jnp.abs(rho) < 1.0
    return jnp.where(inside, jnp.arcsin(jnp.where(inside, rho, 0.0)), jnp.sign(rho) * jnp.pi / 2)


# ----------------------------------------------------------------------------------------------
# Closed forms: each returns (E[phi(u)phi(v)], E[phi'(u)phi'(v)]) for broadcastable c, q1, q2.


def _cf_affine(c, q1, q2, a=1.0, b=0.0):
    nngp = a * a * c + b * b
    return nngp, jnp.full_like(nngp, a * a)


def _cf_identity(c, q1, q2):
    return _cf_affine(c, q1, q2)


def _cf_relu(c, q1, q2):
    _, _, positive, j1, j0 = _arccos_terms(c, q1, q2)
    nngp = jnp.where(positive, j1, 0.0)
    dd = _factor_if_degenerate(j0, positive, q1, q2, 0.5, 0.0)
    return nngp, dd


def _cf_leaky_relu(c, q1, q2, negative_slope=0.01):
    al = negative_slope
    _, _, positive, j1, j0 = _arccos_terms(c, q1, q2)
    nngp = jnp.where(positive, al * c + (1 - al) ** 2 * j1, 0.0)
    dd = _factor_if_degenerate(al + (1 - al) ** 2 * j0, positive, q1, q2, (1 + al) / 2, 1.0)
    return nngp, dd


def _cf_abs(c, q1, q2):
    _, rho, positive, j1, _ = _arccos_terms(c, q1, q2)
    nngp = jnp.where(positive, 4 * j1 - c, 0.0)
    dd = jnp.where(positive, (2 / jnp.pi) * _arcsin(rho), 0.0)
    return nngp, dd


def _cf_sign(c, q1, q2):
    _, rho, positive = _corr(c, q1, q2)
    nngp = jnp.where(positive, (2 / jnp.pi) * _arcsin(rho), 0.0)
    return nngp, jnp.zeros_like(nngp)


def _cf_erf(c, q1, q2, a=1.0):
    a2 = a * a
    d1 = 1 + 2 * a2 * jnp.maximum(q1, 0.0)
    d2 = 1 + 2 * a2 * jnp.maximum(q2, 0.0)
    s, _, _ = _corr(c, q1, q2)
    c = jnp.clip(c, -s, s)
    nngp = (2 / jnp.pi) * jnp.arcsin(jnp.clip(2 * a2 * c / jnp.sqrt(d1 * d2), -1.0, 1.0))
    det = jnp.maximum(d1 * d2 - 4 * a2 * a2 * c * c, 1.0)
    dd = (4 * a2 / jnp.pi) / jnp.sqrt(det)
    return nngp, dd


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


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown elementwise function {name!r}; known names: {sorted(_SPECS)}. "
            "Pass the function itself (a jnp-traceable callable) to use quadrature."
        ) from None


def _check_params(name: str, fn: Callable, params: dict) -> None:
    import inspect

    allowed = [p for p in inspect.signature(fn).parameters][1:]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"elementwise function {name!r} takes parameters {allowed}; got unknown {unknown}")


def has_closed_form(phi: Phi) -> bool:
    """Whether ``phi`` (a name) has a closed-form kernel; callables never do."""
    return isinstance(phi, str) and _spec(phi).closed_form is not None


def elementwise_fn(phi: Phi, **params: Any) -> Callable[[Array], Array]:
    """The elementwise function ``x -> phi(x; **params)`` itself.

    Example::

        f = elementwise_fn("leaky_relu", negative_slope=0.2)
        f(jnp.array([-1.0, 2.0]))  # [-0.2, 2.0]
    """
    if isinstance(phi, str):
        spec = _spec(phi)
        _check_params(phi, spec.fn, params)
        return functools.partial(spec.fn, **params) if params else spec.fn
    if not callable(phi):
        raise TypeError(f"phi must be a name or a callable; got {type(phi).__name__}")
    return functools.partial(phi, **params) if params else phi


# ----------------------------------------------------------------------------------------------
# Quadrature.


@functools.lru_cache(maxsize=None)
def _hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2 * math.pi)


def _quadrature(f: Callable, c: Array, q1: Array, q2: Array, n: int, derivative: bool) -> tuple[Array, Optional[Array]]:
    """``E[f(u) f(v)]`` (and ``E[f'(u) f'(v)]``) by ``n × n`` Gauss–Hermite quadrature.

    ``u = σa z1``, ``v = σb (ρ z1 + sqrt(1 − ρ²) z2)`` (Cholesky), where ``a`` is the input with the
    larger variance: the canonical order makes the result exactly symmetric under swapping the
    two inputs, so a kernel matrix stays symmetric. ``c``, ``q1``, ``q2`` share one shape. With
    ``derivative`` each node evaluates ``f`` and ``f'`` together in one forward-mode pass.
    """
    nodes, weights = _hermite(n)
    dtype = c.dtype
    nodes = jnp.asarray(nodes, dtype)
    weights = jnp.asarray(weights, dtype)
    qa = jnp.maximum(q1, q2)
    qb = jnp.minimum(q1, q2)
    sa = _safe_sqrt(qa)
    sb = _safe_sqrt(qb)
    _, rho, _ = _corr(c, qa, qb)
    b1 = (sb * rho)[..., None]
    b2 = (sb * _angle(rho)[1])[..., None]

    if derivative:
        def both(x):
            return jax.jvp(f, (x,), (jnp.ones_like(x),))
    else:
        def both(x):
            return f(x), None

    def step(acc, zw):
        z, w = zw
        fi, dfi = both(b1 * z + b2 * nodes)  # inner node values, (..., n)
        fo, dfo = both(sa * z)
        acc0 = acc[0] + w * fo * (fi @ weights)  # E[f(v) | z1 = z] by the inner sum
        acc1 = acc[1] + w * dfo * (dfi @ weights) if derivative else acc[1]
        return (acc0, acc1), None

    # Scanning over the outer node keeps memory at (entries × n), not (entries × n²).
    zero = jnp.zeros(c.shape, dtype)
    (acc0, acc1), _ = jax.lax.scan(step, (zero, zero), (nodes, weights))
    return acc0, (acc1 if derivative else None)


# ----------------------------------------------------------------------------------------------
# Public raw-array API.


def gaussian_expectations(
    phi: Phi,
    cov12: Array,
    var1: Array,
    var2: Array,
    *,
    derivative: bool = True,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    **params: Any,
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` for ``(u, v) ~ N(0, [[var1, cov12], [cov12, var2]])``.

    Args:
      phi: a name from :data:`CLOSED_FORMS` or :data:`QUADRATURE_NAMES`, or an elementwise
        jnp-traceable callable ``phi(x, **params)``.
      cov12, var1, var2: arrays broadcastable to one shape (the output shape).
      derivative: also return ``E[phi'(u) phi'(v)]`` (else ``None``).
      n_points: Gauss–Hermite nodes per dimension for the quadrature path.
      method: ``'auto'`` (closed form where known, else quadrature), ``'closed_form'`` or
        ``'quadrature'`` (forces quadrature, e.g. to check a closed form).
      **params: parameters of ``phi`` (``negative_slope`` for ``leaky_relu``, ``a``/``b`` for
        ``affine``/``erf``/``sin``/``cos``/``exp``, ``approximate`` for ``gelu``, ...).

    Returns:
      ``(nngp, dnngp)``, both of the broadcast shape; ``dnngp`` is ``None`` unless ``derivative``.

    Example::

        nngp, dd = gaussian_expectations("relu", jnp.array(0.5), 1.0, 1.0)
        # nngp = (sin θ + (π − θ) cos θ)/(2π) with θ = arccos 0.5; dd = (π − θ)/(2π) = 1/3
    """
    if method not in ("auto", "closed_form", "quadrature"):
        raise ValueError(f"method must be 'auto', 'closed_form' or 'quadrature'; got {method!r}")
    c, q1, q2 = jnp.broadcast_arrays(*(jnp.asarray(a) for a in (cov12, var1, var2)))
    dtype = jnp.result_type(c, q1, q2)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    c, q1, q2 = c.astype(dtype), q1.astype(dtype), q2.astype(dtype)

    closed = None
    if isinstance(phi, str):
        spec = _spec(phi)
        _check_params(phi, spec.fn, params)
        closed = spec.closed_form
    if method == "closed_form" and closed is None:
        raise ValueError(f"phi={phi!r} has no closed form; closed forms exist for {list(CLOSED_FORMS)}")
    use_closed = closed is not None and method != "quadrature"
    if not use_closed and not 1 <= int(n_points) <= 300:
        raise ValueError(f"n_points must be between 1 and 300 (numpy's Hermite nodes overflow beyond); got {n_points}")

    key = (phi, tuple(sorted(params.items())), use_closed, int(n_points), bool(derivative))
    try:
        fn = _compiled(*key)
    except TypeError:  # unhashable phi or parameters (e.g. traced arrays): no caching
        fn = _expectation_fn(*key)
    return fn(c, q1, q2)


def _expectation_fn(phi, params_items, use_closed, n_points, derivative):
    params = dict(params_items)

    def fn(c, q1, q2):
        if use_closed:
            nngp, dd = _spec(phi).closed_form(c, q1, q2, **params)
            nngp = jnp.broadcast_to(nngp, c.shape).astype(c.dtype)
            dd = jnp.broadcast_to(dd, c.shape).astype(c.dtype) if derivative else None
            return nngp, dd
        return _quadrature(elementwise_fn(phi, **params), c, q1, q2, n_points, derivative)

    return fn


@functools.lru_cache(maxsize=256)
def _compiled(phi, params_items, use_closed, n_points, derivative):
    # One jitted function per (phi, parameters, method): eager calls compile once per shape
    # instead of dispatching (and compiling) op by op.
    return jax.jit(_expectation_fn(phi, params_items, use_closed, n_points, derivative))


def gaussian_variance(
    phi: Phi,
    var: Array,
    *,
    derivative: bool = False,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    **params: Any,
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u)²]`` (and ``E[phi'(u)²]`` if ``derivative``) for ``u ~ N(0, var)``; shape of ``var``.

    Example::

        q, _ = gaussian_variance("relu", jnp.array([1.0, 4.0]))  # [0.5, 2.0]
    """
    return gaussian_expectations(
        phi, var, var, var, derivative=derivative, n_points=n_points, method=method, **params
    )


# ----------------------------------------------------------------------------------------------
# Kernel-level entry point.


def _full_diagonal(cov: Array) -> Array:
    """``(N, H, H', W, W')`` → ``(N, H, W)``: the per-position variances of a 'full' covariance."""
    for _ in range((cov.ndim - 1) // 2):
        cov = jnp.diagonal(cov, axis1=1, axis2=2)
    return cov


def _interleave(diag: Array, first: bool) -> Array:
    """``(N, H, W)`` → ``(N, H, 1, W, 1)`` (``first``) or ``(N, 1, H, 1, W)``."""
    n, *spatial = diag.shape
    shape = [n]
    for size in spatial:
        shape += [size, 1] if first else [1, size]
    return diag.reshape(shape)


def apply_elementwise(
    kernel: Kernel,
    phi: Phi,
    *,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    **params: Any,
) -> Kernel:
    """The kernel after the elementwise nonlinearity ``phi``, in any layout.

    ``nngp ← E[phi(u)phi(v)]``, ``ntk ← E[phi'(u)phi'(v)] · ntk``, ``cov1``/``cov2`` ←
    ``E[phi(u)phi(u')]`` for the pairs of positions they hold; the variances of ``u``, ``v`` at each
    position are ``cov1``/``cov2`` (``'none'``, ``'diagonal'``) or their position diagonals
    (``'full'``, where ``cov1[n, h, h', w, w']`` is a covariance between two positions of the same
    input and transforms by the same formula).

    Args:
      kernel: a :class:`Kernel` with ``is_gaussian=True`` (the output of a random linear layer).
      phi: name or callable, as in :func:`gaussian_expectations`.
      n_points, method, **params: as in :func:`gaussian_expectations`.

    Returns:
      A :class:`Kernel` of the same layout and shapes, ``is_gaussian=False`` (``True`` only for a
      linear ``phi`` without offset).

    Raises:
      ValueError: if ``kernel.is_gaussian`` is ``False``: ``phi`` of a non-Gaussian value (e.g.
        ``relu(relu(x))``, or ``phi`` of the raw input) is not determined by its kernel.

    Example::

        k = Kernel(nngp=x @ x.T / d, ntk=jnp.zeros((n, n)), cov1=q, cov2=q, is_gaussian=True,
                   same_inputs=True)
        k = apply_elementwise(k, "relu")         # nngp, ntk (n, n); cov1, cov2 (n,)
        k = apply_elementwise(k2, jnp.tanh)      # any callable: Gauss–Hermite quadrature
    """
    if not kernel.is_gaussian:
        raise ValueError(
            f"elementwise function {getattr(phi, '__name__', phi)!r} applied to a value that is not a "
            "zero-mean Gaussian process (is_gaussian=False): its kernel does not determine the result. "
            "This happens for two nonlinearities in a row, a nonlinearity of the raw input, or after "
            "flatten/concatenate/dropout; put a linear layer (Dense/Conv) before the nonlinearity."
        )
    if isinstance(phi, str):
        _check_params(phi, _spec(phi).fn, params)
    key = (phi, tuple(sorted(params.items())), int(n_points), method)
    try:
        fn = _compiled_apply(*key)
    except TypeError:  # unhashable phi or parameters: trace eagerly
        fn = functools.partial(_apply_impl, phi=phi, params=params, n_points=n_points, method=method)
    return fn(kernel)


@functools.lru_cache(maxsize=256)
def _compiled_apply(phi, params_items, n_points, method):
    return jax.jit(functools.partial(_apply_impl, phi=phi, params=dict(params_items), n_points=n_points, method=method))


def _apply_impl(kernel: Kernel, *, phi, params, n_points, method) -> Kernel:
    linear = isinstance(phi, str) and _spec(phi).linear and params.get("b", 0.0) == 0.0
    want_ntk = kernel.ntk is not None
    # One expectation per array: the derivative is computed for the NTK's entries only, and no
    # array is copied into a concatenation (the whole map is one jitted function anyway).
    expect = functools.partial(gaussian_expectations, phi, n_points=n_points, method=method, **params)
    if kernel.layout == "full":
        d1 = _full_diagonal(kernel.cov1)
        d2 = d1 if kernel.same_inputs else _full_diagonal(kernel.cov2)
        var1, var2 = _interleave(d1, True)[:, None], _interleave(d2, False)[None]
        cov1 = expect(kernel.cov1, _interleave(d1, True), _interleave(d1, False), derivative=False)[0]
        cov2 = cov1 if kernel.same_inputs else expect(kernel.cov2, _interleave(d2, True), _interleave(d2, False),
                                                      derivative=False)[0]
    else:
        var1, var2 = kernel.cov1[:, None], kernel.cov2[None]
        cov1 = expect(kernel.cov1, kernel.cov1, kernel.cov1, derivative=False)[0]
        cov2 = cov1 if kernel.same_inputs else expect(kernel.cov2, kernel.cov2, kernel.cov2, derivative=False)[0]
    nngp, dd = expect(kernel.nngp, var1, var2, derivative=want_ntk)
    ntk = dd * kernel.ntk if want_ntk else None
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=bool(linear))

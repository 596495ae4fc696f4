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

``phi`` is handled in this order (``method='auto'``):

1. **Named closed forms** (``gaussian_expectations("relu", ...)``; derived by hand;
   ``s = sqrt(q1 q2)``, ``ρ = c / s`` clipped to ``[-1, 1]``, ``θ = arccos ρ``):

==================  ====================================================  ==============================================
``phi``             ``E[phi(u) phi(v)]``                                  ``E[phi'(u) phi'(v)]``
==================  ====================================================  ==============================================
``identity``        ``c``                                                 ``1``
``affine`` a·x+b    ``a² c + b²``                                         ``a²``
``relu``            ``s (sin θ + (π − θ) cos θ) / (2π)``  (J1)            ``(π − θ) / (2π)``  (J0)
``leaky_relu`` α    ``α c + (1 − α)² J1``                                 ``α + (1 − α)² J0``
``abs``             ``4 J1 − c``                                          ``(2/π) arcsin ρ``
``sign``            ``(2/π) arcsin ρ``                                    ``0`` (zero almost everywhere)
``erf`` erf(a·x)    ``(2/π) arcsin(2a²c / sqrt((1+2a²q1)(1+2a²q2)))``     ``(4a²/π) / sqrt((1+2a²q1)(1+2a²q2) − 4a⁴c²)``
``sin`` sin(a·x+b)  ``½ (e^{−a²(q1+q2−2c)/2}``                            ``a²`` × the same with ``b + π/2``
                    ``− cos 2b · e^{−a²(q1+q2+2c)/2})``
``cos`` cos(a·x+b)  ``sin`` with ``b + π/2``                              ``a²`` × ``sin`` with ``b + π``
``exp`` exp(a·x)    ``e^{a²(q1+q2+2c)/2}``                                ``a²`` × the same
``square`` x²       ``q1 q2 + 2c²``                                       ``4c``
==================  ====================================================  ==============================================

   (``E[u relu(v)] = c/2`` by the symmetry ``(u, v) → (−u, −v)``, which gives the leaky ReLU and
   ``abs = 2 relu(x) − x`` rows from the ReLU row; ``sin``/``cos`` follow from
   ``sin A sin B = ½(cos(A−B) − cos(A+B))`` and ``E cos(w) = e^{−Var(w)/2}``; ``erf`` is the classic
   Williams (1997) integral.) ``sign`` has derivative zero almost everywhere, so it contributes
   nothing to the NTK of the layers before it: ``ntk ← 0``.

2. **The closed-form family** (:func:`form_expectations`): any function — a callable, the names
   ``gelu`` (``approximate=False``), or a chain of primitives written between modules — that
   :func:`ntk_adapters.infinite.forms.analyze` reads as a sum of terms
   ``x^m · I(x) · exp(−d x²/2)``, ``I`` one of ``1``, ``1{±x > 0}``, ``Φ(a x)``: every
   piecewise-linear function with its break at 0 (``a·max(x,0) + b·min(x,0) + c·x + d``: ReLU,
   leaky ReLU, ABReLU, abs, their scalings and shifts), rectified monomials ``(x ≥ 0)·x^k``,
   polynomials, step and sign, ``erf(a x)``, exact GELU ``x Φ(x)`` and ``x Φ(c x)``
   (``jax.nn.gelu(x, approximate=False)``, ``0.5 x erfc(−x/√2)``, ``x·norm.cdf(c x)``), Gaussians.
   Per pair of terms:

   * steps and polynomials: ``E[ũ^j 1{aũ>0} ṽ^k 1{bṽ>0}] = a^j b^k M_jk(abρ)`` for standardized
     ``ũ, ṽ``, with ``M_jk`` from Stein's lemma (:class:`_Orthant`); ``M_nn`` are Cho & Saul's
     arc-cosine kernels (NeurIPS 2009), ``M_00 = (π − θ)/(2π)``;
   * ``Φ(a u) = P(Z < a u)`` with an independent ``Z``: the indicator of a Gaussian ``a u − Z``;
     moments of Gaussians times at most two indicators follow from Stein's lemma, the deltas of
     the indicators (conditioning on the indicator's variable being 0) and Sheppard's orthant
     probability ``1/4 + arcsin(r)/(2π)`` (:func:`_gaussian_moment`). For ``x Φ(x)`` this gives
     the GELU kernel of Tsuchida, Pearce, van der Heide, Roosta & Gallagher ("Avoiding kernel
     fixed points: computing with ELU and GELU infinite networks", AAAI 2021);
   * a Gaussian factor reweights the bivariate normal (``Σ' = (Σ⁻¹ + D)⁻¹``, :func:`_general_pair`).

   The two members real models use most, piecewise-linear functions through the origin (ReLU,
   leaky ReLU, abs) and scaled error functions, take shorter closed forms of the same values with
   one ``arctan`` per layer (:mod:`ntk_adapters.infinite.common_forms`): on a large kernel matrix
   every array operation is a pass over memory, and an inverse trigonometric function most of
   the arithmetic (angles are taken as ``arctan`` of a ratio in ``[-1, 1]``, about a third of the
   cost of XLA's ``atan2``, :func:`~ntk_adapters.infinite.bivariate._atan2`).

   ``phi'`` is the family's own derivative (``Φ(a x)' = a N(a x)``, the jumps of steps carry
   none, as in JAX). Measured against an independent float64 product-rule integration (errors
   relative to ``sqrt(E[phi(u)²] E[phi(v)²])``, variances 0.01–25, ``ρ`` in ``[−1, 1]`` including
   ``±1`` and ``0.99999``): below 1e-14 for every function above
   (``tests/infinite/test_elementwise_exact.py``).

   **Piecewise exponential polynomials** (:func:`~ntk_adapters.infinite.piecewise.analyze_piecewise`,
   tried when the family above does not hold ``phi``): breaks anywhere and pieces
   ``Σ coef · x^m · e^{a x}``, i.e. ``relu6``, ``hard_tanh``, ``clip(x, a, b)``, ``elu``, ``selu``,
   ``celu`` and any ``jnp.where``/``max``/``min``/``clip`` combination of such pieces whose
   comparisons are between linear functions. A pair of pieces reduces, by the exponential tilt
   ``E[e^{au+bv} h(u, v)] = e^{(a²q1 + 2abc + b²q2)/2} E[h(u + a q1 + b c, v + a c + b q2)]`` and
   Stein's lemma with deltas at the thresholds, to bivariate normal orthant probabilities with
   non-zero thresholds (Drezner–Wesolowsky / Genz 2004, :func:`~ntk_adapters.infinite.bivariate.bvn_upper`,
   ~1e-16), ``Φ`` and ``φ``; ``ρ = ±1`` uses the univariate moments on the intersected intervals
   (:mod:`ntk_adapters.infinite.piecewise_kernels`). Measured errors (same reference and scale,
   variances 0.01–25, ``ρ`` in ``[−1, 1]`` including ``±1`` and ``0.99999``; reproduced by
   ``tests/infinite/test_piecewise.py``): below 1e-12 in float64 for ``elu``, ``selu``,
   ``relu6``, ``hard_tanh``, ``clip`` and ``jnp.where(x > 0, x, α(e^x − 1))``; up to 6e-6 for
   pieces whose tilt is large at variance 25 (``celu(x, 0.5)`` with its ``e^{2x}``,
   ``max(x − 1, 0)² e^{−x}``: a tail probability ~1e-20 times ``e^{50}``); below 2e-5 in float32
   (cancellation in ``e^x − 1`` at variance 0.01, and ``1 − ρ`` at ``ρ = 0.99999``; the test
   checks ``elu`` and ``relu6`` in float32, the others were measured once).
   Gradients are finite at ``ρ = ±1`` and at zero variance.

3. **Quadrature** for everything else (``tanh``, tanh-approximate ``gelu``, ``silu``,
   ``x·sigmoid(c x)``, ``softplus``, ``log1p`` pieces, user functions),
   with ``phi'`` by forward-mode differentiation (``jax.jvp``) of ``phi`` and the input with the
   larger variance integrated outermost (exactly symmetric kernels).
   :func:`quadrature_scheme` chooses the rule once per function, at trace time, for relative
   accuracy ``rtol`` (default 1e-6) on representative covariances: 2-D Gauss–Hermite
   (``E[f(u) f(v)] ≈ Σ_ij w_i w_j f(σ1 z_i) f(σ2 (ρ z_i + sqrt(1 − ρ²) z_j))``) with 32 or 64 nodes
   for smooth functions, else Gauss–Legendre panels split at the function's kinks
   (:func:`~ntk_adapters.infinite.kinks.find_kinks`, :func:`_piecewise_quadrature`), and a
   :class:`QuadratureWarning` naming the layer when neither reaches ``rtol`` (jumps on a lattice,
   more than 16 kinks). Measured errors (same reference, scale and covariances as above):
   ``tanh`` 8e-11, tanh-GELU 4e-11, ``x·sigmoid(1.702 x)`` 4e-12.

   Plain Gauss–Hermite (``rtol=None``: exactly ``n_points × n_points`` nodes) is exact for
   polynomials up to degree ``2n − 1`` in each variable and converges exponentially for smooth
   ``phi`` of moderate variance, but only algebraically for ``phi`` with a kink. Measured absolute
   errors with ``n_points=32`` (float64, ``q1 = q2 = 1``; ``E[phi phi]`` / ``E[phi' phi']``;
   reproduced by ``tests/infinite/test_elementwise.py::test_quadrature_accuracy_table``):

=========  ===================  ===================  ===================
``phi``    ``ρ = 0.3``          ``ρ = 0.99``         ``ρ = −0.999``
=========  ===================  ===================  ===================
sin        1e-16 / 1e-16        2e-16 / 1e-16        1e-16 / 1e-16
erf        3e-11 / 3e-10        8e-8 / 2e-6          1e-7 / 2e-6
relu       1.5e-3 / 2.0e-2      8e-5 / 1.3e-2        5e-6 / 7e-3
=========  ===================  ===================  ===================

   (with ``n_points=64`` erf is at 1e-13 / 5e-12 and relu at 9e-4 / 1.4e-2), which is why kinked
   functions are integrated on panels split at their kinks.

When a variance is zero the corresponding value is the constant ``0``, so the expectation factors:
``E[phi(0) phi(v)] = phi(0) E[phi(v)]``; the same holds for the derivative, with ``phi'(0)`` taken
as JAX defines it (``relu'(0) = 0``, ``leaky_relu'(0) = 1``, ``sign(0) = 0``). All formulas are
written with ``jnp.where`` guards so that no NaN appears there, under ``jit`` too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from ntk_adapters.infinite import forms as _forms
from ntk_adapters.infinite.bivariate import _angle, _arcsin, _corr, _safe_sqrt  # noqa: F401
from ntk_adapters.infinite.form_kernels import closable
from ntk_adapters.infinite.form_kernels import form_expectations as _family_expectations
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.named_functions import CLOSED_FORMS, QUADRATURE_NAMES, named_spec
from ntk_adapters.infinite.piecewise import PiecewiseForm, analyze_piecewise
from ntk_adapters.infinite.piecewise_kernels import piecewise_expectations
from ntk_adapters.infinite.quadrature import (  # noqa: F401  (public names re-exported here)
    DEFAULT_QUADRATURE_POINTS,
    DEFAULT_RTOL,
    QuadratureScheme,
    QuadratureWarning,
    _program_key,
    quadrature_scheme,
)

Array = jax.Array
Phi = Union[str, Callable[[Array], Array]]
AnyForm = Union[_forms.Form, PiecewiseForm]
PhiLike = Union[str, Callable[[Array], Array], _forms.Form, PiecewiseForm]

__all__ = [
    "CLOSED_FORMS",
    "DEFAULT_QUADRATURE_POINTS",
    "DEFAULT_RTOL",
    "QUADRATURE_NAMES",
    "QuadratureScheme",
    "QuadratureWarning",
    "apply_elementwise",
    "elementwise_fn",
    "form_expectations",
    "gaussian_expectations",
    "gaussian_variance",
    "has_closed_form",
    "quadrature_scheme",
    "recognise",
]


def _check_params(name: str, fn: Callable, params: dict) -> None:
    import inspect

    allowed = [p for p in inspect.signature(fn).parameters][1:]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"elementwise function {name!r} takes parameters {allowed}; got unknown {unknown}")


def has_closed_form(phi: Phi) -> bool:
    """Whether ``phi`` (a name) has a closed-form kernel; callables never do."""
    return isinstance(phi, str) and named_spec(phi).closed_form is not None


def elementwise_fn(phi: Phi, **params: Any) -> Callable[[Array], Array]:
    """The elementwise function ``x -> phi(x; **params)`` itself.

    Example::

        f = elementwise_fn("leaky_relu", negative_slope=0.2)
        f(jnp.array([-1.0, 2.0]))  # [-0.2, 2.0]
    """
    if isinstance(phi, str):
        spec = named_spec(phi)
        _check_params(phi, spec.fn, params)
        return functools.partial(spec.fn, **params) if params else spec.fn
    if not callable(phi):
        raise TypeError(f"phi must be a name or a callable; got {type(phi).__name__}")
    return functools.partial(phi, **params) if params else phi


def form_expectations(
    form: AnyForm, c: Array, q1: Array, q2: Array, derivative: bool = True
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` in closed form for a form from :func:`recognise`.

    ``c``, ``q1``, ``q2``: broadcastable arrays (the output shape). Where a variance is zero the
    value is the constant 0 and the expectation factors, ``phi(0) E[phi(v)]``, with ``phi(0)`` and
    ``phi'(0)`` as JAX computes them.

    Example::

        nngp, dd = form_expectations(recognise(jax.nn.relu6), jnp.array(0.3), 1.0, 1.0)
    """
    if isinstance(form, PiecewiseForm):
        return piecewise_expectations(form, c, q1, q2, derivative)
    return _family_expectations(form, c, q1, q2, derivative)


# ----------------------------------------------------------------------------------------------
# Choosing the method for one function.

_FORMS: dict = {}


def recognise(phi: PhiLike, dtype=None, **params: Any) -> Optional[AnyForm]:
    """The closed form of ``phi`` (a name, a callable or a form): a
    :class:`~ntk_adapters.infinite.forms.Form` (the family broken at 0, with ``Φ`` and Gaussian
    factors), else a :class:`~ntk_adapters.infinite.piecewise.PiecewiseForm` (breaks anywhere,
    exponential pieces), or ``None`` when its Gaussian expectations need quadrature. Cached by program.

    Example::

        recognise(jax.nn.elu)   # PiecewiseForm: (-inf, 0): e^x − 1; (0, inf): x
        recognise(jnp.tanh)     # None
    """
    if isinstance(phi, (_forms.Form, PiecewiseForm)):
        return phi
    dtype = jnp.dtype(dtype if dtype is not None else jnp.result_type(float))
    f = elementwise_fn(phi, **params)
    try:
        key = _program_key(f, dtype)
    except Exception:  # noqa: BLE001  (not traceable on a scalar: quadrature will report it)
        return None
    if key not in _FORMS:
        family = _forms.analyze(f, dtype)
        form: Optional[AnyForm] = family
        if family is None or not closable(family):
            form = analyze_piecewise(f, dtype)
        _FORMS[key] = form
    return _FORMS[key]


def _plan(phi, params: dict, method: str, n_points, rtol, dtype, label) -> tuple:
    """``('named',)``, ``('form', Form)`` or ``('quadrature', QuadratureScheme)`` for ``phi``."""
    if method not in ("auto", "closed_form", "quadrature"):
        raise ValueError(f"method must be 'auto', 'closed_form' or 'quadrature'; got {method!r}")
    if isinstance(phi, (_forms.Form, PiecewiseForm)):
        if method == "quadrature":
            raise ValueError("a Form is integrated in closed form; pass the function itself for quadrature")
        return ("form", phi)
    if isinstance(phi, str):
        spec = named_spec(phi)
        _check_params(phi, spec.fn, params)
        if spec.closed_form is not None and method != "quadrature":
            return ("named",)
    elif not callable(phi):
        raise TypeError(f"phi must be a name, a callable or a Form; got {type(phi).__name__}")
    if method != "quadrature":
        form = recognise(phi, dtype, **params)
        if form is not None:
            return ("form", form)
        if method == "closed_form":
            raise ValueError(
                f"phi={getattr(phi, '__name__', phi)!r} has no closed form; closed forms exist for "
                f"{list(CLOSED_FORMS)} and for every function of the family described in "
                "ntk_adapters.infinite.forms (piecewise polynomials broken at 0, erf, x·Φ(c·x), ...)"
            )
    if n_points is None or not 1 <= int(n_points) <= 300:
        raise ValueError(f"n_points must be between 1 and 300 (numpy's Hermite nodes overflow beyond); got {n_points}")
    f = elementwise_fn(phi, **params)
    if rtol is None:
        return ("quadrature", QuadratureScheme("hermite", int(n_points)))
    return ("quadrature", quadrature_scheme(f, dtype, n_points=int(n_points), rtol=float(rtol), label=label))


def _plan_key(plan: tuple) -> tuple:
    return plan if plan[0] != "quadrature" else ("quadrature", plan[1].key())


# ----------------------------------------------------------------------------------------------
# Public raw-array API.


def gaussian_expectations(
    phi: PhiLike,
    cov12: Array,
    var1: Array,
    var2: Array,
    *,
    derivative: bool = True,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    rtol: Optional[float] = DEFAULT_RTOL,
    label: Optional[str] = None,
    **params: Any,
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` for ``(u, v) ~ N(0, [[var1, cov12], [cov12, var2]])``.

    Args:
      phi: a name from :data:`CLOSED_FORMS` or :data:`QUADRATURE_NAMES`, an elementwise
        jnp-traceable callable ``phi(x, **params)``, or a :class:`~ntk_adapters.infinite.forms.Form`.
      cov12, var1, var2: arrays broadcastable to one shape (the output shape).
      derivative: also return ``E[phi'(u) phi'(v)]`` (else ``None``).
      n_points: Gauss–Hermite nodes per dimension the quadrature's node search starts from
        (exactly this many with ``rtol=None``).
      method: ``'auto'`` (closed form where known or recognised, else quadrature),
        ``'closed_form'`` or ``'quadrature'`` (forces quadrature, e.g. to check a closed form).
      rtol: relative accuracy the quadrature is chosen for (:func:`quadrature_scheme`); ``None``
        uses ``n_points × n_points`` Gauss–Hermite nodes as they are.
      label: names the caller (a layer) in a :class:`QuadratureWarning`.
      **params: parameters of ``phi`` (``negative_slope`` for ``leaky_relu``, ``a``/``b`` for
        ``affine``/``erf``/``sin``/``cos``/``exp``, ``approximate`` for ``gelu``, ...).

    Returns:
      ``(nngp, dnngp)``, both of the broadcast shape; ``dnngp`` is ``None`` unless ``derivative``.

    Example::

        nngp, dd = gaussian_expectations("relu", jnp.array(0.5), 1.0, 1.0)
        # nngp = (sin θ + (π − θ) cos θ)/(2π) with θ = arccos 0.5; dd = (π − θ)/(2π) = 1/3
        gaussian_expectations(lambda x: x * jax.scipy.stats.norm.cdf(x), 0.5, 1.0, 1.0)  # exact GELU, closed form
    """
    c, q1, q2 = jnp.broadcast_arrays(*(jnp.asarray(a) for a in (cov12, var1, var2)))
    dtype = jnp.result_type(c, q1, q2)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    c, q1, q2 = c.astype(dtype), q1.astype(dtype), q2.astype(dtype)
    plan = _plan(phi, params, method, n_points, rtol, dtype, label)
    key = (phi, tuple(sorted(params.items())), _plan_key(plan), bool(derivative))
    try:
        fn = _compiled(key, plan)
    except TypeError:  # unhashable phi or parameters (e.g. traced arrays): no caching
        fn = _expectation_fn(phi, params, plan, derivative)
    return fn(c, q1, q2)


def _expectation_fn(phi, params, plan, derivative):
    def fn(c, q1, q2):
        if plan[0] == "named":
            nngp, dd = named_spec(phi).closed_form(c, q1, q2, **params)
            nngp = jnp.broadcast_to(nngp, c.shape).astype(c.dtype)
            dd = jnp.broadcast_to(dd, c.shape).astype(c.dtype) if derivative else None
            return nngp, dd
        if plan[0] == "form":
            nngp, dd = form_expectations(plan[1], c, q1, q2, derivative)
            nngp = jnp.broadcast_to(nngp, c.shape).astype(c.dtype)
            dd = jnp.broadcast_to(dd, c.shape).astype(c.dtype) if derivative else None
            return nngp, dd
        return plan[1].integrate(elementwise_fn(phi, **params), c, q1, q2, derivative)

    return fn


class _Keyed:
    """Carries an unhashable-by-value plan next to its hashable key through ``lru_cache``."""

    def __init__(self, key, plan):
        self.key, self.plan = key, plan

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Keyed) and self.key == other.key


def _compiled(key, plan):
    return _compiled_cached(_Keyed(key, plan))


@functools.lru_cache(maxsize=256)
def _compiled_cached(k: _Keyed):
    # One jitted function per (phi, parameters, method): eager calls compile once per shape
    # instead of dispatching (and compiling) op by op.
    phi, params_items, _, derivative = k.key
    return jax.jit(_expectation_fn(phi, dict(params_items), k.plan, derivative))


def gaussian_variance(
    phi: PhiLike,
    var: Array,
    *,
    derivative: bool = False,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    rtol: Optional[float] = DEFAULT_RTOL,
    **params: Any,
) -> tuple[Array, Optional[Array]]:
    """``E[phi(u)²]`` (and ``E[phi'(u)²]`` if ``derivative``) for ``u ~ N(0, var)``; shape of ``var``.

    Example::

        q, _ = gaussian_variance("relu", jnp.array([1.0, 4.0]))  # [0.5, 2.0]
    """
    return gaussian_expectations(
        phi, var, var, var, derivative=derivative, n_points=n_points, method=method, rtol=rtol, **params
    )


# ----------------------------------------------------------------------------------------------
# Kernel-level entry point.


def _interleave(diag: Array, first: bool) -> Array:
    """``(N, H, W)`` → ``(N, H, 1, W, 1)`` (``first``) or ``(N, 1, H, 1, W)``."""
    n, *spatial = diag.shape
    shape = [n]
    for size in spatial:
        shape += [size, 1] if first else [1, size]
    return diag.reshape(shape)


def apply_elementwise(
    kernel: Kernel,
    phi: PhiLike,
    *,
    n_points: int = DEFAULT_QUADRATURE_POINTS,
    method: str = "auto",
    rtol: Optional[float] = DEFAULT_RTOL,
    label: Optional[str] = None,
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
      phi: name, callable or Form, as in :func:`gaussian_expectations`.
      n_points, method, rtol, label: as in :func:`gaussian_expectations`. The method is chosen
        once, when ``apply_elementwise`` is traced.
      **params: parameters of ``phi``, as in :func:`gaussian_expectations`.

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
        k = apply_elementwise(k2, jnp.tanh)      # any callable: closed form if recognised, else quadrature
    """
    if not kernel.is_gaussian:
        raise ValueError(
            f"elementwise function {getattr(phi, '__name__', phi)!r} applied to a value that is not a "
            "zero-mean Gaussian process (is_gaussian=False): its kernel does not determine the result. "
            "This happens for two nonlinearities in a row, a nonlinearity of the raw input, or after "
            "flatten/concatenate/dropout; put a linear layer (Dense/Conv) before the nonlinearity."
        )
    plan = _plan(phi, params, method, n_points, rtol, kernel.nngp.dtype, label)
    key = (phi, tuple(sorted(params.items())), _plan_key(plan))
    try:
        fn = _compiled_apply(_Keyed(key, plan))
    except TypeError:  # unhashable phi or parameters: trace eagerly
        fn = functools.partial(_apply_impl, phi=phi, params=params, plan=plan)
    return fn(kernel)


@functools.lru_cache(maxsize=256)
def _compiled_apply(k: _Keyed):
    phi, params_items, _ = k.key
    return jax.jit(functools.partial(_apply_impl, phi=phi, params=dict(params_items), plan=k.plan))


def _is_linear(phi, params, plan) -> bool:
    if plan[0] == "form":
        return plan[1].linear_factor is not None
    return isinstance(phi, str) and named_spec(phi).linear and params.get("b", 0.0) == 0.0


def _apply_impl(kernel: Kernel, *, phi, params, plan) -> Kernel:
    linear = _is_linear(phi, params, plan)
    want_ntk = kernel.ntk is not None
    # One expectation per array: the derivative is computed for the NTK's entries only, and no
    # array is copied into a concatenation (the whole map is one jitted function anyway).
    run = _expectation_fn(phi, params, plan, True)
    run_value = _expectation_fn(phi, params, plan, False)

    def expect(c, q1, q2, derivative):
        if plan[0] != "quadrature":
            c, q1, q2 = jnp.broadcast_arrays(c, q1, q2)
        out = (run if derivative else run_value)(c, q1, q2)
        shape = jnp.broadcast_shapes(c.shape, q1.shape, q2.shape)
        return tuple(None if o is None else jnp.broadcast_to(o, shape) for o in out)

    # For K(x, x) the variances' map also gives the diagonal's derivative (see _exact_diagonal). Not
    # in the full layout: there the angles between neighbouring positions, not the diagonal, limit
    # float32 (NTK errors 7e-6 with or without), and the select would cost a third of the time.
    exact_diagonal = kernel.same_inputs and kernel.layout != "full"
    if kernel.layout == "full":
        d1, d2 = kernel.variances()
        var1, var2 = _interleave(d1, True)[:, None], _interleave(d2, False)[None]
        cov1 = expect(kernel.cov1, _interleave(d1, True), _interleave(d1, False), False)[0]
        cov2 = (
            cov1 if kernel.same_inputs else expect(kernel.cov2, _interleave(d2, True), _interleave(d2, False), False)[0]
        )
        # each position with itself, from the variances alone (see the kernel module)
        variances = kernel.map_variances(lambda v: expect(v, v, v, False)[0])
    else:
        variances = {}
        var1, var2 = kernel.cov1[:, None], kernel.cov2[None]
        cov1, dd1 = expect(kernel.cov1, kernel.cov1, kernel.cov1, want_ntk and exact_diagonal)
        cov2 = cov1 if kernel.same_inputs else expect(kernel.cov2, kernel.cov2, kernel.cov2, False)[0]
    nngp, dd = expect(kernel.nngp, var1, var2, want_ntk)
    if exact_diagonal:
        nngp, dd = _exact_diagonal(nngp, dd, cov1, dd1)
    ntk = dd * kernel.ntk if want_ntk else None
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=bool(linear), **variances)


def _exact_diagonal(nngp, dd, cov, self_dd):
    """The kernels of ``x`` with itself (diagonal layout), each example's entries with itself taken
    from the variances' map (``cov``, ``self_dd``: ``(N, *spatial)``).

    On the diagonal of ``K(x, x)`` the covariance and the variances come from different sums (a
    Gram matrix and a sum of squares) and differ in their last bits; an angle of ``sqrt(2ε)``
    instead of 0 follows (``5e-4`` in float32), and the NTK's ``E[f'(u) f'(v)]`` is off by ~1e-4
    there. The entries ``[i, i]`` (at every position) are the variances' own, exact at unit
    correlation.
    """
    # a select against an iota comparison fuses into the map's own pass; a scatter would not
    n = nngp.shape[0]
    eye = (jnp.arange(n)[:, None] == jnp.arange(n)[None, :]).reshape((n, n) + (1,) * (nngp.ndim - 2))
    nngp = jnp.where(eye, cov[:, None], nngp)
    if dd is not None:
        dd = jnp.where(eye, self_dd[:, None], dd)
    return nngp, dd

"""First-order and higher-order Taylor expansions of a model in its parameters."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

from ntk_adapters.model import Model, ModelLike, PyTree, as_model, check_params_match


def _tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda u, v: u - v, a, b)


def _wrap(f: ModelLike, params0: PyTree, expanded: Callable[..., jax.Array], what: str) -> Any:
    if isinstance(f, Model):
        # The expansion is a new function of the parameters: drop the framework module so that
        # architecture-reading tools do not mistake it for the original network.
        return f.replace(
            apply_fn=expanded, params=params0, framework="function", module=expanded, info={**f.info, what: True}
        )
    return expanded


def linearize(f: ModelLike, params0: PyTree) -> Any:
    """The model linearized in its parameters around ``params0``.

    ``f_lin(params, x) = f(params0, x) + J(x; params0) · (params − params0)``, computed with one
    ``jax.jvp`` (no Jacobian is stored).

    Args:
      f: a :class:`~ntk_adapters.Model` or a function ``f(params, x) -> y``.
      params0: the expansion point (usually the initial parameters).

    Returns:
      The same kind of object as ``f``: a Model (whose ``params`` are ``params0``) or a function,
      with the signature ``(params, x) -> y`` and outputs shaped like ``f``'s, ``(N, *O)``.

    Example::

      lin = linearize(model, model.params)
      lin(model.params, x)        # equals model(model.params, x)
    """
    model = as_model(f)
    check_params_match(model.params, params0, "params0")
    apply_fn = model.apply_fn

    def f_lin(params: PyTree, x: jax.Array, **kwargs: Any) -> jax.Array:
        y0, dy = jax.jvp(lambda p: apply_fn(p, x, **kwargs), (params0,), (_tree_sub(params, params0),))
        return y0 + dy

    return _wrap(f, params0, f_lin, "linearized")


def taylor_expand(f: ModelLike, params0: PyTree, degree: int) -> Any:
    """The Taylor polynomial of the model in its parameters around ``params0``.

    ``f_k(params, x) = Σ_{j≤k} D^j f(params0, x)[δ, …, δ] / j!`` with ``δ = params − params0``,
    evaluated by nesting ``jax.jvp`` (``degree`` levels; cost grows like ``2**degree`` forward
    passes, so keep ``degree`` small). ``degree=1`` is :func:`linearize`, ``degree=0`` the
    constant ``f(params0, x)``. The error against ``f`` is ``O(|δ|^(degree+1))``.

    Args:
      f: a :class:`~ntk_adapters.Model` or a function ``f(params, x) -> y``.
      params0: the expansion point.
      degree: a non-negative int.

    Returns:
      The same kind of object as ``f``, with the signature ``(params, x) -> y``.

    Example::

      quad = taylor_expand(model, model.params, 2)
      quad(new_params, x).shape      # (N, O)
    """
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"degree must be a non-negative int; got {degree!r}")
    model = as_model(f)
    check_params_match(model.params, params0, "params0")
    apply_fn = model.apply_fn

    def f_taylor(params: PyTree, x: jax.Array, **kwargs: Any) -> jax.Array:
        delta = _tree_sub(params, params0)
        derivative = lambda p: apply_fn(p, x, **kwargs)
        out = derivative(params0)
        for j in range(1, degree + 1):
            # d/dε of the previous directional derivative along delta: the j-th derivative.
            derivative = (lambda g: lambda p: jax.jvp(g, (p,), (delta,))[1])(derivative)
            out = out + derivative(params0) / math.factorial(j)
        return out

    return _wrap(f, params0, f_taylor, f"taylor_degree_{degree}")

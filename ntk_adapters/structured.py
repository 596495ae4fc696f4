"""Structured (layer-factorized) empirical NTK: ``implementation='structured'``.

For a linear operation ``y = a · W`` the Jacobian block of the outputs with respect to ``W`` is
an outer product of the input activations ``a`` and the output cotangents
``g[o] = ∂f_o/∂y``, so the NTK contribution of ``W`` never needs that block:

    Θ_W[o1, o2] = Σ_{p, p'} (Σ_i a1[p, i] a2[p', i]) · (Σ_j g1[o1, p, j] g2[o2, p', j])

with ``p`` the positions the weight is shared over (none for a dense layer on vectors, the
spatial output positions for a convolution, whose activations are the input *patches*). This
is an activation Gram times a cotangent Gram (Novak et al. 2022, "Fast Finite Width Neural
Tangent Kernel"). When the positions are many and the channels few, the per-example weight
Jacobian ``Σ_p a[p, i] g[o, p, j]`` is cheaper than the Gram of positions; each layer takes the
cheaper of the two forms by a multiply-add count from the shapes. Both are exact.

How the pieces are found without changing the model: the model is traced with
:func:`jax.make_jaxpr` over its flattened parameters. A parameter leaf is *factorized* when its
only use is one ``dot_general``, ``conv_general_dilated``, ``add``, ``sub`` or ``mul``
equation, reached from the leaf through shape-only linear steps (``reshape``, ``transpose``,
``convert_element_type``, ``broadcast_in_dim``, ``squeeze``, ``neg``, multiplication by a
scalar literal, calls of nested ``jit`` functions). The jaxpr is re-evaluated with a zero
*probe* added to the output of each such equation; derivatives with respect to the probes are
the cotangents ``g``, and the other operand of the equation is captured as the activation
``a``. Dense kernels (no ``dot_general`` batch dimensions) and ungrouped convolutions use the
Gram form when cheaper; biases, normalization scales and any other factorized use get the
per-example Jacobian form, computed from ``a`` and ``g`` by the transpose of that one equation.
Every other leaf (used twice, used inside a custom-derivative function or a loop, ...) falls back
to its ordinary Jacobian, taken in the same backward pass as the probe cotangents.

Examples and cotangents: with ``vmap_axes=a`` (examples independent along axis ``a``, as
:func:`ntk_adapters.empirical.empirical_ntk_fn` documents) the cotangent of output ``(n, o)``
touches only example ``n``, and everything is computed one example at a time: this is where the
method is fast. With ``vmap_axes=None`` nothing is assumed: the cotangents are taken for the
whole batch (``g[n, o, m, ...]`` for every example ``m``), which is exact for any model, batch
statistics included, but costs about as much as ``'jacobian'``; ``'auto'`` therefore only picks
``'structured'`` when ``vmap_axes`` is given.

The tracing and analysis are in :mod:`ntk_adapters.structured_plan`, the two forms of a layer's
contribution in :mod:`ntk_adapters.structured_forms`; this module assembles them.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.axes import OutputAxes
from ntk_adapters.inputs import BatchAxes, hashable_spec
from ntk_adapters.model import module_path
from ntk_adapters.precision import PrecisionLike, einsum_precision, matmul_precision
from ntk_adapters.structured_forms import (
    _choose_form,
    _contract,
    _gram_contribution,
    _gram_layout,
    _jacobian_contribution,
    _site_jacobian,
    _size,
)
from ntk_adapters.structured_plan import (
    _analyze,
    _batch_axes,
    _out_axis,
    _Plan,
    _side,
    _sub_jaxpr,
    _trace,
)

__all__ = ["structured_contributions", "structured_cost", "factorized_leaves"]

# --------------------------------------------------------------------------------------------
# Entry points.


def structured_contributions(
    apply_fn: Callable,
    params,
    x1: jax.Array,
    x2: Optional[jax.Array],
    axes: OutputAxes,
    vmap_axes: Optional[int] = None,
    form: str = "auto",
    memory_budget: Optional[float] = None,
    precision: PrecisionLike = "highest",
) -> list[jax.Array]:
    """Per-leaf NTK contributions (untraced sums) by layer factorization, in ``tree_leaves`` order.

    The same values as the Jacobian contraction ``Σ_p J1[..., p] J2[..., p]`` per parameter leaf,
    before the division by the traced size, so they can be summed or grouped by layer.

    Args:
      apply_fn: ``apply_fn(params, x) -> y`` with ``y`` of shape ``(N, *O)``.
      params: the parameter pytree.
      x1: ``(N1, *input)``, an array or a pytree of arrays; x2: the same with ``N2`` rows, or
        ``None`` for ``x1``.
      axes: the resolved output axes (:class:`ntk_adapters.axes.OutputAxes`).
      vmap_axes: ``None`` (exact for any model), or where independent examples sit: an int, a
        pytree prefix of ``x``, the triple ``(in_axes, out_axes, {})`` or a
        :class:`ntk_adapters.inputs.BatchAxes`.
      form: ``'auto'`` takes, per leaf, the cheaper of the Gram form and the Jacobian form;
        ``'gram'`` or ``'jacobian'`` force one wherever the Gram form applies (for checking).
      memory_budget: bytes one leaf's intermediates may take; ``'auto'`` forms that exceed it are
        passed over (``None``: no limit). :func:`structured_cost` takes the same budget, so the
        estimate describes the computation that runs.
      precision: of the model's products and of the Gram and Jacobian contractions
        (:mod:`ntk_adapters.precision`); ``'highest'`` keeps TensorFloat-32 out of the kernel on GPUs.

    Returns:
      A list with one array per parameter leaf, each of the kernel's shape (e.g. ``(N1, N2, O, O)``
      for ``trace_axes=()``; ``(N1, N2)`` summed, not averaged, over a traced output axis).

    Example::

      parts = structured_contributions(model.apply_fn, model.params, x1, x2, OutputAxes.make(2, (-1,), ()), 0)
      ntk = sum(parts) / n_outputs
    """
    if form not in ("auto", "gram", "jacobian"):
        raise ValueError(f"form={form!r}; choose 'auto', 'gram' or 'jacobian'")
    with matmul_precision(precision):
        return _structured(apply_fn, params, x1, x2, axes, vmap_axes, form, memory_budget, einsum_precision(precision))


def _structured(apply_fn, params, x1, x2, axes, vmap_axes, form, memory_budget, precision):
    batch = _batch_axes(vmap_axes)
    row_axis = _out_axis(batch)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed1, plan1 = _trace(apply_fn, leaves, treedef, x1, batch)
    same = x2 is None
    if same or batch is not None:
        closed2, plan2 = closed1, plan1
    else:
        closed2, plan2 = _trace(apply_fn, leaves, treedef, x2, batch)
        if [(s.leaf, s.path) for s in plan1.sites] != [(s.leaf, s.path) for s in plan2.sites]:
            # The model is structured differently for the two batch sizes: use Jacobians throughout.
            plan1 = plan2 = _Plan((), tuple(range(len(leaves))), (), (), frozenset(), {})
    g1, j1, c1 = _side(closed1, plan1, leaves, x1, batch)
    g2, j2, c2 = (g1, j1, c1) if same else _side(closed2, plan2, leaves, x2, batch)
    out1 = jax.eval_shape(apply_fn, params, x1).shape
    out2 = out1 if same else jax.eval_shape(apply_fn, params, x2).shape

    parts: list[Optional[jax.Array]] = [None] * len(leaves)
    for k, i in enumerate(plan1.fallback):
        parts[i] = _contract(j1[k], j2[k], axes, precision)
    for s1, s2 in zip(plan1.sites, plan2.sites):
        a1 = c1[s1.path][1 - s1.operand]
        a2 = c2[s2.path][1 - s2.operand]
        chosen = _choose_form(s1, axes, row_axis, out1, out2, form, _elements(memory_budget, leaves))
        if chosen.kind == "gram":
            parts[s1.leaf] = _gram_contribution(
                s1, chosen.layout, chosen.subs, a1, a2, g1[s1.path], g2[s2.path], row_axis, same, precision
            )
        elif chosen.layout is not None:
            parts[s1.leaf] = _jacobian_contribution(
                s1, chosen.layout, chosen.subs, a1, a2, g1[s1.path], g2[s2.path], row_axis, same, precision
            )
        else:
            jac1 = _site_jacobian(s1, leaves[s1.leaf], a1, g1[s1.path], out1, row_axis)
            jac2 = jac1 if same else _site_jacobian(s2, leaves[s2.leaf], a2, g2[s2.path], out2, row_axis)
            parts[s1.leaf] = _contract(jac1, jac2, axes, precision)
    shape = axes.result_shape(out1, out2)
    dtype = jnp.result_type(*leaves)
    for i in plan1.unused:
        parts[i] = jnp.zeros(shape, dtype)
    return parts


def factorized_leaves(apply_fn: Callable, params, x: jax.Array, vmap_axes: Optional[int] = None) -> dict:
    """How the structured implementation handles each parameter leaf, for inspection.

    Args:
      apply_fn: ``apply_fn(params, x) -> y``.
      params: the parameter pytree.
      x: an input batch ``(N, *input)`` (only its shape and dtype matter).
      vmap_axes: as for :func:`ntk_adapters.empirical.empirical_ntk_fn`.

    Returns:
      ``{parameter path: how}`` in ``tree_leaves`` order, ``how`` being the equation the leaf is
      factorized at (``'dot_general'``, ``'conv_general_dilated'``, ``'add'``, ``'sub'``, ``'mul'``;
      ``' (gram-capable)'`` appended where the Gram form applies), ``'jacobian'`` for a leaf that
      keeps its Jacobian, or ``'unused'`` for a leaf the output does not depend on.

    Example::

      factorized_leaves(model.apply_fn, model.params, x[:2], vmap_axes=0)
      # {'Dense_0/bias': 'add', 'Dense_0/kernel': 'dot_general (gram-capable)', ...}
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    _, plan = _trace(apply_fn, leaves, treedef, x, _batch_axes(vmap_axes))
    how = {i: "jacobian" for i in plan.fallback}
    how.update({i: "unused" for i in plan.unused})
    for s in plan.sites:
        how[s.leaf] = s.name + (" (gram-capable)" if _gram_layout(s) is not None else "")
    paths = [module_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return {paths[i]: how[i] for i in range(len(leaves))}


def _forward_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            total += _forward_flops(sub[0])
        elif eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(eqn.invars[0].aval.shape[d] for d in lc)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // max(rhs[dn.rhs_spec[0]], 1)
        else:
            total += sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    return total


def _activation_elements(jaxpr) -> int:
    """Elements of every intermediate value: what a backward pass keeps or recomputes per cotangent."""
    total = 0
    for eqn in jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            total += _activation_elements(sub[0])
        else:
            total += sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    return total


def _elements(memory_budget: Optional[float], leaves) -> Optional[float]:
    if memory_budget is None:
        return None
    return memory_budget / jnp.result_type(*leaves).itemsize


def structured_cost(
    apply_fn: Callable,
    params,
    x1: jax.Array,
    x2: Optional[jax.Array],
    axes: OutputAxes,
    vmap_axes: Union[None, int, BatchAxes],
    selected: Optional[Sequence[int]] = None,
    memory_budget: Optional[float] = None,
) -> dict:
    """Rough multiply-add and memory estimates of ``'structured'`` against ``'jacobian'``, from shapes.

    Both methods pull each output entry back through the network (one backward pass per output
    entry and example when ``vmap_axes`` is set); ``'jacobian'`` also forms every weight gradient
    there (counted as a second forward's worth), ``'structured'`` only activation cotangents. Then
    ``'jacobian'`` contracts ``J1 J2ᵀ`` leaf by leaf, while ``'structured'`` takes, per factorized
    leaf, the cheaper of its Gram form and its Jacobian form.

    Returns:
      ``{'structured_flops', 'jacobian_flops', 'structured_bytes', 'jacobian_bytes', 'forward_flops',
      'activations', 'n_params', 'itemsize'}``; only the leaves in ``selected`` (indices in
      ``tree_leaves`` order; default all) are differentiated. ``forward_flops`` and ``activations``
      (elements of all intermediates) are those of one example when ``vmap_axes`` is set, else of
      the batch ``x1``; the ``*_bytes`` count the stored Jacobians, cotangents and Grams.

    Example::

      cost = structured_cost(model.apply_fn, model.params, x1, x2, OutputAxes.make(2, (-1,), ()), 0)
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_spec = lambda a: (tuple(np.shape(a)), str(jnp.result_type(a)))
    return dict(
        _cost(
            apply_fn,
            treedef,
            tuple(leaf_spec(l) for l in leaves),
            hashable_spec(x1),
            None if x2 is None else hashable_spec(x2),
            axes,
            _batch_axes(vmap_axes),
            None if selected is None else tuple(selected),
            memory_budget,
        )
    )


def _from_hashable(key):
    treedef, leaf_specs = key
    return jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaf_specs])


@functools.lru_cache(maxsize=256)
def _cost(
    apply_fn, treedef, leaf_specs, x1_spec, x2_spec, axes, batch: Optional[BatchAxes], selected, memory_budget
) -> tuple:
    leaves = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaf_specs]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    x1 = _from_hashable(x1_spec)
    x2 = None if x2_spec is None else _from_hashable(x2_spec)
    closed, plan = _trace(apply_fn, leaves, treedef, x1, batch)
    if selected is not None:
        plan = _analyze(closed, len(leaves), selected)
        leaves = [leaves[i] for i in selected]
    out1 = tuple(jax.eval_shape(apply_fn, params, x1).shape)
    out2 = out1 if x2 is None else tuple(jax.eval_shape(apply_fn, params, x2).shape)
    n_sides = (math.prod(out1) + math.prod(out2)) if x2 is not None else math.prod(out1)
    forward = _forward_flops(closed.jaxpr)
    first, second, _ = axes.letters()
    pair = _size((first, second), (out1, out2))
    itemsize = jnp.result_type(*leaves).itemsize
    sizes = {i: math.prod(leaf_specs[i][0]) for i in range(len(leaf_specs))}
    n_params = sum(math.prod(np.shape(l)) for l in leaves)
    jac_flops = n_sides * 2 * forward + pair * n_params
    jac_bytes = n_sides * n_params * itemsize
    s_flops = n_sides * forward + pair * sum(sizes[i] for i in plan.fallback)
    s_bytes = n_sides * sum(sizes[i] for i in plan.fallback) * itemsize
    s_bytes += n_sides * sum(math.prod(s.out_shape) for s in plan.sites) * itemsize
    for s in plan.sites:
        form = _choose_form(s, axes, _out_axis(batch), out1, out2, max_elements=_elements(memory_budget, leaves))
        s_flops += form.flops
        s_bytes += form.elements * itemsize
    return tuple(
        dict(
            structured_flops=int(s_flops),
            jacobian_flops=int(jac_flops),
            structured_bytes=int(s_bytes),
            jacobian_bytes=int(jac_bytes),
            forward_flops=int(forward),
            activations=int(_activation_elements(closed.jaxpr)),
            n_params=int(n_params),
            itemsize=int(itemsize),
        ).items()
    )

"""The two exact forms of one layer's structured NTK contribution, their subscripts and cost.

An activation Gram times a cotangent Gram, or the per-example weight Jacobian contracted directly;
:func:`_choose_form` takes the cheaper by a multiply-add count from the shapes. See
:mod:`ntk_adapters.structured`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.axes import OutputAxes
from ntk_adapters.structured_plan import _apply_steps, _Site

# --------------------------------------------------------------------------------------------
# Contractions.


def _letters():
    return iter([chr(c) for c in itertools.chain(range(0x3B1, 0x3CA), range(0x410, 0x450), range(0x4E00, 0x4F00))])


def _size(subs: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of a two-operand einsum: the product of every distinct letter's size."""
    sizes: dict[str, int] = {}
    for s, shape in zip(subs, shapes):
        sizes.update(zip(s, shape))
    return math.prod(sizes.values())


def _contract(j1, j2, axes: OutputAxes, precision=None):
    first, second, result = axes.letters()
    pool = _letters()
    p = "".join(next(pool) for _ in range(j1.ndim - axes.ndim))
    return jnp.einsum(f"{first}{p},{second}{p}->{result}", j1, j2, precision=precision)


def _unique(s: str) -> str:
    return "".join(dict.fromkeys(s))


@dataclasses.dataclass(frozen=True)
class _GramLayout:
    """How a site's activation and output split into shared positions and weight channels.

    ``a_free``/``a_contract``: activation axes that are positions / contracted with the weight;
    ``y_free``: output axes matching ``a_free`` in order; ``y_weight``: output axes of the weight.
    """

    a_free: tuple
    a_contract: tuple
    y_free: tuple
    y_weight: tuple
    patches: Optional[tuple] = None  # conv: (filter_shape, strides, padding, lhs_dil, rhs_dil, dn)


def _gram_layout(site: _Site) -> Optional[_GramLayout]:
    if not site.origin.bijective:
        return None
    params = dict(site.params)
    if site.name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        if lb or rb:
            return None
        a_contract = tuple(rc if site.operand == 0 else lc)
        a_ndim = len(site.other_shape)
        a_free = tuple(d for d in range(a_ndim) if d not in a_contract)
        n_w_free = len(site.out_shape) - len(a_free)
        if site.operand == 1:  # y = [a free..., W free...]
            y_free = tuple(range(len(a_free)))
            y_weight = tuple(range(len(a_free), len(site.out_shape)))
        else:  # y = [W free..., a free...]
            y_weight = tuple(range(n_w_free))
            y_free = tuple(range(n_w_free, len(site.out_shape)))
        return _GramLayout(a_free, a_contract, y_free, y_weight)
    if site.name == "conv_general_dilated":
        if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
            return None
        dn = params["dimension_numbers"]
        rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
        if list(rhs_spec[2:]) != sorted(rhs_spec[2:]):
            return None  # patch extraction assumes the kernel's spatial axes in increasing order
        w_shape = _operand_shape(site)
        filter_shape = tuple(w_shape[d] for d in rhs_spec[2:])
        feature = out_spec[1]
        free = tuple(d for d in range(len(site.out_shape)) if d != feature)
        patches = (
            filter_shape,
            tuple(params["window_strides"]),
            tuple(map(tuple, params["padding"])),
            tuple(params["lhs_dilation"]),
            tuple(params["rhs_dilation"]),
            dn,
        )
        return _GramLayout(free, (feature,), free, (feature,), patches)
    return None


def _operand_shape(site: _Site) -> tuple:
    """Shape of the weight operand as the equation sees it (after the chain of steps)."""
    # The steps may multiply by literals of the traced dtype: evaluate them in that dtype.
    w = jax.ShapeDtypeStruct(site.leaf_shape, site.out_dtype or jnp.float32)
    return tuple(jax.eval_shape(lambda v: _apply_steps(site.origin.steps, v), w).shape)


def _patches(a, layout: _GramLayout):
    """The input patches of a convolution, laid out as its output: channel ``ci·K + s`` holds
    input channel ``ci`` at window offset ``s`` (row-major over the filter's spatial axes).

    Built by padding and strided slicing, the copies they are: a grouped convolution with a one-hot
    filter (``jax.lax.conv_general_dilated_patches``) computes the same values through products,
    several times slower on CPUs, and at DEFAULT precision for its filter.
    """
    assert layout.patches is not None, "_patches is for convolution layouts"
    filter_shape, strides, padding, lhs_dil, rhs_dil, dn = layout.patches
    x = jnp.transpose(a, dn.lhs_spec)  # (N, C, *spatial)
    pads = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dil)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
    out = [(size - (k - 1) * r - 1) // st + 1 for size, k, r, st in zip(x.shape[2:], filter_shape, rhs_dil, strides)]
    windows = []
    for offset in itertools.product(*(range(k) for k in filter_shape)):
        start = [o * r for o, r in zip(offset, rhs_dil)]
        limit = [b + (n - 1) * st + 1 for b, n, st in zip(start, out, strides)]
        windows.append(jax.lax.slice(x, (0, 0, *start), (*x.shape[:2], *limit), (1, 1, *strides)))
    patches = jnp.stack(windows, axis=2).reshape(x.shape[0], -1, *out)  # (N, C·K, *out)
    return jnp.transpose(patches, tuple(int(i) for i in np.argsort(dn.out_spec)))


def _gram_subscripts(layout: _GramLayout, axes: OutputAxes, row_axis, a_ndim: int, y_ndim: int):
    first, second, result = axes.letters()
    r1 = first[row_axis] if row_axis is not None else ""
    r2 = second[row_axis] if row_axis is not None else ""
    pool = _letters()
    p1 = [next(pool) for _ in layout.a_free]
    p2 = [next(pool) for _ in layout.a_free]
    ci = [next(pool) for _ in layout.a_contract]
    wj = [next(pool) for _ in layout.y_weight]

    def a_sub(p):
        return "".join(
            p[layout.a_free.index(d)] if d in layout.a_free else ci[layout.a_contract.index(d)] for d in range(a_ndim)
        )

    def y_sub(p):
        return "".join(
            p[layout.y_free.index(d)] if d in layout.y_free else wj[layout.y_weight.index(d)] for d in range(y_ndim)
        )

    rows = _unique(r1 + r2)
    keep = _unique(result + rows)
    P1, P2 = "".join(p1), "".join(p2)
    w = "".join(ci) + "".join(wj)  # the weight's axes as the equation sees it (after the chain of steps)
    return dict(
        a=(r1 + a_sub(p1), r2 + a_sub(p2), rows + P1 + P2),
        g=(first + y_sub(p1), second + y_sub(p2), keep + P1 + P2),
        final=(rows + P1 + P2, keep + P1 + P2, result),
        # Per-example Jacobian form: J[out, w] = Σ_positions a g, then J1 J2ᵀ over w.
        jac1=(r1 + a_sub(p1), first + y_sub(p1), first + w),
        jac2=(r2 + a_sub(p2), second + y_sub(p2), second + w),
        jac_final=(first + w, second + w, result),
    )


def _letter_sizes(subs: Sequence[str], shapes: Sequence[Sequence[int]]) -> dict:
    sizes: dict[str, int] = {}
    for sub, shape in zip(subs, shapes):
        sizes.update(zip(sub, shape))
    return sizes


@dataclasses.dataclass(frozen=True)
class _Form:
    """How one factorized leaf is contracted, with its estimated multiply-adds and bytes (elements)."""

    kind: str  # 'gram' or 'jacobian'
    layout: Optional[_GramLayout]
    subs: Optional[dict]
    flops: int
    elements: int


def _choose_form(
    site: _Site, axes: OutputAxes, row_axis, out1, out2, prefer: str = "auto", max_elements: Optional[float] = None
) -> _Form:
    """The Gram form or the per-example Jacobian form of a site, whichever needs fewer multiply-adds
    among those whose intermediates fit in ``max_elements`` (the one needing less memory when
    neither fits).

    Gram: ``Σ_i a1 a2`` over the contracted activation axes, ``Σ_j g1 g2`` over the weight's output
    channels, then the product summed over position pairs. Jacobian: ``Σ_p a g`` per output entry,
    then ``J1 J2ᵀ``.
    """
    out1, out2 = tuple(out1), tuple(out2)
    first, second, _ = axes.letters()
    pair = _size((first, second), (out1, out2))
    leaf_size = math.prod(site.leaf_shape)
    y_size = math.prod(site.out_shape)
    n_out = math.prod(out1) + math.prod(out2)
    layout = _gram_layout(site)
    a_shape = site.other_shape
    if layout is not None and layout.patches is not None:
        k = math.prod(layout.patches[0]) * a_shape[layout.patches[5].lhs_spec[1]]
        a_shape = tuple(k if d == layout.a_contract[0] else site.out_shape[d] for d in range(len(site.out_shape)))
    contract = 1 if layout is None else math.prod(a_shape[d] for d in layout.a_contract)
    jac = _Form("jacobian", None, None, n_out * y_size * contract + pair * leaf_size, n_out * leaf_size)
    if layout is None:
        return jac
    rows = (lambda o: (o[row_axis],)) if row_axis is not None else (lambda o: ())
    subs = _gram_subscripts(layout, axes, row_axis, len(a_shape), len(site.out_shape))
    shapes = (rows(out1) + a_shape, rows(out2) + a_shape, out1 + site.out_shape, out2 + site.out_shape)
    sizes = _letter_sizes(subs["a"][:2] + subs["g"][:2], shapes)
    flops = (
        _size(subs["a"][:2], shapes[:2])
        + _size(subs["g"][:2], shapes[2:])
        + math.prod(sizes[c] for c in _unique(subs["final"][0] + subs["final"][1]))
    )
    elements = math.prod(sizes[c] for c in subs["g"][2]) + math.prod(sizes[c] for c in subs["a"][2])
    gram = _Form("gram", layout, subs, flops, elements)
    jac = dataclasses.replace(jac, layout=layout, subs=subs)
    if prefer != "auto":
        return gram if prefer == "gram" else jac
    fitting = [f for f in (gram, jac) if max_elements is None or f.elements <= max_elements]
    if not fitting:
        # The cotangent Gram of a full (O, O) kernel over many positions can outgrow the per-example
        # Jacobian by orders of magnitude: memory decides first.
        return min((gram, jac), key=lambda f: f.elements)
    return min(fitting, key=lambda f: f.flops)


def _site_jacobian(site: _Site, leaf_value, a, g, out_shape, row_axis):
    """Per-output Jacobian ``(*out, *leaf)`` of one factorized leaf from its operand and cotangents."""
    y_shape = site.out_shape

    def per_row(a_row, g_rows):
        _, pull = jax.vjp(lambda w: site.apply(a_row, w), leaf_value)
        return jax.vmap(lambda c: pull(c.astype(site.out_dtype))[0])(g_rows)

    if row_axis is None:
        j = per_row(a, g.reshape((-1,) + y_shape))
        return j.reshape(tuple(out_shape) + site.leaf_shape)
    n = out_shape[row_axis]
    g_rows = jnp.moveaxis(g, row_axis, 0).reshape((n, -1) + y_shape)
    j = jax.vmap(per_row)(a, g_rows)
    rest = tuple(np.delete(out_shape, row_axis))
    return jnp.moveaxis(j.reshape((n,) + rest + site.leaf_shape), 0, row_axis)


def _patched(layout, a1, a2, row_axis, same):
    if layout.patches is None:
        return a1, a2
    patch = lambda a: _patches(a, layout)
    if row_axis is not None:
        patch = jax.vmap(patch)
    a1 = patch(a1)
    return a1, (a1 if same else patch(a2))


def _jacobian_contribution(site, layout, subs, a1, a2, g1, g2, row_axis, same, precision=None):
    """``J1 J2ᵀ`` of a Gram-capable leaf through the Jacobian of the operand the equation sees.

    That operand is the leaf through bijective linear steps (reshape, transpose, scaling), so
    ``J_leaf J_leafᵀ = scale² · J_op J_opᵀ``; each ``J_op`` is one batched product of the (patched)
    activations and the cotangents over the positions, instead of a transposed equation per
    output entry.
    """
    a1, a2 = _patched(layout, a1, a2, row_axis, same)
    j = lambda k, a, g: jnp.einsum(
        f"{subs[k][0]},{subs[k][1]}->{subs[k][2]}", a, g.astype(a.dtype), precision=precision
    )
    j1 = j("jac1", a1, g1)
    j2 = j1 if same else j("jac2", a2, g2)
    f = subs["jac_final"]
    return jnp.einsum(f"{f[0]},{f[1]}->{f[2]}", j1, j2, precision=precision) * (site.origin.scale**2)


def _gram_contribution(site, layout, subs, a1, a2, g1, g2, row_axis, same, precision=None):
    a1, a2 = _patched(layout, a1, a2, row_axis, same)
    gram_a = jnp.einsum(f"{subs['a'][0]},{subs['a'][1]}->{subs['a'][2]}", a1, a2, precision=precision)
    gram_g = jnp.einsum(f"{subs['g'][0]},{subs['g'][1]}->{subs['g'][2]}", g1, g2, precision=precision)
    out = jnp.einsum(f"{subs['final'][0]},{subs['final'][1]}->{subs['final'][2]}", gram_a, gram_g, precision=precision)
    return out * (site.origin.scale**2)

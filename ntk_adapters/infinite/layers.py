"""Kernel maps of linear, spatial and normalization layers at infinite width.

Every function here maps a :class:`~ntk_adapters.infinite.kernel.Kernel` to the kernel of the
layer's output, for one channel (channels are i.i.d. at infinite width). Shapes follow the
layouts of :mod:`ntk_adapters.infinite.kernel`: ``'none'`` ``(N1, N2)``, ``'diagonal'``
``(N1, N2, H, W)``, ``'full'`` ``(N1, N2, H1, H2, W1, W2)``; ``cov1`` is ``(N1,)``, ``(N1, H, W)``
or ``(N1, H, H', W, W')`` likewise.

Conventions shared by all maps:

* *Standard parameterization* (what Flax and Haiku do): ``W ~ N(0, σw²/fan_in)``,
  ``b ~ N(0, σb²)``; the NTK is the sum over parameters of ``∂f(x)/∂θ · ∂f(x')/∂θ`` for the
  *unscaled* parameters, so a weight contributes ``fan_in · nngp_in`` (``nngp_in`` is the
  channel-averaged input covariance) and a bias contributes ``1`` whatever its initialization.
  *NTK parameterization*: ``W = σw/sqrt(fan_in) · ω``, ``b = σb · β`` with unit-variance ``ω``, ``β``.
* The NTK of the layers before a parameter-free linear map (pooling, reshape, mean, scaling)
  transforms exactly like the NNGP.
* ``ntk=None`` (not tracked) stays ``None``.

The parameter-free spatial maps (pooling, spatial means and sums, flatten, ...) are implemented in
:mod:`ntk_adapters.infinite.spatial` and are part of this namespace.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.normalization import channel_affine, layer_norm, rms_norm  # noqa: F401  (part of this library)
from ntk_adapters.infinite.spatial import (  # the parameter-free spatial maps are part of this library
    Padding,
    _axes_per_dim,
    _canonical_tuple,
    _map_all,
    _output_size,
    _spatial_or_raise,
    _window_sum,
    avg_pool,
    flatten,
    resolve_padding,
    scale_positions,
    spatial_mean,
    spatial_sum,
    sum_pool,
    to_diagonal,
    unflatten,
)

Array = jax.Array

__all__ = [
    "add",
    "avg_pool",
    "channel_affine",
    "concatenate",
    "conv",
    "dense",
    "dropout",
    "flatten",
    "input_kernel",
    "layer_norm",
    "resolve_padding",
    "rms_norm",
    "scale",
    "scale_positions",
    "spatial_mean",
    "spatial_sum",
    "sum_pool",
    "to_diagonal",
    "unflatten",
]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ----------------------------------------------------------------------------------------------
# Input.


def input_kernel(x1: Array, x2: Optional[Array] = None, *, layout: str = "none", ntk: bool = True) -> Kernel:
    """The kernel of the raw inputs: ``nngp = x1 · x2ᵀ / C`` over the channel (last) axis.

    Args:
      x1: ``(N1, C)`` for layout ``'none'``, ``(N1, *spatial, C)`` for ``'diagonal'`` / ``'full'``.
      x2: ``(N2, ...)`` like ``x1``, or ``None`` for ``x2 = x1`` (``same_inputs=True``).
      layout: ``'none'``, ``'diagonal'`` (covariances between equal positions) or ``'full'``. An
        input ``(N, C)`` has no positions, so it gets layout ``'none'`` whichever is asked.
      ntk: track the NTK (zeros: the input has no parameters) or leave it ``None``.

    Returns:
      A Kernel with ``is_gaussian=False`` (the input is not a random Gaussian process: apply a
      random linear layer before any nonlinearity).

    Example::

        k = input_kernel(jnp.ones((4, 8, 8, 3)), layout="full")
        k.nngp.shape  # (4, 4, 8, 8, 8, 8); k.cov1.shape == (4, 8, 8, 8, 8)
    """
    same = x2 is None
    x2 = x1 if x2 is None else x2
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(f"x1 {x1.shape} and x2 {x2.shape} must agree in every axis but the first")
    d = x1.ndim - 2
    if d == 0 and layout in ("diagonal", "full"):
        layout = "none"
    if layout == "none" and d != 0:
        raise ValueError(
            f"layout 'none' needs inputs of shape (N, C); got {x1.shape}. Use layout 'diagonal' or "
            "'full' for inputs with spatial axes."
        )
    c = x1.shape[-1]
    sp = _LETTERS[:d]
    if layout in ("none", "diagonal"):
        nngp = jnp.einsum(f"x{sp}z,y{sp}z->xy{sp}", x1, x2) / c
        cov = lambda x: jnp.einsum(f"x{sp}z,x{sp}z->x{sp}", x, x) / c  # noqa: E731
    elif layout == "full":
        sp2 = _LETTERS[d : 2 * d].upper()
        pairs = "".join(a + b for a, b in zip(sp, sp2))
        nngp = jnp.einsum(f"x{sp}z,y{sp2}z->xy{pairs}", x1, x2) / c
        cov = lambda x: jnp.einsum(f"x{sp}z,x{sp2}z->x{pairs}", x, x) / c  # noqa: E731
    else:
        raise ValueError(f"layout must be 'none', 'diagonal' or 'full'; got {layout!r}")
    cov1 = cov(x1)
    cov2 = cov1 if same else cov(x2)
    variances = {}
    if layout == "full" and not same:
        var = lambda x: jnp.einsum(f"x{sp}z,x{sp}z->x{sp}", x, x) / c  # noqa: E731
        variances = {"var1": var(x1), "var2": var(x2)}
    return Kernel(
        nngp=nngp,
        ntk=jnp.zeros_like(nngp) if ntk else None,
        cov1=cov1,
        cov2=cov2,
        layout=layout,
        is_gaussian=False,
        same_inputs=same,
        **variances,
    )


# ----------------------------------------------------------------------------------------------
# Dense.


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in ("standard", "ntk"):
        raise ValueError(f"parameterization must be 'standard' or 'ntk'; got {parameterization!r}")


def _linear_layer(
    kernel,
    mapped_nngp,
    mapped_ntk,
    mapped_cov1,
    mapped_cov2,
    mapped_variances,
    fan_in,
    weight_var,
    bias_var,
    has_bias,
    parameterization,
):
    _check_parameterization(parameterization)
    bias_var = bias_var if has_bias else 0.0
    nngp = weight_var * mapped_nngp + bias_var
    cov1 = weight_var * mapped_cov1 + bias_var
    cov2 = cov1 if kernel.same_inputs else weight_var * mapped_cov2 + bias_var
    variances = {name: weight_var * v + bias_var for name, v in mapped_variances.items()}
    ntk = None
    if kernel.ntk is not None:
        if parameterization == "standard":
            ntk = fan_in * mapped_nngp + weight_var * mapped_ntk + (1.0 if has_bias else 0.0)
        else:
            ntk = nngp + weight_var * mapped_ntk
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=True, **variances)


def dense(
    kernel: Kernel,
    *,
    fan_in: int,
    weight_var: float = 1.0,
    bias_var: float = 0.0,
    has_bias: bool = True,
    parameterization: str = "standard",
) -> Kernel:
    """A fully connected layer acting on the channel axis (at every position, any layout).

    Standard parameterization (``W ~ N(0, weight_var/fan_in)``, ``b ~ N(0, bias_var)``)::

        ntk  ← fan_in · nngp + weight_var · ntk (+ 1 if has_bias)
        nngp ← weight_var · nngp + bias_var

    NTK parameterization: ``nngp ← weight_var · nngp + bias_var``, ``ntk ← nngp_new + weight_var · ntk``.
    A bias is shared by all positions, so it adds to every pair of positions in ``'full'`` layout.

    Args:
      kernel: input kernel (any layout, Gaussian or not).
      fan_in: the actual input width (number of input channels); only the standard NTK uses it.
      weight_var: ``σw² = fan_in · Var(W)`` of the layer's initializer.
      bias_var: ``Var(b)`` at initialization (``0`` for the usual zero init).
      has_bias: whether the layer has a (trainable) bias.
      parameterization: ``'standard'`` or ``'ntk'``.

    Returns:
      The output kernel, same layout, ``is_gaussian=True``.

    Example::

        k = dense(input_kernel(x), fan_in=x.shape[-1], weight_var=2.0)   # nngp = 2 x xᵀ/d
    """
    _check_parameterization(parameterization)
    return _dense_jit(kernel, fan_in, weight_var, bias_var, has_bias=bool(has_bias), parameterization=parameterization)


@functools.partial(jax.jit, static_argnames=("has_bias", "parameterization"))
def _dense_jit(kernel, fan_in, weight_var, bias_var, *, has_bias, parameterization):
    return _linear_layer(
        kernel,
        kernel.nngp,
        kernel.ntk,
        kernel.cov1,
        kernel.cov2,
        kernel.map_variances(lambda v: v),
        fan_in,
        weight_var,
        bias_var,
        has_bias,
        parameterization,
    )


# ----------------------------------------------------------------------------------------------
# Convolution.


def conv(
    kernel: Kernel,
    *,
    window_shape: Sequence[int],
    fan_in: int,
    strides: Union[int, Sequence[int], None] = None,
    padding: Padding = "SAME",
    dilation: Union[int, Sequence[int], None] = None,
    weight_var: float = 1.0,
    bias_var: float = 0.0,
    has_bias: bool = True,
    parameterization: str = "standard",
    input_dilation: Union[int, Sequence[int], None] = None,
    gaussian: bool = True,
) -> Kernel:
    """A convolution (1-, 2-, 3-D, ...) with ``C`` input channels, in 'diagonal' or 'full' layout.

    ``z_p = Σ_{δ∈window, c} W_{δ,c} y_{p+δ,c} + b`` with ``Var(W) = σw²/(C·|window|)`` gives, with the
    window-diagonal average ``A(K)[p, p'] = (1/|window|) Σ_δ K[p+δ, p'+δ]`` (zero padding contributes
    0, circular padding wraps, reflect reflects; strides subsample ``p``; dilation spaces ``δ``)::

        nngp ← σw² · A(nngp) + σb²
        ntk  ← fan_in · A(nngp) + σw² · A(ntk) (+ 1 if has_bias)      (standard, fan_in = C·|window|)
        ntk  ← nngp_new + σw² · A(ntk)                                (NTK parameterization)

    ``A`` keeps the 'diagonal' layout closed (``A(K)[p, p]`` only needs ``K[q, q]``), so a network
    that ends in flatten + dense never needs the full covariance.

    A transposed convolution is the same map on the input dilated by its strides
    (``input_dilation``: ``s − 1`` zero positions between neighbours, whose covariances are 0), with
    the pads ``lax.conv_transpose`` computes. Grouped convolutions are the same map with
    ``fan_in = (C / groups) · |window|``; a depthwise convolution (one input channel per group, a
    finite fan-in) leaves the right second moments but not a Gaussian: pass ``gaussian=False``.

    Args:
      kernel: input kernel, layout 'diagonal' or 'full' with ``len(window_shape)`` spatial axes.
      window_shape: the filter's spatial size, e.g. ``(3, 3)``.
      fan_in: ``C · prod(window_shape)``, the number of weights each output sums over.
      strides, dilation: ints or one per spatial dimension (default 1).
      padding: as in :func:`resolve_padding`.
      weight_var, bias_var, has_bias, parameterization: as in :func:`dense`.
      input_dilation: ints or one per spatial dimension (default 1): the input dilation
        (``lhs_dilation``) of a transposed convolution; padding then applies to the dilated input.
      gaussian: whether the output is a Gaussian process (``False`` for a finite fan-in).

    Returns:
      The output kernel, same layout, spatial sizes of the convolution's output, ``is_gaussian``
      as ``gaussian``.

    Example::

        k = input_kernel(x, layout="diagonal")                      # x (N, 8, 8, 3)
        k = conv(k, window_shape=(3, 3), fan_in=27, strides=2)      # nngp (N, N, 4, 4)
    """
    spatial = _spatial_or_raise(kernel, "conv")
    _check_parameterization(parameterization)
    d = len(spatial)
    window = _canonical_tuple(window_shape, d, "window_shape")
    strides = _canonical_tuple(strides, d, "strides")
    dilation = _canonical_tuple(dilation, d, "dilation")
    input_dilation = _canonical_tuple(input_dilation, d, "input_dilation")
    dilated = tuple((n - 1) * f + 1 for n, f in zip(spatial, input_dilation))
    pads, mode = resolve_padding(padding, dilated, window, strides, dilation)
    if mode != "constant" and any(f != 1 for f in input_dilation):
        raise ValueError(f"padding {padding!r} with input dilation {input_dilation} is not supported")
    for i in range(d):  # fail here, with the sizes, rather than inside the traced map
        _output_size(dilated[i] + sum(pads[i]), window[i], strides[i], dilation[i])
    k = _conv_jit(
        kernel,
        fan_in,
        weight_var,
        bias_var,
        window=window,
        strides=strides,
        dilation=dilation,
        pads=tuple(tuple(p) for p in pads),
        mode=mode,
        has_bias=bool(has_bias),
        parameterization=parameterization,
        input_dilation=input_dilation,
    )
    return k if gaussian else k.replace(is_gaussian=False)


@functools.partial(
    jax.jit,
    static_argnames=("window", "strides", "dilation", "pads", "mode", "has_bias", "parameterization", "input_dilation"),
)
def _conv_jit(
    kernel,
    fan_in,
    weight_var,
    bias_var,
    *,
    window,
    strides,
    dilation,
    pads,
    mode,
    has_bias,
    parameterization,
    input_dilation,
):
    d = len(window)
    size = math.prod(window)

    def a_map(x, batch_axes, layout=kernel.layout):
        for i, axes in enumerate(_axes_per_dim(layout, d, batch_axes)):
            if input_dilation[i] != 1:
                # zeros between the positions: lax.pad's interior padding, on every axis of this dimension
                config = [(0, 0, 0)] * x.ndim
                for a in axes:
                    config[a] = (0, 0, input_dilation[i] - 1)
                x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
            x = _window_sum(x, axes, window[i], strides[i], dilation[i], pads[i], mode)
        return x / size

    nngp, ntk, cov1, cov2 = _map_all(kernel, a_map)
    # a position's variance sums the variances of its window: the diagonal layout's map
    variances = kernel.map_variances(lambda v: a_map(v, 1, "diagonal"))
    return _linear_layer(
        kernel, nngp, ntk, cov1, cov2, variances, fan_in, weight_var, bias_var, has_bias, parameterization
    )


# ----------------------------------------------------------------------------------------------
# Dropout.


def _same_entry_mask(kernel: Kernel, batch_axes: int, shape: tuple[int, ...]) -> Array:
    """1 where an entry pairs an element with itself (same example, same position), else 0."""
    d = len(kernel.spatial)
    mask = jnp.ones((1,) * len(shape))
    if batch_axes == 2:
        if not kernel.same_inputs:
            return jnp.zeros((1,) * len(shape))
        n = shape[0]
        mask = jnp.eye(n).reshape((n, n) + (1,) * (len(shape) - 2))
    if kernel.layout == "full":
        for i in range(d):
            s = shape[batch_axes + 2 * i]
            e = jnp.eye(s).reshape((1,) * (batch_axes + 2 * i) + (s, s) + (1,) * (len(shape) - batch_axes - 2 * i - 2))
            mask = mask * e
    return mask


def dropout(kernel: Kernel, rate: float, *, deterministic: bool = False) -> Kernel:
    """Dropout with inverted scaling ``y = m · x / (1 − rate)``, ``m ~ Bernoulli(1 − rate)`` per element.

    Masks are independent across examples, positions and channels, and an element paired with
    itself shares its mask. So ``E[y y'] = E[x x']`` for different elements, and
    ``E[m²]/(1 − rate)² · E[x²] = E[x²]/(1 − rate)`` for an element with itself: the entries of
    ``nngp`` with the same example (only when ``same_inputs``: ``x2`` is ``x1``) and the same
    position (every position in 'diagonal' layout, ``p = p'`` in 'full'), and the matching entries of
    ``cov1``/``cov2``, are divided by ``1 − rate``; the rest is unchanged. The NTK
    ``E[m m'/(1 − rate)²] Θ`` transforms the same way (the expected NTK over masks, which is what the
    averaging over infinitely many channels in the next linear layer sees).
    ``deterministic=True`` (evaluation mode) or ``rate == 0`` is the identity.

    The output is not Gaussian (``is_gaussian=False``): follow it by a linear layer.

    Example::

        k = dropout(k, 0.1)      # same shapes; diagonal entries × 1/0.9
    """
    if deterministic or rate == 0:
        return kernel
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate must be in [0, 1); got {rate}")
    return _dropout_jit(kernel, rate=float(rate))


@functools.partial(jax.jit, static_argnames=("rate",))
def _dropout_jit(kernel, *, rate):
    boost = 1.0 / (1.0 - rate) - 1.0

    def apply(x, batch_axes):
        return x * (1.0 + boost * _same_entry_mask(kernel, batch_axes, x.shape))

    nngp, ntk, cov1, cov2 = _map_all(kernel, apply)
    # an element with itself: every variance is boosted
    variances = kernel.map_variances(lambda v: v * (1.0 + boost))
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False, **variances)


# ----------------------------------------------------------------------------------------------
# Small combinators.


def scale(kernel: Kernel, c: Union[float, Array]) -> Kernel:
    """Multiplication by a constant ``c``: nngp, ntk and covariances times ``c²``; keeps ``is_gaussian``."""
    c2 = jnp.square(c)
    return kernel.replace(
        nngp=c2 * kernel.nngp,
        ntk=None if kernel.ntk is None else c2 * kernel.ntk,
        cov1=c2 * kernel.cov1,
        cov2=c2 * kernel.cov2,
        **kernel.map_variances(lambda v: c2 * v),
        mean1=None if kernel.mean1 is None else c * kernel.mean1,
        mean2=None if kernel.mean2 is None else c * kernel.mean2,
    )


def _check_compatible(kernels: Sequence[Kernel], name: str) -> None:
    if not kernels:
        raise ValueError(f"{name} needs at least one kernel")
    k0 = kernels[0]
    for k in kernels[1:]:
        if k.layout != k0.layout or k.same_inputs != k0.same_inputs or k.nngp.shape != k0.nngp.shape:
            raise ValueError(
                f"{name}: kernels differ in layout / same_inputs / shape: "
                f"{[(k.layout, k.same_inputs, k.nngp.shape) for k in kernels]}"
            )
        if (k.ntk is None) != (k0.ntk is None):
            raise ValueError(f"{name}: some kernels track the NTK and some do not")


def concatenate(kernels: Sequence[Kernel], channels: Sequence[float]) -> Kernel:
    """Concatenation along the channel axis of branches with ``channels[i]`` channels each.

    The next linear layer sees the channel-averaged covariance
    ``Σ_i n_i K_i / Σ_i n_i`` (NTK likewise). Branches have different distributions, so the result
    has ``is_gaussian=False``: follow it by a linear layer.

    Example::

        k = concatenate([k_a, k_b], channels=[64, 32])
    """
    kernels = list(kernels)
    _check_compatible(kernels, "concatenate")
    if len(channels) != len(kernels):
        raise ValueError(f"concatenate: {len(kernels)} kernels but {len(channels)} channel counts")
    total = float(sum(channels))
    w = [float(c) / total for c in channels]

    def mix(field):
        vals = [getattr(k, field) for k in kernels]
        if vals[0] is None:
            return None
        return sum(wi * v for wi, v in zip(w, vals))

    return kernels[0].replace(
        nngp=mix("nngp"),
        ntk=mix("ntk"),
        cov1=mix("cov1"),
        cov2=mix("cov2"),
        is_gaussian=False,
        **_combined_variances(kernels, w),
    )


def _combined_variances(kernels: Sequence[Kernel], weights: Sequence[float]) -> dict:
    """The :meth:`~Kernel.replace` variances of ``Σ_i weights[i] · kernels[i]`` ('full' layout)."""
    if not kernels[0].carries_variances:
        return {}
    v1, v2 = zip(*(k.variances() for k in kernels))
    return {"var1": sum(w * v for w, v in zip(weights, v1)), "var2": sum(w * v for w, v in zip(weights, v2))}


def add(*kernels: Kernel) -> Kernel:
    """Sum of *independent* branches (e.g. a residual ``x + f(x)`` where ``f`` ends in a fresh random
    linear layer): nngp, ntk and covariances add. The caller must establish independence; for
    dependent branches the cross-covariance is missing and the result would be wrong.

    Gaussian if every branch is. The second moments of branches with non-zero means add only when
    at most one branch has them (the cross terms are products of the means), which the caller
    checks; the channel means add when every branch's are known.

    Example::

        k = add(k_skip, k_branch)
    """
    _check_compatible(kernels, "add")
    k0 = kernels[0]
    gaussian = all(k.is_gaussian for k in kernels)
    # A Gaussian sum has mean zero, so the means are only read for a sum that is not.
    means = [] if gaussian else [m for m in (k.channel_means() for k in kernels) if m is not None]
    known = not gaussian and len(means) == len(kernels)
    return k0.replace(
        nngp=sum(k.nngp for k in kernels),
        ntk=None if k0.ntk is None else sum(k.ntk for k in kernels),
        cov1=sum(k.cov1 for k in kernels),
        cov2=sum(k.cov2 for k in kernels),
        **_combined_variances(kernels, [1.0] * len(kernels)),
        is_gaussian=gaussian,
        mean1=functools.reduce(jnp.add, [m[0] for m in means]) if known else None,
        mean2=functools.reduce(jnp.add, [m[1] for m in means]) if known else None,
    )

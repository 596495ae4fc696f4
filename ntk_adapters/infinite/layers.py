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
import numpy as np
from jax import lax

from ntk_adapters.infinite.kernel import Kernel
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
    return Kernel(
        nngp=nngp,
        ntk=jnp.zeros_like(nngp) if ntk else None,
        cov1=cov1,
        cov2=cov2,
        layout=layout,
        is_gaussian=False,
        same_inputs=same,
    )


# ----------------------------------------------------------------------------------------------
# Dense.


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in ("standard", "ntk"):
        raise ValueError(f"parameterization must be 'standard' or 'ntk'; got {parameterization!r}")


def _linear_layer(
    kernel, mapped_nngp, mapped_ntk, mapped_cov1, mapped_cov2, fan_in, weight_var, bias_var, has_bias, parameterization
):
    _check_parameterization(parameterization)
    bias_var = bias_var if has_bias else 0.0
    nngp = weight_var * mapped_nngp + bias_var
    cov1 = weight_var * mapped_cov1 + bias_var
    cov2 = cov1 if kernel.same_inputs else weight_var * mapped_cov2 + bias_var
    ntk = None
    if kernel.ntk is not None:
        if parameterization == "standard":
            ntk = fan_in * mapped_nngp + weight_var * mapped_ntk + (1.0 if has_bias else 0.0)
        else:
            ntk = nngp + weight_var * mapped_ntk
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=True)


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

    def a_map(x, batch_axes):
        for i, axes in enumerate(_axes_per_dim(kernel.layout, d, batch_axes)):
            if input_dilation[i] != 1:
                # zeros between the positions: lax.pad's interior padding, on every axis of this dimension
                config = [(0, 0, 0)] * x.ndim
                for a in axes:
                    config[a] = (0, 0, input_dilation[i] - 1)
                x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
            x = _window_sum(x, axes, window[i], strides[i], dilation[i], pads[i], mode)
        return x / size

    nngp, ntk, cov1, cov2 = _map_all(kernel, a_map)
    return _linear_layer(kernel, nngp, ntk, cov1, cov2, fan_in, weight_var, bias_var, has_bias, parameterization)


# ----------------------------------------------------------------------------------------------
# Normalization.


def _position_variances(kernel: Kernel) -> tuple[Array, Array]:
    """Per-position variances ``(N1, *spatial)``, ``(N2, *spatial)``."""
    if kernel.layout == "full":
        k = to_diagonal(kernel)
        return k.cov1, k.cov2
    return kernel.cov1, kernel.cov2


@functools.partial(
    jax.jit, static_argnames=("epsilon", "use_scale", "use_bias", "scale_init", "bias_init", "over_spatial")
)
def _normalize(kernel: Kernel, *, epsilon, use_scale, use_bias, scale_init, bias_init, over_spatial) -> Kernel:
    q1, q2 = _position_variances(kernel)
    d = len(kernel.spatial)
    if over_spatial and d:
        q1 = jnp.broadcast_to(jnp.mean(q1, axis=tuple(range(1, d + 1)), keepdims=True), q1.shape)
        q2 = jnp.broadcast_to(jnp.mean(q2, axis=tuple(range(1, d + 1)), keepdims=True), q2.shape)
    r1 = lax.rsqrt(q1 + epsilon)
    r2 = lax.rsqrt(q2 + epsilon)

    def expand(r, first, batch_axes_after):
        # (N, *spatial) -> broadcastable against the layout's arrays.
        n, *sp = r.shape
        if kernel.layout == "full":
            shape = [n]
            for s in sp:
                shape += [s, 1] if first else [1, s]
        else:
            shape = [n, *sp]
        r = r.reshape(shape)
        if batch_axes_after == "nngp1":
            return r[:, None]
        if batch_axes_after == "nngp2":
            return r[None]
        return r

    f_nngp = expand(r1, True, "nngp1") * expand(r2, False, "nngp2")
    if kernel.layout == "full":
        f_cov1 = expand(r1, True, None) * expand(r1, False, None)
        f_cov2 = expand(r2, True, None) * expand(r2, False, None)
    else:
        f_cov1, f_cov2 = r1 * r1, r2 * r2
    g2 = scale_init**2 if use_scale else 1.0
    b2 = bias_init**2 if use_bias else 0.0
    normalized = kernel.nngp * f_nngp
    nngp = g2 * normalized + b2
    cov1 = g2 * kernel.cov1 * f_cov1 + b2
    cov2 = cov1 if kernel.same_inputs else g2 * kernel.cov2 * f_cov2 + b2
    ntk = None
    if kernel.ntk is not None:
        ntk = g2 * kernel.ntk * f_nngp
        if use_scale:
            ntk = ntk + normalized
        if use_bias:
            ntk = ntk + 1.0
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=kernel.is_gaussian and b2 == 0.0)


def layer_norm(
    kernel: Kernel,
    *,
    epsilon: float = 1e-6,
    use_scale: bool = True,
    use_bias: bool = True,
    scale_init: float = 1.0,
    bias_init: float = 0.0,
    over_spatial: bool = False,
) -> Kernel:
    """Layer normalization over channels (Flax ``nn.LayerNorm``, Haiku ``hk.LayerNorm``) at infinite width.

    For a zero-mean Gaussian process the channel mean tends to 0 and the channel variance to the
    per-position variance ``q[p]``, so the layer divides each position by a deterministic
    ``sqrt(q[p] + ε)``. With ``K̂[p, p'] = K[p, p'] / sqrt((q1[p] + ε)(q2[p'] + ε))``, scale ``γ``
    (initial value ``scale_init``) and bias ``β`` (``bias_init``)::

        nngp ← γ0² K̂ + β0²
        ntk  ← γ0² Θ / sqrt((q1[p] + ε)(q2[p'] + ε)) (+ K̂ if use_scale) (+ 1 if use_bias)

    (the gradients of ``γ`` and ``β`` are ``x̂`` and ``1``; the derivatives through the channel mean
    and variance are O(1/width) per channel and vanish). ``over_spatial=True`` normalizes over
    positions and channels together (``reduction_axes=(1, ..., -1)``, or GroupNorm with infinitely
    many channels per group): ``q[p]`` is replaced by its mean over positions.

    Args:
      kernel: a Kernel with ``is_gaussian=True`` (mean subtraction needs the channel mean, which
        only a zero-mean process has known: 0). Any layout.
      epsilon: the layer's ε (Flax 1e-6, Haiku 1e-5 by default).

    Returns:
      Same layout; ``is_gaussian=True`` when ``bias_init == 0``.

    Example::

        k = layer_norm(dense(k, fan_in=512), epsilon=1e-6)
    """
    if not kernel.is_gaussian:
        raise ValueError(
            "layer_norm needs a zero-mean Gaussian input (is_gaussian=True, e.g. right after a Dense/Conv): "
            "the kernel does not track channel means, which the mean subtraction needs. rms_norm has no mean "
            "subtraction and accepts any input."
        )
    return _normalize(
        kernel,
        epsilon=float(epsilon),
        use_scale=bool(use_scale),
        use_bias=bool(use_bias),
        scale_init=float(scale_init),
        bias_init=float(bias_init),
        over_spatial=bool(over_spatial),
    )


def rms_norm(
    kernel: Kernel,
    *,
    epsilon: float = 1e-6,
    use_scale: bool = True,
    scale_init: float = 1.0,
    over_spatial: bool = False,
) -> Kernel:
    """RMS normalization over channels (Flax ``nn.RMSNorm``): ``y / sqrt(mean_c y² + ε) · γ``.

    The channel mean square tends to ``q[p]`` (the uncentred second moment the kernel tracks) for
    any input, Gaussian or not: ``nngp ← γ0² K̂``, ``ntk ← γ0² Θ/sqrt(...) (+ K̂ if use_scale)`` as in
    :func:`layer_norm`. Keeps ``is_gaussian``.
    """
    return _normalize(
        kernel,
        epsilon=float(epsilon),
        use_scale=bool(use_scale),
        use_bias=False,
        scale_init=float(scale_init),
        bias_init=0.0,
        over_spatial=bool(over_spatial),
    )


def channel_affine(
    kernel: Kernel,
    a,
    b,
    *,
    scale=None,
    offset=None,
) -> Kernel:
    """A module mapping each channel affinely, ``y_c = a_c x_c + b_c`` (BatchNorm in inference mode).

    The next random linear layer averages over channels, so with a zero-mean input
    ``nngp ← mean_c(a_c²)·nngp + mean_c(b_c²)`` (cross terms ``a_c b_c E[x_c]`` vanish) and
    ``ntk ← mean_c(a_c²)·ntk``, plus, for a trainable per-channel scale ``γ_c`` (``y = γ_c x̂_c + β_c``
    with ``x̂_c = (x_c − μ_c)/s_c``), ``mean_c((nngp + μ_c²)/s_c²)`` and ``+1`` for a trainable
    offset. The output is Gaussian only when every ``b_c`` is zero and every ``a_c`` equal.

    Args:
      kernel: the input kernel, any layout.
      a, b: concrete arrays ``(C,)``: the map's per-channel slope and offset.
      scale: the concrete values ``(C,)`` of a trainable per-channel scale ``γ``, or ``None``.
      offset: the concrete values ``(C,)`` of a trainable per-channel offset ``β``, or ``None``.

    Example::

        k = channel_affine(k, a, b, scale=params["scale"], offset=params["bias"])
    """
    a, b = np.asarray(a), np.asarray(b)
    a2, b2 = float(np.mean(a * a)), float(np.mean(b * b))
    nngp = a2 * kernel.nngp + b2
    cov1, cov2 = a2 * kernel.cov1 + b2, a2 * kernel.cov2 + b2
    ntk = None
    if kernel.ntk is not None:
        ntk = a2 * kernel.ntk
        if scale is not None:
            gamma = np.reshape(np.asarray(scale), (-1,))
            # a_c = γ_c/s_c and b_c = β_c − a_c μ_c give 1/s_c and μ_c
            inv_s2 = (a / np.where(gamma == 0, 1.0, gamma)) ** 2
            beta = np.reshape(np.asarray(offset), (-1,)) if offset is not None else 0.0
            mu = (beta - b) / np.where(a == 0, 1.0, a)
            ntk = ntk + float(np.mean(inv_s2)) * kernel.nngp + float(np.mean(inv_s2 * mu * mu))
        if offset is not None:
            ntk = ntk + 1.0
    uniform = bool(np.all(b == 0)) and bool(np.all(a == a[0]))
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=kernel.is_gaussian and uniform)


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
    return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)


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

    return kernels[0].replace(nngp=mix("nngp"), ntk=mix("ntk"), cov1=mix("cov1"), cov2=mix("cov2"), is_gaussian=False)


def add(*kernels: Kernel) -> Kernel:
    """Sum of *independent* branches (e.g. a residual ``x + f(x)`` where ``f`` ends in a fresh random
    linear layer): nngp, ntk and covariances add. The caller must establish independence; for
    dependent branches the cross-covariance is missing and the result would be wrong.

    Gaussian if every branch is.

    Example::

        k = add(k_skip, k_branch)
    """
    _check_compatible(kernels, "add")
    k0 = kernels[0]
    return k0.replace(
        nngp=sum(k.nngp for k in kernels),
        ntk=None if k0.ntk is None else sum(k.ntk for k in kernels),
        cov1=sum(k.cov1 for k in kernels),
        cov2=sum(k.cov2 for k in kernels),
        is_gaussian=all(k.is_gaussian for k in kernels),
    )

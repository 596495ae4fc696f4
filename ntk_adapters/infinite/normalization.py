"""Normalization layers at infinite width: LayerNorm, RMSNorm and per-channel affine maps
(BatchNorm in inference mode), framework-free kernel maps re-exported by
:mod:`ntk_adapters.infinite.layers`."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_adapters.infinite.kernel import Kernel

__all__ = ["channel_affine", "layer_norm", "rms_norm"]

Array = jax.Array


def _expand(kernel: Kernel, r: Array, first: bool, batch_axis: Optional[str]) -> Array:
    """``(N, *spatial)`` → broadcastable against the layout's arrays: the position axes of the first
    (``first``) or second input of a pair, and, for ``batch_axis`` ``'nngp1'``/``'nngp2'``, an axis
    for the other input's examples."""
    n, *sp = r.shape
    if kernel.layout == "full":
        shape = [n]
        for s in sp:
            shape += [s, 1] if first else [1, s]
    else:
        shape = [n, *sp]
    r = r.reshape(shape)
    if batch_axis == "nngp1":
        return r[:, None]
    if batch_axis == "nngp2":
        return r[None]
    return r


def _centre(kernel: Kernel, means: tuple[Array, Array]) -> Kernel:
    """Second moments minus the products of the channel means: the covariances of the channels
    around their common mean, which is what a normalization over channels divides by."""
    m1, m2 = means
    nngp = kernel.nngp - _expand(kernel, m1, True, "nngp1") * _expand(kernel, m2, False, "nngp2")
    cov1 = kernel.cov1 - _expand(kernel, m1, True, None) * _expand(kernel, m1, False, None)
    cov2 = (
        cov1 if kernel.same_inputs else kernel.cov2 - _expand(kernel, m2, True, None) * _expand(kernel, m2, False, None)
    )
    variances = {}
    if kernel.carries_variances:
        v1, v2 = kernel.variances()
        variances = {"var1": v1 - m1 * m1, "var2": v2 - m2 * m2}
    return kernel.replace(nngp=nngp, cov1=cov1, cov2=cov2, **variances)


@functools.partial(
    jax.jit, static_argnames=("centred", "epsilon", "use_scale", "use_bias", "scale_init", "bias_init", "over_spatial")
)
def _normalize(
    kernel: Kernel, means, *, centred, epsilon, use_scale, use_bias, scale_init, bias_init, over_spatial
) -> Kernel:
    # centred: the layer subtracts the channel mean (LayerNorm), which is ``means`` (None: zero).
    d = len(kernel.spatial)
    if means is not None:
        if over_spatial and d:
            axes = tuple(range(1, d + 1))
            means = tuple(jnp.broadcast_to(jnp.mean(m, axis=axes, keepdims=True), m.shape) for m in means)
        kernel = _centre(kernel, means)
    v1, v2 = q1, q2 = kernel.variances()
    if over_spatial and d:
        q1 = jnp.broadcast_to(jnp.mean(q1, axis=tuple(range(1, d + 1)), keepdims=True), q1.shape)
        q2 = jnp.broadcast_to(jnp.mean(q2, axis=tuple(range(1, d + 1)), keepdims=True), q2.shape)
    r1 = lax.rsqrt(q1 + epsilon)
    r2 = lax.rsqrt(q2 + epsilon)

    f_nngp = _expand(kernel, r1, True, "nngp1") * _expand(kernel, r2, False, "nngp2")
    if kernel.layout == "full":
        f_cov1 = _expand(kernel, r1, True, None) * _expand(kernel, r1, False, None)
        f_cov2 = _expand(kernel, r2, True, None) * _expand(kernel, r2, False, None)
    else:
        f_cov1, f_cov2 = r1 * r1, r2 * r2
    g2 = scale_init**2 if use_scale else 1.0
    b2 = bias_init**2 if use_bias else 0.0
    normalized = kernel.nngp * f_nngp
    nngp = g2 * normalized + b2
    cov1 = g2 * kernel.cov1 * f_cov1 + b2
    cov2 = cov1 if kernel.same_inputs else g2 * kernel.cov2 * f_cov2 + b2
    variances = {}
    if kernel.carries_variances:
        variances = {"var1": g2 * v1 * r1 * r1 + b2, "var2": g2 * v2 * r2 * r2 + b2}
    if kernel.ntk is not None:
        ntk = g2 * kernel.ntk * f_nngp
        if use_scale:
            ntk = ntk + normalized
        if use_bias:
            ntk = ntk + 1.0
    gaussian = kernel.is_gaussian and b2 == 0.0
    if gaussian or not centred:
        return kernel.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=gaussian, **variances)
    # The normalized channels average to exactly 0; the bias adds its initial value.
    beta = bias_init if use_bias else 0.0
    return kernel.replace(
        nngp=nngp,
        ntk=ntk,
        cov1=cov1,
        cov2=cov2,
        **variances,
        is_gaussian=False,
        mean1=jnp.full(q1.shape, beta, q1.dtype),
        mean2=jnp.full(q2.shape, beta, q2.dtype),
    )


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

    An input whose channels have known, different means ``m[p]`` averaged over channels (a fixed
    array added to a Gaussian value, :func:`~ntk_adapters.infinite.fixed_arrays.add_fixed`) is
    centred first: the kernel's second moments ``K`` become ``K[p, p'] − m1[p] m2[p']`` and
    ``q[p] = K[p, p] − m[p]²`` (channel mean and variance still converge to constants). The output
    then has channel mean ``β0`` but is not Gaussian (each channel keeps its own fixed part), so
    only linear layers may follow it.

    Args:
      kernel: a Kernel with ``is_gaussian=True``, or with its channel means known
        (:meth:`Kernel.channel_means`); the mean subtraction needs the channel mean. Any layout.
      epsilon: the layer's ε (Flax 1e-6, Haiku 1e-5 by default).

    Returns:
      Same layout; ``is_gaussian=True`` when ``bias_init == 0``.

    Example::

        k = layer_norm(dense(k, fan_in=512), epsilon=1e-6)
    """
    means = None if kernel.is_gaussian else kernel.channel_means()
    if not kernel.is_gaussian and means is None:
        raise ValueError(
            "layer_norm needs a zero-mean Gaussian input (is_gaussian=True, e.g. right after a Dense/Conv) or "
            "one whose channel means are known (a fixed array added to one): the mean subtraction needs the "
            "channel mean, which this kernel does not track. rms_norm has no mean subtraction and accepts any "
            "input."
        )
    return _normalize(
        kernel,
        means,
        centred=True,
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
        None,
        centred=False,
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
    variances = kernel.map_variances(lambda v: a2 * v + b2)
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
    return kernel.replace(
        nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=kernel.is_gaussian and uniform, **variances
    )

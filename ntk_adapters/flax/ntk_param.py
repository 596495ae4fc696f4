"""NTK-parameterized Dense and Conv layers for Flax linen.

Weights and biases are drawn from ``N(0, 1)`` and the layer scales its output:
``y = (w_std / sqrt(fan_in)) · W x + b_std · b``. Gradient descent on this parameterization has a
width-independent infinite-width NTK (Jacot et al. 2018); the infinite-width engine knows these
layers (``nngp ← w_std² nngp + b_std²``, ``ntk ← nngp_new + w_std² ntk``).

Example::

    from ntk_adapters.flax import ntk_param
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(ntk_param.Dense(512, w_std=1.4, b_std=0.1)(x))
            return ntk_param.Dense(10)(x)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = ["Dense", "Conv"]


class Dense(nn.Module):
    """``y = (w_std/√fan_in) · x W + b_std · b`` over the last axis, ``W``, ``b`` ~ N(0, 1).

    Attributes:
      features: output width.
      w_std: weight scale σw.
      b_std: bias scale σb; ``None`` for no bias.
    """

    features: int
    w_std: float = 1.0
    b_std: Optional[float] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        w = self.param("kernel", nn.initializers.normal(1.0), (fan_in, self.features), jnp.float32)
        y = jnp.dot(x, w.astype(x.dtype)) * (self.w_std / math.sqrt(fan_in))
        if self.b_std is not None:
            b = self.param("bias", nn.initializers.normal(1.0), (self.features,), jnp.float32)
            y = y + self.b_std * b.astype(x.dtype)
        return y


class Conv(nn.Module):
    """Channels-last N-D convolution in NTK parameterization, ``W``, ``b`` ~ N(0, 1).

    ``y = (w_std/√fan_in) · conv(x, W) + b_std · b`` with ``fan_in = C_in · prod(kernel_size)``.

    Attributes:
      features: output channels.
      kernel_size: the window, e.g. ``(3, 3)``.
      strides, kernel_dilation: ints or one per spatial dimension.
      padding: ``'SAME'``, ``'VALID'`` or ``'CIRCULAR'``.
      w_std, b_std: as in :class:`Dense`.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Union[int, Sequence[int]] = 1
    padding: str = "SAME"
    kernel_dilation: Union[int, Sequence[int]] = 1
    w_std: float = 1.0
    b_std: Optional[float] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        window = tuple(self.kernel_size)
        d = len(window)
        strides = (self.strides,) * d if isinstance(self.strides, int) else tuple(self.strides)
        dil = (self.kernel_dilation,) * d if isinstance(self.kernel_dilation, int) else tuple(self.kernel_dilation)
        c = x.shape[-1]
        w = self.param("kernel", nn.initializers.normal(1.0), window + (c, self.features), jnp.float32)
        padding = self.padding.upper()
        if padding == "CIRCULAR":
            eff = [(k - 1) * r + 1 for k, r in zip(window, dil)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in eff] + [(0, 0)]
            x = jnp.pad(x, pads, mode="wrap")
            padding = "VALID"
        if not 1 <= d <= 3:
            raise ValueError(f"Conv takes 1 to 3 spatial dimensions; got kernel_size={self.kernel_size!r}")
        spatial = "DHW"[-d:]
        layout = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, layout)
        y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), strides, padding, rhs_dilation=dil, dimension_numbers=dn)
        y = y * (self.w_std / math.sqrt(c * math.prod(window)))
        if self.b_std is not None:
            b = self.param("bias", nn.initializers.normal(1.0), (self.features,), jnp.float32)
            y = y + self.b_std * b.astype(x.dtype)
        return y

"""NTK-parameterized Linear and convolution modules for Haiku.

Weights and biases are drawn from ``N(0, 1)`` and the module scales its output:
``y = (w_std / sqrt(fan_in)) · W x + b_std · b``; the infinite-width engine knows these modules
(``nngp ← w_std² nngp + b_std²``, ``ntk ← nngp_new + w_std² ntk``).

Example::

    from ntk_adapters.haiku import ntk_param
    def f(x):
        return ntk_param.Linear(10)(jax.nn.relu(ntk_param.Linear(512, w_std=1.4)(x)))
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp

__all__ = ["Linear", "Conv", "Conv1D", "Conv2D", "Conv3D"]


class Linear(hk.Module):
    """``y = (w_std/√fan_in) · x W + b_std · b`` over the last axis; ``W``, ``b`` ~ N(0, 1)."""

    def __init__(self, output_size: int, w_std: float = 1.0, b_std: Optional[float] = None, name: Optional[str] = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.w_std = w_std
        self.b_std = b_std

    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        w = hk.get_parameter("w", (fan_in, self.output_size), x.dtype, init=hk.initializers.RandomNormal(1.0))
        y = jnp.dot(x, w) * (self.w_std / math.sqrt(fan_in))
        if self.b_std is not None:
            b = hk.get_parameter("b", (self.output_size,), x.dtype, init=hk.initializers.RandomNormal(1.0))
            y = y + self.b_std * b
        return y


class Conv(hk.Module):
    """Channels-last N-D convolution in NTK parameterization (``'SAME'``, ``'VALID'``, ``'CIRCULAR'``)."""

    def __init__(
        self,
        output_channels: int,
        kernel_shape: Sequence[int],
        stride: Union[int, Sequence[int]] = 1,
        padding: str = "SAME",
        rate: Union[int, Sequence[int]] = 1,
        w_std: float = 1.0,
        b_std: Optional[float] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self.output_channels = output_channels
        self.kernel_shape = tuple(kernel_shape)
        d = len(self.kernel_shape)
        self.stride = (stride,) * d if isinstance(stride, int) else tuple(stride)
        self.rate = (rate,) * d if isinstance(rate, int) else tuple(rate)
        self.padding = padding.upper()
        self.w_std = w_std
        self.b_std = b_std

    def __call__(self, x: jax.Array) -> jax.Array:
        window = self.kernel_shape
        d = len(window)
        c = x.shape[-1]
        w = hk.get_parameter("w", window + (c, self.output_channels), x.dtype, init=hk.initializers.RandomNormal(1.0))
        padding = self.padding
        if padding == "CIRCULAR":
            eff = [(k - 1) * r + 1 for k, r in zip(window, self.rate)]
            x = jnp.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in eff] + [(0, 0)], mode="wrap")
            padding = "VALID"
        spatial = "DHW"[-d:]
        layout = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, layout)
        y = jax.lax.conv_general_dilated(x, w, self.stride, padding, rhs_dilation=self.rate, dimension_numbers=dn)
        y = y * (self.w_std / math.sqrt(c * math.prod(window)))
        if self.b_std is not None:
            b = hk.get_parameter("b", (self.output_channels,), x.dtype, init=hk.initializers.RandomNormal(1.0))
            y = y + self.b_std * b
        return y


def Conv1D(output_channels, kernel_shape, **kw):  # noqa: N802 - mirrors hk.Conv1D
    """1-D :class:`Conv`; ``kernel_shape`` an int or a 1-tuple."""
    ks = (kernel_shape,) if isinstance(kernel_shape, int) else tuple(kernel_shape)
    return Conv(output_channels, ks, **kw)


def Conv2D(output_channels, kernel_shape, **kw):  # noqa: N802
    """2-D :class:`Conv`; ``kernel_shape`` an int or a 2-tuple."""
    ks = (kernel_shape,) * 2 if isinstance(kernel_shape, int) else tuple(kernel_shape)
    return Conv(output_channels, ks, **kw)


def Conv3D(output_channels, kernel_shape, **kw):  # noqa: N802
    """3-D :class:`Conv`; ``kernel_shape`` an int or a 3-tuple."""
    ks = (kernel_shape,) * 3 if isinstance(kernel_shape, int) else tuple(kernel_shape)
    return Conv(output_channels, ks, **kw)

"""Convolution modules read from what they trace: transposed, grouped and depthwise convolutions.

A module rule for a convolution needs the window, strides, pads, dilations and groups the
framework really uses; for transposed convolutions those are computed inside ``lax.conv_transpose``
(the pads, the input dilation by the strides), so they are read from the module's traced
``conv_general_dilated`` equation rather than re-derived from the module's attributes.

The infinite-width limit taken: the number of input channels ``C`` and of output channels go to
infinity together. For a grouped convolution with ``G`` groups, ``G`` stays fixed and each group's
``C / G`` channels go to infinity: the output is Gaussian with the ordinary convolution's kernel
and ``fan_in = (C / G)·|window|``. A depthwise convolution (``G = C``, one input channel per
group, as in ``hk.DepthwiseConv2D`` or ``feature_group_count=C``) keeps a finite fan-in: its
output has the same second moments, so a following random linear layer sees the right kernel,
but it is not Gaussian, so an elementwise nonlinearity right after it is refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.rules import ModuleCall

__all__ = ["traced_conv"]


def _equation(call: ModuleCall):
    eqns = call.equations("conv_general_dilated")
    if len(eqns) != 1:
        raise call.error(f"the rule expects one convolution in the module; it traces {len(eqns)}")
    eqn = eqns[0]
    for e in call.eqns:
        if e.primitive.name in ("pad", "gather", "dynamic_slice", "dynamic_update_slice"):
            # circular or reflect padding written around the convolution (a flipped kernel,
            # transpose_kernel=True, is harmless: its entries are i.i.d.)
            raise call.error(
                f"primitive {e.primitive.name} around the convolution has no rule; use "
                "'SAME', 'VALID' or explicit padding"
            )
    return eqn


def traced_conv(
    kernel: Kernel, call: ModuleCall, *, weight: Any, weight_init: Any, bias_init: Any = None, has_bias: bool
) -> Kernel:
    """The kernel after the module's one traced convolution (plus its bias), any groups and dilations.

    Args:
      kernel: the input kernel ('diagonal' or 'full' layout, channels last).
      call: the module call; its traced ``conv_general_dilated`` gives window, strides, pads,
        dilations, groups and which weight axes are input and output channels.
      weight: the weight array; ``weight_init`` its initializer (for ``σw²``).
      bias_init: the bias initializer, when ``has_bias``.

    Returns:
      The output kernel; ``is_gaussian=False`` for a depthwise convolution (see the module docstring).

    Example::

        def conv_transpose_rule(k, call):   # a Flax nn.ConvTranspose
            m = call.module
            return traced_conv(k, call, weight=call.params["kernel"], weight_init=m.kernel_init,
                               bias_init=m.bias_init, has_bias="bias" in call.params)
    """
    if kernel.layout == "none":
        raise call.error("a convolution needs spatial axes in its input")
    eqn = _equation(call)
    p = eqn.params
    dn = p["dimension_numbers"]
    d = len(dn.lhs_spec) - 2
    channels_last = (0, d + 1) + tuple(range(1, d + 1))
    if tuple(dn.lhs_spec) != channels_last or tuple(dn.out_spec) != channels_last:
        raise call.error("only channels-last data formats have a rule")
    if p.get("batch_group_count", 1) != 1:
        raise call.error("batch_group_count != 1 has no rule")
    w_shape = tuple(np.shape(weight))
    window = tuple(w_shape[a] for a in dn.rhs_spec[2:])
    per_group_in = w_shape[dn.rhs_spec[1]]
    groups = int(p.get("feature_group_count", 1))
    c_in = call.in_shape[-1]
    depthwise = groups > 1 and groups == c_in
    fan_in = per_group_in * math.prod(window)
    s_w2 = call.weight_variance(weight_init, w_shape, fan_in)
    s_b2 = call.bias_variance(bias_init, (w_shape[dn.rhs_spec[0]],)) if has_bias else 0.0
    try:
        return _layers.conv(
            kernel,
            window_shape=window,
            fan_in=fan_in,
            strides=tuple(p["window_strides"]),
            padding=[tuple(pad) for pad in p["padding"]],
            dilation=tuple(p["rhs_dilation"]),
            input_dilation=tuple(p["lhs_dilation"]),
            weight_var=s_w2,
            bias_var=s_b2,
            has_bias=has_bias,
            gaussian=not depthwise,
        )
    except ValueError as e:
        raise call.error(str(e)) from None

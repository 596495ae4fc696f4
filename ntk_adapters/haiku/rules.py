"""Infinite-width rules for Haiku modules, registered on import.

The engine (:mod:`ntk_adapters.infinite.engine`) imports this module when it meets a Haiku model.
Each rule is a :class:`~ntk_adapters.infinite.rules.ModuleRule`, ``rule(kernel, call) -> kernel``
with ``call`` a :class:`~ntk_adapters.infinite.rules.ModuleCall`; the kernel maps are those of
:mod:`ntk_adapters.infinite.layers`.

Haiku creates a layer's default initializer inside ``__call__`` (``w_init=None`` means
``TruncatedNormal(1/sqrt(fan_in))``, truncated at two standard deviations without correcting the
variance, so ``σw² ≈ 0.7737``); the rules reproduce those defaults exactly.
"""

from __future__ import annotations

import contextlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.haiku import ntk_param as _ntk_param
from ntk_adapters.infinite import attention as _attention
from ntk_adapters.infinite import conv_calls as _conv_calls
from ntk_adapters.infinite import embeddings as _embeddings
from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.rules import ModuleCall


@contextlib.contextmanager
def _record(model, on_call):
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = module.module_name
        tag = on_call(module, name, (name,), context.method_name)
        if tag is None:
            return next_fun(*args, **kwargs)
        with jax.named_scope(tag):
            return next_fun(*args, **kwargs)

    with hk.intercept_methods(interceptor):
        yield


_rules.register_framework("haiku", _record)


def _default_w_init(fan_in_shape):
    return hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(np.prod(fan_in_shape)))


def _linear(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    w = call.params["w"]
    fan_in = w.shape[0]
    w_init = m.w_init if m.w_init is not None else _default_w_init(w.shape[:-1])
    s_w2 = call.weight_variance(w_init, w.shape, fan_in)
    has_bias = "b" in call.params
    b_init = m.b_init if m.b_init is not None else jnp.zeros
    s_b2 = call.bias_variance(b_init, call.params["b"].shape) if has_bias else 0.0
    return _layers.dense(k, fan_in=fan_in, weight_var=s_w2, bias_var=s_b2, has_bias=has_bias)


_rules.register_rule(hk.Linear, _linear, linear=True, flat="average")


def _conv(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    w = call.params["w"]
    window = tuple(w.shape[:-2])
    if getattr(m, "channel_index", -1) not in (-1, len(window) + 1):
        raise call.error("only channels-last data formats are supported")
    if getattr(m, "mask", None) is not None:
        raise call.error("masked convolutions have no rule")
    if k.layout == "none":
        raise call.error("a convolution needs spatial axes in its input")
    fan_in = int(np.prod(w.shape[:-1]))
    w_init = m.w_init if m.w_init is not None else _default_w_init(w.shape[:-1])
    s_w2 = call.weight_variance(w_init, w.shape, fan_in)
    has_bias = "b" in call.params
    b_init = m.b_init if m.b_init is not None else jnp.zeros
    s_b2 = call.bias_variance(b_init, call.params["b"].shape) if has_bias else 0.0
    padding = m.padding
    if callable(padding) or (isinstance(padding, (list, tuple)) and any(callable(p) for p in padding)):
        raise call.error("padding functions have no rule; use 'SAME', 'VALID' or explicit pads")
    try:
        return _layers.conv(
            k,
            window_shape=window,
            fan_in=fan_in,
            strides=m.stride,
            padding=padding,
            dilation=m.kernel_dilation,
            weight_var=s_w2,
            bias_var=s_b2,
            has_bias=has_bias,
            # depthwise (one input channel per group): finite fan-in, not Gaussian
            gaussian=not (1 < getattr(m, "feature_group_count", 1) == call.in_shape[-1]),
        )
    except ValueError as e:
        raise call.error(str(e)) from None


_rules.register_rule(hk.ConvND, _conv, linear=True)


def _traced_conv(k: Kernel, call: ModuleCall) -> Kernel:
    # Transposed and depthwise convolutions: pads, dilations and groups as lax computes them.
    m = call.module
    w = call.params["w"]
    if getattr(m, "channel_index", -1) not in (-1, w.ndim - 1):
        raise call.error("only channels-last data formats are supported")
    if getattr(m, "mask", None) is not None:
        raise call.error("masked convolutions have no rule")
    if callable(getattr(m, "padding", None)):
        raise call.error("padding functions have no rule; use 'SAME', 'VALID' or explicit pads")
    fan_in_shape = w.shape[:-2] + (call.in_shape[-1] if isinstance(m, hk.ConvNDTranspose) else w.shape[-2],)
    w_init = m.w_init if m.w_init is not None else _default_w_init(fan_in_shape)
    b_init = m.b_init if m.b_init is not None else jnp.zeros
    return _conv_calls.traced_conv(k, call, weight=w, weight_init=w_init, bias_init=b_init, has_bias="b" in call.params)


_rules.register_rule(hk.ConvNDTranspose, _traced_conv, linear=True)
for _depthwise in (hk.DepthwiseConv1D, hk.DepthwiseConv2D, hk.DepthwiseConv3D):
    _rules.register_rule(_depthwise, _traced_conv, linear=True)


def _const_init(call: ModuleCall, init, default: float, shape, what: str) -> float:
    # Haiku's None means the layer's own constant default
    return default if init is None else call.initial_value(init, shape, what)


def _layer_norm(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    nd = len(call.in_shape)
    axis = m.axis
    axes = (
        tuple(sorted(a % (nd + 1) for a in (axis if isinstance(axis, (tuple, list)) else [axis])))
        if not isinstance(axis, slice)
        else tuple(range(nd + 1))[axis]
    )
    if axes == (nd,):
        over_spatial = False
    elif axes == tuple(range(1, nd + 1)):
        over_spatial = True
    else:
        raise call.error(f"normalization over axis {axis} has no rule (use -1, or all non-batch axes)")
    c = call.in_shape[-1]
    scale0 = _const_init(call, m.scale_init, 1.0, (c,), "LayerNorm scale") if m.create_scale else 1.0
    off0 = _const_init(call, m.offset_init, 0.0, (c,), "LayerNorm offset") if m.create_offset else 0.0
    try:
        return _layers.layer_norm(
            k,
            epsilon=m.eps,
            use_scale=m.create_scale,
            use_bias=m.create_offset,
            scale_init=scale0,
            bias_init=off0,
            over_spatial=over_spatial,
        )
    except ValueError as e:
        raise call.error(str(e)) from None


_rules.register_rule(hk.LayerNorm, _layer_norm)


def _batch_norm(k: Kernel, call: ModuleCall) -> Kernel:
    if call.reduces_over_batch():
        raise call.error(
            "BatchNorm in training mode normalizes with batch statistics, which couple the "
            "examples; call it with is_training=False (inference mode)"
        )
    a, b = call.per_channel_affine()
    return _layers.channel_affine(k, a, b, scale=call.params.get("scale"), offset=call.params.get("offset"))


_rules.register_rule(hk.BatchNorm, _batch_norm)


def _ntk_linear(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    b2 = 0.0 if m.b_std is None else float(m.b_std) ** 2
    return _layers.dense(
        k,
        fan_in=call.params["w"].shape[0],
        weight_var=float(m.w_std) ** 2,
        bias_var=b2,
        has_bias=m.b_std is not None,
        parameterization="ntk",
    )


def _ntk_conv(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    w = call.params["w"]
    b2 = 0.0 if m.b_std is None else float(m.b_std) ** 2
    try:
        return _layers.conv(
            k,
            window_shape=tuple(w.shape[:-2]),
            fan_in=int(np.prod(w.shape[:-1])),
            strides=m.stride,
            padding=m.padding,
            dilation=m.rate,
            weight_var=float(m.w_std) ** 2,
            bias_var=b2,
            has_bias=m.b_std is not None,
            parameterization="ntk",
        )
    except ValueError as e:
        raise call.error(str(e)) from None


_rules.register_rule(_ntk_param.Linear, _ntk_linear, linear=True, flat="average")
_rules.register_rule(_ntk_param.Conv, _ntk_conv, linear=True)


def _embed(k, call: ModuleCall) -> Kernel:
    """``hk.Embed`` (``ARRAY_INDEX`` and ``ONE_HOT`` lookups compute the same rows): see
    :mod:`ntk_adapters.infinite.embeddings`; ``weight_variance=`` overrides the variance of one entry."""
    if call.ids is None:
        raise call.error("an embedding takes integer token ids; it received an input-dependent float value")
    table = call.params["embeddings"]
    var = call.weight_variance(call.module.w_init, table.shape, 1)
    ids1, ids2 = call.ids
    return _embeddings.lookup(
        ids1, ids2, variance=var, layout=call.options.layout, dtype=table.dtype, vocab_size=table.shape[0]
    )


_rules.register_rule(hk.Embed, _embed, linear=True, integer_input=True)


def _attention_precheck(module, params, options):
    if options.attention != "infinite_heads":
        return _attention.no_limit_reason(int(module.num_heads), int(module.key_size))
    return None


def _attention_rule(k, call: ModuleCall) -> Kernel:
    m, p = call.module, call.params
    if not all(name in p for name in ("query", "key", "value", "linear")):
        raise call.error(f"expected query, key, value and linear projections; its parameters are {sorted(p)}")
    w_init = m.w_init
    b_init = m.b_init if m.b_init is not None else jnp.zeros

    def projection(name):
        w = np.shape(p[name]["w"])
        init = w_init if w_init is not None else _default_w_init(w[:-1])
        has_bias = "b" in p[name]
        b = call.bias_variance(b_init, np.shape(p[name]["b"])) if has_bias else 0.0
        return (call.weight_variance(init, w, w[0]), b, has_bias)

    fan_in = int(np.shape(p["query"]["w"])[0])
    weights = _attention.AttentionWeights(
        query=projection("query"),
        key=projection("key"),
        value=projection("value"),
        out=projection("linear"),
        fan_in=fan_in,
        num_heads=int(m.num_heads),
        head_dim=int(m.key_size),
        value_dim=int(m.value_size),
    )
    return _attention.module_kernel(k, call, weights)


_attention.register_attention_rule(hk.MultiHeadAttention, _attention_rule, _attention_precheck)

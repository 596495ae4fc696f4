"""Infinite-width rules for Flax linen layers, registered on import.

The engine (:mod:`ntk_adapters.infinite.engine`) imports this module when it meets a Flax model.
Each rule is a :class:`~ntk_adapters.infinite.rules.ModuleRule`, ``rule(kernel, call) -> kernel``
with ``call`` a :class:`~ntk_adapters.infinite.rules.ModuleCall`; the kernel maps are those of
:mod:`ntk_adapters.infinite.layers`.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ntk_adapters.flax import ntk_param as _ntk_param
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
        path = tuple(module.scope.path) if module.scope is not None else tuple(module.path)
        tag = on_call(module, "/".join(path) or type(module).__name__, path, context.method_name)
        if tag is None:
            return next_fun(*args, **kwargs)
        with jax.named_scope(tag):
            return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


_rules.register_framework("flax.linen", _record)


def _dense(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    w = call.params["kernel"]
    fan_in = w.shape[0]
    s_w2 = call.weight_variance(m.kernel_init, w.shape, fan_in)
    has_bias = "bias" in call.params
    s_b2 = call.bias_variance(m.bias_init, call.params["bias"].shape) if has_bias else 0.0
    return _layers.dense(k, fan_in=fan_in, weight_var=s_w2, bias_var=s_b2, has_bias=has_bias)


_rules.register_rule(nn.Dense, _dense, linear=True, flat="average")


def _conv(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    w = call.params["kernel"]
    window = tuple(w.shape[:-2])
    groups = getattr(m, "feature_group_count", 1)
    if k.layout == "none":
        raise call.error("a convolution needs spatial axes in its input")
    fan_in = int(np.prod(w.shape[:-1]))
    s_w2 = call.weight_variance(m.kernel_init, w.shape, fan_in)
    has_bias = "bias" in call.params
    s_b2 = call.bias_variance(m.bias_init, call.params["bias"].shape) if has_bias else 0.0
    padding = m.padding
    if isinstance(padding, str) and padding.upper() == "CAUSAL":
        padding = "CAUSAL"
    try:
        return _layers.conv(
            k,
            window_shape=window,
            fan_in=fan_in,
            strides=m.strides,
            padding=padding,
            dilation=m.kernel_dilation,
            weight_var=s_w2,
            bias_var=s_b2,
            has_bias=has_bias,
            input_dilation=m.input_dilation,
            # depthwise (one input channel per group): finite fan-in, not Gaussian
            gaussian=not (groups > 1 and groups == call.in_shape[-1]),
        )
    except ValueError as e:
        raise call.error(str(e)) from None


_rules.register_rule(nn.Conv, _conv, linear=True)


def _conv_transpose(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    if isinstance(m.padding, str) and m.padding.upper() == "CIRCULAR":
        raise call.error(
            "circular padding of a transposed convolution has no rule; use 'SAME', 'VALID' or explicit pads"
        )
    return _conv_calls.traced_conv(
        k,
        call,
        weight=call.params["kernel"],
        weight_init=m.kernel_init,
        bias_init=m.bias_init,
        has_bias="bias" in call.params,
    )


_rules.register_rule(nn.ConvTranspose, _conv_transpose, linear=True)


def _layer_norm(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    nd = len(call.in_shape)
    axes = tuple(a % (nd + 1) for a in np.atleast_1d(m.reduction_axes))
    feats = tuple(a % (nd + 1) for a in np.atleast_1d(m.feature_axes))
    if feats != (nd,):
        raise call.error("only per-channel scale and bias (feature_axes=-1) have a rule")
    if axes == (nd,):
        over_spatial = False
    elif axes == tuple(range(1, nd + 1)):
        over_spatial = True
    else:
        raise call.error(f"normalization over axes {m.reduction_axes} has no rule (use -1, or all non-batch axes)")
    c = call.in_shape[-1]
    scale0 = call.initial_value(m.scale_init, (c,), "LayerNorm scale") if m.use_scale else 1.0
    bias0 = call.initial_value(m.bias_init, (c,), "LayerNorm bias") if m.use_bias else 0.0
    try:
        return _layers.layer_norm(
            k,
            epsilon=m.epsilon,
            use_scale=m.use_scale,
            use_bias=m.use_bias,
            scale_init=scale0,
            bias_init=bias0,
            over_spatial=over_spatial,
        )
    except ValueError as e:
        raise call.error(str(e)) from None


_rules.register_rule(nn.LayerNorm, _layer_norm)


def _dropout(k: Kernel, call: ModuleCall) -> Kernel:
    if not call.eqns:
        return k
    return _layers.dropout(k, float(call.module.rate))


_rules.register_rule(nn.Dropout, _dropout)


def _batch_norm(k: Kernel, call: ModuleCall) -> Kernel:
    if call.reduces_over_batch():
        raise call.error(
            "BatchNorm in training mode normalizes with batch statistics, which couple the "
            "examples; call it with use_running_average=True (inference mode)"
        )
    a, b = call.per_channel_affine()
    return _layers.channel_affine(
        k,
        a,
        b,
        scale=call.params.get("scale") if call.module.use_scale else None,
        offset=call.params.get("bias") if call.module.use_bias else None,
    )


_rules.register_rule(nn.BatchNorm, _batch_norm)


def _ntk_dense(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    fan_in = call.params["kernel"].shape[0]
    b2 = 0.0 if m.b_std is None else float(m.b_std) ** 2
    return _layers.dense(
        k,
        fan_in=fan_in,
        weight_var=float(m.w_std) ** 2,
        bias_var=b2,
        has_bias=m.b_std is not None,
        parameterization="ntk",
    )


def _ntk_conv(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    w = call.params["kernel"]
    b2 = 0.0 if m.b_std is None else float(m.b_std) ** 2
    try:
        return _layers.conv(
            k,
            window_shape=tuple(w.shape[:-2]),
            fan_in=int(np.prod(w.shape[:-1])),
            strides=m.strides,
            padding=m.padding,
            dilation=m.kernel_dilation,
            weight_var=float(m.w_std) ** 2,
            bias_var=b2,
            has_bias=m.b_std is not None,
            parameterization="ntk",
        )
    except ValueError as e:
        raise call.error(str(e)) from None


_rules.register_rule(_ntk_param.Dense, _ntk_dense, linear=True, flat="average")
_rules.register_rule(_ntk_param.Conv, _ntk_conv, linear=True)


def _dense_general(k: Kernel, call: ModuleCall) -> Kernel:
    m = call.module
    axis = tuple(np.atleast_1d(m.axis))
    feats = tuple(np.atleast_1d(m.features))
    nd = len(call.in_shape)
    if tuple(a % (nd + 1) for a in axis) != (nd,) or len(feats) != 1 or tuple(m.batch_dims or ()):
        raise call.error(
            "only DenseGeneral as a plain projection of the last axis to one feature axis "
            "(axis=-1, integer features, no batch_dims) has a rule"
        )
    return _dense(k, call)  # a plain projection has Dense's parameters and initializers


_rules.register_rule(nn.DenseGeneral, _dense_general, linear=True, flat="average")


def _embed(k, call: ModuleCall) -> Kernel:
    """``nn.Embed`` / ``nnx.Embed``: rows of a table with i.i.d. entries (see
    :mod:`ntk_adapters.infinite.embeddings`); ``weight_variance=`` overrides the variance of one entry."""
    if call.ids is None:
        raise call.error("an embedding takes integer token ids; it received an input-dependent float value")
    table = call.params["embedding"]
    m = call.module
    var = call.weight_variance(m.embedding_init, table.shape, 1)
    dtype = m.dtype if m.dtype is not None else table.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = table.dtype
    ids1, ids2 = call.ids
    return _embeddings.lookup(
        ids1, ids2, variance=var, layout=call.options.layout, dtype=dtype, vocab_size=table.shape[0]
    )


_rules.register_rule(nn.Embed, _embed, linear=True, integer_input=True)


def _attention_head_dim(module, params) -> "int | None":
    q = params.get("query", {}).get("kernel")
    if q is not None and np.ndim(q) == 3:
        return int(np.shape(q)[-1])  # DenseGeneral to (num_heads, head_dim)
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None and getattr(module, "qkv_features", None):
        head_dim = module.qkv_features // module.num_heads
    return head_dim


def _dot_product_attention_fns() -> tuple:
    from flax import nnx  # the NNX function is a different object from linen's

    return (nn.dot_product_attention, nnx.dot_product_attention)


_DOT_PRODUCT_ATTENTION = _dot_product_attention_fns()


def _attention_precheck(module, params, options):
    if options.attention != "infinite_heads":
        return _attention.no_limit_reason(int(module.num_heads), _attention_head_dim(module, params))
    if getattr(module, "decode", False):
        return "decode=True (autoregressive caching) has no infinite-width rule; use decode=False"
    if getattr(module, "normalize_qk", False):
        return "normalize_qk=True (LayerNorm on queries and keys) has no infinite-width rule"
    if getattr(module, "attention_fn", nn.dot_product_attention) not in _DOT_PRODUCT_ATTENTION:
        return "a custom attention_fn has no infinite-width rule (the limit is that of softmax dot-product attention)"
    num_kv_heads = getattr(module, "num_kv_heads", None)
    if num_kv_heads not in (None, module.num_heads):
        return "grouped-query attention (num_kv_heads != num_heads) has no infinite-width rule"
    if getattr(module, "dropout_rate", 0.0) and not getattr(module, "deterministic", False):
        return (
            "attention dropout outside deterministic mode has no infinite-width rule: pass "
            "deterministic=True or dropout_rate=0"
        )
    return None


def _attention_rule(k, call: ModuleCall) -> Kernel:
    m, p = call.module, call.params
    if not all(name in p for name in ("query", "key", "value", "out")):
        raise call.error(f"expected query, key, value and out projections; its parameters are {sorted(p)}")
    fan_in, heads, head_dim = np.shape(p["query"]["kernel"])
    value_dim = np.shape(p["value"]["kernel"])[-1]
    kernel_init = m.kernel_init
    bias_init = m.bias_init
    out_kernel_init = getattr(m, "out_kernel_init", None) or kernel_init
    out_bias_init = getattr(m, "out_bias_init", None) or bias_init

    def projection(name, w_init, b_init):
        w = np.shape(p[name]["kernel"])
        fan = int(np.prod(w[:-1])) if name == "out" else int(w[0])
        flat = (fan, int(np.prod(w)) // fan)  # DenseGeneral draws its kernel flattened to (fan_in, fan_out)
        has_bias = "bias" in p[name]
        b = call.bias_variance(b_init, np.shape(p[name]["bias"])) if has_bias else 0.0
        return (call.weight_variance(w_init, flat, fan), b, has_bias)

    weights = _attention.AttentionWeights(
        query=projection("query", kernel_init, bias_init),
        key=projection("key", kernel_init, bias_init),
        value=projection("value", kernel_init, bias_init),
        out=projection("out", out_kernel_init, out_bias_init),
        fan_in=int(fan_in),
        num_heads=int(heads),
        head_dim=int(head_dim),
        value_dim=int(value_dim),
    )
    return _attention.module_kernel(k, call, weights)


_attention.register_attention_rule(nn.MultiHeadDotProductAttention, _attention_rule, _attention_precheck)

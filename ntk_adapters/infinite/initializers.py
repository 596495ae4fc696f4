"""Exact per-entry moments of the initializers Flax, Haiku and ``jax.nn.initializers`` use.

The infinite-width kernel of a layer depends on its weights only through their variance, so the
variance must be the one the layer's *actual* initializer draws from: Flax's ``lecun_normal``
corrects its truncated normal so that ``Var(W) = 1/fan_in`` exactly, while Haiku's default
``TruncatedNormal(1/sqrt(fan_in))`` does not, giving ``Var(W) ≈ 0.7737/fan_in``.

Initializers are recognised by what they are (the closure's ``__qualname__`` and captured values
for ``jax.nn.initializers``; the class and attributes for Haiku), never estimated. An initializer
the library cannot read raises :class:`UnknownInitializerError`; pass the variance explicitly
(``infinite_kernel_fn(model, weight_variance={'Dense_0': 2.0})``) or register a reader with
:func:`register_initializer`.

Example::

  import jax
  from ntk_adapters.infinite import initializers
  initializers.moments(jax.nn.initializers.lecun_normal(), (64, 32))   # (0.0, 1/64)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import jax.numpy as jnp
import numpy as np

__all__ = [
    "UnknownInitializerError",
    "register_initializer",
    "moments",
    "variance",
    "truncated_normal_moments",
]

Reader = Callable[[Any, Sequence[int]], tuple[float, float]]


class UnknownInitializerError(ValueError):
    """The variance of an initializer cannot be read exactly."""


_READERS: dict[Any, Reader] = {}


def register_initializer(key: Union[type, str, Callable], reader: Reader) -> None:
    """Teach the engine the exact moments of an initializer.

    Args:
      key: the initializer's class (for initializer objects such as Haiku's), the initializer
        function itself, or the ``__qualname__`` of the closure a factory returns (e.g.
        ``'variance_scaling.<locals>.init'``), or ``'module.QualName'`` for a class matched by name.
      reader: ``reader(init, shape) -> (mean, variance)`` of one entry of a weight of ``shape``.

    Example::

      register_initializer(MyInit, lambda init, shape: (0.0, init.scale ** 2 / shape[0]))
    """
    _READERS[key] = reader


def _std_normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) if math.isfinite(x) else 0.0


def _std_normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def truncated_normal_moments(lower: float, upper: float) -> tuple[float, float]:
    """Mean and variance of a standard normal truncated to ``[lower, upper]``.

    For ``[-2, 2]`` the variance is ``1 - 4 φ(2) / (Φ(2) - Φ(-2)) ≈ 0.773741``.
    """
    lower, upper = float(lower), float(upper)
    z = _std_normal_cdf(upper) - _std_normal_cdf(lower)
    pa, pb = _std_normal_pdf(lower), _std_normal_pdf(upper)
    mean = (pa - pb) / z
    ta = lower * pa if math.isfinite(lower) else 0.0
    tb = upper * pb if math.isfinite(upper) else 0.0
    var = 1.0 + (ta - tb) / z - mean * mean
    return mean, var


def _jax_fans(shape, in_axis, out_axis, batch_axis):
    def size(axes):
        if isinstance(axes, int):
            return shape[axes]
        return math.prod(shape[i] for i in axes)

    in_size, out_size, batch_size = size(in_axis), size(out_axis), size(batch_axis)
    receptive = math.prod(shape) / in_size / out_size / batch_size
    return in_size * receptive, out_size * receptive


def _denominator(mode: str, fan_in: float, fan_out: float) -> float:
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    if mode == "fan_avg":
        return (fan_in + fan_out) / 2
    if mode == "fan_geo_avg":
        return (fan_in * fan_out) ** 0.5
    raise UnknownInitializerError(f"unknown variance-scaling mode {mode!r}")


# Both Flax (via jax.nn.initializers) and Haiku divide by this rounded constant rather than the
# exact standard deviation of the truncated normal, so the variance carries the tiny ratio.
_ROUNDED_TRUNC_STD = 0.87962566103423978


def _closure(init) -> dict:
    code = getattr(init, "__code__", None)
    cells = getattr(init, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _jax_variance_scaling(init, shape):
    c = _closure(init)
    fan_in, fan_out = _jax_fans(tuple(shape), c["in_axis"], c["out_axis"], c["batch_axis"])
    var = float(c["scale"]) / _denominator(c["mode"], fan_in, fan_out)
    dist = c["distribution"]
    if dist == "truncated_normal":
        _, tvar = truncated_normal_moments(-2.0, 2.0)
        return 0.0, var * tvar / _ROUNDED_TRUNC_STD**2
    if dist in ("normal", "uniform"):
        return 0.0, var
    raise UnknownInitializerError(f"variance_scaling distribution {dist!r} is not known")


def _jax_normal(init, shape):
    return 0.0, float(_closure(init)["stddev"]) ** 2


def _jax_truncated_normal(init, shape):
    c = _closure(init)
    mean, var = truncated_normal_moments(c["lower"], c["upper"])
    s = float(c["stddev"])
    return s * mean, s * s * var


def _jax_uniform(init, shape):
    s = float(_closure(init)["scale"])  # jax.nn.initializers.uniform draws from [0, scale)
    return s / 2, s * s / 12


def _jax_constant(init, shape):
    return float(np.asarray(_closure(init)["value"])), 0.0


def _zeros(init, shape):
    return 0.0, 0.0


def _ones(init, shape):
    return 1.0, 0.0


def _haiku_fans(shape, fan_in_axes=None):
    shape = tuple(shape)
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape
    if fan_in_axes is not None:
        fan_in = math.prod(shape[i] for i in fan_in_axes)
        return fan_in, math.prod(s for i, s in enumerate(shape) if i not in fan_in_axes)
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _haiku_truncated_normal(init, shape):
    mean, var = truncated_normal_moments(init.lower, init.upper)
    s = float(np.asarray(init.stddev))
    return float(np.asarray(init.mean)) + s * mean, s * s * var


def _haiku_normal(init, shape):
    return float(np.asarray(init.mean)), float(np.asarray(init.stddev)) ** 2


def _haiku_uniform(init, shape):
    lo, hi = float(np.asarray(init.minval)), float(np.asarray(init.maxval))
    return (lo + hi) / 2, (hi - lo) ** 2 / 12


def _haiku_constant(init, shape):
    value = np.asarray(init.constant)
    if value.size != 1:
        raise UnknownInitializerError("a Constant initializer with an array value has no single mean")
    return float(value.reshape(())), 0.0


def _haiku_variance_scaling(init, shape):
    fan_in, fan_out = _haiku_fans(shape, getattr(init, "fan_in_axes", None))
    if init.mode == "fan_in":
        scale = init.scale / max(1.0, fan_in)
    elif init.mode == "fan_out":
        scale = init.scale / max(1.0, fan_out)
    else:
        scale = init.scale / max(1.0, (fan_in + fan_out) / 2.0)
    if init.distribution == "truncated_normal":
        _, tvar = truncated_normal_moments(-2.0, 2.0)
        return 0.0, scale * tvar / _ROUNDED_TRUNC_STD**2
    return 0.0, float(scale)


for _key, _reader in {
    "variance_scaling.<locals>.init": _jax_variance_scaling,
    "normal.<locals>.init": _jax_normal,
    "truncated_normal.<locals>.init": _jax_truncated_normal,
    "uniform.<locals>.init": _jax_uniform,
    "constant.<locals>.init": _jax_constant,
    "haiku._src.initializers.TruncatedNormal": _haiku_truncated_normal,
    "haiku._src.initializers.RandomNormal": _haiku_normal,
    "haiku._src.initializers.RandomUniform": _haiku_uniform,
    "haiku._src.initializers.Constant": _haiku_constant,
    "haiku._src.initializers.VarianceScaling": _haiku_variance_scaling,
}.items():
    register_initializer(_key, _reader)
for _f in (jnp.zeros, np.zeros, jnp.zeros_like):
    register_initializer(_f, _zeros)
for _f in (jnp.ones, np.ones, jnp.ones_like):
    register_initializer(_f, _ones)


def _find_reader(init) -> Reader | None:
    try:
        if init in _READERS:
            return _READERS[init]
    except TypeError:  # unhashable
        pass
    for cls in type(init).__mro__:
        if cls in _READERS:
            return _READERS[cls]
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _READERS:
            return _READERS[name]
    qual = getattr(init, "__qualname__", None)
    module = getattr(init, "__module__", "") or ""
    if qual is not None:
        if qual in ("zeros", "ones") and module.startswith("jax"):
            return _zeros if qual == "zeros" else _ones
        if qual in ("zeros_init.<locals>.init",):
            return _zeros
        if qual in ("ones_init.<locals>.init",):
            return _ones
        if qual in _READERS and module.startswith("jax"):
            return _READERS[qual]
        if qual in _READERS:
            return _READERS[qual]
    return None


def moments(init: Any, shape: Sequence[int]) -> tuple[float, float]:
    """Exact ``(mean, variance)`` of one entry of a weight of ``shape`` drawn by ``init``.

    Args:
      init: a ``jax.nn.initializers`` / ``flax.linen.initializers`` function, a Haiku
        initializer object, ``jnp.zeros`` / ``jnp.ones``, or anything registered with
        :func:`register_initializer`.
      shape: the weight's shape, e.g. ``(fan_in, features)`` for a Dense kernel or
        ``(kh, kw, in, out)`` for a 2-D convolution.

    Raises:
      UnknownInitializerError: when ``init`` is not known exactly.
    """
    reader = _find_reader(init)
    if reader is None:
        raise UnknownInitializerError(
            f"cannot read the exact variance of the initializer {init!r}; pass the variance explicitly "
            "(infinite_kernel_fn(model, weight_variance={'<layer path>': sigma_w**2}) where sigma_w**2 = "
            "fan_in * Var(W), or bias_variance={...}) or register a reader with "
            "ntk_adapters.infinite.initializers.register_initializer"
        )
    try:
        mean, var = reader(init, tuple(int(s) for s in shape))
    except (KeyError, AttributeError, TypeError) as e:
        raise UnknownInitializerError(f"cannot read the initializer {init!r}: {e}") from e
    return float(mean), float(var)


def variance(init: Any, shape: Sequence[int], what: str = "weight") -> float:
    """Exact variance of one entry drawn by ``init``; raises unless the mean is zero.

    Example::

      variance(jax.nn.initializers.he_normal(), (128, 64))    # 2/128
    """
    mean, var = moments(init, shape)
    if mean != 0.0:
        raise UnknownInitializerError(
            f"the {what} initializer {init!r} has non-zero mean {mean}; the infinite-width engine needs "
            "zero-mean random weights and biases (use a zero-mean initializer, or monte_carlo_kernel_fn)"
        )
    return var

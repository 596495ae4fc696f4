"""The registry of infinite-width rules: how the engine learns layers, primitives and frameworks.

Three kinds of entries, all used by the built-in layers too (``ntk_adapters.flax.rules`` and
``ntk_adapters.haiku.rules`` register theirs when imported; the engine imports them only for a
model of that framework):

* **Module rules** (:func:`register_rule`): for a module type (a Flax linen class, a Haiku
  module class, your own), a function replacing everything the module computes::

      rule(kernel: Kernel, call: ModuleCall) -> Kernel

  ``kernel`` is the :class:`~ntk_adapters.infinite.kernel.Kernel` of the module's input (one
  channel at infinite width; shapes in its docstring). ``call`` is a
  :class:`~ntk_adapters.infinite.engine.ModuleCall`: ``call.module`` the module object (its
  configuration: ``features``, ``kernel_init``, ``use_bias``, ...), ``call.path`` its path in the
  model (``'Dense_0'``, ``'mlp/~/linear_0'``), ``call.params`` its parameters (a dict of arrays, so
  ``call.params['kernel'].shape`` gives the weight shape), ``call.in_shape`` / ``call.out_shape``
  the per-example shapes, ``call.variance(init, shape, what)`` the exact variance of an
  initializer (honouring the user's ``weight_variance=`` / ``bias_variance=`` overrides) and
  ``call.apply(x)`` the module evaluated on a concrete input. The rule returns the Kernel of the
  module's output; it sets ``is_gaussian=True`` when the output is a zero-mean Gaussian process
  (a random linear layer).

  Options: ``linear=True`` declares that the output is a fresh random linear map of the input
  (zero mean, independent of everything computed before), which lets residual sums ``x + f(x)``
  add kernels; ``flat='average'`` lets the rule receive a flattened spatial input as its
  position average (right for Dense-like layers with i.i.d. weights), the default ``'error'``
  refuses it.

* **Primitive rules** (:func:`register_primitive_rule`): for a JAX primitive met between modules,
  ``rule(eqn, invals, ctx) -> list of outvals``, where each value is either a concrete array or an
  engine :class:`~ntk_adapters.infinite.engine.Value`; see the engine for the built-in ones
  (reshape, reduce_sum, reduce_window_sum, add, concatenate, ...).

* **Elementwise primitives** (:func:`register_elementwise_primitive`): primitives that act entry by
  entry (``tanh``, ``max``, ``logistic``, ...). A chain of them on one Gaussian value becomes one
  function phi whose kernel is computed by :mod:`ntk_adapters.infinite.elementwise`.

Example (a custom layer ``Scale`` computing ``x * self.alpha``)::

    from ntk_adapters.infinite import register_rule

    def scale_rule(k, call):
        a2 = call.module.alpha ** 2
        return k.replace(nngp=a2 * k.nngp, ntk=a2 * k.ntk, cov1=a2 * k.cov1, cov2=a2 * k.cov2)

    register_rule(Scale, scale_rule)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional, Union

__all__ = [
    "ModuleRule",
    "register_rule",
    "lookup_rule",
    "register_primitive_rule",
    "register_elementwise_primitive",
    "register_framework",
    "ELEMENTWISE_PRIMITIVES",
]


@dataclasses.dataclass(frozen=True)
class ModuleRule:
    """A registered module rule and its options (see the module docstring)."""

    fn: Callable
    linear: bool = False
    flat: str = "error"


_MODULE_RULES: dict[Any, ModuleRule] = {}
PRIMITIVE_RULES: dict[str, Callable] = {}
FRAMEWORKS: dict[str, Callable] = {}
_FRAMEWORK_PACKAGES = {"flax.linen": "ntk_adapters.flax.rules", "flax.nnx": "ntk_adapters.flax.nnx_rules",
                       "haiku": "ntk_adapters.haiku.rules"}

ELEMENTWISE_PRIMITIVES: set[str] = {
    "neg", "sin", "cos", "tan", "tanh", "logistic", "exp", "exp2", "log", "log1p", "expm1", "abs",
    "sign", "erf", "erfc", "erf_inv", "max", "min", "add", "sub", "mul", "div", "integer_pow", "pow",
    "sqrt", "rsqrt", "cbrt", "square", "select_n", "ge", "gt", "lt", "le", "eq", "ne", "and", "or",
    "not", "convert_element_type", "clamp", "atan", "asinh", "sinh", "cosh", "atanh", "copy",
    "copy_p", "stop_gradient", "floor", "ceil", "round", "is_finite", "nextafter", "rem",
    "reduce_precision", "logaddexp", "atan2",
}


def register_rule(
    module_type: Union[type, str],
    rule: Callable,
    *,
    linear: bool = False,
    flat: str = "error",
) -> None:
    """Register the infinite-width rule of a module type (see the module docstring).

    Args:
      module_type: the class (matched for subclasses too), or ``'module.QualName'``.
      rule: ``rule(kernel, call) -> kernel``.
      linear: the output is a fresh zero-mean random linear map of the input (Dense, Conv).
      flat: ``'average'`` to accept a flattened spatial input as its position average,
        ``'error'`` (default) to refuse it.

    Example::

      register_rule(MyDense, my_dense_rule, linear=True, flat='average')
    """
    if flat not in ("average", "error"):
        raise ValueError(f"flat must be 'average' or 'error'; got {flat!r}")
    _MODULE_RULES[module_type] = ModuleRule(rule, linear=linear, flat=flat)


def lookup_rule(module: Any) -> Optional[ModuleRule]:
    """The rule registered for ``type(module)`` or its closest base class, else ``None``."""
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return _MODULE_RULES[cls]
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _MODULE_RULES:
            return _MODULE_RULES[name]
    return None


def register_primitive_rule(primitive: Any, rule: Callable) -> None:
    """Register ``rule(eqn, invals, ctx) -> outvals`` for a JAX primitive (object or name).

    The rule is used for equations outside recognized modules whose inputs include an
    input-dependent value (an engine ``Value``); concrete-only equations are simply evaluated.
    """
    name = primitive if isinstance(primitive, str) else primitive.name
    PRIMITIVE_RULES[name] = rule


def register_elementwise_primitive(primitive: Any) -> None:
    """Declare that a primitive acts entry by entry, so it can be part of an elementwise phi."""
    ELEMENTWISE_PRIMITIVES.add(primitive if isinstance(primitive, str) else primitive.name)


def register_framework(framework: str, recorder: Callable) -> None:
    """Register how to record module calls of a framework while the engine traces a model.

    ``recorder(model, on_call)`` returns a context manager; inside it, every call of a module
    method must call ``tag = on_call(module, path, params_path, method_name)`` (which returns a
    string or ``None``) and, when a tag is returned, run the method under
    ``jax.named_scope(tag)`` so the engine can attribute each traced equation to its module.
    """
    FRAMEWORKS[framework] = recorder


def load_framework(framework: str) -> Optional[Callable]:
    """Import the rules of ``framework`` (lazily) and return its recorder, if any."""
    if framework not in FRAMEWORKS and framework in _FRAMEWORK_PACKAGES:
        importlib.import_module(_FRAMEWORK_PACKAGES[framework])
    return FRAMEWORKS.get(framework)

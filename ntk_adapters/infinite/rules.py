"""The registry of infinite-width rules and the contract a rule is written against.

Three kinds of entries, all used by the built-in layers too (``ntk_adapters.flax.rules`` and
``ntk_adapters.haiku.rules`` register theirs when imported; the engine imports them only for a
model of that framework; the primitive rules live in :mod:`ntk_adapters.infinite.primitives`):

* **Module rules** (:func:`register_rule`): for a module type (a Flax linen class, a Haiku
  module class, your own), a function replacing everything the module computes, of the
  :class:`ModuleRule` signature::

      rule(kernel: Kernel, call: ModuleCall) -> Kernel

  ``kernel`` is the :class:`~ntk_adapters.infinite.kernel.Kernel` of the module's input (one
  channel at infinite width; shapes in its docstring). ``call`` is a frozen :class:`ModuleCall`:
  ``call.module`` the module object (its configuration: ``features``, ``kernel_init``,
  ``use_bias``, ...), ``call.path`` its path in the model (``'Dense_0'``, ``'mlp/~/linear_0'``),
  ``call.params`` its parameters (a dict of arrays, so ``call.params['kernel'].shape`` gives the
  weight shape), ``call.in_shape`` / ``call.out_shape`` the per-example shapes, ``call.options``
  the engine's options, ``call.masks`` the masks it receives and ``call.key`` a PRNG key of
  its own (rules registered with ``masks=True`` / ``samples=True``), and the questions a rule may ask:
  ``call.weight_variance(init, shape, fan_in)`` / ``call.bias_variance(init, shape)`` the exact
  ``σw²`` / ``σb²`` of an initializer (honouring the user's ``weight_variance=`` /
  ``bias_variance=`` overrides), ``call.initial_value(init, shape, what)`` the value of a
  constant initializer, ``call.apply(x)`` the module evaluated on a concrete input,
  ``call.per_channel_affine()``, ``call.reduces_over_batch()`` and ``call.error(message)`` (an
  :class:`InfiniteWidthError` naming the layer). The rule returns the Kernel of the module's
  output; it sets ``is_gaussian=True`` when the output is a zero-mean Gaussian process (a random
  linear layer). The maps of :mod:`ntk_adapters.infinite.layers` and
  :mod:`ntk_adapters.infinite.elementwise` compute most outputs.

  Options: ``linear=True`` declares that the output is a fresh random linear map of the input
  (zero mean, independent of everything computed before), which lets residual sums ``x + f(x)``
  add kernels; ``flat='average'`` lets the rule receive a flattened spatial input as its
  position average (right for Dense-like layers with i.i.d. weights), the default ``'error'``
  refuses it; ``integer_input=True`` lets the module receive integer inputs (an embedding's token
  ids): its rule is called with ``kernel=None`` and reads them from ``call.ids``;
  ``masks=True`` lets it receive masks computed from integer inputs besides its input
  (``call.masks``); ``full_layout=True`` asks for covariances between positions;
  ``precheck(module, params, options)`` returns the reason a configuration is refused (or
  ``None``) before the module's inputs are examined, so the refusal is the same whatever inputs
  it has.

* **Primitive rules** (:func:`register_primitive_rule`): for a JAX primitive met between modules,
  of the :class:`PrimitiveRule` signature::

      rule(eqn, invals, ctx: PrimitiveContext) -> list of outvals

  ``eqn`` is the jaxpr equation, each value in ``invals`` / outvals a
  :class:`~ntk_adapters.infinite.values.Value` (input-dependent, with a kernel) or a
  :class:`~ntk_adapters.infinite.values.Concrete` array. :class:`PrimitiveContext` gives the
  batch size, the options, ``ctx.materialize(value, eqn)``, ``ctx.call_program(eqn, invals)``
  and ``ctx.error(eqn, message)`` (an error naming the innermost module ``eqn`` belongs to, with
  or without a rule, and the operation).

* **Elementwise primitives** (:func:`register_elementwise_primitive`): primitives that act entry by
  entry (``tanh``, ``max``, ``logistic``, ...). A chain of them on one Gaussian value becomes one
  function phi whose kernel is computed by :mod:`ntk_adapters.infinite.elementwise`; the rule doing
  so is registered under :data:`ELEMENTWISE`.

Example (a custom layer ``Scale`` computing ``x * self.alpha``)::

    from ntk_adapters.infinite import layers, register_rule

    def scale_rule(kernel, call):
        return layers.scale(kernel, call.module.alpha)

    register_rule(Scale, scale_rule)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import initializers as _inits
from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite import values as _values
from ntk_adapters.infinite.kernel import Kernel

__all__ = [
    "ELEMENTWISE",
    "ELEMENTWISE_PRIMITIVES",
    "EngineOptions",
    "InfiniteWidthError",
    "ModuleCall",
    "ModuleRule",
    "Precheck",
    "PrimitiveContext",
    "PrimitiveRule",
    "RegisteredModuleRule",
    "layer_error",
    "load_framework",
    "lookup_primitive_rule",
    "lookup_rule",
    "module_type_name",
    "register_elementwise_primitive",
    "register_framework",
    "register_primitive_rule",
    "register_rule",
    "variance_override",
]


class InfiniteWidthError(NotImplementedError):
    """The engine has no exact infinite-width rule for part of the model."""


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The options of one :func:`~ntk_adapters.infinite.infinite_kernel_fn`, as rules see them.

    Attributes:
      weight_variance: the user's ``σw²`` override: ``None``, one float, or a dict from layer path
        (or its last component) to ``σw²``.
      bias_variance: the same for ``σb²``.
      layout: the spatial layout of this evaluation, ``'diagonal'`` or ``'full'``.
      n_points: Gauss–Hermite nodes per dimension for elementwise functions without a closed form.
      attention: which limit multi-head attention layers take: ``'refuse'`` (none exists at a
        fixed number of heads) or ``'infinite_heads'`` (:mod:`~ntk_adapters.infinite.attention`).
      attention_samples: heads drawn per attention layer for ``'infinite_heads'``.
      key: the PRNG key of this evaluation, for rules that estimate by sampling (``None`` when
        nothing is sampled); each call gets its own in :attr:`ModuleCall.key`.
    """

    weight_variance: Union[None, float, Mapping[str, float]]
    bias_variance: Union[None, float, Mapping[str, float]]
    layout: str
    n_points: int
    attention: str = "refuse"
    attention_samples: int = 1024
    key: Any = None


def variance_override(table: Union[None, float, Mapping[str, float]], path: str) -> Optional[float]:
    """The user's ``weight_variance`` / ``bias_variance`` override for ``path``: the float itself, or the
    entry of the dict for ``path`` or its last component (``'mlp/~/linear_0'``, ``'linear_0'``), else
    ``None``."""
    if table is None:
        return None
    if isinstance(table, (int, float)):
        return float(table)
    for key in (path, path.split("/")[-1]):
        if key in table:
            return float(table[key])
    return None


def module_type_name(module: Any) -> str:
    """``'package.module.QualName'`` of a module object's class, for messages."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def layer_error(path: str, module: Any, message: str) -> InfiniteWidthError:
    """An :class:`InfiniteWidthError` naming the layer at ``path`` and its class, to raise."""
    return InfiniteWidthError(f"layer `{path}` ({module_type_name(module)}): {message}; {_programs.SUGGEST}")


# ----------------------------------------------------------------------------------------------
# What a module rule receives.


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleCall:
    """One call of a framework module, as its rule sees it (built by the interpreter, frozen).

    Attributes:
      module: the module object (its configuration).
      path: the module's path in the model, ``'Dense_0'`` (Flax), ``'mlp/~/linear_0'`` (Haiku).
      params: the module's parameters, a dict of arrays (empty for a module without any).
      in_shape, out_shape: per-example shapes of the module's input and output.
      in_dtype: the dtype of the module's input.
      batch: the batch size of the traced program: :attr:`apply` takes ``(batch, *in_shape)``.
      options: the engine's :class:`EngineOptions`.
      eqns: the module's traced equations (batch axis first).
      apply: ``apply(x) -> y``: the module's traced equations evaluated on a concrete input of shape
        ``(batch, *in_shape)`` (for probing, e.g., the affine map of a BatchNorm in inference mode).
      ids: for a rule registered with ``integer_input=True`` whose module receives integer inputs
        (token ids), ``(ids1, ids2)``: the ids of the ``x1`` examples ``(N1, *in_shape)`` and of the
        ``x2`` examples (``None`` when ``x2`` is ``x1``); the rule then receives ``kernel=None``.
      masks: for a rule registered with ``masks=True``, the constants of the input (padding and
        causal masks computed from integer inputs) the module receives besides its input, in the
        order the module first uses them: ``(m1, m2)`` pairs, ``(N1, ...)`` and ``(N2, ...)``
        (``m2`` ``None`` when ``x2`` is ``x1``).
      key: a PRNG key of this call (``None`` when the evaluation samples nothing), for rules that
        estimate an expectation by sampling.
    """

    module: Any
    path: str
    params: Mapping[str, Any]
    in_shape: tuple
    out_shape: tuple
    in_dtype: Any
    batch: int
    options: EngineOptions
    eqns: tuple = dataclasses.field(default=(), repr=False)
    apply: Optional[Callable[[jax.Array], jax.Array]] = dataclasses.field(default=None, repr=False)
    ids: Optional[tuple] = dataclasses.field(default=None, repr=False)
    masks: tuple = dataclasses.field(default=(), repr=False)
    key: Any = dataclasses.field(default=None, repr=False)

    @property
    def type_name(self) -> str:
        """The module's class, ``'flax.linen.linear.Dense'``."""
        return module_type_name(self.module)

    def _override(self, table) -> Optional[float]:
        return variance_override(table, self.path)

    def weight_variance(self, init: Any, shape: Sequence[int], fan_in: int) -> float:
        """``σw² = fan_in · Var(W)`` of the initializer ``init`` of a weight of ``shape``, or the user's
        ``weight_variance`` for this layer. Raises :class:`InfiniteWidthError` for an initializer
        that cannot be read exactly."""
        o = self._override(self.options.weight_variance)
        if o is not None:
            return o
        try:
            return fan_in * _inits.variance(_unbox(init), shape, what=f"weight of {self.path}")
        except _inits.UnknownInitializerError as e:
            raise InfiniteWidthError(f"layer `{self.path}` ({self.type_name}): {e}") from None

    def bias_variance(self, init: Any, shape: Sequence[int]) -> float:
        """``σb² = Var(b)`` of the initializer ``init`` of a bias of ``shape``, or the user's
        ``bias_variance`` for this layer."""
        o = self._override(self.options.bias_variance)
        if o is not None:
            return o
        try:
            return _inits.variance(_unbox(init), shape, what=f"bias of {self.path}")
        except _inits.UnknownInitializerError as e:
            raise InfiniteWidthError(f"layer `{self.path}` ({self.type_name}): {e}") from None

    def initial_value(self, init: Any, shape: Sequence[int], what: str) -> float:
        """The value every entry of a constant-initialized parameter starts at (a LayerNorm scale);
        an error naming ``what`` when ``init`` is random or unknown."""
        try:
            mean, var = _inits.moments(_unbox(init), shape)
        except _inits.UnknownInitializerError as e:
            raise self.error(f"{what}: {e}") from None
        if var != 0.0:
            raise self.error(f"{what} is initialized at random; the rule needs a constant initial value")
        return mean

    def per_channel_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)``, ``(C,)`` each, of a module that maps each channel affinely, ``y_c = a_c x_c + b_c``
        (BatchNorm in inference mode), read by evaluating it on zeros and on ones."""
        if self.apply is None:
            raise InfiniteWidthError(
                f"layer `{self.path}` ({self.type_name}): reading its per-channel affine map "
                "needs call.apply, the module's traced equations"
            )
        c = self.in_shape[-1]
        with jax.ensure_compile_time_eval():
            x0 = jnp.zeros((self.batch, *self.in_shape), self.in_dtype)
            b = self.apply(x0).reshape(-1, c)[0]
            a = self.apply(jnp.ones_like(x0)).reshape(-1, c)[0] - b
            return np.asarray(a), np.asarray(b)

    def reduces_over_batch(self) -> bool:
        """Whether the module's traced equations reduce over the batch axis (batch statistics)."""

        def walk(eqns):
            for e in eqns:
                axes = e.params.get("axes")
                if e.primitive.name.startswith("reduce_") and axes is not None and 0 in tuple(axes):
                    return True
                sub = _programs.sub_jaxpr(e)
                if sub is not None and walk(sub[0].eqns):
                    return True
            return False

        return walk(self.eqns)

    def equations(self, primitive: str) -> list:
        """The module's traced equations of ``primitive`` (e.g. ``'conv_general_dilated'``), nested
        programs included, in order: what the framework actually computes (the pads of a
        transposed convolution, say)."""
        found = []

        def walk(eqns):
            for e in eqns:
                if e.primitive.name == primitive:
                    found.append(e)
                sub = _programs.sub_jaxpr(e)
                if sub is not None:
                    walk(sub[0].eqns)

        walk(self.eqns)
        return found

    def error(self, message: str) -> InfiniteWidthError:
        """An :class:`InfiniteWidthError` naming this layer, to raise."""
        return layer_error(self.path, self.module, message)


def _unbox(init: Any) -> Any:
    """The initializer inside Flax's metadata wrappers (``nn.with_logical_partitioning``,
    ``nn.with_partitioning``), which box the same draw with sharding names."""
    while True:
        inner = getattr(init, "__wrapped__", None)
        code = getattr(init, "__code__", None)
        if inner is None or code is None or "flax" not in code.co_filename.replace("\\", "/").split("/"):
            return init
        init = inner


class ModuleRule(Protocol):
    """The signature of a module rule: the Kernel of the module's output from that of its input."""

    def __call__(self, kernel: Kernel, call: ModuleCall, /) -> Kernel: ...


# ----------------------------------------------------------------------------------------------
# What a primitive rule receives.

_NON_GAUSSIAN = (
    "an elementwise nonlinearity is applied to a value that is not a zero-mean Gaussian process "
    "(two nonlinearities in a row, a nonlinearity of the raw input, or after a residual sum, "
    "concatenation or normalization); its kernel does not determine the result"
)


@dataclasses.dataclass(frozen=True, eq=False)
class PrimitiveContext:
    """What a primitive rule may ask the interpreter (built by it, frozen).

    Attributes:
      batch: the batch size of the traced program (axis 0 of every traced array).
      options: the engine's :class:`EngineOptions`.
      outer: the call equations (``jit``, ``custom_jvp``, ...) whose programs are being
        interpreted, outermost first: the equations inside carry name stacks relative to them.
    """

    batch: int
    options: EngineOptions
    outer: tuple = ()
    _enter: Optional[Callable[[Any, list], list]] = dataclasses.field(default=None, repr=False)
    _locate: Optional[Callable[[Any], str]] = dataclasses.field(default=None, repr=False)

    def where(self, eqn) -> str:
        """The user's module path of ``eqn``, ``'<top level>'`` outside every module."""
        return _programs.where(self.outer, eqn)

    def location(self, eqn) -> str:
        """The innermost module call ``eqn`` belongs to, as messages name it: ``layer `encoder/fc1`
        (flax.linen.linear.Dense)``, or ``the model's top level`` outside every module."""
        if self._locate is not None:
            return self._locate(eqn)
        where = self.where(eqn)
        return "the model's top level" if where == "<top level>" else f"`{where}`"

    def error(self, eqn, message: str) -> InfiniteWidthError:
        """An :class:`InfiniteWidthError` naming ``eqn``'s innermost module and its operation, to raise:
        ``layer `linear1` (my.Linear) at primitive dot_general: <message>; <what to do instead>``."""
        return InfiniteWidthError(
            f"{self.location(eqn)} at {_programs.operation(self.outer, eqn)}: {message}; {_programs.SUGGEST}"
        )

    def materialize(self, value: _values.Value, eqn=None) -> _values.Value:
        """``value`` with its pending elementwise function (if any) applied to its kernel."""
        if value.phi is None:
            return value
        if not value.kernel.is_gaussian and value.axes is None:
            # (a value in another axis order is refused by apply_phi, which says so)
            if eqn is not None:
                raise self.error(eqn, _NON_GAUSSIAN)
            raise InfiniteWidthError(_NON_GAUSSIAN + "; " + _programs.SUGGEST)
        return _values.apply_phi(value, self.options.n_points)

    def call_program(self, eqn, invals: Sequence[_values.Interpreted]) -> list:
        """Interpret the program of a call equation (``jit``, ``custom_jvp``, ...) on ``invals``."""
        if self._enter is None:
            raise InfiniteWidthError(f"{self.location(eqn)}: this context cannot interpret called programs")
        return self._enter(eqn, list(invals))


class PrimitiveRule(Protocol):
    """The signature of a primitive rule: one interpreted value per output variable of ``eqn``."""

    def __call__(
        self, eqn: Any, invals: Sequence[_values.Interpreted], ctx: PrimitiveContext, /
    ) -> Sequence[_values.Interpreted]: ...


# ----------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class RegisteredModuleRule:
    """A registered module rule and its options (see the module docstring)."""

    fn: ModuleRule
    linear: bool = False
    flat: str = "error"
    integer_input: bool = False
    precheck: Optional["Precheck"] = None
    masks: bool = False
    full_layout: bool = False
    samples: bool = False


class Precheck(Protocol):
    """``precheck(module, params, options) -> reason or None``: why a configuration is refused, decided
    before the module's inputs are examined."""

    def __call__(self, module: Any, params: Mapping[str, Any], options: EngineOptions, /) -> Optional[str]: ...


_MODULE_RULES: dict[Any, RegisteredModuleRule] = {}
_PRIMITIVE_RULES: dict[str, PrimitiveRule] = {}
FRAMEWORKS: dict[str, Callable] = {}
_FRAMEWORK_PACKAGES = {
    "flax.linen": "ntk_adapters.flax.rules",
    "flax.nnx": "ntk_adapters.flax.nnx_rules",
    "haiku": "ntk_adapters.haiku.rules",
}

#: The key of the primitive rule used for every elementwise primitive without a rule of its own.
ELEMENTWISE = "<elementwise>"

ELEMENTWISE_PRIMITIVES: set[str] = {
    "neg",
    "sin",
    "cos",
    "tan",
    "tanh",
    "logistic",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "abs",
    "sign",
    "erf",
    "erfc",
    "erf_inv",
    "max",
    "min",
    "add",
    "sub",
    "mul",
    "div",
    "integer_pow",
    "pow",
    "sqrt",
    "rsqrt",
    "cbrt",
    "square",
    "select_n",
    "ge",
    "gt",
    "lt",
    "le",
    "eq",
    "ne",
    "and",
    "or",
    "not",
    "convert_element_type",
    "clamp",
    "atan",
    "asinh",
    "sinh",
    "cosh",
    "atanh",
    "copy",
    "copy_p",
    "stop_gradient",
    "floor",
    "ceil",
    "round",
    "is_finite",
    "nextafter",
    "rem",
    "reduce_precision",
    "logaddexp",
    "atan2",
}


def register_rule(
    module_type: Union[type, str],
    rule: ModuleRule,
    *,
    linear: bool = False,
    flat: str = "error",
    integer_input: bool = False,
    precheck: Optional[Precheck] = None,
    masks: bool = False,
    full_layout: bool = False,
    samples: bool = False,
) -> None:
    """Register the infinite-width rule of a module type (see the module docstring).

    Args:
      module_type: the class (matched for subclasses too), or ``'module.QualName'``.
      rule: ``rule(kernel, call) -> kernel`` (:class:`ModuleRule`).
      linear: the output is a fresh zero-mean random linear map of the input (Dense, Conv).
      flat: ``'average'`` to accept a flattened spatial input as its position average,
        ``'error'`` (default) to refuse it.
      integer_input: the module may receive integer inputs (an embedding's token ids); its rule is
        then called with ``kernel=None`` and reads the ids from ``call.ids``.
      precheck: ``precheck(module, params, options) -> reason or None`` (:class:`Precheck`), run
        before the module's inputs are examined: a reason refuses the layer with it (a
        configuration without an infinite-width limit, such as attention with a fixed number of
        heads unless ``options.attention`` says which limit to take).
      masks: the module may receive constants of the input (masks computed from integer inputs)
        besides its one input-dependent input; they reach the rule as ``call.masks``.
      full_layout: the rule needs covariances between positions; ``spatial_layout='auto'`` then
        chooses ``'full'`` for models containing the module.
      samples: the rule may estimate expectations by sampling with ``call.key`` (when the engine's
        options ask for such a limit): the engine then evaluates ``x1`` and ``x2`` jointly, so that
        one set of draws serves every pair of examples, and reports standard errors.

    Example::

      register_rule(MyDense, my_dense_rule, linear=True, flat='average')
    """
    if flat not in ("average", "error"):
        raise ValueError(f"flat must be 'average' or 'error'; got {flat!r}")
    _MODULE_RULES[module_type] = RegisteredModuleRule(
        rule,
        linear=linear,
        flat=flat,
        integer_input=bool(integer_input),
        precheck=precheck,
        masks=bool(masks),
        full_layout=bool(full_layout),
        samples=bool(samples),
    )


def lookup_rule(module: Any) -> Optional[RegisteredModuleRule]:
    """The rule registered for ``type(module)`` or its closest base class, else ``None``."""
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return _MODULE_RULES[cls]
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _MODULE_RULES:
            return _MODULE_RULES[name]
    return None


def register_primitive_rule(primitive: Any, rule: PrimitiveRule) -> None:
    """Register ``rule(eqn, invals, ctx) -> outvals`` (:class:`PrimitiveRule`) for a JAX primitive
    (object or name), or for every elementwise primitive without its own rule (:data:`ELEMENTWISE`).

    The rule is used for equations outside recognized modules whose inputs include an
    input-dependent value (a :class:`~ntk_adapters.infinite.values.Value`); concrete-only
    equations are simply evaluated.
    """
    name = primitive if isinstance(primitive, str) else primitive.name
    _PRIMITIVE_RULES[name] = rule


def lookup_primitive_rule(name: str) -> Optional[PrimitiveRule]:
    """The rule of primitive ``name``: its own, else the :data:`ELEMENTWISE` rule for an elementwise
    primitive, else ``None``."""
    rule = _PRIMITIVE_RULES.get(name)
    if rule is None and name in ELEMENTWISE_PRIMITIVES:
        rule = _PRIMITIVE_RULES.get(ELEMENTWISE)
    return rule


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

"""The jaxpr walk: an environment of interpreted values, and dispatch to the rules.

The interpreter runs a traced program equation by equation. Its environment maps each variable
to a :class:`~ntk_adapters.infinite.values.Value` (input-dependent: a kernel),
a :class:`~ntk_adapters.infinite.values.Concrete` array (parameters are marked as such) or an
:class:`~ntk_adapters.infinite.masks.InputConstant` (integer input leaves and what is computed
from them alone, such as padding masks). Only the equations the used outputs depend on are
interpreted (:func:`~ntk_adapters.infinite.programs.liveness`). For each of them:

* the equations traced inside a recorded module call with a registered rule are one group,
  replaced by the module rule when the group receives an input-dependent value;
* an equation on concrete values only is evaluated;
* an equation on input constants and constants of the model computes another input constant
  when it acts on each example separately (:func:`~ntk_adapters.infinite.masks.evaluate`); an
  input constant multiplying a value is a mask (:func:`~ntk_adapters.infinite.masks.mask_rule`);
  float input constants meeting anything else are input features, integer ones are refused;
* any other equation goes to the rule registered for its primitive
  (:func:`~ntk_adapters.infinite.rules.lookup_primitive_rule`), which receives a
  :class:`~ntk_adapters.infinite.rules.PrimitiveContext`; without one it is refused.

Every refusal names the innermost recorded module call (with or without a rule) and the operation.

The interpreter holds no kernel mathematics: that is in the rules and in
:mod:`ntk_adapters.infinite.layers` / :mod:`ntk_adapters.infinite.elementwise` /
:mod:`ntk_adapters.infinite.masks`.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from ntk_adapters.infinite import fixed_arrays as _fixed
from ntk_adapters.infinite import learned_arrays as _learned
from ntk_adapters.infinite import masks as _masks
from ntk_adapters.infinite import primitives as _primitives
from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.masks import InputConstant
from ntk_adapters.infinite.module_calls import ModuleCalls, RecordedCall
from ntk_adapters.infinite.rules import EngineOptions, InfiniteWidthError, PrimitiveContext
from ntk_adapters.infinite.values import Concrete, Parameter, Value, input_value, is_value, parameter

__all__ = ["Interpreter", "RecordedCall", "parameter"]

# Contractions that take integer operands as numbers, promoted to their float output dtype.
_PROMOTING_CONTRACTIONS = {"dot_general", "conv_general_dilated"}


def _concrete(value) -> Concrete:
    return Concrete(value, value if np.ndim(value) == 0 else None)


#: Why an operation met outside every layer with a rule has no rule, where that is known.
_NO_RULE = {
    "reduce_window_max": "max pooling has no exact infinite-width kernel (the expectation of a maximum of more "
    "than two correlated Gaussian values has no closed form); average pooling "
    "(`nn.avg_pool` / `hk.avg_pool`) has one",
    "reduce_window_min": "min pooling has no exact infinite-width kernel; average pooling "
    "(`nn.avg_pool` / `hk.avg_pool`) has one",
    "reduce_max": "a maximum over the entries of a value (max pooling written inline, a max over channels) "
    "has no exact infinite-width kernel",
    "argmax": "an argmax has no infinite-width kernel",
}

_RESIDUAL = (
    "a nonlinearity of a sum of a non-Gaussian value and a Gaussian branch has no exact kernel (the "
    "sum is not a zero-mean Gaussian process, so its kernel does not determine the result); the "
    "pre-activation residual `x + f(relu(x))` (ResNet v2 ordering) has one"
)


class Interpreter(ModuleCalls):
    """Interprets traced programs of one model evaluation over kernel values.

    Args:
      calls: the module calls recorded while tracing.
      params: the model's params tree (the modules' parameters are read from it).
      options: the engine's options.
      batch: the batch size of the traced program.
      initializers: the initializers of the parameters recorded by the adapter, by key path in the
        params tree (``model.info['param_initializers']``), or ``None``.
    """

    def __init__(
        self, calls: list[RecordedCall], params, options: EngineOptions, batch: int, initializers: Optional[dict] = None
    ):
        self.calls = calls
        self.params = params
        self.options = options
        self.batch = batch
        # Parameter arrays added to values (learned positional embeddings), with the initializers
        # recorded by the adapter.
        self.learned = _learned.LearnedArrays(params, initializers)
        # Call equations (jit, custom_jvp, ...) whose programs are being interpreted, outermost
        # first: the equations inside carry name stacks relative to them.
        self.outer: list = []
        self._liveness: dict = {}
        # Which outputs of the equation being interpreted are used, by equation identity: a call
        # equation's program is analysed for those when it is entered.
        self._used: dict = {}
        # One input feature per input constant that reaches a rule as floats, so that two uses of
        # it are one value (one base), as two uses of a float input leaf are.
        self._features: dict = {}
        # Where a non-Gaussian value came from (a residual sum, a module's output), by identity,
        # for the message when a nonlinearity of it is refused.
        self._origins: dict = {}

    # -- what rules and messages see -----------------------------------------------------------

    def context(self) -> PrimitiveContext:
        """The context given to primitive rules at the current nesting."""
        return PrimitiveContext(
            batch=self.batch,
            options=self.options,
            outer=tuple(self.outer),
            _enter=self.call_program,
            _locate=self.layer,
        )

    def layer(self, eqn) -> str:
        """The innermost module call ``eqn`` belongs to, for messages: ``layer `path` (Type)``,
        with or without a rule (a hand-written ``nn.Module`` / ``nnx.Module`` / ``hk.Module``)."""
        tags = [t for e in [*self.outer, eqn] for t in _programs.tags(e) if t < len(self.calls)]
        if not tags:
            where = _programs.where(self.outer, eqn)
            return "the model's top level" if where == "<top level>" else f"`{where}`"
        call = self.calls[tags[-1]]
        return f"layer `{call.path}` ({_rules.module_type_name(call.module)})"

    def integer_error(self, eqn, v: InputConstant, invals=None) -> InfiniteWidthError:
        """The refusal of an equation that uses integer inputs other than as a constant of the input."""
        at = f"{v.describe()} reaches {self.layer(eqn)} at {_programs.operation(self.outer, eqn)}"
        if eqn.primitive.name == "gather" and invals and isinstance(invals[0], Parameter):
            why = (
                "an embedding lookup (a parameter table indexed by integer ids) outside every embedding layer "
                "with a rule: nn.Embed, nnx.Embed and hk.Embed have one, and a custom embedding module can be "
                "given one with ntk_adapters.infinite.register_rule(..., integer_input=True)"
            )
        elif eqn.primitive.name == "gather" and invals and is_value(invals[0]):
            why = "indexing an input-dependent value by integer inputs has no infinite-width rule"
        else:
            why = "this use of integer or bool inputs has no infinite-width rule"
        return InfiniteWidthError(
            f"{at}: {why}. Of integer inputs the engine understands functions of them alone (masks such as "
            "`tokens > 0`, lengths), kept as constants of the input that may scale values position by position, "
            "and conversions to floats (input features like any float leaf). Use "
            "ntk_adapters.monte_carlo_kernel_fn or the empirical kernels for this model"
        )

    # -- the walk ------------------------------------------------------------------------------

    def run(self, jaxpr, consts, args, used_outputs=None) -> list:
        """Interpret ``jaxpr`` on interpreted ``args``; returns the interpreted outputs (``None`` for
        outputs not in ``used_outputs``).

        Only the equations the used outputs depend on are interpreted: a model adapted to return one
        of several heads never meets the others, and a module whose equations are all unused is not
        handed to its rule.
        """
        env: dict = {}

        def read(v):
            if _programs.is_literal(v):
                return _concrete(v.val)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _concrete(c)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a

        live = _programs.liveness(jaxpr, used_outputs, self._liveness)
        eqns = [e for e, _ in live.eqns]
        for e, mask in live.eqns:
            self._used[id(e)] = mask
        outvars = [v for v, u in zip(jaxpr.outvars, live_outputs(jaxpr, used_outputs)) if u]
        i = 0
        while i < len(eqns):
            eqn = eqns[i]
            call = None
            for t in _programs.tags(eqn):
                if t < len(self.calls) and self.calls[t].rule is not None:
                    call = self.calls[t]
                    break
            if call is None:
                self.run_eqn(eqn, env, read)
                i += 1
                continue
            j = i
            while j < len(eqns) and call.index in _programs.tags(eqns[j]):
                j += 1
            group = eqns[i:j]
            if any(
                _input_dependent(env[v]) for e in group for v in e.invars if not _programs.is_literal(v) and v in env
            ):
                replaced: dict = {}
                if call.rule is None or not call.rule.masks:
                    group = self.convert_module_inputs(group, env, replaced)
                self.run_module(call, group, eqns[j:], outvars, env)
                # The module saw its input constants as features; everything after it still sees
                # them as constants of the input (a mask may also scale a value later).
                env.update(replaced)
            else:
                for e in group:
                    self.run_eqn(e, env, read)
            i = j
        return [read(v) if u else None for v, u in zip(jaxpr.outvars, live_outputs(jaxpr, used_outputs))]

    def call_program(self, eqn, invals) -> list:
        """Interpret the program of a call equation (jit, custom_jvp, ...) on ``invals``, for the
        outputs of ``eqn`` that are used."""
        sub = _programs.sub_jaxpr(eqn)
        if sub is None:
            raise self.context().error(eqn, "cannot read the called program")
        used = self._used.get(id(eqn))
        if used is not None and len(used) != len(sub[0].outvars):
            used = None
        self.outer.append(eqn)
        try:
            return self.run(sub[0], sub[1], invals, used)
        finally:
            self.outer.pop()

    def run_eqn(self, eqn, env, read) -> None:
        missing = [not _programs.is_literal(v) and v not in env for v in eqn.invars]
        if any(missing):
            # A call whose program does not use some of its inputs, which were therefore never
            # computed: its program is interpreted, and skips them.
            partial = [None if m else read(v) for v, m in zip(eqn.invars, missing)]
            outs = self.call_program(eqn, partial)
            for var, o in zip(eqn.outvars, outs):
                env[var] = o
            return
        invals = [read(v) for v in eqn.invars]
        constants = any(isinstance(v, InputConstant) for v in invals)
        values = any(is_value(v) for v in invals)
        if constants and not values:
            outs = self.input_constants(eqn, invals)
        elif constants:
            outs = self.mixed(eqn, invals)
        elif not values:
            outs = self.evaluate(eqn, invals)
        else:
            outs = self.dispatch(eqn, invals)
        for var, o in zip(eqn.outvars, outs):
            env[var] = o

    def dispatch(self, eqn, invals) -> list:
        """``eqn`` on values (and concrete arrays) by the rule of its primitive."""
        rule = _rules.lookup_primitive_rule(eqn.primitive.name)
        ctx = self.context()
        if _adds_array(eqn, invals):
            if any(isinstance(v, Parameter) for v in invals):
                return self.learned.add(eqn, invals, ctx)
            return _fixed.fixed_array_add(eqn, invals, ctx)
        if rule is None:
            raise ctx.error(eqn, self.no_rule_reason(eqn, invals))
        try:
            outs = rule(eqn, invals, ctx)
        except InfiniteWidthError as e:
            better = self.explain_refusal(eqn, invals, e)
            if better is not None:
                raise better from e
            raise
        self.note_origins(eqn, invals, outs)
        return list(outs)

    def no_rule_reason(self, eqn, invals) -> str:
        name = eqn.primitive.name
        if name in _NO_RULE:
            return _NO_RULE[name]
        return "this operation has no infinite-width rule"

    # -- messages about non-Gaussian values ----------------------------------------------------

    def note_origins(self, eqn, invals, outs) -> None:
        """Remember where non-Gaussian values come from: a sum of a non-Gaussian value and a Gaussian
        branch (a post-activation residual), carried through linear maps of one value."""
        values = [v for v in invals if is_value(v)]
        results = [o for o in outs if is_value(o)]
        if len(results) != 1 or _gaussian(results[0]):
            return
        out = results[0]
        name = eqn.primitive.name
        if name in ("add", "sub", "add_any") and len(values) == 2:
            gaussian = [_gaussian(v) for v in values]
            if gaussian.count(True) == 1:
                self._origins[id(out)] = (out, "residual", (self.layer(eqn), _programs.operation(self.outer, eqn)))
            return
        if len(values) == 1 and id(values[0]) in self._origins and out.phi is None:
            _, kind, where = self._origins[id(values[0])]
            self._origins[id(out)] = (out, kind, where)

    def explain_refusal(self, eqn, invals, error: InfiniteWidthError) -> Optional[InfiniteWidthError]:
        """A more precise refusal of a nonlinearity of a non-Gaussian value whose origin is known."""
        values = [v for v in invals if is_value(v)]
        if len(values) != 1 or _gaussian(values[0]) or values[0].phi is not None:
            return None
        if any(isinstance(c, Concrete) and c.scalar is None and np.size(c.value) != 1 for c in invals):
            return None  # refused for its non-scalar constant, not for the value
        if not self.is_elementwise(eqn):
            return None
        origin = self._origins.get(id(values[0]))
        if origin is None:
            return None
        _, kind, where = origin
        ctx = self.context()
        if kind == "residual":
            layer, op = where
            at = f"at {op}" if layer == self.layer(eqn) else f"at {layer} at {op}"
            return ctx.error(
                eqn,
                f"{_RESIDUAL}. Its input is the sum {at}, one of whose terms is already "
                "non-Gaussian (e.g. the output of an earlier nonlinearity)",
            )
        message = str(error)
        if message.endswith(_programs.SUGGEST):
            message = message[: -len(_programs.SUGGEST)].rstrip("; ")
        return InfiniteWidthError(
            f"{message}; its input is {where}, which is not a zero-mean Gaussian process "
            f"with identically distributed channels; {_programs.SUGGEST}"
        )

    def is_elementwise(self, eqn) -> bool:
        name = eqn.primitive.name
        if name in _rules.ELEMENTWISE_PRIMITIVES:
            return True
        sub = _programs.sub_jaxpr(eqn) if name in _programs.CALL_PRIMITIVES else None
        return sub is not None and _primitives.elementwise_program(sub[0])

    def evaluate(self, eqn, invals: list[Concrete]) -> list[Concrete]:
        """An equation on concrete values only, evaluated now."""
        # Parameter-only computations run eagerly even while kernel_fn is being jitted, so rules
        # can inspect their values (e.g. a BatchNorm's per-channel scales).
        with jax.ensure_compile_time_eval():
            outs = _programs.bind(eqn, [v.value for v in invals])
        if not eqn.primitive.multiple_results:
            outs = [outs]
        kind = Parameter if any(isinstance(v, Parameter) for v in invals) else Concrete
        path, tiled = _carried_path(eqn, invals, outs)
        result = []
        for o in outs:
            scalar = None
            if np.ndim(o) == 0:
                scalar = o
            elif (
                eqn.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape")
                and invals
                and invals[0].scalar is not None
            ):
                scalar = invals[0].scalar
                if eqn.primitive.name == "convert_element_type":
                    scalar = o.reshape(-1)[0] if np.size(o) else None
            result.append(Parameter(o, scalar, path=path, tiled=tiled) if kind is Parameter else kind(o, scalar))
        return result

    # -- constants of the input (integer leaves, masks) ----------------------------------------

    def feature(self, c: InputConstant) -> Value:
        """A float input constant as an input feature (``nngp = x·x'/C``), one per constant."""
        if id(c) not in self._features:
            self._features[id(c)] = (c, input_value(c.x1, c.x2, self.options.layout, c.name))
        return self._features[id(c)][1]

    def as_features(self, eqn, invals) -> list:
        """``invals`` with float input constants as input features; integer ones are refused."""
        for v in invals:
            if isinstance(v, InputConstant) and not v.is_float:
                raise self.integer_error(eqn, v, invals)
        return [self.feature(v) if isinstance(v, InputConstant) else v for v in invals]

    def input_constants(self, eqn, invals) -> list:
        """An equation on input constants (and concrete arrays): another input constant when it acts
        on each example separately and reads no parameter; call equations are entered; float input
        constants meeting anything else are input features; integers are refused."""
        if eqn.primitive.name in _programs.CALL_PRIMITIVES:
            return self.call_program(eqn, invals)
        if not any(isinstance(v, Parameter) for v in invals):
            outs = _masks.evaluate(eqn, invals, self.batch)
            if outs is not None:
                return outs
        return self.dispatch(eqn, self.as_features(eqn, invals))

    def mixed(self, eqn, invals) -> list:
        """An equation on values and input constants: a mask applied to a value, or, for a call,
        its program; float input constants meeting anything else are input features."""
        if eqn.primitive.name in _programs.CALL_PRIMITIVES:
            return self.call_program(eqn, invals)
        if not any(isinstance(v, Parameter) for v in invals):
            outs = _masks.mask_rule(eqn, invals, self.context())
            if outs is not None:
                return outs
        return self.dispatch(eqn, self.as_features(eqn, invals))


def _adds_array(eqn, invals) -> bool:
    """Whether ``eqn`` adds a non-scalar array of the model to a value (positional encodings)."""
    if eqn.primitive.name not in ("add", "sub", "add_any") or len(invals) != 2 or sum(map(is_value, invals)) != 1:
        return False
    (c,) = [v for v in invals if isinstance(v, Concrete)]
    return c.scalar is None and np.size(c.value) != 1


def _carried_path(eqn, invals, outs) -> tuple:
    """``(path, tiled)`` of the output of a shape-only operation on one parameter leaf (the other
    operands literals), else ``(None, False)``."""
    name = eqn.primitive.name
    if name not in _learned.SHAPE_OPS or len(outs) != 1:
        return None, False
    first = invals[0] if invals else None
    if not isinstance(first, Parameter) or first.path is None:
        return None, False
    if not all(_programs.is_literal(v) for v in eqn.invars[1:]):
        return None, False
    tiled = _learned.carry(name, eqn.params, np.shape(first.value), np.shape(outs[0]), first.tiled)
    return (None, False) if tiled is None else (first.path, tiled)


def live_outputs(jaxpr, used_outputs) -> list[bool]:
    """``used_outputs`` over ``jaxpr.outvars`` (all when ``None``)."""
    return [True] * len(jaxpr.outvars) if used_outputs is None else [bool(u) for u in used_outputs]


def _input_dependent(v) -> bool:
    return isinstance(v, (Value, InputConstant))


def _gaussian(v: Value) -> bool:
    """Whether a value is a zero-mean Gaussian process itself (not a pending function of one)."""
    return v.phi is None and v.kernel.is_gaussian

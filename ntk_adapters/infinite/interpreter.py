"""The jaxpr walk: an environment of interpreted values, and dispatch to the rules.

The interpreter runs a traced program equation by equation. Its environment maps each variable
to a :class:`~ntk_adapters.infinite.values.Value` (input-dependent: a kernel),
a :class:`~ntk_adapters.infinite.values.Concrete` array or an
:class:`~ntk_adapters.infinite.values.IntegerInput` leaf. For each equation:

* the equations traced inside a recorded module call with a registered rule are one group,
  replaced by the module rule when the group receives an input-dependent value;
* an equation on concrete values only is evaluated;
* any other equation goes to the rule registered for its primitive
  (:func:`~ntk_adapters.infinite.rules.lookup_primitive_rule`), which receives a
  :class:`~ntk_adapters.infinite.rules.PrimitiveContext`; without one it is refused, naming the
  module path and the primitive.

The interpreter holds no kernel mathematics: that is in the rules and in
:mod:`ntk_adapters.infinite.layers` / :mod:`ntk_adapters.infinite.elementwise`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.rules import EngineOptions, InfiniteWidthError, ModuleCall, PrimitiveContext
from ntk_adapters.infinite.values import (
    Concrete,
    IntegerInput,
    Value,
    depends_on_input,
    input_value,
    is_value,
    new_id,
)

__all__ = ["Interpreter", "RecordedCall"]

# Contractions that take integer operands as numbers, promoted to their float output dtype.
_PROMOTING_CONTRACTIONS = {"dot_general", "conv_general_dilated"}


@dataclasses.dataclass(frozen=True)
class RecordedCall:
    """One module call recorded while tracing, in the order of the traced program.

    Attributes:
      index: its position among the recorded calls (the ``jax.named_scope`` tag it ran under).
      module: the module object.
      path: its path in the model, for messages and the user's variance overrides.
      params_path: keys of its parameters in the model's params tree.
      rule: its registered rule, or ``None``.
    """

    index: int
    module: Any
    path: str
    params_path: tuple
    rule: Optional[_rules.RegisteredModuleRule]

    def error(self, message: str) -> InfiniteWidthError:
        """An :class:`InfiniteWidthError` naming this layer, to raise."""
        return _rules.layer_error(self.path, self.module, message)


def _lookup(tree, path):
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError):
            return None
    return node


def _concrete(value) -> Concrete:
    return Concrete(value, value if np.ndim(value) == 0 else None)


class Interpreter:
    """Interprets traced programs of one model evaluation over kernel values.

    Args:
      calls: the module calls recorded while tracing.
      params: the model's params tree (the modules' parameters are read from it).
      options: the engine's options.
      batch: the batch size of the traced program.
    """

    def __init__(self, calls: list[RecordedCall], params, options: EngineOptions, batch: int):
        self.calls = calls
        self.params = params
        self.options = options
        self.batch = batch
        # Call equations (jit, custom_jvp, ...) whose programs are being interpreted, outermost
        # first: the equations inside carry name stacks relative to them.
        self.outer: list = []

    # -- what rules and messages see -----------------------------------------------------------

    def context(self) -> PrimitiveContext:
        """The context given to primitive rules at the current nesting."""
        return PrimitiveContext(batch=self.batch, options=self.options, outer=tuple(self.outer),
                                _enter=self.call_program)

    def layer(self, eqn) -> str:
        """The innermost module call ``eqn`` belongs to, for messages."""
        tags = [t for e in [*self.outer, eqn] for t in _programs.tags(e) if t < len(self.calls)]
        if not tags:
            where = _programs.where(self.outer, eqn)
            return "the model's top level" if where == "<top level>" else f"`{where}`"
        call = self.calls[tags[-1]]
        return f"layer `{call.path}` ({_rules.module_type_name(call.module)})"

    def integer_error(self, eqn, v: IntegerInput) -> InfiniteWidthError:
        return InfiniteWidthError(
            f"input leaf {v.name} ({v.dtype}, per-example shape {v.shape}) reaches {self.layer(eqn)} at "
            f"primitive {_programs.describe_primitive(self.outer, eqn)}: embeddings and other uses of integer "
            "or bool inputs (token ids, masks) have no infinite-width rule yet; only their conversion to floats "
            "is understood (an input feature like any float leaf). Use ntk_adapters.monte_carlo_kernel_fn or the "
            "empirical kernels for this model"
        )

    # -- the walk ------------------------------------------------------------------------------

    def run(self, jaxpr, consts, args) -> list:
        """Interpret ``jaxpr`` on interpreted ``args``; returns the interpreted outputs."""
        env: dict = {}

        def read(v):
            if _programs.is_literal(v):
                return _concrete(v.val)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _concrete(c)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a

        eqns = jaxpr.eqns
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
            if any(depends_on_input(read(v)) for e in group for v in e.invars if not hasattr(v, "val") if v in env):
                group = self.convert_module_inputs(group, env, read)
                self.run_module(call, group, eqns[j:], jaxpr.outvars, env)
            else:
                for e in group:
                    self.run_eqn(e, env, read)
            i = j
        return [read(v) for v in jaxpr.outvars]

    def call_program(self, eqn, invals) -> list:
        """Interpret the program of a call equation (jit, custom_jvp, ...) on ``invals``."""
        sub = _programs.sub_jaxpr(eqn)
        if sub is None:
            raise self.context().error(eqn, "cannot read the called program")
        self.outer.append(eqn)
        try:
            return self.run(sub[0], sub[1], invals)
        finally:
            self.outer.pop()

    def run_eqn(self, eqn, env, read) -> None:
        invals = [read(v) for v in eqn.invars]
        ints = [v for v in invals if isinstance(v, IntegerInput)]
        if ints:
            outs = self.integer_input(eqn, invals, ints[0])
        elif not any(is_value(v) for v in invals):
            outs = self.evaluate(eqn, invals)
        else:
            rule = _rules.lookup_primitive_rule(eqn.primitive.name)
            ctx = self.context()
            if rule is None:
                raise ctx.error(eqn, "this operation has no infinite-width rule")
            outs = rule(eqn, invals, ctx)
        for var, o in zip(eqn.outvars, outs):
            env[var] = o

    def evaluate(self, eqn, invals: list[Concrete]) -> list[Concrete]:
        """An equation on concrete values only, evaluated now."""
        # Parameter-only computations run eagerly even while kernel_fn is being jitted, so rules
        # can inspect their values (e.g. a BatchNorm's per-channel scales).
        with jax.ensure_compile_time_eval():
            outs = _programs.bind(eqn, [v.value for v in invals])
        if not eqn.primitive.multiple_results:
            outs = [outs]
        result = []
        for o in outs:
            scalar = None
            if np.ndim(o) == 0:
                scalar = o
            elif eqn.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape") and \
                    invals and invals[0].scalar is not None:
                scalar = invals[0].scalar
                if eqn.primitive.name == "convert_element_type":
                    scalar = o.reshape(-1)[0] if np.size(o) else None
            result.append(Concrete(o, scalar))
        return result

    # -- integer input leaves ------------------------------------------------------------------

    def integer_input(self, eqn, invals, v: IntegerInput) -> list:
        """Outputs of an equation receiving an integer input leaf: a conversion to floats makes it an
        input feature, integer conversions keep it, call equations are entered; anything else is refused."""
        name = eqn.primitive.name
        if name == "convert_element_type" and len(invals) == 1:
            new = eqn.params["new_dtype"]
            a2 = None if v.x2 is None else v.x2.astype(new)
            if jnp.issubdtype(new, jnp.floating):
                return [input_value(v.x1.astype(new), a2, self.options.layout, v.name)]
            if jnp.issubdtype(new, jnp.integer) or jnp.issubdtype(new, jnp.bool_):
                return [dataclasses.replace(v, x1=v.x1.astype(new), x2=a2)]
        if name in _programs.CALL_PRIMITIVES:
            return self.call_program(eqn, invals)
        raise self.integer_error(eqn, v)

    def convert_module_inputs(self, group, env, read) -> list:
        """Integer input leaves that a module uses only as numbers become input features before its
        rule runs: Flax's Dense converts them to floats first, Haiku's Linear contracts them with its
        float weights directly (``jnp.dot`` promotes inside ``dot_general``). Returns the module's
        equations without the conversions already run."""
        done = set()
        for var in {v for e in group for v in e.invars if not _programs.is_literal(v)}:
            leaf = env.get(var)
            if not isinstance(leaf, IntegerInput):
                continue
            uses = [e for e in group if var in e.invars]
            converts = [e for e in uses if e.primitive.name == "convert_element_type"
                        and jnp.issubdtype(e.params["new_dtype"], jnp.floating)]
            promoting = [e for e in uses if e.primitive.name in _PROMOTING_CONTRACTIONS
                         and jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating)]
            if len(converts) + len(promoting) != len(uses):
                continue  # another use: run_module names it
            for e in converts:
                self.run_eqn(e, env, read)
                done.add(id(e))
            if promoting:
                dtype = promoting[0].outvars[0].aval.dtype
                env[var] = input_value(leaf.x1.astype(dtype), None if leaf.x2 is None else leaf.x2.astype(dtype),
                                       self.options.layout, leaf.name)
        return [e for e in group if id(e) not in done]

    # -- modules -------------------------------------------------------------------------------

    def run_module(self, call: RecordedCall, group, rest, outvars, env) -> None:
        """Replace the equations ``group`` of one module call by its rule."""
        defined = {v for e in group for v in e.outvars}
        inputs = []
        for e in group:
            for v in e.invars:
                if _programs.is_literal(v) or v in defined or v not in env:
                    continue
                if depends_on_input(env[v]) and v not in inputs:
                    inputs.append(v)
        used_later = {v for e in rest for v in e.invars if not hasattr(v, "val")} | {
            v for v in outvars if not hasattr(v, "val")}
        outs = [v for e in group for v in e.outvars if v in used_later]
        for v in inputs:
            if isinstance(env[v], IntegerInput):
                first = next(e for e in group if v in e.invars)
                raise self.integer_error(first, env[v])
        if len(inputs) != 1 or len(outs) != 1:
            raise call.error(f"the rule expects one input-dependent input and one output; the module has "
                             f"{len(inputs)} and {len(outs)}")
        inp_var, out_var = inputs[0], outs[0]
        rule = call.rule
        value = self.context().materialize(env[inp_var])
        k = value.kernel
        if value.flat:
            if rule.flat != "average":
                raise call.error("its input is a flattened spatial value; register the rule with "
                                 "flat='average' if the module is a linear layer with i.i.d. weights")
            k = _layers.flatten(k)

        free = {v for e in group for v in e.invars if not _programs.is_literal(v) and v not in defined} - {inp_var}
        consts = {v: env[v].value for v in free if isinstance(env.get(v), Concrete)}
        module_call = ModuleCall(
            module=call.module,
            path=call.path,
            params=_lookup(self.params, call.params_path) or {},
            in_shape=tuple(inp_var.aval.shape[1:]),
            out_shape=tuple(out_var.aval.shape[1:]),
            in_dtype=inp_var.aval.dtype,
            batch=int(inp_var.aval.shape[0]),
            options=self.options,
            eqns=tuple(group),
            apply=_module_function(tuple(group), inp_var, out_var, consts),
        )
        new = rule.fn(k, module_call)
        if not isinstance(new, Kernel):
            raise call.error(f"its rule returned {type(new).__name__}, not a Kernel")
        out_shape = module_call.out_shape
        if new.layout != "none" and len(new.spatial) != len(out_shape) - 1:
            raise call.error(f"its rule returned a kernel with spatial shape {new.spatial} for an output of "
                             f"per-example shape {out_shape}")
        lid = new_id()
        env[out_var] = Value(kernel=new, shape=out_shape, base=lid, fresh=lid if rule.linear else None,
                             deps=value.deps | ({lid} if rule.linear else frozenset()))


def _module_function(group: tuple, inp_var, out_var, consts: dict):
    """``x -> y``: a module's equations evaluated eagerly on a concrete input, with the concrete
    values (parameters, constants) they read."""
    def apply(x):
        local = {inp_var: x}

        def read(v):
            if _programs.is_literal(v):
                return v.val
            if v in local:
                return local[v]
            return consts[v]

        with jax.ensure_compile_time_eval():
            for e in group:
                o = _programs.bind(e, [read(v) for v in e.invars])
                if not e.primitive.multiple_results:
                    o = [o]
                for v, oo in zip(e.outvars, o):
                    local[v] = oo
        return local[out_var]

    return apply

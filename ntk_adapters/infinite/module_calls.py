"""Module calls during interpretation: the record of each call, and running its rule.

The equations traced inside one call of a module with a registered rule are replaced by the rule
(:class:`ModuleCalls`, the part of the :class:`~ntk_adapters.infinite.interpreter.Interpreter`
that does it): the module's input constants become input features where the module uses them as
numbers, its masks are handed over (rules registered with ``masks=True``), the frozen
:class:`~ntk_adapters.infinite.rules.ModuleCall` is built, and the rule's kernel is checked against
the module's output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.masks import InputConstant
from ntk_adapters.infinite.rules import EngineOptions, InfiniteWidthError, ModuleCall, PrimitiveContext
from ntk_adapters.infinite.values import Concrete, Parameter, Value, new_id

__all__ = ["ModuleCalls", "RecordedCall", "lookup_params"]

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


def lookup_params(tree, path):
    """The parameters at ``path``; for a module whose parameters are all held by its submodules in
    a flat mapping (Haiku's ``'mha/query'`` keys), those submodules' entries by their last name."""
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError):
            if isinstance(key, str) and isinstance(node, Mapping):
                children = {
                    k[len(key) + 1 :]: v for k, v in node.items() if isinstance(k, str) and k.startswith(key + "/")
                }
                return children or None
            return None
    return node


class ModuleCalls:
    """Running module rules, for the interpreter (which provides ``calls``, ``params``, ``options``,
    ``context()``, ``feature()``, ``integer_error()`` and ``_origins``)."""

    calls: list[RecordedCall]
    params: Any
    options: EngineOptions
    _origins: dict

    def context(self) -> PrimitiveContext:
        raise NotImplementedError

    def feature(self, c: InputConstant) -> Value:
        raise NotImplementedError

    def integer_error(self, eqn, v: InputConstant, invals=None) -> InfiniteWidthError:
        raise NotImplementedError

    def convert_module_inputs(self, group, env, replaced: dict) -> list:
        """Input constants that a module with a rule uses only as numbers become input features
        before its rule runs: floats as they are, integers where Flax's Dense converts them to floats
        first or Haiku's Linear contracts them with its float weights directly (``jnp.dot`` promotes
        inside ``dot_general``). Returns the module's equations without the conversions already run;
        ``replaced`` receives the entries of ``env`` replaced by features, to restore afterwards."""
        done = set()
        for var in {v for e in group for v in e.invars if not _programs.is_literal(v)}:
            leaf = env.get(var)
            if not isinstance(leaf, InputConstant):
                continue
            if leaf.is_float:
                replaced[var] = leaf
                env[var] = self.feature(leaf)
                continue
            uses = [e for e in group if var in e.invars]
            converts = [
                e
                for e in uses
                if e.primitive.name == "convert_element_type" and jnp.issubdtype(e.params["new_dtype"], jnp.floating)
            ]
            promoting = [
                e
                for e in uses
                if e.primitive.name in _PROMOTING_CONTRACTIONS and jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating)
            ]
            if len(converts) + len(promoting) != len(uses):
                continue  # another use: run_module names it
            for e in converts:
                new = e.params["new_dtype"]
                env[e.outvars[0]] = self.feature(_as_dtype(leaf, new))
                done.add(id(e))
            if promoting:
                replaced[var] = leaf
                env[var] = self.feature(_as_dtype(leaf, promoting[0].outvars[0].aval.dtype))
        return [e for e in group if id(e) not in done]

    # -- modules -------------------------------------------------------------------------------

    def run_module(self, call: RecordedCall, group, rest, outvars, env) -> None:
        """Replace the equations ``group`` of one module call by its rule."""
        rule = call.rule
        assert rule is not None  # only calls with a rule are grouped into modules
        if rule.precheck is not None:
            reason = rule.precheck(call.module, lookup_params(self.params, call.params_path) or {}, self.options)
            if reason:
                raise call.error(reason)
        defined = {v for e in group for v in e.outvars}
        inputs = []
        for e in group:
            for v in e.invars:
                if _programs.is_literal(v) or v in defined or v not in env:
                    continue
                if isinstance(env[v], (Value, InputConstant)) and v not in inputs:
                    inputs.append(v)
        used_later = {v for e in rest for v in e.invars if not _programs.is_literal(v)} | {
            v for v in outvars if not _programs.is_literal(v)
        }
        outs = [v for e in group for v in e.outvars if v in used_later]
        if (
            rule.integer_input
            and len(inputs) == 1
            and len(outs) == 1
            and isinstance(env[inputs[0]], InputConstant)
            and not env[inputs[0]].is_float
        ):
            self.run_integer_module(call, group, inputs[0], outs[0], env)
            return
        masks = []
        if rule.masks:
            masks = [v for v in inputs if isinstance(env[v], InputConstant)]
            inputs = [v for v in inputs if v not in masks]
            # Fixed masks (a causal mask built with jnp.tril) reach the module as arrays of the model
            # that are not parameters; the rule receives them too, and refuses what it cannot read.
            free = [v for e in group for v in e.invars if not _programs.is_literal(v) and v not in defined]
            for v in dict.fromkeys(free):
                c = env.get(v)
                if isinstance(c, Concrete) and not isinstance(c, Parameter) and np.size(c.value) > 1:
                    masks.append(v)
        for v in inputs:
            if isinstance(env[v], InputConstant):
                first = next(e for e in group if v in e.invars)
                raise self.integer_error(first, env[v])
        if len(inputs) != 1 or len(outs) != 1:
            raise call.error(
                f"the rule expects one input-dependent input and one output; the module has "
                f"{len(inputs)} and {len(outs)}"
            )
        inp_var, out_var = inputs[0], outs[0]
        value = self.context().materialize(env[inp_var])
        k = value.kernel
        if value.flat:
            if rule.flat != "average":
                raise call.error(
                    "its input is a flattened spatial value; register the rule with "
                    "flat='average' if the module is a linear layer with i.i.d. weights"
                )
            k = _layers.flatten(k)

        module_call = self._module_call(
            call, group, inp_var, out_var, env, masks=tuple(_mask_arrays(env[m]) for m in masks)
        )
        new = self._rule_result(call, rule.fn(k, module_call), module_call)
        lid = new_id()
        out = Value(
            kernel=new,
            shape=module_call.out_shape,
            base=lid,
            fresh=lid if rule.linear else None,
            deps=value.deps | ({lid} if rule.linear else frozenset()),
        )
        if not new.is_gaussian:
            self._origins[id(out)] = (
                out,
                "module",
                f"the output of layer `{call.path}` ({_rules.module_type_name(call.module)})",
            )
        env[out_var] = out

    def run_integer_module(self, call: RecordedCall, group, inp_var, out_var, env) -> None:
        """A module whose rule takes integer inputs (an embedding) applied to an integer input constant:
        the rule receives ``kernel=None`` and the ids in ``call.ids``."""
        rule = call.rule
        assert rule is not None  # only calls with a rule are grouped into modules
        ids = env[inp_var]
        module_call = self._module_call(call, group, inp_var, out_var, env, ids=(ids.x1, ids.x2))
        # register_rule documents kernel=None for integer_input rules; ModuleRule types the usual call.
        new = self._rule_result(call, rule.fn(None, module_call), module_call)  # type: ignore[arg-type]
        lid = new_id()
        env[out_var] = Value(
            kernel=new,
            shape=module_call.out_shape,
            base=lid,
            fresh=lid if rule.linear else None,
            deps=frozenset({lid}) if rule.linear else frozenset(),
        )

    def _module_call(self, call: RecordedCall, group, inp_var, out_var, env, **extra) -> ModuleCall:
        """The frozen record a module rule receives for the equations ``group``."""
        defined = {v for e in group for v in e.outvars}
        free = {v for e in group for v in e.invars if not _programs.is_literal(v) and v not in defined} - {inp_var}
        consts = {v: env[v].value for v in free if isinstance(env.get(v), Concrete)}
        key = None if self.options.key is None else jax.random.fold_in(self.options.key, call.index)
        return ModuleCall(
            module=call.module,
            path=call.path,
            params=lookup_params(self.params, call.params_path) or {},
            in_shape=tuple(inp_var.aval.shape[1:]),
            out_shape=tuple(out_var.aval.shape[1:]),
            in_dtype=inp_var.aval.dtype,
            batch=int(inp_var.aval.shape[0]),
            options=self.options,
            eqns=tuple(group),
            apply=_module_function(tuple(group), inp_var, out_var, consts),
            key=key,
            **extra,
        )

    @staticmethod
    def _rule_result(call: RecordedCall, new: Any, module_call: ModuleCall) -> Kernel:
        """The rule's kernel, checked against the module's output shape."""
        if not isinstance(new, Kernel):
            raise call.error(f"its rule returned {type(new).__name__}, not a Kernel")
        if new.layout != "none" and len(new.spatial) != len(module_call.out_shape) - 1:
            raise call.error(
                f"its rule returned a kernel with spatial shape {new.spatial} for an output of "
                f"per-example shape {module_call.out_shape}"
            )
        return new


def _mask_arrays(v) -> tuple:
    """``(m1, m2)`` of a mask a module receives: an input constant's arrays, or a fixed array of the
    model for both batches (its own leading axes, which broadcast against the batch)."""
    if isinstance(v, InputConstant):
        return (v.x1, v.x2)
    return (v.value, None)


def _as_dtype(c: InputConstant, dtype) -> InputConstant:
    return dataclasses.replace(c, x1=c.x1.astype(dtype), x2=None if c.x2 is None else c.x2.astype(dtype), leaf=False)


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

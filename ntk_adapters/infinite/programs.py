"""Reading traced programs: call equations, binding, liveness, module tags and names for messages.

Small helpers over ``jax.make_jaxpr`` output shared by the interpreter, the primitive rules and
the module-call record. Nothing here knows about kernels.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

__all__ = [
    "CALL_PRIMITIVES",
    "SUGGEST",
    "Liveness",
    "bind",
    "describe_primitive",
    "function_name",
    "is_literal",
    "liveness",
    "module_tag",
    "operation",
    "sub_jaxpr",
    "tags",
    "where",
]

#: Appended to every refusal: what the user can do instead.
SUGGEST = (
    "use ntk_adapters.monte_carlo_kernel_fn for a Monte Carlo estimate, or teach the engine this layer "
    "with ntk_adapters.infinite.register_rule (modules) / register_primitive_rule (primitives)"
)

#: Primitives that call a traced program of their own (``jax.jit``, ``custom_jvp``, ``remat``, ...).
CALL_PRIMITIVES = frozenset(
    {
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "remat",
        "checkpoint",
        "custom_lin",
    }
)

_TAG = re.compile(r"^ntkcall(\d+)$")


def module_tag(index: int) -> str:
    """The ``jax.named_scope`` name under which the ``index``-th recorded module call runs."""
    return f"ntkcall{index}"


def tags(eqn) -> list[int]:
    """Indices of the recorded module calls whose scope ``eqn`` was traced in, outermost first."""
    return [int(m.group(1)) for p in str(eqn.source_info.name_stack).split("/") if (m := _TAG.match(p))]


def is_literal(var) -> bool:
    """Whether a jaxpr operand is a literal (which has a value and no identity count)."""
    return hasattr(var, "val") and not hasattr(var, "count")


def sub_jaxpr(eqn) -> Optional[tuple[Any, list]]:
    """``(jaxpr, consts)`` of a call-like equation, or ``None``."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is None:
            continue
        if hasattr(j, "jaxpr") and hasattr(j, "consts"):
            return j.jaxpr, list(j.consts)
        if hasattr(j, "eqns"):
            return j, []
    return None


def bind(eqn, args: Sequence[Any]):
    """Evaluate ``eqn``'s primitive on ``args`` with the equation's parameters."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        return eqn.primitive.bind(*subfuns, *args, **params)
    return eqn.primitive.bind(*args, **params)


def where(outer: Sequence[Any], eqn) -> str:
    """The user's module path of ``eqn`` (inside the call equations ``outer``), without engine tags."""
    parts = []
    for e in [*outer, eqn]:
        parts += [p for p in str(e.source_info.name_stack).split("/") if p and not _TAG.match(p)]
    return "/".join(parts) or "<top level>"


def function_name(eqn) -> Optional[str]:
    """The name of the function a call equation runs, else ``None``.

    ``jax.nn.relu`` is a ``custom_jvp_call`` whose program is one ``jit`` named ``relu``; the name
    is read through such single-call wrappers, so messages can say ``relu`` rather than only the
    primitive.
    """
    e = eqn
    while True:
        fn = e.params.get("name")
        if isinstance(fn, str):
            return fn
        if e.primitive.name not in CALL_PRIMITIVES:
            return None
        sub = sub_jaxpr(e)
        if sub is None or len(sub[0].eqns) != 1 or sub[0].eqns[0].primitive.name not in CALL_PRIMITIVES:
            return None
        e = sub[0].eqns[0]


def describe_primitive(outer: Sequence[Any], eqn) -> str:
    """``eqn``'s primitive with the calls it sits in, e.g. ``lt inside jit(_take)``."""

    def name(e):
        fn = function_name(e)
        return f"{e.primitive.name}({fn})" if fn else e.primitive.name

    inside = " > ".join(name(e) for e in outer)
    return eqn.primitive.name + (f" inside {inside}" if inside else "")


def operation(outer: Sequence[Any], eqn) -> str:
    """What a message says ``eqn`` is: ``primitive dot_general``, ``primitive lt inside jit(_take)``,
    or, for a call of a named function, ``relu (primitive custom_jvp_call)``."""
    fn = function_name(eqn) if eqn.primitive.name in CALL_PRIMITIVES else None
    described = describe_primitive(outer, eqn)
    return f"`{fn}` (primitive {described})" if fn else f"primitive {described}"


# ----------------------------------------------------------------------------------------------
# Liveness: which equations the outputs depend on.


@dataclasses.dataclass(frozen=True)
class Liveness:
    """The equations of a program that its used outputs depend on.

    Attributes:
      eqns: ``(eqn, used)`` in program order for every live equation, ``used`` a tuple of bools
        over ``eqn.outvars`` (which of its outputs something live reads).
      used_inputs: a tuple of bools over the program's ``invars``.
    """

    eqns: tuple
    used_inputs: tuple


def liveness(jaxpr, used_outputs: Optional[Sequence[bool]] = None, cache: Optional[dict] = None) -> Liveness:
    """Dead-code analysis of ``jaxpr`` for the outputs marked in ``used_outputs`` (all when ``None``).

    Walking backwards from the used outputs, an equation is live when one of its outputs is read
    by a live equation or is a used output, or when it has effects. A live equation needs all of
    its inputs, except a call equation (``jit``, ``custom_jvp``, ...) whose program maps its
    inputs and outputs one to one: it needs the inputs its program's live equations read, for
    the outputs used (the interpreter enters such a call, rather than evaluating it whole, when
    some of its inputs were not computed).

    ``cache`` (a dict) memoizes the analysis by program and used outputs; it keeps the programs it
    has seen alive, so identities stay valid.
    """
    used = tuple(True for _ in jaxpr.outvars) if used_outputs is None else tuple(bool(u) for u in used_outputs)
    key = (id(jaxpr), used)
    if cache is not None and key in cache:
        return cache[key][1]
    needed = {v for v, u in zip(jaxpr.outvars, used) if u and not is_literal(v)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        mask = tuple(v in needed for v in eqn.outvars)
        if not any(mask) and not eqn.effects:
            continue
        live.append((eqn, mask))
        sub = sub_jaxpr(eqn) if eqn.primitive.name in CALL_PRIMITIVES else None
        if sub is not None and len(sub[0].invars) == len(eqn.invars) and len(sub[0].outvars) == len(eqn.outvars):
            inner = liveness(sub[0], mask, cache)
            needed.update(v for v, u in zip(eqn.invars, inner.used_inputs) if u and not is_literal(v))
        else:
            needed.update(v for v in eqn.invars if not is_literal(v))
    result = Liveness(eqns=tuple(reversed(live)), used_inputs=tuple(v in needed for v in jaxpr.invars))
    if cache is not None:
        cache[key] = (jaxpr, result)
    return result

"""Reading traced programs: call equations, binding, module tags and names for messages.

Small helpers over ``jax.make_jaxpr`` output shared by the interpreter, the primitive rules and
the module-call record. Nothing here knows about kernels.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

__all__ = [
    "CALL_PRIMITIVES",
    "SUGGEST",
    "bind",
    "describe_primitive",
    "is_literal",
    "module_tag",
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
CALL_PRIMITIVES = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                             "custom_vjp_call_jaxpr", "remat", "checkpoint", "custom_lin"})

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


def describe_primitive(outer: Sequence[Any], eqn) -> str:
    """``eqn``'s primitive with the calls it sits in, e.g. ``lt inside jit(_take)``."""
    def name(e):
        fn = e.params.get("name")
        return f"{e.primitive.name}({fn})" if isinstance(fn, str) else e.primitive.name

    inside = " > ".join(name(e) for e in outer)
    return eqn.primitive.name + (f" inside {inside}" if inside else "")

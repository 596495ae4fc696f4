"""Static analysis: do the examples of a batch interact inside a model?

Per-example Jacobians computed with ``jax.vmap`` (the ``vmap_axes`` fast path of the empirical
kernels) are only right when row ``i`` of ``apply_fn(params, x)`` depends on example ``i`` alone:
no batch statistics, no reduction over the batch axis, nothing that mixes rows. This module proves
that from the traced program (``jax.make_jaxpr``) instead of taking it on trust::

    coupling = find_batch_coupling(apply_fn, params, x)       # None: examples do not interact
    coupling = find_model_coupling(model, x)                   # same, naming the user's module
    if coupling is not None:
        raise ValueError(coupling.message())

**The lattice.** Every variable of the jaxpr gets one abstract state
(:mod:`ntk_adapters.independence_rules`)::

    CONST   ⊑  Batched(d)  ⊑  TOP          CONST  ⊑  ROW  ⊑  TOP

* ``CONST``: the same whatever the examples are (parameters, literals, ``iota``, inputs whose
  ``in_axes`` leaf is ``None``, random draws from a fixed key).
* ``Batched(d)``: has a batch axis ``d`` of size ``N`` (possibly merged with neighbouring axes by
  a reshape: ``outer``/``inner``) and each row along it depends on its own example only.
* ``ROW``: inside the body of a ``scan`` over the batch axis (``jax.lax.map``): depends on the one
  current example.
* ``TOP``: coupled or unknown. It is produced only together with a recorded
  :class:`BatchCoupling`, so a ``TOP`` anywhere means a report.

Inputs start as ``Batched(in_axes)`` or ``CONST``; per-primitive transfer rules propagate states
in program order, recursing into ``jit``/``custom_jvp``/``checkpoint`` calls, ``cond`` branches,
and ``scan``/``while`` bodies (run to a fixed point on the loop carry). The output must end up
``Batched(out_axes)``.

**Soundness.** ``None`` is returned only when every equation touching a batched value has a rule
that proves its rows stay independent; a primitive without a rule, or a case a rule cannot follow
(a reshape splitting the batch axis, a slice of the batch, a collective), gives a coupling with
``certain=False``. ``certain=True`` means the operation structurally combines different rows of a
batched value (``reduce_sum`` over the batch axis, ``x @ x.T``, ``cumsum``/``sort``/reverse along
it). Structural means: a value marked batched may in fact ignore its example (``0 * x``), and for
a batch of one nothing can interact, which is why a batch of one is traced at size two when the
function allows it.

Per-example evaluation also needs every row to be computed by the same function. Random numbers
drawn with an axis of the batch's size (a dropout mask of the whole batch) differ from row to
row, so they get the state ``DRAWN``; where a drawn value meets the examples the analysis reports
an uncertain coupling, and ``vmap_axes='auto'`` keeps the whole-batch kernel, the kernel of the
masks as drawn. A closed-over ``(N, D)`` array would be the same kind of row-dependent constant;
models do not build those from their batch size, and such a model fails at other batch sizes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

from ntk_adapters.independence_rules import CONST, DRAWN, ROW, RULES, TOP, Batched, State

__all__ = ["BatchCoupling", "find_batch_coupling", "find_model_coupling"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BatchCoupling:
    """Where and how the examples of a batch interact (or may interact).

    Attributes:
      primitive: the jaxpr primitive, e.g. ``'reduce_sum'``, ``'dot_general'``, ``'sort'``.
      layer: the user's module path where it happens (``'ResNet/BatchNorm_0'``,
        ``'res_net18/~/initial_batchnorm'``), the raw ``jax.named_scope`` stack when modules are
        not recorded, ``''`` at top level.
      reason: what the operation does, e.g. ``'sums over the batch axis'``.
      certain: ``True`` when the operation provably combines different examples; ``False`` when
        the analysis cannot follow it, so independence is unproven.
    """

    primitive: str
    layer: str
    reason: str
    certain: bool

    def message(self) -> str:
        """One sentence naming the primitive and the layer, for error messages."""
        where = f"layer '{self.layer}'" if self.layer else "the top level of the model"
        verdict = "so examples interact" if self.certain else "so the independence of examples cannot be proven"
        return f"`{self.primitive}` in {where} {self.reason}, {verdict}."


# ----------------------------------------------------------------------------------------------
# The interpreter.


def _join_stack(prefix: str, inner: str) -> str:
    return "/".join(part for part in (prefix, inner) if part)


class _Interpreter:
    """Runs the transfer rules over a jaxpr; also the ``ctx`` the rules receive."""

    def __init__(self, layer_of: Callable[[str], str], batch_size: Optional[int] = None):
        self.found: list[BatchCoupling] = []
        self._batch_size = batch_size
        self._layer_of = layer_of
        self._eqn: Any = None
        self._stack = ""  # the full name stack of the current equation, across nested jaxprs

    def couple(self, reason: str, certain: bool) -> list[State]:
        """Record a coupling at the current equation; ``TOP`` for each of its outputs."""
        eqn = self._eqn
        found = BatchCoupling(eqn.primitive.name, self._layer_of(self._stack), reason, certain)
        if found not in self.found:  # loop bodies are run several times
            self.found.append(found)
        return [TOP] * len(eqn.outvars)

    def run(self, jaxpr: Any, ins: Sequence[State]) -> list[State]:
        """States of the outputs of ``jaxpr`` (open or closed) given the states of its inputs."""
        if isinstance(jaxpr, jex_core.ClosedJaxpr):
            jaxpr = jaxpr.jaxpr
        saved = (self._eqn, self._stack)
        prefix = self._stack
        env: dict[Any, State] = {v: CONST for v in jaxpr.constvars}
        env.update(zip(jaxpr.invars, ins))

        def read(v: Any) -> State:
            return CONST if isinstance(v, jex_core.Literal) else env[v]

        try:
            for eqn in jaxpr.eqns:
                self._eqn = eqn
                self._stack = _join_stack(prefix, str(eqn.source_info.name_stack))
                outs = self._apply(eqn, [read(v) for v in eqn.invars])
                for v, s in zip(eqn.outvars, outs):
                    if not isinstance(v, jex_core.DropVar):
                        env[v] = s
            return [read(v) for v in jaxpr.outvars]
        finally:
            self._eqn, self._stack = saved

    def _apply(self, eqn: Any, ins: list[State]) -> list[State]:
        n = len(eqn.outvars)
        # Random numbers drawn with an axis of the batch's size differ from row to row: one
        # example at a time, every example would see another draw than in the whole batch, so
        # rows are independent but not computed by one function. They stay DRAWN until they meet
        # the examples, and that meeting proves nothing.
        if any(s is DRAWN for s in ins):
            if all(s is CONST or s is DRAWN for s in ins):
                return [DRAWN] * n
            if any(s is TOP for s in ins):
                return [TOP] * n
            return self.couple(
                "combines the examples with random numbers drawn in the batch's shape (a dropout mask "
                "of the whole batch): one example at a time each example would see a different draw",
                False,
            )
        if all(s is CONST for s in ins):
            return [DRAWN if self._draws_rows(eqn) else CONST] * n
        if any(s is TOP for s in ins):
            return [TOP] * n  # reported where the TOP arose
        if all(s is CONST or s is ROW for s in ins):
            return [ROW] * n
        if any(s is ROW for s in ins):
            return self.couple("combines one example of a scan over the batch with the whole batch", False)
        rule = RULES.get(eqn.primitive.name)
        if rule is None:
            return self.couple("is not understood by the analysis on a batched operand", False)
        return rule(eqn, ins, self)

    def _draws_rows(self, eqn: Any) -> bool:
        """Whether ``eqn`` (or a call inside it) draws random numbers with a batch-sized axis."""
        n = self._batch_size
        if n is None or n < 2:
            return False
        if eqn.primitive.name in _RANDOM:
            return any(n in tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jex_core.Jaxpr) and any(self._draws_rows(e) for e in sub.eqns):
                    return True
        return False


# Primitives that produce random bits from a key (the threefry hash and the RNG primitives).
_RANDOM = frozenset({"random_bits", "threefry2x32", "rng_bit_generator", "rng_uniform"})


# ----------------------------------------------------------------------------------------------
# Entry points.


class _Axes:
    """The in_axes entries of one subtree of ``x`` (an opaque pytree leaf)."""

    def __init__(self, axes: list):
        self.axes = axes


def _leaf_axes(x: PyTree, in_axes: Any) -> list[Optional[int]]:
    """One batch axis (or ``None``) per leaf of ``x``, from an int, ``None`` or a pytree prefix."""
    leaves = jax.tree_util.tree_leaves(x)
    if in_axes is None or isinstance(in_axes, int):
        axes = [in_axes] * len(leaves)
    else:
        try:
            nested = jax.tree_util.tree_map(
                lambda ax, sub: _Axes([ax] * len(jax.tree_util.tree_leaves(sub))),
                in_axes,
                x,
                is_leaf=lambda v: v is None,
            )
        except ValueError as e:
            raise ValueError(f"in_axes must be an int, None or a pytree prefix of x: {e}") from None
        axes = [a for group in jax.tree_util.tree_leaves(nested) for a in group.axes]
    out: list[Optional[int]] = []
    for leaf, ax in zip(leaves, axes):
        if ax is None:
            out.append(None)
            continue
        if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)):
            raise TypeError(f"in_axes entries must be ints or None; got {ax!r}")
        ndim = len(np.shape(leaf))
        if not -ndim <= ax < ndim:
            raise ValueError(f"in_axes {ax} is out of range for an input of shape {np.shape(leaf)}")
        out.append(int(ax) % ndim)
    return out


def _resized(x: PyTree, axes: list[Optional[int]], size: int) -> PyTree:
    """``x`` as ShapeDtypeStructs with every batch axis of the given size."""
    leaves, tree = jax.tree_util.tree_flatten(x)
    structs = []
    for leaf, ax in zip(leaves, axes):
        shape = list(np.shape(leaf))
        if ax is not None:
            shape[ax] = size
        structs.append(jax.ShapeDtypeStruct(tuple(shape), jax.numpy.result_type(leaf)))
    return jax.tree_util.tree_unflatten(tree, structs)


def _producer(jaxpr: Any, var: Any) -> Optional[Any]:
    for eqn in jaxpr.eqns:
        if any(v is var for v in eqn.outvars):
            return eqn
    return None


def _analyse(
    fn: Callable,
    params: PyTree,
    x: PyTree,
    in_axes: Any,
    out_axes: int,
    layer_of: Callable[[str], str],
    before_trace: Callable[[], None] = lambda: None,
) -> Optional[BatchCoupling]:
    if isinstance(out_axes, bool) or not isinstance(out_axes, (int, np.integer)):
        raise TypeError(f"out_axes must be an int; got {out_axes!r}")
    axes = _leaf_axes(x, in_axes)
    sizes = {np.shape(leaf)[ax] for leaf, ax in zip(jax.tree_util.tree_leaves(x), axes) if ax is not None}
    closed = None
    if sizes == {1}:
        # Rows of a batch of one cannot be told apart (a reshape could move a size-1 batch axis
        # anywhere), so trace at two examples when the function accepts it.
        try:
            before_trace()
            closed = jax.make_jaxpr(fn)(params, _resized(x, axes, 2))
        except Exception:  # noqa: BLE001 - a function tied to its batch size: trace it as given
            closed = None
    if closed is None:
        before_trace()
        closed = jax.make_jaxpr(fn)(params, x)
    n_params = len(jax.tree_util.tree_leaves(params))
    if len(closed.jaxpr.invars) != n_params + len(axes):
        raise ValueError("the traced function has an unexpected number of inputs")
    ins: list[State] = [CONST] * n_params
    ins += [CONST if ax is None else Batched(ax) for ax in axes]

    traced_sizes = {var.aval.shape[ax] for var, ax in zip(closed.jaxpr.invars[n_params:], axes) if ax is not None}
    interp = _Interpreter(layer_of, traced_sizes.pop() if len(traced_sizes) == 1 else None)
    outs = interp.run(closed, ins)
    for var, state in zip(closed.jaxpr.outvars, outs):
        ndim = len(var.aval.shape)
        if not -ndim <= out_axes < ndim:
            reason = f"returns an output of rank {ndim}, which has no axis out_axes={out_axes}"
        elif state == Batched(out_axes % ndim) or (state is TOP and interp.found):
            continue  # TOP was reported where it arose
        elif state is TOP:  # defensive: TOP is only ever produced with a report
            reason = "returns an output the analysis lost track of"
        elif state is CONST or state is DRAWN:
            reason = "returns an output that does not depend on the batched inputs"
        elif isinstance(state, Batched) and not state.simple:
            reason = f"returns an output whose axis {state.axis} merges the batch with other axes"
        else:
            assert isinstance(state, Batched)  # ROW exists only inside the body of a scan over the batch
            reason = f"returns an output whose batch axis is {state.axis}, not out_axes={out_axes}"
        eqn = _producer(closed.jaxpr, var)
        name = eqn.primitive.name if eqn is not None else "output"
        layer = layer_of(str(eqn.source_info.name_stack)) if eqn is not None else ""
        interp.found.append(BatchCoupling(name, layer, reason, False))
    certain = [c for c in interp.found if c.certain]
    found = certain or interp.found
    return found[0] if found else None


def find_batch_coupling(
    apply_fn: Callable[[PyTree, PyTree], Any],
    params: PyTree,
    x: PyTree,
    in_axes: Any = 0,
    out_axes: int = 0,
) -> Optional[BatchCoupling]:
    """Whether examples interact in ``apply_fn(params, x)``, decided from its jaxpr.

    Args:
      apply_fn: ``apply_fn(params, x) -> y``.
      params: parameters (arrays or ``jax.ShapeDtypeStruct``), constant in the examples.
      x: the inputs, a pytree of arrays or ``jax.ShapeDtypeStruct``.
      in_axes: the batch axis of every leaf of ``x``: an int, ``None``, or a pytree prefix of
        ``x`` as for ``jax.vmap`` (a ``None`` leaf is shared by all examples).
      out_axes: the batch axis of the output.

    Returns:
      ``None`` when examples provably do not interact; otherwise the first coupling found in
      program order, a certain one preferred over an uncertain one. ``layer`` is the raw
      ``jax.named_scope`` stack; :func:`find_model_coupling` names modules.

    Example::

      find_batch_coupling(lambda p, x: x - x.mean(0), {}, jnp.ones((4, 3))).message()
      # "`reduce_sum` in the top level of the model sums over the batch axis, so examples interact."
    """
    return _analyse(apply_fn, params, x, in_axes, out_axes, layer_of=lambda stack: stack)


_TAG = "ntkindependence"
_TAG_RE = re.compile(rf"{_TAG}(\d+)")


def _module_path(calls: list[tuple[str, bool]], stack: str) -> str:
    """The user's module path of an equation, from the recorder tags in its name stack."""
    ids = [int(i) for i in _TAG_RE.findall(stack)]
    if not ids:
        return stack
    path = calls[ids[-1]][0]
    root, is_root = calls[ids[0]]
    # Flax paths are relative to the root module (which is named by its class); Haiku's
    # module names are already complete.
    if is_root and path != root and not path.startswith(root + "/"):
        path = f"{root}/{path}"
    return path


def find_model_coupling(model: Any, x: PyTree, in_axes: Any = 0, out_axes: int = 0) -> Optional[BatchCoupling]:
    """:func:`find_batch_coupling` for an :class:`ntk_adapters.Model`, naming the user's modules.

    The model is traced under the recorder of its framework (Flax linen / NNX, Haiku), which runs
    every module call in a ``jax.named_scope``, so ``layer`` is a module path such as
    ``'ResNet/BatchNorm_0'`` or ``'res_net18/~/initial_batchnorm'``. Models without a recorder
    (plain functions) report the raw name stack.

    Example::

      model = ntk_adapters.flax.adapt(Net(), variables, x, mutable=['batch_stats'])
      find_model_coupling(model, x).layer    # 'Net/BatchNorm_0'
    """
    from ntk_adapters.infinite.rules import load_framework  # imports the framework lazily

    recorder = load_framework(model.framework)
    if recorder is None:
        return find_batch_coupling(model.apply_fn, model.params, x, in_axes, out_axes)
    calls: list[tuple[str, bool]] = []

    def on_call(module: Any, path: str, params_path: Sequence[str], method_name: str) -> Optional[str]:
        if method_name != "__call__":
            return None
        calls.append((path, len(tuple(params_path)) == 0))
        return f"{_TAG}{len(calls) - 1}"

    def traced(params: PyTree, xs: PyTree) -> Any:
        with recorder(model, on_call):
            return model.apply_fn(params, xs)

    return _analyse(
        traced,
        model.params,
        x,
        in_axes,
        out_axes,
        layer_of=lambda stack: _module_path(calls, stack),
        before_trace=calls.clear,
    )

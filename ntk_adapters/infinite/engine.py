"""Exact infinite-width NNGP and NTK of an unchanged model, by interpreting its traced program.

:func:`infinite_kernel_fn` traces ``model.apply_fn(params, x)`` once with ``jax.make_jaxpr``
while the framework's module calls are recorded (``flax.linen.intercept_methods`` /
``haiku.intercept_methods``); each module call runs under a ``jax.named_scope`` tag, so every
traced equation names the module it belongs to. The program is then walked with an environment
in which input-dependent values are :class:`Value`s (a :class:`Kernel` plus its per-example
shape) and everything else is concrete:

* the equations of a module with a registered rule (Dense, Conv, LayerNorm, ...) are replaced by
  the rule, fed with the module's configuration and the exact variance of its initializers;
* between modules, primitives are interpreted one by one: chains of elementwise primitives on
  one Gaussian value become one function phi (closed form where recognised, Gauss–Hermite
  quadrature otherwise, see :mod:`ntk_adapters.infinite.elementwise`), ``reshape`` flattens,
  ``reduce_sum`` over spatial axes and ``reduce_window_sum`` pool, ``add`` of independent
  branches sums kernels, ``concatenate`` on channels mixes them, multiplication by a constant
  scales them;
* anything else raises :class:`InfiniteWidthError` naming the module path and the primitive.

Inputs may be pytrees of arrays sharing the batch axis. Each float leaf starts as its own input
Value (a deterministic feature: ``nngp = x·x'/C``, zero NTK) with its own base, so the rules above
decide how leaves may meet: through independent random layers (``Dense(a) + Dense(b)`` sums their
kernels) or a concatenation on channels (``Dense(concatenate([a, b]))``), never entry by entry
(``a + b``, ``a * mask`` need cross products between leaves, which no kernel tracks). Integer and
bool leaves reach the traced program unchanged: a conversion to floats makes one an input feature,
any other use (an embedding's gather) is refused naming the leaf, and unused leaves cost nothing.

Normalization: kernels are per output unit, ``(N1, N2)``; the kernel of all O outputs is
``K ⊗ I_O`` (:func:`expand_outputs`). The NTK is the one of the loss
``½ · mean over all N·O entries of (f(x) − y)²`` used across the library: gradient flow gives
``df/dt = −(η/(N·O)) Θ (f − y)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.empirical import check_finite
from ntk_adapters.infinite import elementwise as _ew
from ntk_adapters.infinite import initializers as _inits
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.inputs import check_pair, hashable_spec, leaves_with_names, spec
from ntk_adapters.model import Model, as_model
from ntk_adapters.outputs import pack

__all__ = [
    "InfiniteWidthError",
    "ModuleCall",
    "Value",
    "infinite_kernel_fn",
    "expand_outputs",
    "input_kernel",
    "dense_kernel",
    "average_positions",
]

_SUGGEST = (
    "use ntk_adapters.monte_carlo_kernel_fn for a Monte Carlo estimate, or teach the engine this layer "
    "with ntk_adapters.infinite.register_rule (modules) / register_primitive_rule (primitives)"
)
_TAG = re.compile(r"^ntkcall(\d+)$")


class InfiniteWidthError(NotImplementedError):
    """The engine has no exact infinite-width rule for part of the model."""


# ----------------------------------------------------------------------------------------------
# Values.


@dataclasses.dataclass(frozen=True)
class Phi:
    """A lazy elementwise function of a Gaussian value: ``fn`` and, when recognised, its name."""

    fn: Callable[[jax.Array], jax.Array]
    name: Optional[str] = None
    params: tuple = ()


@dataclasses.dataclass(frozen=True)
class Value:
    """An input-dependent value during interpretation.

    Attributes:
      kernel: the Kernel of the value, or of its Gaussian base when ``phi`` is set.
      shape: the per-example shape of the traced array (without the batch axis).
      flat: the spatial value ``(*spatial, C)`` was flattened to ``(prod(spatial)·C,)``; the
        kernel keeps the spatial structure.
      phi: a pending elementwise function of the Gaussian ``kernel`` (applied lazily, so that a
        chain of elementwise primitives is one function).
      base: identity of the Gaussian base, shared by values that are functions of it.
      fresh: id of the random linear layer whose output this is (through linear maps only):
        independent of, and zero-mean given, everything computed before that layer.
      deps: ids of every random linear layer this value depends on.
      source: for a value computed from one input leaf alone, that leaf's name (``x``,
        ``x['a']``, ``x[0]``), for messages.
    """

    kernel: Kernel
    shape: tuple
    flat: bool = False
    phi: Optional[Phi] = None
    base: int = 0
    fresh: Optional[int] = None
    deps: frozenset = frozenset()
    source: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class _C:
    """A concrete value; ``scalar`` is set when every entry equals one scalar."""

    value: Any
    scalar: Any = None


@dataclasses.dataclass(frozen=True)
class _IntInput:
    """An integer or bool input leaf (token ids, masks) during interpretation.

    It depends on the input but has no kernel: only a conversion to floats (which makes it an
    ordinary input feature) consumes it; every other equation receiving it is refused, naming
    ``name``. ``x1`` / ``x2`` are the leaf's arrays (``x2`` ``None`` when ``x2 = x1``).
    """

    name: str
    x1: Any
    x2: Any
    shape: tuple

    @property
    def dtype(self):
        return self.x1.dtype


_ids = itertools.count(1)


# ----------------------------------------------------------------------------------------------
# Module calls.


@dataclasses.dataclass
class ModuleCall:
    """One call of a framework module, as a module rule sees it.

    Attributes:
      index: order of the call in the traced program.
      module: the module object (its configuration).
      path: the module's path in the model, ``'Dense_0'`` (Flax), ``'mlp/~/linear_0'`` (Haiku).
      params_path: keys of the module's parameters in the model's params tree.
      rule: the registered :class:`~ntk_adapters.infinite.rules.ModuleRule`, or ``None``.
      params: the module's parameters (dict of arrays), set when the rule runs.
      in_shape, out_shape: per-example input and output shapes, set when the rule runs.
      apply: ``apply(x) -> y``: the module's traced equations evaluated on a concrete input of the
        traced input shape (for probing e.g. the affine map of a BatchNorm in inference mode).
    """

    index: int
    module: Any
    path: str
    params_path: tuple
    rule: Optional[_rules.ModuleRule] = None
    params: Any = None
    in_shape: tuple = ()
    out_shape: tuple = ()
    apply: Optional[Callable] = None
    options: Any = None

    @property
    def type_name(self) -> str:
        return f"{type(self.module).__module__}.{type(self.module).__qualname__}"

    def _override(self, table, what):
        if table is None:
            return None
        if isinstance(table, (int, float)):
            return float(table)
        for key in (self.path, self.path.split("/")[-1]):
            if key in table:
                return float(table[key])
        return None

    def weight_sigma2(self, init: Any, shape: Sequence[int], fan_in: int) -> float:
        """``σw² = fan_in · Var(W)`` from the initializer, or the user's ``weight_variance``."""
        o = self._override(self.options.weight_variance, "weight")
        if o is not None:
            return o
        try:
            return fan_in * _inits.variance(init, shape, what=f"weight of {self.path}")
        except _inits.UnknownInitializerError as e:
            raise InfiniteWidthError(f"layer `{self.path}` ({self.type_name}): {e}") from None

    def bias_sigma2(self, init: Any, shape: Sequence[int]) -> float:
        """``σb² = Var(b)`` from the initializer, or the user's ``bias_variance``."""
        o = self._override(self.options.bias_variance, "bias")
        if o is not None:
            return o
        try:
            return _inits.variance(init, shape, what=f"bias of {self.path}")
        except _inits.UnknownInitializerError as e:
            raise InfiniteWidthError(f"layer `{self.path}` ({self.type_name}): {e}") from None

    def error(self, message: str) -> InfiniteWidthError:
        """An :class:`InfiniteWidthError` naming this layer."""
        return InfiniteWidthError(f"layer `{self.path}` ({self.type_name}): {message}; {_SUGGEST}")


@dataclasses.dataclass(frozen=True)
class _Options:
    weight_variance: Any
    bias_variance: Any
    layout: str
    n_points: int


# ----------------------------------------------------------------------------------------------
# Kernel building blocks shared by the rules.


def _spatial_einsum(nspatial: int, full: bool, same: bool) -> str:
    letters = "abcdefghklmopqrstuvw"
    if not full:
        sp = letters[:nspatial]
        if same:
            return f"i{sp}z,i{sp}z->i{sp}"
        return f"i{sp}z,j{sp}z->ij{sp}"
    s1 = letters[:nspatial]
    s2 = letters[nspatial:2 * nspatial]
    out = "".join(a + b for a, b in zip(s1, s2))
    if same:
        return f"i{s1}z,i{s2}z->i{out}"
    return f"i{s1}z,j{s2}z->ij{out}"


def input_kernel(x1: jax.Array, x2: Optional[jax.Array] = None, layout: str = "diagonal") -> Kernel:
    """The Kernel of the raw input: ``nngp = x1·x2ᵀ/C`` over the channel (last) axis, ``ntk = 0``.

    Args:
      x1: ``(N1, *spatial, C)``; x2: ``(N2, *spatial, C)`` or ``None`` (``x2 = x1``).
      layout: for inputs with spatial axes, ``'diagonal'`` or ``'full'``.

    Example::

      k = input_kernel(jnp.ones((4, 3)))      # nngp (4, 4) of ones, cov1 (4,)
    """
    same = x2 is None
    x2 = x1 if same else x2
    c = x1.shape[-1]
    nsp = x1.ndim - 2
    if nsp == 0:
        layout = "none"
    full = layout == "full"
    nngp = jnp.einsum(_spatial_einsum(nsp, full, False), x1, x2) / c
    cov1 = jnp.einsum(_spatial_einsum(nsp, full, True), x1, x1) / c
    cov2 = cov1 if same else jnp.einsum(_spatial_einsum(nsp, full, True), x2, x2) / c
    return Kernel(nngp=nngp, ntk=jnp.zeros_like(nngp), cov1=cov1, cov2=cov2, layout=layout,
                  is_gaussian=False, same_inputs=same)


def _input_value(a1: jax.Array, a2: Optional[jax.Array], layout: str, name: str) -> Value:
    """A float input leaf as a deterministic input feature with its own kernel and base.

    A leaf ``(N,)`` (one number per example) is one channel: per-example shape ``()``.
    """
    shape = tuple(a1.shape[1:])
    if a1.ndim == 1:
        a1 = a1[:, None]
        a2 = None if a2 is None else a2[:, None]
    return Value(kernel=input_kernel(a1, a2, layout), shape=shape, base=next(_ids), source=name)


def _input_leaf(a1: jax.Array, a2: Optional[jax.Array], layout: str, name: str) -> Union[Value, _IntInput]:
    """What the interpreter starts from for one input leaf (``name`` as in ``x['ids']``)."""
    dtype = a1.dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return _input_value(a1, a2, layout, name)
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        return _IntInput(name=name, x1=a1, x2=a2, shape=tuple(a1.shape[1:]))
    raise InfiniteWidthError(f"input leaf {name} has dtype {dtype}; the infinite-width engine takes float, "
                             "integer and bool inputs")


def _diag_full(a: jax.Array, lead: int) -> jax.Array:
    """Position diagonal of a 'full' array with ``lead`` leading (batch) axes."""
    nsp = (a.ndim - lead) // 2
    for _ in range(nsp):
        a = jnp.diagonal(a, axis1=lead, axis2=lead + 1)  # moves the diagonal to the end
    return a


def average_positions(k: Kernel) -> Kernel:
    """The ``'none'``-layout kernel of a flattened spatial value as a Dense layer sees it.

    A Dense layer on ``flatten(x)`` with i.i.d. weights sees the average over positions (and
    channels) of the per-position covariances: ``nngp ← mean_p nngp[p, p]``.
    """
    if k.layout == "none":
        return k
    if k.layout == "full":
        nngp, cov1, cov2 = _diag_full(k.nngp, 2), _diag_full(k.cov1, 1), _diag_full(k.cov2, 1)
        ntk = None if k.ntk is None else _diag_full(k.ntk, 2)
    else:
        nngp, cov1, cov2, ntk = k.nngp, k.cov1, k.cov2, k.ntk

    def mean(a, lead):
        return a.reshape(a.shape[:lead] + (-1,)).mean(-1)

    return k.replace(nngp=mean(nngp, 2), ntk=None if ntk is None else mean(ntk, 2), cov1=mean(cov1, 1),
                     cov2=mean(cov2, 1), layout="none", is_gaussian=False)


def dense_kernel(
    k: Kernel,
    fan_in: int,
    weight_sigma2: float,
    bias_sigma2: float = 0.0,
    *,
    bias_trainable: bool = False,
    parameterization: str = "standard",
) -> Kernel:
    """Kernel after a random linear layer acting on the channel axis.

    Standard parameterization (Flax, Haiku: ``W ~ Var σw²/fan_in``): ``ntk ← fan_in·nngp +
    σw²·ntk (+1 with a trainable bias)``, ``nngp ← σw²·nngp + σb²``. NTK parameterization
    (``y = σw/√fan_in · W x + σb · b`` with unit-variance ``W``, ``b``): ``nngp ← σw² nngp + σb²``,
    ``ntk ← nngp_new + σw² ntk``. The output is a zero-mean Gaussian process.

    Args:
      k: the input Kernel, any layout (positions are kept: a Dense on ``(N, H, W, C)`` acts per
        position).
      fan_in: the number of input channels the weights contract.
      weight_sigma2: ``σw² = fan_in · Var(W)`` (standard) or the scale ``σw²`` (NTK param).
      bias_sigma2: ``σb²``.
      bias_trainable: whether the layer has a bias parameter (adds 1 to the standard NTK).
    """
    nngp = weight_sigma2 * k.nngp + bias_sigma2
    # The bias is shared by all positions, so in the 'full' layout it adds to every pair too.
    cov1 = weight_sigma2 * k.cov1 + bias_sigma2
    cov2 = weight_sigma2 * k.cov2 + bias_sigma2
    if k.ntk is None:
        ntk = None
    elif parameterization == "standard":
        ntk = fan_in * k.nngp + weight_sigma2 * k.ntk + (1.0 if bias_trainable else 0.0)
    elif parameterization == "ntk":
        ntk = nngp + weight_sigma2 * k.ntk
    else:
        raise ValueError(f"parameterization must be 'standard' or 'ntk'; got {parameterization!r}")
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=True)


def channel_affine(k: Kernel, call: "ModuleCall", *, scale_param: Optional[str] = None,
                   bias_param: Optional[str] = None) -> Kernel:
    """Rule for a module that maps each channel affinely, ``y_c = a_c x_c + b_c`` (BatchNorm in
    inference mode). ``a`` and ``b`` are read by evaluating the module on zeros and ones.

    The next random linear layer averages over channels, so with a zero-mean input
    ``nngp ← mean_c(a_c²)·nngp + mean_c(b_c²)`` (cross terms ``a_c b_c E[x_c]`` vanish) and
    ``ntk ← mean_c(a_c²)·ntk``, plus, for a trainable per-channel scale ``γ_c`` (``y = γ_c x̂_c + β_c``
    with ``x̂_c = (x_c − μ_c)/s_c``), ``mean_c((nngp + μ_c²)/s_c²)`` and ``+1`` for a trainable
    offset. The output is Gaussian only when every ``b_c`` is zero and every ``a_c`` equal.
    """
    with jax.ensure_compile_time_eval():
        x0 = jnp.zeros(call.traced_in_shape, call.in_dtype)
        b = call.apply(x0).reshape(-1, call.in_shape[-1])[0]
        a = call.apply(jnp.ones_like(x0)).reshape(-1, call.in_shape[-1])[0] - b
        a, b = np.asarray(a), np.asarray(b)
    a2, b2 = float(np.mean(a * a)), float(np.mean(b * b))
    nngp = a2 * k.nngp + b2
    cov1, cov2 = a2 * k.cov1 + b2, a2 * k.cov2 + b2
    ntk = None
    if k.ntk is not None:
        ntk = a2 * k.ntk
        if scale_param is not None and scale_param in (call.params or {}):
            gamma = np.reshape(np.asarray(call.params[scale_param]), (-1,))
            # a_c = γ_c/s_c and b_c = β_c − a_c μ_c give 1/s_c and μ_c
            inv_s2 = (a / np.where(gamma == 0, 1.0, gamma)) ** 2
            beta = np.reshape(np.asarray(call.params[bias_param]), (-1,)) if bias_param in (call.params or {}) else 0.0
            mu = (beta - b) / np.where(a == 0, 1.0, a)
            ntk = ntk + float(np.mean(inv_s2)) * k.nngp + float(np.mean(inv_s2 * mu * mu))
        if bias_param is not None and bias_param in (call.params or {}):
            ntk = ntk + 1.0
    uniform = bool(np.all(b == 0)) and bool(np.all(a == a[0]))
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=k.is_gaussian and uniform)


def reduces_over_batch(call: "ModuleCall") -> bool:
    """Whether the module's traced equations reduce over the batch axis (batch statistics)."""
    def walk(eqns):
        for e in eqns:
            axes = e.params.get("axes")
            if e.primitive.name.startswith("reduce_") and axes is not None and 0 in tuple(axes):
                return True
            sub = _sub_jaxpr(e)
            if sub is not None and walk(sub[0].eqns):
                return True
        return False
    return walk(getattr(call, "eqns", ()))


def expand_outputs(k: jax.Array, n_outputs: int) -> jax.Array:
    """The kernel over all outputs, ``K ⊗ I_O``: ``(N1, N2)`` → ``(N1, N2, O, O)``.

    Example::

      expand_outputs(kernel_fn(x1, x2, 'ntk'), 10).shape   # (N1, N2, 10, 10)
    """
    eye = jnp.eye(n_outputs, dtype=k.dtype)
    return k[..., None, None] * eye


# ----------------------------------------------------------------------------------------------
# Tracing.


def _lookup(tree, path):
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError):
            return None
    return node


def _trace(model: Model, x_struct: jax.ShapeDtypeStruct):
    calls: list[ModuleCall] = []
    recorder = _rules.load_framework(model.framework)

    def on_call(module, path, params_path, method_name):
        if method_name != "__call__":
            return None
        call = ModuleCall(index=len(calls), module=module, path=path, params_path=tuple(params_path),
                          rule=_rules.lookup_rule(module))
        calls.append(call)
        return f"ntkcall{call.index}"

    ctx = recorder(model, on_call) if recorder is not None else contextlib.nullcontext()

    def f(params, x):
        with ctx:
            return model.apply_fn(params, x)

    closed = jax.make_jaxpr(f)(model.params, x_struct)
    return closed, calls


# ----------------------------------------------------------------------------------------------
# The interpreter.


def _is_value(v) -> bool:
    return isinstance(v, Value)


def _depends(v) -> bool:
    """Whether an interpreted value depends on the input (a Value or an integer input leaf)."""
    return isinstance(v, (Value, _IntInput))


def _is_literal(v) -> bool:
    return hasattr(v, "val") and not hasattr(v, "count")


def _sources(values) -> str:
    names = [v.source for v in values if v.source]
    return f" ({' and '.join(names)})" if len(names) == len(values) and len(set(names)) > 1 else ""


def _sub_jaxpr(eqn):
    """(jaxpr, consts) of a call-like equation, or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is None:
            continue
        if hasattr(j, "jaxpr") and hasattr(j, "consts"):
            return j.jaxpr, list(j.consts)
        if hasattr(j, "eqns"):
            return j, []
    return None


# Contractions that take integer operands as numbers, promoted to their float output dtype.
_PROMOTING_CONTRACTIONS = {"dot_general", "conv_general_dilated"}

_CALL_PRIMITIVES = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "remat", "checkpoint", "custom_lin"}


def _elementwise_jaxpr(jaxpr) -> bool:
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name in _rules.ELEMENTWISE_PRIMITIVES:
            continue
        if name == "broadcast_in_dim" and all(np.shape(getattr(v, "aval", v))[:0] == () and
                                              len(getattr(getattr(v, "aval", None), "shape", ())) == 0
                                              for v in e.invars):
            continue
        if name in _CALL_PRIMITIVES:
            sub = _sub_jaxpr(e)
            if sub is not None and _elementwise_jaxpr(sub[0]):
                continue
        return False
    return True


def _to_dtype(a, dtype):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
        return a.astype(dtype)
    return a


def _bind(eqn, args):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        return eqn.primitive.bind(*subfuns, *args, **params)
    return eqn.primitive.bind(*args, **params)


def _bind_elementwise(eqn, args, dtype):
    """Bind an elementwise equation on arrays of any (broadcast-compatible) shape."""
    name = eqn.primitive.name
    if name == "convert_element_type":
        a = args[0]
        new = eqn.params["new_dtype"]
        return a if jnp.issubdtype(new, jnp.floating) else a.astype(new)
    if name == "broadcast_in_dim":
        return args[0]
    if name in ("copy", "copy_p", "stop_gradient") or (name in ("reduce_precision",)):
        return args[0]
    if name in _CALL_PRIMITIVES:
        jaxpr, consts = _sub_jaxpr(eqn)
        outs = _eval_elementwise(jaxpr, consts, args, dtype)
        return outs if eqn.primitive.multiple_results else outs[0]
    args = [_to_dtype(a, dtype) for a in args]
    if name == "select_n":
        pred, *cases = args
        if len(cases) == 2:
            return jnp.where(pred, cases[1], cases[0])
        return jnp.choose(pred.astype(jnp.int32), jnp.broadcast_arrays(*cases))
    if len(args) > 1:
        args = jnp.broadcast_arrays(*args)
    return _bind(eqn, args)


def _eval_elementwise(jaxpr, consts, args, dtype):
    env = {}
    for v, a in zip(jaxpr.constvars, consts):
        env[v] = jnp.asarray(a).reshape(()) if np.size(a) == 1 else a
    for v, a in zip(jaxpr.invars, args):
        env[v] = a

    def read(v):
        if hasattr(v, "val"):
            return v.val
        return env[v]

    for e in jaxpr.eqns:
        outs = _bind_elementwise(e, [read(v) for v in e.invars], dtype)
        if not e.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(e.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _interleave_diag(d: jax.Array, first: bool) -> jax.Array:
    n, *spatial = d.shape
    shape = [n]
    for size in spatial:
        shape += [size, 1] if first else [1, size]
    return d.reshape(shape)


def _apply_phi(k: Kernel, phi, n_points: int, params: dict) -> Kernel:
    """``nngp ← E[phi(u)phi(v)]``, ``ntk ← E[phi'(u)phi'(v)]·ntk``, ``cov ← E[phi(u)phi(u')]``.

    Each array is transformed by its own call of :func:`elementwise.gaussian_expectations`, so
    the derivative is computed only for the NTK and no array is concatenated.
    """
    expect = functools.partial(_ew.gaussian_expectations, phi, n_points=n_points, **params)
    want_ntk = k.ntk is not None
    if k.layout == "full":
        d1 = _diag_full(k.cov1, 1)
        d2 = d1 if k.same_inputs else _diag_full(k.cov2, 1)
        v1 = _interleave_diag(d1, True)[:, None]
        v2 = _interleave_diag(d2, False)[None]
        cov1 = expect(k.cov1, _interleave_diag(d1, True), _interleave_diag(d1, False), derivative=False)[0]
        cov2 = cov1 if k.same_inputs else expect(k.cov2, _interleave_diag(d2, True), _interleave_diag(d2, False),
                                                 derivative=False)[0]
    else:
        v1, v2 = k.cov1[:, None], k.cov2[None]
        cov1 = expect(k.cov1, k.cov1, k.cov1, derivative=False)[0]
        cov2 = cov1 if k.same_inputs else expect(k.cov2, k.cov2, k.cov2, derivative=False)[0]
    nngp, dd = expect(k.nngp, v1, v2, derivative=want_ntk)
    ntk = dd * k.ntk if want_ntk else None
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)


def _recognise(eqn, invals) -> Optional[tuple[str, tuple]]:
    """A closed-form name for a one-equation phi applied to an identity value, if recognised."""
    name = eqn.primitive.name
    if name in ("custom_jvp_call", "pjit", "jit", "custom_vjp_call"):
        fname = eqn.params.get("name")
        inner = eqn
        while fname is None:
            sub = _sub_jaxpr(inner)
            if sub is None or len(sub[0].eqns) != 1 or sub[0].eqns[0].primitive.name not in _CALL_PRIMITIVES:
                break
            inner = sub[0].eqns[0]
            fname = inner.params.get("name")
        if fname == "relu":
            return "relu", ()
        if fname == "leaky_relu":
            sub = _sub_jaxpr(inner)
            slopes = [v.val for e in sub[0].eqns if e.primitive.name == "mul" for v in e.invars
                      if hasattr(v, "val")]
            if len(slopes) == 1:
                return "leaky_relu", (("negative_slope", float(slopes[0])),)
        return None
    simple = {"tanh": "tanh", "abs": "abs", "sign": "sign", "erf": "erf", "sin": "sin", "cos": "cos",
              "exp": "exp", "logistic": "sigmoid"}
    if name in simple and len(invals) == 1:
        return simple[name], ()
    if name == "max" and len(invals) == 2:
        consts = [c for c in invals if isinstance(c, _C)]
        if len(consts) == 1 and consts[0].scalar is not None and float(consts[0].scalar) == 0.0:
            return "relu", ()
    return None


class _Interpreter:
    def __init__(self, calls: list[ModuleCall], params, options: _Options, batch: int):
        self.calls = calls
        self.params = params
        self.options = options
        self.batch = batch
        # Call equations (jit, custom_jvp, ...) whose programs are being interpreted, outermost
        # first: the equations inside carry name stacks relative to them.
        self.outer: list = []

    # -- helpers -------------------------------------------------------------------------------

    def where(self, eqn) -> str:
        parts = []
        for e in [*self.outer, eqn]:
            parts += [p for p in str(e.source_info.name_stack).split("/") if p and not _TAG.match(p)]
        return "/".join(parts) or "<top level>"

    def layer(self, eqn) -> str:
        """The innermost module call ``eqn`` belongs to, for messages."""
        tags = [t for e in [*self.outer, eqn] for t in self.tags(e) if t < len(self.calls)]
        if not tags:
            where = self.where(eqn)
            return "the model's top level" if where == "<top level>" else f"`{where}`"
        call = self.calls[tags[-1]]
        return f"layer `{call.path}` ({call.type_name})"

    def primitive(self, eqn) -> str:
        """``eqn``'s primitive, with the calls it sits in (``lt inside jit(_take)``)."""
        def name(e):
            fn = e.params.get("name")
            return f"{e.primitive.name}({fn})" if isinstance(fn, str) else e.primitive.name

        inside = " > ".join(name(e) for e in self.outer)
        return eqn.primitive.name + (f" inside {inside}" if inside else "")

    def integer_error(self, eqn, v: _IntInput) -> InfiniteWidthError:
        return InfiniteWidthError(
            f"input leaf {v.name} ({v.dtype}, per-example shape {v.shape}) reaches {self.layer(eqn)} at "
            f"primitive {self.primitive(eqn)}: embeddings and other uses of integer or bool inputs (token ids, "
            "masks) have no infinite-width rule yet; only their conversion to floats is understood (an input "
            "feature like any float leaf). Use ntk_adapters.monte_carlo_kernel_fn or the empirical kernels for "
            "this model"
        )

    def call_program(self, eqn, invals):
        """Interpret the program of a call equation (jit, custom_jvp, ...) on ``invals``."""
        sub = _sub_jaxpr(eqn)
        if sub is None:
            raise self.error(eqn, "cannot read the called program")
        self.outer.append(eqn)
        try:
            return self.run(sub[0], sub[1], invals)
        finally:
            self.outer.pop()

    def integer_input(self, eqn, invals, v: _IntInput) -> list:
        """Outputs of an equation receiving an integer input leaf: a conversion to floats makes it an
        input feature, integer conversions keep it, call equations are entered; anything else is refused."""
        name = eqn.primitive.name
        if name == "convert_element_type" and len(invals) == 1:
            new = eqn.params["new_dtype"]
            a2 = None if v.x2 is None else v.x2.astype(new)
            if jnp.issubdtype(new, jnp.floating):
                return [_input_value(v.x1.astype(new), a2, self.options.layout, v.name)]
            if jnp.issubdtype(new, jnp.integer) or jnp.issubdtype(new, jnp.bool_):
                return [dataclasses.replace(v, x1=v.x1.astype(new), x2=a2)]
        if name in _CALL_PRIMITIVES:
            return self.call_program(eqn, invals)
        raise self.integer_error(eqn, v)

    def convert_module_inputs(self, group, env, read) -> list:
        """Integer input leaves that a module uses only as numbers become input features before its
        rule runs: Flax's Dense converts them to floats first, Haiku's Linear contracts them with its
        float weights directly (``jnp.dot`` promotes inside ``dot_general``). Returns the module's
        equations without the conversions already run."""
        done = set()
        for var in {v for e in group for v in e.invars if not _is_literal(v)}:
            leaf = env.get(var)
            if not isinstance(leaf, _IntInput):
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
                env[var] = _input_value(leaf.x1.astype(dtype), None if leaf.x2 is None else leaf.x2.astype(dtype),
                                        self.options.layout, leaf.name)
        return [e for e in group if id(e) not in done]

    def error(self, eqn, message) -> InfiniteWidthError:
        return InfiniteWidthError(
            f"at `{self.where(eqn)}` (primitive {self.primitive(eqn)}): {message}; {_SUGGEST}"
        )

    def materialize(self, v: Value, eqn=None) -> Value:
        if v.phi is None:
            return v
        if not v.kernel.is_gaussian:
            msg = ("an elementwise nonlinearity is applied to a value that is not a zero-mean Gaussian process "
                   "(two nonlinearities in a row, a nonlinearity of the raw input, or after a residual sum, "
                   "concatenation or normalization); its kernel does not determine the result")
            if eqn is not None:
                raise self.error(eqn, msg)
            raise InfiniteWidthError(msg + "; " + _SUGGEST)
        phi = v.phi.name if v.phi.name is not None else v.phi.fn
        k = _apply_phi(v.kernel, phi, self.options.n_points, dict(v.phi.params))
        return Value(kernel=k, shape=v.shape, flat=v.flat, base=next(_ids), fresh=None, deps=v.deps)

    def tags(self, eqn) -> list[int]:
        return [int(m.group(1)) for p in str(eqn.source_info.name_stack).split("/") if (m := _TAG.match(p))]

    # -- main loop -----------------------------------------------------------------------------

    def run(self, jaxpr, consts, args):
        env: dict = {}

        def read(v):
            if hasattr(v, "val") and not hasattr(v, "count"):
                val = v.val
                return _C(val, val if np.ndim(val) == 0 else None)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _C(c, c if np.ndim(c) == 0 else None)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a

        eqns = jaxpr.eqns
        i = 0
        while i < len(eqns):
            eqn = eqns[i]
            call = None
            for t in self.tags(eqn):
                if t < len(self.calls) and self.calls[t].rule is not None:
                    call = self.calls[t]
                    break
            if call is not None:
                j = i
                while j < len(eqns) and call.index in self.tags(eqns[j]):
                    j += 1
                group = eqns[i:j]
                if any(_depends(read(v)) for e in group for v in e.invars if not hasattr(v, "val")
                       if v in env):
                    group = self.convert_module_inputs(group, env, read)
                    self.run_module(call, group, eqns[j:], jaxpr.outvars, env, read)
                    i = j
                    continue
                for e in group:
                    self.run_eqn(e, env, read)
                i = j
                continue
            self.run_eqn(eqn, env, read)
            i += 1
        return [read(v) for v in jaxpr.outvars]

    def run_eqn(self, eqn, env, read):
        invals = [read(v) for v in eqn.invars]
        ints = [v for v in invals if isinstance(v, _IntInput)]
        if ints:
            for var, o in zip(eqn.outvars, self.integer_input(eqn, invals, ints[0])):
                env[var] = o
            return
        if not any(_is_value(v) for v in invals):
            # Parameter-only computations run eagerly even while kernel_fn is being jitted, so rules
            # can inspect their values (e.g. a BatchNorm's per-channel scales).
            with jax.ensure_compile_time_eval():
                outs = _bind(eqn, [v.value for v in invals])
            if not eqn.primitive.multiple_results:
                outs = [outs]
            src = invals
            for var, o in zip(eqn.outvars, outs):
                scalar = None
                if np.ndim(o) == 0:
                    scalar = o
                elif eqn.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape") and \
                        src and src[0].scalar is not None:
                    scalar = src[0].scalar
                    if eqn.primitive.name == "convert_element_type":
                        scalar = o.reshape(-1)[0] if np.size(o) else None
                env[var] = _C(o, scalar)
            return
        outs = self.apply_primitive(eqn, invals)
        for var, o in zip(eqn.outvars, outs):
            env[var] = o

    def apply_primitive(self, eqn, invals):
        name = eqn.primitive.name
        if name in _rules.PRIMITIVE_RULES:
            return _rules.PRIMITIVE_RULES[name](eqn, invals, self)
        if name in _rules.ELEMENTWISE_PRIMITIVES:
            return [self.elementwise(eqn, invals)]
        if name in _CALL_PRIMITIVES:
            sub = _sub_jaxpr(eqn)
            if sub is None:
                raise self.error(eqn, "cannot read the called program")
            if _elementwise_jaxpr(sub[0]) and len(eqn.outvars) == 1:
                return [self.elementwise(eqn, invals)]
            return self.call_program(eqn, invals)
        raise self.error(eqn, "this operation has no infinite-width rule")

    # -- elementwise ---------------------------------------------------------------------------

    def elementwise(self, eqn, invals) -> Value:
        values = [v for v in invals if _is_value(v)]
        name = eqn.primitive.name
        bases = {v.base for v in values}
        if len(bases) > 1:
            if name in ("add", "sub", "add_any"):
                return self.residual(eqn, invals)
            raise self.error(eqn, "combines two different input-dependent values"
                                  f"{_sources(values)} entry by entry (only sums of independent "
                                  "branches are supported)")
        v0 = values[0]
        positional = self._positional_scale(eqn, invals, v0)
        if positional is not None:
            return positional
        for c in invals:
            if isinstance(c, _C) and c.scalar is None and np.size(c.value) != 1:
                raise self.error(eqn, f"an elementwise operation with a non-scalar constant of shape "
                                      f"{np.shape(c.value)} (per-unit constants make channels non-identical)")
        scalars = [None if _is_value(c) else (c.scalar if c.scalar is not None else jnp.reshape(c.value, ()))
                   for c in invals]
        # Linear maps of an already materialized value act on its kernel directly, which also works
        # for non-Gaussian values (e.g. mean pooling divides a sum of ReLU features).
        if v0.phi is None and len(values) == len(invals) - 1 or (v0.phi is None and len(invals) == 1):
            scale = self._linear_scale(name, invals, scalars)
            if scale is not None:
                k = v0.kernel
                s2 = scale * scale
                k = k.replace(nngp=s2 * k.nngp, ntk=None if k.ntk is None else s2 * k.ntk, cov1=s2 * k.cov1,
                              cov2=s2 * k.cov2)
                return dataclasses.replace(v0, kernel=k, base=next(_ids)) if scale != 1.0 else v0
        if not v0.kernel.is_gaussian:
            raise self.error(eqn, "an elementwise nonlinearity applied to a value that is not a zero-mean "
                                  "Gaussian process (two nonlinearities in a row, a nonlinearity of the raw "
                                  "input, or after a residual sum / concatenation); its kernel does not "
                                  "determine the result")
        recognised = None
        if all(v.phi is None for v in values) and len(values) == 1:
            recognised = _recognise(eqn, invals)

        fns = [None if not _is_value(c) else (c.phi.fn if c.phi is not None else None) for c in invals]

        def fn(u, fns=tuple(fns), scalars=tuple(scalars), eqn=eqn):
            args = []
            for f, s in zip(fns, scalars):
                if s is not None:
                    args.append(s)
                else:
                    args.append(u if f is None else f(u))
            out = _bind_elementwise(eqn, args, u.dtype)
            return out[0] if eqn.primitive.multiple_results else out

        if recognised is not None:
            phi = Phi(fn=fn, name=recognised[0], params=recognised[1])
        else:
            phi = Phi(fn=fn)
        return dataclasses.replace(v0, phi=phi, fresh=None)

    def _positional_scale(self, eqn, invals, v0: Value) -> Optional[Value]:
        """``x * s`` or ``x / s`` with ``s`` constant over channels but varying over positions.

        Average pooling with 'SAME' padding divides each position by its own window count. Every
        channel is scaled alike, so channels stay identically distributed and the kernel entry of
        positions ``(p, p')`` is multiplied by ``s_p · s_p'``.
        """
        name = eqn.primitive.name
        if name not in ("mul", "div") or len(invals) != 2 or v0.phi is not None or v0.flat:
            return None
        const = [c for c in invals if isinstance(c, _C)]
        if len(const) != 1 or const[0].scalar is not None or np.size(const[0].value) == 1:
            return None
        if name == "div" and not _is_value(invals[0]):
            return None
        k, spatial = v0.kernel, v0.shape[:-1]
        try:
            s = np.broadcast_to(np.asarray(const[0].value), (1,) + tuple(v0.shape))[0]
        except (ValueError, TypeError, jax.errors.ConcretizationTypeError):
            return None
        if k.layout == "none" or not spatial or not np.all(s == s[..., :1]):
            return None
        s = s[..., 0].astype(np.float64)
        if name == "div":
            s = 1.0 / s
        if k.layout == "diagonal":
            pair = s * s  # (*spatial), matching nngp (N1, N2, *spatial) and cov (N, *spatial)
        else:
            # interleaved (p1, p2) per spatial dimension: outer product s[p] s[p'] reordered
            nd = len(spatial)
            outer = np.multiply.outer(s, s)  # (*spatial, *spatial)
            pair = np.transpose(outer, [i for d in range(nd) for i in (d, nd + d)])
        pair = jnp.asarray(pair, k.nngp.dtype)
        k = k.replace(nngp=pair * k.nngp, ntk=None if k.ntk is None else pair * k.ntk,
                      cov1=pair * k.cov1, cov2=pair * k.cov2)
        return dataclasses.replace(v0, kernel=k, base=next(_ids))

    def _linear_scale(self, name, invals, scalars):
        if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
            return 1.0
        if name == "neg":
            return -1.0
        vals = [s for s in scalars if s is not None]
        try:
            if name == "mul" and len(vals) == 1:
                return float(vals[0])
            if name == "div" and len(vals) == 1 and _is_value(invals[0]):
                return 1.0 / float(vals[0])
        except (TypeError, jax.errors.ConcretizationTypeError):
            return None
        return None

    # -- residual ------------------------------------------------------------------------------

    def residual(self, eqn, invals) -> Value:
        if not all(_is_value(v) for v in invals):
            raise self.error(eqn, "adds a constant to a sum of branches")
        a, b = invals
        independent = (a.fresh is not None and a.fresh not in b.deps) or (
            b.fresh is not None and b.fresh not in a.deps)
        if not independent and a.source and b.source and a.source != b.source:
            raise self.error(eqn, f"adds input leaves {a.source} and {b.source} (or functions of them) entry "
                                  "by entry: the kernel of the sum needs the products between the two leaves, "
                                  "which the engine does not track. Concatenate the leaves on the channel axis, "
                                  "or give each its own Dense layer and add their outputs")
        if not independent:
            raise self.error(eqn, "adds two branches that are not independent Gaussian processes (neither ends "
                                  "in a fresh random linear layer that the other does not use), so their "
                                  "cross-covariance is unknown")
        a, b = self.materialize(a, eqn), self.materialize(b, eqn)
        if a.shape != b.shape or a.flat != b.flat:
            raise self.error(eqn, f"adds values of per-example shapes {a.shape} and {b.shape}")
        ka, kb = a.kernel, b.kernel
        if ka.layout != kb.layout:
            raise self.error(eqn, f"adds kernels of layouts {ka.layout} and {kb.layout}")
        # a - b has the same kernel as a + b for independent zero-mean branches
        ntk = None if ka.ntk is None or kb.ntk is None else ka.ntk + kb.ntk
        k = ka.replace(nngp=ka.nngp + kb.nngp, ntk=ntk, cov1=ka.cov1 + kb.cov1, cov2=ka.cov2 + kb.cov2,
                       is_gaussian=ka.is_gaussian and kb.is_gaussian)
        return Value(kernel=k, shape=a.shape, flat=a.flat, base=next(_ids), fresh=None, deps=a.deps | b.deps)

    # -- modules -------------------------------------------------------------------------------

    def run_module(self, call: ModuleCall, group, rest, outvars, env, read):
        defined = {v for e in group for v in e.outvars}
        inputs = []
        for e in group:
            for v in e.invars:
                if hasattr(v, "val") and not hasattr(v, "count"):
                    continue
                if v in defined or v not in env:
                    continue
                if _depends(env[v]) and v not in inputs:
                    inputs.append(v)
        used_later = {v for e in rest for v in e.invars if not hasattr(v, "val")} | {
            v for v in outvars if not hasattr(v, "val")}
        outs = [v for e in group for v in e.outvars if v in used_later]
        for v in inputs:
            if isinstance(env[v], _IntInput):
                first = next(e for e in group if v in e.invars)
                raise self.integer_error(first, env[v])
        if len(inputs) != 1 or len(outs) != 1:
            raise call.error(f"the rule expects one input-dependent input and one output; the module has "
                             f"{len(inputs)} and {len(outs)}")
        value = env[inputs[0]]
        inp_var, out_var = inputs[0], outs[0]
        rule = call.rule
        value = self.materialize(value)
        k = value.kernel
        if value.flat:
            if rule.flat != "average":
                raise call.error("its input is a flattened spatial value; register the rule with "
                                 "flat='average' if the module is a linear layer with i.i.d. weights")
            k = average_positions(k)

        def apply(x, group=group, inp_var=inp_var, out_var=out_var, env=env):
            local = {}

            def rd(v):
                if hasattr(v, "val") and not hasattr(v, "count"):
                    return v.val
                if v in local:
                    return local[v]
                return env[v].value

            local[inp_var] = x
            for e in group:
              with jax.ensure_compile_time_eval():
                o = _bind(e, [rd(v) for v in e.invars])
                if not e.primitive.multiple_results:
                    o = [o]
                for v, oo in zip(e.outvars, o):
                    local[v] = oo
            return local[out_var]

        call.params = _lookup(self.params, call.params_path)
        call.in_shape = tuple(inp_var.aval.shape[1:])
        call.in_dtype = inp_var.aval.dtype
        call.traced_in_shape = tuple(inp_var.aval.shape)
        call.out_shape = tuple(out_var.aval.shape[1:])
        call.apply = apply
        call.eqns = list(group)
        call.options = self.options
        call.input_value = value
        new = rule.fn(k, call)
        if not isinstance(new, Kernel):
            raise call.error(f"its rule returned {type(new).__name__}, not a Kernel")
        out_shape = call.out_shape
        flat = False
        if new.layout != "none" and len(new.spatial) != len(out_shape) - 1:
            raise call.error(f"its rule returned a kernel with spatial shape {new.spatial} for an output of "
                             f"per-example shape {out_shape}")
        lid = next(_ids)
        out = Value(kernel=new, shape=out_shape, flat=flat, base=lid,
                    fresh=lid if rule.linear else None,
                    deps=value.deps | ({lid} if rule.linear else frozenset()))
        env[out_var] = out


# ----------------------------------------------------------------------------------------------
# Built-in primitive rules.


def _reshape_rule(eqn, invals, interp: _Interpreter):
    v = invals[0]
    if not _is_value(v):
        raise interp.error(eqn, "reshape of a value with a dynamic shape")
    new = tuple(eqn.params["new_sizes"])
    if new[0] != interp.batch:
        raise interp.error(eqn, f"reshape to {new} mixes the batch axis with the features")
    new = new[1:]
    if new == v.shape:
        return [v]
    spatial = v.kernel.spatial
    if len(new) == 1 and math.prod(v.shape) == new[0]:
        # flatten: positions stay in the kernel, the Dense that follows averages over them
        return [dataclasses.replace(v, shape=new, flat=v.kernel.layout != "none")]
    if v.flat and math.prod(new) == math.prod(v.shape) and tuple(new[:-1]) == tuple(spatial):
        return [dataclasses.replace(v, shape=new, flat=False)]
    if v.kernel.layout == "none" and not v.flat and len(new) >= 2:
        # Units of a dense layer are i.i.d.: reshaped into positions × channels, different positions
        # are independent (zero covariance) and each has the unit kernel.
        v = interp.materialize(v, eqn)
        k = v.kernel
        sp = new[:-1]
        if interp.options.layout == "full":
            def expand(a, lead):
                eye = 1.0
                out = a.reshape(a.shape + (1,) * (2 * len(sp)))
                for d, s in enumerate(sp):
                    shape = [1] * (lead + 2 * len(sp))
                    shape[lead + 2 * d] = s
                    shape[lead + 2 * d + 1] = s
                    eye = eye * jnp.eye(s, dtype=a.dtype).reshape(shape)
                return out * eye
            k2 = k.replace(nngp=expand(k.nngp, 2), ntk=None if k.ntk is None else expand(k.ntk, 2),
                           cov1=expand(k.cov1, 1), cov2=expand(k.cov2, 1), layout="full")
        else:
            def tile(a, lead):
                return jnp.broadcast_to(a.reshape(a.shape + (1,) * len(sp)), a.shape + tuple(sp))
            k2 = k.replace(nngp=tile(k.nngp, 2), ntk=None if k.ntk is None else tile(k.ntk, 2),
                           cov1=tile(k.cov1, 1), cov2=tile(k.cov2, 1), layout="diagonal")
        return [dataclasses.replace(v, kernel=k2, shape=new, flat=False)]
    raise interp.error(eqn, f"reshape of per-example shape {v.shape} to {new} is neither a flatten nor "
                            "its inverse")


def _reduce_sum_rule(eqn, invals, interp: _Interpreter):
    v = invals[0]
    axes = tuple(a - 1 for a in eqn.params["axes"])
    nsp = len(v.shape) - 1
    if v.flat or -1 in axes or (len(v.shape) - 1) in axes or nsp == 0:
        raise interp.error(eqn, "a sum over the channel axis or the batch axis (e.g. a normalization or "
                                "softmax written inline) has no infinite-width rule outside a recognised module")
    v = interp.materialize(v, eqn)
    k = v.kernel
    if k.layout != "full":
        raise interp.error(eqn, "pooling over spatial axes needs the covariance between positions; pass "
                                "spatial_layout='full' (or 'auto')")
    # nngp (N1, N2, H1, H2, W1, W2): sum both members of each reduced spatial pair.
    def red(a, lead):
        ax = []
        for d in axes:
            ax += [lead + 2 * d, lead + 2 * d + 1]
        return a.sum(axis=tuple(ax))

    keep = [d for d in range(nsp) if d not in axes]
    layout = "full" if keep else "none"
    k2 = k.replace(nngp=red(k.nngp, 2), ntk=None if k.ntk is None else red(k.ntk, 2), cov1=red(k.cov1, 1),
                   cov2=red(k.cov2, 1), layout=layout, is_gaussian=k.is_gaussian)
    new_shape = tuple(s for d, s in enumerate(v.shape[:-1]) if d not in axes) + (v.shape[-1],)
    return [Value(kernel=k2, shape=new_shape, base=next(_ids), fresh=v.fresh, deps=v.deps)]


def _concatenate_rule(eqn, invals, interp: _Interpreter):
    dim = eqn.params["dimension"]
    if not all(_is_value(v) for v in invals):
        raise interp.error(eqn, "concatenates input-dependent values with constants")
    vals = [interp.materialize(v, eqn) for v in invals]
    nd = len(vals[0].shape)
    if dim - 1 != nd - 1 or any(v.flat for v in vals):
        raise interp.error(eqn, "concatenation along a non-channel axis")
    sizes = [v.shape[-1] for v in vals]
    tot = sum(sizes)
    ks = [v.kernel for v in vals]
    if len({k.layout for k in ks}) != 1:
        raise interp.error(eqn, "concatenates values of different spatial layouts")

    def mix(field):
        parts = [getattr(k, field) for k in ks]
        if any(p is None for p in parts):
            return None
        return sum(s / tot * p for s, p in zip(sizes, parts))

    k = ks[0].replace(nngp=mix("nngp"), ntk=mix("ntk"), cov1=mix("cov1"), cov2=mix("cov2"), is_gaussian=False)
    deps = frozenset().union(*(v.deps for v in vals))
    return [Value(kernel=k, shape=vals[0].shape[:-1] + (tot,), base=next(_ids), deps=deps)]


def _reduce_window_sum_rule(eqn, invals, interp: _Interpreter):
    from ntk_adapters.infinite import layers as _layers

    v = invals[0]
    if v.flat or len(v.shape) < 2:
        raise interp.error(eqn, "a window sum over a value without spatial axes")
    p = eqn.params
    dims, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    if dims[0] != 1 or dims[-1] != 1 or strides[0] != 1 or strides[-1] != 1:
        raise interp.error(eqn, "a window sum over the batch or channel axis")
    if any(d != 1 for d in p.get("base_dilation", ())) or any(d != 1 for d in p.get("window_dilation", ())):
        raise interp.error(eqn, "dilated window sums have no rule")
    v = interp.materialize(v, eqn)
    k = v.kernel
    window = tuple(dims[1:-1])
    if k.layout != "full" and math.prod(window) > 1:
        raise interp.error(eqn, "pooling needs the covariance between positions; pass spatial_layout='full' "
                                "(or 'auto')")
    try:
        k2 = _layers.sum_pool(k, window, strides=tuple(strides[1:-1]), padding=[tuple(x) for x in pads[1:-1]])
    except ValueError as e:
        raise interp.error(eqn, str(e)) from None
    shape = tuple(eqn.outvars[0].aval.shape[1:])
    return [Value(kernel=k2, shape=shape, base=next(_ids), fresh=v.fresh, deps=v.deps)]


def _broadcast_rule(eqn, invals, interp: _Interpreter):
    v = invals[0]
    new = tuple(eqn.params["shape"][1:])
    if new == v.shape:
        return [v]
    if v.shape == () and new == (1,) and v.kernel.layout == "none":
        # x[:, None] of a leaf (N,): one number per example is one channel
        return [dataclasses.replace(v, shape=new)]
    raise interp.error(eqn, f"broadcast of an input-dependent value of per-example shape {v.shape}")


def _identity_rule(eqn, invals, interp):
    return [invals[0]]


_rules.register_primitive_rule("reshape", _reshape_rule)
_rules.register_primitive_rule("reduce_sum", _reduce_sum_rule)
_rules.register_primitive_rule("concatenate", _concatenate_rule)
_rules.register_primitive_rule("broadcast_in_dim", _broadcast_rule)
_rules.register_primitive_rule("reduce_window_sum", _reduce_window_sum_rule)


# ----------------------------------------------------------------------------------------------
# Layout choice.


def _needs_full(jaxpr) -> bool:
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name in ("reduce_window_sum", "avg_pool"):
            return True
        if name in ("reduce_sum", "reduce_max", "argmax") and e.invars:
            nd = len(getattr(e.invars[0].aval, "shape", ()))
            axes = e.params.get("axes", ())
            if nd >= 3 and axes and 0 not in axes and (nd - 1) not in axes:
                return True
        sub = _sub_jaxpr(e)
        if sub is not None and _needs_full(sub[0]):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Public entry point.


def infinite_kernel_fn(
    model: Union[Model, Callable],
    *,
    spatial_layout: str = "auto",
    weight_variance: Union[None, float, Mapping[str, float]] = None,
    bias_variance: Union[None, float, Mapping[str, float]] = None,
    n_points: int = _ew.DEFAULT_QUADRATURE_POINTS,
    jit: bool = True,
    check_finite_values: bool = True,
) -> Callable:
    """Exact infinite-width NNGP and NTK of an unchanged Flax / Haiku model.

    Inputs may be pytrees (tuple, dict) of arrays sharing the batch axis. Each float leaf is a
    deterministic input feature with its own kernel (``x·x'/C`` over its last axis), so branches
    that meet only through independent random layers (``Dense(a) + Dense(b)``) or a concatenation
    on the channel axis (``Dense(concatenate([a, b], -1))``) have exact kernels; combining two
    leaves entry by entry (``a + b``, ``a * mask``) is refused. Integer and bool leaves are passed
    to the model unchanged; their conversion to floats is an input feature like a float leaf,
    every other use (embeddings of token ids) raises :class:`InfiniteWidthError` naming the leaf,
    and leaves the model does not use are ignored.

    Args:
      model: a :class:`~ntk_adapters.Model` from ``ntk_adapters.flax.adapt`` /
        ``ntk_adapters.haiku.adapt`` (or ``ntk_adapters.adapt`` for a function built only of
        registered pieces).
      spatial_layout: ``'auto'`` (``'full'`` when pooling needs covariances between positions,
        else the cheaper ``'diagonal'``), ``'diagonal'`` or ``'full'``.
      weight_variance: override ``σw² = fan_in·Var(W)``: one float for every layer, or a dict
        from layer path (``'Dense_0'``, ``'mlp/~/linear_0'``, or the last path component) to
        ``σw²``; needed for initializers the library cannot read exactly.
      bias_variance: the same for ``σb² = Var(b)``.
      n_points: Gauss–Hermite nodes per dimension for elementwise functions without a closed form.
      jit: return a jitted ``kernel_fn``.
      check_finite_values: raise ``ValueError`` on NaN/Inf in concrete inputs (skipped for
        tracers, e.g. under an outer ``jit``).

    Returns:
      ``kernel_fn(x1, x2=None, get=('nngp', 'ntk'))`` with ``x1`` an array ``(N1, *input_shape)``
      or a pytree of arrays ``(N1, ...)``, ``x2`` the same with ``N2`` examples (``None``:
      ``x2 = x1``); each float leaf of ``x2`` takes the dtype of its ``x1`` leaf, and the kernels
      are computed in the dtype of the float inputs (float32 inputs give float32 kernels). Each kernel is ``(N1, N2)`` per output unit
      (``(N1, N2, *spatial)`` for a model with spatial outputs); the kernel over all O outputs
      is ``K ⊗ I_O`` (:func:`expand_outputs`). ``get`` may also name ``'cov1'``, ``'cov2'`` (the
      per-input variances) or ``'kernel'`` (the whole :class:`Kernel`). ``get`` must be static
      under an outer ``jit``.

    Raises:
      InfiniteWidthError: a layer or operation without exact rule (max pooling, attention,
        softmax, BatchNorm in training mode, embeddings, ...), naming the layer and the primitive
        (and the input leaf for integer inputs). Raised when the kernel function is built if the
        model records its input specs, else at the first call.
      ValueError: (from ``kernel_fn``) inputs without a shared batch axis, ``x1`` and ``x2`` of
        different structures or per-example shapes, or NaN/Inf with ``check_finite_values``.

    Example::

      model = ntk_adapters.flax.adapt(MLP(), None, x)
      kernel_fn = infinite_kernel_fn(model)
      k = kernel_fn(x1, x2)            # k.nngp, k.ntk: (N1, N2)
      two = infinite_kernel_fn(ntk_adapters.flax.adapt(TwoInputs(), None, {'a': a, 'b': b}))
      two({'a': a1, 'b': b1}, get='ntk')   # (N1, N1)
    """
    model = as_model(model)
    if spatial_layout not in ("auto", "diagonal", "full"):
        raise ValueError(f"spatial_layout must be 'auto', 'diagonal' or 'full'; got {spatial_layout!r}")
    if model.params is None:
        raise ValueError("infinite_kernel_fn needs a Model with params (their shapes give the layer widths)")
    cache: dict = {}

    def prepare(x_struct):
        key = hashable_spec(x_struct)
        if key not in cache:
            closed, calls = _trace(model, x_struct)
            layout = spatial_layout
            if layout == "auto":
                layout = "full" if _needs_full(closed.jaxpr) else "diagonal"
            cache[key] = (closed, calls, layout)
        return cache[key]

    def compute(x1, x2):
        closed, calls, layout = prepare(spec(x1))
        leaves1, treedef = jax.tree_util.tree_flatten(x1)
        leaves2 = [None] * len(leaves1) if x2 is None else treedef.flatten_up_to(x2)
        names = [name for name, _ in leaves_with_names(x1, "x")]
        options = _Options(weight_variance, bias_variance, layout, n_points)
        interp = _Interpreter(calls, model.params, options, batch=leaves1[0].shape[0])
        inputs = [_input_leaf(a1, a2, layout, name) for a1, a2, name in zip(leaves1, leaves2, names)]
        args = [_C(p) for p in jax.tree_util.tree_leaves(model.params)] + inputs
        if len(closed.jaxpr.invars) != len(args):
            raise InfiniteWidthError("the traced model has an unexpected signature")
        consts = [c for c in closed.consts]
        (out,) = interp.run(closed.jaxpr, consts, args)
        if isinstance(out, _IntInput):
            raise InfiniteWidthError(f"the model returns its integer input leaf {out.name}, which has no kernel")
        if not _is_value(out):
            raise InfiniteWidthError("the model's output does not depend on its input")
        out = interp.materialize(out)
        kout = out.kernel
        if out.flat:
            kout = average_positions(kout)
        return kout

    compute_jit = jax.jit(compute) if jit else compute
    example = _example_spec(model)
    if example is not None:
        # Interpret the model once now, so that a layer without a rule is reported here and not at
        # the first evaluation. The recorded dtypes matter: integer leaves must reach the model as
        # integers (an embedding refuses floats).
        jax.eval_shape(compute, jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct((2,) + tuple(s.shape), s.dtype), example), None)

    def kernel_fn(x1, x2=None, get=("nngp", "ntk")):
        check_pair(x1, x2)
        x1 = jax.tree_util.tree_map(jnp.asarray, x1)
        if x2 is not None:
            x2 = _like(x1, x2)
        if check_finite_values:
            check_finite(x1, "x1")
            check_finite(x2, "x2")
        k = compute_jit(x1, x2)
        values = {"nngp": k.nngp, "ntk": k.ntk, "cov1": k.cov1, "cov2": k.cov2, "kernel": k}
        return pack(get, values, allowed=("nngp", "ntk", "cov1", "cov2", "kernel"))

    kernel_fn.model = model
    return kernel_fn


def _example_spec(model: Model):
    """Per-example ShapeDtypeStructs of the model's input, or ``None`` when it records none.

    Models built without ``input_spec`` (only ``input_shape``) are taken to have float inputs.
    """
    if model.input_spec is not None:
        return model.input_spec
    if model.input_shape is None:
        return None
    is_shape = lambda s: isinstance(s, tuple) and all(isinstance(d, (int, np.integer)) for d in s)  # noqa: E731
    dtype = jnp.result_type(float)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(tuple(s), dtype), model.input_shape,
                                  is_leaf=is_shape)


def _like(x1, x2):
    """``x2`` with every leaf as an array of its ``x1`` leaf's dtype (``x1`` and ``x2`` already have the
    same structure). Float values are not silently truncated into an integer leaf."""
    named1 = leaves_with_names(x1, "x1")
    leaves2, treedef = jax.tree_util.tree_flatten(x2)
    out = []
    for (name, a), b in zip(named1, leaves2):
        b = jnp.asarray(b)
        if not jnp.issubdtype(a.dtype, jnp.inexact) and jnp.issubdtype(b.dtype, jnp.inexact):
            raise ValueError(f"{name} is {a.dtype} but its x2 counterpart is {b.dtype}; pass the same kind of "
                             "values (integer, bool or float) for each input in x1 and x2")
        out.append(b.astype(a.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

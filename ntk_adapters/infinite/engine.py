"""Exact infinite-width NNGP and NTK of an unchanged model, by interpreting its traced program.

:func:`infinite_kernel_fn` traces ``model.apply_fn(params, x)`` once with ``jax.make_jaxpr``
while the framework's module calls are recorded (``flax.linen.intercept_methods`` /
``haiku.intercept_methods``); each module call runs under a ``jax.named_scope`` tag, so every
traced equation names the module it belongs to. The program is then walked by the
:mod:`~ntk_adapters.infinite.interpreter` with an environment in which each input-dependent value
is a :class:`~ntk_adapters.infinite.values.Value` (a :class:`Kernel` plus its per-example shape)
and everything else is concrete:

* the equations of a module with a registered rule (Dense, Conv, LayerNorm, ...) are replaced by
  the rule, fed with the module's configuration and the exact variance of its initializers;
* between modules, primitives are interpreted one by one by their rules
  (:mod:`~ntk_adapters.infinite.primitives`): chains of elementwise primitives on
  one Gaussian value become one function phi (closed form where recognised, Gauss–Hermite
  quadrature otherwise, see :mod:`ntk_adapters.infinite.elementwise`), ``reshape`` flattens,
  ``reduce_sum`` over spatial axes and ``reduce_window_sum`` pool, ``add`` of independent
  branches sums kernels, ``concatenate`` on channels mixes them, multiplication by a constant
  scales them;
* anything else raises :class:`InfiniteWidthError` naming the innermost module (with or without
  a rule), the operation and, where known, the nearest supported variant (average pooling for
  max pooling, the pre-activation ordering for a post-activation residual).

Only what the model's output depends on is interpreted: the traced program is analysed backwards
from its output (:func:`~ntk_adapters.infinite.programs.liveness`), so a model adapted with
``output=`` to return one of several heads has the kernel of that head alone.

Inputs may be pytrees of arrays sharing the batch axis. Each float leaf starts as its own input
Value (a deterministic feature: ``nngp = x·x'/C``, zero NTK) with its own base, so the rules above
decide how leaves may meet: through independent random layers (``Dense(a) + Dense(b)`` sums their
kernels) or a concatenation on channels (``Dense(concatenate([a, b]))``), never entry by entry
(``a + b``, ``a * b`` need cross products between leaves, which no kernel tracks). Integer and
bool leaves reach the traced program unchanged and are constants of the input
(:mod:`~ntk_adapters.infinite.masks`): what is computed from them alone (a padding mask
``tokens > 0``, lengths) is a fixed array per example, which may multiply a value position by
position (masked pooling); as floats reaching a layer they are input features; any other use (an
embedding's gather) is refused naming the leaf, and unused leaves cost nothing.

Normalization: kernels are per output unit, ``(N1, N2)``; the kernel of all O outputs is
``K ⊗ I_O`` (:func:`expand_outputs`). The NTK is the one of the loss
``½ · mean over all N·O entries of (f(x) − y)²`` used across the library: gradient flow gives
``df/dt = −(η/(N·O)) Θ (f − y)``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, Union, cast

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.finite import check_finite
from ntk_adapters.infinite import elementwise as _ew
from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite import masks as _masks
from ntk_adapters.infinite import mixing as _mixing  # registers the rules of products with constant matrices
from ntk_adapters.infinite import primitives as _primitives  # noqa: F401  (registers the primitive rules)
from ntk_adapters.infinite import programs as _programs
from ntk_adapters.infinite import rules as _rules
from ntk_adapters.infinite.interpreter import Interpreter, RecordedCall, parameter
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.masks import InputConstant
from ntk_adapters.infinite.rules import EngineOptions, InfiniteWidthError
from ntk_adapters.infinite.values import Value, input_value, is_value
from ntk_adapters.inputs import check_pair, hashable_spec, leaves_with_names, spec
from ntk_adapters.model import Model, as_model
from ntk_adapters.outputs import normalize_get, pack
from ntk_adapters.precision import PrecisionLike, canonical, matmul_precision

__all__ = [
    "infinite_kernel_fn",
    "expand_outputs",
]


def expand_outputs(k: jax.Array, n_outputs: int) -> jax.Array:
    """The kernel over all outputs, ``K ⊗ I_O``: ``(N1, N2)`` → ``(N1, N2, O, O)``.

    Example::

      expand_outputs(kernel_fn(x1, x2, 'ntk'), 10).shape   # (N1, N2, 10, 10)
    """
    eye = jnp.eye(n_outputs, dtype=k.dtype)
    return k[..., None, None] * eye


# ----------------------------------------------------------------------------------------------
# Tracing.


def _trace(model: Model, x_struct):
    """The closed jaxpr of ``model.apply_fn(params, x)`` and the module calls recorded while tracing it."""
    calls: list[RecordedCall] = []
    recorder = _rules.load_framework(model.framework)

    def on_call(module, path, params_path, method_name):
        if method_name != "__call__":
            return None
        call = RecordedCall(
            index=len(calls), module=module, path=path, params_path=tuple(params_path), rule=_rules.lookup_rule(module)
        )
        calls.append(call)
        return _programs.module_tag(call.index)

    ctx = recorder(model, on_call) if recorder is not None else contextlib.nullcontext()

    def f(params, x):
        with ctx:
            return model.apply_fn(params, x)

    closed = jax.make_jaxpr(f)(model.params, x_struct)
    return closed, calls


def _input_leaf(a1: jax.Array, a2: Optional[jax.Array], layout: str, name: str) -> Union[Value, InputConstant]:
    """What the interpreter starts from for one input leaf (``name`` as in ``x['ids']``)."""
    dtype = a1.dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return input_value(a1, a2, layout, name)
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        return _masks.input_leaf(name, a1, a2)
    raise InfiniteWidthError(
        f"input leaf {name} has dtype {dtype}; the infinite-width engine takes float, integer and bool inputs"
    )


# ----------------------------------------------------------------------------------------------
# Layout choice.


def _needs_full(jaxpr, used_outputs=None, cache=None, constants=None) -> bool:
    """Whether an equation the outputs depend on pools over positions or mixes them with a constant
    matrix (needs the covariance between positions). ``constants``: the variables of ``jaxpr`` that
    hold constants of the model (its constant variables at the top level)."""
    cache = {} if cache is None else cache
    constants = set(jaxpr.constvars) if constants is None else set(constants)
    for e, used in _programs.liveness(jaxpr, used_outputs, cache).eqns:
        name = e.primitive.name
        if all(_programs.is_literal(v) or v in constants for v in e.invars):
            constants.update(e.outvars)  # computed from constants alone (jnp.eye(T), A / A.sum(0))
        if name in ("reduce_window_sum", "avg_pool"):
            return True
        if name in ("reduce_sum", "reduce_max", "argmax") and e.invars:
            nd = len(getattr(e.invars[0].aval, "shape", ()))
            axes = e.params.get("axes", ())
            if nd >= 3 and axes and 0 not in axes and (nd - 1) not in axes:
                return True
        if _mixing.mixes_positions(e, constants):
            return True
        sub = _programs.sub_jaxpr(e)
        if sub is not None:
            call = name in _programs.CALL_PRIMITIVES and len(used) == len(sub[0].outvars)
            inner = set(sub[0].constvars)
            if len(sub[0].invars) == len(e.invars):
                # a constant passed into a called program is a constant there too
                inner |= {v for v, o in zip(sub[0].invars, e.invars) if _programs.is_literal(o) or o in constants}
            if _needs_full(sub[0], used if call else None, cache, inner):
                return True
    return False


# ----------------------------------------------------------------------------------------------
# Public entry point.


class InfiniteKernelFn(Protocol):
    """What :func:`infinite_kernel_fn` returns: ``kernel_fn(x1, x2=None, get=('nngp', 'ntk'))``,
    with the adapted model it reads as ``kernel_fn.model``."""

    model: Model

    def __call__(self, x1: Any, x2: Any = None, get: Any = ("nngp", "ntk")) -> Any: ...


def infinite_kernel_fn(
    model: Union[Model, Callable],
    *,
    spatial_layout: str = "auto",
    weight_variance: Union[None, float, Mapping[str, float]] = None,
    bias_variance: Union[None, float, Mapping[str, float]] = None,
    n_points: int = _ew.DEFAULT_QUADRATURE_POINTS,
    jit: bool = True,
    check_finite_values: bool = True,
    attention: Literal["refuse", "infinite_heads"] = "refuse",
    attention_samples: int = 1024,
    seed: int = 0,
    precision: PrecisionLike = "highest",
) -> InfiniteKernelFn:
    """Exact infinite-width NNGP and NTK of an unchanged Flax / Haiku model.

    Inputs may be pytrees (tuple, dict) of arrays sharing the batch axis. Each float leaf is a
    deterministic input feature with its own kernel (``x·x'/C`` over its last axis), so branches
    that meet only through independent random layers (``Dense(a) + Dense(b)``) or a concatenation
    on the channel axis (``Dense(concatenate([a, b], -1))``) have exact kernels; combining two
    float leaves entry by entry (``a + b``, ``a * b``) is refused. Integer and bool leaves are
    passed to the model unchanged: masks computed from them (``tokens != 0``) may multiply values
    position by position (``h * mask[..., None]``, masked sums and means over positions), their
    conversion to floats reaching a layer is an input feature like a float leaf, every other use
    (embeddings of token ids) raises :class:`InfiniteWidthError` naming the leaf, and leaves the
    model does not use are ignored. Only the operations the output depends on are interpreted
    (the heads an ``output=`` selection drops never are).

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
      attention: the limit multi-head attention layers (``nn.MultiHeadDotProductAttention``,
        ``nn.SelfAttention``, ``nnx.MultiHeadAttention``, ``hk.MultiHeadAttention``) take. At a
        fixed number of heads none exists, so ``'refuse'`` (default) raises naming the layer;
        ``'infinite_heads'`` takes the number of heads to infinity with the width at the layer's
        own head dimension (:mod:`ntk_adapters.infinite.attention`): a Gaussian process whose
        kernel is an expectation over one head's random logits, estimated from
        ``attention_samples`` heads drawn from their exact Gaussian law. The kernel is then an
        estimate (positive semi-definite, error ∝ ``1/sqrt(attention_samples)``), ``x1`` and
        ``x2`` are evaluated together (one set of draws for every pair), and ``get`` may ask for
        ``'nngp_stderr'`` / ``'ntk_stderr'``.
      attention_samples: heads drawn per attention layer for ``attention='infinite_heads'``.
      seed: the seed of those draws (the same seed gives the same kernel).
      precision: of the matrix products behind the kernel (the input Grams ``x·x'/C``, the
        quadrature of elementwise functions, fixed arrays and attention), as for
        :func:`ntk_adapters.empirical_ntk_fn`: ``'highest'`` (default: full float32 also where
        a GPU would use TensorFloat-32), ``'high'``, ``'default'`` (JAX's own setting) or a
        :class:`jax.lax.Precision` (:mod:`ntk_adapters.precision`).

    Returns:
      ``kernel_fn(x1, x2=None, get=('nngp', 'ntk'))`` with ``x1`` an array ``(N1, *input_shape)``
      or a pytree of arrays ``(N1, ...)``, ``x2`` the same with ``N2`` examples (``None``:
      ``x2 = x1``); each float leaf of ``x2`` takes the dtype of its ``x1`` leaf, and the kernels
      are computed in the dtype of the float inputs (float32 inputs give float32 kernels). Each
      kernel is ``(N1, N2)`` per output unit (``(N1, N2, *spatial)`` for a model with spatial
      outputs); the kernel over all O outputs
      is ``K ⊗ I_O`` (:func:`expand_outputs`). ``get`` may also name ``'cov1'``, ``'cov2'`` (the
      per-input variances), ``'kernel'`` (the whole :class:`Kernel`) or, for a model whose
      kernel is estimated by sampling (``attention='infinite_heads'``), ``'nngp_stderr'`` /
      ``'ntk_stderr'``: standard errors of the NNGP / NTK entries from 8 independent batches of the
      samples (batch means; this evaluates the model 8 more times; zero when nothing is sampled).
      ``get`` must be static under an outer ``jit``.

    Raises:
      InfiniteWidthError: a layer or operation without exact rule (max pooling, attention,
        softmax, BatchNorm in training mode, embeddings, a nonlinearity after a post-activation
        residual, ...), naming the innermost layer and the operation (and the input leaf for
        integer inputs). Raised when the kernel function is built if the model records its input
        specs, else at the first call.
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
    if attention not in ("refuse", "infinite_heads"):
        raise ValueError(f"attention must be 'refuse' or 'infinite_heads'; got {attention!r}")
    if int(attention_samples) < _STDERR_BATCHES or int(attention_samples) != attention_samples:
        raise ValueError(f"attention_samples must be an integer >= {_STDERR_BATCHES}; got {attention_samples!r}")
    attention_samples = int(attention_samples)
    canonical(precision)
    if model.params is None:
        raise ValueError("infinite_kernel_fn needs a Model with params (their shapes give the layer widths)")
    cache: dict = {}

    def prepare(x_struct):
        key = hashable_spec(x_struct)
        if key not in cache:
            closed, calls = _trace(model, x_struct)
            layout = spatial_layout
            ruled = [c.rule for c in calls if c.rule is not None]
            if layout == "auto":
                full = any(r.full_layout for r in ruled) or _needs_full(closed.jaxpr)
                layout = "full" if full else "diagonal"
            sampled = attention != "refuse" and any(r.samples for r in ruled)
            cache[key] = (closed, calls, layout, sampled)
        return cache[key]

    def compute(x1, x2, key, n_samples, fields=None):
        # Traced in the context so that products without a precision of their own (the rules'
        # einsums, the quadrature, the model's operations on constants) get the requested one.
        with matmul_precision(precision):
            k = evaluate(x1, x2, key, n_samples)
        # Only the requested arrays leave the compiled function, so that the work for the others
        # (the per-input covariances, usually) is dropped from it.
        return k if fields is None else {f: getattr(k, f) for f in fields}

    def evaluate(x1, x2, key, n_samples):
        closed, calls, layout, sampled = prepare(spec(x1))
        if sampled and x2 is not None:
            # One set of draws for all examples: x1 and x2 are evaluated as one batch.
            n1 = jax.tree_util.tree_leaves(x1)[0].shape[0]
            both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
            return _split(evaluate(both, None, key, n_samples), n1)
        leaves1, treedef = jax.tree_util.tree_flatten(x1)
        leaves2 = [None] * len(leaves1) if x2 is None else treedef.flatten_up_to(x2)
        names = [name for name, _ in leaves_with_names(x1, "x")]
        options = EngineOptions(
            weight_variance,
            bias_variance,
            layout,
            n_points,
            attention=attention,
            attention_samples=n_samples,
            key=key if sampled else None,
        )
        interp = Interpreter(
            calls, model.params, options, batch=leaves1[0].shape[0], initializers=model.info.get("param_initializers")
        )
        inputs = [_input_leaf(a1, a2, layout, name) for a1, a2, name in zip(leaves1, leaves2, names)]
        params = jax.tree_util.tree_flatten_with_path(model.params)[0]
        args = [parameter(p, _key_path(path)) for path, p in params] + inputs
        if len(closed.jaxpr.invars) != len(args):
            raise InfiniteWidthError("the traced model has an unexpected signature")
        consts = [c for c in closed.consts]
        (out,) = interp.run(closed.jaxpr, consts, args)
        if isinstance(out, InputConstant):
            raise InfiniteWidthError(
                f"the model returns {out.describe()}, a function of its integer inputs alone, which has no kernel"
            )
        if not is_value(out):
            raise InfiniteWidthError("the model's output does not depend on its input")
        out = interp.context().materialize(out)
        return _layers.flatten(out.kernel) if out.flat else out.kernel

    compute_jit = jax.jit(compute, static_argnums=(3, 4)) if jit else compute
    base_key = jax.random.PRNGKey(seed)
    example = _example_spec(model)
    if example is not None:
        # Interpret the model once now, so that a layer without a rule is reported here and not at
        # the first evaluation. The recorded dtypes matter: integer leaves must reach the model as
        # integers (an embedding refuses floats).
        jax.eval_shape(
            lambda x, key: compute(x, None, key, attention_samples),
            jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((2,) + tuple(s.shape), s.dtype), example),
            base_key,
        )

    def kernel_fn(x1, x2=None, get=("nngp", "ntk")):
        check_pair(x1, x2)
        x1 = jax.tree_util.tree_map(_as_array, x1)
        if x2 is not None:
            x2 = _like(x1, x2)
        if check_finite_values:
            check_finite(x1, "x1", x2, "x2")
        names, _ = normalize_get(get, _GET_NAMES)
        stderr = "nngp_stderr" in names or "ntk_stderr" in names
        if "kernel" in names:
            k = compute_jit(x1, x2, base_key, attention_samples, None)
            values = {"nngp": k.nngp, "ntk": k.ntk, "cov1": k.cov1, "cov2": k.cov2, "kernel": k}
        else:
            fields = tuple(f for f in _KERNEL_FIELDS if f in names or (stderr and f in ("nngp", "ntk")))
            values = compute_jit(x1, x2, base_key, attention_samples, fields)
        if stderr:
            values["nngp_stderr"], values["ntk_stderr"] = _standard_errors(
                compute_jit, x1, x2, base_key, attention_samples, values, sampled=prepare(spec(x1))[3]
            )
        return pack(get, values, allowed=_GET_NAMES)

    typed = cast(InfiniteKernelFn, kernel_fn)
    typed.model = model
    return typed


_KERNEL_FIELDS = ("nngp", "ntk", "cov1", "cov2")
_GET_NAMES = (*_KERNEL_FIELDS, "kernel", "nngp_stderr", "ntk_stderr")

#: Independent batches of the samples behind the standard errors of a sampled kernel.
_STDERR_BATCHES = 8


def _split(k: Kernel, n1: int) -> Kernel:
    """The ``(x1, x2)`` blocks of the kernel of the joint batch ``x1 ++ x2`` (``n1`` rows of ``x1``)."""
    return k.replace(
        nngp=k.nngp[:n1, n1:],
        ntk=None if k.ntk is None else k.ntk[:n1, n1:],
        cov1=k.cov1[:n1],
        cov2=k.cov2[n1:],
        same_inputs=False,
    )


def _standard_errors(compute, x1, x2, key, n_samples: int, k: dict, *, sampled: bool):
    """Standard errors of the NNGP and NTK entries of a sampled kernel, by batch means: the kernel from
    each of ``_STDERR_BATCHES`` independent batches of ``n_samples / _STDERR_BATCHES`` draws; the spread
    of their mean estimates that of the kernel from ``n_samples`` draws. ``k`` holds the ``'nngp'`` and
    ``'ntk'`` already computed from all draws (their shapes serve when nothing is sampled: the errors
    are zero)."""
    if not sampled:
        return jnp.zeros_like(k["nngp"]), None if k["ntk"] is None else jnp.zeros_like(k["ntk"])
    keys = jax.random.split(jax.random.fold_in(key, 1), _STDERR_BATCHES)
    batches = [compute(x1, x2, kb, n_samples // _STDERR_BATCHES, ("nngp", "ntk")) for kb in keys]

    def stderr(field):
        if batches[0][field] is None:
            return None
        stacked = jnp.stack([b[field] for b in batches])
        return jnp.std(stacked, axis=0, ddof=1) / np.sqrt(_STDERR_BATCHES)

    return stderr("nngp"), stderr("ntk")


def _key_path(path) -> tuple:
    """A pytree key path as plain keys: ``(DictKey('language_model'), DictKey('pos'))`` →
    ``('language_model', 'pos')``."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


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
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(tuple(s), dtype), model.input_shape, is_leaf=is_shape)


def _as_array(a):
    return a if isinstance(a, jax.Array) else jnp.asarray(a)


def _like(x1, x2):
    """``x2`` with every leaf as an array of its ``x1`` leaf's dtype (``x1`` and ``x2`` already have the
    same structure). Float values are not silently truncated into an integer leaf."""
    named1 = leaves_with_names(x1, "x1")
    leaves2, treedef = jax.tree_util.tree_flatten(x2)
    out = []
    for (name, a), b in zip(named1, leaves2):
        if isinstance(b, jax.Array) and b.dtype == a.dtype:  # the common case, without a copy
            out.append(b)
            continue
        b = jnp.asarray(b)
        if not jnp.issubdtype(a.dtype, jnp.inexact) and jnp.issubdtype(b.dtype, jnp.inexact):
            raise ValueError(
                f"{name} is {a.dtype} but its x2 counterpart is {b.dtype}; pass the same kind of "
                "values (integer, bool or float) for each input in x1 and x2"
            )
        out.append(b.astype(a.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

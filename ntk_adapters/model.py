"""The common signature every tool in the library works on.

A :class:`Model` is a pure function ``apply_fn(params, x, **kwargs) -> y`` together with the
trainable parameters it was adapted with and, when known, a way to draw fresh ones. Framework
adapters (``ntk_adapters.flax``, ``ntk_adapters.haiku``) build Models; everything else in the
library consumes them and never imports a framework.

Shapes: ``x`` carries the batch on axis 0, ``(N, *input_shape)``: an array, or a pytree (tuple,
dict) of arrays sharing that axis, such as ``(tokens, lengths)``; ``y`` is an array
``(N, *output_shape)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ApplyFn = Callable[..., jax.Array]
InitFn = Callable[[jax.Array, jax.Array], PyTree]


@dataclasses.dataclass(frozen=True)
class Model:
    """A model in the library's common signature.

    Attributes:
      apply_fn: ``apply_fn(params, x, **kwargs) -> y`` with ``x`` of shape ``(N, *input_shape)``
        and ``y`` of shape ``(N, *output_shape)``. Pure and ``jit``-friendly; everything that is
        not trainable (batch statistics, constants, rngs of stochastic layers) is closed over.
      params: the trainable parameters only (a pytree of arrays).
      init_fn: ``init_fn(key, x) -> params`` drawing fresh parameters with the same structure as
        ``params`` from the model's own initializers, or ``None`` when the adapter cannot.
      input_shape: the per-example input shape seen when adapting (a pytree of shapes for pytree
        inputs), or ``None``.
      output_shape: the per-example output shape seen when adapting, or ``None``.
      framework: ``'flax.linen'``, ``'flax.nnx'``, ``'haiku'`` or ``'function'``.
      module: the user's object (linen Module, NNX graph definition, ``hk.Transformed``, or the
        function), for tools that inspect the architecture.
      info: adapter-specific details (other variable collections, call kwargs, the method, ...).
      input_spec: per-example ``jax.ShapeDtypeStruct`` of the input seen when adapting (a pytree
        like ``x``; integer dtypes kept), or ``None``.

    A Model is callable: ``model(params, x)`` is ``model.apply_fn(params, x)``.

    Example::

      model = ntk_adapters.adapt(lambda p, x: jnp.tanh(x @ p['w']), {'w': w})
      y = model(model.params, x)        # (N, O)
    """

    apply_fn: ApplyFn
    params: PyTree
    init_fn: Optional[InitFn] = None
    input_shape: Optional[tuple[int, ...]] = None
    output_shape: Optional[tuple[int, ...]] = None
    framework: str = "function"
    module: Any = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_spec: Any = None

    def __call__(self, params: PyTree, x: jax.Array, **kwargs: Any) -> jax.Array:
        return self.apply_fn(params, x, **kwargs)

    def replace(self, **changes: Any) -> "Model":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def init(self, key: jax.Array, x: Optional[jax.Array] = None) -> PyTree:
        """Fresh parameters from the model's initializers.

        Args:
          key: a PRNG key.
          x: an input batch ``(N, *input_shape)``; defaults to one zero example of the adapted
            input's shapes and dtypes.
        """
        if self.init_fn is None:
            raise ValueError(
                f"this {self.framework} model has no init_fn, so fresh parameters cannot be drawn; "
                "pass init_fn=... to ntk_adapters.adapt, or adapt the model through "
                "ntk_adapters.flax / ntk_adapters.haiku which know its initializers"
            )
        if x is None:
            if self.input_spec is None:
                raise ValueError("Model.init needs x: the model does not record its input shape")
            x = jax.tree_util.tree_map(lambda s: jnp.zeros((1,) + tuple(s.shape), s.dtype), self.input_spec)
        return self.init_fn(key, x)


ModelLike = Union[Model, ApplyFn]


def adapt(
    apply_fn: ApplyFn,
    params: PyTree,
    sample_x: Optional[jax.Array] = None,
    *,
    init_fn: Optional[InitFn] = None,
) -> Model:
    """Wrap a plain ``f(params, x) -> y`` as a :class:`Model`.

    Args:
      apply_fn: ``f(params, x, **kwargs)`` returning an array ``(N, *output_shape)``; ``x`` is an
        array or a pytree of arrays sharing the batch axis.
      params: the trainable parameters.
      sample_x: optional input batch ``(N, *input_shape)``; when given, the output is checked to
        be an array and the shapes are recorded.
      init_fn: optional ``init_fn(key, x) -> params`` for Monte Carlo over initializations.

    Example::

      model = ntk_adapters.adapt(lambda p, x: x @ p['w'], {'w': jnp.ones((3, 2))}, jnp.ones((4, 3)))
      model.output_shape   # (2,)
    """
    if isinstance(apply_fn, Model):
        return apply_fn
    _refuse_framework_object(apply_fn)
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable as apply_fn(params, x); got {type(apply_fn).__name__}")
    if sample_x is not None:
        return traced_model(apply_fn, params, sample_x, where="apply_fn", init_fn=init_fn)
    return Model(apply_fn=apply_fn, params=params, init_fn=init_fn, module=apply_fn)


def traced_model(
    apply_fn: ApplyFn,
    params: PyTree,
    sample_x: jax.Array,
    *,
    where: str,
    init_fn: Optional[InitFn] = None,
    framework: str = "function",
    module: Any = None,
    info: Optional[Mapping[str, Any]] = None,
) -> Model:
    """A Model whose shapes come from tracing ``apply_fn(params, sample_x)`` (nothing is computed).

    ``where`` names the user's function in the error raised when it does not return one array.
    """
    from ntk_adapters.inputs import example_spec, num_examples

    num_examples(sample_x, "sample_x")
    out = check_array_output(jax.eval_shape(apply_fn, params, sample_x), where)
    per_example = example_spec(sample_x)
    shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), per_example)
    return Model(
        apply_fn=apply_fn,
        params=params,
        init_fn=init_fn,
        input_shape=shapes,
        input_spec=per_example,
        output_shape=tuple(out.shape[1:]),
        framework=framework,
        module=apply_fn if module is None else module,
        info=dict(info or {}),
    )


def _refuse_framework_object(obj: Any) -> None:
    """Point users who pass a Flax module or Haiku transform to the adapter that knows it."""
    modules = {getattr(c, "__module__", "") or "" for c in type(obj).__mro__}
    if any(m.startswith(("flax.linen", "flax.nnx", "flax.core")) for m in modules):
        raise TypeError(
            f"ntk_adapters.adapt got a Flax module ({type(obj).__name__}); Flax modules are adapted with "
            "ntk_adapters.flax.adapt(module, variables, sample_x) (variables=None for NNX modules)"
        )
    if any(m.startswith("haiku") for m in modules):
        raise TypeError(
            f"ntk_adapters.adapt got a Haiku {type(obj).__name__}; transformed functions are adapted with "
            "ntk_adapters.haiku.adapt(transformed, params, sample_x)"
        )


def as_model(f: ModelLike, params: Optional[PyTree] = None) -> Model:
    """Accept a Model, or an ``apply_fn`` with its params, and return a Model."""
    if isinstance(f, Model):
        if params is not None:
            return f.replace(params=params)
        return f
    _refuse_framework_object(f)
    if callable(f):
        return Model(apply_fn=f, params=params, framework="function", module=f)
    raise TypeError(
        f"expected an ntk_adapters.Model or a function f(params, x); got {type(f).__name__}. "
        "Use ntk_adapters.flax.adapt or ntk_adapters.haiku.adapt to wrap a framework model."
    )


def check_array_output(out: Any, what: str) -> Any:
    """Raise a clear error unless ``out`` (an array or ShapeDtypeStruct) is a single array."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype") or isinstance(out, (tuple, list, dict)):
        structure = jax.tree_util.tree_structure(out)
        raise TypeError(
            f"{what} must return a single array of shape (N, ...), but it returned {structure}. "
            "Pick one output with the adapter's output= selector (an index, a key, or a function)."
        )
    if len(out.shape) < 1:
        raise TypeError(f"{what} returned a scalar; it must return an array of shape (N, ...) with the batch on axis 0")
    return out


def check_params_match(reference: PyTree, params: PyTree, what: str = "params") -> None:
    """Raise a clear error when ``params`` differs from ``reference`` in structure or leaf shapes."""
    if reference is None or params is None:
        return
    ref_def = jax.tree_util.tree_structure(reference)
    got_def = jax.tree_util.tree_structure(params)
    if ref_def != got_def:  # type: ignore[operator]  # PyTreeDef's stub is unresolved; it defines ==
        raise ValueError(
            f"{what} do not match the model: expected the tree structure\n  {ref_def}\nbut got\n  {got_def}"
        )
    ref_leaves = jax.tree_util.tree_leaves_with_path(reference)
    got_leaves = jax.tree_util.tree_leaves(params)
    for (path, ref), got in zip(ref_leaves, got_leaves):
        if np.shape(ref) != np.shape(got):
            raise ValueError(
                f"{what} do not match the model: leaf {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(got)}, the model expects {np.shape(ref)}"
            )


def module_path(path: tuple) -> str:
    """Render a pytree key path as a ``/``-separated module path (``Dense_0/kernel``)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)

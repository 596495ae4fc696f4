"""Infinite-width support for Flax NNX models, registered on import.

NNX differs from linen in two ways the engine cares about:

* there is no method interceptor, so module calls are recorded by wrapping the ``__call__`` of
  the model's own module classes for the duration of the trace, each call running under a
  ``jax.named_scope`` tag like linen's;
* layers do not keep their initializers after construction (``nnx.Linear`` stores its kernel,
  not ``kernel_init``), yet the exact weight variance must come from the initializer. The model's
  ``init=`` factory (``ntk_adapters.flax.adapt(module, None, x, init=lambda rngs: MLP(rngs))``) is
  therefore run once while the constructors of the NNX layers record the initializers they were
  given (defaults included); that template supplies each layer's configuration and initializers,
  and the rules are the linen ones (NNX layers use the same attribute names).

Without ``init=``, a layer whose rule needs an initializer is an error saying so.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from ntk_adapters.flax import rules as _linen_rules
from ntk_adapters.infinite import attention as _attention
from ntk_adapters.infinite import rules as _rules

# The NNX layers with a rule, and the constructor arguments naming their initializers.
_INITIALIZER_ARGS = {
    nnx.Linear: ("kernel_init", "bias_init"),
    nnx.Conv: ("kernel_init", "bias_init"),
    nnx.LayerNorm: ("scale_init", "bias_init"),
    nnx.BatchNorm: ("scale_init", "bias_init"),
    nnx.Embed: ("embedding_init",),
    nnx.MultiHeadAttention: ("kernel_init", "out_kernel_init", "bias_init", "out_bias_init"),
}


class _MissingInitializer:
    """Stands in for an initializer the engine could not learn; reading it is an error."""

    def __init__(self, layer: str):
        self.layer = layer

    def __repr__(self) -> str:
        return f"<initializer of NNX layer {self.layer} (unknown: adapt the model with init=...)>"


@contextlib.contextmanager
def _recording_initializers() -> Iterator[None]:
    """While active, NNX layers built here remember the initializers they were given."""
    originals = {cls: cls.__init__ for cls in _INITIALIZER_ARGS}

    def patched(cls, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            original(self, *args, **kwargs)
            for name in _INITIALIZER_ARGS[cls]:
                setattr(self, name, bound.arguments[name])

        return __init__

    try:
        for cls, original in originals.items():
            cls.__init__ = patched(cls, original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__init__ = original


def _template(model) -> Any:
    """The model rebuilt by its ``init=`` factory with initializers recorded, or ``None``."""
    factory = model.info.get("init")
    if factory is None:
        return None
    with _recording_initializers():
        template = factory(nnx.Rngs(0))
    got = jax.tree_util.tree_map(np.shape, nnx.to_pure_dict(nnx.split(template, nnx.Param, ...)[1]))
    want = jax.tree_util.tree_map(np.shape, model.params)
    if got != want:
        raise ValueError(
            "the init= factory of this NNX model builds a different architecture than the module that "
            f"was adapted (parameter shapes {got} vs {want}); pass a factory of the same model"
        )
    return template


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


@contextlib.contextmanager
def _record(model, on_call) -> Iterator[None]:
    template = _template(model)
    configured = dict(template.iter_modules()) if template is not None else None
    classes = {
        cls
        for _, sub in model.module.iter_modules()
        for cls in type(sub).__mro__
        if "__call__" in vars(cls) and issubclass(cls, nnx.Module)
    }
    # The model is rebuilt (nnx.merge) inside apply_fn, so calls are matched to paths by identity,
    # starting from whichever module is called first (the root).
    paths: dict[int, tuple] = {}

    def described(module, path):
        """The module the rule reads: the template's layer, or this call's with unknown initializers."""
        if configured is not None:
            return configured.get(path, module)
        for name in _INITIALIZER_ARGS.get(type(module), ()):
            # ``module`` was built by nnx.merge inside this trace: marking it touches nothing of the user's.
            setattr(module, name, _MissingInitializer(_path_str(path) or type(module).__name__))
        return module

    def wrap(original):
        @functools.wraps(original)
        def __call__(self, *args, **kwargs):
            root = not paths
            if root:
                paths.update({id(sub): path for path, sub in self.iter_modules()})
            try:
                path = paths.get(id(self))
                if path is None:
                    return original(self, *args, **kwargs)
                tag = on_call(described(self, path), _path_str(path) or type(self).__name__, path, "__call__")
                if tag is None:
                    return original(self, *args, **kwargs)
                with jax.named_scope(tag):
                    return original(self, *args, **kwargs)
            finally:
                if root:
                    paths.clear()

        return __call__

    originals = {cls: vars(cls)["__call__"] for cls in classes}
    try:
        for cls, original in originals.items():
            cls.__call__ = wrap(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


_rules.register_framework("flax.nnx", _record)
_rules.register_rule(nnx.Linear, _linen_rules._dense, linear=True, flat="average")
_rules.register_rule(nnx.Conv, _linen_rules._conv, linear=True)
_rules.register_rule(nnx.LayerNorm, _linen_rules._layer_norm)
_rules.register_rule(nnx.Dropout, _linen_rules._dropout)
_rules.register_rule(nnx.BatchNorm, _linen_rules._batch_norm)
_rules.register_rule(nnx.Embed, _linen_rules._embed, linear=True, integer_input=True)
_attention.register_attention_rule(
    nnx.MultiHeadAttention, _linen_rules._attention_rule, _linen_rules._attention_precheck
)

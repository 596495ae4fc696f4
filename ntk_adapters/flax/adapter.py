"""Flax linen and NNX modules as :class:`ntk_adapters.Model` values."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import jax
from flax import linen as nn
from flax import nnx

from ntk_adapters.model import Model, PyTree, traced_model
from ntk_adapters.selectors import OutputSelector, describe, select_output


def adapt(
    module: Union[nn.Module, nnx.Module],
    variables: Optional[Mapping[str, Any]],
    sample_x: jax.Array,
    **kwargs: Any,
) -> Model:
    """Turn a Flax module into a :class:`~ntk_adapters.Model` ``(params, x) -> y``.

    Dispatches to :func:`adapt_linen` for ``flax.linen`` modules and to :func:`adapt_nnx` for NNX
    modules (for which ``variables`` must be ``None``: an NNX module holds its own state).

    Example::

      model = ntk_adapters.flax.adapt(MLP(), variables, x)   # x: (N, D)
      model.output_shape                                    # (O,)
    """
    if isinstance(module, nnx.Module):
        if variables is not None:
            raise ValueError(
                "variables must be None for an NNX module (it holds its own parameters); "
                f"got {type(variables).__name__}"
            )
        return adapt_nnx(module, sample_x, **kwargs)
    if isinstance(module, nn.Module):
        return adapt_linen(module, variables, sample_x, **kwargs)
    raise TypeError(
        f"ntk_adapters.flax.adapt expects a flax.linen.Module or a flax.nnx.Module; got {type(module).__name__}. "
        "For a plain function f(params, x) use ntk_adapters.adapt."
    )


def _stream_keys(key: jax.Array, names) -> dict[str, jax.Array]:
    return {name: jax.random.fold_in(key, i + 1) for i, name in enumerate(sorted(names))}


def adapt_linen(
    module: nn.Module,
    variables: Optional[Mapping[str, Any]],
    sample_x: jax.Array,
    *,
    method: Union[str, Callable, None] = None,
    rngs: Optional[Mapping[str, jax.Array]] = None,
    output: OutputSelector = None,
    key: Optional[jax.Array] = None,
    mutable: Union[bool, str, list] = False,
    **call_kwargs: Any,
) -> Model:
    """Adapt a ``flax.linen`` module.

    Args:
      module: the linen module.
      variables: what ``module.init`` returned (a dict with a ``'params'`` collection), or ``None``
        to initialize with ``key``.
      sample_x: an input batch ``(N, *input_shape)``, used to check the module and record shapes.
      method: the module method to call (name or function), as for ``module.apply``.
      rngs: PRNG keys for stochastic layers, e.g. ``{'dropout': key}``. They are closed over, so
        every evaluation uses the same random draw (the kernel of one fixed mask).
      output: picks one array when the module returns a tuple, dict or dataclass: an index, a key
        or a function of the output.
      key: PRNG key used when ``variables`` is ``None`` (default ``PRNGKey(0)``).
      mutable: passed to ``module.apply`` for modules that update collections (BatchNorm in
        training mode); the updated collections are discarded.
      **call_kwargs: fixed keyword arguments of every call, e.g. ``train=False``.

    Returns:
      A Model whose ``params`` is ``variables['params']``; every other collection
      (``batch_stats``, ...) is closed over and not differentiated. ``init_fn(key, x)`` draws fresh
      params with the module's own initializers.

    Example::

      variables = MLP().init(jax.random.PRNGKey(0), x)
      model = ntk_adapters.flax.adapt(MLP(), variables, x)
      y = model(model.params, x)                  # (N, O)
    """
    rngs = dict(rngs or {})
    if variables is None:
        key = jax.random.PRNGKey(0) if key is None else key
        variables = module.init(
            {"params": key, **_stream_keys(key, rngs)}, sample_x, method=method, **call_kwargs
        )
    if not isinstance(variables, Mapping) or "params" not in variables:
        found = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            f"variables of {type(module).__name__} must be what module.init returned, a dict with a "
            f"'params' collection; got {found}. If you hold only the parameters, pass {{'params': params}}."
        )
    params = variables["params"]
    rest = {name: value for name, value in variables.items() if name != "params"}
    where = f"{type(module).__name__}.{_method_name(method)}{describe(output)}"

    def apply_fn(params: PyTree, x: jax.Array, **kwargs: Any) -> jax.Array:
        out = module.apply(
            {"params": params, **rest}, x, method=method, rngs=rngs or None, mutable=mutable,
            **call_kwargs, **kwargs,
        )
        if mutable is not False:
            out = out[0]
        return select_output(out, output, where)

    def init_fn(key: jax.Array, x: jax.Array) -> PyTree:
        fresh = module.init({"params": key, **_stream_keys(key, rngs)}, x, method=method, **call_kwargs)
        return fresh["params"]

    return traced_model(
        apply_fn, params, sample_x, where=where, init_fn=init_fn, framework="flax.linen", module=module,
        info={"variables": rest, "method": method, "call_kwargs": call_kwargs, "rngs": rngs,
              "output": output, "mutable": mutable},
    )


def adapt_nnx(
    module: nnx.Module,
    sample_x: jax.Array,
    *,
    init: Optional[Callable[[nnx.Rngs], nnx.Module]] = None,
    output: OutputSelector = None,
    **call_kwargs: Any,
) -> Model:
    """Adapt a ``flax.nnx`` module.

    The module is split with ``nnx.split(module, nnx.Param, ...)``: the ``nnx.Param`` variables
    become ``params`` (a plain nested dict of arrays); everything else (batch statistics, rng
    state) is closed over. Put the module in the mode you want first (``module.eval()``).

    Args:
      module: the NNX module.
      sample_x: an input batch ``(N, *input_shape)``.
      init: optional ``init(rngs) -> module`` building a fresh module of the same architecture
        (e.g. ``lambda rngs: MLP(rngs=rngs)``); it provides ``init_fn`` for Monte Carlo over
        initializations. Without it the Model has no ``init_fn``.
      output: picks one array of a tuple/dict/dataclass output.
      **call_kwargs: fixed keyword arguments of every call.

    Example::

      model = ntk_adapters.flax.adapt(MLP(rngs=nnx.Rngs(0)), None, x,
                                      init=lambda rngs: MLP(rngs=rngs))
    """
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    where = f"{type(module).__name__}.__call__{describe(output)}"

    def apply_fn(params: PyTree, x: jax.Array, **kwargs: Any) -> jax.Array:
        # replace_by_pure_dict writes into its argument, so fill a fresh copy of the template.
        state = jax.tree_util.tree_map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, params)
        out = nnx.merge(graphdef, state, rest)(x, **call_kwargs, **kwargs)
        return select_output(out, output, where)

    init_fn = None
    if init is not None:
        def init_fn(key: jax.Array, x: jax.Array) -> PyTree:
            del x  # NNX modules are built from their constructor arguments, not from an input
            return nnx.to_pure_dict(nnx.split(init(nnx.Rngs(key)), nnx.Param, ...)[1])

    return traced_model(
        apply_fn, params, sample_x, where=where, init_fn=init_fn, framework="flax.nnx", module=module,
        info={"graphdef": graphdef, "variables": rest, "call_kwargs": call_kwargs, "output": output,
              "init": init},
    )


def _method_name(method) -> str:
    if method is None:
        return "__call__"
    return method if isinstance(method, str) else getattr(method, "__name__", repr(method))

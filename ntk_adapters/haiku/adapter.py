"""Haiku transformed functions as :class:`ntk_adapters.Model` values."""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import haiku as hk
import jax

from ntk_adapters.inputs import Inputs, check_inputs_mode, spread
from ntk_adapters.model import Model, PyTree, traced_model
from ntk_adapters.selectors import OutputSelector, describe, select_output


def _takes_rng(apply) -> bool:
    # hk.without_apply_rng drops the rng argument from apply's signature.
    try:
        return "rng" in inspect.signature(apply).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return True


def _record_initializers(initialize, sample_x) -> dict:
    """``{(module_name, name): init}`` for every parameter ``params[module_name][name]`` the function
    creates, read by running its ``init`` abstractly (``jax.eval_shape``: nothing is computed) under a
    parameter creator. Empty when that cannot be done (the creator API is Haiku's own)."""
    try:
        from haiku._src.base import custom_creator_unsafe
    except ImportError:  # pragma: no cover - depends on Haiku's internals
        return {}
    found: dict = {}

    def creator(next_creator, shape, dtype, init, context):
        found[(context.module_name, context.name)] = init
        return next_creator(shape, dtype, init)

    try:
        with custom_creator_unsafe(creator):
            jax.eval_shape(initialize, jax.random.PRNGKey(0), sample_x)
    except Exception:  # recording is best effort: the model works without it
        return {}
    return found


def adapt(
    transformed: Union[hk.Transformed, hk.TransformedWithState],
    params: Optional[PyTree],
    sample_x: PyTree,
    *,
    state: Optional[PyTree] = None,
    rng: Optional[jax.Array] = None,
    output: OutputSelector = None,
    key: Optional[jax.Array] = None,
    init_kwargs: Optional[dict] = None,
    inputs: Inputs = "one",
    **call_kwargs: Any,
) -> Model:
    """Turn a Haiku transformed function into a :class:`~ntk_adapters.Model` ``(params, x) -> y``.

    Args:
      transformed: the result of ``hk.transform`` / ``hk.transform_with_state`` (optionally
        wrapped in ``hk.without_apply_rng``).
      params: parameters from ``transformed.init``, or ``None`` to initialize with ``key``.
      sample_x: an input batch: an array ``(N, *input_shape)``, or with ``inputs='args'`` /
        ``'kwargs'`` a tuple / dict of arrays sharing the batch axis ``N``.
      state: the state of a ``transform_with_state`` function (e.g. BatchNorm statistics); it is
        closed over and the updated state is discarded. Initialized with ``params`` when ``None``.
      rng: PRNG key passed to ``apply`` for functions that draw random numbers (``hk.dropout``);
        it is closed over, so every call sees the same draw.
      output: picks one array of a tuple/dict output: an index, a key or a function.
      key: PRNG key used when ``params`` is ``None`` (default ``PRNGKey(0)``).
      init_kwargs: keyword arguments for ``transformed.init`` (default: ``call_kwargs``). Haiku's
        BatchNorm, for one, must be initialized with ``is_training=True`` even when it is applied
        with ``is_training=False``: ``adapt(f, params, x, state=state, is_training=False,
        init_kwargs={'is_training': True})``.
      inputs: how ``x`` reaches the function. ``'one'`` (default): ``x`` (any pytree) is its single
        input, ``apply(params, [state], [rng], x)``. ``'args'``: ``x`` is a tuple or list spread as
        positional arguments, ``apply(params, [state], [rng], *x)``, e.g. ``x = (tokens,
        lengths)`` with ``tokens (N, T)`` int and ``lengths (N,)``. ``'kwargs'``: ``x`` is a dict
        spread as keyword arguments. ``init`` (and ``init_fn``) spread ``x`` the same way. Integer
        leaves (token ids) are passed unchanged.
      **call_kwargs: fixed keyword arguments of every call, e.g. ``is_training=False``.

    Returns:
      A Model with ``init_fn(key, x)`` drawing fresh parameters from the function's initializers.

    Example::

      net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([64, 10])(x)))
      model = ntk_adapters.haiku.adapt(net, None, x)     # x: (N, D)
      y = model(model.params, x)                         # (N, 10)

      clf = hk.transform(lambda tokens, lengths: Classifier()(tokens, lengths))
      model = ntk_adapters.haiku.adapt(clf, None, (tokens, lengths), inputs='args')
    """
    if not isinstance(transformed, (hk.Transformed, hk.TransformedWithState)):
        raise TypeError(
            "ntk_adapters.haiku.adapt expects the result of hk.transform or hk.transform_with_state; "
            f"got {type(transformed).__name__}. For a plain function f(params, x) use ntk_adapters.adapt."
        )
    check_inputs_mode(inputs, sample_x, "sample_x")
    with_state = isinstance(transformed, hk.TransformedWithState)
    init_kwargs = call_kwargs if init_kwargs is None else dict(init_kwargs)
    takes_rng = _takes_rng(transformed.apply)

    def initialize(key: jax.Array, x: PyTree) -> Any:
        args, kwargs = spread(inputs, x, init_kwargs)
        try:
            return transformed.init(key, *args, **kwargs)
        except ValueError as err:
            # Haiku's message when a layer reads state that init never created (hk.get_state
            # without an initializer), as hk.BatchNorm does when it is not training.
            if "perhaps set an init function" not in str(err):
                raise
            raise ValueError(
                f"initializing the Haiku function with the keyword arguments {init_kwargs!r} failed "
                f"({err}): a layer read state that only its training mode creates (hk.BatchNorm with "
                "is_training=False does): pass init_kwargs={'is_training': True} (the arguments init "
                "runs with) to ntk_adapters.haiku.adapt; the call keywords stay those of every apply"
            ) from err

    if params is None:
        key = jax.random.PRNGKey(0) if key is None else key
        initial = initialize(key, sample_x)
        params, initial_state = initial if with_state else (initial, None)
        if with_state and state is None:
            state = initial_state
    elif with_state and state is None:
        raise ValueError(
            "this function was transformed with hk.transform_with_state, so it needs its state: "
            "pass state=... (the second value returned by init) to ntk_adapters.haiku.adapt"
        )
    where = f"the Haiku function{describe(output)}"

    def apply_fn(params: PyTree, x: PyTree, **kwargs: Any) -> jax.Array:
        check_inputs_mode(inputs, x, "x")
        args, kw = spread(inputs, x, {**call_kwargs, **kwargs})
        leading = ((state,) if with_state else ()) + ((rng,) if takes_rng else ())
        out = transformed.apply(params, *leading, *args, **kw)
        if with_state:
            out = out[0]
        return select_output(out, output, where)

    def init_fn(key: jax.Array, x: PyTree) -> PyTree:
        fresh = initialize(key, x)
        return fresh[0] if with_state else fresh

    info = {
        "state": state,
        "rng": rng,
        "call_kwargs": call_kwargs,
        "output": output,
        "with_state": with_state,
        "inputs": inputs,
        "param_initializers": _record_initializers(initialize, sample_x),
    }
    try:
        return traced_model(
            apply_fn, params, sample_x, where=where, init_fn=init_fn, framework="haiku", module=transformed, info=info
        )
    except ValueError as err:
        # Haiku's MissingRNGError (a ValueError) is not part of its public API.
        if type(err).__name__ != "MissingRNGError":
            raise
        raise ValueError(
            "the Haiku function draws random numbers (hk.next_rng_key, e.g. hk.dropout) but no rng was "
            "given: pass rng=jax.random.PRNGKey(...) to ntk_adapters.haiku.adapt, or make it "
            "deterministic (e.g. is_training=False)"
        ) from err

"""Flax linen and NNX modules as :class:`ntk_adapters.Model` values."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx, traverse_util

from ntk_adapters.inputs import Inputs, check_inputs_mode, spread
from ntk_adapters.model import Model, PyTree, traced_model
from ntk_adapters.selectors import OutputSelector, describe, select_output

AxisName = Union[str, Sequence[str], None]


def adapt(
    module: Union[nn.Module, nnx.Module],
    variables: Optional[Mapping[str, Any]],
    sample_x: PyTree,
    **kwargs: Any,
) -> Model:
    """Turn a Flax module into a :class:`~ntk_adapters.Model` ``(params, x) -> y``.

    Dispatches to :func:`adapt_linen` for ``flax.linen`` modules and to :func:`adapt_nnx` for NNX
    modules (for which ``variables`` must be ``None``: an NNX module holds its own state). Keywords
    common to both: ``output``, ``inputs`` (``'one'``, ``'args'`` or ``'kwargs'``: how ``x`` is
    passed to the module), ``axis_name``.

    Example::

      model = ntk_adapters.flax.adapt(MLP(), variables, x)   # x: (N, D)
      model.output_shape                                    # (O,)
      clf = ntk_adapters.flax.adapt(Classifier(), None, (tokens, lengths), inputs='args')
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
    sample_x: PyTree,
    *,
    method: Union[str, Callable, None] = None,
    rngs: Optional[Mapping[str, jax.Array]] = None,
    output: OutputSelector = None,
    key: Optional[jax.Array] = None,
    mutable: Union[bool, str, list] = False,
    inputs: Inputs = "one",
    axis_name: AxisName = None,
    **call_kwargs: Any,
) -> Model:
    """Adapt a ``flax.linen`` module.

    Args:
      module: the linen module.
      variables: what ``module.init`` returned (a dict with a ``'params'`` collection), or ``None``
        to initialize with ``key``. Boxed parameters (``nn.with_partitioning``,
        ``nn.with_logical_partitioning``) are unboxed: ``params`` holds plain arrays.
      sample_x: an input batch: an array ``(N, *input_shape)``, or with ``inputs='args'`` /
        ``'kwargs'`` a tuple / dict of arrays sharing the batch axis ``N``.
      method: the module method to call (name or function), as for ``module.apply``.
      rngs: PRNG keys for stochastic layers, e.g. ``{'dropout': key}``. They are closed over, so
        every evaluation uses the same random draw (the kernel of one fixed mask).
      output: picks one array when the module returns a tuple, dict or dataclass: an index, a key
        or a function of the output.
      key: PRNG key used when ``variables`` is ``None`` (default ``PRNGKey(0)``).
      mutable: passed to ``module.apply`` for modules that update collections (BatchNorm in
        training mode); the updated collections are discarded.
      inputs: how ``x`` reaches the module. ``'one'`` (default): ``x`` (any pytree) is the single
        positional argument, ``module.apply(vars, x)``. ``'args'``: ``x`` is a tuple or list spread
        as positional arguments, ``module.apply(vars, *x)``, e.g. ``x = (tokens, lengths)`` with
        ``tokens (N, T)`` int and ``lengths (N,)``. ``'kwargs'``: ``x`` is a dict spread as keyword
        arguments, ``module.apply(vars, **x)``. ``init_fn`` spreads ``x`` the same way. Integer
        leaves (token ids) are passed unchanged.
      axis_name: a name, or a tuple of names, of collective axes the module reduces over, such as
        ``nn.BatchNorm(axis_name='batch')`` in training mode (Flax's ImageNet ResNet). Each is
        bound to a size-1 axis around the call (``jax.vmap(..., axis_name=name)``), so collectives
        over it are the identity and batch statistics are those of the batch passed in.
      **call_kwargs: fixed keyword arguments of every call, e.g. ``train=False``.

    Returns:
      A Model whose ``params`` is ``variables['params']``; every other collection
      (``batch_stats``, ...) is closed over and not differentiated. ``init_fn(key, x)`` draws fresh
      params with the module's own initializers.

    Example::

      variables = MLP().init(jax.random.PRNGKey(0), x)
      model = ntk_adapters.flax.adapt(MLP(), variables, x)
      y = model(model.params, x)                  # (N, O)

      # A ResNet in training mode: batch statistics of x, running averages discarded.
      resnet = ntk_adapters.flax.adapt(ResNet18(), variables, images, train=True,
                                       mutable=['batch_stats'], axis_name='batch')
      # A text classifier called as clf(tokens, lengths).
      clf = ntk_adapters.flax.adapt(Classifier(), None, (tokens, lengths), inputs='args')
    """
    check_inputs_mode(inputs, sample_x, "sample_x")
    names = _axis_names(axis_name)
    rngs = dict(rngs or {})
    where = f"{type(module).__name__}.{_method_name(method)}{describe(output)}"

    def init_variables(key: jax.Array, x: PyTree) -> Mapping[str, Any]:
        args, kwargs = spread(inputs, x, call_kwargs)
        keys = {"params": key, **_stream_keys(key, rngs)}
        return _with_axes(lambda: module.init(keys, *args, method=method, **kwargs), names)

    if variables is None:
        key = jax.random.PRNGKey(0) if key is None else key
        with _explaining_unbound_axes(f"{type(module).__name__}.init"):
            variables = init_variables(key, sample_x)
    if not isinstance(variables, Mapping) or "params" not in variables:
        found = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            f"variables of {type(module).__name__} must be what module.init returned, a dict with a "
            f"'params' collection; got {found}. If you hold only the parameters, pass {{'params': params}}."
        )
    # Partitioning boxes would put a `.value` on every parameter path; module.apply takes the
    # plain arrays just as well.
    variables = nn.unbox(variables)
    params = variables["params"]
    rest = {name: value for name, value in variables.items() if name != "params"}

    def call(params: PyTree, x: PyTree, kwargs: Mapping[str, Any]) -> jax.Array:
        args, kw = spread(inputs, x, {**call_kwargs, **kwargs})
        out = module.apply(
            {"params": params, **rest},
            *args,
            method=method,
            rngs=rngs or None,
            mutable=mutable,
            **kw,
        )
        if mutable is not False:
            out = out[0]
        return select_output(out, output, where)

    def apply_fn(params: PyTree, x: PyTree, **kwargs: Any) -> jax.Array:
        check_inputs_mode(inputs, x, "x")
        return _with_axes(lambda: call(params, x, kwargs), names)

    def init_fn(key: jax.Array, x: PyTree) -> PyTree:
        fresh = nn.unbox(init_variables(key, x)["params"])
        return _onto(params, fresh, where)

    with _explaining_unbound_axes(where):
        return traced_model(
            apply_fn,
            params,
            sample_x,
            where=where,
            init_fn=init_fn,
            framework="flax.linen",
            module=module,
            info={
                "variables": rest,
                "method": method,
                "call_kwargs": call_kwargs,
                "rngs": rngs,
                "output": output,
                "mutable": mutable,
                "inputs": inputs,
                "axis_name": axis_name,
            },
        )


def adapt_nnx(
    module: nnx.Module,
    sample_x: PyTree,
    *,
    init: Optional[Callable[[nnx.Rngs], nnx.Module]] = None,
    output: OutputSelector = None,
    inputs: Inputs = "one",
    rng_key: Optional[jax.Array] = None,
    axis_name: AxisName = None,
    **call_kwargs: Any,
) -> Model:
    """Adapt a ``flax.nnx`` module, in whichever mode it is (``module.train()`` / ``module.eval()``).

    The module is split with ``nnx.split(module, nnx.Param, ...)``: the ``nnx.Param`` variables
    become ``params`` (a plain nested dict of arrays); everything else (batch statistics, rng
    counts and keys, the module's own ``nnx.Variable`` state) is closed over, like linen's other
    collections. Each call rebuilds the module from that snapshot, so updates the call makes
    (running averages of ``nnx.BatchNorm`` in training mode, rng counts, counters) are discarded
    and every evaluation sees the same state; ``nnx.Dropout`` therefore draws one fixed mask. The
    user's module is never changed, and later changes to it do not reach the Model.

    Args:
      module: the NNX module.
      sample_x: an input batch: an array ``(N, *input_shape)``, or with ``inputs='args'`` /
        ``'kwargs'`` a tuple / dict of arrays sharing the batch axis ``N``.
      init: optional ``init(rngs) -> module`` building a fresh module of the same architecture
        (e.g. ``lambda rngs: MLP(rngs=rngs)``); it provides ``init_fn`` for Monte Carlo over
        initializations. Without it the Model has no ``init_fn``.
      output: picks one array of a tuple/dict/dataclass output.
      inputs: how ``x`` reaches the module: ``'one'`` (default) ``module(x)``; ``'args'``
        ``module(*x)`` for a tuple or list such as ``(tokens, lengths)`` with ``tokens (N, T)``
        int and ``lengths (N,)``; ``'kwargs'`` ``module(**x)`` for a dict. Integer leaves are
        passed unchanged.
      rng_key: optional PRNG key. When given, every rng stream of the module (and of ``nnx.Rngs``
        passed in ``call_kwargs``) is reseeded from it before each call, stream by stream, and
        ``apply_fn`` accepts ``rng_key=`` to redraw the randomness for one call:
        ``model.apply_fn(params, x, rng_key=k)``. Without it the module's own keys are used and
        ``apply_fn`` takes no such keyword.
      axis_name: a name, or tuple of names, of collective axes the module reduces over
        (``nnx.BatchNorm(axis_name='batch')``), each bound to a size-1 axis around the call so
        that batch statistics are those of the batch passed in.
      **call_kwargs: fixed keyword arguments of every call. An ``nnx.Rngs`` among them is copied
        into each call like the module's own state.

    Example::

      model = ntk_adapters.flax.adapt(MLP(rngs=nnx.Rngs(0)), None, x,
                                      init=lambda rngs: MLP(rngs=rngs))
      net = Net(rngs=nnx.Rngs(0, dropout=1))        # holds nnx.Dropout and nnx.BatchNorm
      net.train()
      model = ntk_adapters.flax.adapt(net, None, x, rng_key=jax.random.key(0))
      y = model.apply_fn(model.params, x, rng_key=jax.random.key(1))    # another mask
    """
    check_inputs_mode(inputs, sample_x, "sample_x")
    names = _axis_names(axis_name)
    # Two filters give exactly three parts; nnx types the result as a variadic tuple.
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]
    # The split state shares its Variable objects with the user's module: copies keep the Model a
    # snapshot that later eager use of the module cannot change.
    param_state, rest = _copy_state(param_state), _copy_state(rest)
    params = nnx.to_pure_dict(param_state)
    node_names = sorted(k for k, v in call_kwargs.items() if nnx.graph.is_graph_node(v))
    fixed_kwargs = {k: v for k, v in call_kwargs.items() if k not in node_names}
    nodes_graphdef, nodes_state = nnx.split({k: call_kwargs[k] for k in node_names})
    nodes_state = _copy_state(nodes_state)
    where = f"{type(module).__name__}.__call__{describe(output)}"
    if rng_key is not None and not _stream_tags((module, {k: call_kwargs[k] for k in node_names})):
        raise ValueError(
            f"rng_key was given, but {type(module).__name__} holds no rng stream (nnx.Rngs, or the "
            "one of an nnx.Dropout) to reseed; drop rng_key, or build the module with rngs=nnx.Rngs(...)"
        )

    def call(params: PyTree, x: PyTree, kwargs: Mapping[str, Any], key: Optional[jax.Array]) -> jax.Array:
        state = _copy_state(param_state)
        nnx.replace_by_pure_dict(state, params)
        # Merged from fresh copies inside the trace, so the call mutates only trace-local objects.
        local = nnx.merge(graphdef, state, _copy_state(rest))
        nodes = nnx.merge(nodes_graphdef, _copy_state(nodes_state))
        if key is not None:
            _reseed((local, nodes), key)
        args, kw = spread(inputs, x, {**fixed_kwargs, **nodes, **kwargs})
        return select_output(local(*args, **kw), output, where)

    def apply_fn(params: PyTree, x: PyTree, **kwargs: Any) -> jax.Array:
        check_inputs_mode(inputs, x, "x")
        key = kwargs.pop("rng_key", rng_key) if rng_key is not None else None
        return _with_axes(lambda: call(params, x, kwargs, key), names)

    init_fn = None
    if init is not None:

        def init_fn(key: jax.Array, x: PyTree) -> PyTree:
            del x  # NNX modules are built from their constructor arguments, not from an input
            return nnx.to_pure_dict(nnx.split(init(nnx.Rngs(key)), nnx.Param, ...)[1])

    with _explaining_unbound_axes(where):
        return traced_model(
            apply_fn,
            params,
            sample_x,
            where=where,
            init_fn=init_fn,
            framework="flax.nnx",
            module=module,
            info={
                "graphdef": graphdef,
                "variables": rest,
                "call_kwargs": call_kwargs,
                "output": output,
                "init": init,
                "inputs": inputs,
                "rng_key": rng_key,
                "axis_name": axis_name,
            },
        )


def _onto(params: PyTree, fresh: PyTree, where: str) -> PyTree:
    """Fresh parameters in the structure of the adapted ones.

    ``module.init(..., method=m)`` creates only the parameters that method uses, while the
    variables a user adapts often come from a full ``init`` (a VAE's decoder beside the encoder
    that ``method`` calls). The method's output does not depend on the others, so they keep their
    adapted values; a fresh parameter the adapted ones lack is an error.
    """
    # PyTreeDef's stub is unresolved (jaxlib ships none); it defines ==.
    if jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params):  # type: ignore[operator]
        return fresh
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    new = traverse_util.flatten_dict(flax.core.unfreeze(fresh), sep="/")
    missing = sorted(set(new) - set(flat))
    if missing:
        raise ValueError(
            f"{where}: module.init creates parameters {missing} that the adapted variables do not have; "
            "pass the variables of this module and method"
        )
    flat.update(new)
    return traverse_util.unflatten_dict(flat, sep="/")


def _copy_state(state: nnx.State) -> nnx.State:
    """The same arrays in new Variable objects, created at the caller's trace level."""
    return jax.tree_util.tree_map(lambda v: v, state)


def _stream_tags(node: Any) -> list[str]:
    return sorted({stream.tag for _, stream in nnx.iter_graph(node) if isinstance(stream, nnx.RngStream)})


def _reseed(node: Any, key: jax.Array) -> None:
    tags = _stream_tags(node)
    # match_shape: streams split for nnx.vmap / nnx.scan hold a key array, not one key.
    # The stream keys go to reseed's **kwargs; mypy matches the dict against its keyword parameters too.
    keys = {t: jax.random.fold_in(key, i) for i, t in enumerate(tags)}
    nnx.reseed(node, policy="match_shape", **keys)  # type: ignore[arg-type]


def _axis_names(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"axis_name must be a str or a tuple of str, such as 'batch'; got {axis_name!r}")
    return tuple(names)


def _with_axes(thunk: Callable[[], Any], names: tuple[str, ...]) -> Any:
    """``thunk()`` with each of ``names`` bound to a size-1 mapped axis (collectives are the identity)."""
    if not names:
        return thunk()
    out = jax.vmap(lambda _: _with_axes(thunk, names[1:]), axis_name=names[0])(jnp.zeros(1))
    return jax.tree_util.tree_map(lambda a: a[0], out)


@contextlib.contextmanager
def _explaining_unbound_axes(where: str) -> Iterator[None]:
    """Turns JAX's ``unbound axis name`` error into one saying which ``axis_name`` to pass."""
    try:
        yield
    except NameError as err:
        match = re.search(r"unbound axis name: ([^\s.]+)", str(err))
        if match is None:
            raise
        name = match.group(1)
        raise ValueError(
            f"{where} reduces over the axis name {name!r} (e.g. a BatchNorm(axis_name={name!r}) in "
            f"training mode, or lax.pmean), which nothing binds here: pass axis_name={name!r} to "
            "ntk_adapters.flax.adapt, so that collectives over it see just the batch passed in"
        ) from err


def _method_name(method) -> str:
    if method is None:
        return "__call__"
    return method if isinstance(method, str) else getattr(method, "__name__", repr(method))

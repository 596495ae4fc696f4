"""Train a network with optax beside its linearization and the NTK predictions of both.

:func:`compare_training` answers the practical question behind the neural tangent kernel: *how
close does my network, trained the way I train it, stay to what the kernel predicts?* For one
:class:`~ntk_adapters.Model` (Flax, Haiku or a plain function) and one data set it puts four
trajectories on one time axis:

``'network'``
    the real network, trained with optax from its parameters ``params0``;
``'linearized'``
    its first-order Taylor expansion around ``params0`` (:func:`ntk_adapters.linearize`),
    trained with the same optimizer, the same steps and the same minibatches;
``'ntk'``
    the closed-form gradient-flow prediction from the empirical NTK at ``params0``
    (:func:`ntk_adapters.predict.gradient_descent_mse`; with momentum, the heavy-ball ODE of
    :func:`ntk_adapters.predict.gradient_descent`), starting from the network's own initial
    outputs;
``'infinite'``
    the same prediction with the exact infinite-width NTK of the architecture
    (``ntk_adapters.infinite.infinite_kernel_fn``) when every layer is recognized, again from the
    network's own initial outputs (so it differs from ``'ntk'`` only by the kernel).

Loss and time axis (the same everywhere in the library)
-------------------------------------------------------
The loss is ``L(θ) = ½ · mean over all N·O entries of (f(x) − y)²`` (``N`` examples, ``O``
outputs per example; a minibatch of ``B`` examples averages over its ``B·O`` entries). Gradient
flow in physical time ``τ`` moves the training outputs as ``df/dτ = −Θ (f − y) / (N·O)``, and
optax ``sgd(η)`` step ``k`` is at ``τ = k·η``: the predictors are asked for ``t = k`` steps of
``learning_rate = η`` (neural-tangents' convention) and :attr:`TrainingComparison.time` reports
``τ``. Test losses use the same normalization over the ``M·O`` test entries.

What is compared to what
------------------------
* The closed forms describe *full-batch gradient flow*. Full-batch SGD with a small learning rate
  follows it up to ``O(η)``; with ``batch_size`` set, minibatch SGD follows it in expectation (its
  gradient is unbiased) plus noise, and it is compared anyway: the report shows how much the
  noise costs.
* Momentum ``μ`` (``optax.sgd(η, momentum=μ)``) is compared with the heavy-ball prediction
  ``η f'' + (1 − μ) f' = −(Θ/(N·O)) (f − y)``; for small ``η`` this is plain flow with rate
  ``η/(1 − μ)``.
* The predictions need ``η`` and ``μ``; so the optimizer is built here from ``learning_rate`` and
  ``momentum``. An arbitrary optax optimizer may be passed as ``optimizer=`` instead: the network
  and its linearization are still trained and compared with each other, but no prediction is
  made (the ``'ntk'`` and ``'infinite'`` entries are absent and :attr:`TrainingComparison.notes`
  says why), and the time axis is the step count.
* ``kernel='full'`` uses the ``(N, N, O, O)`` empirical NTK (``trace_axes=()``), which governs the
  linearized network *exactly* (the prediction and the linearized network agree up to the
  discretization of time); ``kernel='traced'`` uses the per-output ``(N, N)`` kernel
  (``trace_axes=(-1,)``, the form the infinite-width kernel takes), cheaper by ``O²`` in memory
  and ``O³`` in time, and exact only when the output-output blocks are proportional to the
  identity (as they become with width). ``'auto'`` picks ``'full'`` when ``N·O ≤ 3000``.

Example::

    import optax, ntk_adapters.flax
    from ntk_adapters.dynamics import compare_training

    model = ntk_adapters.flax.adapt(MLP(width=512), None, x_train)      # x: (N, D), y: (N, O)
    result = compare_training(model, x_train, y_train, x_test, y_test,
                              learning_rate=1.0, steps=500, eval_every=25)
    print(result.table())
    result.plot("out/dynamics.png")
    result.loss_train["network"].shape          # (E,) with E = 500 // 25 + 1 evaluations
    result.outputs_test["ntk"].shape            # (E, M, O)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_adapters import predict as _predict
from ntk_adapters.comparison import PAIRS, TrainingComparison, mse_loss, pair_name
from ntk_adapters.empirical import VmapAxes, empirical_ntk_fn
from ntk_adapters.implementations import Implementation
from ntk_adapters.inputs import as_arrays, check_pair, concatenate, num_examples, rows
from ntk_adapters.linearize import linearize
from ntk_adapters.model import Model, ModelLike, PyTree, as_model, check_params_match

__all__ = ["TrainingComparison", "compare_training", "mse_loss"]

_FULL_KERNEL_MAX = 3000


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _eval_steps(steps: int, eval_every: int) -> np.ndarray:
    points = list(range(0, steps + 1, eval_every))
    if points[-1] != steps:
        points.append(steps)
    return np.asarray(points, dtype=np.int64)


def _make_chunk(
    apply_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    batch_size: Optional[int],
):
    """A jitted ``chunk(states, params0, x_train, y_train, x_test, key, start, length)`` running
    ``length`` steps of the network and of its linearization around ``params0`` with one
    ``lax.scan``, on identical minibatches; returns the new states and the outputs of both.

    Data and ``params0`` are arguments, not closed-over constants: XLA would otherwise try to
    constant-fold the forward pass at ``params0`` while compiling.
    """

    def chunk(states, params0, x_train, y_train, x_test, key, start, length):
        fns = (apply_fn, linearize(apply_fn, params0))
        n = num_examples(x_train, "x_train")

        def step(states, k):
            if batch_size is None:
                xb, yb = x_train, y_train
            else:
                # Batches drawn from the step index (not a carried key) do not depend on how the
                # run is chunked, and both models see the same ones.
                idx = jax.random.choice(jax.random.fold_in(key, k), n, (batch_size,), replace=False)
                xb, yb = rows(x_train, idx), y_train[idx]
            new = []
            for f, (params, opt_state) in zip(fns, states):
                grads = jax.grad(lambda p, f=f: mse_loss(f(p, xb), yb))(params)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                new.append((optax.apply_updates(params, updates), opt_state))
            return tuple(new), None

        states, _ = jax.lax.scan(step, states, start + jnp.arange(length))
        outs = tuple(
            (f(params, x_train), None if x_test is None else f(params, x_test)) for f, (params, _) in zip(fns, states)
        )
        return states, outs

    return jax.jit(chunk, static_argnums=7)


def _rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS over every axis but the first (time)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.sqrt(np.mean(d.reshape(d.shape[0], -1) ** 2, axis=1))


def _loss(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.asarray(f, dtype=np.float64) - np.asarray(y, dtype=np.float64)[None]
    return 0.5 * np.mean(d.reshape(d.shape[0], -1) ** 2, axis=1)


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def _prediction(
    k_tt: jax.Array,
    k_st: Optional[jax.Array],
    y_train: jax.Array,
    f0_train: jax.Array,
    f0_test: Optional[jax.Array],
    steps: np.ndarray,
    learning_rate: float,
    momentum: Optional[float],
    diag_reg: float = 0.0,
) -> tuple[np.ndarray, Optional[np.ndarray], list[str]]:
    """Outputs after ``steps`` steps of ``learning_rate`` of gradient flow (heavy-ball ODE with
    momentum) from ``f0``."""
    t = jnp.asarray(steps, dtype=k_tt.dtype)
    with warnings.catch_warnings(record=True) as caught:
        # Stability and conditioning warnings become notes of the report, stated once.
        warnings.simplefilter("always")
        if momentum:
            fn = _predict.gradient_descent(mse_loss, k_tt, y_train, learning_rate, momentum=momentum)
        else:
            fn = _predict.gradient_descent_mse(k_tt, y_train, learning_rate, diag_reg=diag_reg)
        if k_st is None:
            train, test = fn(t, f0_train), None
        else:
            train, test = fn(t, f0_train, f0_test, k_st)
    messages = [str(w.message) for w in caught if "stability edge" not in str(w.message)]
    return np.asarray(train), (None if test is None else np.asarray(test)), messages


def _infinite_kernels(model: Model, x_train: Any, x_test: Optional[Any]):
    from ntk_adapters.infinite import infinite_kernel_fn  # optional engine; absent is fine

    kernel_fn = infinite_kernel_fn(model)
    return _train_and_test_kernels(lambda a, b: kernel_fn(a, b, get="ntk"), x_train, x_test)


def _train_and_test_kernels(kernel_fn, x_train: Any, x_test: Optional[Any]):
    """``(k(x_train, x_train), k(x_test, x_train))``.

    When the test set is not much larger than the training set both blocks come from one call
    on the stacked inputs: one compilation instead of two, for a little extra arithmetic.
    """
    n = num_examples(x_train, "x_train")
    if x_test is None:
        return kernel_fn(x_train, None), None
    if num_examples(x_test, "x_test") <= 2 * n:
        k = kernel_fn(concatenate(x_train, x_test), None)
        return k[:n, :n], k[n:, :n]
    return kernel_fn(x_train, None), kernel_fn(x_test, x_train)


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def compare_training(
    model: ModelLike,
    x_train: Any,
    y_train: Any,
    x_test: Optional[Any] = None,
    y_test: Optional[Any] = None,
    *,
    steps: int,
    learning_rate: Optional[float] = None,
    momentum: Optional[float] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    eval_every: Optional[int] = None,
    batch_size: Optional[int] = None,
    key: Optional[jax.Array] = None,
    params: Optional[PyTree] = None,
    kernel: Literal["auto", "full", "traced"] = "auto",
    implementation: Implementation = "auto",
    vmap_axes: VmapAxes = "auto",
    diag_reg: float = 0.0,
    memory_budget: float = 2**30,
    infinite: Union[bool, Literal["auto"]] = "auto",
    progress: bool = True,
) -> TrainingComparison:
    """Train a model and its linearization with optax; compare with the NTK predictions.

    See the module docstring for the four trajectories, the loss normalization
    (``½·mean over all N·O entries``) and the time axis (optax step ``k`` ↔ ``τ = k·η``).

    Args:
      model: a :class:`~ntk_adapters.Model` (from ``ntk_adapters.flax.adapt``,
        ``ntk_adapters.haiku.adapt`` or ``ntk_adapters.adapt``) or a function
        ``f(params, x) -> y`` together with ``params``.
      x_train: training inputs ``(N, *input_shape)``: an array or a pytree of arrays sharing the
        batch axis (``(tokens, lengths)``).
      y_train: targets ``(N, *out)``, the model's output shape.
      x_test: optional test inputs ``(M, *input_shape)``, structured like ``x_train``: outputs and
        discrepancies are reported on them too.
      y_test: optional test targets ``(M, *out)`` for test losses.
      steps: number of optimizer steps.
      learning_rate: ``η`` of ``optax.sgd``; needed for the predictions and the time axis.
      momentum: heavy-ball ``μ`` in ``[0, 1)`` for ``optax.sgd(η, momentum=μ)``; the prediction
        then integrates the momentum ODE.
      optimizer: any optax optimizer *instead of* ``learning_rate``/``momentum``; the network and
        its linearization are trained with it, no prediction is made (noted in the result).
      eval_every: evaluate every this many steps (default ``max(1, steps // 50)``); the last step
        is always evaluated.
      batch_size: minibatch size (sampled without replacement at every step, the same batches
        for the network and its linearization); ``None`` trains on the full batch.
      key: PRNG key for the minibatch order (default ``PRNGKey(0)``).
      params: initial parameters (default: the Model's). To start from a fresh draw pass
        ``model.init(key)``.
      kernel: ``'full'``, ``'traced'`` or ``'auto'``: which empirical NTK the ``'ntk'``
        prediction uses (module docstring).
      implementation, vmap_axes, memory_budget: how the empirical NTK is computed, as for
        :func:`ntk_adapters.empirical_ntk_fn`. The default ``vmap_axes='auto'`` computes it per
        example (and by layer factorization where cheaper) whenever the traced model proves that
        examples do not interact; ``None`` differentiates the whole batch, exact for any model.
      diag_reg: ridge ``diag_reg · mean(diag Θ)`` added to the training NTK of both closed-form
        predictions (as :func:`ntk_adapters.predict.gradient_descent_mse`); ``0`` (default) is
        plain gradient flow. Not available with ``momentum`` (the ODE predictor has none).
      infinite: ``True`` requires the infinite-width prediction (errors propagate), ``False``
        skips it, ``'auto'`` computes it when ``ntk_adapters.infinite`` supports the model and
        otherwise records why not in ``notes``.
      progress: show a tqdm progress bar over training steps.

    Returns:
      A :class:`TrainingComparison` of numpy arrays with ``.table()`` and ``.plot(path)``.

    Example::

      result = compare_training(model, x, y, x_test, y_test, learning_rate=0.5, steps=200)
      result.discrepancy_test["network-ntk"]       # (E,) RMS of f_network − f_ntk on x_test
      print(result.table())
    """
    if params is not None and isinstance(model, Model):
        check_params_match(model.params, params)
    model = as_model(model, params)
    if model.params is None:
        raise ValueError("compare_training needs parameters: pass a Model, or a function with params=...")
    params0 = model.params

    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    steps = int(steps)
    eval_every = max(1, steps // 50) if eval_every is None else eval_every
    if not isinstance(eval_every, (int, np.integer)) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive int; got {eval_every!r}")
    if kernel not in ("auto", "full", "traced"):
        raise ValueError(f"kernel must be 'auto', 'full' or 'traced'; got {kernel!r}")
    if infinite not in (True, False, "auto"):
        raise ValueError(f"infinite must be True, False or 'auto'; got {infinite!r}")
    if not diag_reg >= 0:
        raise ValueError(f"diag_reg must be non-negative; got {diag_reg!r}")
    if diag_reg and momentum:
        raise ValueError(
            "diag_reg applies to the closed-form MSE prediction; the momentum prediction integrates an ODE "
            "without a ridge term: pass diag_reg=0 or momentum=None"
        )

    if optimizer is not None:
        if learning_rate is not None or momentum is not None:
            raise ValueError(
                "pass either optimizer=... (any optax optimizer; no prediction is made) or "
                "learning_rate=/momentum= (optax.sgd is built here and the predictions are comparable), "
                "not both"
            )
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
            raise TypeError(f"optimizer must be an optax.GradientTransformation; got {type(optimizer).__name__}")
    else:
        if learning_rate is None:
            raise ValueError(
                "learning_rate is required (the predictions and the time axis τ = step·η need it); "
                "or pass optimizer=... to train with any optax optimizer without predictions"
            )
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive; got {learning_rate}")
        if momentum is not None and not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        momentum = momentum or None
        optimizer = optax.sgd(learning_rate, momentum=momentum)
        learning_rate = float(learning_rate)

    x_train = as_arrays(x_train)
    n = num_examples(x_train, "x_train")
    out = jax.eval_shape(model.apply_fn, params0, x_train)
    dtype = out.dtype
    y_train = jnp.asarray(y_train, dtype=dtype)
    if tuple(y_train.shape) != tuple(out.shape):
        raise ValueError(
            f"y_train has shape {tuple(y_train.shape)} but the model maps x_train {_shapes(x_train)} "
            f"to outputs {tuple(out.shape)}; targets must match the outputs (one-hot encode labels, "
            "add a trailing axis for a single output)"
        )
    if x_test is not None:
        x_test = as_arrays(x_test)
        try:
            check_pair(x_train, x_test)
        except ValueError as err:
            message = str(err).replace("x1", "x_train").replace("x2", "x_test")
            raise ValueError(f"x_test must be structured like x_train: {message}") from None
    if y_test is not None:
        if x_test is None:
            raise ValueError("y_test was given without x_test")
        y_test = jnp.asarray(y_test, dtype=dtype)
        want = (num_examples(x_test, "x_test"),) + tuple(out.shape[1:])
        if tuple(y_test.shape) != want:
            raise ValueError(
                f"y_test must have shape {want} (the model's outputs on x_test); got {tuple(y_test.shape)}"
            )
    if batch_size is not None:
        if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be an int in [1, N={n}] or None for full batch; got {batch_size!r}")
        if batch_size == n:
            batch_size = None
    key = jax.random.PRNGKey(0) if key is None else key

    notes: list[str] = []
    steps_at = _eval_steps(steps, eval_every)
    times = steps_at * (learning_rate if learning_rate is not None else 1.0)

    # ---- (a), (b): the network and its linearization, trained together on the same batches.
    chunk = _make_chunk(model.apply_fn, optimizer, batch_size)
    states = tuple((params0, optimizer.init(params0)) for _ in range(2))
    f0_train = model.apply_fn(params0, x_train)
    f0_test = None if x_test is None else model.apply_fn(params0, x_test)
    traj_train: list[list[np.ndarray]] = [[np.asarray(f0_train)] for _ in range(2)]
    traj_test: list[list[np.ndarray]] = [[np.asarray(f0_test)] for _ in range(2)] if x_test is not None else []

    from tqdm.auto import tqdm

    with tqdm(total=steps, desc="training network + linearized", unit="step", disable=not progress, leave=False) as bar:
        for start, stop in zip(steps_at[:-1], steps_at[1:]):
            states, outs = chunk(states, params0, x_train, y_train, x_test, key, jnp.asarray(start), int(stop - start))
            for i, (ftr, fte) in enumerate(outs):
                traj_train[i].append(np.asarray(ftr))
                if x_test is not None:
                    traj_test[i].append(np.asarray(fte))
            bar.update(int(stop - start))

    outputs_train = {name: np.stack(v) for name, v in zip(("network", "linearized"), traj_train)}
    outputs_test = {name: np.stack(v) for name, v in zip(("network", "linearized"), traj_test)}
    for name in ("network", "linearized"):
        if not np.all(np.isfinite(outputs_train[name][-1])):
            notes.append(
                f"the {name} diverged (non-finite outputs); lower learning_rate"
                + (" below η_max" if learning_rate is not None else "")
            )

    # ---- (c), (d): closed-form predictions from the empirical and the infinite-width NTK.
    kernel_used: Optional[str] = None
    eta_max: Optional[float] = None
    if learning_rate is None:
        notes.append(
            "no NTK prediction: a user-supplied optimizer has no known learning rate; pass "
            "learning_rate= (and momentum=) to compare with the closed form"
        )
    else:
        n_out = int(math.prod(out.shape[1:]))
        kernel_used = kernel if kernel != "auto" else ("full" if n * n_out <= _FULL_KERNEL_MAX else "traced")
        if kernel_used == "full" and len(out.shape) != 2:
            kernel_used = "traced"
            notes.append("outputs are not (N, O): the per-output (traced) empirical NTK was used")
        ntk_fn = empirical_ntk_fn(
            model,
            trace_axes=() if kernel_used == "full" else (-1,),
            vmap_axes=vmap_axes,
            implementation=implementation,
            memory_budget=memory_budget,
        )
        k_tt, k_st = _train_and_test_kernels(lambda a, b: ntk_fn(a, b, params0), x_train, x_test)
        # Concrete kernels here (compare_training runs eagerly), so the limit is a Python float.
        eta_max = float(_predict.max_learning_rate(k_tt, n * n_out, momentum=momentum or 0.0))
        if learning_rate > eta_max:
            notes.append(
                f"learning_rate {learning_rate:g} exceeds the stability limit η_max ≈ {eta_max:.3g} of "
                "full-batch gradient descent on the linearized network; the discrete runs may diverge "
                "while gradient flow does not"
            )
        pred_train, pred_test, messages = _prediction(
            k_tt, k_st, y_train, f0_train, f0_test, steps_at, learning_rate, momentum, diag_reg
        )
        notes.extend(f"empirical NTK: {m}" for m in messages)
        outputs_train["ntk"] = pred_train
        if x_test is not None:
            assert pred_test is not None  # a test set gives a test kernel, hence test predictions
            outputs_test["ntk"] = pred_test

        if infinite is not False:
            try:
                i_tt, i_st = _infinite_kernels(model, x_train, x_test)
                i_train, i_test, messages = _prediction(
                    i_tt, i_st, y_train, f0_train, f0_test, steps_at, learning_rate, momentum, diag_reg
                )
            except Exception as err:  # noqa: BLE001 - 'auto' reports any failure instead of raising
                if infinite is True:
                    raise
                notes.append(f"no infinite-width prediction: {type(err).__name__}: {_first_line(err)}")
            else:
                outputs_train["infinite"] = i_train
                notes.extend(f"infinite-width NTK: {m}" for m in messages)
                if x_test is not None:
                    assert i_test is not None  # a test set gives a test kernel, hence test predictions
                    outputs_test["infinite"] = i_test

    y_train_np = np.asarray(y_train)
    loss_train = {k: _loss(v, y_train_np) for k, v in outputs_train.items()}
    loss_test = {} if y_test is None else {k: _loss(v, np.asarray(y_test)) for k, v in outputs_test.items()}
    discrepancy_train = {
        pair_name(a, b): _rms(outputs_train[a], outputs_train[b])
        for a, b in PAIRS
        if a in outputs_train and b in outputs_train
    }
    discrepancy_test = {
        pair_name(a, b): _rms(outputs_test[a], outputs_test[b])
        for a, b in PAIRS
        if a in outputs_test and b in outputs_test
    }
    if batch_size is not None and learning_rate is not None:
        notes.append(
            f"minibatch SGD (batch {batch_size} of {n}): the predictions are full-batch gradient flow, "
            "which minibatch SGD follows only in expectation"
        )
    return TrainingComparison(
        step=steps_at,
        time=np.asarray(times, dtype=np.float64),
        loss_train=loss_train,
        loss_test=loss_test,
        discrepancy_train=discrepancy_train,
        discrepancy_test=discrepancy_test,
        outputs_train=outputs_train,
        outputs_test=outputs_test,
        learning_rate=learning_rate,
        momentum=momentum,
        batch_size=batch_size,
        kernel=kernel_used,
        max_learning_rate=eta_max,
        notes=notes,
    )


def _shapes(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), x)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""

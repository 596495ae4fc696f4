"""Gradient descent on any loss in function space, with or without momentum, by ODE integration."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_adapters.predict.checks import (
    ArrayLike,
    check_positive,
    concrete,
    initial_outputs,
    returned,
    times,
    train_inputs,
)
from ntk_adapters.predict.linalg import TrainKernel, _highest
from ntk_adapters.predict.mse import PredictFn

#: ``t=None`` integrates in chunks that double up to this many natural time units
#: ``N·O/λ_max`` and then stay that long, ...
_CHUNK_MAX = 4096.0
#: ... at most this many chunks (about 2·10⁶ natural units in all).
_CHUNKS = 512


def _solve(dynamics: Callable, state, t0, t1, ts, args, rtol: float, atol: float, max_steps: int):
    """Adaptive Dormand–Prince 5(4) from ``t0`` to ``t1`` (diffrax), the state at the sorted
    ``ts`` (``None``: at ``t1``), and whether the step budget ran out before ``t1``.

    diffrax reports an exhausted budget exactly (its result code) and leaves the unreached
    outputs at ``inf``; nothing is extrapolated.
    """
    import diffrax  # imported here: ``import ntk_adapters`` stays fast

    saveat = diffrax.SaveAt(t1=True) if ts is None else diffrax.SaveAt(ts=ts)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda tau, y, a: dynamics(y, tau, *a)),
        diffrax.Dopri5(),
        t0,
        t1,
        None,
        state,
        args,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
    )
    exhausted = sol.result == diffrax.RESULTS.max_steps_reached
    return sol.ys, sol.ts, exhausted


def _loss_label(loss: Callable) -> str:
    name = getattr(loss, "__qualname__", None) or getattr(loss, "__name__", None) or repr(loss)
    return f"loss {name!r}"


def _check_loss(loss: Callable, y: jax.Array, label: str) -> None:
    """The loss must map ``(fx, y_train)`` shaped like ``y_train`` to a real scalar."""
    try:
        out = jax.eval_shape(loss, y, y)
    except Exception as err:  # noqa: BLE001 - any failure is reported with the loss's name
        raise TypeError(
            f"{label} could not be evaluated as loss(fx, y_train) with fx shaped like y_train "
            f"{tuple(y.shape)}: {type(err).__name__}: {err}"
        ) from err
    shape = getattr(out, "shape", None)
    if shape != ():
        got = "a pytree" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(
            f"{label} must return a scalar (reduce over examples and outputs, e.g. with jnp.mean); "
            f"it returns {got} for fx and y_train of shape {tuple(y.shape)}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{label} must return a real float scalar; it returns dtype {out.dtype}")


def gradient_descent(
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    k_train_train: ArrayLike,
    y_train: ArrayLike,
    learning_rate: float = 1.0,
    momentum: Optional[float] = None,
    trace_axes: Optional[Sequence[int]] = None,
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    mxstep: int = 100_000,
) -> PredictFn:
    """Outputs of a linearized model trained by gradient descent on any loss, by ODE integration.

    ``t`` counts steps of ``learning_rate = η`` (neural-tangents' convention); in physical time
    ``τ = η t`` the parameters follow ``dθ/dτ = −∇_θ loss(f(θ), y)``, so in function space

        df(X)/dτ = −Θ(X, X) ∇_f loss,      df(x)/dτ = −Θ(x, X) ∇_f loss,

    with ``∇_f loss`` the gradient of ``loss`` with respect to the training outputs. The loss sets
    its own normalization: ``loss = ½·mean((f − y)²)`` reproduces :func:`gradient_descent_mse`.

    Momentum ``μ`` (heavy ball, optax ``sgd(η, momentum=μ)``: ``v ← μ v + g``, ``θ ← θ − η v``).
    In function space the iteration is ``u_{k+1} = μ u_k + Θ ∇_f loss(f_k)``,
    ``f_{k+1} = f_k − η u_{k+1}``; its continuous limit in ``τ`` is

        df/dτ = −u,     du/dτ = (Θ ∇_f loss(f) − (1 − μ) u) / η,     u(0) = 0,

    i.e. ``η f'' + (1 − μ) f' = −Θ ∇_f loss(f)``: neural-tangents' momentum ODE (which it writes in
    units of ``√η``), up to ``O(η)`` from the discrete iteration at a fixed step, with the
    build-up of the velocity over about ``1/(1 − μ)`` steps.

    Integration: diffrax's adaptive Dormand–Prince 5(4) with error control (default tolerances
    ``sqrt(eps)/10`` of the dtype), any output times from one integration, jit- and
    reverse-mode-friendly for finite times. The loss and its gradient are watched along the path:
    where they stop being finite the state is frozen and the outputs from then on are refused
    (eagerly: an error that says at which step; under ``jit``: NaN). An integration that runs
    out of its ``mxstep`` steps before the last asked time is refused the same way (eagerly: a
    ``RuntimeError`` with the times reached and asked and the remedies; under ``jit``: NaN for the
    times not reached), never extrapolated.

    Args:
      loss: ``loss(fx, y) -> scalar`` with ``fx`` and ``y`` shaped like ``y_train``.
      k_train_train: NTK ``(N, N)`` per output or ``(N, N, O, O)``.
      y_train: targets ``(N, *out)`` (``(N, O)`` for a full kernel; one-hot labels for
        cross-entropy).
      learning_rate: ``η``, the unit of ``t`` and the inertia of the momentum ODE.
      momentum: ``μ`` in ``[0, 1)``, or ``None`` for plain gradient descent.
      trace_axes: neural-tangents' argument, checked against the kernel's shape.
      rtol, atol: integrator tolerances (relative, absolute).
      mxstep: the most integrator steps (accepted and rejected) for one call with finite ``t``,
        and for each chunk of ``t=None``.

    Returns:
      ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``: ``t`` a
      non-negative scalar or array of steps (outputs get ``t.shape`` in front, any order), or
      ``None``: integrate until the outputs stop changing (within the tolerances over a doubling
      of the time); that raises if they do not settle within about ``2·10⁶ · N·O/λ_max`` of
      physical time (cross-entropy on separable data grows forever), and on an ill-conditioned
      kernel it costs about ``cond(Θ)`` integrator steps. ``None`` initial outputs skip that set,
      as in :func:`gradient_descent_mse`. Returns ``(fx_train_t, fx_test_t)`` or the one asked for.

    Example::

      xent = lambda fx, y: -jnp.mean(jnp.sum(y * jax.nn.log_softmax(fx), -1))
      predict_fn = gradient_descent(xent, ntk_train_train, y_onehot, learning_rate=1.0)
      fx_train = predict_fn(jnp.linspace(0., 10., 5))        # (5, N, O)
    """
    k, y, dtype, layout = train_inputs(k_train_train, y_train, trace_axes)
    check_positive(learning_rate, "learning_rate")
    if momentum is not None and not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1) (or None); got {momentum}")
    label = _loss_label(loss)
    _check_loss(loss, y, label)
    kernel = TrainKernel(layout.kernel(k), 0.0, False, "k_train_train")
    kernel.validate(warn=False)  # symmetric and PSD; the ODE needs no factorization
    k_flat = kernel.k
    # The natural time unit of a mean-normalized loss: the fastest mode relaxes in N·O/λ_max.
    lam_max = kernel.top_eigenvalue()
    unit = layout.size / jnp.maximum(lam_max, jnp.finfo(dtype).tiny)
    tol = math.sqrt(float(jnp.finfo(dtype).eps)) / 10
    rtol = tol if rtol is None else rtol
    atol = tol if atol is None else atol
    bad_level = 100 * atol
    friction = None if momentum is None else 1.0 - momentum

    def loss_flat(f_flat: jax.Array) -> jax.Array:
        return jnp.asarray(loss(layout.outputs(f_flat, layout.n), y)).astype(dtype).reshape(())

    value_and_grad = jax.value_and_grad(loss_flat)

    def dynamics(state, _, kt, unit):
        *fs, bad = state
        value, g = value_and_grad(fs[0])
        ok = jnp.isfinite(value) & jnp.all(jnp.isfinite(g))
        g = jnp.where(ok, g, 0)
        if friction is None:
            ds = [-(k_flat @ g), -(kt @ g)]
        else:
            f, ft, u, ut = fs
            ds = [-u, -ut, (k_flat @ g - friction * u) / learning_rate, (kt @ g - friction * ut) / learning_rate]
        ok = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in ds]))
        # A non-finite loss, gradient or state freezes the flow; `bad` clocks the time spent so,
        # in natural units, which dates where the path left the loss's domain.
        return (*(jnp.where(ok, d, 0) for d in ds), jnp.where(ok, 0.0, 1.0).astype(dtype) / unit)

    def start(f0, ft0):
        zero = jnp.zeros((), dtype)
        if friction is None:
            return (f0, ft0, zero)
        return (f0, ft0, jnp.zeros_like(f0), jnp.zeros_like(ft0), zero)

    # Traced at the highest precision: the kernel products and the integrator's combinations of
    # stages (TensorFloat-32 on GPUs would cost the flow three digits).
    @jax.jit
    @_highest
    def integrate(flat_tau, f0, ft0, kt, unit):
        order = jnp.argsort(flat_tau)
        sorted_tau = flat_tau[order]
        end = jnp.maximum(sorted_tau[-1], jnp.finfo(dtype).tiny)  # all-zero times: a null span
        ys, ts, _ = _solve(dynamics, start(f0, ft0), 0.0, end, sorted_tau, (kt, unit), rtol, atol, mxstep)
        inverse = jnp.argsort(order)
        # Outputs the integrator did not reach (step budget spent) are inf, never extrapolated.
        reached = jnp.isfinite(ts)[inverse]
        return ys[0][inverse], ys[1][inverse], ys[-1][inverse], reached

    @jax.jit
    @_highest
    def settle(f0, ft0, kt, unit):
        """Integrate chunk by chunk until the outputs change by less than the tolerance."""

        def changed(a, b):
            return jnp.max(jnp.abs(b - a) / (atol + rtol * jnp.abs(b)), initial=0.0)

        def body(carry):
            i, tau, state, _, _ = carry
            length = jnp.clip(tau, unit, _CHUNK_MAX * unit)
            ys, _, exhausted = _solve(dynamics, state, tau, tau + length, None, (kt, unit), rtol, atol, mxstep)
            new = tuple(jnp.where(exhausted, old, x[-1]) for old, x in zip(state, ys))
            still = jnp.maximum(changed(state[0], new[0]), changed(state[1], new[1]))
            return i + 1, jnp.where(exhausted, tau, tau + length), new, still <= 10, exhausted

        def cond(carry):
            i, _, state, done, exhausted = carry
            return (i < _CHUNKS) & ~done & ~exhausted & (state[-1] <= bad_level)

        false = jnp.zeros((), bool)
        init = (jnp.zeros((), jnp.int32), jnp.zeros((), dtype), start(f0, ft0), false, false)
        _, tau, state, done, exhausted = jax.lax.while_loop(cond, body, init)
        return state[0], state[1], state[-1], tau, done, exhausted

    def out_of_steps(reached: float, asked: float) -> None:
        raise RuntimeError(
            f"gradient_descent: the ODE integrator spent its mxstep={mxstep} steps and stopped "
            f"before step t = {asked:.4g} (physical time {asked * learning_rate:.4g}), having reached "
            f"t ≥ {reached:.4g}. No output past that is returned (it would be an extrapolation). "
            f"The flow is too stiff or too long for these tolerances (rtol={rtol:g}, atol={atol:g}): "
            "pass a larger mxstep, ask for earlier times or use a smaller learning_rate "
            "(fewer natural time units N·O/λ_max), or loosen rtol/atol"
        )

    def refuse(where: str) -> None:
        raise FloatingPointError(
            f"gradient_descent: {label} or its gradient is not finite {where}; the outputs "
            "from there on are undefined (the path left the loss's domain, e.g. sqrt or log of "
            "an output that crossed its bound). Check the loss, or ask for earlier steps"
        )

    def predict_fn(
        t: Optional[ArrayLike] = None,
        fx_train_0: Optional[ArrayLike] = 0.0,
        fx_test_0: Optional[ArrayLike] = None,
        k_test_train: Optional[ArrayLike] = None,
    ):
        init = initial_outputs(layout, y.shape, dtype, fx_train_0, fx_test_0, k_test_train)
        f0_value = concrete(init.f0)
        if f0_value is not None:
            value, g = value_and_grad(init.f0)
            if not (np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g)))):
                refuse("at t = 0 (the initial outputs fx_train_0)")
        if t is None:
            train, test, bad, tau, done, exhausted = settle(init.f0, init.ft0, init.kt, unit)
            if concrete(done) is not None:
                if bool(exhausted):
                    step = float(tau) / learning_rate
                    length = min(max(float(tau), float(unit)), _CHUNK_MAX * float(unit)) / learning_rate
                    out_of_steps(step, step + length)
                if float(bad) > bad_level:
                    refuse(f"from step t ≈ {(float(tau) - float(bad) * float(unit)) / learning_rate:.4g} on")
                if not bool(done):
                    raise ValueError(
                        f"gradient_descent with {label} does not converge: the outputs still change "
                        f"after t = {float(tau) / learning_rate:.4g} steps (physical time "
                        f"{float(tau):.4g} = {float(tau / unit):.3g} · N·O/λ_max). Losses without a "
                        "minimizer (cross-entropy on separable data) grow forever; pass finite t"
                    )
            invalid = (bad > bad_level) | ~done | exhausted
            train, test = (jnp.where(invalid, jnp.nan, v) for v in (train, test))
        else:
            steps = times(t, dtype, allow_inf=False)
            flat = steps.reshape(-1) * learning_rate
            train, test, bad, reached = integrate(flat, init.f0, init.ft0, init.kt, unit)
            reached_value = concrete(reached)
            if reached_value is not None and not np.all(reached_value):
                tau = np.asarray(flat)
                done_tau = tau[reached_value]
                out_of_steps(
                    float(done_tau.max()) / learning_rate if done_tau.size else 0.0, float(tau.max()) / learning_rate
                )
            bad_value = concrete(bad)
            if bad_value is not None and np.any(bad_value > bad_level):
                i = int(np.argmax(np.where(bad_value > bad_level, -bad_value, -np.inf)))
                first = float(np.asarray(flat)[i]) - float(bad_value[i]) * float(unit)
                refuse(f"from step t ≈ {first / learning_rate:.4g} on (asked for t up to {float(steps.max()):.4g})")
            invalid = ((bad > bad_level) | ~reached)[:, None, None]
            train, test = (jnp.where(invalid, jnp.nan, v) for v in (train, test))
            train = train.reshape(steps.shape + init.f0.shape)
            test = test.reshape(steps.shape + init.ft0.shape)
        train = layout.outputs(train, layout.n) if init.train else None
        test = layout.outputs(test, init.m) if init.test else None
        return returned(init, train, test)

    return predict_fn

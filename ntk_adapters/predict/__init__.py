"""Predictions of training dynamics from kernels: gradient flow, GP inference, learning rates.

Everything here works on kernel *matrices* (empirical, Monte Carlo or infinite-width) and never
on a network, so it is framework-free. Names, arguments and conventions are neural-tangents'
(``nt.predict``); the README has a migration table.

Loss normalization and time axis
--------------------------------
With ``N`` training points and ``O`` outputs per point the mean-squared-error loss is

    L(θ) = ½ · mean over all N·O entries of (f(x) − y)².

``t`` counts steps of ``learning_rate = η`` (default 1.0): gradient descent ``θ ← θ − η ∇L``
(optax ``sgd(η)``) after ``k`` steps is predicted by ``t = k``, at physical time ``τ = η t``. As
``η → 0`` it follows gradient flow ``dθ/dτ = −∇L``, under which the outputs of a linearized model
move as

    df/dτ = −(1/(N·O)) Θ (f − y),

``Θ`` the per-output NTK (the output-averaged kernel of ``trace_axes=(-1,)``, whose full kernel
over outputs is ``Θ ⊗ I_O``), so ``f_t = y + e^{−η t Θ/(N·O)} (f_0 − y)``. For MSE only the
product ``η t`` matters; ``η`` on its own matters for the momentum ODE (:func:`gradient_descent`)
and for stability (:func:`max_learning_rate`; the MSE predictors warn when an explicitly given
``learning_rate`` is past the edge, where real gradient descent diverges).

Kernel shapes
-------------
* ``(N, N)``: per-output kernel; the full kernel is ``K ⊗ I_O`` and ``y_train`` is
  ``(N, *out)`` with any trailing output shape (``O = prod(out)``), or ``(N,)``.
* ``(N, N, O, O)``: full output-output kernel (an empirical kernel with ``trace_axes=()``);
  ``y_train`` must be ``(N, O)``. It is flattened to ``(N·O, N·O)`` internally.

Test kernels ``k_test_train`` follow the training layout: ``(M, N)`` or ``(M, N, O, O)``.
Covariances over test points are ``(M, M)`` (identical for every output) or ``(M, M, O, O)``.

Numerics
--------
Inputs are validated eagerly when they are concrete: finite entries, symmetric training kernel
(to ``sqrt(eps)`` relative), positive semi-definite (Cholesky; when it breaks down the smallest
eigenvalue must be at least ``−10·sqrt(eps)·λ_max``). ``diag_reg`` adds
``diag_reg · mean(diag K) · I`` to the training kernel (``diag_reg · I`` with
``diag_reg_absolute_scale=True``). ``t = None`` is a Cholesky solve; finite times use an
eigendecomposition computed once, when first needed. A float32 kernel is as accurate as its
conditioning allows (float32 against float64 within ``1e-2`` relative whenever
``cond(K + diag_reg)·eps ≤ 1e-2``): ill-conditioned ones are eigendecomposed in float64 (see
:mod:`ntk_adapters.predict.linalg`). Only a kernel that is singular to working precision has
eigenvalues treated as zero (with a warning). Results are computed in the inputs' dtype (at
least float32), and the same under ``jit`` as outside it.
"""

from ntk_adapters.predict.ensemble import Gaussian, gp_inference, gradient_descent_mse_ensemble
from ntk_adapters.predict.mse import PredictFn, gradient_descent_mse, max_learning_rate
from ntk_adapters.predict.ode import gradient_descent

__all__ = [
    "Gaussian",
    "PredictFn",
    "gradient_descent_mse",
    "gradient_descent_mse_ensemble",
    "gp_inference",
    "gradient_descent",
    "max_learning_rate",
]

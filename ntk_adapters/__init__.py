"""ntk_adapters: neural-tangent-kernel analysis for unchanged Flax and Haiku models.

The framework adapters live in ``ntk_adapters.flax`` and ``ntk_adapters.haiku`` and are imported
explicitly; everything here is framework-free.
"""

from ntk_adapters import batching, dynamics, predict
from ntk_adapters.batching import batch, kernel_regression_cg
from ntk_adapters.dynamics import TrainingComparison, compare_training
from ntk_adapters.empirical import empirical_kernel_fn, empirical_nngp_fn, empirical_ntk_fn
from ntk_adapters.implementations import NtkImplementation
from ntk_adapters.infinite import (
    InfiniteWidthError,
    Kernel,
    expand_outputs,
    infinite_kernel_fn,
    register_elementwise_primitive,
    register_initializer,
    register_primitive_rule,
    register_rule,
)
from ntk_adapters.linearize import linearize, taylor_expand
from ntk_adapters.model import Model, adapt
from ntk_adapters.monte_carlo import monte_carlo_kernel_fn

__all__ = [
    "Model",
    "adapt",
    "empirical_ntk_fn",
    "empirical_nngp_fn",
    "empirical_kernel_fn",
    "NtkImplementation",
    "linearize",
    "taylor_expand",
    "monte_carlo_kernel_fn",
    "infinite_kernel_fn",
    "expand_outputs",
    "Kernel",
    "InfiniteWidthError",
    "register_rule",
    "register_primitive_rule",
    "register_elementwise_primitive",
    "register_initializer",
    "compare_training",
    "TrainingComparison",
    "predict",
    "dynamics",
    "batching",
    "batch",
    "kernel_regression_cg",
]

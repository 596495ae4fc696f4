"""The infinite-width engine: exact NNGP and NTK kernels of unchanged Flax and Haiku models.

``infinite_kernel_fn(model)`` returns ``kernel_fn(x1, x2=None, get=('nngp', 'ntk'))`` giving
``(N1, N2)`` kernels per output unit (the kernel over O outputs is ``K ⊗ I_O``; see
``expand_outputs``). New layers are taught with ``register_rule``; see ``rules``.
"""

from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.engine import (
    InfiniteWidthError,
    ModuleCall,
    average_positions,
    dense_kernel,
    expand_outputs,
    infinite_kernel_fn,
    input_kernel,
)
from ntk_adapters.infinite.rules import (
    register_elementwise_primitive,
    register_primitive_rule,
    register_rule,
)
from ntk_adapters.infinite.initializers import UnknownInitializerError, register_initializer

__all__ = [
    "Kernel",
    "InfiniteWidthError",
    "ModuleCall",
    "infinite_kernel_fn",
    "expand_outputs",
    "input_kernel",
    "dense_kernel",
    "average_positions",
    "register_rule",
    "register_primitive_rule",
    "register_elementwise_primitive",
    "register_initializer",
    "UnknownInitializerError",
]

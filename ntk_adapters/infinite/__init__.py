"""The infinite-width engine: exact NNGP and NTK kernels of unchanged Flax and Haiku models.

``infinite_kernel_fn(model)`` returns ``kernel_fn(x1, x2=None, get=('nngp', 'ntk'))`` giving
``(N1, N2)`` kernels per output unit (the kernel over O outputs is ``K ⊗ I_O``; see
``expand_outputs``). New layers are taught with ``register_rule`` and new primitives with
``register_primitive_rule``; a module rule is a :class:`ModuleRule` receiving a
:class:`ModuleCall`, a primitive rule a :class:`PrimitiveRule` receiving a
:class:`PrimitiveContext` (see ``rules``). The kernel maps rules build on are in ``layers`` and
``elementwise``.
"""

from ntk_adapters.infinite.engine import expand_outputs, infinite_kernel_fn
from ntk_adapters.infinite.initializers import UnknownInitializerError, register_initializer
from ntk_adapters.infinite.kernel import Kernel
from ntk_adapters.infinite.layers import input_kernel
from ntk_adapters.infinite.rules import (
    ELEMENTWISE,
    EngineOptions,
    InfiniteWidthError,
    ModuleCall,
    ModuleRule,
    PrimitiveContext,
    PrimitiveRule,
    register_elementwise_primitive,
    register_primitive_rule,
    register_rule,
)
from ntk_adapters.infinite.values import Concrete, Value

__all__ = [
    "Kernel",
    "InfiniteWidthError",
    "infinite_kernel_fn",
    "expand_outputs",
    "input_kernel",
    "register_rule",
    "register_primitive_rule",
    "register_elementwise_primitive",
    "register_initializer",
    "UnknownInitializerError",
    "ModuleRule",
    "ModuleCall",
    "PrimitiveRule",
    "PrimitiveContext",
    "EngineOptions",
    "ELEMENTWISE",
    "Value",
    "Concrete",
]

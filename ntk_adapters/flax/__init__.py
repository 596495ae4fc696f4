"""Adapters for Flax models (linen and NNX).

``ntk_adapters.flax.adapt(module, variables, sample_x)`` turns a linen module and its variables (or
an NNX module) into an :class:`ntk_adapters.Model`.
"""

try:
    import flax  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without flax installed
    raise ImportError(
        "ntk_adapters.flax needs Flax, which is not installed. Install it with "
        "`pip install 'ntk_adapters[flax]'` (or `pip install flax`)."
    ) from err

from ntk_adapters.flax import ntk_param
from ntk_adapters.flax.adapter import adapt, adapt_linen, adapt_nnx

__all__ = ["adapt", "adapt_linen", "adapt_nnx", "ntk_param"]

"""ntk_adapters: neural-tangent-kernel analysis for unchanged Flax and Haiku models."""

from ntk_adapters.model import Model, adapt

__all__ = ["Model", "adapt"]

"""Adapter for Haiku models (``hk.transform`` and ``hk.transform_with_state``)."""

try:
    import haiku  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without haiku installed
    raise ImportError(
        "ntk_adapters.haiku needs Haiku, which is not installed. Install it with "
        "`pip install 'ntk_adapters[haiku]'` (or `pip install dm-haiku`)."
    ) from err

from ntk_adapters.haiku import ntk_param
from ntk_adapters.haiku.adapter import adapt

__all__ = ["adapt", "ntk_param"]

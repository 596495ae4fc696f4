"""Choosing one array out of a model's output (tuples, dicts, dataclasses)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

OutputSelector = Union[None, int, str, Callable[[Any], Any]]


def select_output(out: Any, output: OutputSelector, where: str) -> Any:
    """Return the part of ``out`` named by ``output``.

    ``output`` is ``None`` (the whole output, which must be an array), an ``int`` (index into a
    tuple/list), a ``str`` (key of a dict, or attribute name), or a function of the output.
    """
    if output is None:
        return out
    if callable(output):
        return output(out)
    if isinstance(output, int):
        if not isinstance(out, (tuple, list)):
            raise TypeError(f"output={output!r} indexes a tuple, but {where} returned {type(out).__name__}")
        if not -len(out) <= output < len(out):
            raise IndexError(f"output={output!r} is out of range: {where} returned {len(out)} values")
        return out[output]
    if isinstance(output, str):
        if isinstance(out, dict):
            if output not in out:
                raise KeyError(f"output={output!r} is not among the keys {sorted(out)} that {where} returned")
            return out[output]
        if hasattr(out, output):
            return getattr(out, output)
        raise KeyError(f"output={output!r}: {where} returned {type(out).__name__}, which has no such key or attribute")
    raise TypeError(f"output must be None, an int, a str or a function; got {type(output).__name__}")


def describe(selector: Optional[OutputSelector]) -> str:
    return "" if selector is None else f" (output={selector!r})"

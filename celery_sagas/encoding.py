"""Step results as JSON: what the saga database and the next step's message can hold.

A step's result is stored in the saga database and handed to later steps and to its
compensation, all as JSON. :func:`encode_result` turns the common non-JSON values into JSON
once, when the step returns:

- ``datetime`` / ``date`` / ``time`` → ISO 8601 text (``2026-12-02T13:10:00+00:00``)
- ``Decimal`` → text (``"12.50"``: no precision lost to a float)
- ``UUID`` → text
- tuples → lists; mappings with text keys and lists are encoded item by item

Anything else (a ``set``, ``bytes``, an object, a float NaN, a non-text key) raises
:class:`ResultNotSerialisableError` naming the step and the path to the value, so the step
fails at once with the reason recorded on it, instead of a reply that never comes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, TypeAlias
from uuid import UUID

from celery_sagas.errors import SagaError

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None


class ResultNotSerialisableError(SagaError):
    """A step returned a value JSON cannot hold (and the encoder does not convert)."""

    code = "result_not_serialisable"

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"result of {step} is not JSON-serialisable: {reason}", step=step)
        self.step = step
        self.reason = reason


def encode_result(value: Any, step: str = "step") -> JSONValue:
    """``value`` as plain JSON data, or :class:`ResultNotSerialisableError` for ``step``."""
    return _encode(value, step, "result")


def _encode(value: Any, step: str, path: str) -> JSONValue:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ResultNotSerialisableError(step, f"{path} is {value!r} (not valid JSON)")
        return value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ResultNotSerialisableError(step, f"{path} is Decimal({str(value)!r})")
        return str(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_encode(item, step, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        return _encode_mapping(value, step, path)
    raise ResultNotSerialisableError(
        step,
        f"{path} is a {type(value).__module__}.{type(value).__qualname__} ({_short(value)}); "
        "return JSON data (dict, list, str, int, float, bool, None; datetime, Decimal and "
        "UUID are converted to text)",
    )


def _encode_mapping(value: Mapping[Any, Any], step: str, path: str) -> dict[str, JSONValue]:
    encoded: dict[str, JSONValue] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ResultNotSerialisableError(
                step, f"{path} has the key {key!r}: JSON object keys must be text"
            )
        encoded[key] = _encode(item, step, f"{path}[{key!r}]")
    return encoded


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""Redaction of secrets (card numbers, addresses, ...) before anything is shown or logged.

Pure: ``redact(value, fields)`` returns a copy with the value of every mapping key named in
``fields`` (case-insensitive, at any depth) replaced by ``"***"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"


def redact(value: Any, fields: Iterable[str]) -> Any:
    names = frozenset(f.lower() for f in fields)
    return _redact(value, names)


def _redact(value: Any, names: frozenset[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: MASK if str(k).lower() in names else _redact(v, names) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, names) for v in value]
    return value

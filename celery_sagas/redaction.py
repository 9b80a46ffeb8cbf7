"""Redaction of secrets (card numbers, addresses, ...) before anything is shown or logged.

Pure: ``redact(value, fields)`` returns a copy with the value of every mapping key named in
``fields`` (case-insensitive, at any depth) replaced by ``"***"``; ``scrub(text,
secret_values(payload, fields))`` masks those values inside free text (an error message
that quoted them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
MIN_SECRET = 3  # shorter values (a cvv digit…) would mask unrelated text; still masked in data


def redact(value: Any, fields: Iterable[str]) -> Any:
    names = frozenset(f.lower() for f in fields)
    return _redact(value, names)


def _redact(value: Any, names: frozenset[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: MASK if str(k).lower() in names else _redact(v, names) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, names) for v in value]
    return value


def secret_values(value: Any, fields: Iterable[str]) -> frozenset[str]:
    """The texts of every value under a key named in ``fields`` (at any depth): what must
    not appear in an error text either."""
    names = frozenset(f.lower() for f in fields)
    found: set[str] = set()
    _collect(value, names, False, found)
    return frozenset(v for v in found if len(v) >= MIN_SECRET)


def _collect(value: Any, names: frozenset[str], secret: bool, found: set[str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _collect(v, names, secret or str(k).lower() in names, found)
    elif isinstance(value, list | tuple):
        for v in value:
            _collect(v, names, secret, found)
    elif secret and value is not None and not isinstance(value, bool):
        found.add(str(value))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``"***"`` (longest first)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text

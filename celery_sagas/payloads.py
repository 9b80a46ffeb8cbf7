"""What a start accepts, checked in the caller before anything is written: a JSON object
within the size and depth limits, with a business key that fits its column (issue 9,
defect 6: a 1,000-deep order, a 10,000-character or NUL-bearing key used to fail later,
in a worker, with no error the caller could see)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery_sagas.definition import Saga
from celery_sagas.errors import InvalidPayloadError


@dataclass(frozen=True)
class PayloadLimits:
    """What a start accepts (settings ``max_payload_bytes``, ``max_payload_depth``,
    ``max_key_length``): checked in the caller, so nothing fails later in a worker."""

    max_bytes: int = 65536
    max_depth: int = 32
    max_key_length: int = 200  # the business_key column is VARCHAR(200)


def payload_depth(payload: Any, stop_after: int) -> int:
    """How deeply ``payload`` nests (a flat object is 1), without recursion; stops counting
    past ``stop_after`` (a 100,000-deep payload costs no more than a ``stop_after`` one)."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(payload, 1)]
    while pending:
        value, depth = pending.pop()
        if not isinstance(value, Mapping | list | tuple):
            continue
        deepest = max(deepest, depth)
        if deepest > stop_after:
            return deepest
        children = value.values() if isinstance(value, Mapping) else value
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _check_shape(saga: Saga, payload: Any, limits: PayloadLimits) -> None:
    if not isinstance(payload, Mapping):
        raise InvalidPayloadError(f"{saga.name}: payload must be a JSON object, got {payload!r}")
    depth = payload_depth(payload, limits.max_depth)
    if depth > limits.max_depth:
        raise InvalidPayloadError(
            f"{saga.name}: payload nests deeper than max_payload_depth={limits.max_depth}"
        )
    try:
        size = len(json.dumps(payload, separators=(",", ":")).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidPayloadError(f"{saga.name}: payload is not JSON serialisable: {exc}") from exc
    if size > limits.max_bytes:
        raise InvalidPayloadError(
            f"{saga.name}: payload is {size} bytes of JSON, over "
            f"max_payload_bytes={limits.max_bytes}"
        )


def _check_key(saga: Saga, key: str, limits: PayloadLimits) -> None:
    if not key:
        raise InvalidPayloadError(f"{saga.name}: the business key is empty")
    if len(key) > limits.max_key_length:
        raise InvalidPayloadError(
            f"{saga.name}: the business key is {len(key)} characters, over "
            f"max_key_length={limits.max_key_length}"
        )
    if "\x00" in key:
        raise InvalidPayloadError(f"{saga.name}: the business key contains a NUL character")


def check_payload(saga: Saga, payload: Any, limits: PayloadLimits | None = None) -> str:
    """Validate a payload for ``saga``: a JSON object within ``limits`` (size, depth) whose
    business key is present, short enough and free of NUL characters, and that passes
    the saga's own ``validate``. Returns the business key or raises
    ``InvalidPayloadError`` (nothing is written)."""
    limits = limits or PayloadLimits()
    _check_shape(saga, payload, limits)
    if saga.validate is not None:
        saga.validate(payload)
    try:
        key = saga.key_for(payload)
    except (KeyError, TypeError) as exc:
        raise InvalidPayloadError(f"{saga.name}: payload has no business key ({exc})") from exc
    _check_key(saga, key, limits)
    return key

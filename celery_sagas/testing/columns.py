"""What the SQL columns do to values, so the in-memory store hands back the same."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def as_json(value: Any) -> Any:
    """A JSON round trip: what a JSON column hands back (and a TypeError for what it refuses)."""
    return json.loads(json.dumps(value))


def as_utc(when: datetime) -> datetime:
    """What a ``UtcDateTime`` column stores: aware datetimes in UTC; naive ones refused."""
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: use timezone-aware datetimes")
    return when.astimezone(UTC)

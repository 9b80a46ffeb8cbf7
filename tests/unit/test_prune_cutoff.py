"""``--finished-before``: an age before now, or an ISO 8601 timestamp with a timezone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from celery_sagas.cli.prune import parse_cutoff

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "cutoff"),
    [
        ("30d", NOW - timedelta(days=30)),
        ("12h", NOW - timedelta(hours=12)),
        (" 90m ", NOW - timedelta(minutes=90)),
        ("45s", NOW - timedelta(seconds=45)),
        ("2w", NOW - timedelta(weeks=2)),
        ("1.5d", NOW - timedelta(hours=36)),
        ("2026-11-01T00:00:00Z", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T02:00:00+02:00", datetime(2026, 11, 1, tzinfo=UTC)),
    ],
)
def test_ages_and_timestamps(text: str, cutoff: datetime) -> None:
    parsed = parse_cutoff(text, NOW)
    assert parsed == cutoff and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("30", "neither an age"),
        ("d30", "neither an age"),
        ("-3d", "neither an age"),
        ("0h", "not a positive age"),
        ("2026-11-01", "has no timezone"),
        ("2026-12-03T00:00:00Z", "in the future"),
    ],
)
def test_what_is_refused_and_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_cutoff(text, NOW)

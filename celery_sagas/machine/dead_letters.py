"""The dead-letter entry's life, as pure rules both stores apply (the SQL store as column
values, the in-memory fake on its records): which status may follow which, and the fields
a move sets."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any


class DeadLetterStatus(StrEnum):
    """dead -> retrying -> resolved | dead again; dead -> discarded (fixed by hand)."""

    DEAD = "dead"
    RETRYING = "retrying"
    RESOLVED = "resolved"
    DISCARDED = "discarded"


# an entry an operator (or the recovery worker) still has to act on
OPEN_DEAD_LETTER = (DeadLetterStatus.DEAD, DeadLetterStatus.RETRYING)
# which statuses a move to a status may start from ("dead" is written by its own rule:
# a new entry, or one dead again)
ALLOWED_FROM: dict[str, tuple[DeadLetterStatus, ...]] = {
    DeadLetterStatus.RETRYING: (DeadLetterStatus.DEAD,),
    DeadLetterStatus.DISCARDED: (DeadLetterStatus.DEAD,),
    DeadLetterStatus.RESOLVED: (DeadLetterStatus.RETRYING,),
}


def moved_values(status: str, now: datetime, resolution: str | None = None) -> dict[str, Any]:
    """The fields a move to ``status`` (not ``dead``) sets on an entry."""
    values: dict[str, Any] = {"status": DeadLetterStatus(status).value, "updated_at": now}
    if resolution:
        values["resolution"] = resolution
    if status in (DeadLetterStatus.RESOLVED, DeadLetterStatus.DISCARDED):
        values["resolved_at"] = now
    return values

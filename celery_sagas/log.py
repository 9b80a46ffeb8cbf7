"""The library's logger. It never configures handlers: the application or the CLI does."""

from __future__ import annotations

import logging

logger = logging.getLogger("celery_sagas")


def log_transition(
    saga_id: str, saga: str, step: str | None, old: str, new: str, reason: str | None
) -> None:
    logger.info(
        "saga %s %s %s→%s",
        saga_id,
        step or "-",
        old,
        new,
        extra={
            "saga_id": saga_id,
            "saga": saga,
            "step": step,
            "from": old,
            "to": new,
            "reason": reason,
        },
    )

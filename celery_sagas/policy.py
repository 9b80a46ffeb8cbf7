"""Retry policy: a pure decision (attempt, error, now -> retry at / give up).

The declared ``RetryPolicy`` values live with the other declarations in ``definition``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery_sagas.definition import RetryPolicy

__all__ = ["GiveUp", "RetryAt", "RetryDecision", "RetryPolicy", "decide_retry"]


@dataclass(frozen=True)
class RetryAt:
    when: datetime
    delay: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


RetryDecision = RetryAt | GiveUp


def decide_retry(
    policy: RetryPolicy,
    attempts_made: int,
    retryable: bool,
    now: datetime,
    rand: float | None = None,
) -> RetryDecision:
    """Whether to retry after ``attempts_made`` failed attempts, and when."""
    if not retryable:
        return GiveUp("not retryable")
    if attempts_made > policy.max_retries:
        return GiveUp(f"{attempts_made} attempts made, max_retries={policy.max_retries}")
    delay = policy.delay(attempts_made, random.random() if rand is None else rand)
    return RetryAt(when=now + timedelta(seconds=delay), delay=delay)

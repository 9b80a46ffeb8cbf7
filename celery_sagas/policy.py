"""Retry policy: a pure decision (attempt, error, now -> retry at / give up)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery_sagas.errors import SagaDefinitionError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: delay = min(cap, base * 2**(attempt-1)), then jitter.

    ``attempt`` counts attempts made so far (1 after the first failure). ``jitter``
    is the fraction of the delay that is randomised (1.0 = full jitter, 0 = none).
    """

    max_retries: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise SagaDefinitionError("must be >= 0", field="retry.max_retries")
        if self.backoff_base <= 0:
            raise SagaDefinitionError("must be > 0", field="retry.backoff_base")
        if self.backoff_cap < self.backoff_base:
            raise SagaDefinitionError("must be >= backoff_base", field="retry.backoff_cap")
        if not 0 <= self.jitter <= 1:
            raise SagaDefinitionError("must be between 0 and 1", field="retry.jitter")

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait after failed attempt number ``attempt``; ``rand`` in [0, 1)."""
        raw = min(self.backoff_cap, self.backoff_base * 2.0 ** min(max(0, attempt - 1), 64))
        return raw * (1 - self.jitter) + raw * self.jitter * rand


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

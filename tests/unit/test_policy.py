"""Retry policy as tables: delay(attempt, rand) and decide_retry(...)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from celery_sagas.errors import SagaDefinitionError
from celery_sagas.policy import GiveUp, RetryAt, RetryPolicy, decide_retry

NOW = datetime(2026, 1, 1, tzinfo=UTC)
NO_JITTER = RetryPolicy(max_retries=3, backoff_base=1.0, backoff_cap=60.0, jitter=0)


@pytest.mark.parametrize(
    ("policy", "attempt", "expected"),
    [
        pytest.param(NO_JITTER, 0, 1.0, id="attempt-0-is-base"),
        pytest.param(NO_JITTER, 1, 1.0, id="attempt-1"),
        pytest.param(NO_JITTER, 2, 2.0, id="attempt-2"),
        pytest.param(NO_JITTER, 3, 4.0, id="attempt-3"),
        pytest.param(NO_JITTER, 6, 32.0, id="attempt-6"),
        pytest.param(NO_JITTER, 7, 60.0, id="attempt-7-capped"),
        pytest.param(NO_JITTER, 30, 60.0, id="attempt-30-capped"),
        pytest.param(RetryPolicy(backoff_base=0.5, backoff_cap=10, jitter=0), 1, 0.5, id="b0.5-1"),
        pytest.param(RetryPolicy(backoff_base=0.5, backoff_cap=10, jitter=0), 4, 4.0, id="b0.5-4"),
        pytest.param(RetryPolicy(backoff_base=0.5, backoff_cap=10, jitter=0), 6, 10.0, id="b0.5-6"),
        pytest.param(RetryPolicy(backoff_base=5, backoff_cap=5, jitter=0), 9, 5.0, id="cap=base"),
    ],
)
@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_delay_without_jitter_is_exact(
    policy: RetryPolicy, attempt: int, expected: float, rand: float
) -> None:
    assert policy.delay(attempt, rand) == expected


@pytest.mark.parametrize(
    ("jitter", "attempt", "rand", "expected"),
    [
        pytest.param(1.0, 3, 0.0, 0.0, id="full-low"),
        pytest.param(1.0, 3, 0.5, 2.0, id="full-mid"),
        pytest.param(1.0, 3, 0.75, 3.0, id="full-high"),
        pytest.param(1.0, 10, 0.5, 30.0, id="full-capped"),
        pytest.param(0.5, 3, 0.0, 2.0, id="half-low"),
        pytest.param(0.5, 3, 0.5, 3.0, id="half-mid"),
        pytest.param(0.5, 10, 0.0, 30.0, id="half-capped-low"),
        pytest.param(0.25, 2, 1.0, 2.0, id="quarter-top"),
    ],
)
def test_delay_with_jitter(jitter: float, attempt: int, rand: float, expected: float) -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=60.0, jitter=jitter)
    assert policy.delay(attempt, rand) == pytest.approx(expected)


@pytest.mark.parametrize("jitter", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("attempt", [1, 2, 5, 8, 12])
@pytest.mark.parametrize("rand", [0.0, 0.1, 0.5, 0.9, 0.999999])
def test_jittered_delay_stays_within_bounds(jitter: float, attempt: int, rand: float) -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=60.0, jitter=jitter)
    raw = min(60.0, 2.0 ** (attempt - 1))

    delay = policy.delay(attempt, rand)

    assert raw * (1 - jitter) <= delay <= raw
    if jitter > 0:
        assert delay < raw  # rand < 1 never reaches the full delay
    else:
        assert delay == raw


def test_full_jitter_is_monotonic_in_rand() -> None:
    policy = RetryPolicy(jitter=1.0)
    delays = [policy.delay(4, rand / 10) for rand in range(10)]
    assert delays == sorted(delays)
    assert delays[0] == 0.0


@pytest.mark.parametrize(
    ("max_retries", "attempts_made", "retry"),
    [
        pytest.param(3, 1, True, id="3-after-1"),
        pytest.param(3, 2, True, id="3-after-2"),
        pytest.param(3, 3, True, id="3-after-3"),
        pytest.param(3, 4, False, id="3-after-4"),
        pytest.param(3, 9, False, id="3-after-9"),
        pytest.param(0, 1, False, id="0-after-1"),
        pytest.param(1, 1, True, id="1-after-1"),
        pytest.param(1, 2, False, id="1-after-2"),
    ],
)
def test_decide_retry_until_max_retries(max_retries: int, attempts_made: int, retry: bool) -> None:
    policy = RetryPolicy(max_retries=max_retries, backoff_base=2.0, backoff_cap=100.0, jitter=0)

    decision = decide_retry(policy, attempts_made, retryable=True, now=NOW, rand=0.5)

    if retry:
        delay = 2.0 * 2 ** (attempts_made - 1)
        assert decision == RetryAt(when=NOW + timedelta(seconds=delay), delay=delay)
    else:
        assert decision == GiveUp(f"{attempts_made} attempts made, max_retries={max_retries}")


@pytest.mark.parametrize("attempts_made", [1, 2, 10])
def test_decide_retry_gives_up_when_not_retryable(attempts_made: int) -> None:
    decision = decide_retry(RetryPolicy(), attempts_made, retryable=False, now=NOW, rand=0.5)
    assert decision == GiveUp("not retryable")


def test_decide_retry_applies_jitter_to_when() -> None:
    policy = RetryPolicy(backoff_base=4.0, backoff_cap=60.0, jitter=1.0)

    decision = decide_retry(policy, 2, retryable=True, now=NOW, rand=0.25)

    assert decision == RetryAt(when=NOW + timedelta(seconds=2), delay=2.0)
    assert decision.when.tzinfo is UTC


def test_decide_retry_draws_its_own_random_number() -> None:
    policy = RetryPolicy(backoff_base=10.0, backoff_cap=60.0, jitter=0.5)

    decisions = [decide_retry(policy, 1, retryable=True, now=NOW) for _ in range(20)]

    for decision in decisions:
        assert isinstance(decision, RetryAt)
        assert 5.0 <= decision.delay <= 10.0
        assert decision.when == NOW + timedelta(seconds=decision.delay)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        pytest.param({"max_retries": -1}, "retry.max_retries", id="negative-retries"),
        pytest.param({"backoff_base": 0}, "retry.backoff_base", id="zero-base"),
        pytest.param({"backoff_base": -1}, "retry.backoff_base", id="negative-base"),
        pytest.param({"backoff_base": 10, "backoff_cap": 5}, "retry.backoff_cap", id="cap<base"),
        pytest.param({"jitter": -0.1}, "retry.jitter", id="negative-jitter"),
        pytest.param({"jitter": 1.5}, "retry.jitter", id="jitter>1"),
        pytest.param({"jitter": float("nan")}, "retry.jitter", id="nan-jitter"),
    ],
)
def test_invalid_policy_names_the_field(options: dict[str, float], field: str) -> None:
    with pytest.raises(SagaDefinitionError) as caught:
        RetryPolicy(**options)  # type: ignore[arg-type]
    assert caught.value.field == field


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": 0},
        {"backoff_base": 3, "backoff_cap": 3},
        {"jitter": 0},
        {"jitter": 1},
    ],
    ids=["no-retries", "cap=base", "no-jitter", "full-jitter"],
)
def test_edge_policies_are_valid(options: dict[str, float]) -> None:
    RetryPolicy(**options)  # type: ignore[arg-type]

"""``SagaHandle`` and ``find``: reading a saga's outcome from the saga database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from celery_sagas import SagaState, StepStatus
from celery_sagas.errors import AmbiguousSagaError, SagaNotFoundError, SagaTimeoutError
from celery_sagas.handle import SagaHandle, find
from celery_sagas.protocols import SagaRecord, StepRecord

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def record(
    saga_id: str, name: str = "shop", key: str = "A-1", state: SagaState = SagaState.PENDING
) -> SagaRecord:
    return SagaRecord(
        saga_id=saga_id,
        name=name,
        business_key=key,
        state=state,
        current_step=0,
        token=1,
        version=1,
        payload={},
        created_at=NOW,
        updated_at=NOW,
        steps=(StepRecord(0, "pay", StepStatus.COMPLETED, result={"id": 1}),),
    )


class Reader:
    def __init__(self, *records: SagaRecord) -> None:
        self.records = {r.saga_id: r for r in records}
        self.loads = 0

    def load(self, saga_id: str) -> SagaRecord | None:
        self.loads += 1
        return self.records.get(saga_id)

    def keyed(self, business_key: str) -> tuple[SagaRecord, ...]:
        return tuple(r for r in self.records.values() if r.business_key == business_key)


def test_find_by_id_then_by_business_key_and_name() -> None:
    reader = Reader(record("s-1"), record("s-2", name="refund", key="A-2"))
    assert find(reader, "s-1").saga_id == "s-1"
    assert find(reader, "A-2").saga_id == "s-2"
    assert find(reader, "A-2", name="refund").saga_id == "s-2"
    with pytest.raises(SagaNotFoundError, match="of type 'shop'"):
        find(reader, "A-2", name="shop")
    with pytest.raises(SagaNotFoundError):
        find(reader, "nope")


def test_a_key_used_by_several_saga_types_is_an_error_listing_them() -> None:
    reader = Reader(record("s-1", name="shop"), record("s-2", name="refund"))
    with pytest.raises(AmbiguousSagaError, match=r"shop \(saga s-1\)") as raised:
        find(reader, "A-1")
    assert raised.value.details["names"] == ["refund", "shop"]
    assert find(reader, "A-1", name="refund").saga_id == "s-2"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_polls_until_the_saga_settles_and_returns_its_outcome() -> None:
    reader = Reader(record("s-1"))
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now >= 1.0:  # the saga completes after a second
            reader.records["s-1"] = replace(reader.records["s-1"], state=SagaState.COMPLETED)

    handle = SagaHandle(reader, "s-1", clock=clock, sleep=sleep)
    outcome = handle.wait(timeout=5, interval=0.25)
    assert outcome.state == SagaState.COMPLETED and outcome.results == {"pay": {"id": 1}}
    assert reader.loads == 5
    assert handle.id == handle.saga_id == "s-1"


def test_wait_raises_a_clear_error_on_timeout() -> None:
    clock = Clock()
    handle = SagaHandle(Reader(record("s-1")), "s-1", clock=clock, sleep=clock.sleep)
    with pytest.raises(SagaTimeoutError, match=r"did not settle within 2s \(it is PENDING\)"):
        handle.wait(timeout=2, interval=0.5)
    assert clock.now == pytest.approx(2.0)


@pytest.mark.parametrize("state", [SagaState.FAILED, SagaState.COMPENSATION_FAILED])
def test_wait_returns_failed_and_compensation_failed_outcomes(state: SagaState) -> None:
    handle = SagaHandle(Reader(record("s-1", state=state)), "s-1")
    assert handle.wait(timeout=0).state == state
    assert handle.state() == state


def test_a_handle_on_a_rolled_back_start_says_so() -> None:
    with pytest.raises(SagaNotFoundError, match="rolled back"):
        SagaHandle(Reader(), "s-gone").state()

"""``StepReply``: one frozen value in the code, JSON only at the Celery edge, and the JSON
byte for byte what step tasks sent before it existed (a rolling deploy mixes workers: a
new coordinator reads an old worker's reply and an old one reads a new worker's)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_sagas.integration.steps import carried, from_carried, handed_down
from celery_sagas.integration.tasks import handed_guard
from celery_sagas.machine import (
    CompensationFailed,
    CompensationSucceeded,
    Event,
    Role,
    StepFailed,
    StepSucceeded,
)
from celery_sagas.protocols import GuardOutcome, GuardRecord
from celery_sagas.runner import Finished
from celery_sagas.step_reply import StepReply

TRACE = 'Traceback (most recent call last):\n  File "x.py"\nValueError: boom\n'

# the dicts the runner built before ``StepReply``, literally (key order included)
OLD_OK = {"outcome": "ok", "result": {"id": 7}, "error": None, "attempts": 1}
OLD_BUSINESS = {"outcome": "business", "result": None, "error": "No stock", "attempts": 2}
OLD_ERROR = {
    "outcome": "error",
    "result": None,
    "error": "ValueError: boom",
    "attempts": 3,
    "traceback": TRACE,
}
OLD_TIMED_OUT = {**OLD_ERROR, "timed_out": True}
OLD_DUPLICATE = {"outcome": "ok", "result": {"id": 7}, "error": None}  # a recorded outcome


@pytest.mark.parametrize(
    ("old", "action", "compensation"),
    [
        (
            OLD_OK,
            StepSucceeded(2, 9, {"id": 7}, 1),
            CompensationSucceeded(2, 9, {"id": 7}, 1),
        ),
        (
            OLD_BUSINESS,
            StepFailed(2, 9, "No stock", True, 2),
            CompensationFailed(2, 9, "No stock", 2),
        ),
        (
            OLD_ERROR,
            StepFailed(2, 9, "ValueError: boom", False, 3),
            CompensationFailed(2, 9, "ValueError: boom", 3, TRACE),
        ),
        (
            OLD_TIMED_OUT,
            StepFailed(2, 9, "ValueError: boom", False, 3, timed_out=True),
            CompensationFailed(2, 9, "ValueError: boom", 3, TRACE),
        ),
        (
            OLD_DUPLICATE,
            StepSucceeded(2, 9, {"id": 7}),
            CompensationSucceeded(2, 9, {"id": 7}),
        ),
    ],
)
def test_an_old_reply_reads_as_the_same_event_and_writes_back_the_same_bytes(
    old: dict[str, Any], action: Event, compensation: Event
) -> None:
    reply = StepReply.from_json(json.loads(json.dumps(old)))
    assert reply.event(Role.ACTION, 2, 9) == action
    assert reply.event(Role.COMPENSATION, 2, 9) == compensation
    assert json.dumps(reply.to_json()) == json.dumps(old)


def test_a_reply_is_typed_in_the_code() -> None:
    reply = StepReply.from_json(OLD_TIMED_OUT)
    assert reply == StepReply(GuardOutcome.ERROR, None, "ValueError: boom", 3, TRACE, True)
    assert reply.outcome is GuardOutcome.ERROR
    assert type(reply.to_json()["outcome"]) is str


@pytest.mark.parametrize("outcome", [None, "started", "weird", ["ok"]])
def test_a_malformed_outcome_is_an_error_as_before(outcome: Any) -> None:
    reply = StepReply.from_json({"outcome": outcome})
    assert reply.event(Role.ACTION, 0, 1) == StepFailed(0, 1, "unknown error", False)
    assert reply.event(Role.COMPENSATION, 0, 1) == CompensationFailed(0, 1, "unknown error")


def test_the_chain_hand_down_is_the_old_shape_with_the_guard_key() -> None:
    key = "s-1:reserve:action"
    run = Finished(StepReply.from_json(OLD_OK), GuardRecord(key, GuardOutcome.OK, {"id": 7}), None)
    handed = handed_down(run)
    assert json.dumps(handed) == json.dumps({**OLD_OK, "key": key})
    # and the coordinator task reads an old worker's hand-down into the same guard
    reply = StepReply.from_json({**OLD_OK, "key": key})
    assert handed_guard(Role.ACTION, reply, key) == GuardRecord(key, GuardOutcome.OK, {"id": 7})
    assert handed_down(Finished(reply, None, None)) == OLD_OK  # nothing to record: no key


def test_a_failed_compensation_handed_down_records_no_guard() -> None:
    reply = StepReply.from_json(OLD_ERROR)
    assert handed_guard(Role.COMPENSATION, reply, "s-1:reserve:compensation") is None
    assert handed_guard(Role.ACTION, reply, None) is None


def test_a_store_retry_carries_the_old_shape_and_reads_it_back() -> None:
    key = "s-1:reserve:action"
    old_carried = {
        "outcome": OLD_BUSINESS,
        "guard": {"outcome": "business", "result": None, "error": "No stock", "key": key},
        "tries": 2,
    }
    run = from_carried(json.loads(json.dumps(old_carried)))
    assert run.reply == StepReply(GuardOutcome.BUSINESS, None, "No stock", 2)
    assert run.to_record == GuardRecord(key, GuardOutcome.BUSINESS, None, "No stock")
    assert json.dumps(carried(run, 2)) == json.dumps(old_carried)

"""What a start refuses in the caller (issue 9, defect 6): too deep, too large, a key too
long or with a NUL byte — each an ``InvalidPayloadError`` naming the limit, never a
``RecursionError`` or a failure later in a worker."""

from __future__ import annotations

from typing import Any

import pytest

from celery_sagas import InvalidPayloadError, Saga, Step
from celery_sagas.errors import SagaConfigurationError
from celery_sagas.payloads import PayloadLimits, check_payload, payload_depth
from celery_sagas.settings import SagaSettings


def noop(_: Any) -> None:
    return None


SAGA = Saga(
    "shop", business_key="order_id", steps=[Step("pay", noop, noop, compensation_name="refund")]
)


def nested(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"order_id": "A-1"}
    inner = payload
    for _ in range(depth - 1):
        inner["child"] = {}
        inner = inner["child"]
    return payload


@pytest.mark.parametrize(
    ("payload", "depth"),
    [({}, 1), ({"a": 1}, 1), ({"a": [1, 2]}, 2), ({"a": [{"b": {}}]}, 4), (nested(5), 5)],
)
def test_payload_depth_counts_objects_and_lists(payload: Any, depth: int) -> None:
    assert payload_depth(payload, 100) == depth


def test_a_payload_a_thousand_deep_is_refused_without_recursion() -> None:
    with pytest.raises(InvalidPayloadError, match="max_payload_depth=32"):
        check_payload(SAGA, nested(1000))
    with pytest.raises(InvalidPayloadError, match="max_payload_depth"):
        check_payload(SAGA, nested(100_000))


def test_the_depth_limit_is_inclusive() -> None:
    limits = PayloadLimits(max_depth=5)
    assert check_payload(SAGA, nested(5), limits) == "A-1"
    with pytest.raises(InvalidPayloadError):
        check_payload(SAGA, nested(6), limits)


def test_a_payload_over_the_size_limit_is_refused_naming_its_size() -> None:
    limits = PayloadLimits(max_bytes=100)
    small = {"order_id": "A-1", "note": "x" * 50}
    assert check_payload(SAGA, small, limits) == "A-1"
    with pytest.raises(InvalidPayloadError, match=r"\d+ bytes of JSON, over max_payload_bytes=100"):
        check_payload(SAGA, {"order_id": "A-1", "note": "x" * 100}, limits)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("x" * 10_000, "10000 characters, over max_key_length=200"),
        ("A\x00B", "NUL character"),
        ("", "empty"),
    ],
    ids=["long", "nul", "empty"],
)
def test_a_bad_business_key_is_refused(key: str, message: str) -> None:
    with pytest.raises(InvalidPayloadError, match=message):
        check_payload(SAGA, {"order_id": key})


def test_a_key_of_exactly_the_limit_is_accepted() -> None:
    assert check_payload(SAGA, {"order_id": "k" * 200}) == "k" * 200


@pytest.mark.parametrize(
    "payload", [["a"], None, {"order_id": "A", "when": object()}], ids=["list", "none", "object"]
)
def test_non_json_payloads_are_refused(payload: Any) -> None:
    with pytest.raises(InvalidPayloadError):
        check_payload(SAGA, payload)


def test_limits_are_settings_with_sane_defaults() -> None:
    settings = SagaSettings.from_config({}, database_url="sqlite://")
    assert (settings.max_payload_bytes, settings.max_payload_depth, settings.max_key_length) == (
        65536,
        32,
        200,
    )
    custom = SagaSettings.from_config(
        {"sagas_max_payload_bytes": 1024}, database_url="sqlite://", max_payload_depth=4
    )
    assert (custom.max_payload_bytes, custom.max_payload_depth) == (1024, 4)


@pytest.mark.parametrize(
    "bad",
    [{"max_payload_bytes": 0}, {"max_payload_depth": -1}, {"max_key_length": 201}],
    ids=["bytes", "depth", "key-over-column"],
)
def test_bad_limits_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(SagaConfigurationError):
        SagaSettings.from_config({}, database_url="sqlite://", **bad)

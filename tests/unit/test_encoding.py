"""Step results as JSON: datetime, Decimal and UUID converted; anything else refused at once,
naming the step and where the value sits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from celery_sagas.encoding import ResultNotSerialisableError, encode_result
from celery_sagas.errors import SagaError

SHIPMENT = UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (None, None),
        (True, True),
        (3, 3),
        (2.5, 2.5),
        ("text", "text"),
        (datetime(2026, 12, 2, 13, 10, tzinfo=UTC), "2026-12-02T13:10:00+00:00"),
        (
            datetime(2026, 12, 2, 13, 10, 5, 120, tzinfo=timezone(timedelta(hours=2))),
            "2026-12-02T13:10:05.000120+02:00",
        ),
        (date(2026, 12, 2), "2026-12-02"),
        (time(13, 10), "13:10:00"),
        (Decimal("12.50"), "12.50"),
        (SHIPMENT, "12345678-1234-5678-1234-567812345678"),
        ((1, "a"), [1, "a"]),
        (
            {"shipment_id": SHIPMENT, "at": datetime(2026, 1, 1, tzinfo=UTC), "lines": [(1, 2)]},
            {
                "shipment_id": "12345678-1234-5678-1234-567812345678",
                "at": "2026-01-01T00:00:00+00:00",
                "lines": [[1, 2]],
            },
        ),
    ],
)
def test_json_values_and_the_documented_conversions(value: Any, encoded: Any) -> None:
    result = encode_result(value, "create_shipment")

    assert result == encoded
    assert json.loads(json.dumps(result, allow_nan=False)) == encoded


@dataclass
class Parcel:
    weight: int


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({1, 2}, "result is a builtins.set"),
        (b"raw", "result is a builtins.bytes"),
        (Parcel(3), "test_encoding.Parcel (Parcel(weight=3))"),
        ({"parcels": [1, {"box": object()}]}, "result['parcels'][1]['box'] is a builtins.object"),
        ({1: "one"}, "result has the key 1: JSON object keys must be text"),
        (float("nan"), "result is nan"),
        ({"total": Decimal("Infinity")}, "result['total'] is Decimal('Infinity')"),
    ],
)
def test_anything_else_fails_naming_the_step_and_the_value(value: Any, where: str) -> None:
    with pytest.raises(ResultNotSerialisableError) as raised:
        encode_result(value, "create_shipment")

    message = str(raised.value)
    assert "result of create_shipment is not JSON-serialisable: " in message
    assert where in message
    assert raised.value.step == "create_shipment"
    assert isinstance(raised.value, SagaError)
    assert raised.value.code == "result_not_serialisable"


def test_a_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(ResultNotSerialisableError) as raised:
        encode_result({"blob": Parcel(10**200)}, "pack")

    assert len(raised.value.reason) < 400
    assert "…" in raised.value.reason


def test_the_input_is_not_changed() -> None:
    value = {"at": datetime(2026, 1, 1, tzinfo=UTC), "ids": [SHIPMENT]}
    before = dict(value)

    encode_result(value)

    assert value == before

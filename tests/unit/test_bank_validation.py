"""``validate_transfer`` refuses each kind of bad transfer with a message naming the
problem, and the README's sample transfer is a good one."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import pytest

from celery_sagas.errors import InvalidPayloadError
from workers.validation import validate_transfer

GOOD: dict[str, Any] = {
    "transfer_id": "TR-1",
    "source": "ACC-1",
    "target": "ACC-2",
    "amount": 2500,
    "simulate": {"credit_target": "transient:1"},
}
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def transfer_with(**changes: Any) -> dict[str, Any]:
    transfer = dict(GOOD)
    for field, value in changes.items():
        if value is None:
            transfer.pop(field)
        else:
            transfer[field] = value
    return transfer


def test_a_good_transfer_passes() -> None:
    validate_transfer(GOOD)


@pytest.mark.parametrize(
    ("transfer", "message"),
    [
        (["TR-1"], "transfer must be a dict, got list"),
        (transfer_with(transfer_id=None), "transfer_id is missing"),
        (transfer_with(source=""), "source must be a non-empty string"),
        (transfer_with(target=7), "target must be a non-empty string, got 7"),
        (transfer_with(target="ACC-1"), "source and target must be different accounts"),
        (transfer_with(amount=None), "amount must be a positive integer"),
        (transfer_with(amount=0), "amount must be a positive integer"),
        (transfer_with(amount=12.5), r"amount must be a positive integer \(cents\), got 12.5"),
        (transfer_with(amount=True), "amount must be a positive integer"),
        (transfer_with(simulate={"notify": "explode"}), r"simulate\['notify'\] must be one of"),
        (transfer_with(hang_seconds=-1), "hang_seconds must be a non-negative number"),
        (transfer_with(note=math.inf), "transfer must be JSON-serialisable"),
    ],
)
def test_a_bad_transfer_is_refused_naming_the_problem(transfer: Any, message: str) -> None:
    with pytest.raises(InvalidPayloadError, match=message):
        validate_transfer(transfer)


def test_the_readme_sample_transfer_is_valid_between_accounts_it_opens() -> None:
    start = README.index("## Example: bank transfer")
    block = README[README.index("```python\n", start) : README.index("\n```\n", start)]
    opened = ast.literal_eval(block[block.index("open_accounts(") + 14 : block.index(", frozen")])
    payload = ast.literal_eval(block[block.index(".delay(\n") + 8 : block.rindex("\n)")].strip())
    validate_transfer(payload)
    assert {payload["source"], payload["target"]} <= set(opened)
    assert opened[payload["source"]] >= payload["amount"]

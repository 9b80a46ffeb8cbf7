"""The chaos matrix's transition-log rules, on hand-written logs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chaos.truth import Findings, _check_saga_log


def log(*rows: tuple[str | None, str, str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=n, step=s, old=o, new=w) for n, (s, o, w) in enumerate(rows, 1)]


HAPPY = [
    (None, "-", "STARTED"),
    ("a", "pending", "running"),
    ("a", "running", "completed"),
    (None, "STARTED", "PENDING"),
    ("b", "pending", "running"),
    ("b", "running", "completed"),
    (None, "PENDING", "COMPLETED"),
]


def check(rows: list[tuple[str | None, str, str]]) -> Findings:
    found = Findings()
    _check_saga_log("S", log(*rows), found)
    return found


def test_a_clean_log_has_no_findings() -> None:
    found = check(HAPPY)
    assert (found.illegal, found.double_compensation) == ([], [])


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        ([*HAPPY[:3], ("a", "running", "completed")], "completed twice"),
        ([*HAPPY, ("b", "completed", "compensating")], "after the saga was COMPLETED"),
        ([*HAPPY[:3], ("a", "pending", "running")], "previous state was completed"),
        (
            [*HAPPY[:5], (None, "PENDING", "COMPENSATING"), ("b", "running", "completed")],
            "forward step after compensation began",
        ),
    ],
)
def test_illegal_transitions_are_found(rows: list[tuple[str | None, str, str]], why: str) -> None:
    assert any(why in line for line in check(rows).illegal)


def test_a_step_compensated_twice_is_a_double_compensation() -> None:
    rows = [
        *HAPPY[:3],
        (None, "STARTED", "COMPENSATING"),
        ("a", "completed", "compensating"),
        ("a", "compensating", "compensated"),
        ("a", "compensated", "compensated"),
    ]
    assert any("compensated twice" in line for line in check(rows).double_compensation)

"""How the demo wires in the order choreography's own invariant checks: none reported is
itself a broken invariant, so the demo cannot pass by checking nothing."""

from __future__ import annotations

from typing import Any

import pytest

from workers import demo


def test_no_choreographed_orders_asked_runs_none() -> None:
    assert demo.run_choreography_if_present(0) is None


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (
            {"sagas": 5, "invariants": {"stock conserved": True, "nothing charged": 0}},
            {"choreography: stock conserved": True, "choreography: nothing charged": False},
        ),
        ({"sagas": 5}, {"choreography: reported its invariant checks": False}),
        ({"invariants": {}}, {"choreography: reported its invariant checks": False}),
    ],
)
def test_the_choreography_checks_join_the_demo_invariants(
    result: dict[str, Any], expected: dict[str, bool]
) -> None:
    assert demo.choreography_invariants(result) == expected

"""How the demo wires in the order choreography (``workers.choreography_demo``): run when
the module exists, skipped while it does not, its failures never hidden."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from workers import demo


def fake_module(result: dict[str, Any], calls: list[int]) -> types.ModuleType:
    module = types.ModuleType(demo.CHOREOGRAPHY_MODULE)

    def run_choreography(count: int) -> dict[str, Any]:
        calls.append(count)
        return result

    module.run_choreography = run_choreography  # type: ignore[attr-defined]
    return module


def test_the_choreography_runs_when_its_module_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    result = {"completed": 3, "invariants": {"stock conserved": True}}
    monkeypatch.setitem(sys.modules, demo.CHOREOGRAPHY_MODULE, fake_module(result, calls))
    assert demo.run_choreography_if_present(7) == result
    assert calls == [7]
    assert demo.run_choreography_if_present(0) is None
    assert calls == [7]


def test_without_the_module_the_demo_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, demo.CHOREOGRAPHY_MODULE, None)  # not importable
    assert demo.run_choreography_if_present(5) is None
    assert "the order choreography is not run" in capsys.readouterr().out


def test_a_missing_dependency_inside_the_module_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(name: str) -> Any:
        raise ModuleNotFoundError("No module named 'somedep'", name="somedep")

    monkeypatch.setattr(demo.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somedep"):
        demo.run_choreography_if_present(5)


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

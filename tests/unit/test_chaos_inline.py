"""``python -m chaos --inline-steps``: the option, which cases keep a step timeout or are
skipped in inline mode, and what the table shows of them (no servers run)."""

from __future__ import annotations

import json

import pytest

from chaos.__main__ import inline_notes, parse
from chaos.faults import CASES
from chaos.inline import KEEP_TIMEOUTS, SKIP, UNTIMED_ENV, environment, plan, untimed
from chaos.orders import SHIPMENT_TIMEOUT
from chaos.table import broken, render

SHIPMENT = "order_fulfillment.create_shipment"


def test_the_default_run_is_not_inline() -> None:
    assert parse([]).inline_steps is False
    assert parse(["--inline-steps", "--seed", "3"]).inline_steps is True


def test_inline_with_quick_keeps_the_quick_defaults() -> None:
    args = parse(["--inline-steps", "--quick"])
    assert (args.inline_steps, args.sagas, args.brokers) == (True, 20, ["redis"])


def test_every_named_case_exists() -> None:
    assert set(KEEP_TIMEOUTS) <= set(CASES)
    assert {case for case, _ in SKIP} <= set(CASES)
    assert {broker for _, broker in SKIP} <= {"redis", "rabbitmq"}


@pytest.mark.parametrize("case", ["hung", "late-replies"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_case_whose_faults_are_a_time_limit_keeps_create_shipments(
    case: str, broker: str
) -> None:
    chosen = plan(case, broker)
    assert chosen.skip is None
    assert chosen.timeouts == {SHIPMENT: SHIPMENT_TIMEOUT}
    assert "create_shipment 3 s" in chosen.note()
    assert "times that step itself" in chosen.note()
    assert json.loads(environment(chosen)["SAGAS_STEP_TIMEOUTS"]) == {SHIPMENT: SHIPMENT_TIMEOUT}


@pytest.mark.parametrize(
    "case",
    [
        "baseline",
        "child-kill",
        "worker-kill",
        "broker-restart",
        "pg-restart",
        "pg-flap",
        "two-beats",
        "replay",
        "forged",
    ],
)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_every_other_case_runs_every_step_untimed(case: str, broker: str) -> None:
    chosen = plan(case, broker)
    assert (chosen.skip, dict(chosen.timeouts)) == (None, {})
    assert environment(chosen) == {
        "SAGAS_INLINE_STEPS": "true",
        UNTIMED_ENV: "1",
        "SAGAS_STEP_TIMEOUTS": "{}",
    }


def test_the_notes_name_only_the_cases_inline_mode_changes() -> None:
    notes = inline_notes(list(CASES), ["redis", "rabbitmq"])
    named = sorted(line.split(":", 1)[0] for line in notes)
    assert named == [
        "hung/rabbitmq",
        "hung/redis",
        "late-replies/rabbitmq",
        "late-replies/redis",
    ]
    assert inline_notes(["baseline", "child-kill"], ["redis"]) == []


def test_a_skipped_case_shows_in_the_table_and_a_run_one_is_still_checked() -> None:
    skipped = {"case": "worker-kill", "broker": "redis", "skipped": "why"}
    ran = {
        "case": "child-kill",
        "broker": "redis",
        "inline": "inline",
        "logs": {"step_deliveries": 104, "abandoned": 3},
        "lost": ["C-1: PENDING"],
        "settle_s": None,
    }
    table = render([skipped, ran])
    assert "| worker-kill | redis | skipped in inline mode |" in table
    assert "inline, 104 step msgs, 3 abandoned re-sent" in table
    # the run row is as strictly checked as in the default mode
    assert len(broken([ran])) == 2


def test_untimed_declares_every_step_without_a_time_limit() -> None:
    from workers.sagas import order_fulfillment

    inline = untimed(order_fulfillment)
    assert [s.timeout for s in order_fulfillment.steps] == [300.0] * 4
    assert [s.timeout for s in inline.steps] == [None] * 4
    assert inline.fingerprint == order_fulfillment.fingerprint
    assert [s.compensation_name for s in inline.steps] == [
        s.compensation_name for s in order_fulfillment.steps
    ]
    assert (inline.on_completed, inline.on_failed) == (
        order_fulfillment.on_completed,
        order_fulfillment.on_failed,
    )


@pytest.mark.parametrize("case", ["hung", "late-replies", "baseline", "worker-kill"])
def test_timed_steps_keep_every_timeout_and_only_turn_inline_mode_on(case: str) -> None:
    chosen = plan(case, "redis", untimed=False)
    assert (chosen.skip, dict(chosen.timeouts), chosen.untimed) == (None, {}, False)
    assert environment(chosen) == {"SAGAS_INLINE_STEPS": "true"}
    assert chosen.table_note() == "inline, timed"
    assert "keeps its timeout" in chosen.note()


def test_timed_steps_needs_inline_steps() -> None:
    with pytest.raises(SystemExit):
        parse(["--timed-steps"])
    assert parse(["--inline-steps", "--timed-steps"]).timed_steps

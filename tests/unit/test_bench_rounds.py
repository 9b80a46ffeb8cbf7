"""The bench's pure parts: option parsing and the rounds' medians and ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench import IO_STEP_MS, parse_options
from bench.rounds import Round, format_latency, format_matrix, format_round, medians


def test_medians_of_figures_and_of_same_round_ratios() -> None:
    rounds = [Round(100.0, 50.0, 40.0), Round(200.0, 60.0, 100.0), Round(150.0, 90.0, 60.0)]
    found = medians(rounds)
    assert found["chains"] == 150.0
    assert found["sagas"] == 60.0
    assert found["dbos"] == 60.0
    # the median of the per-round ratios (0.5, 0.3, 0.6), not a ratio of medians (0.4)
    assert found["sagas/chains"] == pytest.approx(0.5)
    assert found["sagas/dbos"] == pytest.approx(1.25)  # 1.25, 0.6, 1.5


def test_rounds_without_dbos_have_no_dbos_figures() -> None:
    found = medians([Round(100.0, 70.0), Round(120.0, 60.0)])
    assert set(found) == {"chains", "sagas", "sagas/chains"}
    assert "dbos" not in format_round(1, Round(100.0, 70.0))


def test_the_io_matrix_waits_20_ms_per_step_unless_told() -> None:
    assert parse_options(["--io-matrix"]).step_ms == IO_STEP_MS == 20.0
    assert parse_options(["--io-matrix", "--step-ms", "5"]).step_ms == 5.0
    assert parse_options([]).step_ms == 0.0


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--step-ms", "-1"], ["--pool", "eventlet"]])
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_options(argv)


def test_matrix_table_has_a_row_per_worker() -> None:
    row = {
        "pool": "gevent",
        "concurrency": 200,
        "median": {
            "chains": 120.0,
            "sagas": 90.0,
            "sagas/chains": 0.75,
            "chain_cpu_ms": 6.0,
            "saga_cpu_ms": 11.5,
        },
        "saga_latency_ms": {"p50": 130.0},
        "chain_latency_ms": {"p50": 95.0},
    }
    table = format_matrix([row])
    assert table.splitlines()[1].split() == [
        "gevent",
        "-c",
        "200",
        "120.0",
        "90.0",
        "0.75",
        "130.0",
        "95.0",
        "6.0",
        "11.5",
    ]


def test_latency_line_names_both_percentiles_of_both() -> None:
    summary = {
        "saga_latency_ms": {"p50": 14.0, "p90": 15.0, "p99": 20.5},
        "chain_latency_ms": {"p50": 5.0, "p90": 6.0, "p99": 9.0},
    }
    assert format_latency(summary, 200) == (
        "latency one at a time (n=200): saga p50 14.0 / p99 20.5 ms, chain p50 5.0 / p99 9.0 ms"
    )


def test_chains_ack_late_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAGAS_DATABASE_URL", f"sqlite:///{tmp_path / 'bench.db'}")
    from bench.app import chain_delivery  # installs the bench's saga on import

    assert parse_options([]).chain_acks_late is False
    assert parse_options(["--chain-acks-late"]).chain_acks_late is True
    assert chain_delivery({"BENCH_CHAIN_ACKS_LATE": "true"}) == {
        "acks_late": True,
        "reject_on_worker_lost": True,
    }
    assert chain_delivery({"BENCH_CHAIN_ACKS_LATE": "false"}) == chain_delivery({}) == {}

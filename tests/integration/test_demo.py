"""``make demo`` is tested code: a smaller N on the embedded default and on Redis + PostgreSQL."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

REPO = Path(__file__).resolve().parents[2]
# a smaller job than the demo's default: orders, bank transfers, choreographed orders
SIZE = ("--sagas", "40", "--transfers", "20", "--choreographies", "20")
INVARIANTS_REPORTED = (
    "stock: on_hand == initial - reserved",
    "failed orders: nothing left reserved, charged or shipped",
    "bank: every balance == opening balance + its movements",
    "bank: balances sum to the start",
    "bank: each transfer ended as planned",
)
CHOREOGRAPHY = importlib.util.find_spec("workers.choreography_demo") is not None


def run_demo(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "SAGAS_DATABASE_URL")
    }
    return subprocess.run(
        [sys.executable, "-m", "workers.demo", *args],
        cwd=REPO,
        env={**clean, "SAGAS_DEMO_DIR": str(tmp_path / "demo"), "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    result = run_demo(tmp_path, {}, *SIZE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded" in result.stdout
    assert "all invariants hold" in result.stdout
    assert "COMPLETED" in result.stdout and "FAILED" in result.stdout
    for invariant in INVARIANTS_REPORTED:
        assert f"[ok] {invariant}" in result.stdout, result.stdout
    assert "\nbank transfers\n" in result.stdout
    assert ("[ok] choreography: " in result.stdout) == CHOREOGRAPHY
    assert "settled" in result.stderr  # the progress bar
    assert (tmp_path / "demo" / "sagas.db").exists()


def test_demo_on_redis_and_postgresql_prints_json(tmp_path: Path, redis_url: str) -> None:
    require_service("postgresql")
    database = create_pg_database("sagas_demo")
    try:
        result = run_demo(
            tmp_path,
            {"CELERY_BROKER_URL": redis_url, "SAGAS_DATABASE_URL": database},
            *SIZE,
            "--json",
        )
    finally:
        drop_pg_database(database)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert report["embedded"] is False
    assert report["total"] == 40
    assert sum(report["states"].values()) == 40
    assert all(report["invariants"].values())
    assert report["timed_out"] >= 1  # some create_shipment hangs were timed out and compensated
    assert report["compensations"] >= report["timed_out"]
    assert report["dead_letters"]["landed"] >= 1  # refunds that kept failing, then drained
    assert report["dead_letters"]["resolved"] == report["dead_letters"]["landed"]
    for invariant in INVARIANTS_REPORTED:
        assert any(name.startswith(invariant) for name in report["invariants"]), invariant
    bank = report["bank"]
    assert bank["total"] == 20
    # the mix of seed 7: some of each outcome
    assert set(bank["outcomes"]) == {"COMPLETED", "InsufficientFunds", "TargetUnavailable"}
    assert bank["balance_total"] == bank["opening_total"] > 0
    assert ("choreography" in report) == CHOREOGRAPHY

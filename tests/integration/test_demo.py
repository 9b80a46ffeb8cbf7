"""``make demo`` is tested code: a smaller N on the embedded default and on Redis + PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

REPO = Path(__file__).resolve().parents[2]


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
    result = run_demo(tmp_path, {}, "--sagas", "40")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded" in result.stdout
    assert "all invariants hold" in result.stdout
    assert "COMPLETED" in result.stdout and "FAILED" in result.stdout
    assert "settled" in result.stderr  # the progress bar
    assert (tmp_path / "demo" / "sagas.db").exists()


def test_demo_on_redis_and_postgresql_prints_json(tmp_path: Path, redis_url: str) -> None:
    require_service("postgresql")
    database = create_pg_database("sagas_demo")
    try:
        result = run_demo(
            tmp_path,
            {"CELERY_BROKER_URL": redis_url, "SAGAS_DATABASE_URL": database},
            "--sagas",
            "40",
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

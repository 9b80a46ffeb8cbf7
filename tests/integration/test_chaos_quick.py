"""A short fault matrix (``make chaos`` runs the long one): a few cases on small N, on a
PostgreSQL cluster and a redis-server of the test's own (so a restart hurts nobody else).

Each case runs in its own interpreter, as ``python -m chaos`` runs it, and must end with
every saga settled, no double forward effect or compensation, no wrong end state and no
illegal transition in the log.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.__main__ import run_one
from chaos.servers import PG_BIN, Postgres, free_port
from chaos.table import broken
from tests.conftest import in_ci


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[Postgres]:
    if not (PG_BIN / "initdb").exists() or shutil.which("redis-server") is None:
        why = f"needs {PG_BIN}/initdb and redis-server (CHAOS_PG_BIN names another bin dir)"
        if in_ci():
            pytest.fail(f"{why}; CI must have them", pytrace=False)
        pytest.skip(why)
    # its own temporary directory: pytest's tmp_path is closed to the postgres user
    pg = Postgres(port=free_port()).start()
    yield pg
    pg.cleanup()


CASES = {
    "child-kill": {"sagas": 12, "duration": 8.0},
    "pg-restart": {"sagas": 12, "duration": 8.0},
    "forged": {"sagas": 8, "duration": 5.0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_short_fault_case_loses_nothing_and_doubles_nothing(
    case: str, own_postgres: Postgres, tmp_path: Path
) -> None:
    spec: dict[str, Any] = {
        "case": case,
        "broker": "redis",
        "seed": 3,
        "pg_root": str(own_postgres.root),
        "pg_port": own_postgres.port,
        "out_dir": str(tmp_path),
        "settle_timeout": 60.0,
        "quick": True,
        "redis_port": free_port(),
        **CASES[case],
    }
    row = run_one(spec)
    assert "error" not in row, f"the harness failed; logs in {tmp_path}"
    assert row["started"] == spec["sagas"]
    assert row["faults"] > 0
    assert broken([row]) == [], f"logs in {tmp_path}"
    assert row["terminal"] == row["started"]

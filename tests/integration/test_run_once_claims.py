"""The run-once claim behind outcome hooks (``SqlSagaStore.claim_once``), on SQLite and
PostgreSQL: the first delivery runs, a concurrent duplicate is busy, a later one finds it
done, a holder that died loses the claim when its lease runs out, a failed run gives it
back. ``now`` is passed in, so the lease is tested without waiting for it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from celery_sagas.store import SqlSagaStore, upgrade
from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = 60.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlSagaStore]:
    if request.param == "sqlite":
        url = f"sqlite+pysqlite:///{tmp_path / 'claims.sqlite3'}"
        upgrade(url)
        yield SqlSagaStore(url)
        return
    require_service("postgresql")
    url = create_pg_database("sagas_claims")
    upgrade(url)
    sql = SqlSagaStore(url)
    yield sql
    sql.engine.dispose()
    drop_pg_database(url)


def test_the_first_delivery_runs_a_duplicate_waits_then_finds_it_done(
    store: SqlSagaStore,
) -> None:
    key = f"{uuid.uuid4()}:on_completed:hook"
    assert store.claim_once(key, T0, LEASE) == "run"
    assert store.claim_once(key, T0 + timedelta(seconds=1), LEASE) == "busy"
    store.finish_claim(key, "s-1", T0 + timedelta(seconds=2))
    assert store.claim_once(key, T0 + timedelta(seconds=3), LEASE) == "done"
    assert store.claim_once(key, T0 + timedelta(hours=5), LEASE) == "done"  # never again


def test_a_holder_that_died_loses_the_claim_when_its_lease_runs_out(
    store: SqlSagaStore,
) -> None:
    key = f"{uuid.uuid4()}:on_failed:hook"
    assert store.claim_once(key, T0, LEASE) == "run"
    assert store.claim_once(key, T0 + timedelta(seconds=LEASE - 1), LEASE) == "busy"
    assert store.claim_once(key, T0 + timedelta(seconds=LEASE + 1), LEASE) == "run"
    # the new holder has a fresh lease
    assert store.claim_once(key, T0 + timedelta(seconds=LEASE + 2), LEASE) == "busy"


def test_a_failed_run_gives_the_claim_back(store: SqlSagaStore) -> None:
    key = f"{uuid.uuid4()}:on_completed:hook"
    assert store.claim_once(key, T0, LEASE) == "run"
    store.release_claim(key)
    assert store.claim_once(key, T0 + timedelta(seconds=1), LEASE) == "run"

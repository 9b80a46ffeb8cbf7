"""Self-test of the test harness: database fixtures, Redis DBs, real Celery processes."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.pool import NullPool

from tests.integration.conftest import Deployment, wait_settled
from tests.support.databases import (
    create_pg_database,
    drop_pg_database,
    lease_holder,
    pg_admin_url,
)
from tests.support.processes import CeleryProcess, pid_alive, wait_until

TINY_APP = "tests.support.tiny_app"


def _database_exists(name: str) -> bool:
    engine = sa.create_engine(pg_admin_url(), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
        return found == 1
    finally:
        engine.dispose()


def _write_and_read(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE harness (v text)"))
            conn.execute(sa.text("INSERT INTO harness VALUES ('x'), ('y')"))
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT v FROM harness ORDER BY v")).scalars())
    finally:
        engine.dispose()


def test_pg_url_is_a_fresh_writable_database(pg_url: str) -> None:
    name = sa.make_url(pg_url).database
    assert name and name.startswith("sagas_session_")
    assert _database_exists(name)
    engine = sa.create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS harness_session (v int)"))
            conn.execute(sa.text("INSERT INTO harness_session VALUES (1)"))
    finally:
        engine.dispose()


def test_pg_database_is_isolated_and_writable(pg_database: str, pg_url: str) -> None:
    assert sa.make_url(pg_database).database != sa.make_url(pg_url).database
    assert _write_and_read(pg_database) == ["x", "y"]


def test_drop_pg_database_terminates_open_connections() -> None:
    url = create_pg_database("harness_drop")
    name = sa.make_url(url).database
    assert name
    engine = sa.create_engine(url, poolclass=NullPool)
    conn = engine.connect()
    try:
        conn.execute(sa.text("SELECT 1"))
        drop_pg_database(url)  # must not hang or fail although `conn` is open
        assert not _database_exists(name)
    finally:
        with contextlib.suppress(sa.exc.DBAPIError):  # its backend was terminated
            conn.close()
        engine.dispose()


def test_sqlite_url_is_writable(sqlite_url: str, tmp_path: Path) -> None:
    assert _write_and_read(sqlite_url) == ["x", "y"]
    assert (tmp_path / "sagas.sqlite3").exists()


@pytest.fixture
def second_redis_url(redis_url: str) -> str:
    # A second DB in the same test, through the public helper.
    from tests.support.databases import redis_test_url

    return redis_test_url()


def test_redis_urls_are_distinct_and_empty(redis_url: str, second_redis_url: str) -> None:
    from tests.support.databases import release_redis_db

    try:
        assert redis_url != second_redis_url
        clients = [redis.Redis.from_url(u) for u in (redis_url, second_redis_url)]
        try:
            for client in clients:
                assert client.dbsize() == 0
                assert client.connection_pool.connection_kwargs["db"] != 0
            clients[0].set("k", "v")
            assert clients[1].get("k") is None
        finally:
            for client in clients:
                client.close()
    finally:
        release_redis_db(second_redis_url)


def _db_number(url: str) -> int:
    return int(url.rsplit("/", 1)[1])


def test_a_db_this_process_still_holds_is_never_handed_out_again(redis_url: str) -> None:
    """The session deployment keeps its DB while per-test DBs come and go: a full run leases
    more than 15 of them. The cycle came back to the deployment's number, flushed it under
    its workers, and the release deleted its lease, so a second pytest run took it over."""
    from tests.support.databases import REDIS_TEST_DBS, redis_test_url, release_redis_db

    held = redis.Redis.from_url(redis_url)
    held.set("in-use", "yes")
    me = lease_holder(_db_number(redis_url))
    assert me is not None
    try:
        for _ in range(2 * len(REDIS_TEST_DBS)):  # twice around the cycle
            url = redis_test_url()
            release_redis_db(url)
            assert url != redis_url
        assert held.get("in-use") == b"yes"
        assert lease_holder(_db_number(redis_url)) == me
    finally:
        held.close()


def test_releasing_a_db_twice_or_one_held_by_another_owner_flushes_nothing(
    redis_url: str,
) -> None:
    from tests.support.databases import (
        _LEASE_KEY,
        _redis_client,
        redis_test_url,
        release_redis_db,
    )

    url = redis_test_url()
    db = _db_number(url)
    client = redis.Redis.from_url(url)
    control = _redis_client(0)
    try:
        release_redis_db(url)
        client.set("theirs", "1")  # another run leased it meanwhile
        control.set(_LEASE_KEY.format(db=db), "elsewhere:1", ex=30)
        release_redis_db(url)  # a second release of ours must not touch theirs
        assert client.get("theirs") == b"1"
        assert lease_holder(db) == "elsewhere:1"
    finally:
        if control.get(_LEASE_KEY.format(db=db)) == "elsewhere:1":
            control.delete(_LEASE_KEY.format(db=db))
        client.flushdb()
        client.close()
        control.close()


def test_held_leases_are_renewed(redis_url: str) -> None:
    """A run longer than the lease keeps its DBs (the session deployment's above all)."""
    from tests.support.databases import _LEASE_KEY, _redis_client, renew_redis_leases

    db = _db_number(redis_url)
    control = _redis_client(0)
    try:
        control.expire(_LEASE_KEY.format(db=db), 5)
        assert db in renew_redis_leases()
        assert control.ttl(_LEASE_KEY.format(db=db)) > 60
    finally:
        control.close()


def test_wait_until_returns_value_and_reports_last_value() -> None:
    calls = iter([0, 0, 7])
    assert wait_until(lambda: next(calls), timeout=2) == 7
    with pytest.raises(AssertionError, match=r"never true.*last value: \[\]"):
        wait_until(lambda: [], timeout=0.2, message="never true")


def _send_marker_task(broker_url: str, marker: Path, queue: str = "tiny") -> None:
    # An explicit connection: `Celery.close()` alone leaves the AMQP publish socket open.
    with (
        Celery("harness-client", broker=broker_url) as client,
        client.connection_for_write(url=broker_url) as conn,
    ):
        client.send_task(
            "tiny.write_marker", args=[str(marker), "hello"], queue=queue, connection=conn
        )


def test_worker_runs_task_and_kill_leaves_no_process(
    redis_url: str, tmp_path: Path, celery_processes: Callable[..., CeleryProcess]
) -> None:
    worker = celery_processes(
        TINY_APP, env={"CELERY_BROKER_URL": redis_url}, pool="prefork", concurrency=2
    )
    wait_until(lambda: len(worker.child_pids()) == 2, timeout=10, message="two prefork children")
    children = worker.child_pids()
    assert worker.hostname and worker.hostname in worker.log_text()

    marker = tmp_path / "marker.txt"
    _send_marker_task(redis_url, marker)
    wait_until(marker.exists, timeout=20, message=f"task wrote {marker}")
    text, pid = marker.read_text().split()
    assert text == "hello"
    assert int(pid) in children

    group = worker.group_pids()
    assert worker.pid in group and set(children) <= set(group)
    worker.kill()
    assert worker.returncode == -signal.SIGKILL
    wait_until(
        lambda: not any(pid_alive(p) for p in group),
        timeout=5,
        message="no process of the killed worker left",
    )
    assert worker.group_pids() == []


def test_stop_is_graceful_and_process_restarts(
    redis_url: str, tmp_path: Path, celery_processes: Callable[..., CeleryProcess]
) -> None:
    worker = celery_processes(
        TINY_APP, env={"CELERY_BROKER_URL": redis_url}, pool="threads", concurrency=2
    )
    assert worker.stop() == 0
    assert "ready." in worker.log_text()

    worker.start().wait_ready()  # the ready line of the first run does not count
    marker = tmp_path / "again.txt"
    _send_marker_task(redis_url, marker)
    wait_until(marker.exists, timeout=20, message="restarted worker ran the task")
    assert worker.log_text().count(" ready.") == 2


def test_wait_ready_fails_fast_with_the_log_when_the_app_is_broken(tmp_path: Path) -> None:
    proc = CeleryProcess("tests.support.no_such_module", log_dir=tmp_path, pool="solo")
    proc.start()
    try:
        with pytest.raises(AssertionError, match="before it was ready"):
            proc.wait_ready(timeout=30)
    finally:
        proc.kill()
    assert "no_such_module" in proc.log_text()


def test_context_manager_starts_and_stops(redis_url: str, tmp_path: Path) -> None:
    env = {"CELERY_BROKER_URL": redis_url, "TINY_QUEUE": "ctx"}
    with CeleryProcess(TINY_APP, log_dir=tmp_path, env=env, queues=["ctx"]) as worker:
        assert worker.is_alive()
        marker = tmp_path / "ctx.txt"
        _send_marker_task(redis_url, marker, queue="ctx")
        wait_until(marker.exists, timeout=20, message="solo worker ran the task")
    assert not worker.is_alive()
    assert worker.returncode == 0
    assert os.path.exists(worker.log_path)


def test_worker_on_rabbitmq_runs_task(
    rabbitmq_url: str, tmp_path: Path, celery_processes: Callable[..., CeleryProcess]
) -> None:
    queue = f"harness-{uuid.uuid4().hex[:8]}"
    env = {"CELERY_BROKER_URL": rabbitmq_url, "TINY_QUEUE": queue}
    try:
        celery_processes(TINY_APP, env=env, queues=[queue])
        marker = tmp_path / "amqp.txt"
        _send_marker_task(rabbitmq_url, marker, queue=queue)
        wait_until(marker.exists, timeout=20, message="worker on RabbitMQ ran the task")
    finally:
        with (
            Celery("harness-cleanup", broker=rabbitmq_url) as client,
            client.connection(rabbitmq_url) as conn,
        ):
            conn.default_channel.queue_delete(queue)


def test_a_wait_settled_timeout_reports_the_sagas_and_who_leases_the_broker_db(
    deployment: Deployment,
) -> None:
    """Two stalls seen under load left only "did not settle" to read: the assertion now
    carries the rows of each saga that did not settle and the broker DB's lease holder."""
    with pytest.raises(AssertionError) as failure:
        wait_settled(["T-never-started"], timeout=0.2)
    report = str(failure.value)
    assert "saga T-never-started: no row" in report
    db = int(deployment.broker_url.rsplit("/", 1)[1])
    assert f"lease holder {lease_holder(db)!r}, held by this process: True" in report

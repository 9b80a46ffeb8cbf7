"""Retention on every store (in memory, SQLite, PostgreSQL), on rows the real coordinator
and step runner wrote: ``prune`` deletes finished sagas with every row they own and
nothing else; ``compact`` deletes guards and sent outbox rows nothing reads again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from celery_sagas import dlq, outbox, scanner
from celery_sagas.cli.prune import prune_all
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import Saga, Step, StepContext, hook_key, registry
from celery_sagas.errors import BusinessError
from celery_sagas.machine import SagaState
from celery_sagas.policy import RetryPolicy
from celery_sagas.protocols import GuardRecord, SagaStore
from celery_sagas.runner import STALE, Ignored, StepMessage, StepRunner
from celery_sagas.store import SqlSagaStore, browse, shared_engine, upgrade
from celery_sagas.testing import InMemorySagaStore, RecordingDispatcher, run_until_settled
from tests.conftest import require_service
from tests.integration import test_store_contract as contract
from tests.support.databases import create_pg_database, drop_pg_database

OLD = datetime.now(UTC) - timedelta(days=40)
CUTOFF = datetime.now(UTC) - timedelta(days=30)
contract_pg_url = contract.contract_pg_url  # one migrated database for this module


class Backend:
    def __init__(self, name: str, store: SagaStore, rows: Callable[[], dict[str, int]]) -> None:
        self.name, self.store, self.rows = name, store, rows


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        memory = InMemorySagaStore()
        yield Backend("memory", memory, memory.row_counts)
        return
    if request.param == "sqlite":
        url = f"sqlite+pysqlite:///{tmp_path / 'retention.sqlite3'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("contract_pg_url")
        with shared_engine(url).begin() as conn:
            tables = ", ".join(contract.TABLES)
            conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    store = SqlSagaStore(url)
    yield Backend(request.param, store, contract._sql_rows(store))
    if request.param == "sqlite":
        store.engine.dispose()


# --------------------------------------------------------------------------- sagas


def shop(refund_failures: int) -> Saga:
    """charge → ship (always declined): the refund fails ``refund_failures`` times."""
    refunds: list[int] = []

    def refund(ctx: StepContext) -> str:
        refunds.append(ctx.attempt)
        if len(refunds) <= refund_failures:
            raise ConnectionError("refund API down")
        return "refunded"

    def ship(ctx: StepContext) -> None:
        raise BusinessError("no stock")

    retry = RetryPolicy(max_retries=1)
    return Saga(
        "shop",
        [
            Step("charge", lambda ctx: 1, refund, compensation_retry=retry),
            Step("ship", ship, lambda ctx: None, compensation_name="unship"),
        ],
    )


def toy() -> Saga:
    return contract.Toy().saga()


def run(
    store: SagaStore,
    saga: Saga,
    key: str,
    when: datetime,
    saga_id: str | None = None,
) -> str:
    """Start a saga at ``when`` and deliver its messages until it settles."""
    coordinator = Coordinator(store, registry([saga]), clock=lambda: when)
    dispatcher = RecordingDispatcher()
    started = coordinator.start(saga.name, {"order_id": key, "id": key}, saga_id=saga_id)
    outbox.publish(store, dispatcher, started.messages, coordinator.clock)
    run_until_settled(coordinator, store, dispatcher, started.saga_id)
    return started.saga_id


def retried_to_failed(store: SagaStore, key: str, when: datetime) -> str:
    """A compensation dead-lettered, retried by an operator, then FAILED: a resolved dead
    letter and two failed attempts."""
    saga = shop(refund_failures=2)
    saga_id = run(store, saga, key, when)
    coordinator = Coordinator(store, registry([saga]), clock=lambda: when)
    dispatcher = RecordingDispatcher()
    (entry,) = store.dead_letters(saga_id=saga_id, status="open")
    retried = dlq.retry(coordinator, entry.id, "alice")
    outbox.publish(store, dispatcher, retried.messages, coordinator.clock)
    assert run_until_settled(coordinator, store, dispatcher, saga_id).state == SagaState.FAILED
    return saga_id


def kept_sagas(store: SagaStore) -> dict[str, str]:
    """What prune must never touch: a dead-lettered saga (open entry), a saga still
    moving, and a saga finished after the cutoff; one id shares the pruned one's prefix."""
    dead = run(store, shop(refund_failures=99), "dead", OLD)
    assert store.dead_letters(saga_id=dead, status="open")
    live = Coordinator(store, registry([toy()]), clock=lambda: OLD)
    moving = live.start("toy", {"order_id": "moving"}, saga_id="old:moving").saga_id
    recent = run(store, toy(), "recent", datetime.now(UTC))
    return {"dead": dead, "moving": moving, "recent": recent}


def pruned_sagas(store: SagaStore) -> dict[str, str]:
    completed = run(store, toy(), "done", OLD, saga_id="old")
    store.put_guard(GuardRecord(hook_key(completed, "on_completed"), "ok"), OLD)
    declined = run(store, contract.Toy(decline_at=2).saga(), "declined", OLD)
    resolved = retried_to_failed(store, "resolved", OLD)
    return {"completed": completed, "declined": declined, "resolved": resolved}


# --------------------------------------------------------------------------- prune


def test_prune_deletes_finished_sagas_with_all_their_rows_and_leaves_the_rest(
    backend: Backend, tmp_path: Path
) -> None:
    # what the kept sagas own, measured on a store that holds only them
    alone = InMemorySagaStore()
    kept_sagas(alone)
    alone.prune(CUTOFF, 100)  # drops their sent outbox rows, as the prune below will
    expected = alone.row_counts()

    store = backend.store
    pruned = pruned_sagas(store)
    kept = kept_sagas(store)
    before = backend.rows()
    assert before["saga_dead_letter"] == 2 and before["saga_attempt"] == 2 + 2
    assert store.prunable(CUTOFF) == 3

    tally = prune_all(store, CUTOFF, batch=2, name=None)

    assert tally.sagas == 3
    assert backend.rows() == expected
    assert {t: before[t] - expected[t] for t in before} == {t: tally.rows[t] for t in before}
    # no choreographed sagas here: their timeline tables lose nothing
    assert {t: n for t, n in tally.rows.items() if t not in before} == {
        "saga_event": 0,
        "saga_reaction": 0,
    }
    assert all(store.load(i) is None for i in pruned.values())
    assert all(store.load(i) is not None for i in kept.values())
    assert store.get_guard(hook_key(pruned["completed"], "on_completed")) is None
    assert store.get_guard("old:moving:reserve:action") is None  # never written: not begun
    assert store.prunable(CUTOFF) == 0
    assert prune_all(store, CUTOFF, batch=2, name=None).sagas == 0


def test_prune_takes_only_the_named_type_and_only_before_the_cutoff(backend: Backend) -> None:
    store = backend.store
    old_toy = run(store, toy(), "t1", OLD)
    old_shop = retried_to_failed(store, "s1", OLD)
    assert store.prunable(CUTOFF, name="shop") == 1
    assert store.prunable(OLD - timedelta(seconds=1)) == 0

    assert prune_all(store, OLD - timedelta(seconds=1), batch=10, name=None).sagas == 0
    assert prune_all(store, CUTOFF, batch=10, name="shop").sagas == 1

    assert store.load(old_shop) is None and store.load(old_toy) is not None


def test_prune_skips_a_saga_another_transaction_holds(contract_pg_url: str) -> None:
    """``FOR UPDATE SKIP LOCKED``: a saga row locked by live work is left for the next run,
    and the prune does not wait for it."""
    engine = shared_engine(contract_pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(contract.TABLES)} RESTART IDENTITY CASCADE"))
    store = SqlSagaStore(contract_pg_url)
    held, free = (run(store, toy(), key, OLD) for key in ("held", "free"))
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT 1 FROM saga WHERE id = :i FOR UPDATE"), {"i": held})
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        began = time.monotonic()
        tally = prune_all(store, CUTOFF, batch=10, name=None)
        took = time.monotonic() - began
    finally:
        release.set()
        holder.join()
    assert tally.sagas == 1 and took < 5
    assert store.load(free) is None and store.load(held) is not None
    assert prune_all(store, CUTOFF, batch=10, name=None).sagas == 1


# --------------------------------------------------------------------------- compact


def step_message(saga: Saga, saga_id: str, index: int) -> StepMessage:
    key = f"{saga_id}:{saga.steps[index].name}:action"
    return StepMessage(saga_id=saga_id, step=index, token=1, key=key)


def test_compact_deletes_guards_of_finished_sagas_and_old_sent_rows_only(
    backend: Backend,
) -> None:
    store = backend.store
    saga = toy()
    # the moving saga first: its unsent row is the oldest, which the pass steps over
    moving = Coordinator(store, registry([saga]), clock=lambda: OLD)
    started = moving.start("toy", {"order_id": "moving"})
    done = run(store, saga, "done", OLD)
    runner = StepRunner(saga, 0, "action", saga.steps[0].retry, clock=lambda: OLD)
    begun = runner.run(store, step_message(saga, started.saga_id, 0))
    assert not isinstance(begun, Ignored)  # it ran: its guard is written
    before = backend.rows()
    assert before["saga_guard"] == 5  # 4 of the finished saga, 1 of the moving one

    compacted = scanner.compact(store, datetime.now(UTC), after=86400 * 30, batch=100)

    assert (compacted.sagas, compacted.guards) == (1, 4)
    assert compacted.outbox == before["saga_outbox"] - 1  # all but the moving one's unsent
    after = backend.rows()
    assert after["saga_guard"] == 1 and after["saga_outbox"] == 1
    assert after["saga"] == before["saga"] and after["saga_step"] == before["saga_step"]
    assert store.get_guard(f"{started.saga_id}:reserve:action") is not None
    # a duplicate of a finished saga's message is refused before any guard is read
    duplicate = runner.run(store, step_message(saga, done, 0))
    assert isinstance(duplicate, Ignored) and duplicate.reason == STALE
    assert backend.rows()["saga_guard"] == 1
    # compacted once: the next pass has nothing to do
    again = scanner.compact(store, datetime.now(UTC), after=86400 * 30, batch=100)
    assert (again.sagas, again.guards, again.outbox) == (0, 0, 0)


def test_compact_keeps_a_finished_saga_until_its_hook_message_is_sent(backend: Backend) -> None:
    """Its hook claim (a guard) stops a re-sent hook from running twice: it stays while the
    hook's outbox row is unsent (the hook task marks it sent), and recent sagas are left."""
    store = backend.store
    hooked = Saga("hooked", toy().steps, business_key="order_id", on_completed="tests.on_completed")
    coordinator = Coordinator(store, registry([hooked]), clock=lambda: OLD)
    dispatcher = RecordingDispatcher()
    started = coordinator.start("hooked", {"order_id": "hooked"})
    outbox.publish(store, dispatcher, started.messages, coordinator.clock)
    run_until_settled(coordinator, store, dispatcher, started.saga_id)
    (hook,) = [m for m in dispatcher.sent if m.body.get("kind") == "hook"]
    claim = hook_key(started.saga_id, "on_completed")
    assert hook.body["key"] == claim
    store.put_guard(GuardRecord(claim, "ok"), OLD)  # the hook task ran it
    recent = run(store, toy(), "recent", datetime.now(UTC))

    assert store.compact(CUTOFF, 100, datetime.now(UTC)).sagas == 0
    assert store.get_guard(claim) is not None

    assert hook.id is not None
    store.mark_sent([hook.id], OLD)  # as the hook task's finish does
    assert store.compact(CUTOFF, 100, datetime.now(UTC)).sagas == 1
    assert store.get_guard(claim) is None
    assert store.get_guard(f"{recent}:reserve:action") is not None


# --------------------------------------------------------------------------- the real CLI


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_sagas.cli", "--database-url", url, "prune", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def cli_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite+pysqlite:///{tmp_path / 'cli.sqlite3'}"
        upgrade(url)
        yield url
        shared_engine(url).dispose()
        return
    require_service("postgresql")
    url = create_pg_database("retention_cli")
    upgrade(url)
    yield url
    shared_engine(url).dispose()
    drop_pg_database(url)


def test_prune_through_the_cli(cli_url: str) -> None:
    store = SqlSagaStore(cli_url)
    old = [run(store, toy(), f"old-{i}", OLD) for i in range(3)]
    shop_saga = retried_to_failed(store, "shop-1", OLD)
    recent = run(store, toy(), "recent", datetime.now(UTC))

    dry = cli(cli_url, "--finished-before", "30d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["sagas"] == 4 and json.loads(dry.stdout)["dry_run"] is True
    assert all(store.load(i) is not None for i in [*old, shop_saga])

    named = cli(cli_url, "--finished-before", "30d", "--name", "shop", "--batch", "1")
    assert named.returncode == 0, named.stderr
    assert named.stdout.startswith("pruned 1 saga(s) finished before ")
    assert "saga_dead_letter 1" in named.stdout and "saga_attempt 2" in named.stdout
    assert "pruning 1 saga(s)" in named.stderr

    cutoff = (datetime.now(UTC) - timedelta(days=30)).isoformat()
    done = cli(cli_url, "--finished-before", cutoff, "--batch", "2", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["sagas"] == 3 and summary["rows"]["saga_step"] == 12
    assert summary["rows"]["saga"] == 3 and summary["rows_per_second"] > 0
    assert all(store.load(i) is None for i in [*old, shop_saga])
    assert store.load(recent) is not None
    store.engine.dispose()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("30x", "neither an age"),
        ("0d", "not a positive age"),
        ("2026-01-01T00:00:00", "has no timezone"),
        ("2999-01-01T00:00:00Z", "in the future"),
    ],
)
def test_a_bad_cutoff_is_a_usage_error(tmp_path: Path, value: str, says: str) -> None:
    result = cli(f"sqlite+pysqlite:///{tmp_path / 'x.sqlite3'}", "--finished-before", value)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: [usage] ") and says in lines[0]


# --------------------------------------------------------------------------- bounded counts


def test_counts_of_finished_sagas_stop_at_the_cap_and_say_so(cli_url: str) -> None:
    """``list`` and the Sagas page count COMPLETED and FAILED up to a cap (an index walk
    that stops there), everything else exactly."""
    store = SqlSagaStore(cli_url)
    for i in range(3):
        run(store, toy(), f"done-{i}", OLD)
    run(store, contract.Toy(decline_at=2).saga(), "failed", OLD)
    run(store, shop(refund_failures=99), "dead", OLD)
    Coordinator(store, registry([toy()]), clock=lambda: OLD).start("toy", {"order_id": "live"})
    exact = {"COMPLETED": 3, "FAILED": 1, "COMPENSATION_FAILED": 1, "STARTED": 1}

    assert dict(browse.count_by_state(store.engine, cap=None)) == exact
    assert dict(browse.count_by_state(store.engine)) == exact  # under the default cap
    capped = browse.count_by_state(store.engine, cap=2)
    assert dict(capped) == exact  # 3 is "more than 2": the walk stopped at 3
    assert [browse.shown(capped[s], cap=2) for s in sorted(capped)] == ["1", "2+", "1", "1"]
    assert browse.total(capped, cap=2) == (5, "5+")
    assert browse.total(capped) == (6, "6")
    only_toy = browse.count_by_state(store.engine, browse.Filter(name="toy"), cap=1)
    assert dict(only_toy) == {"COMPLETED": 2, "FAILED": 1, "STARTED": 1}
    store.engine.dispose()

"""What a worker says about its pool as it starts (pure)."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_sagas import install
from celery_sagas.integration import SagaRuntime
from celery_sagas.integration.pools import PoolNote, engine_pool_for, pool_name, pool_notes


@pytest.mark.parametrize(
    ("pool_cls", "name"),
    [
        ("prefork", "prefork"),
        ("threads", "threads"),
        ("celery.concurrency.thread:TaskPool", "threads"),
        ("celery.concurrency.gevent:TaskPool", "gevent"),
        ("processes", "prefork"),
    ],
)
def test_pool_name_from_an_alias_or_a_path(pool_cls: str, name: str) -> None:
    assert pool_name(pool_cls) == name


def test_pool_name_from_the_class() -> None:
    from celery.concurrency.thread import TaskPool

    assert pool_name(TaskPool) == "threads"


def test_prefork_says_nothing() -> None:
    assert pool_notes("prefork", timed_steps=True, max_redispatches=2, green=False) == []


def test_threads_with_re_sends_warn_that_a_hung_step_holds_more_threads() -> None:
    [note] = pool_notes("threads", timed_steps=True, max_redispatches=2, green=False)
    assert note.level == "warning"
    assert "none is enforced" in note.text
    assert "re-sent 2 time(s)" in note.text
    assert "sagas_max_redispatches=0" in note.text


def test_threads_without_re_sends_only_inform() -> None:
    [note] = pool_notes("threads", timed_steps=True, max_redispatches=0, green=False)
    assert note.level == "info"
    assert "re-sent" not in note.text


def test_no_step_timeouts_no_time_limit_note() -> None:
    assert pool_notes("threads", timed_steps=False, max_redispatches=2, green=False) == []


def test_gevent_enforces_the_hard_limit_and_says_psycopg2_is_green() -> None:
    notes = pool_notes("gevent", timed_steps=True, max_redispatches=2, green=True)
    assert notes[0] == PoolNote("info", "-P gevent: psycopg2 waits greenly")
    assert notes[1].level == "info"
    assert "only the hard one is enforced" in notes[1].text


@pytest.mark.parametrize(
    ("pool", "concurrency", "expected"),
    [
        ("prefork", 8, {}),
        ("solo", 1, {}),
        ("threads", 2, {"pool_size": 5, "max_overflow": 10}),
        ("threads", 16, {"pool_size": 16, "max_overflow": 10}),
        ("gevent", 200, {"pool_size": 20, "max_overflow": 10}),
    ],
)
def test_engine_pool_follows_the_concurrency_of_one_process_pools(
    pool: str, concurrency: int, expected: dict[str, int]
) -> None:
    assert engine_pool_for(pool, concurrency) == expected


def test_a_sized_engine_pool_is_said() -> None:
    sized = {"pool_size": 16, "max_overflow": 10}
    [note] = pool_notes("threads", timed_steps=False, max_redispatches=0, green=False,
                        engine_pool=sized)  # fmt: skip
    assert note.text == "-P threads: the saga database's engine pools hold 16 connections (+10)"


def _runtime(**settings: object) -> SagaRuntime:
    app = Celery("pool-sizing", set_as_current=False)
    return install(app, [], database_url="sqlite://", **settings)


def test_the_runtime_takes_the_worker_pool_size_before_its_store_is_made() -> None:
    runtime = _runtime()
    assert runtime.size_engine_pool({"pool_size": 16, "max_overflow": 10}) == {
        "pool_size": 16,
        "max_overflow": 10,
    }
    assert runtime.engine_defaults == {"pool_size": 16, "max_overflow": 10}


def test_a_configured_pool_size_wins() -> None:
    runtime = _runtime(engine_options={"pool_size": 3})
    assert runtime.size_engine_pool({"pool_size": 16, "max_overflow": 10}) == {}
    assert runtime.engine_defaults == {}

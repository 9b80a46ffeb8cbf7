"""psycopg 3 under gevent: imported after gevent patched (as ``celery worker -P gevent``
does), it waits through the patched ``select`` by itself and the queries of greenlets
overlap; imported before, it blocks the process, which ``green.psycopg3_blocks`` tells."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import require_service
from tests.support.green_script import GREENLETS, SLEEP, run_green_script

SCRIPT = textwrap.dedent(
    """
    import sys, time
    if sys.argv[2] == "late":
        import psycopg
    from gevent import monkey
    monkey.patch_all()
    import gevent, psycopg
    from celery_sagas.integration.green import psycopg3_blocks

    def query():
        with psycopg.connect(sys.argv[1]) as connection:
            connection.execute("SELECT pg_sleep(%s)", (float(sys.argv[3]),))

    started = time.monotonic()
    gevent.joinall([gevent.spawn(query) for _ in range(int(sys.argv[4]))], raise_error=True)
    print(psycopg3_blocks(), time.monotonic() - started)
    """
)


def run(imported_first: bool) -> tuple[str, float]:
    blocks, seconds = run_green_script(SCRIPT, "late" if imported_first else "patched")
    return blocks, float(seconds)


@pytest.fixture(autouse=True)
def _postgres() -> None:
    pytest.importorskip("psycopg")
    require_service("postgresql")


def test_imported_after_gevent_patched_the_queries_of_greenlets_overlap() -> None:
    blocks, seconds = run(imported_first=False)
    assert blocks == "False"
    assert seconds < GREENLETS * SLEEP / 2  # about one SLEEP, not five one after another


def test_imported_before_gevent_patched_it_blocks_and_is_told() -> None:
    blocks, seconds = run(imported_first=True)
    assert blocks == "True"
    assert seconds >= GREENLETS * SLEEP  # the C wait: one query after another

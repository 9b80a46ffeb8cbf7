"""psycopg 3 under gevent: imported after gevent patched (as ``celery worker -P gevent``
does), it waits through the patched ``select`` by itself and the queries of greenlets
overlap; imported before, it blocks the process, which ``green.psycopg3_blocks`` tells."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import require_service
from tests.support.databases import pg_admin_url
from tests.support.processes import REPO_ROOT

GREENLETS = 5
SLEEP = 0.4

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
    url = make_url(pg_admin_url())
    dsn = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    order = "late" if imported_first else "patched"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, dsn, order, str(SLEEP), str(GREENLETS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=True,
    )
    blocks, seconds = done.stdout.split()
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

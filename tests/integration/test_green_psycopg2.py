"""psycopg2 under gevent: with the wait callback ``install()`` sets when gevent patched,
queries of several greenlets overlap; without it each blocks the whole process."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import require_service
from tests.support.green_script import GREENLETS, SLEEP, run_green_script

SCRIPT = textwrap.dedent(
    """
    import sys, time
    patch = sys.argv[2] == "patch"
    if patch:
        from gevent import monkey
        monkey.patch_all()
    import gevent, psycopg2
    from psycopg2 import extensions
    from celery_sagas.integration.green import make_psycopg2_green

    green = make_psycopg2_green()

    def query():
        connection = psycopg2.connect(sys.argv[1])
        connection.cursor().execute("SELECT pg_sleep(%s)" % sys.argv[3])
        connection.close()

    started = time.monotonic()
    gevent.joinall([gevent.spawn(query) for _ in range(int(sys.argv[4]))], raise_error=True)
    print(green, extensions.get_wait_callback() is not None, time.monotonic() - started)
    """
)


def run(patch: bool) -> tuple[str, str, float]:
    green, callback, seconds = run_green_script(SCRIPT, "patch" if patch else "plain")
    return green, callback, float(seconds)


@pytest.fixture(autouse=True)
def _postgres() -> None:
    require_service("postgresql")


def test_under_gevent_the_queries_of_greenlets_overlap() -> None:
    green, callback, seconds = run(patch=True)
    assert (green, callback) == ("True", "True")
    assert seconds < GREENLETS * SLEEP / 2  # about one SLEEP, not five one after another


def test_without_gevent_nothing_is_changed() -> None:
    green, callback, seconds = run(patch=False)
    assert (green, callback) == ("False", "False")
    assert seconds >= GREENLETS * SLEEP  # the blocking driver: one query after another

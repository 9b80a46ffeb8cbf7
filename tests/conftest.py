"""Shared fixtures: throwaway databases, Redis DBs, the RabbitMQ URL, real Celery processes.

Honest about infrastructure: a fixture whose server does not answer skips the test on a
developer's machine but fails it when ``CI`` is set (``make test`` starts the services first).

Tests under ``tests/integration`` (and ``tests/chaos``) get the ``integration`` marker, so
``pytest -m "not integration"`` runs the quick part only.

The classic Celery fixtures (``celery_app``, ``celery_config``, ``celery_session_worker``, ...)
come from ``celery.contrib.pytest``, loaded by ``addopts`` in pyproject.toml; do not add
``pytest_plugins`` here (it breaks ``-W error``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without `python -m`: make `tests.support` importable
    sys.path.insert(0, str(ROOT))

from tests.support.databases import (  # noqa: E402
    ServiceKind,
    create_pg_database,
    drop_pg_database,
    rabbitmq_test_url,
    redis_test_url,
    release_redis_db,
    service_available,
)
from tests.support.processes import CeleryProcess, logs_since, starts_so_far  # noqa: E402

INTEGRATION_DIRS = ("integration", "chaos")
# the user project's own tests run from the built wheel's virtualenv (test_user_project)
collect_ignore = ["user_project"]


LOG_MARK = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[LOG_MARK] = starts_so_far()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the log tails of the Celery processes it started
    (stopped or not) and of those still running."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        for name, tail in logs_since(item.stash.get(LOG_MARK, starts_so_far())):
            report.sections.append((f"log of {name} (last 40 lines)", tail))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_service(kind: ServiceKind) -> None:
    """Skip (locally) or fail (under CI) the current test unless ``kind`` answers."""
    if service_available(kind):
        return
    why = f"{kind} is not reachable (run scripts/ensure_services.sh)"
    if in_ci():
        pytest.fail(f"{why}; CI must have it", pytrace=False)
    pytest.skip(why)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = ROOT / "tests"
    for item in items:
        try:
            relative = Path(item.path).resolve().relative_to(tests_dir)
        except ValueError:
            continue
        if relative.parts and relative.parts[0] in INTEGRATION_DIRS:
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the whole session (dropped at the end)."""
    require_service("postgresql")
    url = create_pg_database("sagas_session")
    yield url
    drop_pg_database(url)


@pytest.fixture
def pg_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped after it)."""
    require_service("postgresql")
    url = create_pg_database(f"sagas_{request.node.name}"[:30])
    yield url
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file database in the test's tmp_path."""
    return f"sqlite+pysqlite:///{tmp_path / 'sagas.sqlite3'}"


# --------------------------------------------------------------------------- brokers


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A fresh, flushed Redis DB (1..15) for one test, leased to this test process."""
    require_service("redis")
    url = redis_test_url()
    yield url
    release_redis_db(url)


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The local RabbitMQ (default vhost); use unique queue names per test."""
    require_service("rabbitmq")
    return rabbitmq_test_url()


# --------------------------------------------------------------------------- processes


@pytest.fixture
def celery_processes(tmp_path: Path) -> Iterator[Callable[..., CeleryProcess]]:
    """Factory for real Celery subprocesses, all stopped (then killed) after the test.

    ``proc = celery_processes("tests.support.tiny_app", env={...}, pool="prefork")`` returns a
    started *and ready* process; pass ``ready=False`` to only start it. Logs go to
    ``tmp_path/celery``. Other keyword arguments are :class:`CeleryProcess`'s.
    """
    started: list[CeleryProcess] = []

    def start(app: str, *, ready: bool = True, **kwargs: Any) -> CeleryProcess:
        kwargs.setdefault("log_dir", tmp_path / "celery")
        proc = CeleryProcess(app, **kwargs)
        started.append(proc)
        proc.start()
        if ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in reversed(started):
        proc.stop(timeout=10)

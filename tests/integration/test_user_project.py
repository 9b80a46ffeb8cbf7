"""celery-sagas as a user gets it: the built wheel in a fresh virtualenv outside the repository.

Once per module: ``python -m build`` makes the sdist and, from it, the wheel; a virtualenv
in a temporary directory gets the wheel with only the extras a Redis + PostgreSQL user
names (``[redis,postgres]``) and mypy. The user project under ``tests/user_project`` (its
own Celery app, tables and 3-step saga) then runs from that virtualenv on real worker and
beat processes, on Redis and on RabbitMQ; the README's quickstart runs too. Nothing from
the repository is on those processes' path but the user project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.processes import CeleryProcess, wait_until

REPO = Path(__file__).resolve().parents[2]
USER_PROJECT = REPO / "tests" / "user_project"
QUICKSTART = USER_PROJECT / "quickstart"
SETTLED = {"COMPLETED", "FAILED", "COMPENSATION_FAILED"}


def run(argv: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs
    )
    if done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@dataclass(frozen=True)
class UserVenv:
    """A virtualenv with the wheel installed, as a user's would be."""

    root: Path

    def bin(self, name: str) -> Path:
        return self.root / "bin" / name

    def env(self, project: Path, extra: dict[str, str]) -> dict[str, str]:
        """The environment of a user's shell: the venv first on PATH, only their project
        on PYTHONPATH (never this repository)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(extra)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(project)
        env["VIRTUAL_ENV"] = str(self.root)
        return env

    def run(self, argv: list[str | Path], project: Path, env: dict[str, str], cwd: Path) -> str:
        return run(argv, env=self.env(project, env), cwd=cwd).stdout


class VenvCeleryProcess(CeleryProcess):
    """A ``celery worker|beat`` run by the user virtualenv's Python on the user project."""

    def __init__(self, app: str, *, venv: UserVenv, project: Path, **kwargs: Any) -> None:
        self.venv, self.project = venv, project
        super().__init__(app, **kwargs)

    def _build_env(self, extra: Any) -> dict[str, str]:  # type: ignore[override]
        return self.venv.env(self.project, dict(extra or {}))

    def command(self) -> list[str]:
        argv = super().command()
        assert argv[0] == sys.executable
        return [str(self.venv.bin("python")), *argv[1:]]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", out, REPO])  # sdist, then wheel from it
    (wheel,) = out.glob("celery_sagas-*.whl")
    (sdist,) = out.glob("celery_sagas-*.tar.gz")
    return Dist(wheel, sdist)


@pytest.fixture(scope="module")
def user_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> UserVenv:
    root = tmp_path_factory.mktemp("user-venv")
    assert REPO not in root.parents
    run([sys.executable, "-m", "venv", root])
    venv = UserVenv(root)
    pip = [venv.bin("python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, f"{dist.wheel}[redis,postgres]", "mypy"])
    return venv


# --------------------------------------------------------------------------- the artefacts


def test_the_wheel_holds_the_library_only_with_its_data_files(dist: Dist) -> None:
    names = zipfile.ZipFile(dist.wheel).namelist()
    top_level = {name.split("/")[0] for name in names}

    assert top_level == {"celery_sagas", dist.wheel.name.split("-py3")[0] + ".dist-info"}
    for data in (
        "celery_sagas/py.typed",
        "celery_sagas/store/migrations/env.py",
        "celery_sagas/store/migrations/script.py.mako",
        "celery_sagas/store/migrations/versions/0001_initial.py",
        "celery_sagas/integration/templates/saga.html",
    ):
        assert data in names
    assert any(name.endswith("licenses/LICENSE") for name in names)


def test_the_metadata_names_extras_urls_and_no_hard_broker_or_driver(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        lines = wheel.read(meta).decode().splitlines()
    requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-")]
    hard = [r for r in requires if "extra ==" not in r and not r.startswith("3.")]

    assert not [r for r in hard if r.startswith(("redis", "psycopg2"))]
    assert any(r.startswith("celery[redis]") and 'extra == "redis"' in r for r in requires)
    assert any(r.startswith("psycopg2-binary") and 'extra == "postgres"' in r for r in requires)
    extras = {line.split(":", 1)[1].strip() for line in lines if line.startswith("Provides-Extra")}
    assert {"redis", "rabbitmq", "postgres", "flower", "prometheus"} <= extras
    assert any(line.startswith("Project-URL: Changelog") for line in lines)
    assert any(line.startswith("Classifier: Framework :: Celery") for line in lines)
    assert "License-Expression: MIT" in lines


def test_the_sdist_carries_license_readme_and_changelog(dist: Dist) -> None:
    import tarfile

    with tarfile.open(dist.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "celery_sagas/py.typed",
    } <= names
    assert not any(name.startswith("workers/") for name in names)


def test_the_installed_library_is_the_wheel_and_knows_its_version(
    user_venv: UserVenv, tmp_path: Path
) -> None:
    where = user_venv.run(
        [
            "python",
            "-c",
            "import celery_sagas, kombu.transport.redis; print(celery_sagas.__file__)",
        ],
        tmp_path,
        {},
        tmp_path,
    )
    assert Path(where.strip()).is_relative_to(user_venv.root)
    assert user_venv.run(["celery-sagas", "--version"], tmp_path, {}, tmp_path).startswith(
        "celery-sagas, version 0.1.0"
    )
    with pytest.raises(AssertionError, match="No module named 'workers'"):
        user_venv.run(["python", "-c", "import workers"], tmp_path, {}, tmp_path)


def test_mypy_strict_passes_on_the_user_project(user_venv: UserVenv, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "mypy-cache")]
    out = user_venv.run(["mypy", *cache], USER_PROJECT, {}, USER_PROJECT)
    assert "Success: no issues found" in out

    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "from celery import Celery\nfrom celery_sagas import install\n\n"
        'runtime = install(Celery("x"), "not sagas")\n'
        "reveal_type(runtime)\n"
    )
    checked = subprocess.run(
        [str(user_venv.bin("mypy")), "--strict", "--ignore-missing-imports", *cache, str(wrong)],
        capture_output=True,
        text=True,
        env=user_venv.env(tmp_path, {}),
        cwd=tmp_path,
        timeout=300,
    )
    assert 'Argument 2 to "install" has incompatible type "str"' in checked.stdout
    assert "celery_sagas.integration.runtime.SagaRuntime" in checked.stdout


# --------------------------------------------------------------------------- end to end


@dataclass
class Shop:
    """The user project deployed from the user virtualenv on one broker."""

    venv: UserVenv
    env: dict[str, str]
    engine: sa.Engine
    log_dir: Path

    def process(self, kind: str, app: str = "ticketing.app", **kwargs: Any) -> CeleryProcess:
        project = kwargs.pop("project", USER_PROJECT)
        options: dict[str, Any] = {"kind": kind, "env": self.env, "log_dir": self.log_dir}
        if kind == "worker":
            options.update(pool="prefork", concurrency=2)
        return VenvCeleryProcess(app, venv=self.venv, project=project, **options, **kwargs)

    def cli(self, *argv: str, project: Path = USER_PROJECT) -> str:
        return self.venv.run(list(argv), project, self.env, self.log_dir)

    def state(self, saga: str, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT state FROM saga WHERE name = :n AND business_key = :k"),
                {"n": saga, "k": key},
            ).scalar()

    def wait_settled(self, saga: str, keys: list[str], timeout: float = 60) -> dict[str, str]:
        def settled() -> dict[str, str] | None:
            states = {key: self.state(saga, key) for key in keys}
            return states if all(s in SETTLED for s in states.values()) else None  # type: ignore[return-value]

        return wait_until(settled, timeout=timeout, interval=0.2, message=f"{keys} settled")

    def rows(self, table: str, order_id: str) -> dict[str, str]:
        """step key suffix -> status of the shop's own rows for one order."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(f"SELECT key, status FROM {table} WHERE order_id = :o"),
                {"o": order_id},
            )
            return {key.split(":", 1)[1]: status for key, status in found}


@pytest.fixture
def shop_database() -> Iterator[str]:
    require_service("postgresql")
    url = create_pg_database("sagas_user_project")
    yield url
    drop_pg_database(url)


def deploy(venv: UserVenv, database: str, broker: str, log_dir: Path, **env: str) -> Shop:
    shop = Shop(
        venv,
        {
            "CELERY_BROKER_URL": broker,
            "SAGAS_DATABASE_URL": database,
            "SAGAS_RELAY_INTERVAL": "0.5",
            "SAGAS_SCAN_INTERVAL": "0.5",
            **env,
        },
        sa.create_engine(database, poolclass=NullPool),
        log_dir,
    )
    shop.cli("celery-sagas", "migrate")
    shop.cli("python", "-m", "ticketing.db")
    return shop


ORDERS = {
    "ok": {"seat": "A1", "amount": "25.00"},
    "declined": {"seat": "A2", "amount": "25.00", "card": "declined"},
    "no-ticket": {"seat": "A3", "amount": "25.00", "fail_ticket": True},
    "dead": {"seat": "A4", "amount": "25.00", "fail_ticket": True, "refund_fails": True},
}


def broker_for(kind: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    if kind == "redis":
        return request.getfixturevalue("redis_url"), {}
    token = uuid.uuid4().hex[:8]
    queues = {"TICKETING_QUEUE": f"ticketing-{token}", "SAGAS_DLQ_QUEUE": f"dlq-{token}"}
    return request.getfixturevalue("rabbitmq_url"), queues


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_user_project_completes_compensates_and_dead_letters(
    user_venv: UserVenv,
    shop_database: str,
    broker: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    url, queues = broker_for(broker, request)
    shop = deploy(user_venv, shop_database, url, tmp_path, **queues)
    worker = shop.process("worker", queues=[queues["TICKETING_QUEUE"]] if queues else None)
    beat = shop.process("beat")
    with worker, beat:
        orders = [{"order_id": f"{name}-{broker}", **order} for name, order in ORDERS.items()]
        started = shop.cli("python", "-m", "ticketing.place", *map(json.dumps, orders))
        assert len(json.loads(started)) == len(ORDERS)

        states = shop.wait_settled("ticket_order", [o["order_id"] for o in orders])

    assert list(states.values()) == ["COMPLETED", "FAILED", "FAILED", "COMPENSATION_FAILED"]
    ok, declined, no_ticket, dead = (f"{name}-{broker}" for name in ORDERS)
    assert shop.rows("seat_hold", ok) == {"hold_seat:action": "held"}
    assert shop.rows("card_charge", ok) == {"charge_card:action": "charged"}
    assert shop.rows("ticket", ok) == {"issue_ticket:action": "issued"}
    # a declined card charged nothing; the seat held before it was released
    assert shop.rows("seat_hold", declined) == {"hold_seat:action": "released"}
    assert shop.rows("card_charge", declined) == {}
    # the ticket failed: the charge and the hold before it were undone
    assert shop.rows("card_charge", no_ticket) == {"charge_card:action": "refunded"}
    assert shop.rows("seat_hold", no_ticket) == {"hold_seat:action": "released"}
    # the refund kept failing: dead-lettered, and the seat (undone after it) still held
    assert shop.rows("card_charge", dead) == {"charge_card:action": "charged"}
    assert shop.rows("seat_hold", dead) == {"hold_seat:action": "held"}
    with shop.engine.connect() as conn:
        letter = conn.execute(
            sa.text(
                "SELECT d.task_name, d.status, d.error FROM saga_dead_letter d "
                "JOIN saga s ON s.id = d.saga_id WHERE s.business_key = :k"
            ),
            {"k": dead},
        ).one()
    assert letter.task_name == "ticket_order.refund_card"
    assert letter.status == "dead"
    assert "the bank is offline" in letter.error
    assert "COMPLETED" in shop.cli("celery-sagas", "show", ok)


def readme_quickstart() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n# tasks.py") + len("```python\n")
    return text[start : text.index("```", start)]


def test_the_readme_quickstart_runs_as_written(
    user_venv: UserVenv, shop_database: str, redis_url: str, tmp_path: Path
) -> None:
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "tasks.py").write_text(readme_quickstart())
    shop = Shop(
        user_venv,
        {"CELERY_BROKER_URL": redis_url, "SAGAS_DATABASE_URL": shop_database},
        sa.create_engine(shop_database, poolclass=NullPool),
        tmp_path,
    )
    shop.cli("celery-sagas", "migrate", project=project)
    with shop.process("worker", app="tasks", project=project) as worker:
        for start in readme_start_lines():
            shop.cli("bash", "-c", start, project=project)
        states = shop.wait_settled("trip", ["1", "2"])
        worker.wait_for_log("cancelling")  # print() reaches the log in pieces
        worker.wait_for_log("] {'room': 'R-2'}")

    assert states == {"1": "COMPLETED", "2": "FAILED"}
    assert worker.log_text().count("Task trip.cancel_room[") == 2  # received, succeeded: once
    assert "COMPLETED" in shop.cli("celery-sagas", "show", "1", project=project)


def readme_start_lines() -> list[str]:
    """The quickstart's ``python -c 'from tasks import start_trip; …'`` lines."""
    text = (REPO / "README.md").read_text()
    return [line.split("  #")[0] for line in text.splitlines() if "from tasks import" in line]


def test_the_users_own_saga_tests_run_with_the_kit_from_the_wheel(user_venv: UserVenv) -> None:
    """The test kit and its pytest plugin (``saga_harness``), as the installed package
    gives them: the user project's unit tests, run by pytest in the user's virtualenv."""
    pip = [user_venv.bin("python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, "pytest"])
    python = user_venv.bin("python")
    out = user_venv.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], USER_PROJECT, {}, USER_PROJECT
    )
    assert "2 passed" in out
    plugins = user_venv.run(
        [python, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"],
        USER_PROJECT,
        {},
        USER_PROJECT,
    )
    assert "saga_harness" in plugins and "saga_clock" in plugins

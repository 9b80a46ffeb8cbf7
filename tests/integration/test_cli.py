"""The CLI given bad input, through its real entry points (``python -m celery_sagas.cli``,
the ``celery-sagas`` script, ``celery -A app sagas``): one line ``Error: [code] message``,
exit 2 for a wrong command line and 1 for a failure, never a traceback unless ``--debug``.
Also: ambiguous business keys and ``--name``, counts that follow the filters, redaction."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

BIN = Path(sys.executable).parent
APP = "tests.support.two_sagas_app"
CARD = "4111111111111111"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_sagas.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CELERY_BROKER_URL": "memory://", **(env or {})},
    )


# Each call is a fresh interpreter importing the CLI (~0.8 s, most of it CPU): independent
# calls run side by side, a few at a time, instead of one after the other.
PARALLEL = 3


def run_all(
    calls: Sequence[tuple[Sequence[str], dict[str, str] | None]],
) -> list[subprocess.CompletedProcess[str]]:
    """``run(*args, env=env)`` of every ``(args, env)`` at once; results in ``calls`` order.
    Only for calls that do not depend on each other (reads, refusals)."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(run, *args, env=env) for args, env in calls]
        return [future.result() for future in futures]


def one_error_line(result: subprocess.CompletedProcess[str], code: str, exit_code: int) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: [{code}] "), result.stderr
    assert result.returncode == exit_code, result.stderr
    return lines[0]


@dataclass
class Databases:
    migrated: str
    empty: str
    missing: str

    def env(self, url: str) -> dict[str, str]:
        return {"SAGAS_DATABASE_URL": url}


@pytest.fixture(scope="module")
def databases() -> Iterator[Databases]:
    require_service("postgresql")
    migrated, empty = create_pg_database("cli_migrated"), create_pg_database("cli_empty")
    from celery_sagas.store import upgrade

    upgrade(migrated)
    missing = migrated.rsplit("/", 1)[0] + "/no_such_database_here"
    yield Databases(migrated, empty, missing)
    drop_pg_database(migrated)
    drop_pg_database(empty)


@pytest.fixture(scope="module")
def shared_key(databases: Databases) -> dict[str, Any]:
    """``K1`` started as a jsonbug saga, then as a transfer saga (newest); ``K2`` only as a
    jsonbug saga. Rows only: nothing is published."""
    from tests.support.two_sagas_app import make_app

    runtime = make_app(databases.migrated)._celery_sagas_runtime
    payload = {"key": "K1", "card_number": CARD, "amount": 12}
    jsonbug = runtime.coordinator.start("jsonbug", payload).saga_id
    transfer = runtime.coordinator.start("transfer", payload).saga_id
    other = runtime.coordinator.start("jsonbug", {**payload, "key": "K2"}).saga_id
    return {"jsonbug": jsonbug, "transfer": transfer, "other": other}


# --------------------------------------------------------------------------- bad input

USAGE, FAILURE = 2, 1


BAD_INPUT = [
    (["list"], None, "no_database", USAGE, "--database-url"),
    (["list"], "not-a-url", "bad_database_url", USAGE, "postgresql+psycopg2://"),
    (["list"], "mysql://u@localhost/db", "bad_database_url", USAGE, "PostgreSQL"),
    (["list"], "postgresql://u@localhost/db", "configuration", USAGE, "psycopg2"),
    (["list"], "empty", "schema_missing", FAILURE, "celery-sagas migrate"),
    (["show", "x"], "empty", "schema_missing", FAILURE, "celery-sagas migrate"),
    (["dlq", "list"], "empty", "schema_missing", FAILURE, "celery-sagas migrate"),
    (["list"], "sqlite", "schema_missing", FAILURE, "celery-sagas migrate"),
    (["migrate"], "missing", "database_missing", FAILURE, "createdb"),
    (["list"], "missing", "database_missing", FAILURE, "createdb"),
    (["list"], "postgresql+psycopg2://u@127.0.0.1:1/x", "store_unavailable", FAILURE, ":1"),
    # the same errors through psycopg 3
    (["list"], "empty on psycopg", "schema_missing", FAILURE, "celery-sagas migrate"),
    (["list"], "missing on psycopg", "database_missing", FAILURE, "createdb"),
    (["list"], "postgresql+psycopg://u@127.0.0.1:1/x", "store_unavailable", FAILURE, ":1"),
    (["list"], "postgresql+asyncpg://u@db/x", "bad_database_url", USAGE, "psycopg"),
    (["show", "no-such-saga"], "migrated", "not_found", FAILURE, "celery-sagas list"),
    (["dlq", "show", "424242"], "migrated", "not_found", FAILURE, "dlq list"),
    (["list", "--limit", "0"], "migrated", "usage", USAGE, "list --help"),
    (["list", "--state", "NOPE"], "migrated", "usage", USAGE, "list --help"),
    (["list", "--bogus"], "migrated", "usage", USAGE, "list --help"),
    (["dlq", "show", "abc"], "migrated", "usage", USAGE, "show --help"),
    (["nosuchcommand"], "migrated", "usage", USAGE, "--help"),
    (["--app", "nosuch.module", "list"], "migrated", "bad_app", USAGE, "--app module.path"),
    (["--app", "workers", "list"], "migrated", "bad_app", USAGE, "--app module.path"),
    (["--app", "tests.support.tiny_app", "list"], "migrated", "bad_app", USAGE, "install"),
    (["cancel", "K1", "--reason", "r"], "migrated", "no_app", USAGE, "--app"),
]


def _bad_input_env(databases: Databases, where: str | None, sqlite: Path) -> dict[str, str]:
    named = {
        "migrated": databases.migrated,
        "empty": databases.empty,
        "missing": databases.missing,
        "sqlite": f"sqlite:///{sqlite}",
    }
    for name in ("empty", "missing"):
        named[f"{name} on psycopg"] = named[name].replace("+psycopg2://", "+psycopg://")
    return {} if where is None else {"SAGAS_DATABASE_URL": named.get(where, where)}


@pytest.fixture(scope="module")
def bad_input_runs(
    request: pytest.FixtureRequest, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[tuple[str, ...], str | None], Future[subprocess.CompletedProcess[str]]]]:
    """The CLI run of every selected case of ``test_bad_input_is_one_error_line``, started
    together on first use (each case is a read or a refusal: none depends on another); each
    test waits for its own."""
    sqlite = tmp_path_factory.mktemp("cli-sqlite") / "empty.db"
    selected = [
        item.callspec.params
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.originalname == "test_bad_input_is_one_error_line"
        and item.module is request.module
    ]
    with ThreadPoolExecutor(PARALLEL) as pool:
        yield {
            (tuple(case["args"]), case["where"]): pool.submit(
                run, *case["args"], env=_bad_input_env(databases, case["where"], sqlite)
            )
            for case in selected
        }


@pytest.mark.parametrize(("args", "where", "code", "exit_code", "hint"), BAD_INPUT)
def test_bad_input_is_one_error_line(
    bad_input_runs: dict[tuple[tuple[str, ...], str | None], Future[Any]],
    args: list[str],
    where: str | None,
    code: str,
    exit_code: int,
    hint: str,
) -> None:
    line = one_error_line(bad_input_runs[tuple(args), where].result(), code, exit_code)
    assert hint in line


def test_debug_shows_the_traceback(databases: Databases) -> None:
    result = run("--debug", "list", env=databases.env(databases.empty))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "UndefinedTable" in result.stderr


def test_the_installed_script_and_the_celery_subcommand_report_alike(
    databases: Databases,
) -> None:
    env = {"PATH": "/usr/bin:/bin", **databases.env(databases.empty)}

    def call(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    with ThreadPoolExecutor(PARALLEL) as pool:
        script, celery, usage = pool.map(
            call,
            [
                [str(BIN / "celery-sagas"), "list"],
                [sys.executable, "-m", "celery", "-A", APP, "sagas", "show", "K9"],
                [sys.executable, "-m", "celery", "-A", APP, "sagas", "list", "--limit", "0"],
            ],
        )
    one_error_line(script, "schema_missing", FAILURE)
    one_error_line(celery, "schema_missing", FAILURE)
    assert "sagas list --help" in one_error_line(usage, "usage", USAGE)


# --------------------------------------------------------------------------- keys, names


def test_an_ambiguous_key_lists_the_candidates(
    databases: Databases, shared_key: dict[str, Any]
) -> None:
    env = databases.env(databases.migrated)
    calls = [(["show", "K1"], env), (["--app", APP, "cancel", "K1", "--reason", "r"], env)]
    for result in run_all(calls):
        line = one_error_line(result, "ambiguous", 2)
        assert shared_key["jsonbug"] in line and shared_key["transfer"] in line
        assert "--name" in line


def test_name_picks_the_saga_and_cancel_acts_on_that_one(
    databases: Databases, shared_key: dict[str, Any]
) -> None:
    env = databases.env(databases.migrated)
    shown, nosuch = run_all(
        [
            (["show", "K1", "--name", "jsonbug", "--json"], env),
            (["show", "K1", "--name", "nosuch"], env),
        ]
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["saga_id"] == shared_key["jsonbug"]
    one_error_line(nosuch, "not_found", 1)

    cancelled = run("--app", APP, "cancel", "K2", "--name", "jsonbug", "--reason", "test", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert shared_key["other"] in cancelled.stdout
    shows = run_all(
        [(["show", shared_key[name], "--json"], env) for name in ("other", "jsonbug", "transfer")]
    )
    after = json.loads(shows[0].stdout)
    assert after["state"] == "COMPENSATING"
    assert after["operator_actions"][0]["reason"].endswith(": test")
    for untouched in shows[1:]:
        data = json.loads(untouched.stdout)
        assert data["state"] != "COMPENSATING" and data["operator_actions"] == []


def test_counts_follow_the_filters(databases: Databases, shared_key: dict[str, Any]) -> None:
    env = databases.env(databases.migrated)
    every, only, search, *pages = run_all(
        [
            (["list"], env),
            (["list", "--name", "transfer"], env),
            (["list", "--search", "K", "--name", "jsonbug", "--json"], env),
            *[(["list", "--limit", "1", "--offset", str(i), "--json"], env) for i in range(3)],
        ]
    )
    assert every.returncode == only.returncode == 0, every.stderr + only.stderr
    counts = every.stdout.strip().splitlines()[-1]
    assert sum(int(c.split("=")[1]) for c in counts.split()) == 3
    assert only.stdout.strip().splitlines()[-1] == "STARTED=1"
    searched = json.loads(search.stdout)
    assert {r["saga_id"] for r in searched} == {shared_key["jsonbug"], shared_key["other"]}
    paged = [json.loads(page.stdout) for page in pages]
    assert {p[0]["saga_id"] for p in paged} == set(shared_key.values())


def test_show_is_redacted_in_text_and_json(
    databases: Databases, shared_key: dict[str, Any]
) -> None:
    env = databases.env(databases.migrated)
    text, data = run_all(
        [(["show", shared_key["transfer"]], env), (["show", shared_key["transfer"], "--json"], env)]
    )
    assert text.returncode == data.returncode == 0, text.stderr + data.stderr
    assert CARD not in text.stdout and CARD not in data.stdout
    assert '"card_number": "***"' in text.stdout
    payload = json.loads(data.stdout)["payload"]
    assert payload == {"key": "K1", "card_number": "***", "amount": 12}
    assert {"dead_letters", "operator_actions", "steps", "transitions"} <= set(
        json.loads(data.stdout)
    )

"""The CLI given bad input, through its real entry points (``python -m celery_sagas.cli``,
the ``celery-sagas`` script, ``celery -A app sagas``): one line ``Error: [code] message``,
exit 2 for a wrong command line and 1 for a failure, never a traceback unless ``--debug``.
Also: ambiguous business keys and ``--name``, counts that follow the filters, redaction."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
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


@pytest.mark.parametrize(
    ("args", "where", "code", "exit_code", "hint"),
    [
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
    ],
)
def test_bad_input_is_one_error_line(
    databases: Databases,
    tmp_path: Path,
    args: list[str],
    where: str | None,
    code: str,
    exit_code: int,
    hint: str,
) -> None:
    named = {
        "migrated": databases.migrated,
        "empty": databases.empty,
        "missing": databases.missing,
        "sqlite": f"sqlite:///{tmp_path / 'empty.db'}",
    }
    for name in ("empty", "missing"):
        named[f"{name} on psycopg"] = named[name].replace("+psycopg2://", "+psycopg://")
    env = {} if where is None else {"SAGAS_DATABASE_URL": named.get(where, where)}
    line = one_error_line(run(*args, env=env), code, exit_code)
    assert hint in line


def test_debug_shows_the_traceback(databases: Databases) -> None:
    result = run("--debug", "list", env=databases.env(databases.empty))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "UndefinedTable" in result.stderr


def test_the_installed_script_and_the_celery_subcommand_report_alike(
    databases: Databases,
) -> None:
    env = {"PATH": "/usr/bin:/bin", **databases.env(databases.empty)}
    script = subprocess.run(
        [str(BIN / "celery-sagas"), "list"], capture_output=True, text=True, env=env, timeout=60
    )
    one_error_line(script, "schema_missing", FAILURE)
    celery = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "sagas", "show", "K9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    one_error_line(celery, "schema_missing", FAILURE)
    usage = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "sagas", "list", "--limit", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "sagas list --help" in one_error_line(usage, "usage", USAGE)


# --------------------------------------------------------------------------- keys, names


def test_an_ambiguous_key_lists_the_candidates(
    databases: Databases, shared_key: dict[str, Any]
) -> None:
    for args in (["show", "K1"], ["--app", APP, "cancel", "K1", "--reason", "r"]):
        line = one_error_line(run(*args, env=databases.env(databases.migrated)), "ambiguous", 2)
        assert shared_key["jsonbug"] in line and shared_key["transfer"] in line
        assert "--name" in line


def test_name_picks_the_saga_and_cancel_acts_on_that_one(
    databases: Databases, shared_key: dict[str, Any]
) -> None:
    env = databases.env(databases.migrated)
    shown = run("show", "K1", "--name", "jsonbug", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["saga_id"] == shared_key["jsonbug"]
    one_error_line(run("show", "K1", "--name", "nosuch", env=env), "not_found", 1)

    cancelled = run("--app", APP, "cancel", "K2", "--name", "jsonbug", "--reason", "test", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert shared_key["other"] in cancelled.stdout
    after = json.loads(run("show", shared_key["other"], "--json", env=env).stdout)
    assert after["state"] == "COMPENSATING"
    assert after["operator_actions"][0]["reason"].endswith(": test")
    for untouched in ("jsonbug", "transfer"):
        data = json.loads(run("show", shared_key[untouched], "--json", env=env).stdout)
        assert data["state"] != "COMPENSATING" and data["operator_actions"] == []


def test_counts_follow_the_filters(databases: Databases, shared_key: dict[str, Any]) -> None:
    env = databases.env(databases.migrated)
    every = run("list", env=env)
    only = run("list", "--name", "transfer", env=env)
    assert every.returncode == only.returncode == 0, every.stderr + only.stderr
    counts = every.stdout.strip().splitlines()[-1]
    assert sum(int(c.split("=")[1]) for c in counts.split()) == 3
    assert only.stdout.strip().splitlines()[-1] == "STARTED=1"
    searched = json.loads(
        run("list", "--search", "K", "--name", "jsonbug", "--json", env=env).stdout
    )
    assert {r["saga_id"] for r in searched} == {shared_key["jsonbug"], shared_key["other"]}
    paged = [
        json.loads(run("list", "--limit", "1", "--offset", str(i), "--json", env=env).stdout)
        for i in range(3)
    ]
    assert {p[0]["saga_id"] for p in paged} == set(shared_key.values())


def test_show_is_redacted_in_text_and_json(
    databases: Databases, shared_key: dict[str, Any]
) -> None:
    env = databases.env(databases.migrated)
    text = run("show", shared_key["transfer"], env=env)
    data = run("show", shared_key["transfer"], "--json", env=env)
    assert text.returncode == data.returncode == 0, text.stderr + data.stderr
    assert CARD not in text.stdout and CARD not in data.stdout
    assert '"card_number": "***"' in text.stdout
    payload = json.loads(data.stdout)["payload"]
    assert payload == {"key": "K1", "card_number": "***", "amount": 12}
    assert {"dead_letters", "operator_actions", "steps", "transitions"} <= set(
        json.loads(data.stdout)
    )

"""What the CLI says about each kind of error (pure; the entry points are tested in
tests/integration/test_cli.py)."""

from __future__ import annotations

import sqlite3

import click
import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError

from celery_sagas.cli.failures import CommandError, failure_of
from celery_sagas.errors import SagaNotFoundError, StoreUnavailableError

URL = "postgresql+psycopg2://app:secret@db/sagas"


class PgError(Exception):
    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


def wrapped(exc: Exception) -> Exception:
    """A library error whose cause is ``exc`` (as the store raises them)."""
    try:
        raise StoreUnavailableError("cannot reach the saga database") from exc
    except StoreUnavailableError as error:
        return error


@pytest.mark.parametrize(
    ("exc", "code", "exit_code", "words"),
    [
        (click.UsageError("No such option '--x'."), "usage", 2, "--help"),
        (CommandError("bad_app", "cannot import --app 'x'"), "bad_app", 2, "--app"),
        (SagaNotFoundError("no saga 'K'"), "not_found", 1, "no saga"),
        (
            ProgrammingError("SELECT", {}, PgError('relation "saga" does not exist', "42P01")),
            "schema_missing",
            1,
            "celery-sagas migrate",
        ),
        (
            wrapped(
                OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: saga"))
            ),
            "schema_missing",
            1,
            "celery-sagas migrate",
        ),
        (
            OperationalError("connect", {}, PgError('database "x" does not exist', "3D000")),
            "database_missing",
            1,
            "createdb",
        ),
        (
            OperationalError("connect", {}, PgError("Connection refused", "")),
            "store_unavailable",
            1,
            "Connection refused",
        ),
        (RuntimeError("boom\nsecond line"), "internal", 1, "--debug"),
    ],
)
def test_failure_of(exc: Exception, code: str, exit_code: int, words: str) -> None:
    failure = failure_of(exc, URL)
    assert (failure.code, failure.exit_code) == (code, exit_code)
    assert words in failure.message
    assert "\n" not in failure.line and failure.line.startswith(f"Error: [{code}] ")
    assert "secret" not in failure.line

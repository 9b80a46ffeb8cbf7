"""Every way a command can fail, as one line: ``Error: [code] message``.

:func:`failure_of` is pure: it maps an exception to a :class:`Failure` (stable code, a
message that says what to do, exit status 2 for a wrong command line and 1 for a failure).
The entry points print it; only ``--debug`` shows a traceback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from celery_sagas.errors import SagaError
from celery_sagas.store.browse import explain

USAGE, FAILURE = 2, 1
# codes that mean "the command line is wrong": fix it and run again
USAGE_CODES = frozenset(
    {"usage", "bad_app", "no_app", "bad_database_url", "no_database", "ambiguous", "configuration"}
)
DEBUG_HINT = "rerun with --debug for the traceback"


class CommandError(SagaError):
    """A CLI-level error with its own stable code (bad ``--app``, no database, …)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    exit_code: int

    @property
    def line(self) -> str:
        return f"Error: [{self.code}] {self.message}"


def _usage(exc: click.UsageError) -> Failure:
    path = exc.ctx.command_path if exc.ctx is not None else "celery-sagas"
    message = " ".join(exc.format_message().split())
    return Failure("usage", f"{message} (see `{path} --help`)", USAGE)


def failure_of(exc: BaseException, url: str | None = None) -> Failure:
    """What to tell the operator about ``exc`` (pure)."""
    if isinstance(exc, click.UsageError):
        return _usage(exc)
    if isinstance(exc, click.ClickException):
        return Failure("failed", exc.format_message(), FAILURE)
    error = explain(exc, url) or (exc if isinstance(exc, SagaError) else None)
    if error is None:
        text = " ".join(str(exc).split()) or "no message"
        return Failure("internal", f"{type(exc).__name__}: {text}; {DEBUG_HINT}", FAILURE)
    message = " ".join(error.message.split())
    return Failure(error.code, message, USAGE if error.code in USAGE_CODES else FAILURE)


def report(failure: Failure) -> NoReturn:
    click.echo(failure.line, err=True)
    sys.exit(failure.exit_code)


class ReportedFailure(click.ClickException):
    """A :class:`Failure` carried through click (``celery -A app sagas …``, where Celery's
    CLI runs the command): shown as one line with the failure's exit status."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure

    @property  # click reads ``exit_code``: the failure's (2 usage, 1 failure)
    def exit_code(self) -> int:  # type: ignore[override]
        return self.failure.exit_code

    def show(self, file: Any = None) -> None:
        click.echo(self.failure.line, err=True)

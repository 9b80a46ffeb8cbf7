"""``celery-sagas …`` and ``celery -A app sagas …``: inspect sagas, operate the dead-letter
queue, cancel sagas, replay a choreographed saga's event, migrate the schema.

Any failure is one line ``Error: [code] message`` (see ``cli.failures``): exit status 2 when
the command line is wrong, 1 when the command failed; ``--debug`` shows the traceback.
The CLI is the one place (with the example app) that configures logging handlers.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from celery_sagas.cli.context import APP_ENV, CliContext
from celery_sagas.cli.dlq import cancel_saga, dlq_group
from celery_sagas.cli.evolve import migrate_sagas_command
from celery_sagas.cli.failures import ReportedFailure, failure_of, report
from celery_sagas.cli.inspect import list_command, migrate_command, show_command
from celery_sagas.cli.metrics import metrics_command
from celery_sagas.cli.prune import prune_command
from celery_sagas.cli.replay import replay_command

DEBUG_KEY = "celery_sagas.debug"


class SagaGroup(click.Group):
    """Any error of a command becomes one ``Error: [code] message`` line (a traceback only
    with ``--debug``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ReportedFailure, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # a subcommand's usage errors too (celery -A app sagas …)
            if ctx.meta.get(DEBUG_KEY):
                raise
            found = ctx.find_object(CliContext)
            raise ReportedFailure(failure_of(exc, found.url if found else None)) from exc


COMMANDS = (
    list_command,
    show_command,
    migrate_command,
    migrate_sagas_command,
    dlq_group,
    cancel_saga,
    replay_command,
    metrics_command,
    prune_command,
)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group(cls=SagaGroup, help="Inspect and operate sagas (celery-sagas).")
@click.version_option(package_name="celery-sagas", prog_name="celery-sagas")
@click.option(
    "--database-url",
    envvar="SAGAS_DATABASE_URL",
    help="Saga database (postgresql+psycopg2://…, postgresql+psycopg://… for psycopg 3, or "
    "sqlite:///…). Env: SAGAS_DATABASE_URL.",
)
@click.option(
    "--app",
    "app_name",
    envvar=APP_ENV,
    help=f"The Celery app that declares the sagas (e.g. workers.app); needed by commands "
    f"that change sagas. Env: {APP_ENV}.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does to stderr.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_context
def cli(
    ctx: click.Context,
    database_url: str | None,
    app_name: str | None,
    verbose: bool,
    debug: bool,
) -> None:
    _configure_logging(verbose)
    ctx.meta[DEBUG_KEY] = debug
    ctx.obj = CliContext(database_url, app_name)
    if ctx.invoked_subcommand is not None and "--help" not in sys.argv:
        ctx.obj.check_app()


for _command in COMMANDS:
    cli.add_command(_command)


def main(args: list[str] | None = None) -> None:
    """``celery-sagas``: click runs without its own error handling, so that every error,
    usage errors included, is printed as one line."""
    argv = sys.argv[1:] if args is None else args
    try:
        code = cli.main(args=argv, prog_name="celery-sagas", standalone_mode=False)
    except ReportedFailure as exc:
        report(exc.failure)
    except click.Abort:
        click.echo("Error: [aborted] interrupted", err=True)
        sys.exit(1)
    except Exception as exc:
        if "--debug" in argv:
            raise
        report(failure_of(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _celery_command() -> click.Command:
    """``celery -A app sagas …``: the same commands, the app given by ``-A``."""
    from celery.bin.base import handle_preload_options

    @click.group(cls=SagaGroup, name="sagas", help=cli.help)
    @click.pass_context
    @handle_preload_options
    def sagas(ctx: click.Context) -> None:
        app = ctx.obj.app
        _configure_logging(verbose=False)
        ctx.obj = CliContext(os.environ.get("SAGAS_DATABASE_URL"), app=app)

    for command in COMMANDS:
        sagas.add_command(command)
    try:  # the `flower` extra: `celery -A app sagas flower` = Flower + the Sagas pages
        from celery_sagas.integration.flower import flower_command
    except ImportError:
        pass
    else:
        sagas.add_command(flower_command)
    return sagas


sagas_celery_command = _celery_command()

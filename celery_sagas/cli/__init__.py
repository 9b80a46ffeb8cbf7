"""``celery-sagas …`` and ``celery -A app sagas …``: inspect sagas, operate the dead-letter
queue, cancel sagas, migrate the schema.

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
from celery_sagas.cli.inspect import list_command, migrate_command, show_command
from celery_sagas.cli.metrics import metrics_command
from celery_sagas.errors import SagaError


class SagaGroup(click.Group):
    """Library errors become clean messages with a non-zero exit, never tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SagaError as exc:
            raise click.ClickException(str(exc)) from exc


COMMANDS = (list_command, show_command, migrate_command, dlq_group, cancel_saga, metrics_command)


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
    help="Saga database (postgresql+psycopg2://… or sqlite:///…). Env: SAGAS_DATABASE_URL.",
)
@click.option(
    "--app",
    "app_name",
    envvar=APP_ENV,
    help=f"The Celery app that declares the sagas (e.g. workers.app); needed by commands "
    f"that change sagas. Env: {APP_ENV}.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does to stderr.")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, app_name: str | None, verbose: bool) -> None:
    _configure_logging(verbose)
    ctx.obj = CliContext(database_url, app_name)


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="celery-sagas")


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

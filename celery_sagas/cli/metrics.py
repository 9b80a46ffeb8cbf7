"""``celery-sagas metrics``: a Prometheus exporter computed from the saga database at scrape
time (correct under prefork: nothing is counted in worker memory)."""

from __future__ import annotations

import os
from typing import Any

import click

from celery_sagas.cli.context import context_of
from celery_sagas.errors import SagaError
from celery_sagas.settings import SagaSettings


def _budgets(runtime: Any) -> dict[tuple[str, str], float]:
    """(saga, step) -> timeout, for the "step p99 over its timeout budget" alert."""
    budgets: dict[tuple[str, str], float] = {}
    timing = runtime.coordinator.timing
    for saga in runtime.sagas.values():
        for step, timeout in zip(saga.steps, timing.timeouts(saga), strict=True):
            if timeout:
                budgets[(saga.name, step.name)] = timeout
    return budgets


def _stuck_after(runtime: Any, url: str) -> float:
    if runtime is not None:
        return float(runtime.settings.stuck_after)
    if os.environ.get("SAGAS_STUCK_AFTER"):
        return float(SagaSettings.from_config({}, database_url=url).stuck_after)
    return SagaSettings.stuck_after


@click.command(
    "metrics",
    help="Serve /metrics for Prometheus (computed from the saga database "
    "at scrape time). Runs until interrupted.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=9808,
    show_default=True,
    help="Port (0 picks a free one).",
)
@click.option(
    "--stuck-after",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds after which a saga still moving counts as stuck (celery_sagas_stuck). "
    "Default: the app's stuck_after, else SAGAS_STUCK_AFTER, else 600.",
)
@click.option(
    "--prepared-statements/--no-prepared-statements",
    "prepared_statements",
    default=None,
    help="Let the driver prepare statements on the server; --no-prepared-statements behind "
    "a pooler in transaction mode (pgbouncer) with psycopg 3. Default: the app's "
    "prepared_statements, else SAGAS_PREPARED_STATEMENTS, else on.",
)
@click.pass_context
def metrics_command(
    ctx: click.Context,
    host: str,
    port: int,
    stuck_after: float | None,
    prepared_statements: bool | None,
) -> None:
    from celery_sagas.metrics import serve  # prometheus_client is imported when serving
    from celery_sagas.stats import bucket_bounds
    from celery_sagas.store.stats import StatsReader

    context = context_of(ctx)
    runtime = context.runtime if context.has_app else None
    budgets = _budgets(runtime) if runtime is not None else {}
    url = str(context.store.engine.url.render_as_string(hide_password=False))
    # every step budget is a bucket bound, so "p99 over budget" compares exactly
    reader = StatsReader(
        url,
        buckets=bucket_bounds(budgets.values()),
        stuck_after=stuck_after or _stuck_after(runtime, url),
        installed=frozenset(runtime.sagas.versions) if runtime is not None else None,
        # as the command's store: the app's prepared_statements, else the environment's
        prepare=(
            getattr(context.store, "prepare", True)
            if prepared_statements is None
            else prepared_statements
        ),
    )
    click.echo("reading the saga history once…", err=True)
    try:
        reader()  # the first read folds finished sagas; do it before the first scrape
    except SagaError as exc:  # serve anyway: database_up 0 is what the alert needs
        click.echo(f"warning: {exc}; serving celery_sagas_database_up 0 until it answers", err=True)
    server = serve(reader, host, port, step_budgets=budgets or None)
    click.echo(f"serving http://{host}:{server.port}/metrics", err=True)
    try:
        server.wait()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        server.stop()

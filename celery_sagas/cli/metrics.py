"""``celery-sagas metrics``: a Prometheus exporter computed from the saga database at scrape
time (correct under prefork: nothing is counted in worker memory)."""

from __future__ import annotations

from typing import Any

import click

from celery_sagas.cli.context import context_of


def _budgets(runtime: Any) -> dict[tuple[str, str], float]:
    """(saga, step) -> timeout, for the "step p99 over its timeout budget" alert."""
    budgets: dict[tuple[str, str], float] = {}
    timing = runtime.coordinator.timing
    for saga in runtime.sagas.values():
        for step, timeout in zip(saga.steps, timing.timeouts(saga), strict=True):
            if timeout:
                budgets[(saga.name, step.name)] = timeout
    return budgets


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
@click.pass_context
def metrics_command(ctx: click.Context, host: str, port: int) -> None:
    from celery_sagas.metrics import serve  # prometheus_client is imported when serving
    from celery_sagas.stats import bucket_bounds
    from celery_sagas.store.stats import StatsReader

    context = context_of(ctx)
    has_app = context.app_name or context.has_app
    budgets = _budgets(context.runtime) if has_app else {}
    url = str(context.store.engine.url.render_as_string(hide_password=False))
    # every step budget is a bucket bound, so "p99 over budget" compares exactly
    reader = StatsReader(url, buckets=bucket_bounds(budgets.values()))
    click.echo("reading the saga history once…", err=True)
    reader()  # the first read folds finished sagas; do it before the first scrape
    server = serve(reader, host, port, step_budgets=budgets or None)
    click.echo(f"serving http://{host}:{server.port}/metrics", err=True)
    try:
        server.wait()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        server.stop()

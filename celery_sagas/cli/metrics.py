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
    try:
        from celery_sagas.metrics import serve
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise click.ClickException(
            f"{exc}: install the prometheus extra (pip install 'celery-sagas[prometheus]')"
        ) from exc
    from celery_sagas.store.stats import StatsReader

    context = context_of(ctx)
    has_app = context.app_name or context.has_app
    budgets = _budgets(context.runtime) if has_app else None
    url = str(context.store.engine.url.render_as_string(hide_password=False))
    server = serve(StatsReader(url), host, port, step_budgets=budgets)
    click.echo(f"serving http://{host}:{server.server.server_port}/metrics", err=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        server.stop()

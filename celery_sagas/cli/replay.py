"""``celery-sagas replay``: re-publish a choreographed saga's event that a subscribed
handler never reacted to."""

from __future__ import annotations

from typing import Any

import click

from celery_sagas.cli.context import context_of
from celery_sagas.cli.refs import name_option
from celery_sagas.cli.render import emit_json, iso


@click.command(
    "replay",
    help="Re-publish the last event of a choreographed saga (id or business key) that a "
    "subscribed handler never reacted to, to those handlers only (their guards keep it "
    "once). Needs the app that declares the choreography (--app). Prints what was sent; "
    "nothing to replay is not an error.",
)
@click.argument("ref")
@name_option
@click.option("--dry-run", is_flag=True, help="Only show what would be re-published.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def replay_command(
    ctx: click.Context, ref: str, name: str | None, dry_run: bool, as_json: bool
) -> None:
    from celery_sagas.integration.choreography_operators import replay

    context = context_of(ctx)
    record = context.resolve(ref, name)
    subscriber = context.choreography(record.name)
    result = replay(subscriber, record.saga_id, context.actor(), dry_run=dry_run)
    event = result.event
    data: dict[str, Any] = {
        "saga_id": record.saga_id,
        "state": record.state.value,
        "event": event.name if event else None,
        "event_id": event.event_id if event else None,
        "published_by": (event.handler or event.service) if event else None,
        "published_at": iso(event.published_at) if event else None,
        "handlers": list(result.handlers),
        "sent": result.sent,
        "dry_run": dry_run,
    }
    if as_json:
        emit_json(data)
    elif event is None:
        click.echo(
            f"saga {record.saga_id}: every published event has its reactions; nothing to replay"
        )
    else:
        verb = "would re-publish" if dry_run else "re-published"
        click.echo(
            f"saga {record.saga_id}: {verb} {event.name} ({event.event_id}, published by "
            f"{data['published_by']}) to {', '.join(result.handlers)}"
        )

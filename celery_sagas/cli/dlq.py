"""Operator commands: the dead-letter queue (list, show, retry, discard, drain) and cancel."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click

from celery_sagas import dlq
from celery_sagas.choreography import is_handler_dead_letter
from celery_sagas.cli.context import context_of
from celery_sagas.cli.refs import name_option
from celery_sagas.cli.render import (
    action_rows,
    action_summary,
    dead_letter_rows,
    dead_letter_summary,
    emit_json,
    iso,
    operator_actions,
    table,
)
from celery_sagas.errors import SagaError, SagaNotFoundError
from celery_sagas.protocols import DeadLetterRecord
from celery_sagas.redaction import redact

STATUSES = click.Choice(["dead", "retrying", "resolved", "discarded", "open", "all"])


@click.group("dlq", help="The dead-letter queue: compensations that exhausted their retries.")
def dlq_group() -> None:
    pass


@dlq_group.command("list", help="Dead-letter entries, oldest first (default: still open).")
@click.option("--status", type=STATUSES, default="open", show_default=True)
@click.option("--saga", "saga_ref", help="Only entries of this saga (id or business key).")
@name_option
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def list_entries(
    ctx: click.Context,
    status: str,
    saga_ref: str | None,
    name: str | None,
    limit: int,
    as_json: bool,
) -> None:
    context = context_of(ctx)
    store = context.store
    saga_id = context.resolve(saga_ref, name).saga_id if saga_ref else None
    entries = store.dead_letters(saga_id, None if status == "all" else status, limit)
    if as_json:
        emit_json([dead_letter_summary(e) for e in entries])
    elif not entries:
        click.echo(f"no dead letters ({status})")
    else:
        click.echo(dead_letter_rows(entries))


@dlq_group.command("show", help="One entry: why it died, its attempts, payload, operator actions.")
@click.argument("entry_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def show_entry(ctx: click.Context, entry_id: int, as_json: bool) -> None:
    context = context_of(ctx)
    store = context.store
    entry = store.dead_letter(entry_id)
    if entry is None:
        raise SagaNotFoundError(
            f"no dead-letter entry {entry_id}; `celery-sagas dlq list` shows them"
        )
    key = entry.payload.get("attempts_key") or f"{entry.saga_id}:{entry.step_name}:compensation"
    attempts = store.attempts(key)
    actions = operator_actions(store.transitions(entry.saga_id))
    data = {
        **dead_letter_summary(entry),
        "payload": redact(entry.payload, context.redact_fields),
        "traceback": entry.traceback,
        "failed_attempts": [
            {"attempt": a.attempt, "at": iso(a.at), "error": a.error} for a in attempts
        ],
        "operator_actions": [action_summary(t) for t in actions],
    }
    if as_json:
        emit_json(data)
        return
    click.echo(render_entry(data))
    if attempts:
        click.echo("\nfailed attempts")
        click.echo(
            table(
                [(str(a.attempt), iso(a.at) or "", a.error) for a in attempts], ["#", "at", "error"]
            )
        )
    click.echo("\noperator actions\n" + action_rows(actions))
    if entry.traceback:
        click.echo("\ntraceback\n" + entry.traceback)


ENTRY_FIELDS = (
    "id",
    "saga_id",
    "saga",
    "step_name",
    "task",
    "status",
    "attempts",
    "deaths",
    "dead_since",
    "resolved_at",
    "resolution",
    "auto_retries",
    "error",
)


def render_entry(data: dict[str, Any]) -> str:
    """The header of ``dlq show``: one field a line, ``-`` for nothing, the payload as JSON."""
    lines = [f"{name:<14}{'-' if data[name] is None else data[name]}" for name in ENTRY_FIELDS]
    payload = json.dumps(data["payload"], indent=2, default=str)
    lines.append(f"{'payload':<14}" + payload.replace("\n", "\n" + " " * 14))
    return "\n".join(lines)


def _publish(ctx: click.Context, result: dlq.ActionResult) -> None:
    if result.messages:
        context_of(ctx).runtime.publish(result.messages)


def _retry(context: Any, entry_id: int, reason: str | None) -> dlq.ActionResult:
    """A dead compensation is re-run by its saga's coordinator; a dead choreography
    handler gets its event re-delivered (its guard keeps it once)."""
    entry = context.store.dead_letter(entry_id)
    if entry is None or not is_handler_dead_letter(entry.step):
        return dlq.retry(context.runtime.coordinator, entry_id, context.actor(), reason)
    from celery_sagas.integration import choreography_operators as operators

    subscriber = context.choreography(entry.saga_name)
    event_id = str(entry.payload["event_id"])
    if operators.retry_dead_letter(
        subscriber, entry.id, entry.saga_id, entry.step_name, event_id, context.actor()
    ):
        done = f"entry {entry.id}: {entry.payload.get('event')} re-delivered to {entry.step_name}"
        return dlq.ActionResult(True, done, entry.saga_id)
    return dlq.ActionResult(
        False, f"entry {entry.id} {dlq.ALREADY.get(entry.status, entry.status)}; nothing done"
    )


def _discard(context: Any, entry_id: int, reason: str) -> dlq.ActionResult:
    entry = context.store.dead_letter(entry_id)
    if entry is None or not is_handler_dead_letter(entry.step):
        return dlq.discard(context.runtime.coordinator, entry_id, context.actor(), reason)
    if not reason.strip():
        raise SagaError("a reason is required to discard a dead letter")
    from celery_sagas.integration import choreography_operators as operators

    subscriber = context.choreography(entry.saga_name)
    if operators.discard_dead_letter(subscriber, entry.id, context.actor(), reason):
        return dlq.ActionResult(
            True, f"entry {entry.id}: {entry.step_name} discarded (handled by hand)", entry.saga_id
        )
    return dlq.ActionResult(
        False, f"entry {entry.id} {dlq.ALREADY.get(entry.status, entry.status)}; nothing done"
    )


@dlq_group.command("retry", help="Re-run a dead compensation now (ID, or --all dead entries).")
@click.argument("entry_id", type=int, required=False)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead entry.")
@click.option("--reason", default=None, help="Why, for the saga's log.")
@click.pass_context
def retry_entry(
    ctx: click.Context, entry_id: int | None, retry_all: bool, reason: str | None
) -> None:
    if (entry_id is None) == (not retry_all):
        raise click.UsageError("give one entry ID or --all")
    context = context_of(ctx)
    ids = (
        [entry_id]
        if entry_id is not None
        else [e.id for e in context.store.dead_letters(status="dead", limit=10_000)]
    )
    if not ids:
        click.echo("no dead entries")
    for number in ids:
        result = _retry(context, number, reason)
        _publish(ctx, result)
        click.echo(result.message)


@dlq_group.command("discard", help="An operator fixed it by hand: mark compensated, carry on.")
@click.argument("entry_id", type=int)
@click.option("--reason", required=True, help="What was done by hand (required, logged).")
@click.pass_context
def discard_entry(ctx: click.Context, entry_id: int, reason: str) -> None:
    context = context_of(ctx)
    result = _discard(context, entry_id, reason)
    _publish(ctx, result)
    click.echo(result.message)


def _queued_entries(runtime: Any, limit: int, consume: bool) -> tuple[list[tuple[str, int]], int]:
    """(saga_id, step) of the DLQ queue's messages (consumed unless a dry run), and the
    queue depth seen. The table stays the source of truth: a lost queue loses nothing."""
    found: list[tuple[str, int]] = []
    with runtime.app.connection_for_read() as conn:
        queue = conn.SimpleQueue(runtime.settings.dlq_queue)
        try:
            try:
                depth = queue.qsize()
            except conn.channel_errors:  # never declared (no message yet, e.g. on Redis)
                return found, 0
            while consume and len(found) < limit:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    break
                found.append(_ids(message.decode()))
                message.ack()
        finally:
            queue.close()
    return found, depth


def _ids(body: Any) -> tuple[str, int]:
    kwargs = body[1] if isinstance(body, list | tuple) else body.get("kwargs", {})
    return str(kwargs["saga_id"]), int(kwargs["step"])


def _entries_to_drain(
    store: Any, queued: Sequence[tuple[str, int]], limit: int
) -> list[DeadLetterRecord]:
    entries: dict[int, DeadLetterRecord] = {}
    for saga_id, step in queued:
        entry = store.dead_letter_for(saga_id, step)
        if entry is not None and entry.status == "dead":
            entries[entry.id] = entry
    for entry in store.dead_letters(status="dead", limit=limit):
        entries.setdefault(entry.id, entry)
    return list(entries.values())[:limit]


def _wait_for(store: Any, ids: Sequence[int], timeout: float) -> Iterator[int]:
    """Poll until no retried entry is still 'retrying'; yields how many settled so far."""
    deadline = time.monotonic() + timeout
    while True:
        pending = [i for i in ids if store.dead_letter(i).status == "retrying"]
        yield len(ids) - len(pending)
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(0.2)


@dlq_group.command(
    "drain",
    help="Consume the DLQ queue and retry every dead entry; wait for "
    "the outcome and print what was resolved and what is still dead. Exit 0 when "
    "all were resolved, 1 when some are still dead.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="At most this many entries.",
)
@click.option("--dry-run", is_flag=True, help="Only show what would be retried; change nothing.")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0),
    default=120,
    show_default=True,
    help="Seconds to wait for the retried compensations.",
)
@click.option("--reason", default="drained from the DLQ", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final table as JSON.")
@click.pass_context
def drain(
    ctx: click.Context, limit: int, dry_run: bool, wait_seconds: float, reason: str, as_json: bool
) -> None:
    context = context_of(ctx)
    runtime = context.runtime
    queued, depth = _queued_entries(runtime, limit, consume=not dry_run)
    entries = _entries_to_drain(context.store, queued, limit)
    click.echo(
        f"DLQ queue {runtime.settings.dlq_queue}: {depth} message(s); "
        f"{len(entries)} dead entr{'y' if len(entries) == 1 else 'ies'} to retry",
        err=True,
    )
    if dry_run:
        click.echo(dead_letter_rows(entries) if entries else "nothing to drain")
        return
    retried: list[int] = []
    with click.progressbar(entries, label="retrying", file=sys.stderr) as bar:
        for entry in bar:
            result = _retry(context, entry.id, reason)
            _publish(ctx, result)
            if result.changed:
                retried.append(entry.id)
    with click.progressbar(length=len(retried), label="waiting  ", file=sys.stderr) as bar:
        seen = 0
        for settled in _wait_for(context.store, retried, wait_seconds):
            bar.update(settled - seen)
            seen = settled
    final = [context.store.dead_letter(e.id) for e in entries]
    if as_json:
        emit_json([dead_letter_summary(e) for e in final])
    elif final:
        click.echo(dead_letter_rows(final))
    resolved = sum(e.status == "resolved" for e in final)
    click.echo(f"resolved {resolved}, still dead {len(final) - resolved}", err=True)
    if resolved < len(final):
        ctx.exit(1)


@click.command(
    "cancel", help="Stop a running saga (id or business key) and compensate what it did."
)
@click.argument("ref")
@name_option
@click.option("--reason", required=True, help="Why (required, logged).")
@click.pass_context
def cancel_saga(ctx: click.Context, ref: str, name: str | None, reason: str) -> None:
    context = context_of(ctx)
    runtime = context.runtime
    record = context.resolve(ref, name)
    if context.is_choreography(record.name):
        raise CancelRefused(
            f"saga {record.saga_id} is a choreography ({record.name}): no coordinator can "
            "cancel it; its services compensate when a failure event is published (or its "
            "deadline passes)"
        )
    saga_id = record.saga_id
    result = dlq.cancel(runtime.coordinator, saga_id, context.actor(), reason)
    if not result.changed:
        raise CancelRefused(result.message)
    _publish(ctx, result)
    click.echo(result.message)


class CancelRefused(SagaError):
    code = "refused"

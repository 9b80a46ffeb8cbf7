"""Read-only commands (list, show) and migrate."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import click

from celery_sagas.cli.context import context_of, store_of
from celery_sagas.cli.refs import name_option
from celery_sagas.cli.render import (
    duration,
    emit_json,
    iso,
    render_detail,
    saga_detail,
    saga_summary,
    table,
)
from celery_sagas.machine import SETTLED_STATES, SagaState
from celery_sagas.settings import SagaSettings, redact_url
from celery_sagas.store.browse import Filter, count_by_state, page, shown

STATE_CHOICES = click.Choice([s.value for s in SagaState], case_sensitive=False)


def counts_line(counts: Mapping[str, int]) -> str:
    return "  ".join(f"{k}={shown(v)}" for k, v in sorted(counts.items())) or "no sagas match"


@click.command("list", help="List sagas, newest first, with their counts per state.")
@click.option("--state", type=STATE_CHOICES, help="Only sagas in this state.")
@click.option("--name", help="Only sagas of this type (e.g. order_fulfillment).")
@click.option("--search", help="Only sagas whose id or business key starts with this.")
@click.option(
    "--stuck",
    is_flag=True,
    help="Only sagas still unfinished (not COMPLETED/FAILED) after --stuck-after seconds.",
)
@click.option(
    "--stuck-after",
    type=click.FloatRange(min=0, min_open=True),
    default=SagaSettings.stuck_after,
    envvar="SAGAS_STUCK_AFTER",
    show_default=True,
    help="The stuck-saga threshold in seconds. Env: SAGAS_STUCK_AFTER.",
)
@click.option(
    "--unknown-definition",
    is_flag=True,
    help="Only unfinished sagas started with a definition the app (--app) does not have "
    "installed: another version's workers must finish them.",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip this many first.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts (README: JSON output)."
)
@click.pass_context
def list_command(
    ctx: click.Context,
    state: str | None,
    name: str | None,
    search: str | None,
    stuck: bool,
    stuck_after: float,
    unknown_definition: bool,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    store = store_of(ctx)
    where = Filter(
        state=SagaState(state.upper()) if state else None,
        name=name,
        search=search,
        created_before=datetime.now(UTC) - timedelta(seconds=stuck_after) if stuck else None,
        unfinished=stuck or unknown_definition,
        unknown_to=frozenset(context_of(ctx).runtime.sagas.versions)
        if unknown_definition
        else None,
    )
    records = page(store.engine, where, offset, limit)
    if as_json:
        emit_json([saga_summary(r) for r in records])
        return
    counts = count_by_state(store.engine, where)
    if not records:
        what = " stuck" if stuck else ""
        click.echo(f"no{what} sagas" + (f" in state {state.upper()}" if state else ""))
        return
    rows = [
        (
            r.saga_id,
            r.name,
            r.business_key,
            r.state.value,
            str(r.current_step),
            iso(r.created_at) or "",
            duration(r.created_at, r.finished_at if r.state in SETTLED_STATES else None),
        )
        for r in records
    ]
    click.echo(table(rows, ["saga_id", "name", "key", "state", "step", "created", "age/took"]))
    click.echo("\n" + counts_line(counts))


@click.command("show", help="Show one saga (by saga id or business key) with its timeline.")
@click.argument("ref")
@name_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts (README: JSON output)."
)
@click.pass_context
def show_command(ctx: click.Context, ref: str, name: str | None, as_json: bool) -> None:
    context = context_of(ctx)
    record = context.resolve(ref, name)
    store = context.store
    log = store.transitions(record.saga_id)
    dead = store.dead_letters(saga_id=record.saga_id, status=None, limit=1000)
    fields = context.redact_fields
    if as_json:
        emit_json(saga_detail(record, log, dead, fields))
    else:
        click.echo(render_detail(record, log, dead, fields))


@click.command("migrate", help="Create or upgrade the saga schema (its own Alembic version table).")
@click.pass_context
def migrate_command(ctx: click.Context) -> None:
    from celery_sagas.store import migrate

    store = store_of(ctx)
    before = migrate.current_revision(store.engine)
    after = migrate.upgrade(store.engine)
    url = redact_url(str(store.engine.url))
    if before == after:
        click.echo(f"schema already at revision {after} ({url})")
    else:
        click.echo(f"schema upgraded {before or '(empty)'} → {after} ({url})")

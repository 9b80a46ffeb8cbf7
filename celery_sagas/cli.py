"""``celery-sagas …`` and ``celery -A app sagas …``: inspect sagas, migrate the schema.

The CLI is the one place (with the example app) that configures logging handlers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from celery_sagas.errors import SagaError
from celery_sagas.machine import SETTLED_STATES, SagaState
from celery_sagas.protocols import SagaRecord, TransitionRecord
from celery_sagas.settings import SagaSettings, redact_url

STATE_CHOICES = click.Choice([s.value for s in SagaState], case_sensitive=False)


class CliContext:
    def __init__(self, database_url: str | None) -> None:
        self.database_url = database_url
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from celery_sagas.store import SqlSagaStore

            url = self.database_url or os.environ.get("SAGAS_DATABASE_URL")
            if not url:
                raise click.UsageError(
                    "no saga database: pass --database-url, set SAGAS_DATABASE_URL, "
                    "or run as `celery -A yourapp sagas …`"
                )
            try:
                SagaSettings(database_url=url)
            except SagaError as exc:
                raise click.UsageError(exc.message) from exc
            self._store = SqlSagaStore(url)
        return self._store


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _duration(start: datetime | None, end: datetime | None) -> str:
    if not start:
        return "-"
    seconds = ((end or datetime.now(UTC)) - start).total_seconds()
    return f"{seconds:.2f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def saga_summary(record: SagaRecord) -> dict[str, Any]:
    return {
        "saga_id": record.saga_id,
        "name": record.name,
        "business_key": record.business_key,
        "state": record.state.value,
        "current_step": record.current_step,
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "finished_at": _iso(record.finished_at),
        "reason": record.reason,
    }


def saga_detail(record: SagaRecord, log: Sequence[TransitionRecord]) -> dict[str, Any]:
    data = saga_summary(record)
    data["payload"] = record.payload
    data["steps"] = [
        {
            "index": s.index,
            "name": s.name,
            "status": s.status.value,
            "attempts": s.attempts,
            "compensation_attempts": s.compensation_attempts,
            "started_at": _iso(s.started_at),
            "finished_at": _iso(s.finished_at),
            "compensation_started_at": _iso(s.compensation_started_at),
            "compensation_finished_at": _iso(s.compensation_finished_at),
            "result": s.result,
            "error": s.error,
            "error_kind": s.error_kind.value if s.error_kind else None,
        }
        for s in record.steps
    ]
    data["transitions"] = [
        {
            "at": _iso(t.at),
            "step": t.step,
            "from": t.old,
            "to": t.new,
            "reason": t.reason,
            "actor": t.actor,
        }
        for t in log
    ]
    return data


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_detail(record: SagaRecord, log: Sequence[TransitionRecord]) -> str:
    out = [
        f"saga        {record.saga_id}",
        f"name        {record.name}",
        f"key         {record.business_key}",
        f"state       {record.state.value}",
        f"step        {record.current_step} ({record.steps[record.current_step].name})",
        f"created     {_iso(record.created_at)}",
        f"finished    {_iso(record.finished_at) or '-'}  "
        f"(took {_duration(record.created_at, record.finished_at)})",
    ]
    if record.reason:
        out.append(f"reason      {record.reason}")
    rows = [
        (
            str(s.index),
            s.name,
            s.status.value,
            str(s.attempts),
            str(s.compensation_attempts),
            _iso(s.started_at) or "-",
            _duration(s.started_at, s.finished_at) if s.started_at else "-",
            _short(s.result) if s.result is not None else "-",
            _short(s.error, 50) if s.error else "-",
        )
        for s in record.steps
    ]
    out += [
        "",
        "steps",
        _table(
            rows,
            ["#", "step", "status", "tries", "undo tries", "started", "took", "result", "error"],
        ),
    ]
    start = log[0].at if log else record.created_at
    timeline = [
        (
            f"+{(t.at - start).total_seconds():8.3f}s",
            t.step or "(saga)",
            f"{t.old} → {t.new}",
            _short(t.reason, 70) if t.reason else "",
        )
        for t in log
    ]
    out += ["", "timeline", _table(timeline, ["at", "what", "transition", "reason"])]
    return "\n".join(out)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(help="Inspect sagas and manage the celery-sagas schema.")
@click.option(
    "--database-url",
    envvar="SAGAS_DATABASE_URL",
    help="Saga database (postgresql+psycopg2://… or sqlite:///…). Env: SAGAS_DATABASE_URL.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does to stderr.")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if ctx.obj is None or not isinstance(ctx.obj, CliContext):
        ctx.obj = CliContext(database_url)


def _store(ctx: click.Context) -> Any:
    return ctx.find_object(CliContext).store  # type: ignore[union-attr]


@cli.command("list", help="List sagas, newest first.")
@click.option("--state", type=STATE_CHOICES, help="Only sagas in this state.")
@click.option("--name", help="Only sagas of this type (e.g. order_fulfillment).")
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
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def list_command(
    ctx: click.Context,
    state: str | None,
    name: str | None,
    stuck: bool,
    stuck_after: float,
    limit: int,
    as_json: bool,
) -> None:
    store = _store(ctx)
    records = store.list_sagas(
        SagaState(state.upper()) if state else None,
        name,
        limit,
        created_before=datetime.now(UTC) - timedelta(seconds=stuck_after) if stuck else None,
        unfinished=stuck,
    )
    if as_json:
        _emit_json([saga_summary(r) for r in records])
        return
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
            _iso(r.created_at) or "",
            _duration(r.created_at, r.finished_at if r.state in SETTLED_STATES else None),
        )
        for r in records
    ]
    click.echo(_table(rows, ["saga_id", "name", "key", "state", "step", "created", "age/took"]))
    counts: Mapping[str, int] = store.count_by_state()
    click.echo("\n" + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))


@cli.command("show", help="Show one saga (by saga id or business key) with its timeline.")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def show_command(ctx: click.Context, ref: str, as_json: bool) -> None:
    store = _store(ctx)
    record = store.find(ref)
    if record is None:
        raise click.ClickException(f"no saga with id or business key {ref!r}")
    log = store.transitions(record.saga_id)
    if as_json:
        _emit_json(saga_detail(record, log))
    else:
        click.echo(render_detail(record, log))


@cli.command("migrate", help="Create or upgrade the saga schema (its own Alembic version table).")
@click.pass_context
def migrate_command(ctx: click.Context) -> None:
    from celery_sagas.store import migrate

    store = _store(ctx)
    before = migrate.current_revision(store.engine)
    after = migrate.upgrade(store.engine)
    url = redact_url(str(store.engine.url))
    if before == after:
        click.echo(f"schema already at revision {after} ({url})")
    else:
        click.echo(f"schema upgraded {before or '(empty)'} → {after} ({url})")


def main() -> None:
    try:
        cli(prog_name="celery-sagas")
    except SagaError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _celery_command() -> click.Command:
    """``celery -A app sagas …``: the same commands, the database from the app's config."""
    from celery.bin.base import handle_preload_options

    @click.group(name="sagas", help=cli.help)
    @click.pass_context
    @handle_preload_options
    def sagas(ctx: click.Context) -> None:
        app = ctx.obj.app
        url = app.conf.get("sagas_database_url") or os.environ.get("SAGAS_DATABASE_URL")
        runtime = getattr(app, "_celery_sagas_runtime", None)
        if runtime is not None:
            url = runtime.settings.database_url
        ctx.obj = CliContext(url)
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    for command in cli.commands.values():
        sagas.add_command(command)
    return sagas


sagas_celery_command = _celery_command()


if __name__ == "__main__":
    main()

"""How the CLI shows sagas and dead letters: tables, timelines, JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from celery_sagas.choreography import by_operator
from celery_sagas.protocols import DeadLetterRecord, SagaRecord, TransitionRecord
from celery_sagas.redaction import redact

JSON_VERSION = 1  # bumped only when a key is removed or changes meaning (README: JSON output)


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def duration(start: datetime | None, end: datetime | None) -> str:
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
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "finished_at": iso(record.finished_at),
        "reason": record.reason,
    }


def operator_actions(log: Sequence[TransitionRecord]) -> list[TransitionRecord]:
    """What people did to the saga (cancel, DLQ retry/discard, replay), with their reasons."""
    return [t for t in log if by_operator(t.actor)]


def action_summary(t: TransitionRecord) -> dict[str, Any]:
    return {
        "at": iso(t.at),
        "actor": t.actor,
        "step": t.step,
        "from": t.old,
        "to": t.new,
        "reason": t.reason,
    }


def saga_detail(
    record: SagaRecord,
    log: Sequence[TransitionRecord],
    dead: Sequence[DeadLetterRecord] = (),
    fields: Sequence[str] = (),
) -> dict[str, Any]:
    """``show --json``: the saga, its steps, timeline, dead letters and operator actions,
    redacted with ``fields`` exactly like the text output."""
    data = saga_summary(record)
    data["payload"] = redact(record.payload, fields)
    data["steps"] = [
        {
            "index": s.index,
            "name": s.name,
            "status": s.status.value,
            "attempts": s.attempts,
            "compensation_attempts": s.compensation_attempts,
            "started_at": iso(s.started_at),
            "finished_at": iso(s.finished_at),
            "compensation_started_at": iso(s.compensation_started_at),
            "compensation_finished_at": iso(s.compensation_finished_at),
            "result": redact(s.result, fields),
            "error": s.error,
            "error_kind": s.error_kind.value if s.error_kind else None,
        }
        for s in record.steps
    ]
    data["transitions"] = [
        {
            "at": iso(t.at),
            "step": t.step,
            "from": t.old,
            "to": t.new,
            "reason": t.reason,
            "actor": t.actor,
        }
        for t in log
    ]
    data["dead_letters"] = [dead_letter_summary(e) for e in dead]
    data["operator_actions"] = [action_summary(t) for t in operator_actions(log)]
    return data


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def step_name(record: SagaRecord) -> str:
    steps = record.steps
    return steps[record.current_step].name if 0 <= record.current_step < len(steps) else "-"


def render_detail(
    record: SagaRecord,
    log: Sequence[TransitionRecord],
    dead: Sequence[DeadLetterRecord] = (),
    fields: Sequence[str] = (),
) -> str:
    """``show``: the saga, steps (results redacted), timeline, dead letters, operator actions."""
    out = [
        f"saga        {record.saga_id}",
        f"name        {record.name}",
        f"key         {record.business_key}",
        f"state       {record.state.value}",
        f"step        {record.current_step} ({step_name(record)})",
        f"created     {iso(record.created_at)}",
        f"finished    {iso(record.finished_at) or '-'}  "
        f"(took {duration(record.created_at, record.finished_at)})",
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
            iso(s.started_at) or "-",
            duration(s.started_at, s.finished_at) if s.started_at else "-",
            short(redact(s.result, fields)) if s.result is not None else "-",
            short(s.error, 50) if s.error else "-",
        )
        for s in record.steps
    ]
    out += [
        "",
        "steps",
        table(
            rows,
            ["#", "step", "status", "tries", "undo tries", "started", "took", "result", "error"],
        )
        if rows
        else "none (a choreographed saga: the timeline holds its events and reactions)",
    ]
    start = log[0].at if log else record.created_at
    timeline = [
        (
            f"+{(t.at - start).total_seconds():8.3f}s",
            t.step or "(saga)",
            f"{t.old} → {t.new}",
            short(t.reason, 70) if t.reason else "",
        )
        for t in log
    ]
    out += ["", "timeline", table(timeline, ["at", "what", "transition", "reason"])]
    out += ["", "dead letters", dead_letter_rows(dead) if dead else "none"]
    out += ["", "operator actions", action_rows(operator_actions(log))]
    out += ["", "payload (redacted)", json.dumps(redact(record.payload, fields), indent=2)]
    return "\n".join(out)


def action_rows(actions: Sequence[TransitionRecord]) -> str:
    if not actions:
        return "none"
    rows = [
        (iso(t.at) or "", t.actor, t.step or "(saga)", f"{t.old} → {t.new}", t.reason or "-")
        for t in actions
    ]
    return table(rows, ["at", "who", "what", "transition", "reason"])


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def dead_letter_summary(entry: DeadLetterRecord) -> dict[str, Any]:
    return {
        "id": entry.id,
        "saga_id": entry.saga_id,
        "saga": entry.saga_name,
        "step": entry.step,
        "step_name": entry.step_name,
        "task": entry.task_name,
        "status": entry.status,
        "attempts": entry.attempts,
        "deaths": entry.deaths,
        "error": entry.error,
        "dead_since": iso(entry.created_at),
        "updated_at": iso(entry.updated_at),
        "resolved_at": iso(entry.resolved_at),
        "resolution": entry.resolution,
        "auto_retries": entry.auto_retries,
        "next_auto_retry_at": iso(entry.next_auto_retry_at),
    }


def dead_letter_rows(entries: Sequence[DeadLetterRecord]) -> str:
    rows = [
        (
            str(e.id),
            e.saga_id,
            e.task_name,
            e.status,
            str(e.attempts),
            str(e.deaths),
            duration(e.created_at, e.resolved_at),
            short(e.error or "-", 50),
        )
        for e in entries
    ]
    headers = ["id", "saga", "compensation", "status", "tries", "deaths", "dead for", "error"]
    return table(rows, headers)

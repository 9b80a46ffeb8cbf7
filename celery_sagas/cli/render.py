"""How the CLI shows sagas and dead letters: tables, timelines, JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from celery_sagas.protocols import DeadLetterRecord, SagaRecord, TransitionRecord


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
            "started_at": iso(s.started_at),
            "finished_at": iso(s.finished_at),
            "compensation_started_at": iso(s.compensation_started_at),
            "compensation_finished_at": iso(s.compensation_finished_at),
            "result": s.result,
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


def render_detail(record: SagaRecord, log: Sequence[TransitionRecord]) -> str:
    out = [
        f"saga        {record.saga_id}",
        f"name        {record.name}",
        f"key         {record.business_key}",
        f"state       {record.state.value}",
        f"step        {record.current_step} ({record.steps[record.current_step].name})",
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
            short(s.result) if s.result is not None else "-",
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
        ),
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
    return "\n".join(out)


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

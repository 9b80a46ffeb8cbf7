"""The fault matrix as a Markdown table, and the rows that break an invariant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (
    ("case", "case"),
    ("broker", "broker"),
    ("faults", "faults"),
    ("started", "started"),
    ("terminal", "terminal"),
    ("lost", "lost"),
    ("double_forward", "double fwd"),
    ("double_compensation", "double comp"),
    ("illegal", "illegal trans"),
    ("unsent_outbox", "unsent outbox"),
    ("settle_s", "settle s"),
    ("notes", "notes"),
)
COUNTED = ("lost", "double_forward", "double_compensation", "illegal", "wrong_end_state")


def _notes(row: dict[str, Any]) -> str:
    notes = []
    if row.get("inline"):  # --inline-steps: the mode, and how many step messages it took
        logs = row.get("logs") or {}
        notes.append(row["inline"])
        notes.append(f"{logs.get('step_deliveries', '?')} step msgs")
        if logs.get("abandoned"):
            notes.append(f"{logs['abandoned']} abandoned re-sent")
    if row.get("wrong_end_state"):
        notes.append(f"wrong end state {len(row['wrong_end_state'])}")
    if row.get("self_exits"):
        notes.append(f"worker/beat exited by itself {row['self_exits']}x")
    if row.get("refused"):
        notes.append(f"start refused {row['refused']}")
    if row.get("confirmation_and_cancellation"):
        notes.append(f"confirmed+cancelled {row['confirmation_and_cancellation']}")
    if row.get("stock_delta"):
        notes.append(f"stock off {row['stock_delta']}")
    states = row.get("states") or {}
    failed = states.get("FAILED", 0)
    if failed:
        notes.append(f"{failed} FAILED")
    if states.get("COMPENSATION_FAILED"):
        notes.append(f"{states['COMPENSATION_FAILED']} COMPENSATION_FAILED")
    return ", ".join(notes)


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "notes":
        return _notes(row)
    value = row.get(key)
    if isinstance(value, list):
        return str(len(value))
    if value is None:
        return "never" if key == "settle_s" else "-"
    return str(value)


def render(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['case']} | {row['broker']} | harness error {row['error']} |")
            continue
        if "skipped" in row:  # --inline-steps: a case that needs a step timeout; not run
            lines.append(f"| {row['case']} | {row['broker']} | skipped in inline mode |")
            continue
        lines.append("| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def broken(rows: Sequence[dict[str, Any]]) -> list[str]:
    found = []
    for row in rows:
        if "error" in row:
            found.append(f"{row['case']}/{row['broker']}: the harness failed")
            continue
        for key in COUNTED:
            for item in row.get(key) or []:
                found.append(f"{row['case']}/{row['broker']} {key}: {item}")
        if row.get("settle_s") is None:
            found.append(f"{row['case']}/{row['broker']}: not every saga settled")
    return found

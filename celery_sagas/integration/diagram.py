"""The diagram of one saga on its Flower page, drawn server-side as SVG (no script, no CDN).

Top row: the steps in order, each box coloured by what its action did in this saga
(completed, failed, timed out, running, not run). Bottom row: each step's compensation,
coloured by what it did (compensated, compensating, dead-lettered, not needed), with arrows
from right to left, the order compensations run in. Pure: :func:`phases` decides the
colours, :func:`render_svg` draws them; every string is XML-escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from celery_sagas.machine import ErrorKind, Role, StepStatus
from celery_sagas.protocols import StepRecord

# status -> (fill, text colour); the CSS classes on the page use the same names
COLOURS: dict[str, tuple[str, str]] = {
    "completed": ("#237a3b", "#ffffff"),
    "failed": ("#b42318", "#ffffff"),
    "timed_out": ("#c2410c", "#ffffff"),
    "running": ("#2563eb", "#ffffff"),
    "pending": ("#e5e7eb", "#374151"),
    "skipped": ("#f3f4f6", "#6b7280"),
    "compensated": ("#a15c00", "#ffffff"),
    "compensating": ("#f59e0b", "#1f2937"),
    "dead_lettered": ("#7f1d1d", "#ffffff"),
    "not_needed": ("#f3f4f6", "#6b7280"),
}
LEGEND = {
    Role.ACTION: ("completed", "failed", "timed_out", "running", "pending", "skipped"),
    Role.COMPENSATION: ("compensated", "compensating", "dead_lettered", "not_needed"),
}
BOX_W, BOX_H, GAP, TOP, BOTTOM, PAD = 170, 46, 40, 28, 130, 12


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    action: str  # a COLOURS key
    compensation: str  # a COLOURS key


def action_phase(step: StepRecord) -> str:
    """What the step's action did, whatever happened to it later (an undone step keeps the
    colour of how its action ended)."""
    if step.status in (StepStatus.COMPLETED, StepStatus.RUNNING):
        return step.status.value
    if step.status in (StepStatus.PENDING, StepStatus.SKIPPED):
        return step.status.value
    if step.error_kind is ErrorKind.TIMEOUT or step.status is StepStatus.TIMED_OUT:
        return "timed_out"
    if step.error_kind is not None or step.status is StepStatus.FAILED:
        return "failed"
    return "completed"  # undone after it completed


def compensation_phase(step: StepRecord) -> str:
    if step.status is StepStatus.COMPENSATED:
        return "compensated"
    if step.status is StepStatus.COMPENSATING:
        return "compensating"
    if step.status is StepStatus.COMPENSATION_FAILED:
        return "dead_lettered"
    return "not_needed"


def phases(steps: Sequence[StepRecord]) -> list[Node]:
    return [Node(s.index, s.name, action_phase(s), compensation_phase(s)) for s in steps]


def _box(x: int, y: int, label: str, status: str, role: Role, step: str, number: int) -> str:
    fill, ink = COLOURS[status]
    title = escape(f"{step} {role}: {status.replace('_', ' ')}")
    text = escape(label if len(label) <= 19 else label[:18] + "…")
    return (
        f'<g class="node" data-step="{escape(step)}" data-role="{role}" data-status="{status}">'
        f"<title>{title}</title>"
        f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{fill}" '
        f'stroke="#374151" stroke-width="1"/>'
        f'<text x="{x + BOX_W // 2}" y="{y + 19}" fill="{ink}" text-anchor="middle" '
        f'font-size="13" font-weight="600">{number}. {text}</text>'
        f'<text x="{x + BOX_W // 2}" y="{y + 36}" fill="{ink}" text-anchor="middle" '
        f'font-size="11">{escape(status.replace("_", " "))}</text></g>'
    )


def _arrow(x1: int, x2: int, y: int, css: str) -> str:
    return (
        f'<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" class="{css}" stroke="#6b7280" '
        f'stroke-width="2" marker-end="url(#arrow)"/>'
    )


def render_svg(nodes: Sequence[Node], compensation_names: Sequence[str] = ()) -> str:
    """The saga as an SVG element (``id="saga-diagram"``)."""
    width = PAD * 2 + len(nodes) * BOX_W + max(len(nodes) - 1, 0) * GAP
    height = BOTTOM + BOX_H + PAD
    parts = [
        f'<svg id="saga-diagram" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="system-ui, sans-serif" aria-label="saga diagram">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#6b7280"/></marker></defs>',
        f'<text x="{PAD}" y="16" font-size="12" fill="#6b7280">steps →</text>',
        f'<text x="{PAD}" y="{BOTTOM - 10}" font-size="12" fill="#6b7280">'
        "← compensations (run in reverse)</text>",
    ]
    for i, node in enumerate(nodes):
        x = PAD + i * (BOX_W + GAP)
        undo = compensation_names[i] if i < len(compensation_names) else f"undo {node.name}"
        parts.append(_box(x, TOP, node.name, node.action, Role.ACTION, node.name, node.index))
        parts.append(
            _box(x, BOTTOM, undo, node.compensation, Role.COMPENSATION, node.name, node.index)
        )
        middle = x + BOX_W // 2
        parts.append(
            f'<line x1="{middle}" y1="{TOP + BOX_H}" x2="{middle}" y2="{BOTTOM}" '
            'stroke="#9ca3af" stroke-dasharray="4 4"/>'
        )
        if i:
            parts.append(_arrow(x - GAP, x - 2, TOP + BOX_H // 2, "forward"))
            parts.append(_arrow(x, x - GAP + 2, BOTTOM + BOX_H // 2, "backward"))
    parts.append("</svg>")
    return "".join(parts)

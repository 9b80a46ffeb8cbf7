"""``celery-sagas prune``: delete finished sagas with every row they own, in batches."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from celery_sagas.cli.context import store_of
from celery_sagas.cli.render import emit_json, iso
from celery_sagas.protocols import PRUNED_TABLES, RetentionStore

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
PROGRESS_EVERY = 2.0  # seconds between progress lines when stderr is not a terminal


def parse_cutoff(text: str, now: datetime) -> datetime:
    """Pure: ``30d`` / ``12h`` / ``90m`` / ``45s`` / ``2w`` before ``now``, or an ISO 8601
    timestamp with a timezone (``2026-01-01T00:00:00Z``). ``ValueError`` says what is wrong."""
    age = AGE.match(text)
    if age:
        amount = float(age.group(1))
        if amount <= 0:
            raise ValueError(f"{text!r} is not a positive age")
        return now - timedelta(**{UNITS[age.group(2)]: amount})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an age (30d, 12h, 90m, 45s, 2w) nor an ISO 8601 timestamp "
            "(2026-01-01T00:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no timezone: add one (Z or +02:00)")
    if moment > now:
        raise ValueError(f"{text!r} is in the future: every finished saga would go")
    return moment.astimezone(UTC)


# not ParamType[datetime]: click before 8.2 (the declared floor) has no subscript at runtime
class Cutoff(click.ParamType):  # type: ignore[type-arg]
    name = "AGE|TIMESTAMP"

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_cutoff(str(value), datetime.now(UTC))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@dataclass
class Tally:
    """What a prune did so far."""

    sagas: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRUNED_TABLES, 0))
    started: float = field(default_factory=time.monotonic)

    def add(self, sagas: int, rows: Mapping[str, int]) -> None:
        self.sagas += sagas
        for table, count in rows.items():
            self.rows[table] += count

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def rate(self) -> float:
        return self.total_rows / self.seconds if self.seconds > 0 else 0.0


def prune_all(
    store: RetentionStore,
    cutoff: datetime,
    batch: int,
    name: str | None,
    progress: Callable[[Tally], None] = lambda tally: None,
) -> Tally:
    """Batch after batch (each its own short transaction) until nothing is left."""
    tally = Tally()
    after = None
    while True:
        pruned = store.prune(cutoff, batch, name, after)
        tally.add(pruned.sagas, pruned.rows)
        progress(tally)
        if pruned.after is None and not any(pruned.rows.values()):
            return tally
        after = pruned.after or after


@contextmanager
def _progress(total: int) -> Iterator[Callable[[Tally], None]]:
    """A progress bar on a terminal, else a line every few seconds (both on stderr)."""
    if sys.stderr.isatty():
        with click.progressbar(length=total, label="pruning", file=sys.stderr) as bar:
            yield lambda tally: bar.update(tally.sagas - bar.pos)
        return
    last = time.monotonic()

    def line(tally: Tally) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_EVERY:
            last = time.monotonic()
            click.echo(
                f"pruned {tally.sagas}/{total} sagas, {tally.total_rows} rows "
                f"({tally.rate():.0f} rows/s)",
                err=True,
            )

    yield line


def _summary(cutoff: datetime, name: str | None, dry_run: bool, sagas: int) -> dict[str, Any]:
    return {"finished_before": iso(cutoff), "name": name, "dry_run": dry_run, "sagas": sagas}


@click.command(
    "prune",
    help="Delete sagas that finished (COMPLETED or FAILED) before a cutoff, with all their "
    "rows: steps, transitions, guards, attempts, outbox rows and resolved dead letters. "
    "Sagas still moving, waiting in the DLQ or with an open dead letter are never touched. "
    "Runs in short batches (locked sagas are skipped), so live work is not blocked.",
)
@click.option(
    "--finished-before",
    "cutoff",
    type=Cutoff(),
    required=True,
    help="An age (30d, 12h, 90m, 45s, 2w: finished longer ago than that) or an ISO 8601 "
    "timestamp with a timezone (2026-01-01T00:00:00Z).",
)
@click.option("--dry-run", is_flag=True, help="Only count the sagas that would be deleted.")
@click.option(
    "--batch",
    type=click.IntRange(min=1, max=10_000),
    default=1000,
    show_default=True,
    help="Sagas per transaction.",
)
@click.option("--name", help="Only sagas of this type (e.g. order_fulfillment).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON for scripts.")
@click.pass_context
def prune_command(
    ctx: click.Context,
    cutoff: datetime,
    dry_run: bool,
    batch: int,
    name: str | None,
    as_json: bool,
) -> None:
    store = store_of(ctx)
    total = store.prunable(cutoff, name)
    if dry_run:
        if as_json:
            emit_json(_summary(cutoff, name, True, total))
        else:
            click.echo(f"would prune {total} saga(s) finished before {iso(cutoff)}")
        return
    click.echo(
        f"pruning {total} saga(s) finished before {iso(cutoff)}, {batch} per transaction",
        err=True,
    )
    with _progress(total) as update:
        tally = prune_all(store, cutoff, batch, name, update)
    if as_json:
        emit_json(
            _summary(cutoff, name, False, tally.sagas)
            | {
                "rows": tally.rows,
                "seconds": round(tally.seconds, 3),
                "rows_per_second": round(tally.rate(), 1),
            }
        )
        return
    detail = ", ".join(f"{table} {count}" for table, count in tally.rows.items())
    click.echo(
        f"pruned {tally.sagas} saga(s) finished before {iso(cutoff)}: {tally.total_rows} rows "
        f"({detail}) in {tally.seconds:.1f}s, {tally.rate():.0f} rows/s"
    )

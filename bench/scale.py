"""Scale: do the periodic and operator paths stay flat as finished sagas pile up?

    python bench/scale.py [--sizes 1000,100000,1000000] [--repeat 5] [--json] [--keep]

For each size N it creates a throwaway PostgreSQL database, seeds N finished sagas set-based
(``INSERT … SELECT generate_series``: each saga as a real 4-step run leaves it — 4 steps,
11 transitions, 4 guards, 4 sent outbox rows; one in ten FAILED with its steps
compensated, one in a thousand with a resolved dead letter and two failed attempts; created
over the last 100 days) plus a few live sagas (PENDING, one unsent outbox row each), and
times, median of ``--repeat`` runs:

- one scan (``scanner.scan``: due sagas, admissions, stuck sagas) and one compaction pass
  over 100 finished sagas (``scanner.compact``: the scan's retention work);
- one relay pass (``outbox.relay`` publishing the live sagas' unsent rows to a recording
  dispatcher; the rows are put back unsent between runs);
- ``celery-sagas list`` (first page and the counts per state), ``celery-sagas show``;
- a metrics scrape (``SagaCollector.collect`` over ``StatsReader``, steady state; the first
  scrape, which folds the whole history once, is printed apart);
- the Flower Sagas pages (``/sagas`` and ``/sagas/<id>``) served by an in-process Flower;
- bytes stored per finished saga (``pg_total_relation_size`` of the saga tables / N);

and, on the largest size, ``prune`` rows/s (the oldest tenth of the sagas).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# ruff: noqa: E402  (the imports below need the repository on sys.path)
from bench.scale_pages import FlowerPages
from bench.scale_seed import LIVE, SAGA, STEP_NAMES, seed
from celery_sagas import outbox, scanner
from celery_sagas.cli.prune import prune_all
from celery_sagas.cli.refs import resolve
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import registry
from celery_sagas.metrics import SagaCollector
from celery_sagas.store import SqlSagaStore, upgrade
from celery_sagas.store.browse import Filter, count_by_state, page
from celery_sagas.store.stats import StatsReader
from celery_sagas.store.tables import metadata
from celery_sagas.testing import RecordingDispatcher

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_SIZES = (1_000, 100_000, 1_000_000)
GIB = 1 << 30
COMPACT_BATCH = 100
BYTES_PER_SAGA_GUESS = 6_000  # to check the disk before seeding (measured ~3.5 kB)


@dataclass
class Row:
    size: int
    seed_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # median milliseconds
    bytes_per_saga: float = 0.0
    first_scrape_ms: float = 0.0
    prune: dict[str, float] = field(default_factory=dict)


@contextmanager
def throwaway_database(admin_url: str, name: str, keep: bool) -> Iterator[str]:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        if not keep:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def bytes_stored(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table: int(
                conn.execute(sa.text(f"SELECT pg_total_relation_size('{table}')")).scalar_one()
            )
            for table in metadata.tables
        }


Operation = tuple[Callable[[], Any], Callable[[], Any] | None]  # (timed, untimed before)


class Target:
    """One seeded database and the operations timed on it."""

    def __init__(self, url: str, size: int, seeded: bool = False) -> None:
        self.row = Row(size)
        self.store = store = SqlSagaStore(url)
        self.engine = engine = store.engine
        began = time.perf_counter()
        if not seeded:
            seed(engine, size)
        self.row.seed_seconds = time.perf_counter() - began
        with engine.connect() as conn:
            autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
            autocommit.execute(sa.text("VACUUM ANALYZE"))
        self.row.bytes_per_saga = sum(bytes_stored(engine).values()) / size
        self.coordinator = Coordinator(store, registry([SAGA]))
        self.dispatcher = RecordingDispatcher()
        self.collector = SagaCollector(StatsReader(engine))
        began = time.perf_counter()
        list(self.collector.collect())  # folds the whole history once
        self.row.first_scrape_ms = (time.perf_counter() - began) * 1000
        self.middle = f"K-{size // 2}"
        self.pages = FlowerPages(store, registry([SAGA])).__enter__()

    def close(self) -> None:
        self.pages.__exit__(None, None, None)
        self.engine.dispose()

    def operations(self) -> dict[str, Operation]:
        store, engine = self.store, self.engine
        return {
            "scan": (lambda: scanner.scan(self.coordinator, datetime.now(UTC), 200, 600), None),
            "relay": (self._relay, self._unsend),
            "list": (lambda: (page(engine, Filter(), 0, 50), count_by_state(engine)), None),
            "show": (self._show, None),
            "metrics scrape": (lambda: list(self.collector.collect()), None),
            "Sagas page": (lambda: self.pages.get("/sagas"), None),
            "saga page": (lambda: self.pages.get(f"/sagas/{self.middle}"), None),
            # each pass compacts a full batch (the sagas finished over a day ago)
            f"compact {COMPACT_BATCH}": (
                lambda: scanner.compact(store, datetime.now(UTC), 86400.0, COMPACT_BATCH),
                None,
            ),
        }

    def _unsend(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE saga_outbox SET sent_at = NULL WHERE saga_id LIKE 'live-%'")
            )

    def _relay(self) -> None:
        sent = outbox.relay(self.store, self.dispatcher, lambda: datetime.now(UTC), 5.0, 500)
        assert sent == LIVE, sent

    def _show(self) -> None:
        record = resolve(self.store, self.middle, None)
        self.store.transitions(record.saga_id)
        self.store.dead_letters(saga_id=record.saga_id, status=None, limit=1000)


def measure_interleaved(targets: list[Target], repeat: int) -> None:
    """Round-robin over the sizes, ``repeat`` times: a change of the machine's load
    between runs hits every size alike."""
    samples: dict[tuple[int, str], list[float]] = {}
    for _ in range(repeat):
        for target in targets:
            for name, (timed, before) in target.operations().items():
                if before is not None:
                    before()
                began = time.perf_counter()
                timed()
                elapsed = (time.perf_counter() - began) * 1000
                samples.setdefault((target.row.size, name), []).append(elapsed)
    for target in targets:
        for name in target.operations():
            target.row.timings[name] = statistics.median(samples[(target.row.size, name)])


def prune_rate(store: SqlSagaStore, size: int) -> dict[str, float]:
    """Prune the oldest tenth (created over the first 10 of the 100 days)."""
    cutoff = datetime.now(UTC) - timedelta(days=90)
    expected = store.prunable(cutoff)
    tally = prune_all(store, cutoff, 1000, None)
    assert tally.sagas == expected, (tally.sagas, expected)
    return {
        "sagas": tally.sagas,
        "rows": tally.total_rows,
        "seconds": round(tally.seconds, 2),
        "rows_per_second": round(tally.rate()),
        "sagas_per_second": round(tally.sagas / tally.seconds),
    }


def check_disk(size: int) -> None:
    free = shutil.disk_usage("/").free
    needed = size * BYTES_PER_SAGA_GUESS * 2
    if free < needed:
        raise SystemExit(f"{size} sagas need ~{needed / GIB:.1f} GiB, {free / GIB:.1f} free")


def table(rows: list[Row]) -> str:
    names = list(rows[0].timings)
    head = ["N", *names, "first scrape", "bytes/saga", "seed s"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [
            f"{row.size:,}",
            *(f"{row.timings[n]:.1f} ms" for n in names),
            f"{row.first_scrape_ms:.0f} ms",
            f"{row.bytes_per_saga:,.0f}",
            f"{row.seed_seconds:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        ratios = ", ".join(f"{n} {last.timings[n] / first.timings[n]:.1f}x" for n in names)
        lines.append(f"\n{last.size:,} vs {first.size:,}: {ratios}")
    for row in rows:
        if row.prune:
            p = row.prune
            lines.append(
                f"prune on {row.size:,}: {p['sagas']:,.0f} sagas, {p['rows']:,.0f} rows in "
                f"{p['seconds']} s = {p['rows_per_second']:,.0f} rows/s "
                f"({p['sagas_per_second']:,.0f} sagas/s)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in DEFAULT_SIZES),
        help="finished sagas per run, comma-separated (default: 1000,100000,1000000)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (median)")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL),
        help="a PostgreSQL database to create the throwaway ones from",
    )
    parser.add_argument("--no-prune", action="store_true", help="skip the prune measurement")
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    parser.add_argument(
        "--existing",
        metavar="URL",
        help="measure a database seeded before (with --keep) instead of seeding one",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    options = parser.parse_args(argv)
    # the relay's warning and Flower's no-auth warning would repeat on every run
    logging.getLogger("celery_sagas").setLevel(logging.ERROR)
    try:
        sizes = [int(s.replace("_", "")) for s in options.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: comma-separated integers, got {options.sizes!r}")
    if any(s < 1 for s in sizes) or options.repeat < 1:
        parser.error("--sizes and --repeat must be positive")
    targets: list[Target] = []
    with ExitStack() as stack:
        if options.existing:
            with sa.create_engine(options.existing).connect() as conn:
                count = "SELECT count(*) FROM saga WHERE finished_at IS NOT NULL"
                found = int(conn.execute(sa.text(count)).scalar_one())
            targets.append(Target(options.existing, found, seeded=True))
            sizes = []
        for size in sizes:
            check_disk(size)
            print(f"seeding {size:,} finished sagas …", file=sys.stderr, flush=True)
            name = f"sagas_scale_{size}_{os.getpid()}"
            url = stack.enter_context(throwaway_database(options.admin_url, name, options.keep))
            upgrade(url)
            targets.append(Target(url, size))
            print(f"  seeded in {targets[-1].row.seed_seconds:.1f} s", file=sys.stderr)
        for target in targets:
            stack.callback(target.close)
        measure_interleaved(targets, options.repeat)
        largest = max(targets, key=lambda t: t.row.size)
        if not options.no_prune:
            largest.row.prune = prune_rate(largest.store, largest.row.size)
    rows = [t.row for t in targets]
    if options.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        print(f"steps: {', '.join(STEP_NAMES)}; median of {options.repeat} runs")
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

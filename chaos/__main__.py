"""``python -m chaos`` (``make chaos CHAOS_ARGS=...``): run the fault matrix, print the table.

Exit status 1 if any case lost a saga, doubled an effect, left a wrong end state or logged
an illegal transition.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chaos.faults import CASES, describe
from chaos.inline import plan
from chaos.servers import Postgres
from chaos.table import broken, render

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICK_CASES = ("child-kill", "pg-restart", "broker-restart", "forged")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description=__doc__,
        epilog="cases:\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sagas", type=int, default=100, help="orders per case (default 100)")
    parser.add_argument(
        "--cases", default="all", help="comma-separated case names, or 'all' (default)"
    )
    parser.add_argument(
        "--brokers", default="redis,rabbitmq", help="redis, rabbitmq or both (default)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of faults per case (default 64)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a very small version: 20 sagas, 12 s of faults, four cases, Redis only "
        "(unless --sagas/--duration/--cases/--brokers say otherwise)",
    )
    parser.add_argument(
        "--start-via",
        choices=("task", "runtime"),
        default="task",
        help="task: start_saga.delay(order) as the README shows (default); runtime: "
        "sagas.start(...), which writes the saga in the caller before publishing",
    )
    parser.add_argument(
        "--inline-steps",
        action="store_true",
        help="run the order saga in inline mode (SAGAS_INLINE_STEPS=true, steps declared "
        "timeout=None): a case whose faults are create_shipment's time limit keeps it, with "
        "its reason (chaos.inline)",
    )
    parser.add_argument(
        "--timed-steps",
        action="store_true",
        help="with --inline-steps: the steps keep their timeouts (the prefork worker times "
        "each inline step itself)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL cluster")
    args = parser.parse_args(argv)
    explicit = set(argv or sys.argv[1:])
    if args.quick:
        if not any(a.startswith("--sagas") for a in explicit):
            args.sagas = 20
        if not any(a.startswith("--cases") for a in explicit):
            args.cases = ",".join(QUICK_CASES)
        if not any(a.startswith("--brokers") for a in explicit):
            args.brokers = "redis"
    args.duration = args.duration or (12.0 if args.quick else 64.0)
    args.cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    args.brokers = args.brokers.split(",")
    if set(args.brokers) - {"redis", "rabbitmq"}:
        parser.error("--brokers takes redis and/or rabbitmq")
    if args.timed_steps and not args.inline_steps:
        parser.error("--timed-steps goes with --inline-steps (the default run is timed)")
    return args


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def inline_notes(cases: Sequence[str], brokers: Sequence[str]) -> list[str]:
    """What ``--inline-steps`` changes, one line per case and broker it changes (a case
    with every step untimed is not listed)."""
    plans = [plan(case, broker) for broker in brokers for case in cases]
    return [p.note() for p in plans if p.skip is not None or p.timeouts]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in its own interpreter; its stderr streams through."""
    result = subprocess.run(
        [sys.executable, "-m", "chaos.case", json.dumps(spec)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        timeout=spec["duration"] + spec["settle_timeout"] + 600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"case": spec["case"], "broker": spec["broker"], "error": result.returncode}
    row: dict[str, Any] = json.loads(lines[-1])
    return row


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    out = Path(tempfile.mkdtemp(prefix="chaos-run-"))
    pg = Postgres().start()
    sys.stderr.write(f"chaos: PostgreSQL on {pg.port} in {pg.root}; logs in {out}\n")
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []  # rows and, in matrix order, the cases skipped
    untimed_notes = args.inline_steps and not args.timed_steps
    notes = inline_notes(args.cases, args.brokers) if untimed_notes else []
    for line in notes:
        sys.stderr.write(f"chaos: {line}\n")
    started = time.monotonic()
    try:
        for broker in args.brokers:
            for name in args.cases:
                if args.inline_steps and (why := plan(name, broker).skip) is not None:
                    table.append({"case": name, "broker": broker, "skipped": why})
                    sys.stderr.write(render(table[-1:]) + "\n")
                    continue
                spec = {
                    "case": name,
                    "broker": broker,
                    "sagas": args.sagas,
                    "duration": args.duration,
                    "seed": args.seed,
                    "pg_root": str(pg.root),
                    "pg_port": pg.port,
                    "out_dir": str(out),
                    "settle_timeout": args.settle_timeout,
                    "quick": args.quick,
                    "start_via": args.start_via,
                    "inline_steps": args.inline_steps,
                    "timed_steps": args.timed_steps,
                }
                rows.append(run_one(spec))
                table.append(rows[-1])
                sys.stderr.write(render(rows[-1:]) + "\n")
    finally:
        if args.keep:
            sys.stderr.write(f"chaos: PostgreSQL kept running in {pg.root} (port {pg.port})\n")
        else:
            pg.cleanup()
    (out / "rows.json").write_text(json.dumps(table, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2, default=str))
    elapsed = time.monotonic() - started
    say(render(table))
    mode = " in inline mode" if args.inline_steps else ""
    say(f"\n{len(rows)} case(s){mode} in {elapsed:.0f} s; details in {out}/rows.json")
    for line in notes:
        say(f"INLINE: {line}")
    bad = broken(rows)
    for line in bad:
        say(f"BROKEN: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

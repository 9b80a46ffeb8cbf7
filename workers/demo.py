"""``make demo``: 200 order sagas and 60 bank transfers through real Celery worker and beat
processes, then the order choreography (``workers.choreography_demo``).

With no environment it runs on the embedded default (SQLite + kombu's ``filesystem://``
transport under ``.demo/``, worker ``-P threads``); with ``CELERY_BROKER_URL`` and
``SAGAS_DATABASE_URL`` it runs the same job on Redis/RabbitMQ and PostgreSQL (prefork).
It checks the invariants (stock conserved, nothing charged for a failed order, balances
summing to the start, ...) and exits non-zero if a saga is left unsettled or one is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from workers import config

STOCK = {"WIDGET": 10_000, "GADGET": 10_000, "RARE-GEM": 6}
SHIPMENT_TIMEOUT = 3  # seconds: create_shipment's timeout in the demo (code says 300)
# Admission control keeps the queue short, so step timeouts measure work, not backlog.
DEMO_SETTINGS = {
    "SAGAS_STEP_TIMEOUTS": json.dumps({"order_fulfillment.create_shipment": SHIPMENT_TIMEOUT}),
    "SAGAS_MAX_CONCURRENT": json.dumps({"order_fulfillment": 40}),
    # refunds give up after 3 quick attempts (the code says 6, backing off to a minute)
    "SAGAS_RETRY_POLICIES": json.dumps(
        {"refund_payment": {"max_retries": 2, "backoff_base": 0.2, "backoff_cap": 1}}
    ),
    # the embedded worker runs threads, which Celery's time limits do not interrupt: the
    # scan times a hung shipment out 1 s after its 3 s, at once (no re-send first)
    "SAGAS_TIME_LIMIT_GRACE": "1",
    "SAGAS_MAX_REDISPATCHES": "0",
    "SAGAS_SCAN_INTERVAL": "0.5",
    "SAGAS_RELAY_INTERVAL": "2",
    "SAGAS_RELAY_AFTER": "10",
}
FAILURE_POINTS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")


def make_orders(count: int, seed: int) -> list[dict[str, Any]]:
    """A reproducible mix: mostly good orders, card declines, scarce stock, injected
    failures at every step, and transient errors that succeed on retry."""
    rng = random.Random(seed)
    orders = []
    for number in range(count):
        order: dict[str, Any] = {
            "order_id": f"ORD-{seed}-{number:05d}",
            "items": [
                {
                    "sku": rng.choice(["WIDGET", "GADGET"]),
                    "qty": rng.randint(1, 3),
                    "price": rng.randint(100, 5000),
                }
            ],
            "payment": {"method": "card", "card_number": "4111111111111111"},
            "shipping": {"address": f"{number} Demo Street"},
        }
        roll = rng.random()
        if roll < 0.08:
            order["payment"]["method"] = "card_declined"
        elif roll < 0.14:
            order["items"].append({"sku": "RARE-GEM", "qty": 2, "price": 99_00})
        elif roll < 0.26:
            order["simulate"] = {rng.choice(FAILURE_POINTS): "fail"}
        elif roll < 0.34:
            order["simulate"] = {rng.choice(FAILURE_POINTS): "transient:1"}
        elif roll < 0.39:
            order["simulate"] = {"create_shipment": "hang"}  # times out, is compensated
            order["hang_seconds"] = SHIPMENT_TIMEOUT + 2
        elif roll < 0.42:
            # the refund keeps failing: it lands in the DLQ and the drain resolves it
            order["simulate"] = {"send_confirmation": "fail", "refund_payment": "transient:3"}
        orders.append(order)
    return orders


# -- processes -------------------------------------------------------------------------


def celery_process(
    args: Sequence[str], log_path: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "PYTHONPATH": str(config.REPO_ROOT)},
        cwd=config.REPO_ROOT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for_line(
    log_path: Path, marker: str, process: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and marker in log_path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    raise SystemExit(f"demo: {log_path.name} did not report {marker.strip()!r}:\n{tail}")


# -- progress and summary -------------------------------------------------------------


def progress(done: int, total: int, counts: Mapping[str, int], started: float) -> None:
    width = 40
    filled = int(width * done / total) if total else width
    states = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} settled "
        f"{time.monotonic() - started:5.1f}s  {states}   "
    )
    sys.stderr.flush()


def print_summary(report: Mapping[str, Any]) -> None:
    print("\norder sagas by final state")
    for state, count in sorted(report["states"].items()):
        print(f"  {state:<22}{count:>6}")
    print(f"  {'total':<22}{report['total']:>6}")
    print("\nwhat happened")
    rows = [
        ("compensations run", report["compensations"]),
        (f"create_shipment timed out (> {SHIPMENT_TIMEOUT}s), compensated", report["timed_out"]),
        ("step retries (transient errors)", report["retries"]),
        ("business failures (declined, no stock, injected)", report["business_failures"]),
        ("duplicate start (same order twice) -> sagas", report["duplicate_start_sagas"]),
        ("compensations dead-lettered, then drained", report["dead_letters"]["landed"]),
        ("  resolved by `celery-sagas dlq drain`", report["dead_letters"]["resolved"]),
        ("mean saga duration", f"{report['mean_ms']:.0f} ms"),
        ("p95 saga duration", f"{report['p95_ms']:.0f} ms"),
        ("wall time", f"{report['wall_s']:.1f} s"),
    ]
    for label, value in rows:
        print(f"  {label:<50}{value!s:>12}")
    if "bank" in report:
        from workers.bank_demo import transfer_summary_lines

        print("\nbank transfers")
        print("\n".join(transfer_summary_lines(report["bank"])))
    if "choreography" in report:
        print("\norder choreography")
        for label, value in report["choreography"].items():
            if label != "invariants":
                print(f"  {label:<50}{value!s:>12}")
    print("\ninvariants")
    for name, ok in report["invariants"].items():
        print(f"  [{'ok' if ok else 'BROKEN'}] {name}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered (e.g. 401 behind auth)
    except OSError:
        return False


def print_where_to_look(report: Mapping[str, Any], embedded: bool) -> None:
    env = f"SAGAS_DATABASE_URL={config.database_url()} " if embedded else ""
    print("\nwhere to look")
    failed = next(iter(report["failed_examples"]), None)
    if failed:
        print(f"  a failed saga:   {env}celery-sagas show {failed}")
    print(f"  dead letters:    {env}celery-sagas --app workers.app dlq list --status all")
    flower = "http://127.0.0.1:5555/sagas"
    state = "running" if _answers(flower) else "start it: celery -A workers.app sagas flower"
    print(f"  Flower + Sagas:  {flower}  ({state})")
    metrics = "http://127.0.0.1:9808/metrics"
    state = "running" if _answers(metrics) else "start it: celery-sagas --app workers.app metrics"
    print(f"  Prometheus:      {metrics}  ({state})")


# -- the job ------------------------------------------------------------------------------


def prepare_embedded(fresh: bool) -> bool:
    """Use the embedded default unless both URLs are set; start from a clean folder."""
    embedded = not (os.environ.get("CELERY_BROKER_URL") and os.environ.get("SAGAS_DATABASE_URL"))
    if embedded:
        os.environ.pop("CELERY_BROKER_URL", None)
        os.environ.pop("SAGAS_DATABASE_URL", None)
        if fresh and config.demo_dir().exists():
            shutil.rmtree(config.demo_dir())
        config.demo_dir().mkdir(parents=True, exist_ok=True)
    return embedded


def reset_database() -> None:
    from sqlalchemy import delete

    from celery_sagas.store import upgrade
    from celery_sagas.store.tables import guards, outbox, sagas, steps, transitions
    from workers import bank_demo, choreography, db

    upgrade(config.database_url())
    choreography.create_tables()  # the participants' tables and the services' outbox
    engine = db.get_engine()
    with engine.begin() as conn:
        for table in (
            guards,
            outbox,
            transitions,
            steps,
            sagas,
            *reversed(db.participant_metadata.sorted_tables),
        ):
            conn.execute(delete(table))
    db.seed_inventory(STOCK)
    bank_demo.open_demo_accounts()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-n", "--sagas", type=int, default=200, help="how many orders (default 200)"
    )
    parser.add_argument(
        "--transfers",
        type=int,
        default=60,
        help="how many bank transfers, started with the orders (default 60; 0 for none)",
    )
    parser.add_argument(
        "--choreographies",
        type=int,
        default=50,
        help="how many choreographed orders, run after the orchestrated sagas settled "
        "(default 50; 0 for none)",
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="random seed for the order and transfer mixes"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="worker concurrency (default 8 threads embedded, 4 prefork otherwise, so "
        "children blocked by hung steps do not starve beat's scan)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for all sagas")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.sagas < 1:
        parser.error("--sagas must be at least 1")
    if args.transfers < 0 or args.choreographies < 0:
        parser.error("--transfers and --choreographies must not be negative")

    embedded = prepare_embedded(fresh=True)
    where = (
        f"embedded: SQLite + filesystem broker in {config.demo_dir()}"
        if embedded
        else f"broker {config.broker_url()}, database {config.database_url()}"
    )
    print(f"demo: {where}")
    reset_database()
    logs = config.demo_dir()
    logs.mkdir(parents=True, exist_ok=True)
    pool = (
        ["-P", "threads", "-c", str(args.concurrency or 8)]
        if embedded
        else ["-P", "prefork", "-c", str(args.concurrency or 4)]
    )
    env = DEMO_SETTINGS
    # this process starts the sagas (durable start): it must shape them as the workers do
    os.environ.update(DEMO_SETTINGS)
    with ExitStack() as stack:
        worker = celery_process(
            ["worker", "-l", "INFO", "-E", *pool, "-n", f"demo-{os.getpid()}@%h"],
            logs / "worker.log",
            env,
        )
        stack.callback(stop, worker)
        beat = celery_process(
            ["beat", "-l", "INFO", "-s", str(logs / "celerybeat-schedule")], logs / "beat.log", env
        )
        stack.callback(stop, beat)
        wait_for_line(logs / "worker.log", " ready.", worker, timeout=60)
        print(f"demo: worker and beat running (logs in {logs}/worker.log, beat.log)")
        report = run_job(args, embedded)
    report["embedded"] = embedded
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_summary(report)
        print_where_to_look(report, embedded)
    ok = all(report["invariants"].values())
    print("\ndemo: " + ("all invariants hold" if ok else "INVARIANTS BROKEN"))
    return 0 if ok else 1


def run_job(args: argparse.Namespace, embedded: bool) -> dict[str, Any]:
    from celery_sagas import InvalidPayloadError
    from celery_sagas.store import SqlSagaStore
    from workers import bank_demo
    from workers.bank_transfers import start_transfer
    from workers.orders import start_saga

    store = SqlSagaStore(config.database_url())
    orders = make_orders(args.sagas, args.seed)
    transfers = bank_demo.make_transfers(args.transfers, args.seed)
    started = time.monotonic()
    # the durable start: each delay() commits the saga (and its first step's outbox row)
    # before it returns, so a handle is a saga that exists
    handles = [start_saga.delay(order) for order in orders]
    for planned in transfers:
        start_transfer.delay(planned.payload)
    starts_s = time.monotonic() - started
    print(
        f"demo: {len(handles)} orders and {len(transfers)} bank transfers started durably "
        f"in {starts_s:.1f}s"
    )
    again = start_saga.delay(orders[0])  # the same order again: the same saga, not a new one
    print(f"demo: the same order again returns the same saga: {again.saga_id == handles[0].id}")
    try:
        start_saga.delay({"order_id": "", "items": []})
    except InvalidPayloadError as exc:
        print(f"demo: an invalid order is refused before anything is written: {exc}")
    show_one_outcome(orders[0]["order_id"], handles[0], args.timeout)
    wait_settled(store, len(orders) + len(transfers), started, args.timeout)
    drained = drain_dead_letters(store)
    from workers.report import build_report

    hooks_ok = wait_for_hooks(args.timeout)
    report = build_report(store, orders, time.monotonic() - started, STOCK)
    report["dead_letters"] = drained
    report["invariants"]["every dead-lettered compensation was resolved by the drain"] = (
        drained["resolved"] == drained["landed"] and drained["drain_exit"] == 0
    )
    report["invariants"]["every finished order's outcome hook ran exactly once"] = hooks_ok
    if transfers:
        report["bank"] = bank_demo.transfer_report(transfers)
        report["invariants"].update(report["bank"]["invariants"])
    choreography = run_choreography_if_present(args.choreographies)
    if choreography is not None:
        report["choreography"] = choreography
        report["invariants"].update(choreography_invariants(choreography))
    return report


def choreography_invariants(result: Mapping[str, Any]) -> dict[str, bool]:
    """The choreography's own checks, named for the demo's list; a result without any
    is itself a broken invariant (the demo must not pass by checking nothing)."""
    checks = result.get("invariants")
    if not isinstance(checks, Mapping) or not checks:
        return {"choreography: reported its invariant checks": False}
    return {f"choreography: {name}": bool(ok) for name, ok in checks.items()}


def run_choreography_if_present(count: int) -> dict[str, Any] | None:
    """``run_choreography(count)`` of the order choreography (counts and an
    ``invariants`` mapping), on the running worker; ``None`` when asked for none."""
    if count == 0:
        return None
    from workers.choreography_demo import run_choreography

    print(f"demo: {count} choreographed orders (order choreography)")
    return dict(run_choreography(count))


def show_one_outcome(order_id: str, handle: Any, timeout: float) -> None:
    """``handle.wait()``: the outcome of one saga, read from the saga database."""
    outcome = handle.wait(timeout=timeout)
    steps = ", ".join(f"{s.name} {s.status.value}" for s in outcome.steps)
    print(f"demo: handle.wait() for order {order_id}: {outcome.state.value} ({steps})")


def wait_for_hooks(timeout: float) -> bool:
    """Every COMPLETED or FAILED order fires its hook once (``workers.hooks``); they are
    sent after the saga settles, so wait for them, then check there are no extra runs."""
    import sqlalchemy as sa

    from workers import db
    from workers.report import ORDER_SAGA, saga_states

    deadline = time.monotonic() + timeout
    while True:
        counts = saga_states(ORDER_SAGA)
        finished = counts.get("COMPLETED", 0) + counts.get("FAILED", 0)
        with db.get_engine().connect() as conn:
            runs = conn.execute(
                sa.select(sa.func.count()).select_from(db.order_outcomes)
            ).scalar_one()
            orders = conn.execute(
                sa.select(sa.func.count(sa.distinct(db.order_outcomes.c.order_id)))
            ).scalar_one()
        if runs >= finished or time.monotonic() > deadline:
            print(f"demo: outcome hooks ran {runs} time(s) for {finished} finished order(s)")
            return bool(runs == orders == finished)
        time.sleep(0.25)


def drain_dead_letters(store: Any) -> dict[str, int]:
    """The demo's last act: the operator's one command, `celery-sagas dlq drain`."""
    landed = len(store.dead_letters(status="all", limit=100_000))
    command = [sys.executable, "-m", "celery_sagas.cli", "--app", "workers.app", "dlq", "drain"]
    print(
        f"demo: {landed} compensation(s) in the dead-letter queue; draining: "
        "celery-sagas --app workers.app dlq drain"
    )
    result = subprocess.run(
        command,
        env={**os.environ, **DEMO_SETTINGS, "PYTHONPATH": str(config.REPO_ROOT)},
        cwd=config.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    sys.stderr.write(result.stderr)
    print(result.stdout.rstrip())
    resolved = len(store.dead_letters(status="resolved", limit=100_000))
    return {"landed": landed, "resolved": resolved, "drain_exit": result.returncode}


def wait_settled(store: Any, total: int, started: float, timeout: float) -> None:
    from celery_sagas.machine import SETTLED_STATES

    settled_names = {s.value for s in SETTLED_STATES}
    deadline = started + timeout
    while True:
        counts = store.count_by_state()
        done = sum(v for k, v in counts.items() if k in settled_names)
        progress(done, total, counts, started)
        if done >= total:
            sys.stderr.write("\n")
            return
        if time.monotonic() > deadline:
            sys.stderr.write("\n")
            print(f"demo: timed out after {timeout:.0f}s with {total - done} saga(s) unsettled")
            return
        time.sleep(0.25)


if __name__ == "__main__":
    raise SystemExit(main())

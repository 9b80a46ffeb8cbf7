"""One case on one broker, in a process of its own: ``python -m chaos.case '<spec json>'``.

The example app reads its broker and database from the environment when it is imported,
so each case runs in a fresh interpreter; it prints its row as JSON on the last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos.faults import CASES, Case
from chaos.inline import InlinePlan, environment, plan
from chaos.orders import STOCK, is_hung, make_orders, step_timeouts
from chaos.servers import REDIS_PORT, Postgres, RabbitVhost, RedisServer
from chaos.supervisor import Supervisor

SETTINGS = {
    "SAGAS_SCAN_INTERVAL": "1",
    "SAGAS_RELAY_INTERVAL": "1",
    "SAGAS_RELAY_AFTER": "3",
    "SAGAS_TIME_LIMIT_GRACE": "2",
    # untimed steps (--inline-steps): a lost message re-sent after 3 s, a begun step
    # whose worker died after 3 missed 1 s heartbeats
    "SAGAS_RESEND_UNTIMED_AFTER": "3",
    "SAGAS_HEARTBEAT_INTERVAL": "1",
    "SAGAS_STEP_TIMEOUTS": json.dumps(step_timeouts()),
}


@dataclass
class Spec:
    case: str
    broker: str  # "redis" | "rabbitmq"
    sagas: int
    duration: float
    seed: int
    pg_root: str
    pg_port: int
    out_dir: str
    settle_timeout: float = 180.0
    quick: bool = False
    concurrency: int = 3
    redis_port: int = REDIS_PORT
    start_via: str = (
        "task"  # "task": start_saga.delay(order) (durable); "runtime": sagas.start(...)
    )
    # the order saga in inline mode (``chaos.inline``): untimed steps, SAGAS_INLINE_STEPS
    inline_steps: bool = False
    timed_steps: bool = False  # with inline_steps: the steps keep their timeouts


@dataclass
class Run:
    """What a fault needs: the processes, the servers, the app and the orders so far."""

    spec: Spec
    case: Case
    pg: Postgres
    broker: RedisServer | RabbitVhost
    supervisor: Supervisor
    worker: Any
    app: Any
    runtime: Any
    saga: Any
    start_saga: Any
    engine: Any
    rng: random.Random
    submitted: list[dict[str, Any]] = field(default_factory=list)
    saga_ids: dict[str, str] = field(default_factory=dict)
    refused: int = 0


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _submit(run: Run, orders: list[dict[str, Any]], over: float) -> None:
    """Start the orders evenly over ``over`` seconds, as application code would; an
    order whose ``delay`` keeps failing (broker down) is counted as refused, not started."""
    began = time.monotonic()
    for number, order in enumerate(orders):
        wait = began + over * number / max(1, len(orders)) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for attempt in range(5):
            try:
                if run.spec.start_via == "runtime":  # in the caller: INSERT, then publish
                    saga_id = run.runtime.start("order_fulfillment", order).saga_id
                else:
                    saga_id = run.start_saga.delay(order).id
                run.saga_ids[order["order_id"]] = saga_id
                run.submitted.append(order)
                break
            except Exception as exc:
                log(f"start of {order['order_id']} failed ({type(exc).__name__}: {exc})")
                time.sleep(1 + attempt)
        else:
            run.refused += 1


def _inject(run: Run, window_start: float) -> tuple[int, float]:
    """Inject the case's faults on schedule; returns (faults, when the last one ended)."""
    faults, last_end = 0, window_start
    for tick, at in enumerate(run.case.times(run.spec.duration, run.spec.quick)):
        wait = window_start + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        assert run.case.inject is not None
        try:
            done = run.case.inject(run, tick)
        except Exception as exc:  # the harness keeps going; the row shows fewer faults
            log(f"fault {run.case.name} #{tick} failed: {type(exc).__name__}: {exc}")
            continue
        faults += done
        last_end = time.monotonic()
    rest = window_start + run.spec.duration - time.monotonic()
    if rest > 0:
        time.sleep(rest)
    return faults, last_end


def _wait_settled(run: Run, keys: list[str], timeout: float) -> float | None:
    from chaos.truth import settled_count

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if settled_count(run.engine, keys) >= len(keys):
                return time.monotonic()
        except Exception as exc:
            log(f"settle check failed: {type(exc).__name__}")
        time.sleep(0.5)
    return None


def _start_broker(spec: Spec, out: Path) -> RedisServer | RabbitVhost:
    if spec.broker == "redis":
        return RedisServer(spec.redis_port, log_dir=out).start()
    return RabbitVhost().start()


def _broker_leftovers(broker: RedisServer | RabbitVhost) -> dict[str, Any]:
    """Redis: messages still queued, and delivered but never acknowledged (they come back
    only after the visibility timeout)."""
    if not isinstance(broker, RedisServer):
        return {}
    import redis

    client = redis.Redis.from_url(broker.url)
    try:
        found: dict[str, Any] = {"unacked": int(client.hlen("unacked"))}
        tasks = []
        for raw in client.hvals("unacked"):
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                tasks.append(json.loads(raw)[0]["headers"]["task"])
        found["unacked_tasks"] = sorted(tasks)
        for queue in ("celery", "sagas.control"):
            found[f"queued:{queue}"] = int(client.llen(queue))
        return found
    except redis.RedisError:
        return {}
    finally:
        client.close()


STEP_DELIVERY = re.compile(r"Task order_fulfillment\.\w+\[[0-9a-f-]+\] received")


def _log_counts(processes: list[Any]) -> dict[str, int]:
    text = "".join(p.log_text() for p in processes)
    return {
        "ignored": text.count("message ignored ("),
        "resent": text.count("re-sent"),
        # step and compensation messages the worker received: 4+ per saga by default,
        # about one per saga when the steps run inline
        "step_deliveries": len(STEP_DELIVERY.findall(text)),
        # re-sent because the delivery that began the step inline died (machine.Abandoned)
        "abandoned": text.count("died before it finished"),
        "hostname_attribute_error": text.count("has no attribute 'hostname'"),
        "decode_errors": text.count("Can't decode message body") + text.count("ContentDisallowed"),
    }


def _explain_lost(item: str, saga_ids: dict[str, str], worker: Any) -> str:
    """``order: STATE`` plus the saga id the caller got and what the worker log saw."""
    order_id = item.split(":", 1)[0]
    saga_id = saga_ids.get(order_id, "?")
    text = worker.log_text()
    seen = "start received" if f"start[{saga_id}] received" in text else "start never received"
    return f"{item} (saga id {saga_id}; {seen} by the worker; {text.count(saga_id)} log lines)"


def run_case(spec: Spec) -> dict[str, Any]:
    case = CASES[spec.case]
    out = Path(spec.out_dir) / f"{spec.case}-{spec.broker}"
    out.mkdir(parents=True, exist_ok=True)
    pg = Postgres(spec.pg_port, Path(spec.pg_root))
    database = f"chaos_{spec.case.replace('-', '_')}_{spec.broker}"
    database_url = pg.create_database(database)
    broker = _start_broker(spec, out)
    env = {"SAGAS_DATABASE_URL": database_url, "CELERY_BROKER_URL": broker.url, **SETTINGS}
    untimed = not spec.timed_steps
    inline = plan(spec.case, spec.broker, untimed) if spec.inline_steps else None
    if inline is not None:
        assert inline.skip is None, inline.note()  # __main__ does not run a skipped case
        env.update(environment(inline))
        log(inline.note())
    os.environ.update(env)
    try:
        return _run(spec, case, pg, broker, env, out, database, inline)
    finally:
        broker.stop()


def _run(
    spec: Spec,
    case: Case,
    pg: Postgres,
    broker: RedisServer | RabbitVhost,
    env: dict[str, str],
    out: Path,
    database: str,
    inline: InlinePlan | None = None,
) -> dict[str, Any]:
    from celery_sagas.store import upgrade
    from chaos.truth import collect
    from tests.support.processes import CeleryProcess
    from workers import db

    if inline is not None:  # before workers.app: it declares the order saga untimed
        from chaos.app import app, order_fulfillment, sagas, start_saga
    else:
        from workers.app import app, sagas
        from workers.orders import start_saga
        from workers.sagas import order_fulfillment
    app_module = "workers.app" if inline is None else "chaos.app"

    upgrade(env["SAGAS_DATABASE_URL"])
    db.create_tables()
    db.seed_inventory(STOCK)
    worker = CeleryProcess(
        app_module,
        log_dir=out,
        env=env,
        pool="prefork",
        concurrency=spec.concurrency,
        name="worker",
        hostname=f"chaos-{spec.case}@%h",
    )
    beats = [
        CeleryProcess(app_module, kind="beat", log_dir=out, env=env, name=f"beat{n}")
        for n in range(case.beats)
    ]
    supervisor = Supervisor([worker, *beats]).start()
    run = Run(
        spec,
        case,
        pg,
        broker,
        supervisor,
        worker,
        app,
        sagas,
        order_fulfillment,
        start_saga,
        db.get_engine(),
        random.Random(f"{spec.case}:{spec.seed}:faults"),
    )
    orders = make_orders(spec.case, spec.sagas, spec.seed)
    log(f"{spec.case}/{spec.broker}: {len(orders)} orders over {spec.duration:.0f}s ({out})")
    window_start = time.monotonic()
    submitter = threading.Thread(
        target=_submit, args=(run, orders, spec.duration * 0.7), daemon=True
    )
    submitter.start()
    faults, last_fault = _inject(run, window_start) if case.inject else (0, window_start)
    submitter.join()
    if case.inject is None:  # the faults ride in the orders: the last one started now
        last_fault = time.monotonic()
    if case.name in ("hung", "late-replies"):
        faults = sum(1 for o in run.submitted if is_hung(o))
    elif case.beats > 1:
        faults = case.beats - 1
    keys = [o["order_id"] for o in run.submitted]
    log(f"{spec.case}/{spec.broker}: {faults} faults; waiting for {len(keys)} sagas to settle")
    settled_at = _wait_settled(run, keys, spec.settle_timeout)
    time.sleep(3)  # anything still in flight (a late reply, a stale re-send) lands now
    findings = collect(run.engine, keys, STOCK)
    supervisor.stop()
    leftovers = _broker_leftovers(broker)
    findings.lost = [_explain_lost(item, run.saga_ids, worker) for item in findings.lost]
    self_exits = [asdict(e) for e in supervisor.exits]
    mode = {} if inline is None else {"inline": inline.table_note(), "timeouts": inline.timeouts}
    return {
        "case": spec.case,
        "broker": spec.broker,
        "seed": spec.seed,
        **mode,
        "faults": faults,
        "refused": run.refused,
        "settle_s": None if settled_at is None else round(max(0.0, settled_at - last_fault), 1),
        "self_exits": len(self_exits),
        "exits": self_exits,
        "restarts": supervisor.restarts,
        "logs": _log_counts([worker, *beats]),
        "broker_leftovers": leftovers,
        "database": database,
        "log_dir": str(out),
        **findings.as_dict(),
    }


def main(argv: list[str]) -> int:
    spec = Spec(**json.loads(argv[0]))
    row = run_case(spec)
    sys.stdout.write(json.dumps(row, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

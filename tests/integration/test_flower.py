"""Flower with a real worker sending events: it finds every task of one saga, names are
stable, all tasks share one root, and the order's secrets never show anywhere.

One Flower process and one worker (``-E``) serve the module. Two orders run: a plain one and
one whose payment step retries once. Each carries its own secrets, so each check looks only
for the secrets of its own order. A test-process event receiver records every event on the
broker, so "never in any event" is checked on the raw events too, not only on what Flower
chose to keep.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.conftest import Deployment, make_order, wait_settled
from tests.support.processes import REPO_ROOT, CeleryProcess, wait_until

STEPS = ["reserve_inventory", "process_payment", "create_shipment", "send_confirmation"]
STEP_TASKS = [f"order_fulfillment.{s}" for s in STEPS]
HOOK = "celery_sagas.hook"  # the order saga's on_completed hook, run once


# --------------------------------------------------------------------------- Flower process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sagas_flower_argv() -> list[str]:
    """``celery -A workers.app sagas flower`` once cli.py registers it; until then the same
    command object run under celery's CLI (so the test exercises the real command)."""
    from celery_sagas.cli import sagas_celery_command

    if "flower" in getattr(sagas_celery_command, "commands", {}):
        return [sys.executable, "-m", "celery", "-A", "workers.app", "sagas", "flower"]
    bootstrap = (
        "import sys; from celery.bin.celery import main, celery; "
        "from celery_sagas.cli import sagas_celery_command as g; "
        "from celery_sagas.integration.flower import flower_command; "
        "g.add_command(flower_command); sys.exit(main())"
    )
    return [sys.executable, "-c", bootstrap, "-A", "workers.app", "sagas", "flower"]


@dataclass
class FlowerProcess:
    """A Flower server subprocess on a free port; its output goes to ``log_path``."""

    argv: list[str]
    env: Mapping[str, str]
    log_path: Path
    credentials: str | None = None
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlowerProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [*self.argv, f"--port={self.port}", "--address=127.0.0.1"]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                env=env,
                cwd=self.log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._healthy, timeout=30, interval=0.2, message="Flower answers")
        return self

    def _healthy(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise AssertionError(f"Flower exited {self.popen.returncode}:\n{self.log_text()}")
        with contextlib.suppress(OSError):
            return self.get("/healthcheck")[0] == 200
        return False

    def get(self, path: str, *, auth: bool = True) -> tuple[int, str]:
        """``(status, body)`` of a GET, with the basic-auth credentials if ``auth``."""
        request = urllib.request.Request(self.url + path)
        if auth and self.credentials:
            token = base64.b64encode(self.credentials.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:500]}"
        return json.loads(body)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def wait_for_event_capture(flower: FlowerProcess) -> None:
    """Flower answers HTTP before its event receiver runs: send a probe task until Flower
    has seen it (the outbox relay is a harmless no-op)."""
    from workers.app import app

    def seen() -> bool:
        probe = app.send_task("celery_sagas.relay_outbox")
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: flower.get(f"/api/task/info/{probe.id}")[0] == 200,
                timeout=3,
                interval=0.2,
            )
            return True
        return False

    wait_until(seen, timeout=30, interval=0, message="Flower receives task events")


# --------------------------------------------------------------------------- event recorder


class EventRecorder:
    """Every event on the broker, as received, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="event-recorder", daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        assert self._ready.wait(10), "event receiver did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)

    def text(self) -> str:
        return json.dumps(self.events, default=str)

    def leaks(self, secrets: Secrets) -> list[str]:
        """``"<event type> <task uuid> <field>"`` for every event field holding a secret."""
        return [
            f"{event.get('type')} {event.get('uuid')} {key}"
            for event in self.events
            for key, value in event.items()
            if secrets.found_in(json.dumps(value, default=str))
        ]


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Secrets:
    card: str
    address: str

    def order_fields(self) -> dict[str, Any]:
        return {
            "payment": {"method": "card", "card_number": self.card},
            "shipping": {"address": self.address},
            "address": self.address,  # what create_shipment books
        }

    def found_in(self, text: str) -> list[str]:
        return [s for s in (self.card, self.address) if s in text]


PLAIN = Secrets("4111111111111111", "221B Baker Street, London NW1 6XE")
RETRIED = Secrets("5500005555555559", "742 Evergreen Terrace, Springfield")


@dataclass
class Observed:
    flower: FlowerProcess
    worker: CeleryProcess
    events: EventRecorder
    saga_ids: dict[str, str]  # "plain" | "retried" -> saga id
    responses: dict[str, str] = field(default_factory=dict)  # path -> body

    def fetch(self, path: str) -> Any:
        status, body = self.flower.get(path)
        self.responses[path] = body
        assert status == 200, f"GET {path}: {status} {body[:300]}"
        return json.loads(body) if path.startswith("/api/") else body

    def saga_tasks(self, which: str) -> dict[str, Any]:
        return self.fetch("/api/tasks?search=" + quote(f"kwargs:saga_id={self.saga_ids[which]}"))


def _settled_in_flower(observed: Observed, which: str, expected: int) -> bool:
    tasks = observed.saga_tasks(which)
    done = [t for t in tasks.values() if t["state"] == "SUCCESS"]
    return len(done) >= expected


@pytest.fixture(scope="module")
def observed(
    deployment: Deployment,
    start_saga: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Observed]:
    from workers import db
    from workers.app import app

    logs = tmp_path_factory.mktemp("flower")
    flower = FlowerProcess(
        [sys.executable, "-m", "celery", "-A", "workers.app", "flower"],
        {**deployment.env, "FLOWER_UNAUTHENTICATED_API": "true"},
        logs / "flower.log",
    )
    worker = deployment.worker(name="flower-worker", events=True, log_dir=logs)
    with contextlib.ExitStack() as stack:
        stack.callback(flower.stop)
        flower.start()
        stack.enter_context(worker)
        recorder = stack.enter_context(EventRecorder(app))
        wait_for_event_capture(flower)
        sku = f"SKU-{uuid.uuid4().hex[:10]}"
        db.seed_inventory({sku: 10})
        plain = make_order(sku, **PLAIN.order_fields())
        retried = make_order(
            sku,
            **RETRIED.order_fields(),
            simulate={"process_payment": "transient:1"},
        )
        start_saga.delay(plain)
        start_saga.delay(retried)
        records = wait_settled([plain["order_id"], retried["order_id"]])
        assert {r.state.value for r in records.values()} == {"COMPLETED"}
        result = Observed(
            flower,
            worker,
            recorder,
            {
                "plain": records[plain["order_id"]].saga_id,
                "retried": records[retried["order_id"]].saga_id,
            },
        )
        for which in ("plain", "retried"):
            wait_until(
                lambda w=which: _settled_in_flower(result, w, 5),
                timeout=20,
                interval=0.3,
                message=f"Flower saw the 5 tasks of the {which} saga succeed",
            )
        yield result


# --------------------------------------------------------------------------- tests


def test_kwargs_search_finds_every_step_and_coordinator_task_by_stable_name(
    observed: Observed,
) -> None:
    tasks = observed.saga_tasks("plain")
    names = sorted(t["name"] for t in tasks.values())
    assert names == sorted([HOOK, *STEP_TASKS])
    assert {t["state"] for t in tasks.values()} == {"SUCCESS"}
    saga_id = observed.saga_ids["plain"]
    for task in tasks.values():
        assert saga_id not in task["name"]


def test_the_saga_id_is_the_root_of_every_task_and_a_search_for_it_finds_them(
    observed: Observed,
) -> None:
    tasks = observed.saga_tasks("plain")
    roots = {t["root_id"] for t in tasks.values()}
    assert roots == {observed.saga_ids["plain"]}, f"tasks of one saga under several roots: {roots}"
    everything = observed.fetch("/api/tasks?search=" + quote(observed.saga_ids["plain"]))
    assert set(tasks) <= set(everything)


def test_every_task_of_the_saga_chains_by_parent_from_the_first_step(
    observed: Observed,
) -> None:
    """The caller publishes the first step (no parent); each later task was sent by the
    one before it."""
    tasks = observed.saga_tasks("plain")
    orphans = [t["name"] for t in tasks.values() if t["parent_id"] is None]
    assert orphans == [STEP_TASKS[0]]
    for task in tasks.values():
        if task["parent_id"] is not None:
            assert task["parent_id"] in tasks, f"{task['name']} has parent {task['parent_id']}"


def test_task_types_are_stable_names_without_ids(observed: Observed) -> None:
    types = observed.fetch("/api/task/types")["task-types"]
    assert {*STEP_TASKS, HOOK} <= set(types)
    for saga_id in observed.saga_ids.values():
        assert not [t for t in types if saga_id in t]
    assert all(len(t) < 80 and " " not in t for t in types), types


def _api_responses(observed: Observed) -> dict[str, str]:
    """Every API response and Flower task page, by path."""
    listing = observed.fetch("/api/tasks")
    for task_id in listing:
        observed.fetch(f"/api/task/info/{task_id}")
        observed.fetch(f"/task/{task_id}")  # Flower's task page
    observed.fetch("/api/task/types")
    observed.fetch("/api/workers")
    for which in observed.saga_ids:
        observed.saga_tasks(which)
    return observed.responses


def leaks(observed: Observed, secrets: Secrets) -> dict[str, list[str]]:
    """Where ``secrets`` show: events (type, task, field), responses (path), logs (lines)."""
    found = {
        "events": observed.events.leaks(secrets),
        "flower responses": [
            path for path, body in _api_responses(observed).items() if secrets.found_in(body)
        ],
        "worker log": [
            line[:160] for line in observed.worker.log_text().splitlines() if secrets.found_in(line)
        ],
        "flower log": [
            line[:160] for line in observed.flower.log_text().splitlines() if secrets.found_in(line)
        ],
    }
    return {place: where for place, where in found.items() if where}


def test_secrets_of_an_order_never_leave_the_saga(observed: Observed) -> None:
    assert leaks(observed, PLAIN) == {}
    # step messages carry ids only (the payload lives once, in the saga row) ...
    tasks = observed.saga_tasks("plain").values()
    steps = [t for t in tasks if t["name"] in STEP_TASKS]
    assert steps and all("card_number" not in t["kwargs"] for t in steps), steps
    assert all("'saga_id'" in t["kwargs"] for t in steps), steps
    # ... and no task carries it at all: the caller wrote it once, in the saga row
    assert all("card_number" not in t["args"] + t["kwargs"] for t in tasks), tasks


def test_in_the_retried_saga_only_the_payment_step_retried(observed: Observed) -> None:
    tasks = observed.saga_tasks("retried").values()
    assert [t["name"] for t in tasks if t["retries"]] == ["order_fulfillment.process_payment"]
    assert sorted(t["name"] for t in tasks) == sorted([HOOK, *STEP_TASKS])


def test_secrets_never_leave_a_saga_whose_step_retried(observed: Observed) -> None:
    assert leaks(observed, RETRIED) == {}

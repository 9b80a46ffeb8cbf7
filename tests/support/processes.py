"""Real ``celery worker`` / ``celery beat`` subprocesses for integration and crash tests.

In-thread workers (``celery.contrib.testing.worker.start_worker``) cannot be SIGKILLed; these
can. Each process runs in its own session (so its own process group), which lets
:meth:`CeleryProcess.kill` take down the main process and every prefork child at once.

    with CeleryProcess("tests.support.tiny_app", log_dir=tmp_path,
                       env={"CELERY_BROKER_URL": redis_url}, pool="prefork",
                       concurrency=2) as worker:       # started and ready
        ...
        worker.kill()                                  # SIGKILL the whole group
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")
Kind = Literal["worker", "beat"]
Pool = Literal["prefork", "threads", "gevent", "solo"]

READY_MARKERS: dict[str, str] = {"worker": " ready.", "beat": "beat: Starting..."}


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition not met",
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns a truthy value; return that.

    Raises ``AssertionError`` naming ``message`` and the last value on timeout. Exceptions
    raised by ``predicate`` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:g}s; last value: {value!r})")
        time.sleep(interval)


# --------------------------------------------------------------------------- /proc helpers


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of ``pid`` from /proc, or None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def live_pids_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    pids = []
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X"):
            pids.append(pid)
    return sorted(pids)


def live_children(ppid: int) -> list[int]:
    """Live (non-zombie) direct children of ``ppid``."""
    pids = []
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == ppid and stat[0] not in ("Z", "X"):
            pids.append(pid)
    return sorted(pids)


# --------------------------------------------------------------------------- CeleryProcess

_running: weakref.WeakSet[CeleryProcess] = weakref.WeakSet()
_started: list[CeleryProcess] = []  # every start, in order (``logs_since``)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running):
        proc.kill()


class CeleryProcess:
    """A ``python -m celery -A <app> worker|beat`` subprocess.

    ``env`` is merged over ``os.environ``; ``PYTHONPATH`` gets the repository root first.
    Output (stdout and stderr, so import errors too) goes to ``log_path``
    (``<log_dir>/<name>.log``). The working directory is ``log_dir`` unless ``cwd`` is given,
    so ``celerybeat-schedule`` files stay out of the repository.

    Workers default to ``--without-mingle --without-gossip`` (faster start, no cross-talk
    between tests); pass ``mingle=True`` / ``gossip=True`` to keep them. ``events=True``
    adds ``-E``. ``extra_args`` are appended to the command line as given.
    """

    def __init__(
        self,
        app: str,
        *,
        log_dir: str | os.PathLike[str],
        kind: Kind = "worker",
        env: Mapping[str, str] | None = None,
        pool: Pool = "solo",
        concurrency: int = 1,
        queues: Iterable[str] | None = None,
        hostname: str | None = None,
        loglevel: str = "INFO",
        name: str | None = None,
        mingle: bool = False,
        gossip: bool = False,
        events: bool = False,
        extra_args: Iterable[str] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        if kind not in READY_MARKERS:
            raise ValueError(f"kind must be 'worker' or 'beat', not {kind!r}")
        token = uuid.uuid4().hex[:8]
        self.app = app
        self.kind = kind
        self.pool = pool
        self.concurrency = concurrency
        self.queues = list(queues) if queues is not None else None
        self.loglevel = loglevel
        self.mingle, self.gossip, self.events = mingle, gossip, events
        self.extra_args = list(extra_args)
        if hostname is None and kind == "worker":
            hostname = f"{kind}-{token}@{socket.gethostname()}"
        self.hostname = hostname
        self.name = name or f"{kind}-{token}"
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{self.name}.log"
        self.cwd = Path(cwd) if cwd is not None else self.log_dir
        self.env = self._build_env(env)
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0

    # ----------------------------------------------------------------- setup

    @staticmethod
    def _build_env(extra: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(extra or {})
        paths = [str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def command(self) -> list[str]:
        """The argv this process runs."""
        argv = [sys.executable, "-m", "celery", "-A", self.app, self.kind]
        argv += ["--loglevel", self.loglevel]
        if self.kind == "worker":
            argv += ["--pool", self.pool, "--concurrency", str(self.concurrency)]
            if self.hostname:
                argv += ["--hostname", self.hostname]
            if self.queues:
                argv += ["--queues", ",".join(self.queues)]
            if not self.mingle:
                argv.append("--without-mingle")
            if not self.gossip:
                argv.append("--without-gossip")
            if self.events:
                argv.append("--task-events")
        else:
            argv += ["--schedule", str(self.log_dir / f"{self.name}-schedule")]
            if self.hostname:
                argv += ["--hostname", self.hostname]
        return argv + self.extra_args

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> CeleryProcess:
        """Start the process (again, after a stop/kill). Does not wait for readiness."""
        if self.is_alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open while running
        header = f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n"
        self._log_file.write(header.encode())
        self._log_file.flush()
        self._log_offset = self._log_file.tell()
        self.popen = subprocess.Popen(
            self.command(),
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _running.add(self)
        _started.append(self)
        return self

    def wait_ready(self, timeout: float = 30.0) -> CeleryProcess:
        """Wait until the log says the worker is ready (beat: started); fail fast if it died."""
        marker = READY_MARKERS[self.kind]

        def ready() -> bool:
            if marker in self._log_since_start():
                return True
            if not self.is_alive():
                raise AssertionError(
                    f"{self.name} exited with code {self.returncode} before it was ready; "
                    f"log:\n{self.log_tail()}"
                )
            return False

        try:
            wait_until(ready, timeout=timeout, message=f"{self.name} ready")
        except AssertionError as exc:
            if self.is_alive():
                raise AssertionError(
                    f"{self.name} not ready after {timeout:g}s; log:\n{self.log_tail()}"
                ) from exc
            raise
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown: SIGTERM, wait up to ``timeout``, then SIGKILL the whole group."""
        popen = self.popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                popen.wait(10)
        # Anything left in the group (an orphaned pool child) goes too.
        self._kill_group()
        self._finish()
        return popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the main process and every process in its group; reap the main one."""
        popen = self.popen
        if popen is None:
            return None
        self._kill_group()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)
        self._finish()
        return popen.returncode

    def _kill_group(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # pgid == pid (start_new_session)

    def _finish(self) -> None:
        _running.discard(self)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ----------------------------------------------------------------- inspection

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def child_pids(self) -> list[int]:
        """Live direct children of the main process (the prefork pool processes)."""
        return live_children(self.pid) if self.popen is not None else []

    def group_pids(self) -> list[int]:
        """Live processes in this process's group (main process, pool children, ...)."""
        return live_pids_in_group(self.pid) if self.popen is not None else []

    def log_text(self) -> str:
        """The whole log file (all starts of this process)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Wait until ``text`` appears in the log written since the last start."""
        wait_until(
            lambda: text in self._log_since_start(),
            timeout=timeout,
            message=f"{text!r} in {self.name} log",
        )

    # ----------------------------------------------------------------- context manager

    def __enter__(self) -> CeleryProcess:
        if self.popen is None or not self.is_alive():
            self.start()
        return self.wait_ready()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else f"exited {self.returncode}"
        pid = self.popen.pid if self.popen is not None else None
        return f"<CeleryProcess {self.name} {self.kind} -A {self.app} pid={pid} {state}>"


def starts_so_far() -> int:
    """A mark for :func:`logs_since`: how many times a Celery process has been started."""
    return len(_started)


def logs_since(mark: int, lines: int = 40) -> list[tuple[str, str]]:
    """(name, log tail) of every Celery process started since ``mark`` or still running:
    what a failed test's report shows, so a stalled saga leaves its workers' last words."""
    chosen = {id(proc): proc for proc in [*_started[mark:], *_running]}
    return [(proc.name, proc.log_tail(lines)) for proc in chosen.values()]


def active_task_pid(app: Any, hostname: str, task_name: str) -> int | None:
    """The pid of the pool child of worker ``hostname`` running a ``task_name`` task now
    (``inspect().active()``), or None."""
    replies = app.control.inspect(destination=[hostname], timeout=0.5).active() or {}
    for tasks in replies.values():
        for task in tasks:
            if task["name"] == task_name:
                return int(task["worker_pid"])
    return None

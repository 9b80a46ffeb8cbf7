"""Restart worker and beat processes as a supervisor (compose, systemd) would.

A process this run killed on purpose is restarted at once; one that exited by itself is
restarted too, and counted as a self-exit with the tail of its log (the kombu
``'NoneType' object has no attribute 'hostname'`` exit after a Redis kill shows up here).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tests.support.processes import CeleryProcess


@dataclass
class Exit:
    name: str
    code: int | None
    at: float
    tail: str


@dataclass
class Supervisor:
    processes: list[CeleryProcess]
    interval: float = 0.5
    exits: list[Exit] = field(default_factory=list)
    restarts: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        for process in self.processes:
            process.start()
        for process in self.processes:
            process.wait_ready(timeout=120)
        self._thread.start()
        return self

    def kill_and_restart(self, process: CeleryProcess) -> None:
        """SIGKILL the whole process group, then start it again (not waiting for ready)."""
        with self._lock:
            process.kill()
            process.start()
            self.restarts += 1

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for process in self.processes:
                    if process.is_alive():
                        continue
                    self.exits.append(
                        Exit(
                            process.name, process.returncode, time.monotonic(), process.log_tail(40)
                        )
                    )
                    process.kill()  # reap it and anything left in its group
                    process.start()
                    self.restarts += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for process in reversed(self.processes):
            process.stop(timeout=10)

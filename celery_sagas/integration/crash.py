"""Crash points for tests: ``SAGAS_CRASH_POINT=after_commit`` plus
``SAGAS_CRASH_MARKER=/path`` SIGKILLs the process at that point, once (the marker file
records that it happened). Unset, a crash point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from celery_sagas.log import logger


def crash_point(name: str) -> None:
    if os.environ.get("SAGAS_CRASH_POINT") != name:
        return
    marker = Path(os.environ.get("SAGAS_CRASH_MARKER", "/tmp/celery-sagas-crash-marker"))
    try:
        with marker.open("x") as handle:  # exactly once, even across processes
            handle.write(f"{name} {os.getpid()}\n")
    except FileExistsError:
        return
    logger.error("crash point %s: killing process %d", name, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)

"""A throwaway Celery app for harness tests: ``celery -A tests.support.tiny_app worker``.

The broker comes from ``CELERY_BROKER_URL``; there is no result backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

app = Celery("tiny", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("TINY_QUEUE", "tiny"),
)


@app.task(name="tiny.write_marker")
def write_marker(path: str, text: str = "done") -> str:
    """Write ``text`` to ``path`` atomically (tests poll for the file)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(f"{text}\n{os.getpid()}\n")
    tmp.replace(target)
    return text

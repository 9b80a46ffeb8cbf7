"""Run a gevent test script in a fresh interpreter (the patching must come first there)."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy.engine import make_url

from tests.support.databases import pg_admin_url
from tests.support.processes import REPO_ROOT

GREENLETS = 5
SLEEP = 0.4  # seconds each greenlet's query sleeps on the server


def run_green_script(script: str, mode: str) -> list[str]:
    """Run ``script`` with argv ``[dsn, mode, SLEEP, GREENLETS]``; the words it printed."""
    url = make_url(pg_admin_url())
    dsn = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    done = subprocess.run(
        [sys.executable, "-c", script, dsn, mode, str(SLEEP), str(GREENLETS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=True,
    )
    return done.stdout.split()

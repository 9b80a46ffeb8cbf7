"""The peers a round runs next to the sagas: DBOS's direct workflow, when ``make
bench-peers`` made ``.venv-peers`` (DBOS lives in a virtualenv of its own: its
dependencies must not change the versions the project is measured and tested with)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.bench import Options

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
DBOS_PEER = REPO_ROOT / "bench" / "dbos_peer.py"
PROCESSES = 2
THREADS = 2  # per process: like the saga worker's prefork -c 2, two steps at a time each


class PeerError(Exception):
    """The peer's run failed; the message carries its output."""


def dbos_available() -> bool:
    return PEERS_PYTHON.exists()


def run_dbos(options: Options) -> dict[str, Any]:
    """N of DBOS's 4-step workflows (``bench/dbos_peer.py``) on a throwaway database;
    its JSON figures (``per_second`` …)."""
    command = [
        str(PEERS_PYTHON), str(DBOS_PEER),
        "--n", str(options.n),
        "--processes", str(PROCESSES),
        "--threads", str(THREADS),
        "--step-ms", f"{options.step_ms:g}",
        "--pg-admin-url", options.pg_admin_url,
    ]  # fmt: skip
    sys.stderr.write(f"\r\033[KDBOS: {options.n} workflows …")
    sys.stderr.flush()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=options.timeout, check=False
    )
    sys.stderr.write("\r\033[K")
    if done.returncode != 0:
        raise PeerError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures

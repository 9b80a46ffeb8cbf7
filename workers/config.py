"""Where the example deployment finds its broker and database.

``CELERY_BROKER_URL`` and ``SAGAS_DATABASE_URL`` point it at Redis/RabbitMQ and PostgreSQL
(``PARTICIPANTS_DATABASE_URL``, if set, holds the participants' own tables: a participant
worker of ``coordinator_hop`` sets only that one and never sees the saga database).
Unset, it uses an embedded default that needs no server: kombu's ``filesystem://``
transport and a SQLite file, both under ``.demo/`` in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kombu import transport

REPO_ROOT = Path(__file__).resolve().parent.parent
FILESYSTEM_TRANSPORT = "workers.fs_broker:Transport"


def use_atomic_filesystem_broker() -> None:
    """``filesystem://`` as this example's transport with atomic writes
    (``workers.fs_broker``), in every process that imports the example app."""
    transport.TRANSPORT_ALIASES["filesystem"] = FILESYSTEM_TRANSPORT
    transport._transport_cache.pop("filesystem", None)  # resolved before: resolve again


use_atomic_filesystem_broker()


def demo_dir() -> Path:
    return Path(os.environ.get("SAGAS_DEMO_DIR", REPO_ROOT / ".demo"))


def database_url() -> str:
    """The participants' own tables: ``PARTICIPANTS_DATABASE_URL``, else the saga
    database."""
    return os.environ.get("PARTICIPANTS_DATABASE_URL") or saga_database_url() or _embedded()


def saga_database_url() -> str:
    """The saga database: ``SAGAS_DATABASE_URL``; empty on a participant-only worker
    (``PARTICIPANTS_DATABASE_URL`` set alone, with ``SAGAS_COORDINATOR_HOP``); else the
    embedded default."""
    url = os.environ.get("SAGAS_DATABASE_URL")
    if url:
        return url
    if os.environ.get("PARTICIPANTS_DATABASE_URL"):
        return ""
    return _embedded()


def _embedded() -> str:
    demo_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{demo_dir() / 'sagas.db'}"


def broker_url() -> str:
    return os.environ.get("CELERY_BROKER_URL") or "filesystem://"


def broker_transport_options(url: str) -> dict[str, Any]:
    if not url.startswith("filesystem"):
        return {}
    folder = demo_dir() / "broker"
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(demo_dir() / "broker-control"),
        "polling_interval": 0.05,
        "store_processed": False,
    }

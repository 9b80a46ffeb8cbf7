"""Where the example deployment finds its broker and database.

``CELERY_BROKER_URL`` and ``SAGAS_DATABASE_URL`` point it at Redis/RabbitMQ and PostgreSQL.
Unset, it uses an embedded default that needs no server: kombu's ``filesystem://``
transport and a SQLite file, both under ``.demo/`` in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_dir() -> Path:
    return Path(os.environ.get("SAGAS_DEMO_DIR", REPO_ROOT / ".demo"))


def database_url() -> str:
    url = os.environ.get("SAGAS_DATABASE_URL")
    if url:
        return url
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

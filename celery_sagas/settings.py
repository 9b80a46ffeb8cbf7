"""One frozen settings object, built from the Celery app's config or keyword arguments.

Celery config keys are the field names prefixed with ``sagas_`` (``sagas_database_url``,
``sagas_relay_interval``, ...). ``SAGAS_DATABASE_URL`` in the environment is the fallback
for the database URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from celery_sagas.errors import SagaConfigurationError

DEFAULT_REDACT_FIELDS = ("card_number", "cvv", "password", "secret", "token", "address")


@dataclass(frozen=True)
class SagaSettings:
    database_url: str
    coordinator_queue: str | None = None
    relay_interval: float = 2.0
    relay_after: float = 5.0
    relay_batch: int = 500
    redact_fields: tuple[str, ...] = DEFAULT_REDACT_FIELDS
    step_timeouts: Mapping[str, float] = field(default_factory=dict)
    engine_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.database_url:
            raise SagaConfigurationError(
                "no saga database: set sagas_database_url in the Celery config, "
                "pass database_url=..., or set SAGAS_DATABASE_URL"
            )
        if self.database_url.startswith("postgresql://") or self.database_url.startswith(
            "postgres://"
        ):
            raise SagaConfigurationError(
                f"use a postgresql+psycopg2:// URL (SQLAlchemy 2.1 reads a bare "
                f"postgresql:// as psycopg 3): {redact_url(self.database_url)}"
            )
        for name in ("relay_interval", "relay_after"):
            if getattr(self, name) <= 0:
                raise SagaConfigurationError(f"{name} must be positive")
        if self.relay_batch < 1:
            raise SagaConfigurationError("relay_batch must be >= 1")
        object.__setattr__(self, "redact_fields", tuple(self.redact_fields))

    @classmethod
    def from_config(cls, conf: Mapping[str, Any], **overrides: Any) -> SagaSettings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"sagas_{f.name}"
            override = overrides.pop(f.name, None)
            if override is not None:
                values[f.name] = override
            elif conf.get(key) is not None:
                values[f.name] = conf[key]
        if overrides:
            raise SagaConfigurationError(f"unknown settings: {', '.join(sorted(overrides))}")
        values.setdefault("database_url", os.environ.get("SAGAS_DATABASE_URL", ""))
        return cls(**values)


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url

"""One frozen settings object, built from the Celery app's config or keyword arguments.

Celery config keys are the field names prefixed with ``sagas_`` (``sagas_database_url``,
``sagas_relay_interval``, ...). The environment is the fallback for every field:
``SAGAS_DATABASE_URL``, ``SAGAS_SCAN_INTERVAL=1``, ``SAGAS_STEP_TIMEOUTS='{"create_shipment":
900}'`` (values are read as JSON when they parse, else as text).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from celery_sagas.errors import SagaConfigurationError

MAX_KEY_COLUMN = 200
DEFAULT_REDACT_FIELDS = ("card_number", "cvv", "password", "secret", "token", "address")
# an untimed step whose worker missed this many heartbeats in a row counts as abandoned
HEARTBEATS_MISSED = 3


@dataclass(frozen=True)
class SagaSettings:
    database_url: str
    coordinator_queue: str | None = None
    control_queue: str | None = "sagas.control"  # beat's scan and relay (None: default queue)
    coordinator_hop: bool = False
    signing_key: str | None = None  # coordinator_hop: the HMAC secret of step commands
    prepared_statements: bool = True
    # run the next step in the task of the step before it when neither has a time limit
    # and both go to one queue (integration.inline): about half the CPU and latency
    inline_steps: bool = False
    relay_interval: float = 2.0
    relay_after: float = 5.0
    relay_batch: int = 500
    scan_interval: float = 2.0
    scan_batch: int = 200
    stuck_after: float = 600.0
    # the scan deletes the guards of sagas finished this long ago, and outbox rows sent
    # this long ago, compact_batch of each per pass (``celery-sagas prune`` the rest)
    compact_after: float = 86400.0
    compact_batch: int = 500
    max_redispatches: int = 2
    time_limit_grace: float = 10.0  # hard time limit = step timeout + this
    queue_timeout: float | None = None  # bound on a step's wait for a worker (None: none)
    # steps without a timeout (timeout=None): their message, if no worker began it, is
    # sent again after this (doubling); a worker running one refreshes its started marker
    # every heartbeat_interval, and the scan re-sends it after HEARTBEATS_MISSED silent beats
    resend_untimed_after: float = 60.0
    heartbeat_interval: float = 30.0
    redact_fields: tuple[str, ...] = DEFAULT_REDACT_FIELDS
    step_timeouts: Mapping[str, float] = field(default_factory=dict)
    saga_deadlines: Mapping[str, float] = field(default_factory=dict)
    max_concurrent: Mapping[str, int] = field(default_factory=dict)
    retry_policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    dlq_queue: str = "sagas.dlq"
    dlq_auto_retry_interval: float = 3600.0
    dlq_auto_retries: int = 3
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    # what a start accepts, checked in the caller (the key column is VARCHAR(200))
    max_payload_bytes: int = 65536
    max_payload_depth: int = 32
    max_key_length: int = MAX_KEY_COLUMN

    def __post_init__(self) -> None:
        self._coerce_flags()
        self._check_database_and_key()
        if self.database_url.startswith("postgresql://") or self.database_url.startswith(
            "postgres://"
        ):
            raise SagaConfigurationError(
                f"name the driver: postgresql+psycopg2:// (psycopg2, the default) or "
                f"postgresql+psycopg:// (psycopg 3; SQLAlchemy 2.1 reads a bare "
                f"postgresql:// as psycopg 3): {redact_url(self.database_url)}"
            )
        for name in (
            "relay_interval",
            "relay_after",
            "scan_interval",
            "stuck_after",
            "compact_after",
            "time_limit_grace",
            "resend_untimed_after",
            "heartbeat_interval",
        ):
            if getattr(self, name) <= 0:
                raise SagaConfigurationError(f"{name} must be positive")
        for name in ("relay_batch", "scan_batch", "compact_batch"):
            if getattr(self, name) < 1:
                raise SagaConfigurationError(f"{name} must be >= 1")
        if self.dlq_auto_retry_interval <= 0 or self.dlq_auto_retries < 0:
            raise SagaConfigurationError(
                "dlq_auto_retry_interval must be positive and dlq_auto_retries >= 0"
            )
        if not self.dlq_queue:
            raise SagaConfigurationError("dlq_queue must be a queue name")
        _check_payload_limits(self)
        if self.max_redispatches < 0:
            raise SagaConfigurationError("max_redispatches must be >= 0")
        for name in ("step_timeouts", "saga_deadlines", "max_concurrent"):
            for key, seconds in dict(getattr(self, name)).items():
                if (
                    isinstance(seconds, bool)
                    or not isinstance(seconds, int | float)
                    or seconds <= 0
                ):
                    raise SagaConfigurationError(
                        f"{name}[{key!r}] must be a positive number of seconds, got {seconds!r}"
                    )
        object.__setattr__(self, "redact_fields", tuple(self.redact_fields))

    @property
    def heartbeat_lease(self) -> float:
        """Seconds without a heartbeat after which an untimed step's worker counts as gone."""
        return self.heartbeat_interval * HEARTBEATS_MISSED

    def _coerce_flags(self) -> None:
        """The on/off settings as booleans: ``SAGAS_INLINE_STEPS=False`` (not JSON) or a
        config value ``"false"`` must not read as a true (non-empty) string."""
        for f in fields(self):
            if isinstance(f.default, bool):
                object.__setattr__(self, f.name, _flag(f.name, getattr(self, f.name)))

    def _check_database_and_key(self) -> None:
        if self.coordinator_hop and self.inline_steps:
            raise SagaConfigurationError(
                "inline_steps runs a saga's next step in the worker that ran the one "
                "before: it needs the default mode, not coordinator_hop"
            )
        if self.coordinator_hop and not self.signing_key:
            raise SagaConfigurationError(
                "coordinator_hop needs a signing key shared by the coordinator and the "
                "participant workers: set sagas_signing_key or SAGAS_SIGNING_KEY"
            )
        if not self.database_url and not self.coordinator_hop:
            raise SagaConfigurationError(
                "no saga database: set sagas_database_url in the Celery config, "
                "pass database_url=..., or set SAGAS_DATABASE_URL"
            )

    def _check_positive(self) -> None:
        for name in ("relay_interval", "relay_after", "scan_interval", "stuck_after"):
            if getattr(self, name) <= 0:
                raise SagaConfigurationError(f"{name} must be positive")
        if self.time_limit_grace < 0:
            raise SagaConfigurationError("time_limit_grace must be >= 0")
        if self.queue_timeout is not None and self.queue_timeout <= 0:
            raise SagaConfigurationError("queue_timeout must be positive (or unset)")

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
            elif os.environ.get(key.upper()):
                values[f.name] = _from_env(key.upper())
        if overrides:
            raise SagaConfigurationError(f"unknown settings: {', '.join(sorted(overrides))}")
        values.setdefault("database_url", "")
        return cls(**values)


def _check_payload_limits(settings: SagaSettings) -> None:
    for name in ("max_payload_bytes", "max_payload_depth", "max_key_length"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SagaConfigurationError(f"{name} must be a positive integer, got {value!r}")
    if settings.max_key_length > MAX_KEY_COLUMN:
        raise SagaConfigurationError(
            f"max_key_length must be <= {MAX_KEY_COLUMN} (the business_key column)"
        )


TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0", ""})


def _flag(name: str, value: Any) -> bool:
    """``value`` of the on/off setting ``name`` as a bool; anything else is refused."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise SagaConfigurationError(f"{name} must be true or false, got {value!r}")


def _from_env(name: str) -> Any:
    raw = os.environ[name]
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url

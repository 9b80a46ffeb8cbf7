"""One error root with stable codes, so operators and scripts can match on them."""

from __future__ import annotations

from typing import Any


class SagaError(Exception):
    """Root of every error this library raises. ``code`` is stable across releases."""

    code = "saga_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class SagaDefinitionError(SagaError):
    """A ``Saga`` or ``Step`` was declared wrongly. ``field`` names what is wrong."""

    code = "definition"

    def __init__(self, message: str, *, field: str, saga: str | None = None) -> None:
        where = f"{saga}: " if saga else ""
        super().__init__(f"{where}{field}: {message}", field=field, saga=saga)
        self.field = field


class SagaConfigurationError(SagaError):
    """The Celery app or the saga settings break a reliability rule."""

    code = "configuration"


class InvalidPayloadError(SagaError):
    """A saga was started with a payload it cannot accept. Nothing was written."""

    code = "invalid_payload"


class PayloadConflictError(SagaError):
    """The business key is already used by a saga started with a different payload."""

    code = "payload_conflict"


class SagaNotFoundError(SagaError):
    code = "not_found"


class UnknownDefinitionError(SagaError):
    """The saga started with a definition this process does not have installed (another
    version of the saga): leave it to a worker that has it."""

    code = "unknown_definition"


class AmbiguousSagaError(SagaError):
    """A business key matches sagas of several types: name the one you mean."""

    code = "ambiguous"


class SagaTimeoutError(SagaError):
    """``handle.wait(timeout=...)`` ran out of time before the saga settled."""

    code = "timeout"


class ConcurrentUpdateError(SagaError):
    """A compare-and-set on the saga's ``version`` lost a race; reload and decide again."""

    code = "concurrent_update"


class StoreUnavailableError(SagaError):
    """The saga database cannot be reached."""

    code = "store_unavailable"


class BusinessError(SagaError):
    """Raised by a step that declined to act (e.g. stock too low, card declined).

    The step did not act, so it is not compensated; the steps before it are.
    """

    code = "business"


class TransientError(SagaError):
    """Raised by a step or compensation for a failure worth retrying with backoff."""

    code = "transient"


class DatabaseUrlError(SagaConfigurationError):
    """The saga database URL cannot be used (unparsable, or not PostgreSQL/SQLite)."""

    code = "bad_database_url"


class SchemaMissingError(SagaError):
    """The saga database exists but has no saga tables: ``celery-sagas migrate`` was not run."""

    code = "schema_missing"


class DatabaseMissingError(StoreUnavailableError):
    """The server answers but the saga database does not exist."""

    code = "database_missing"


class AmbiguousReferenceError(SagaError):
    """A business key names more than one saga (of different types): pick one."""

    code = "ambiguous"

    def __init__(self, message: str, *, candidates: tuple[str, ...]) -> None:
        super().__init__(message, candidates=candidates)
        self.candidates = candidates


class StepHardLimitExceeded(BaseException):
    """A step ran past its timeout + ``time_limit_grace`` in an inline run, where the
    worker itself enforces the step's limits (``integration.alarm``). A ``BaseException``,
    as Celery's hard limit is a kill: a participant's ``except Exception`` that swallowed
    the soft limit does not swallow this one. The step is recorded as timed out."""

"""What every command needs: the store, the redaction fields, and for commands that change
sagas, the Celery app that declares them (to publish at once and to know the definitions)."""

from __future__ import annotations

import getpass
import os
import socket
from typing import Any

import click

from celery_sagas.cli.failures import CommandError
from celery_sagas.errors import SagaError
from celery_sagas.protocols import SagaRecord
from celery_sagas.settings import SagaSettings

APP_ENV = "SAGAS_CELERY_APP"
APP_HINT = (
    f"pass --app module.path (e.g. workers.app), set {APP_ENV}, or run `celery -A yourapp sagas …`"
)


def load_app(name: str) -> Any:
    """The Celery app named ``name`` (``module``, ``module:attr``), or a ``bad_app`` error."""
    from celery.app.utils import find_app

    try:
        return find_app(name)
    except ModuleNotFoundError as exc:
        raise CommandError("bad_app", f"cannot import --app {name!r}: {exc}; {APP_HINT}") from exc
    except (AttributeError, ImportError) as exc:
        raise CommandError(
            "bad_app", f"--app {name!r} is not a Celery app ({exc}); {APP_HINT}"
        ) from exc


def prepared_statements(url: str) -> bool:
    """``SAGAS_PREPARED_STATEMENTS`` as the workers read it (unset: on), for a command run
    without the app; a value that is neither true nor false is refused."""
    return SagaSettings.from_config({}, database_url=url).prepared_statements


class CliContext:
    def __init__(
        self, database_url: str | None, app_name: str | None = None, app: Any = None
    ) -> None:
        self.database_url = database_url
        self.app_name = app_name
        self._app = app
        self._store: Any = None
        self.via = "celery sagas" if app is not None else "celery-sagas"

    @property
    def has_app(self) -> bool:
        return self._app is not None or bool(self.app_name)

    def check_app(self) -> None:
        """Load ``--app`` now, so a wrong one fails before anything else happens."""
        if self.app_name and self._app is None:
            _ = self.runtime

    @property
    def app(self) -> Any:
        """The Celery app that declares the sagas (``--app``, the env, or ``celery -A``)."""
        if self._app is None:
            name = self.app_name or os.environ.get(APP_ENV)
            if not name:
                raise CommandError(
                    "no_app",
                    "this command changes sagas, so it needs the Celery app that declares "
                    f"them: {APP_HINT}",
                )
            self._app = load_app(name)
        return self._app

    def is_choreography(self, name: str) -> bool:
        from celery_sagas.integration.choreography import choreographies

        return name in choreographies(self.app)

    def choreography(self, name: str) -> Any:
        """The app's subscriber of the choreography ``name`` (``choreography_subscriber``)."""
        from celery_sagas.integration.choreography import choreographies

        found = choreographies(self.app)
        if name not in found:
            raise CommandError(
                "not_choreography",
                f"{name!r} is not a choreography of the Celery app "
                f"{getattr(self.app, 'main', None) or self.app!r} (it has: {sorted(found)})",
            )
        return found[name]

    @property
    def runtime(self) -> Any:
        """The installed saga runtime of the Celery app (``install(app, …)``)."""
        app = self.app
        runtime = getattr(app, "_celery_sagas_runtime", None)
        if runtime is None:
            raise CommandError(
                "bad_app",
                f"the Celery app {getattr(app, 'main', None) or app!r} has no sagas installed: "
                "call celery_sagas.install(app, …) in it",
            )
        return runtime

    @property
    def url(self) -> str | None:
        """The saga database URL in use (for messages), if known."""
        if self._store is not None:
            return str(self._store.engine.url)
        return self.database_url or os.environ.get("SAGAS_DATABASE_URL")

    @property
    def store(self) -> Any:
        if self._store is None:
            if self._app is not None or (self.app_name and not self.database_url):
                self._store = self.runtime.store
                return self._store
            from celery_sagas.store import SqlSagaStore
            from celery_sagas.store.browse import check_database_url

            url = self.database_url or os.environ.get("SAGAS_DATABASE_URL")
            if not url:
                raise CommandError(
                    "no_database",
                    "no saga database: pass --database-url, set SAGAS_DATABASE_URL, "
                    "or run as `celery -A yourapp sagas …`",
                )
            SagaSettings(database_url=url)
            check_database_url(url)
            # behind a pooler in transaction mode: no server-side prepared statements
            self._store = SqlSagaStore(url, prepare=prepared_statements(url))
        return self._store

    @property
    def redact_fields(self) -> tuple[str, ...]:
        """The app's ``redact_fields`` if there is an app, else the settings' (env included)."""
        if self._app is not None or self.app_name:
            return tuple(self.runtime.settings.redact_fields)
        url = self.url or "sqlite://"
        return tuple(SagaSettings.from_config({}, database_url=url).redact_fields)

    def resolve(self, ref: str, name: str | None) -> SagaRecord:
        """The one saga ``ref`` (id or business key) names, steps loaded."""
        from celery_sagas.cli.refs import resolve

        return resolve(self.store, ref, name)

    def actor(self) -> str:
        """Who did it, recorded in the saga's transition log."""
        return f"{getpass.getuser()}@{socket.gethostname()} via {self.via}"


def context_of(ctx: click.Context) -> CliContext:
    found = ctx.find_object(CliContext)
    if found is None:  # pragma: no cover - the groups always create one
        raise SagaError("internal: no CLI context")
    return found


def store_of(ctx: click.Context) -> Any:
    return context_of(ctx).store

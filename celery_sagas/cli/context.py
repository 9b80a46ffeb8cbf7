"""What every command needs: the store, and for commands that change sagas, the Celery
app that declares them (to publish at once and to know the definitions)."""

from __future__ import annotations

import getpass
import os
import socket
from typing import Any

import click

from celery_sagas.errors import SagaError
from celery_sagas.settings import SagaSettings

APP_ENV = "SAGAS_CELERY_APP"


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
        return self._app is not None

    @property
    def runtime(self) -> Any:
        """The installed saga runtime of the Celery app (``install(app, …)``)."""
        app = self._app
        if app is None:
            name = self.app_name or os.environ.get(APP_ENV)
            if not name:
                raise click.UsageError(
                    "this command changes sagas, so it needs the Celery app that declares "
                    f"them: run `celery -A yourapp sagas …`, pass --app, or set {APP_ENV}"
                )
            from celery.app.utils import find_app

            app = self._app = find_app(name)
        runtime = getattr(app, "_celery_sagas_runtime", None)
        if runtime is None:
            raise click.UsageError(f"{app} has no sagas installed (call install(app, …))")
        return runtime

    @property
    def store(self) -> Any:
        if self._store is None:
            if self._app is not None or (self.app_name and not self.database_url):
                self._store = self.runtime.store
                return self._store
            from celery_sagas.store import SqlSagaStore

            url = self.database_url or os.environ.get("SAGAS_DATABASE_URL")
            if not url:
                raise click.UsageError(
                    "no saga database: pass --database-url, set SAGAS_DATABASE_URL, "
                    "or run as `celery -A yourapp sagas …`"
                )
            try:
                SagaSettings(database_url=url)
            except SagaError as exc:
                raise click.UsageError(exc.message) from exc
            self._store = SqlSagaStore(url)
        return self._store

    def actor(self) -> str:
        """Who did it, recorded in the saga's transition log."""
        return f"{getpass.getuser()}@{socket.gethostname()} via {self.via}"


def context_of(ctx: click.Context) -> CliContext:
    found = ctx.find_object(CliContext)
    if found is None:  # pragma: no cover - the groups always create one
        raise click.UsageError("internal: no CLI context")
    return found


def store_of(ctx: click.Context) -> Any:
    return context_of(ctx).store

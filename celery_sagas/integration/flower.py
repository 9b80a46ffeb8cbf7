"""The Sagas pages inside Flower, and ``celery -A app sagas flower [flower options…]``.

Flower has no plugin API, but its app is a ``tornado.web.Application``: :func:`install_pages`
adds ``/sagas`` (sagas filtered by state and name, searched by id or business key, paged,
counts per state, auto-refresh) and ``/sagas/<id>`` (header, a diagram of the steps and
compensations, step timeline, the saga's tasks in Flower, dead letters, operator actions)
ahead of Flower's catch-all route, and a **Sagas** link in Flower's navigation bar (its
``navbar.html`` with one item added, through the application's template loader). The pages
read the saga database, never the broker. They sit behind Flower's own auth (basic auth,
OAuth): the handlers subclass Flower's ``BaseHandler`` and use ``@web.authenticated`` like
Flower's views; without any auth configured, Flower's log and every page say so.
Templates autoescape everything; the payload and step results are shown redacted.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from celery import Celery
from celery.bin.base import CeleryCommand
from flower import command as flower_cli
from flower.app import Flower
from flower.views import BaseHandler
from tornado import template, web
from tornado.ioloop import IOLoop
from tornado.options import options as flower_options

from celery_sagas.definition import Saga
from celery_sagas.integration.choreography import choreographies
from celery_sagas.integration.diagram import LEGEND
from celery_sagas.integration.paging import REFRESH_CHOICES, BadQuery, ListQuery, Paging
from celery_sagas.integration.saga_view import (
    SagaReader,
    as_json,
    clock,
    read_detail,
    saga_tasks,
    search_term,
    step_tasks,
    took,
    when,
)
from celery_sagas.log import logger
from celery_sagas.machine import SETTLED_STATES, SagaState
from celery_sagas.store.browse import (
    COUNT_CAP,
    Filter,
    count_by_state,
    page,
    sagas_by_ref,
    shown,
    total,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
T = TypeVar("T")
NAV_LIST = '<ul class="app-nav navbar-nav">'
NAV_ITEM = (
    '<li class="nav-item"><a class="nav-link{% if active_tab == \'sagas\' %} active{% end %}" '
    "id=\"nav-sagas\" href=\"{{ handler.application.settings.get('sagas_url', '/sagas') }}\" "
    "{% if active_tab == 'sagas' %}aria-current=\"page\"{% end %}>Sagas</a></li>"
)
NO_AUTH_WARNING = (
    "Flower runs without authentication: anyone who can reach it sees every saga (payloads "
    "are redacted, but business keys, errors and reasons are not) and Flower's API can run "
    "tasks. Set FLOWER_BASIC_AUTH=user:password (in the environment, not on the command line) "
    "or configure Flower's OAuth."
)


def base_path(url_prefix: str | None) -> str:
    """Where the pages live: ``/sagas``, under Flower's ``--url_prefix`` if it has one."""
    return f"/{url_prefix.strip('/')}/sagas" if url_prefix else "/sagas"


# --------------------------------------------------------------------------- handlers


def with_sagas_link(navbar: str) -> str:
    """Flower's ``navbar.html`` with a Sagas item after its own (unchanged if its markup is
    not the one this was written for)."""
    start = navbar.find(NAV_LIST)
    end = navbar.find("</ul>", start) if start >= 0 else -1
    if end < 0:
        return navbar
    return navbar[:end] + NAV_ITEM + "\n      " + navbar[end:]


class _PagesLoader(template.Loader):
    """Our templates first, then Flower's (its ``base.html``, and its ``navbar.html`` with
    the Sagas link). Installed as the application's ``template_loader``, so Flower's own
    pages get the link too."""

    def _create_template(self, name: str) -> template.Template:
        own = TEMPLATES / name
        if own.is_file():
            return template.Template(own.read_bytes(), name=name, loader=self)
        if name == "navbar.html":
            source = Path(self.root, name).read_text(encoding="utf-8")
            return template.Template(with_sagas_link(source), name=name, loader=self)
        return super()._create_template(name)


def has_auth(options: Any) -> bool:
    return bool(getattr(options, "basic_auth", None) or getattr(options, "auth", None))


@dataclass(frozen=True)
class SagaPages:
    """What the handlers need: the store to read and the installed saga definitions."""

    store: SagaReader
    sagas: Mapping[str, Saga]
    redact_fields: Sequence[str] = ()
    choreographies: frozenset[str] = frozenset()  # their sagas have no definition to find


class _SagaHandler(BaseHandler):
    pages: SagaPages

    def initialize(self, pages: SagaPages) -> None:
        self.pages = pages

    def get_template_path(self) -> str:
        return str(TEMPLATES)  # the key of this loader in tornado's cache

    def create_template_loader(self, template_path: str) -> template.BaseLoader:
        found = self.application.settings.get("template_loader")
        if isinstance(found, _PagesLoader):
            return found
        return _PagesLoader(self.application.settings["template_path"])

    async def blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await IOLoop.current().run_in_executor(None, function, *args)

    def render_page(self, template_name: str, **kwargs: Any) -> None:
        self.render(
            template_name,
            when=when,
            clock=clock,
            took=took,
            as_json=as_json,
            sagas_url=self.sagas_url,
            no_auth_warning=None if has_auth(self.application.options) else NO_AUTH_WARNING,
            refresh_choices=REFRESH_CHOICES,
            **kwargs,
        )

    def sagas_url(self, path: str = "") -> str:
        return base_path(self.application.options.url_prefix) + path


class SagaListView(_SagaHandler):
    @web.authenticated
    async def get(self) -> None:
        try:
            query = ListQuery.parse(lambda name: self.get_argument(name, "", escape=False))
        except BadQuery as exc:
            raise web.HTTPError(400, str(exc)) from exc
        engine = self.pages.store.engine
        state = SagaState(query.state) if query.state else None
        facet = Filter(name=query.name, search=query.search)  # the counts ignore the state
        counts: Mapping[str, int] = await self.blocking(count_by_state, engine, facet)
        counted, everything = total(counts)
        if query.state:
            counted = min(counts.get(query.state, 0), COUNT_CAP)
        paging = Paging.of(query.page, query.per_page, counted)
        where = Filter(state=state, name=query.name, search=query.search)
        records = await self.blocking(page, engine, where, paging.offset, paging.per_page)
        self.render_page(
            "sagas.html",
            records=records,
            counts={s.value: shown(counts.get(s.value, 0)) for s in SagaState},
            everything=everything,
            listed=shown(counts.get(query.state, 0)) if query.state else everything,
            states=[s.value for s in SagaState],
            names=sorted({*self.pages.sagas, *([query.name] if query.name else [])}),
            query=query,
            paging=paging,
            list_url=lambda **changes: query.url(self.sagas_url(), **changes),
            settled=SETTLED_STATES,
            now=datetime.now(UTC),
            refresh=query.refresh,
        )


class SagaView(_SagaHandler):
    @web.authenticated
    async def get(self, ref: str) -> None:
        pages = self.pages
        found = await self.blocking(sagas_by_ref, pages.store.engine, ref, None)
        if len(found) > 1:  # a business key shared by sagas of several types: list them
            self.redirect(ListQuery(search=ref).url(self.sagas_url()))
            return
        saga_id = found[0].saga_id if found else ref
        detail = await self.blocking(
            read_detail,
            pages.store,
            saga_id,
            pages.redact_fields,
            pages.sagas,
            pages.choreographies,
        )
        if detail is None:
            raise web.HTTPError(404, f"no saga with id or business key {ref!r}")
        tasks = saga_tasks(self.application.events, detail.record.saga_id, pages.sagas)
        refresh = self.get_argument("refresh", "0", escape=False)
        self.render_page(
            "saga.html",
            d=detail,
            r=detail.record,
            tasks=tasks,
            step_tasks=step_tasks,
            search=search_term(detail.record.saga_id),
            legend=LEGEND,
            refresh=int(refresh) if refresh.isdigit() and int(refresh) in REFRESH_CHOICES else 0,
        )


def install_pages(flower_app: Flower, pages: SagaPages) -> None:
    """Add the Sagas pages to a Flower app (before its catch-all 404 route)."""
    base = base_path(flower_app.options.url_prefix)
    flower_app.settings["sagas_url"] = base
    flower_app.settings["template_loader"] = _PagesLoader(flower_app.settings["template_path"])
    if not has_auth(flower_app.options):
        logger.warning("celery-sagas: %s", NO_AUTH_WARNING)
    flower_app.add_handlers(
        r".*",
        [
            web.url(rf"{base}/?", SagaListView, {"pages": pages}, name="sagas"),
            web.url(rf"{base}/([^/]+)", SagaView, {"pages": pages}, name="saga"),
        ],
    )


def pages_for(app: Celery) -> SagaPages:
    """The pages of the sagas ``install(app, …)`` wired into ``app``."""
    runtime = getattr(app, "_celery_sagas_runtime", None)
    if runtime is None:
        raise click.UsageError(
            f"{app.main or 'the app'} has no sagas installed: call celery_sagas.install(app, …)"
        )
    return SagaPages(
        runtime.store,
        runtime.sagas,
        runtime.settings.redact_fields,
        frozenset(choreographies(app)),
    )


# --------------------------------------------------------------------------- command


def _celery_context(ctx: click.Context) -> Any:
    """Celery's CLI context (``ctx.obj.app``); the ``sagas`` group replaces ``ctx.obj``."""
    current: click.Context | None = ctx
    while current is not None:
        if hasattr(current.obj, "app"):
            return current.obj
        current = current.parent
    raise click.UsageError("run as `celery -A yourapp sagas flower`")


@click.command(
    "flower",
    cls=CeleryCommand,
    context_settings={"ignore_unknown_options": True},
    help="Start Flower with the Sagas pages (/sagas). Takes Flower's options "
    "(--port=5555 --address=127.0.0.1 …) and its FLOWER_* environment variables; put "
    "credentials in FLOWER_BASIC_AUTH, never on the command line.",
)
@click.argument("flower_argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def flower_command(ctx: click.Context, flower_argv: tuple[str, ...]) -> None:
    celery_ctx = _celery_context(ctx)
    app: Celery = celery_ctx.app
    pages = pages_for(app)
    # Flower's own option handling: FLOWER_* variables, flowerconfig.py, --options.
    flower_cli.apply_env_options()
    flower_cli.apply_options(sys.argv[0], list(flower_argv))
    flower_cli.extract_settings()
    flower_cli.setup_logging()
    flower_app = Flower(capp=app, options=flower_options, **flower_cli.settings)
    install_pages(flower_app, pages)
    atexit.register(flower_app.stop)
    signal.signal(signal.SIGTERM, flower_cli.sigterm_handler)
    port = flower_app.start_http_server()
    if not getattr(celery_ctx, "quiet", False):
        flower_cli.print_banner(app, "ssl_options" in flower_cli.settings, port)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        flower_app.start()

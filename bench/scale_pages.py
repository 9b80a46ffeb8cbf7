"""The Flower Sagas pages served by an in-process Flower (no broker, no worker, no events):
the real handlers, templates and queries, over HTTP on 127.0.0.1, for ``bench/scale.py``."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from celery import Celery
from flower.app import Flower
from flower.urls import settings as flower_settings
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets
from tornado.options import options as flower_options

from celery_sagas.definition import Saga
from celery_sagas.integration.flower import SagaPages, install_pages
from celery_sagas.protocols import SagaStore


class FlowerPages:
    """``with FlowerPages(store, sagas) as pages: pages.get("/sagas")``."""

    def __init__(self, store: SagaStore, sagas: Mapping[str, Saga]) -> None:
        self.pages = SagaPages(store, sagas)  # type: ignore[arg-type]
        self.port = 0
        self._loop: IOLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        loop = IOLoop.current()
        app = Flower(
            capp=Celery(broker="memory://"),
            options=flower_options,
            io_loop=loop,
            **flower_settings,
        )
        install_pages(app, self.pages)
        sockets = bind_sockets(0, "127.0.0.1")
        HTTPServer(app).add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self._loop = loop
        self._ready.set()
        loop.start()

    def __enter__(self) -> FlowerPages:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the in-process Flower did not start")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._loop is not None:
            self._loop.add_callback(self._loop.stop)
        self._thread.join(10)

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
            assert response.status == 200 and b"Sagas" in body, response.status
            return body

"""The pure parts of the Sagas pages: the diagram, the list's query and paging, the
navigation link added to Flower's navbar."""

from __future__ import annotations

from pathlib import Path

import flower
import pytest

from celery_sagas.integration.diagram import Node, phases, render_svg
from celery_sagas.integration.flower import NAV_ITEM, with_sagas_link
from celery_sagas.integration.paging import BadQuery, ListQuery, Paging
from celery_sagas.machine import ErrorKind, StepStatus
from celery_sagas.protocols import StepRecord


def step(index: int, status: StepStatus, kind: ErrorKind | None = None) -> StepRecord:
    return StepRecord(index, f"s{index}", status, error_kind=kind)


@pytest.mark.parametrize(
    ("status", "kind", "action", "compensation"),
    [
        (StepStatus.COMPLETED, None, "completed", "not_needed"),
        (StepStatus.RUNNING, None, "running", "not_needed"),
        (StepStatus.PENDING, None, "pending", "not_needed"),
        (StepStatus.SKIPPED, None, "skipped", "not_needed"),
        (StepStatus.FAILED, ErrorKind.BUSINESS, "failed", "not_needed"),
        (StepStatus.TIMED_OUT, ErrorKind.TIMEOUT, "timed_out", "not_needed"),
        (StepStatus.COMPENSATED, None, "completed", "compensated"),
        (StepStatus.COMPENSATED, ErrorKind.TIMEOUT, "timed_out", "compensated"),
        (StepStatus.COMPENSATED, ErrorKind.ERROR, "failed", "compensated"),
        (StepStatus.COMPENSATING, None, "completed", "compensating"),
        (StepStatus.COMPENSATION_FAILED, None, "completed", "dead_lettered"),
    ],
)
def test_each_step_is_coloured_by_what_it_did(
    status: StepStatus, kind: ErrorKind | None, action: str, compensation: str
) -> None:
    (node,) = phases([step(0, status, kind)])
    assert (node.action, node.compensation) == (action, compensation)


def test_the_svg_has_every_step_and_compensation_in_order_and_escapes_names() -> None:
    nodes = [
        Node(0, "reserve", "completed", "compensated"),
        Node(1, "<b>&", "failed", "not_needed"),
    ]
    svg = render_svg(nodes, ["release", "undo<script>"])
    assert svg.startswith('<svg id="saga-diagram"') and svg.endswith("</svg>")
    assert "<b>" not in svg and "<script>" not in svg and "&lt;b&gt;&amp;" in svg
    assert svg.index('data-step="reserve" data-role="action" data-status="completed"') < svg.index(
        'data-step="&lt;b&gt;&amp;" data-role="action" data-status="failed"'
    )
    assert 'data-role="compensation" data-status="compensated"' in svg
    assert svg.count('class="forward"') == svg.count('class="backward"') == 1


def test_paging_clamps_and_counts() -> None:
    paging = Paging.of(page=9, per_page=10, total=25)
    assert (paging.page, paging.pages, paging.offset) == (3, 3, 20)
    assert (paging.first_shown, paging.last_shown) == (21, 25)
    empty = Paging.of(page=1, per_page=10, total=0)
    assert (empty.pages, empty.first_shown, empty.last_shown) == (1, 0, 0)


def query(**raw: str) -> ListQuery:
    return ListQuery.parse(lambda name: raw.get(name, ""))


def test_the_list_query_keeps_everything_but_what_changes() -> None:
    q = query(state="failed", q="T-1", limit="20", refresh="5", page="2")
    assert (q.state, q.search, q.per_page, q.refresh, q.page) == ("FAILED", "T-1", 20, 5, 2)
    assert q.url("/sagas", page=3) == "/sagas?state=FAILED&q=T-1&page=3&limit=20&refresh=5"
    assert q.url("/sagas", state=None, page=1) == "/sagas?q=T-1&limit=20&refresh=5"
    assert query().url("/sagas") == "/sagas"


@pytest.mark.parametrize(
    "raw",
    [{"state": "BOGUS"}, {"limit": "0"}, {"limit": "x"}, {"page": "0"}, {"refresh": "7"}],
)
def test_bad_query_values_are_refused(raw: dict[str, str]) -> None:
    with pytest.raises(BadQuery):
        query(**raw)


def test_the_sagas_link_goes_into_flowers_own_navbar() -> None:
    navbar = (Path(flower.__file__).parent / "templates" / "navbar.html").read_text()
    patched = with_sagas_link(navbar)
    assert patched.count('id="nav-sagas"') == 1
    first_list = patched[patched.index('<ul class="app-nav navbar-nav">') :]
    assert first_list.index('id="nav-sagas"') < first_list.index("</ul>")
    assert patched.replace(NAV_ITEM + "\n      ", "") == navbar
    assert with_sagas_link("<nav>something else</nav>") == "<nav>something else</nav>"

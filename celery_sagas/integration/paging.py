"""The Sagas list's query string as values: filters, page, page size, auto-refresh (pure).

``ListQuery.parse`` validates what the browser sent (a bad value is the caller's 400);
``Paging`` does the page arithmetic; ``ListQuery.url`` builds the link to another page or
filter keeping everything else, so paging never loses the search or the refresh choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

from celery_sagas.machine import SagaState

PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000
REFRESH_CHOICES = (0, 5, 30)  # seconds; 0 = off


class BadQuery(ValueError):
    """A query parameter the page cannot use (the handler answers 400)."""


@dataclass(frozen=True)
class Paging:
    page: int  # 1-based, clamped to the last page
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    @property
    def first_shown(self) -> int:
        return min(self.offset + 1, self.total)

    @property
    def last_shown(self) -> int:
        return min(self.offset + self.per_page, self.total)

    @classmethod
    def of(cls, page: int, per_page: int, total: int) -> Paging:
        pages = max(1, -(-total // per_page))
        return cls(min(max(page, 1), pages), per_page, total)


def _int(raw: str, name: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise BadQuery(f"{name} must be between {low} and {high}")
    return value


@dataclass(frozen=True)
class ListQuery:
    state: str | None = None
    name: str | None = None
    search: str | None = None
    page: int = 1
    per_page: int = PAGE_SIZE
    refresh: int = 0

    @classmethod
    def parse(cls, arg: Callable[[str], str]) -> ListQuery:
        """From ``arg(name) -> raw value or ""`` (the handler's ``get_argument``)."""
        state = arg("state").strip().upper() or None
        if state is not None and state not in SagaState.__members__:
            raise BadQuery(f"unknown state {state!r}")
        refresh = _int(arg("refresh") or "0", "refresh", 0, max(REFRESH_CHOICES))
        if refresh not in REFRESH_CHOICES:
            raise BadQuery(f"refresh must be one of {REFRESH_CHOICES}")
        return cls(
            state=state,
            name=arg("name").strip() or None,
            search=arg("q").strip() or None,
            page=_int(arg("page") or "1", "page", 1, 10**9),
            per_page=_int(arg("limit") or str(PAGE_SIZE), "limit", 1, MAX_PAGE_SIZE),
            refresh=refresh,
        )

    def params(self) -> dict[str, Any]:
        """The non-default parameters, in a stable order."""
        values: Mapping[str, Any] = {
            "state": self.state,
            "name": self.name,
            "q": self.search,
            "page": self.page if self.page != 1 else None,
            "limit": self.per_page if self.per_page != PAGE_SIZE else None,
            "refresh": self.refresh or None,
        }
        return {k: v for k, v in values.items() if v is not None}

    def url(self, base: str, **changes: Any) -> str:
        changed = replace(self, **changes)
        query = urlencode(changed.params())
        return f"{base}?{query}" if query else base

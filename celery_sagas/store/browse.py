"""Read-side queries for operators (the CLI and the Flower pages), and what a database
error means in words an operator can act on.

``Filter`` selects sagas (state, type, search text, stuck); :func:`page` and
:func:`count_by_state` answer the same filter, so the counts above a list always describe
that list. :func:`sagas_by_ref` finds every saga a reference can mean (an id, or a business
key shared by sagas of different types). :func:`explain` turns a SQLAlchemy/DBAPI error
(anywhere in an exception's cause chain) into a ``SagaError`` with a stable code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, or_, select, true
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from celery_sagas.errors import (
    DatabaseMissingError,
    DatabaseUrlError,
    SagaError,
    SchemaMissingError,
    StoreUnavailableError,
)
from celery_sagas.machine import SagaState
from celery_sagas.protocols import SagaRecord
from celery_sagas.settings import redact_url
from celery_sagas.store.drivers import PSYCOPG, PSYCOPG2, URLS, sqlstate
from celery_sagas.store.records import _saga_record
from celery_sagas.store.tables import sagas

SUPPORTED_DIALECTS = ("postgresql", "sqlite")
MIGRATE_HINT = "run `celery-sagas migrate` (or `celery -A yourapp sagas migrate`)"
UNDEFINED_TABLE, INVALID_CATALOG = "42P01", "3D000"  # PostgreSQL SQLSTATEs


def check_database_url(url: str) -> None:
    """Refuse a URL SQLAlchemy cannot parse, whose database is not PostgreSQL/SQLite, or
    whose PostgreSQL driver is neither psycopg2 nor psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(
            f"not a database URL: {redact_url(url)!r}; expected "
            "postgresql+psycopg2://user:password@host/db (or postgresql+psycopg:// for "
            "psycopg 3) or sqlite:///path"
        ) from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise DatabaseUrlError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact_url(url)}: "
            f"celery-sagas stores sagas in PostgreSQL ({URLS}) or SQLite"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() not in (
        PSYCOPG2,
        PSYCOPG,
    ):
        raise DatabaseUrlError(
            f"unsupported PostgreSQL driver {parsed.get_driver_name()!r} in "
            f"{redact_url(url)}: use {URLS}"
        )


def _database_error(exc: BaseException) -> DBAPIError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DBAPIError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def explain(exc: BaseException, url: str | None = None) -> SagaError | None:
    """The operator's view of a database error found in ``exc``'s cause chain (None: none)."""
    found = _database_error(exc)
    if found is None:
        return None
    where = f" ({redact_url(url)})" if url else ""
    code = sqlstate(found.orig)
    text = str(found.orig).strip().splitlines()[0] if str(found.orig).strip() else ""
    if code == UNDEFINED_TABLE or "no such table" in text:
        return SchemaMissingError(f"the database has no saga tables{where}; {MIGRATE_HINT}")
    if code == INVALID_CATALOG or ("database" in text and "does not exist" in text):
        return DatabaseMissingError(
            f"{text}{where}; create it (createdb) then {MIGRATE_HINT.removeprefix('run ')}"
        )
    if isinstance(exc, SagaError):
        return exc
    return StoreUnavailableError(f"cannot reach the saga database{where}: {text}")


@dataclass(frozen=True)
class Filter:
    """Which sagas: all the given conditions hold. ``search`` matches a saga id (or its
    prefix) or a business key (exactly, or as a prefix)."""

    state: SagaState | None = None
    name: str | None = None
    search: str | None = None
    created_before: datetime | None = None
    unfinished: bool = False
    # only sagas started with a definition not among these (installed) fingerprints
    unknown_to: frozenset[str] | None = None

    def where(self) -> ColumnElement[bool]:
        conditions: list[ColumnElement[bool]] = [true()]
        if self.state is not None:
            conditions.append(sagas.c.state == self.state.value)
        if self.name:
            conditions.append(sagas.c.name == self.name)
        if self.search:
            prefix = _like_prefix(self.search.strip())
            conditions.append(
                or_(
                    sagas.c.id.like(prefix, escape="\\"),
                    sagas.c.business_key.like(prefix, escape="\\"),
                )
            )
        if self.created_before is not None:
            conditions.append(sagas.c.created_at < self.created_before)
        if self.unfinished:
            conditions.append(sagas.c.finished_at.is_(None))
        if self.unknown_to is not None:
            conditions.append(sagas.c.definition.is_not(None))
            conditions.append(sagas.c.definition.not_in(sorted(self.unknown_to)))
        return and_(*conditions)


def _like_prefix(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def page(engine: Engine, where: Filter, offset: int = 0, limit: int = 50) -> tuple[SagaRecord, ...]:
    """Sagas matching ``where``, newest first, ``limit`` of them from ``offset``."""
    query = (
        select(sagas)
        .where(where.where())
        .order_by(sagas.c.created_at.desc(), sagas.c.id)
        .offset(offset)
        .limit(limit)
    )
    with engine.connect() as conn:
        return tuple(_saga_record(r) for r in conn.execute(query).all())


# COMPLETED and FAILED sagas are counted up to this many per state (then "10000+"), so
# a count costs the same with a thousand finished sagas or a million
COUNT_CAP = 10_000
FINISHED_STATES = (SagaState.COMPLETED.value, SagaState.FAILED.value)


def count_by_state(
    engine: Engine, where: Filter = Filter(), cap: int | None = COUNT_CAP
) -> Mapping[str, int]:
    """How many sagas matching ``where`` are in each state. Sagas not finished (moving, or
    waiting in the DLQ) are counted exactly, through the partial index of unfinished
    sagas; COMPLETED and FAILED (always finished) up to ``cap`` + 1 each, an index walk
    that stops there
    (a count above ``cap`` means "more than ``cap``"; ``None``: exact, a full count)."""
    if cap is None:
        query = select(sagas.c.state, func.count()).where(where.where()).group_by(sagas.c.state)
        with engine.connect() as conn:
            return {state: int(count) for state, count in conn.execute(query).all()}
    unfinished = (
        select(sagas.c.state, func.count())
        .where(where.where(), sagas.c.finished_at.is_(None))
        .group_by(sagas.c.state)
    )
    with engine.connect() as conn:
        counts = {state: int(count) for state, count in conn.execute(unfinished).all()}
        for state in FINISHED_STATES:
            capped = (  # ordered by the indexed state: an index-only walk of ix_saga_state
                select(sagas.c.state)
                .where(where.where(), sagas.c.state == state)
                .order_by(sagas.c.state)
                .limit(cap + 1)
                .subquery()
            )
            found = int(conn.execute(select(func.count()).select_from(capped)).scalar_one())
            if found:
                counts[state] = counts.get(state, 0) + found
    return counts


def shown(count: int, cap: int | None = COUNT_CAP) -> str:
    """A count as ``count_by_state`` gives it, for people: ``10000+`` above the cap."""
    return f"{cap}+" if cap is not None and count > cap else str(count)


def total(counts: Mapping[str, int], cap: int | None = COUNT_CAP) -> tuple[int, str]:
    """The sum of capped counts (a lower bound if any was capped) and how to show it."""
    capped = cap is not None and any(c > cap for c in counts.values())
    known = sum(min(c, cap) if cap is not None else c for c in counts.values())
    return known, f"{known}+" if capped else str(known)


def with_business_key(ref: str) -> ColumnElement[bool]:
    """Sagas whose business key is ``ref``, found through the ``(name, business_key)``
    unique index: one probe per saga type, the types found by a skip scan of that index
    (a recursive walk from one name to the next), since a condition on the business key
    alone would read the whole table."""
    names = select(func.min(sagas.c.name).label("name")).cte("saga_names", recursive=True)
    following = select(func.min(sagas.c.name)).where(sagas.c.name > names.c.name)
    names = names.union_all(select(following.scalar_subquery()).where(names.c.name.is_not(None)))
    known = select(names.c.name).where(names.c.name.is_not(None))
    return and_(sagas.c.business_key == ref, sagas.c.name.in_(known))


def sagas_by_ref(engine: Engine, ref: str, name: str | None = None) -> tuple[SagaRecord, ...]:
    """Every saga ``ref`` can mean: the saga with that id, else the sagas with that business
    key (of type ``name`` if given), newest first. Steps are not loaded."""
    by_id: Any = sagas.c.id == ref
    by_key: Any = with_business_key(ref)
    if name:
        by_id, by_key = and_(by_id, sagas.c.name == name), and_(by_key, sagas.c.name == name)
    with engine.connect() as conn:
        rows = conn.execute(select(sagas).where(by_id)).all()
        if not rows:
            query = select(sagas).where(by_key).order_by(sagas.c.created_at.desc())
            rows = conn.execute(query).all()
    return tuple(_saga_record(r) for r in rows)

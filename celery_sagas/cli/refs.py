"""A saga reference on the command line: a saga id, or a business key (with ``--name``
when sagas of several types share it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from celery_sagas.errors import AmbiguousReferenceError, SagaNotFoundError
from celery_sagas.protocols import SagaRecord
from celery_sagas.store.browse import sagas_by_ref

name_option = click.option(
    "--name",
    default=None,
    help="The saga type, when a business key is used by sagas of several types.",
)


def candidates_text(found: Sequence[SagaRecord]) -> str:
    return "; ".join(f"{r.name} {r.saga_id} ({r.state.value})" for r in found)


def pick(ref: str, name: str | None, found: Sequence[SagaRecord]) -> SagaRecord:
    """The one saga of ``found`` (pure): not found and ambiguous are errors that say what to
    do next."""
    if not found:
        of = f" of type {name!r}" if name else ""
        raise SagaNotFoundError(
            f"no saga{of} with id or business key {ref!r}; `celery-sagas list` shows the sagas"
        )
    if len(found) > 1:
        raise AmbiguousReferenceError(
            f"business key {ref!r} is used by {len(found)} sagas: {candidates_text(found)}; "
            "pass --name TYPE or the saga id",
            candidates=tuple(r.saga_id for r in found),
        )
    return found[0]


def resolve(store: Any, ref: str, name: str | None) -> SagaRecord:
    chosen = pick(ref, name, sagas_by_ref(store.engine, ref, name))
    record: SagaRecord | None = store.load(chosen.saga_id)
    return pick(ref, name, [record] if record is not None else [])

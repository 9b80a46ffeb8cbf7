"""A ``row_filters`` filter as SQL: the WHERE conditions of the rows it takes."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, Table, false, true

from celery_sagas.row_filters import Filter, Op

_CONSTANTS: dict[bool | None, Any] = {None: None, True: true(), False: false()}

_SQL: dict[Op, Callable[[Any, Any], ColumnElement[bool]]] = {
    "is": lambda column, value: column.is_(_CONSTANTS[value]),
    "is not": lambda column, value: column.is_not(_CONSTANTS[value]),
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    "in": lambda column, values: column.in_(values),
}


def where(table: Table, conditions: Filter) -> list[ColumnElement[bool]]:
    """One clause per condition on ``table``'s columns, in order (for ``.where(*…)``)."""
    return [_SQL[c.op](table.c[c.column], c.value) for c in conditions]

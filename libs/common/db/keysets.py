"""Sets of rows passed to one statement as a single parameter, so a batch of keys (or of
new values) costs one fixed-shape statement whatever its size.

PostgreSQL gets one array per column (`unnest($1::varchar[], $2::varchar[]) AS k(a, b)`),
SQLite one JSON array of rows (`json_each(?)`). Unlike `tuple_(...).in_(keys)`, the SQL
text never depends on how many keys there are, so it is compiled once and prepared once,
and PostgreSQL plans one join instead of one probe per executed row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import ColumnElement, bindparam, column, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import ColumnClause
from sqlalchemy.sql.selectable import FromClause
from sqlalchemy.types import TypeEngine

Columns = Sequence[tuple[str, TypeEngine[Any]]]


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # The text SQLAlchemy's SQLite DATETIME stores: naive UTC with microseconds.
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    return value


def rows_of(
    conn: AsyncConnection, name: str, columns: Columns, rows: Sequence[Sequence[Any]]
) -> FromClause:
    """A derived table `name` with `columns`, holding `rows` (tuples in column order)."""
    if conn.dialect.name == "postgresql":
        arrays = [
            bindparam(f"{name}_{col}", [r[i] for r in rows], type_=ARRAY(type_))
            for i, (col, type_) in enumerate(columns)
        ]
        return (
            func.unnest(*arrays)
            .table_valued(*(column(col, type_) for col, type_ in columns))
            .render_derived(name=name)
        )
    encoded = orjson.dumps([[_sqlite_value(v) for v in r] for r in rows]).decode()
    each = func.json_each(bindparam(f"{name}_json", encoded)).table_valued("value")
    picked: list[ColumnElement[Any]] = []
    for i, (col, type_) in enumerate(columns):
        picked.append(func.json_extract(each.c.value, f"$[{i}]", type_=type_).label(col))
    return select(*picked).subquery(name)


def in_rows(
    conn: AsyncConnection,
    name: str,
    targets: Sequence[ColumnClause[Any] | ColumnElement[Any]],
    columns: Columns,
    rows: Sequence[Sequence[Any]],
) -> ColumnElement[bool]:
    """`(targets…) IN (SELECT … FROM rows)`: a fixed-shape filter for DELETE and friends."""
    keys = rows_of(conn, name, columns, rows)
    return tuple_(*targets).in_(select(*(keys.c[col] for col, _ in columns)))


@asynccontextmanager
async def planned_per_execution(conn: AsyncConnection) -> AsyncIterator[None]:
    """Within the block, PostgreSQL plans each statement for its actual parameters.

    A prepared statement otherwise switches to a generic plan after five executions, and
    one made while the tables were small (a fresh database, before autovacuum analysed
    them) joins a key set by scanning the whole table for every key, and keeps doing so
    until the next ANALYZE. Planning these few set-based statements each time costs far
    less than one such scan. Executemany INSERTs stay outside: they run once per row and
    their plans do not depend on table size.
    """
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
    yield
    if postgres:
        # Not in a `finally`: after an error the transaction is rolled back (and the
        # setting with it); a statement there would only hide the error.
        await conn.execute(text("SET LOCAL plan_cache_mode = auto"))

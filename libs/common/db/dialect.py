"""The few statements that differ between PostgreSQL and SQLite, in one place."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Table, cast, extract, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.selectable import Select


def _insert(conn: AsyncConnection, table: Table, source: Select[Any] | None = None) -> Any:
    stmt = postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)
    if source is not None:
        # INSERT … SELECT: the select's columns, by name, in order.
        stmt = stmt.from_select([c.name for c in source.selected_columns], source)
    return stmt


def insert_ignore(conn: AsyncConnection, table: Table, source: Select[Any] | None = None) -> Insert:
    """INSERT … ON CONFLICT DO NOTHING for the connection's dialect (of `source`'s rows,
    e.g. `insert_select(rows_of(…))`, when given)."""
    stmt: Insert = _insert(conn, table, source).on_conflict_do_nothing()
    return stmt


def upsert(
    conn: AsyncConnection,
    table: Table,
    conflict: Sequence[str],
    update: Sequence[str],
    *,
    merge: Callable[[Any], Mapping[str, Any]] | None = None,
    source: Select[Any] | None = None,
) -> Insert:
    """INSERT … ON CONFLICT (conflict) DO UPDATE SET col = excluded.col for `update`.

    `merge(excluded)` may return further SET expressions that combine the stored row
    with the incoming one (`table.c.x` is the stored value, `excluded.x` the new one).
    With `source` the rows come from that select (one statement for a whole batch).
    """
    stmt = _insert(conn, table, source)
    set_: dict[str, Any] = {name: stmt.excluded[name] for name in update}
    if merge is not None:
        set_.update(merge(stmt.excluded))
    result: Insert = stmt.on_conflict_do_update(index_elements=list(conflict), set_=set_)
    return result


def is_postgres(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"


def microseconds_between(
    conn: AsyncConnection, later: ColumnElement[Any], earlier: ColumnElement[Any]
) -> ColumnElement[int]:
    """`later - earlier` in whole microseconds, exactly, as an integer SQL expression of two
    `UtcDateTime` values (NULL if either is): PostgreSQL subtracts the timestamps; SQLite
    reads the fixed text it stores them in ('YYYY-MM-DD HH:MM:SS.ffffff', see
    `types.sqlite_utc_text`), whole seconds through `strftime('%s')` plus the digits after
    the point, so no floating point (`julianday`) rounds the difference."""
    if is_postgres(conn):
        return cast(extract("epoch", later - earlier) * 1_000_000, BigInteger)

    def micros(value: ColumnElement[Any]) -> ColumnElement[int]:
        seconds = cast(func.strftime("%s", value), BigInteger)
        return seconds * 1_000_000 + cast(func.substr(value, 21, 6), BigInteger)

    return micros(later) - micros(earlier)

"""The few statements that differ between PostgreSQL and SQLite, in one place."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert


def _insert(conn: AsyncConnection, table: Table) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_ignore(conn: AsyncConnection, table: Table) -> Insert:
    """INSERT … ON CONFLICT DO NOTHING for the connection's dialect."""
    stmt: Insert = _insert(conn, table).on_conflict_do_nothing()
    return stmt


def upsert(
    conn: AsyncConnection,
    table: Table,
    conflict: Sequence[str],
    update: Sequence[str],
    *,
    merge: Callable[[Any], Mapping[str, Any]] | None = None,
) -> Insert:
    """INSERT … ON CONFLICT (conflict) DO UPDATE SET col = excluded.col for `update`.

    `merge(excluded)` may return further SET expressions that combine the stored row
    with the incoming one (`table.c.x` is the stored value, `excluded.x` the new one).
    """
    stmt = _insert(conn, table)
    set_: dict[str, Any] = {name: stmt.excluded[name] for name in update}
    if merge is not None:
        set_.update(merge(stmt.excluded))
    result: Insert = stmt.on_conflict_do_update(index_elements=list(conflict), set_=set_)
    return result


def is_postgres(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"

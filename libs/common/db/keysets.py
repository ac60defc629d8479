"""Sets of rows passed to one statement as a single parameter, so a batch of keys (or of
new values) costs one fixed-shape statement whatever its size.

PostgreSQL gets one array per column (`unnest($1::varchar[], $2::varchar[]) AS k(a, b)`),
SQLite one JSON array of rows (`json_each(?)`). Unlike `tuple_(...).in_(keys)`, the SQL
text never depends on how many keys there are, so it is compiled once and prepared once,
and PostgreSQL plans one join instead of one probe per executed row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    ColumnElement,
    LargeBinary,
    String,
    Table,
    bindparam,
    cast,
    column,
    func,
    select,
    text,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import ColumnClause
from sqlalchemy.sql.selectable import FromClause, Select
from sqlalchemy.types import TypeEngine

from libs.common.db.types import sqlite_utc_text

Columns = Sequence[tuple[str, TypeEngine[Any]]]
_T = TypeVar("_T")


_TEXTS: dict[datetime, str] = {}
"""Recent datetimes as SQLite text: a batch's rows share a few instants (the unit of
work's `now`), formatted once each."""


def _sqlite_default(value: Any) -> Any:
    """What orjson cannot (or, for datetimes, must not) encode itself."""
    if isinstance(value, datetime):
        text = _TEXTS.get(value)
        if text is None:
            if len(_TEXTS) >= 4096:
                _TEXTS.clear()
            text = _TEXTS[value] = sqlite_utc_text(value)
        return text
    if isinstance(value, bytes):
        # JSON has no bytes: UTF-8 text, cast back to a BLOB (see `rows_of`).
        return value.decode()
    raise TypeError(f"cannot pass {type(value).__name__} in a JSON row")


def rows_of(
    conn: AsyncConnection,
    name: str,
    columns: Columns,
    rows: Sequence[Sequence[Any]] | None,
    *,
    ordinality: str | None = None,
) -> FromClause:
    """A derived table `name` with `columns`, holding `rows` (tuples in column order),
    plus, with `ordinality`, a column of that name numbering them in order.

    With `rows=None` the values are given when executing, as `rows_params(…)`: a
    statement built once is then reused as is (no rebuilding, no new cache key).
    On SQLite, bytes values must be UTF-8 (they travel as JSON text).
    """
    params = None if rows is None else rows_params(conn, name, columns, rows)

    def param(key: str, type_: TypeEngine[Any]) -> Any:
        if params is None:
            return bindparam(key, type_=type_)
        return bindparam(key, params[key], type_=type_)

    if conn.dialect.name == "postgresql":
        arrays = [param(f"{name}_{col}", ARRAY(type_)) for col, type_ in columns]
        return (
            func.unnest(*arrays)
            .table_valued(
                *(column(col, type_) for col, type_ in columns), with_ordinality=ordinality
            )
            .render_derived(name=name)
        )
    each = func.json_each(param(f"{name}_json", String())).table_valued("value", "key")
    picked: list[ColumnElement[Any]] = []
    for i, (col, type_) in enumerate(columns):
        value: ColumnElement[Any] = func.json_extract(each.c.value, f"$[{i}]", type_=type_)
        if isinstance(type_, LargeBinary):
            value = cast(value, type_)
        picked.append(value.label(col))
    if ordinality is not None:
        picked.append(each.c.key.label(ordinality))
    return select(*picked).subquery(name)


def rows_params(
    conn: AsyncConnection, name: str, columns: Columns, rows: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """The execution parameters of `rows_of(conn, name, columns, None)` holding `rows`."""
    if conn.dialect.name == "postgresql":
        return {f"{name}_{col}": [r[i] for r in rows] for i, (col, _) in enumerate(columns)}
    encoded = orjson.dumps(
        rows if isinstance(rows, list | tuple) else list(rows),
        default=_sqlite_default,
        option=orjson.OPT_PASSTHROUGH_DATETIME,
    ).decode()
    return {f"{name}_json": encoded}


def insert_select(
    conn: AsyncConnection,
    table: Table,
    names: Sequence[str],
    rows: Sequence[Sequence[Any]] | None,
    *,
    ordered: bool = False,
) -> Select[Any]:
    """`SELECT names… FROM rows_of(…) WHERE true`, the source of a one-statement INSERT of
    `rows` (tuples in `names` order) into `table`: pass it to `insert_ignore`/`upsert`
    (`source=`) or to `insert(table).from_select`. With `ordered`, rows come out in the
    given order (so generated ids follow it). With `rows=None`, pass
    `rows_params(conn, "new", columns_of(table, names), rows)` when executing. The
    `WHERE` lets SQLite parse a following `ON CONFLICT` (otherwise taken for a join's
    `ON`)."""
    new = rows_of(
        conn,
        "new",
        columns_of(table, names),
        rows,
        ordinality="n" if ordered else None,
    )
    source = select(*(new.c[n] for n in names)).where(true())
    return source.order_by(new.c.n) if ordered else source


def columns_of(table: Table, names: Sequence[str]) -> Columns:
    """`names` with their types in `table`, for `rows_of` and `rows_params`."""
    return [(n, table.c[n].type) for n in names]


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


def reused(conn: AsyncConnection, key: str, build: Callable[[], _T]) -> _T:
    """The statement `build()` makes for this connection's dialect, built once per process
    and reused: for statements whose values all come as parameters (`rows=None`). A
    reused statement also keeps SQLAlchemy's cache key, which is otherwise recomputed
    by walking the whole statement on every execution."""
    cache_key = (conn.dialect.name, key)
    stmt: _T | None = _REUSED.get(cache_key)
    if stmt is None:
        stmt = _REUSED[cache_key] = build()
    return stmt


_REUSED: dict[tuple[str, str], Any] = {}


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


def by_shop(
    table: Any, key: str, keys: Iterable[tuple[str, str]], chunk: int = 500
) -> Iterator[Any]:
    """WHERE clauses selecting `(shop_id, key)` pairs: one shop and up to `chunk` keys
    each (`shop_id = ? AND key IN (…)`, bound parameters, so the statement is cached; a
    row-value IN would be rendered literally, and compiled anew, on SQLite)."""
    grouped: dict[str, list[str]] = {}
    for shop, value in sorted(set(keys)):
        grouped.setdefault(shop, []).append(value)
    for shop, values in grouped.items():
        for start in range(0, len(values), chunk):
            yield (table.c.shop_id == shop) & table.c[key].in_(values[start : start + chunk])

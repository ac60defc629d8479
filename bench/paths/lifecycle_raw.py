"""The raw limit under lifecycle: its database writing the same rows, in batches of the
consumer's batch size, one transaction per batch, with no logic at all.

The rows per batch of events: one `processed_events` row per event; one `orders` row per
distinct order and one `customers` and one `timers` row per distinct customer of the
batch (upserts, every column set); and as many `outbox`, `stage_history` and
`customer_identities` rows as lifecycle itself wrote in the same run (counted after it),
spread evenly over the batches. Values are computed beforehand; columns are read from the
migrated schema, so the writer follows the schema as it changes.

PostgreSQL: the best of `executemany`, `INSERT … SELECT FROM unnest(…)` and `COPY` (into a
temporary table, then `INSERT … SELECT … ON CONFLICT` for upserts). SQLite: executemany
with the same pragmas Huitou uses (WAL, synchronous=FULL).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import inspect

from bench import infra
from bench.core import Stack
from libs.common.db import Database
from libs.common.db.migrations import migrate
from libs.common.settings import Settings
from services.lifecycle import migrations

SCHEMA = "lifecycle"
COUNTED_TABLES = [
    "processed_events",
    "customers",
    "orders",
    "timers",
    "outbox",
    "stage_history",
    "customer_identities",
]
SPREAD_TABLES = ("outbox", "stage_history", "customer_identities")
FIXED = {
    "consumer": "lifecycle",
    "status": "paid",
    "currency": "CNY",
    "stage": "active",
    "payload": "{}",
    "headers": "{}",
    "topic": "huitou.customers.v1",
}
FIXED_BY_TABLE = {
    "timers": {"kind": "lifecycle.restage"},
    "customer_identities": {"kind": "phone"},
}


@dataclass
class Column:
    name: str
    python_type: type
    length: int | None = None
    udt: str = ""


@dataclass
class Table:
    name: str
    columns: list[Column]
    key: list[str]
    upsert: bool
    rows: list[list[tuple[Any, ...]]] = field(default_factory=list)
    """Rows per batch, in `columns` order."""

    def insert_sql(self, values: str, placeholder_style: str = "pg") -> str:
        names = ", ".join(f'"{c.name}"' for c in self.columns)
        sql = f'INSERT INTO "{self.name}" ({names}) {values}'
        if self.name == "processed_events":
            return sql + " ON CONFLICT DO NOTHING"
        if self.upsert:
            keys = ", ".join(f'"{k}"' for k in self.key)
            sets = ", ".join(
                f'"{c.name}" = excluded."{c.name}"' for c in self.columns if c.name not in self.key
            )
            return sql + f" ON CONFLICT ({keys}) DO UPDATE SET {sets}"
        return sql


def _python_type(sa_type: Any) -> type:
    try:
        return sa_type.python_type  # type: ignore[no-any-return]
    except NotImplementedError:
        return str


async def _schema(url: str) -> dict[str, Table]:
    """Migrate a fresh database with lifecycle's migrations; read the tables' columns."""
    db = Database(url, SCHEMA)
    try:
        await migrate(db, migrations)

        def read(sync_conn: Any) -> dict[str, Table]:
            inspector = inspect(sync_conn)
            schema = SCHEMA if db.is_postgres else None
            tables = {}
            for name in COUNTED_TABLES:
                if not inspector.has_table(name, schema=schema):
                    continue
                key = inspector.get_pk_constraint(name, schema=schema)["constrained_columns"]
                columns = []
                for col in inspector.get_columns(name, schema=schema):
                    py = _python_type(col["type"])
                    serial = key == [col["name"]] and py is int
                    if not serial:
                        length = getattr(col["type"], "length", None)
                        columns.append(Column(col["name"], py, length))
                serial_key = not any(c.name in key for c in columns)
                tables[name] = Table(name, columns, key, upsert=not serial_key)
            return tables

        async with db.connect() as conn:
            tables = await conn.run_sync(read)
            if db.is_postgres:
                from sqlalchemy import text

                for table in tables.values():
                    udts: dict[str, str] = dict(
                        (
                            await conn.execute(
                                text(
                                    "SELECT column_name, udt_name FROM information_schema.columns"
                                    " WHERE table_schema = :s AND table_name = :t"
                                ),
                                {"s": SCHEMA, "t": table.name},
                            )
                        ).all()
                    )
                    for column in table.columns:
                        column.udt = udts[column.name]
        return tables
    finally:
        await db.dispose()


def _value(table: str, column: Column, now: Any, n: int) -> Any:
    fixed = FIXED_BY_TABLE.get(table, {}).get(column.name, FIXED.get(column.name))
    if fixed is not None:
        return fixed
    if column.python_type is datetime:
        return now
    if column.python_type is bool:
        return False
    if column.python_type is int:
        return n
    if column.python_type is float:
        return float(n)
    if column.python_type is bytes:
        return b"x" * 400
    return f"v{n}"[: column.length or None]


def plan(
    tables: dict[str, Table],
    events: list[dict[str, Any]],
    written: dict[str, int],
    batch_size: int,
    sqlite: bool,
) -> None:
    """Fill each table's rows per batch (see the module docstring)."""
    now: Any = datetime.now(UTC)
    if sqlite:
        now = now.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    batches = [events[i : i + batch_size] for i in range(0, len(events), batch_size)]
    serial = 0
    for table in tables.values():
        table.rows = []
    for b, batch in enumerate(batches):
        entities: dict[str, list[dict[str, Any]]] = {
            "processed_events": [
                {"event_id": f"{e['source']}|{e['id']}", "processed_at": now} for e in batch
            ],
            "orders": list(
                {
                    e["data"]["order_id"]: {
                        "shop_id": e["shop_id"],
                        "order_id": e["data"]["order_id"],
                        "customer_id": e["subject"],
                    }
                    for e in batch
                }.values()
            ),
        }
        customers = list(dict.fromkeys((e["shop_id"], e["subject"]) for e in batch))
        entities["customers"] = [{"shop_id": s, "customer_id": c} for s, c in customers]
        entities["timers"] = [
            {"key": f"restage:{s}:{c}", "shop_id": s, "due_at": now} for s, c in customers
        ]
        for name in SPREAD_TABLES:
            total = written.get(name, 0)
            count = round(total * (b + 1) / len(batches)) - round(total * b / len(batches))
            rows = []
            for _ in range(count):
                serial += 1
                row = {"shop_id": batch[0]["shop_id"]}
                if name == "customer_identities":
                    row["value"] = f"id:{serial}"
                rows.append(row)
            entities[name] = rows
        for name, table in tables.items():
            rows_of_batch = []
            for given in entities.get(name, []):
                serial += 1
                rows_of_batch.append(
                    tuple(
                        given[c.name] if c.name in given else _value(name, c, now, serial)
                        for c in table.columns
                    )
                )
            table.rows.append(rows_of_batch)


def _sqlite_write(path: Path, tables: dict[str, Table], n_events: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        statements = {
            t.name: t.insert_sql("VALUES (" + ", ".join("?" for _ in t.columns) + ")")
            for t in tables.values()
        }
        batches = max(len(t.rows) for t in tables.values())
        started = time.perf_counter()
        for b in range(batches):
            conn.execute("BEGIN IMMEDIATE")
            for table in tables.values():
                if table.rows[b]:
                    conn.executemany(statements[table.name], table.rows[b])
            conn.execute("COMMIT")
        return n_events / (time.perf_counter() - started)
    finally:
        conn.close()


async def _pg_write(url: str, tables: dict[str, Table], n_events: int, method: str) -> float:
    conn = await asyncpg.connect(
        **infra.asyncpg_kwargs(url), server_settings={"search_path": SCHEMA}
    )
    try:
        statements: dict[str, str] = {}
        for t in tables.values():
            if method == "executemany":
                values = "VALUES (" + ", ".join(f"${i + 1}" for i in range(len(t.columns))) + ")"
            elif method == "unnest":
                arrays = ", ".join(f"${i + 1}::{c.udt}[]" for i, c in enumerate(t.columns))
                values = f"SELECT * FROM unnest({arrays})"
            else:
                names = ", ".join(f'"{c.name}"' for c in t.columns)
                values = f'SELECT {names} FROM "stage_{t.name}"'
                await conn.execute(
                    f'CREATE TEMP TABLE "stage_{t.name}" (LIKE "{t.name}" INCLUDING DEFAULTS)'
                    " ON COMMIT DELETE ROWS"
                )
            statements[t.name] = t.insert_sql(values)
        batches = max(len(t.rows) for t in tables.values())
        started = time.perf_counter()
        for b in range(batches):
            async with conn.transaction():
                for table in tables.values():
                    rows = table.rows[b]
                    if not rows:
                        continue
                    if method == "executemany":
                        await conn.executemany(statements[table.name], rows)
                    elif method == "unnest":
                        await conn.execute(
                            statements[table.name], *[list(c) for c in zip(*rows, strict=True)]
                        )
                    elif table.upsert or table.name == "processed_events":
                        await conn.copy_records_to_table(
                            f"stage_{table.name}",
                            records=rows,
                            columns=[c.name for c in table.columns],
                        )
                        await conn.execute(statements[table.name])
                    else:
                        await conn.copy_records_to_table(
                            table.name,
                            records=rows,
                            columns=[c.name for c in table.columns],
                            schema_name=SCHEMA,
                        )
        return n_events / (time.perf_counter() - started)
    finally:
        await conn.close()


async def measure(
    stack: Stack, events: list[dict[str, Any]], written: dict[str, int]
) -> dict[str, float]:
    """Events per second of each method on a fresh, migrated database."""
    batch_size = Settings().consumer_batch_size
    results = {}
    if stack.embedded:
        data = stack.dir("lifecycle-raw")
        url = Settings(data_dir=data).database_url_for("lifecycle")
        tables = await _schema(url)
        plan(tables, events, written, batch_size, sqlite=True)
        path = Path(url.split("///", 1)[1])
        results["executemany"] = await asyncio.to_thread(_sqlite_write, path, tables, len(events))
        return results
    for method in ("executemany", "unnest", "copy"):
        fresh = await stack.database()
        assert fresh is not None
        tables = await _schema(fresh)
        plan(tables, events, written, batch_size, sqlite=False)
        results[method] = await _pg_write(fresh, tables, len(events), method)
        if stack.pg_url:
            await infra.drop_database(stack.pg_url, fresh)
    return results

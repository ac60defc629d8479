"""The one merge rule of each projection, rendered twice from one description.

Events about one order (or one customer) arrive in any order, several per batch, and are
folded into one stored row. A batch first folds its own rows in Python (an upsert cannot
touch one row twice in a statement), then upserts them against the stored row in SQL. Both
foldings come from the same `Merge` below, so they cannot drift apart, and each rule is
commutative and associative: the stored row is the same whatever the arrival order.

Rules, per column or group of columns:
- `Pick`: a group of columns taken together from one event, the one preferred by
  (rank, then time, then value): the newest for descriptive facts (a name, a phone, a
  total), the oldest for ownership (the customer an order first named). An event that
  does not carry the group has its time column None and leaves the group as it was.
- `Earliest` / `Latest`: the minimum / maximum of the known values.
- `Total`: the sum (refunds add up).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, case, or_

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Pick:
    columns: tuple[str, ...]
    at: str
    prefer: Literal["newest", "oldest"]
    rank: str | None = None
    """A column whose higher value wins before time is looked at (identity strength)."""
    tie: str | None = None
    """A column whose smaller value wins at the same rank and time (the event's id), before
    the greater first column does."""

    @property
    def written(self) -> tuple[str, ...]:
        extra = tuple(c for c in (self.rank, self.tie) if c)
        return (*self.columns, self.at, *extra)

    def py(self, old: Row, new: Row) -> dict[str, Any]:
        if new[self.at] is None:
            chosen = old
        elif old[self.at] is None:
            chosen = new
        else:
            chosen = new if self._beats(new, old) else old
        return {name: chosen[name] for name in self.written}

    def _beats(self, new: Row, old: Row) -> bool:
        if self.rank and new[self.rank] != old[self.rank]:
            return bool(new[self.rank] > old[self.rank])
        if new[self.at] != old[self.at]:
            later = new[self.at] > old[self.at]
            return bool(later if self.prefer == "newest" else not later)
        if self.tie:
            x, y = old[self.tie], new[self.tie]
            if x is not None and y is not None and x != y:
                return bool(y < x)
        # Same rank and time: the greater first column, as SQL compares it (NULL never wins).
        a, b = old[self.columns[0]], new[self.columns[0]]
        return a is not None and b is not None and bool(b > a)

    def sql(self, stored: Any, new: Any) -> dict[str, Any]:
        lead = self.columns[0]
        at_wins = (
            new[self.at] > stored[self.at]
            if self.prefer == "newest"
            else (new[self.at] < stored[self.at])
        )
        same_at = new[self.at] == stored[self.at]
        by_value: ColumnElement[bool] = new[lead] > stored[lead]
        if self.tie:
            a, b = stored[self.tie], new[self.tie]
            undecided = or_(a.is_(None), b.is_(None), a == b)
            by_value = or_(b < a, and_(undecided, by_value))
        time_or_value: ColumnElement[bool] = or_(at_wins, and_(same_at, by_value))
        beats = time_or_value
        if self.rank:
            beats = or_(
                new[self.rank] > stored[self.rank],
                and_(new[self.rank] == stored[self.rank], time_or_value),
            )
        return {
            name: case(
                (new[self.at].is_(None), stored[name]),
                (stored[self.at].is_(None), new[name]),
                (beats, new[name]),
                else_=stored[name],
            )
            for name in self.written
        }


@dataclass(frozen=True)
class Earliest:
    column: str

    def py(self, old: Row, new: Row) -> dict[str, Any]:
        a, b = old[self.column], new[self.column]
        return {self.column: b if a is None else a if b is None else min(a, b)}

    def sql(self, stored: Any, new: Any) -> dict[str, Any]:
        a, b = stored[self.column], new[self.column]
        return {self.column: case((a.is_(None), b), (b.is_(None), a), (b < a, b), else_=a)}


@dataclass(frozen=True)
class Latest:
    column: str

    def py(self, old: Row, new: Row) -> dict[str, Any]:
        a, b = old[self.column], new[self.column]
        return {self.column: b if a is None else a if b is None else max(a, b)}

    def sql(self, stored: Any, new: Any) -> dict[str, Any]:
        a, b = stored[self.column], new[self.column]
        return {self.column: case((a.is_(None), b), (b.is_(None), a), (b > a, b), else_=a)}


@dataclass(frozen=True)
class Total:
    column: str

    def py(self, old: Row, new: Row) -> dict[str, Any]:
        return {self.column: old[self.column] + new[self.column]}

    def sql(self, stored: Any, new: Any) -> dict[str, Any]:
        return {self.column: stored[self.column] + new[self.column]}


Rule = Pick | Earliest | Latest | Total


@dataclass(frozen=True)
class Merge:
    """How the rows of one table fold together; columns without a rule keep the stored
    value (keys, and columns re-derived elsewhere)."""

    rules: tuple[Rule, ...]

    def py(self, old: Row, new: Row) -> dict[str, Any]:
        merged = dict(old)
        for rule in self.rules:
            merged.update(rule.py(old, new))
        return merged

    def sql(self, table: Any) -> Any:
        """The `merge` callback of `dialect.upsert`: SET expressions from the stored row
        (`table.c`) and the incoming one (`excluded`)."""

        def merge(excluded: Any) -> dict[str, Any]:
            set_: dict[str, Any] = {}
            for rule in self.rules:
                set_.update(rule.sql(table.c, excluded))
            return set_

        return merge

"""The journey engine: enrollments, and the walk through a journey's steps (waits on
durable timers, branches, sends through the outbox, tags), shared by the consumer path
(`consuming`: enrolls on events, ends enrollments the moment a goal arrives), the timer
path (`firing`: waits that came due) and scheduled broadcasts (`broadcasts`).

One `Run` is one unit of work: a consumed batch (`consuming.apply_events`) or a round of
fired timers (`firing.fire_timers`). It loads what it needs with a few set-based queries, changes
enrollments in memory, and writes everything back at the end (`Run.flush`): enrollments,
timers, sends, `notification.requested` events (outbox), report counters and the re-entry
ledger, in the transaction of the batch. A crash anywhere leaves nothing half done, and a
replayed batch finds its events processed (inbox) and requests no second message.

Lock order, on every path (consumer, timer worker, API): the enrollment's timer row first,
then the enrollment row. A timer being fired is locked by its claim; a consumer about to
end or move waiting enrollments locks their timer rows (`FOR UPDATE`) before re-reading
the enrollments `FOR UPDATE`, so it waits for a fire in progress and then sees what it did;
the fire re-checks the enrollment's status and step inside its own transaction, so a goal
that committed first always wins.

Timing: waits count from the trigger event's time (then from the previous wait's due
time). A wait that an event could cancel (the journey has goals or `wait_for` steps) fires
only once campaigns has handled every partition up to its due time (`watermarks`), at
most `journey_watermark_max_hold_s` late: a payment made at minute 59 and still in the
pipeline cancels the reminder instead of racing it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import orjson
from prometheus_client import Counter
from sqlalchemy import Select, and_, delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.bus.base import Message
from libs.common.db.dialect import insert_ignore, upsert
from libs.common.db.keysets import by_shop, columns_of, insert_select, reused, rows_params
from libs.common.db.tables import shops, timers
from libs.common.events import (
    Envelope,
    TagRequestedData,
    new_event,
    topic_for,
)
from libs.common.outbox import enqueue
from libs.common.timers import Timer, schedule, timer_key
from services.campaigns import projection
from services.campaigns.conditions import evaluate
from services.campaigns.definitions import (
    Cap,
    DateWait,
    Definition,
    Step,
    Window,
    parse_definition,
)
from services.campaigns.models import (
    counters,
    enrollments,
    entries,
    journey_versions,
    journeys,
    sends,
)

log = logging.getLogger(__name__)

TIMER_KINDS = {"transactional": "journey.transactional", "marketing": "journey.marketing"}
"""One timer kind per category: the worker claims them in separate lanes (`TimerWorker.lanes`)."""
LIVE = ("waiting", "held")
MAX_DRY_STEPS = 100
CONSUMER = "campaigns"

ENROLLED = Counter(
    "huitou_campaigns_enrollments_total", "Enrollments started", ["category", "group"]
)
EXITED = Counter("huitou_campaigns_exits_total", "Enrollments ended, by reason", ["reason"])
STEPS = Counter("huitou_campaigns_steps_total", "Journey steps executed", ["action"])
SENDS = Counter("huitou_campaigns_sends_total", "Send steps, by outcome", ["category", "outcome"])
_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once (the hot paths count per step)."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


_REASON_LABELS = 40
"""Exit reasons are operator text; metrics keep a bounded set (`_reason_label`)."""


def requested_event(
    shop: str, customer_id: str, event_id: str, at: datetime, data: dict[str, Any]
) -> bytes:
    """A `notification.requested` envelope as JSON, built directly: the send step is the
    hottest path of the fire, and every field is the engine's own (checked by
    `tests/campaigns/test_engine.py` against the validated `Envelope`)."""
    envelope = {
        "specversion": "1.0",
        "id": event_id,
        "source": f"huitou/campaigns/{shop}",
        "type": "notification.requested",
        "time": at,
        "shop_id": shop,
        "subject": customer_id,
        "schema_version": 1,
        "data": data,
    }
    return orjson.dumps(envelope, option=orjson.OPT_UTC_Z)


@dataclass(eq=False)
class Enrollment:
    shop_id: str
    enrollment_id: str
    journey_id: str
    version: int
    customer_id: str
    order_id: str | None
    status: str
    step_id: str | None
    due_at: datetime | None
    held_out: bool
    context: dict[str, Any]
    entered_at: datetime
    updated_at: datetime
    exit_reason: str | None = None
    converted_at: datetime | None = None
    revenue_minor: int | None = None
    messaged: bool = False
    customer_moved: bool = False
    """A merge gave the enrollment another customer in this unit of work."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.shop_id, self.enrollment_id)

    @property
    def timer(self) -> str:
        return timer_key(self.shop_id, "enr", self.enrollment_id)

    def values(self) -> tuple[Any, ...]:
        """The row's values in `_ROW` order."""
        return tuple(
            orjson.dumps(self.context).decode() if name == "context" else getattr(self, name)
            for name in _ROW
        )


_ROW = (
    "shop_id",
    "enrollment_id",
    "journey_id",
    "version",
    "customer_id",
    "order_id",
    "status",
    "step_id",
    "due_at",
    "held_out",
    "context",
    "entered_at",
    "updated_at",
    "exit_reason",
    "converted_at",
    "revenue_minor",
    "messaged",
)


_PROGRESS = (
    "status",
    "step_id",
    "due_at",
    "context",
    "updated_at",
    "exit_reason",
    "converted_at",
    "revenue_minor",
    "messaged",
)
"""The columns that change as an enrollment moves on (the rest are fixed at entry, but
for the customer, which a merge moves: `Enrollment.customer_moved`)."""


_SEND = (
    "shop_id",
    "idempotency_key",
    "journey_id",
    "version",
    "enrollment_id",
    "customer_id",
    "category",
    "channel",
    "requested_at",
    "status",
    "reason",
)


def select_rows() -> Select[Any]:
    """The enrollment columns `from_row` takes, in `_ROW` order."""
    return select(*(enrollments.c[name] for name in _ROW))


_CONTEXT = _ROW.index("context")


def from_row(row: Sequence[Any]) -> Enrollment:
    """An enrollment from a row of `select_rows()` (positional: the fire path reads
    hundreds per batch)."""
    values = list(row)
    values[_CONTEXT] = orjson.loads(values[_CONTEXT])
    return Enrollment(*values)


@dataclass
class Journey:
    shop_id: str
    journey_id: str
    status: str
    version: int
    """The current version (the one that admits)."""
    category: str
    versions: dict[int, tuple[Definition, datetime | None]] = field(default_factory=dict)

    def definition(self, version: int) -> Definition:
        return self.versions[version][0]


_parsed: dict[tuple[str, str, int], Definition] = {}


def _definition(shop: str, journey_id: str, version: int, text: str) -> Definition:
    key = (shop, journey_id, version)
    found = _parsed.get(key)
    if found is None:
        if len(_parsed) > 10_000:
            _parsed.clear()
        found = _parsed[key] = parse_definition(orjson.loads(text))
    return found


_actions: dict[int, tuple[Definition, tuple[str, ...]]] = {}


def actions_of(definition: Definition) -> tuple[str, ...]:
    """Each step's action, found once per parsed definition (the walk labels every step
    it runs; `Step.action` looks through the step's fields)."""
    found = _actions.get(id(definition))
    if found is None or found[0] is not definition:
        if len(_actions) > 10_000:
            _actions.clear()
        found = _actions[id(definition)] = (definition, tuple(s.action for s in definition.steps))
    return found[1]


async def load_journeys(
    conn: AsyncConnection, shop_ids: Iterable[str], *, statuses: Sequence[str] | None = None
) -> dict[tuple[str, str], Journey]:
    """The shops' journeys (not drafts) with every version's definition."""
    wanted = sorted(set(shop_ids))
    if not wanted:
        return {}
    j, v = journeys.c, journey_versions.c
    query = (
        select(j.shop_id, j.journey_id, j.status, j.version, j.category, v.version.label("v"))
        .add_columns(v.definition, v.active_since)
        .join(
            journey_versions,
            and_(v.shop_id == j.shop_id, v.journey_id == j.journey_id),
        )
        .where(j.shop_id.in_(wanted), j.status.in_(statuses or ("active", "paused", "archived")))
    )
    out: dict[tuple[str, str], Journey] = {}
    for row in (await conn.execute(query)).mappings():
        key = (row["shop_id"], row["journey_id"])
        journey = out.get(key)
        if journey is None:
            journey = out[key] = Journey(
                row["shop_id"], row["journey_id"], row["status"], row["version"], row["category"]
            )
        definition = _definition(row["shop_id"], row["journey_id"], row["v"], row["definition"])
        journey.versions[row["v"]] = (definition, row["active_since"])
    return out


def enrollment_id(shop: str, journey_id: str, trigger: str) -> str:
    """Deterministic: the same trigger (event or broadcast slot) makes the same id."""
    return hashlib.sha256(f"{shop}|{journey_id}|{trigger}".encode()).hexdigest()[:32]


def in_holdout(journey_id: str, customer_id: str, percent: int) -> bool:
    """Deterministic by journey and customer: the same customer is always in the same
    group of a journey, whichever event enrolls them."""
    if percent <= 0:
        return False
    digest = hashlib.sha256(f"{journey_id}|{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


def next_window(anchor: datetime, zone: ZoneInfo, window: Window) -> datetime:
    """The first instant at or after `anchor` inside the daily window (local time in
    `zone`, on one of its weekdays)."""
    local = anchor.astimezone(zone)
    for days in range(0, 8):
        day = (local + timedelta(days=days)).date()
        if day.isoweekday() not in window.weekdays:
            continue
        start = datetime.combine(day, window.at, tzinfo=zone)
        end = datetime.combine(day, window.until, tzinfo=zone) if window.until else None
        if days == 0 and local >= start:
            if end is None or local < end:
                return anchor
            continue
        return start.astimezone(UTC)
    return anchor  # no allowed weekday matched within a week: cannot happen (min_length=1)


def _reason_label(reason: str) -> str:
    base = reason.split(":", 1)[0]
    return base if len(base) <= _REASON_LABELS else "other"


def _tz(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


class Run:
    """One unit of work (see the module docstring)."""

    def __init__(
        self, conn: AsyncConnection, now: datetime, *, namespace: str = "", dry: bool = False
    ) -> None:
        self.conn = conn
        self.now = now
        self.namespace = namespace
        self.dry = dry
        self.postgres = conn.dialect.name == "postgresql"
        self.journeys: dict[tuple[str, str], Journey] = {}
        self.live: dict[tuple[str, str], Enrollment] = {}
        self.changed: set[tuple[str, str]] = set()
        self.new: set[tuple[str, str]] = set()
        self.schedule: dict[str, Timer] = {}
        self.cancel: set[str] = set()
        self.claimed: set[str] = set()
        """Timer keys the timer worker claimed (deleted) for this run: nothing to cancel."""
        self.tally: Tally[tuple[str, str, int, str]] = Tally()
        self.metrics: Tally[tuple[Any, tuple[str, ...]]] = Tally()
        self.entries: dict[tuple[str, str, str], datetime] = {}
        self.send_rows: list[dict[str, Any]] = []
        self.messages: list[Message] = []
        self.path: list[dict[str, Any]] = []
        """Dry run: what happened, step by step."""
        self.zones: dict[str, ZoneInfo] = {}
        self.shop_names: dict[str, str] = {}
        self.snap = projection.Snapshot()
        self.requested_topic = topic_for("notification.requested", namespace)
        self.known_entries: dict[tuple[str, str, str], datetime | None] = {}
        """Re-entry ledger rows read ahead for a batch (None: no entry yet)."""
        self.recent_sends: dict[tuple[str, str], list[tuple[datetime, str, str]]] = {}
        """Sends read ahead for the caps, per customer: (requested_at, journey, category)."""
        self._recent_since: datetime | None = None
        self._sends_by_customer: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._by_customer: dict[tuple[str, str], list[Enrollment]] = {}
        self._by_order: dict[tuple[str, str], list[Enrollment]] = {}

    # Loading ------------------------------------------------------------------------

    async def load_shops(self, shop_ids: Iterable[str]) -> None:
        wanted = sorted(set(shop_ids) - set(self.zones))
        if not wanted:
            return
        rows = await self.conn.execute(
            select(shops.c.shop_id, shops.c.timezone, shops.c.name).where(
                shops.c.shop_id.in_(wanted)
            )
        )
        for shop, zone, name in rows:
            self.zones[shop] = _tz(zone)
            self.shop_names[shop] = name
        for shop in wanted:
            self.zones.setdefault(shop, ZoneInfo("UTC"))

    async def lock_live(self, where: Any) -> list[Enrollment]:
        """Live enrollments matching `where`, locked in the one lock order: their timer
        rows first, then the enrollment rows (re-read after the locks, so a fire that
        committed meanwhile is seen)."""
        e = enrollments.c
        base = select(e.shop_id, e.enrollment_id).where(e.status.in_(LIVE), where)
        keys = sorted(tuple(r) for r in await self.conn.execute(base))
        keys = [k for k in keys if k not in self.live]
        if not keys:
            return []
        found: list[Enrollment] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            if self.postgres:
                timer_keys = sorted(timer_key(s, "enr", i) for s, i in chunk)
                await self.conn.execute(
                    select(timers.c.key)
                    .where(timers.c.key.in_(timer_keys))
                    .order_by(timers.c.key)
                    .with_for_update()
                )
            for where in by_shop(enrollments, "enrollment_id", chunk):
                query = (
                    select_rows()
                    .where(where, e.status.in_(LIVE))
                    .order_by(e.shop_id, e.enrollment_id)
                )
                if self.postgres:
                    query = query.with_for_update()
                for row in await self.conn.execute(query):
                    enrollment = from_row(row)
                    self.add(enrollment)
                    found.append(enrollment)
        return found

    def add(self, enrollment: Enrollment) -> None:
        if enrollment.key in self.live:
            return
        self.live[enrollment.key] = enrollment
        self._by_customer.setdefault((enrollment.shop_id, enrollment.customer_id), []).append(
            enrollment
        )
        if enrollment.order_id is not None:
            self._by_order.setdefault((enrollment.shop_id, enrollment.order_id), []).append(
                enrollment
            )

    def about(self, shop: str, customer_id: str | None, order_id: str | None) -> list[Enrollment]:
        """Loaded enrollments of this customer or order (each once)."""
        found = list(self._by_customer.get((shop, customer_id or ""), ()))
        for enrollment in self._by_order.get((shop, order_id or ""), ()):
            if enrollment not in found:
                found.append(enrollment)
        return found

    # Bookkeeping ---------------------------------------------------------------------

    def metric(self, metric: Any, *labels: str) -> None:
        """Count one on `metric{labels}` when the unit of work is written (`flush`): the
        walk counts per step, Prometheus is told once per label set and batch."""
        self.metrics[(metric, labels)] += 1

    def count(self, enrollment: Enrollment, name: str, n: int = 1) -> None:
        self.tally[(enrollment.shop_id, enrollment.journey_id, enrollment.version, name)] += n

    def touch(self, enrollment: Enrollment) -> None:
        enrollment.updated_at = self.now
        self.changed.add(enrollment.key)

    def finish(self, enrollment: Enrollment, status: str, reason: str) -> None:
        if enrollment.status in LIVE:
            self.cancel.add(enrollment.timer)
            self.schedule.pop(enrollment.timer, None)
        enrollment.status = status
        enrollment.exit_reason = reason
        enrollment.due_at = None
        self.touch(enrollment)
        self.count(enrollment, f"exited:{reason}")
        self.metric(EXITED, _reason_label(reason))
        if self.dry:
            self.path.append({"exit": reason})

    def wait(
        self, enrollment: Enrollment, step: Step, due: datetime, mode: str, gated: bool
    ) -> None:
        journey = self.journeys[(enrollment.shop_id, enrollment.journey_id)]
        enrollment.status = "waiting"
        enrollment.step_id = step.id
        enrollment.due_at = due
        self.touch(enrollment)
        self.cancel.discard(enrollment.timer)
        self.schedule[enrollment.timer] = Timer(
            enrollment.timer,
            TIMER_KINDS[journey.category],
            enrollment.shop_id,
            due,
            {"e": enrollment.enrollment_id, "s": step.id, "m": mode, "g": gated},
        )
        if self.dry:
            self.path.append({"step": step.id, "wait_until": due.isoformat(), "mode": mode})

    # Walking steps -----------------------------------------------------------------

    def facts(self, enrollment: Enrollment) -> dict[str, Any]:
        customer = self.snap.customer(enrollment.shop_id, enrollment.customer_id)
        order = self.snap.order(enrollment.shop_id, enrollment.order_id)
        return {
            **enrollment.context.get("facts", {}),
            **projection.state_facts(customer, order, self.now),
        }

    async def walk(self, enrollment: Enrollment, index: int, anchor: datetime) -> None:
        """Run steps from `index` until the enrollment waits or ends."""
        journey = self.journeys[(enrollment.shop_id, enrollment.journey_id)]
        definition = journey.definition(enrollment.version)
        steps = definition.steps
        actions = actions_of(definition)
        gated = definition.cancellable
        while index < len(steps):
            step = steps[index]
            self.metric(STEPS, actions[index])
            if step.wait is not None:
                self.wait(enrollment, step, anchor + step.wait, "wait", gated)
                return
            if step.wait_until is not None:
                due = next_window(anchor, self.zones[enrollment.shop_id], step.wait_until)
                if due > anchor:
                    self.wait(enrollment, step, due, "wait", gated)
                    return
            elif step.wait_until_date is not None:
                due = self.date_due(enrollment, step.wait_until_date, anchor)
                if due > self.now:
                    self.wait(enrollment, step, due, "wait", gated)
                    return
                anchor = max(anchor, due)
            elif step.wait_for is not None:
                self.wait(enrollment, step, anchor + step.wait_for.timeout, "wait", gated)
                return
            elif step.branch is not None:
                holds = evaluate(step.branch.if_, self.facts(enrollment))
                target = step.branch.then if holds else step.branch.else_
                if self.dry:
                    self.path.append({"step": step.id, "branch": holds, "to": target})
                if target is not None:
                    index = definition.step_index(target)
                    continue
            elif step.send is not None:
                deferred = await self.send(enrollment, definition, step, anchor)
                if deferred is not None:
                    self.wait(enrollment, step, deferred, "defer", gated)
                    return
            elif step.tag is not None:
                self.request_tag(enrollment, step)
            elif step.exit is not None:
                self.finish(enrollment, "exited", f"exit:{step.exit}")
                return
            index += 1
        self.finish(enrollment, "completed", "completed")

    def date_due(self, enrollment: Enrollment, wait: DateWait, anchor: datetime) -> datetime:
        """When a `wait_until_date` step ends: the customer's date moved by the offset, or
        `otherwise` after the anchor when the customer has none."""
        customer = self.snap.customer(enrollment.shop_id, enrollment.customer_id) or {}
        date = customer.get(wait.field.removeprefix("customer."))
        if date is None:
            return anchor + wait.otherwise
        return cast(datetime, date) + wait.offset

    async def send(
        self, enrollment: Enrollment, definition: Definition, step: Step, anchor: datetime
    ) -> datetime | None:
        """Request the step's message (or record why not); returns when to try again if a
        cap defers it."""
        assert step.send is not None
        category = definition.category
        if enrollment.held_out:
            self.count(enrollment, "msg:held_out")
            self.metric(SENDS, category, "held_out")
            if self.dry:
                self.path.append({"step": step.id, "send": "held_out"})
            return None
        for cap in definition.caps:
            allowed_at = await self.cap_allows_at(enrollment, definition, cap)
            if allowed_at is None:
                continue
            first_try = enrollment.context.get("deferred_since") or self.now.isoformat()
            deadline = datetime.fromisoformat(first_try) + cap.defer_max
            if cap.on_cap == "skip":
                self.count(enrollment, "cap:skipped")
                self.metric(SENDS, category, "cap_skipped")
                if self.dry:
                    self.path.append({"step": step.id, "send": "skipped", "reason": "cap"})
                return None
            if allowed_at > deadline:
                enrollment.context.pop("deferred_since", None)
                self.count(enrollment, "cap:expired")
                self.metric(SENDS, category, "cap_expired")
                if self.dry:
                    self.path.append({"step": step.id, "send": "dropped", "reason": "cap_expired"})
                return None
            if "deferred_since" not in enrollment.context:
                enrollment.context["deferred_since"] = first_try
                self.count(enrollment, "cap:deferred")
                self.metric(SENDS, category, "cap_deferred")
            return allowed_at
        enrollment.context.pop("deferred_since", None)
        key = (
            f"{enrollment.shop_id}:{enrollment.journey_id}:v{enrollment.version}:"
            f"{step.id}:{enrollment.enrollment_id}"
        )
        customer = self.snap.customer(enrollment.shop_id, enrollment.customer_id) or {}
        to = None
        if step.send.to == "customer":
            to = customer.get("phone") if step.send.channel == "sms" else customer.get("email")
        variables = {
            "shop": {"name": self.shop_names.get(enrollment.shop_id)},
            **enrollment.context.get("vars", {}),
        }
        variables.setdefault("customer", {})["name"] = customer.get("name")
        if self.dry:
            self.path.append(
                {
                    "step": step.id,
                    "send": step.send.channel,
                    "template": step.send.template,
                    "to": to,
                    "variables": variables,
                }
            )
            return None
        data = {
            "idempotency_key": key,
            "channel": step.send.channel,
            "customer_id": enrollment.customer_id,
            "template": step.send.template,
            "variables": variables,
            "category": category,
            "recipient": step.send.to,
            "journey_id": enrollment.journey_id,
            "journey_version": enrollment.version,
            "step_id": step.id,
            "enrollment_id": enrollment.enrollment_id,
        }
        if to is not None:
            data["to"] = to
        self.messages.append(
            Message(
                self.requested_topic,
                f"{enrollment.shop_id}:{enrollment.customer_id}",
                requested_event(
                    enrollment.shop_id,
                    enrollment.customer_id,
                    hashlib.sha256(key.encode()).hexdigest()[:40],
                    self.now,
                    data,
                ),
            )
        )
        self.send_rows.append(
            row := {
                "shop_id": enrollment.shop_id,
                "idempotency_key": key,
                "journey_id": enrollment.journey_id,
                "version": enrollment.version,
                "enrollment_id": enrollment.enrollment_id,
                "customer_id": enrollment.customer_id,
                "category": category,
                "channel": step.send.channel,
                "requested_at": self.now,
                "status": "requested",
                "reason": None,
            }
        )
        self._sends_by_customer.setdefault((enrollment.shop_id, enrollment.customer_id), []).append(
            row
        )
        enrollment.messaged = True
        self.count(enrollment, "msg:requested")
        self.metric(SENDS, category, "requested")
        return None

    def request_tag(self, enrollment: Enrollment, step: Step) -> None:
        """Ask lifecycle to add or remove a manual tag (`customer.tag_requested`); the
        event id is the enrollment's and step's, so a replay asks once."""
        assert step.tag is not None
        action = "add" if step.tag.add is not None else "remove"
        tag = step.tag.add or step.tag.remove
        assert tag is not None
        self.count(enrollment, f"tag:{action}")
        if self.dry:
            self.path.append({"step": step.id, "tag": action, "name": tag})
            return
        if enrollment.held_out:
            return  # the holdout gets no treatment, tags included
        event = new_event(
            type="customer.tag_requested",
            shop_id=enrollment.shop_id,
            source=f"huitou/campaigns/{enrollment.shop_id}",
            data=TagRequestedData(
                customer_id=enrollment.customer_id,
                tag=tag,
                action=action,
                requested_by=f"journey:{enrollment.journey_id}",
            ),
            subject=enrollment.customer_id,
            id=hashlib.sha256(f"{enrollment.enrollment_id}|{step.id}".encode()).hexdigest()[:40],
            time=self.now,
        )
        self.messages.append(
            Message(topic_for(event.type, self.namespace), event.key, event.to_bytes())
        )

    async def read_recent_sends(
        self, customers: Iterable[tuple[str, str]], since: datetime | None = None
    ) -> None:
        """Read ahead the sends that a cap may count for these customers, in one query per
        shop and 500 customers (a capped walk would otherwise ask once per message and
        cap): those after `since`, by default as far back as the longest cap of the loaded
        journeys reaches (nothing when none has a cap)."""
        if since is None:
            longest = max(
                (
                    cap.period
                    for journey in self.journeys.values()
                    for definition, _ in journey.versions.values()
                    for cap in definition.caps
                ),
                default=None,
            )
            if longest is None:
                return
            since = self.now - longest
        if self._recent_since is None or since < self._recent_since:
            self._recent_since = since
            self.recent_sends.clear()  # what was read reaches back less far: read again
        wanted = set(customers) - set(self.recent_sends)
        for key in wanted:
            self.recent_sends[key] = []
        s = sends.c
        for where in by_shop(sends, "customer_id", wanted):
            rows = await self.conn.execute(
                select(s.shop_id, s.customer_id, s.requested_at, s.journey_id, s.category).where(
                    where, s.requested_at > self._recent_since
                )
            )
            for shop, customer, at, journey_id, category in rows:
                self.recent_sends[(shop, customer)].append((at, journey_id, category))

    async def cap_allows_at(
        self, enrollment: Enrollment, definition: Definition, cap: Cap
    ) -> datetime | None:
        """None if the cap lets a message go now; else when the oldest counted message
        leaves the rolling period."""
        since = self.now - cap.period
        who = (enrollment.shop_id, enrollment.customer_id)
        if who not in self.recent_sends or self._recent_since is None or since < self._recent_since:
            await self.read_recent_sends([who], since)

        def counted(journey_id: str, category: str) -> bool:
            if cap.scope == "journey":
                return journey_id == enrollment.journey_id
            return category == definition.category

        times = [at for at, j, c in self.recent_sends[who] if at > since and counted(j, c)]
        times += [
            row["requested_at"]
            for row in self._sends_by_customer.get(who, ())
            if counted(row["journey_id"], row["category"])
        ]
        if len(times) < cap.max:
            return None
        times.sort()
        oldest_counted: datetime = times[len(times) - cap.max]
        return oldest_counted + cap.period

    # Writing -------------------------------------------------------------------------

    async def flush(self) -> None:
        if self.dry:
            return
        for (metric, labels), n in self.metrics.items():
            _child(metric, *labels).inc(n)
        self.metrics.clear()
        conn = self.conn
        if self.cancel:
            keys = sorted(self.cancel - set(self.schedule) - self.claimed)
            for start in range(0, len(keys), 500):
                await conn.execute(
                    delete(timers).where(timers.c.key.in_(keys[start : start + 500]))
                )
        if self.schedule:
            await schedule(conn, list(self.schedule.values()))
        # One statement per kind of change whatever the batch's size: the rows go in as
        # one parameter (JSON on SQLite, arrays on PostgreSQL; `libs.common.db.keysets`).
        # An enrollment moving on sets only the columns a step changes, so the indexes
        # over its fixed ones (customer, order, journey) are left alone.
        entered: list[tuple[Any, ...]] = []
        moved: list[tuple[Any, ...]] = []
        for key in sorted(self.changed):
            enrollment = self.live[key]
            fixed = key not in self.new and not enrollment.customer_moved
            (moved if fixed else entered).append(enrollment.values())
        for name, rows, columns in (
            ("entered", entered, _ROW[2:]),
            ("moved", moved, _PROGRESS),
        ):
            if not rows:
                continue
            stmt = reused(conn, f"campaigns.enrollments.{name}", _upsert_of(conn, columns))
            await conn.execute(stmt, rows_params(conn, "new", columns_of(enrollments, _ROW), rows))
        if self.send_rows:
            stmt = reused(
                conn,
                "campaigns.sends.insert",
                lambda: insert_ignore(conn, sends, insert_select(conn, sends, _SEND, None)),
            )
            await conn.execute(
                stmt,
                rows_params(
                    conn,
                    "new",
                    columns_of(sends, _SEND),
                    [tuple(r[c] for c in _SEND) for r in self.send_rows],
                ),
            )
        await enqueue(conn, self.messages)
        if self.entries:
            await conn.execute(
                upsert(conn, entries, ["shop_id", "journey_id", "entry_key"], ["last_entered_at"]),
                [
                    {"shop_id": s, "journey_id": j, "entry_key": k, "last_entered_at": at}
                    for (s, j, k), at in sorted(self.entries.items())
                ],
            )
        await add_counts(conn, self.tally)


def _upsert_of(conn: AsyncConnection, columns: Sequence[str]) -> Callable[[], Any]:
    """Builds the one-statement upsert of enrollment rows setting `columns` on conflict."""
    return lambda: upsert(
        conn,
        enrollments,
        ["shop_id", "enrollment_id"],
        columns,
        source=insert_select(conn, enrollments, _ROW, None),
    )


async def add_counts(conn: AsyncConnection, tally: Tally[tuple[str, str, int, str]]) -> None:
    """Add to the report counters (one upsert for the batch)."""
    if not tally:
        return
    await conn.execute(
        upsert(
            conn,
            counters,
            ["shop_id", "journey_id", "version", "name"],
            [],
            merge=lambda excluded: {"n": counters.c.n + excluded.n},
        ),
        [
            {"shop_id": s, "journey_id": j, "version": v, "name": name, "n": n}
            for (s, j, v, name), n in sorted(tally.items())
        ],
    )


def _goal_status(event_type: str) -> str | None:
    """The order status an order goal's event type stands for (`order.paid` → `paid`)."""
    return event_type.split(".", 1)[1] if event_type.startswith("order.") else None


@dataclass
class Entry:
    """What enrolls a customer: an event, or a broadcast's slot."""

    customer_id: str
    order_id: str | None
    at: datetime
    """When it happened: the enrollment's `entered_at` and the first wait's anchor."""
    trigger: str
    """Unique per entry (the event's dedupe key, or `broadcast:…`): the enrollment's id."""
    facts: dict[str, Any]
    """The `event.*` facts kept on the enrollment for later conditions."""
    variables: dict[str, Any]
    order_statuses: frozenset[str] = frozenset()


def entry_of(run: Run, event: Envelope, who: projection.Resolved, facts: dict[str, Any]) -> Entry:
    assert who.customer_id is not None
    shop = event.shop_id
    return Entry(
        customer_id=who.customer_id,
        order_id=who.order_id,
        at=event.time,
        trigger=event.dedupe_key,
        facts={k: v for k, v in facts.items() if k.startswith("event.")},
        variables=projection.template_variables(
            event, run.snap.customer(shop, who.customer_id), run.snap.order(shop, who.order_id)
        ),
        order_statuses=who.order_statuses,
    )


async def enroll(
    run: Run, journey: Journey, definition: Definition, entry: Entry
) -> Enrollment | None:
    """Start an enrollment (re-entry rules and holdout applied) and walk its first steps."""
    shop, version = journey.shop_id, journey.version
    tag = (shop, journey.journey_id, version)
    # A goal the order has met already (its payment came first) ends it before it starts.
    if definition.key == "order":
        reached = entry.order_statuses
        if any(g.match == "order" and _goal_status(g.event) in reached for g in definition.goals):
            run.tally[(*tag, "refused:goal_met")] += 1
            return None
    reentry = definition.reentry
    entry_key = f"o:{entry.order_id}" if reentry.per == "order" else f"c:{entry.customer_id}"
    if reentry.per != "always":
        ledger = (shop, journey.journey_id, entry_key)
        last = run.entries.get(ledger)
        if last is None and ledger in run.known_entries:
            last = run.known_entries[ledger]
        elif last is None:
            last = (
                await run.conn.execute(
                    select(entries.c.last_entered_at).where(
                        entries.c.shop_id == shop,
                        entries.c.journey_id == journey.journey_id,
                        entries.c.entry_key == entry_key,
                    )
                )
            ).scalar()
        refused = last is not None and (
            reentry.per != "customer_days" or entry.at < last + timedelta(days=reentry.days or 0)
        )
        if refused:
            run.tally[(*tag, f"refused:{reentry.per}")] += 1
            if run.dry:
                run.path.append({"refused": f"reentry:{reentry.per}"})
            return None
        run.entries[(shop, journey.journey_id, entry_key)] = entry.at
    held_out = in_holdout(journey.journey_id, entry.customer_id, definition.holdout_percent)
    enrollment = Enrollment(
        shop_id=shop,
        enrollment_id=enrollment_id(shop, journey.journey_id, entry.trigger),
        journey_id=journey.journey_id,
        version=version,
        customer_id=entry.customer_id,
        order_id=entry.order_id,
        status="waiting",
        step_id=None,
        due_at=None,
        held_out=held_out,
        context={"facts": entry.facts, "vars": entry.variables, "trigger": entry.trigger},
        entered_at=entry.at,
        updated_at=run.now,
    )
    run.add(enrollment)
    run.new.add(enrollment.key)
    run.count(enrollment, "entered")
    if held_out:
        run.count(enrollment, "held_out")
    run.metric(ENROLLED, definition.category, "held_out" if held_out else "treated")
    if run.dry:
        run.path.append({"enrolled": True, "held_out": held_out})
    await run.walk(enrollment, 0, entry.at)
    return enrollment


async def resume(run: Run, journey: Journey, enrollment: Enrollment, mode: str) -> None:
    """Walk on from the step the enrollment waited at (its due time is the new anchor)."""
    definition = journey.definition(enrollment.version)
    assert enrollment.step_id is not None and enrollment.due_at is not None
    index = definition.step_index(enrollment.step_id)
    step = definition.steps[index]
    anchor = enrollment.due_at
    if mode == "defer":
        await run.walk(enrollment, index, anchor)  # the capped send, tried again
        return
    if step.wait_for is not None and step.wait_for.on_timeout:
        index = definition.step_index(step.wait_for.on_timeout)
    else:
        index += 1
    await run.walk(enrollment, index, anchor)

"""An independent model of the lifecycle rules, written from the spec (DESIGN.md and the
README), sharing no code with the service. Tests compare the service against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

PAID_OR_LATER = ("paid", "shipped", "completed", "refunded")
DAY = timedelta(days=1)


@dataclass
class RefOrder:
    total: int
    created_at: datetime
    reached: set[str] = field(default_factory=set)
    refunds: dict[str, int] = field(default_factory=dict)


@dataclass
class RefCustomer:
    orders: dict[str, RefOrder] = field(default_factory=dict)
    interest: list[datetime] = field(default_factory=list)


def model(events: list[dict[str, Any]]) -> dict[str, RefCustomer]:
    """Customers from canonical events (duplicates by id count once)."""
    people: dict[str, RefCustomer] = {}
    seen: set[str] = set()
    for e in events:
        if e["id"] in seen:
            continue
        seen.add(e["id"])
        data = e["data"]
        person = people.setdefault(data["customer"]["id"], RefCustomer())
        if e["type"] == "cart.added":
            person.interest.append(datetime.fromisoformat(e["time"]))
            continue
        created = datetime.fromisoformat(data["created_at"])
        order = person.orders.setdefault(
            data["order_id"], RefOrder(data["total"]["amount_minor"], created)
        )
        status = e["type"].split(".")[1]
        order.reached.add(status)
        if status == "created":
            person.interest.append(created)
        if status == "refunded":
            order.refunds[e["id"]] = data["refund"]["amount_minor"]
    return people


def figures(person: RefCustomer, now: datetime) -> dict[str, Any]:
    """What the service must show for this customer at `now` with the default policy."""
    purchases = [o for o in person.orders.values() if set(PAID_OR_LATER) & o.reached]
    frequency = len(purchases)
    monetary = sum(max(0, o.total - sum(o.refunds.values())) for o in purchases)
    last = max((o.created_at for o in purchases), default=None)
    if frequency == 0:
        recent = [t for t in person.interest if now - t < 30 * DAY]
        stage = "interested" if recent else "prospect"
    else:
        assert last is not None
        age = now - last
        if age < 15 * DAY:
            stage = "new" if frequency == 1 else "after_sale"
        elif age < 90 * DAY:
            stage = "active"
        elif age < 180 * DAY:
            stage = "silent"
        elif age < 365 * DAY:
            stage = "sleeping"
        else:
            stage = "churned"
    level = None
    for name, threshold in (("VIP1", 100_000), ("VIP2", 500_000), ("VIP3", 2_000_000)):
        if monetary >= threshold:
            level = name
    return {
        "frequency": frequency,
        "monetary": monetary,
        "stage": stage,
        "returning": frequency > 1,
        "member_level": level,
    }

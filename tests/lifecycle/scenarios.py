"""Hypothesis strategies for random shop histories as canonical events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

PATHS = (
    ("created",),
    ("created", "cancelled"),
    ("created", "paid"),
    ("created", "paid", "shipped"),
    ("created", "paid", "shipped", "completed"),
    ("created", "paid", "refunded"),
    ("created", "paid", "shipped", "refunded"),
    ("paid", "shipped"),
)


def order_events(
    shop: str,
    customer: str,
    order_id: str,
    path: tuple[str, ...],
    created: datetime,
    total: int,
    refund: int,
) -> list[dict[str, Any]]:
    events = []
    for step, status in enumerate(path):
        at = created + timedelta(hours=step * 7)
        data: dict[str, Any] = {
            "order_id": order_id,
            "customer": {"id": customer, "name": customer},
            "status": status,
            "total": {"amount_minor": total, "currency": "CNY"},
            "created_at": created.isoformat(),
        }
        if status == "refunded":
            data["refund"] = {"amount_minor": refund, "currency": "CNY"}
        events.append(
            {
                "specversion": "1.0",
                "id": f"{order_id}-{status}",
                "source": f"gen/{shop}",
                "type": f"order.{status}",
                "time": at.isoformat(),
                "shop_id": shop,
                "subject": customer,
                "data": data,
            }
        )
    return events


@st.composite
def histories(draw: st.DrawFn, shop: str) -> list[dict[str, Any]]:
    """Events of a few customers over about a year and a half, in creation order."""
    events: list[dict[str, Any]] = []
    for c in range(draw(st.integers(1, 4))):
        customer = f"c{c}"
        for o in range(draw(st.integers(0, 4))):
            created = EPOCH + timedelta(
                days=draw(st.integers(0, 540)), minutes=draw(st.integers(0, 1439))
            )
            total = draw(st.sampled_from([990, 25_900, 60_000, 250_000, 600_000]))
            events += order_events(
                shop,
                customer,
                f"{customer}-o{o}",
                draw(st.sampled_from(PATHS)),
                created,
                total,
                refund=draw(st.sampled_from([total, total // 2])),
            )
        if draw(st.booleans()):
            at = EPOCH + timedelta(days=draw(st.integers(0, 560)))
            events.append(
                {
                    "specversion": "1.0",
                    "id": f"{customer}-cart-{at.date()}",
                    "source": f"gen/{shop}",
                    "type": "cart.added",
                    "time": at.isoformat(),
                    "shop_id": shop,
                    "subject": customer,
                    "data": {
                        "customer": {"id": customer},
                        "sku": "LJ-250",
                        "occurred_at": at.isoformat(),
                    },
                }
            )
    return events

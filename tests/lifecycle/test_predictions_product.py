"""The repurchase model through the product: the CDNOW calibration replayed as orders
through ingest, fitted on the durable timers, read back from the API."""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from scipy import special

from tests.platform import Platform, until

CDNOW = Path(__file__).parent.parent / "data" / "cdnow" / "CDNOW_sample.txt"
CALIBRATION_END = date(1997, 9, 30)
ZONE = ZoneInfo("Asia/Shanghai")


def calibration_purchases() -> list[tuple[str, date, int]]:
    """(customer, day, cents) of every CDNOW sample purchase up to the calibration end."""
    found = []
    for line in CDNOW.read_text().splitlines():
        _, customer, day, _, dollars = line.split()
        when = datetime.strptime(day, "%Y%m%d").date()
        if when <= CALIBRATION_END:
            found.append((customer, when, round(float(dollars) * 100)))
    return found


def paid_order(shop: str, customer: str, order: str, at: datetime, cents: int) -> dict[str, Any]:
    stamp = at.isoformat()
    return {
        "specversion": "1.0",
        "id": f"paid-{order}",
        "source": f"test/{shop}",
        "type": "order.paid",
        "time": stamp,
        "shop_id": shop,
        "subject": customer,
        "data": {
            "order_id": order,
            "customer": {"id": customer},
            "status": "paid",
            "total": {"amount_minor": cents, "currency": "CNY"},
            "created_at": stamp,
            "paid_at": stamp,
        },
    }


def order_events(shop: str, purchases: list[tuple[str, date, int]]) -> list[dict[str, Any]]:
    """One paid order per purchase, dated at noon in the shop's zone, shifted so that the
    calibration end is today."""
    shift = datetime.now(ZONE).date() - CALIBRATION_END
    return [
        paid_order(
            shop,
            f"c{customer}",
            f"o{n}",
            datetime.combine(day + shift, datetime.min.time(), ZONE).replace(hour=12),
            cents,
        )
        for n, (customer, day, cents) in enumerate(purchases)
    ]


def holdout_purchase_days() -> int:
    """Purchase days in CDNOW's 39 holdout weeks (1997-10-01 to 1998-06-30)."""
    days = set()
    for line in CDNOW.read_text().splitlines():
        _, customer, day, _, _ = line.split()
        when = datetime.strptime(day, "%Y%m%d").date()
        if when > CALIBRATION_END:
            days.add((customer, when))
    return len(days)


def summaries(purchases: list[tuple[str, date, int]]) -> dict[str, tuple[int, int, int]]:
    """(x, t_x, T) in days per customer, counted here from the raw purchases."""
    days: dict[str, set[date]] = defaultdict(set)
    for customer, day, _ in purchases:
        days[f"c{customer}"].add(day)
    return {
        cid: (len(d) - 1, (max(d) - min(d)).days, (CALIBRATION_END - min(d)).days)
        for cid, d in days.items()
    }


def paper_figures(p: dict[str, float], x: int, t_x: int, T: int, t: float) -> tuple[float, float]:
    """P(alive) and E[Y(t)] by the paper's equations, written out independently."""
    r, alpha, a, b = p["r"], p["alpha"], p["a"], p["b"]
    alive = 1.0
    if x > 0:
        alive = 1.0 / (1.0 + a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x))
    hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, t / (alpha + T + t))
    given_alive = (a + b + x - 1) / (a - 1) * (1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp)
    return alive, float(given_alive * alive)


@pytest.fixture
def platform(replay_platform: Platform) -> Platform:
    """Default batch sizes: the replay is 4,900 orders."""
    return replay_platform


async def listed(platform: Platform, key: str) -> dict[str, dict[str, Any]]:
    items: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        r = await platform.request("GET", "/v1/customers", key=key, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        items.update((i["customer_id"], i) for i in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return items


async def fitted(platform: Platform, key: str, status: int = 200) -> dict[str, Any]:
    got: dict[str, Any] = {}

    async def answered() -> bool:
        r = await platform.request("GET", "/v1/models/repurchase", key=key)
        got.update(status=r.status_code, body=r.json())
        return r.status_code == status

    await until(answered, within=120)
    assert got["status"] == status, got
    body: dict[str, Any] = got["body"]
    return body


async def test_cdnow_through_the_product_reproduces_the_paper(platform: Platform) -> None:
    shop = f"cdnow-{uuid.uuid4().hex[:8]}"
    key = await platform.create_shop(shop)
    other = await platform.create_shop(f"other-{uuid.uuid4().hex[:8]}")
    purchases = calibration_purchases()
    events = order_events(shop, purchases)
    for start in range(0, len(events), 1000):
        r = await platform.request("POST", "/v1/events", key=key, json=events[start : start + 1000])
        assert r.status_code == 202, r.text
    await platform.settle(("order.paid",))
    r = await platform.request("GET", "/v1/models/repurchase", key=key)
    assert r.status_code == 404, r.text  # the first scheduled fit is minutes away
    predicted_reminder = {"params": {"days_before_predicted_purchase": 2, "holdout_percent": 0}}
    r = await platform.request(
        "POST", "/v1/playbooks/repurchase_reminder", key=key, json=predicted_reminder
    )
    assert r.status_code == 422 and "no repurchase model yet" in r.text, r.text

    # A journey on the figures lifecycle announces: customers likely gone get a tag.
    r = await platform.request(
        "POST",
        "/v1/journeys",
        key=key,
        json={
            "name": "likely gone",
            "trigger": {
                "event": "customer.prediction_changed",
                "if": {"field": "event.p_alive", "op": "lt", "value": 0.3},
            },
            "steps": [{"id": "tag", "tag": {"add": "likely-gone"}}],
        },
    )
    assert r.status_code == 201, r.text
    r = await platform.request("POST", f"/v1/journeys/{r.json()['journey_id']}/activate", key=key)
    assert r.status_code == 200, r.text

    r = await platform.request("POST", "/v1/models/repurchase/fit", key=key)
    assert r.status_code == 202, r.text
    model = await fitted(platform, key)
    p = model["params"]
    # Fader, Hardie & Lee (2005): r 0.243, α 4.414/week = 30.90/day, a 0.793, b 2.426.
    assert [f"{p[n]:.2g}" for n in ("r", "alpha", "a", "b")] == ["0.24", "31", "0.79", "2.4"]
    assert (model["model"], model["time_unit"], model["customers"]) == ("bg_nbd", "day", 2357)
    # The paper's −9582.4 is in weeks: in days each repeat purchase adds ln(1/7).
    repeats = sum(x for x, _, _ in summaries(purchases).values())
    assert round(model["log_likelihood"] + repeats * math.log(7), 1) == -9582.4
    assert model["spend"]["model"] == "gamma_gamma" and model["spend"]["params"]["q"] > 1

    # The other shop sees no model, and the fit gave it none.
    r = await platform.request("GET", "/v1/models/repurchase", key=other)
    assert r.status_code == 404, r.text

    expected = summaries(purchases)
    items: dict[str, dict[str, Any]] = {}

    async def all_predicted() -> bool:
        items.update(await listed(platform, key))
        return all(items.get(cid, {}).get("prediction") for cid in expected)

    await until(all_predicted, within=120)
    assert sorted(items) == sorted(expected)
    for cid, (x, t_x, T) in expected.items():
        alive, in_90 = paper_figures(p, x, t_x, T, 90.0)
        got = items[cid]["prediction"]
        assert math.isclose(got["p_alive"], alive, rel_tol=1e-6, abs_tol=1e-9), cid
        assert math.isclose(got["expected_purchases_90d"], in_90, rel_tol=1e-6, abs_tol=1e-9), cid
        assert datetime.fromisoformat(got["next_purchase_at"]) > datetime.now(UTC), cid

    # Every customer's first figures went out as `customer.prediction_changed`; campaigns
    # tagged exactly those below 0.3 through lifecycle.
    gone = {cid for cid, i in items.items() if i["prediction"]["p_alive"] < 0.3}
    assert 0 < len(gone) < len(items)

    async def tagged() -> bool:
        items.update(await listed(platform, key))
        return {cid for cid, i in items.items() if "likely-gone" in i["tags"]} == gone

    await until(tagged, within=120)

    # The repurchase reminder timed at each customer's predicted next purchase, less 2 days.
    r = await platform.request(
        "POST",
        "/v1/playbooks/repurchase_reminder",
        key=key,
        json={**predicted_reminder, "activate": True},
    )
    assert r.status_code == 201, r.text
    reminder = r.json()["journey_id"]
    figures = {"customer_id": "c0003", "p_alive": 0.5, "expected_purchases_90d": 0.2}
    announced = datetime.now(UTC).replace(microsecond=0)
    for extra, first in (
        ({}, {"step": "wait", "mode": "wait"}),  # no date: `delay` (P30D) after the event
        ({"next_purchase_at": "2020-01-01T00:00:00Z"}, {"step": "remind"}),  # passed: at once
    ):
        r = await platform.request(
            "POST",
            f"/v1/journeys/{reminder}/dry-run",
            key=key,
            json={
                "customer_id": "c0003",
                "event": {
                    "id": uuid.uuid4().hex,
                    "source": "test",
                    "type": "customer.prediction_changed",
                    "time": announced.isoformat(),
                    "subject": "c0003",
                    "data": {**figures, "reason": "purchase", **extra},
                },
            },
        )
        assert r.status_code == 200, r.text
        step = next(p for p in r.json()["path"] if "step" in p)
        assert first.items() <= step.items(), r.json()
        if not extra:
            due = announced + timedelta(days=30)
            assert datetime.fromisoformat(step["wait_until"]) == due

    # The 39 holdout weeks as a promotion window: the product's forecast is the model's
    # (summed here from the paper's equations) and lies near what CDNOW's customers did.
    opens = datetime.now(UTC) + timedelta(hours=1)
    closes = opens + timedelta(days=273)
    r = await platform.request(
        "GET",
        "/v1/forecasts/returning-orders",
        key=key,
        params={"from": opens.isoformat(), "to": closes.isoformat()},
    )
    assert r.status_code == 200, r.text
    forecast = r.json()["forecast"]
    assert r.json()["actual"] is None
    days_from_now = [1 / 24, 1 / 24 + 273]
    independent = sum(
        paper_figures(p, x, t_x, T, days_from_now[1])[1]
        - paper_figures(p, x, t_x, T, days_from_now[0])[1]
        for x, t_x, T in expected.values()
    )
    assert math.isclose(forecast["expected"], independent, rel_tol=1e-4)
    assert forecast["low"] < forecast["expected"] < forecast["high"]
    assert forecast["customers"] == 2357 and forecast["parameter_uncertainty"] is True
    stages = forecast["by_stage"].values()
    assert sum(g["customers"] for g in stages) == 2357
    assert math.isclose(sum(g["expected"] for g in stages), forecast["expected"], rel_tol=1e-9)
    # BG/NBD under-forecasts CDNOW's holdout a little (1,653 vs 1,882 purchase days here,
    # as the model-level test finds too): the bound is ours.
    assert abs(forecast["expected"] / holdout_purchase_days() - 1) < 0.15

    # A window that begins in two seconds: the forecast made now is kept and shown beside
    # what the shop's existing customers buy once it has begun (a new customer's first
    # order is no returning purchase; two orders on one day are one purchase day).
    opens = datetime.now(UTC) + timedelta(seconds=2)
    window = {"from": opens.isoformat(), "to": (opens + timedelta(days=2)).isoformat()}
    r = await platform.request("GET", "/v1/forecasts/returning-orders", key=key, params=window)
    assert r.status_code == 200, r.text
    kept = r.json()["forecast"]
    r = await platform.request("GET", "/v1/forecasts/returning-orders", key=other, params=window)
    assert r.status_code == 404, r.text

    async def begun() -> bool:
        return datetime.now(UTC) > opens + timedelta(seconds=1)

    await until(begun)
    at = datetime.now(UTC)
    sold = [
        paid_order(shop, "c0001", "w1", at, 1500),
        paid_order(shop, "c0001", "w2", at, 2500),
        paid_order(shop, "c0002", "w3", at, 900),
        paid_order(shop, "c-new", "w4", at, 900),
    ]
    r = await platform.request("POST", "/v1/events", key=key, json=sold)
    assert r.status_code == 202, r.text
    await platform.settle(("order.paid",))
    r = await platform.request("GET", "/v1/forecasts/returning-orders", key=key, params=window)
    assert r.status_code == 200, r.text
    shown = r.json()
    assert shown["forecast"] == kept
    assert shown["actual"]["purchase_days"] == 2 and shown["actual"]["complete"] is False

    # The purchases' figures enrolled the buyers in the predicted reminder (c-new with its
    # first figures), each waiting until 2 days before its own predicted next purchase.
    async def reminders() -> dict[str, list[dict[str, Any]]]:
        r = await platform.request(
            "GET", f"/v1/journeys/{reminder}/enrollments", key=key, params={"limit": 500}
        )
        assert r.status_code == 200, r.text
        found: dict[str, list[dict[str, Any]]] = {}
        for e in r.json()["items"]:
            found.setdefault(e["customer_id"], []).append(e)
        return found

    async def reminded(buyers: dict[str, int]) -> bool:
        found = await reminders()
        return {c: len(es) for c, es in found.items()} == buyers

    await until(lambda: reminded({"c0001": 1, "c0002": 1, "c-new": 1}), within=120)
    items.update(await listed(platform, key))

    def timed_right(enrollment: dict[str, Any]) -> bool:
        predicted = datetime.fromisoformat(
            items[enrollment["customer_id"]]["prediction"]["next_purchase_at"]
        )
        due = datetime.fromisoformat(enrollment["due_at"])
        return enrollment["status"] == "waiting" and due == predicted - timedelta(days=2)

    assert all(timed_right(es[0]) for es in (await reminders()).values())
    # c-new buys again (an order dated yesterday: a second purchase day): its reminder
    # ends and a fresh one waits for its new prediction.
    yesterday = paid_order(shop, "c-new", "w5", at - timedelta(days=1), 700)
    r = await platform.request("POST", "/v1/events", key=key, json=[yesterday])
    assert r.status_code == 202, r.text
    await until(lambda: reminded({"c0001": 1, "c0002": 1, "c-new": 2}), within=120)
    items.update(await listed(platform, key))
    ended, fresh = sorted((await reminders())["c-new"], key=lambda e: e["entered_at"])
    assert (ended["status"], ended["exit_reason"]) == (
        "exited",
        "goal:customer.prediction_changed",
    )
    assert timed_right(fresh)
    assert fresh["due_at"] != ended["due_at"]

    # Stages by P(alive): repeat buyers past the active window are silent, sleeping or
    # churned by the model; one-time buyers (P(alive) 1 by construction) keep day counts.
    r = await platform.request("GET", "/v1/policy", key=key)
    policy = {
        **r.json(),
        "sleeping_rule": {"p_alive_below": 0.3},
        "churned_rule": {"p_alive_below": 0.1},
    }
    r = await platform.request("PUT", "/v1/policy", key=key, json=policy)
    assert r.status_code == 200, r.text
    bought_again = {cid for cid, (x, _, _) in expected.items() if x > 0}
    unchanged = set(expected) - {"c0001", "c0002"}

    def by_policy(item: dict[str, Any]) -> str:
        days = item["rfm"]["recency_days"]
        if days < 90:
            return (
                ("new" if item["rfm"]["frequency"] == 1 else "after_sale")
                if days < 15
                else "active"
            )
        if item["customer_id"] in bought_again:
            p_alive = item["prediction"]["p_alive"]
            return "churned" if p_alive < 0.1 else "sleeping" if p_alive < 0.3 else "silent"
        return "silent" if days < 180 else "sleeping" if days < 365 else "churned"

    async def restaged() -> bool:
        items.update(await listed(platform, key))
        return all(items[cid]["stage"] == by_policy(items[cid]) for cid in unchanged)

    await until(restaged, within=120)
    wrong = {
        cid: items[cid]["stage"]
        for cid in unchanged
        if items[cid]["stage"] != by_policy(items[cid])
    }
    assert not wrong
    # The rule decided something the day counts would not have.
    moved = [
        cid
        for cid in bought_again & unchanged
        if 90 <= items[cid]["rfm"]["recency_days"] < 180 and items[cid]["stage"] != "silent"
    ]
    assert moved


async def test_a_shop_too_small_to_fit_is_told_why(platform: Platform) -> None:
    shop = f"tiny-{uuid.uuid4().hex[:8]}"
    key = await platform.create_shop(shop)
    end = CALIBRATION_END  # shifted to today by `order_events`
    purchases = [(str(c), end - timedelta(days=3 * c + d), 1000) for c in range(5) for d in (0, 9)]
    r = await platform.request("POST", "/v1/events", key=key, json=order_events(shop, purchases))
    assert r.status_code == 202, r.text
    await platform.settle(("order.paid",))
    before = await listed(platform, key)
    assert len(before) == 5

    for bad in (
        {"as_of": (datetime.now(UTC) + timedelta(days=2)).isoformat()},
        {"as_of": "2026-01-01T00:00:00"},  # no zone
        {"as_of": "1999-12-31T00:00:00Z"},
        {"as_from": "2026-01-01T00:00:00Z"},
    ):
        r = await platform.request("POST", "/v1/models/repurchase/fit", key=key, json=bad)
        assert r.status_code == 422, (bad, r.text)

    r = await platform.request("POST", "/v1/models/repurchase/fit", key=key, json={})
    assert r.status_code == 202, r.text
    problem = await fitted(platform, key, status=409)
    assert problem["reason"].startswith("too few customers to fit: 5"), problem
    assert problem["customers"] == 5
    assert all(i["prediction"] is None for i in (await listed(platform, key)).values())

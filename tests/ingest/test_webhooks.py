"""Platform and carrier deliveries through a running Huitou: verified, normalised,
published once, and every bad input refused with a problem and no event."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from services.ingest.signing import sign
from tests.ingest import signers
from tests.platform import Platform, until
from tests.servers import Broker

SECRETS = {
    "shopify": "shpss_test_secret_1",
    "woocommerce": "wc_test_secret_1",
    "taobao": "taobao_test_secret_1",
    "kuaidi100": "kuaidi_salt_1",
    "aftership": "aftership_secret_1",
    "huitou": "huitou_secret_1",
}


async def new_shop(
    platform: Platform, secrets: dict[str, str] | None = None, *, currency: str = "CNY"
) -> tuple[str, str]:
    """A shop with every sender's secret; `currency` USD for the Shopify and WooCommerce
    samples, whose orders are in dollars (a shop takes its own currency only)."""
    shop = f"shop-{uuid.uuid4().hex[:8]}"
    key = await platform.create_shop(shop, webhook_secrets=secrets or SECRETS, currency=currency)
    return shop, key


async def customer(platform: Platform, key: str, cid: str) -> dict[str, Any] | None:
    r = await platform.request("GET", f"/v1/customers/{cid}", key=key)
    return r.json() if r.status_code == 200 else None


async def wait_for_order(platform: Platform, key: str, cid: str, order_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def present() -> bool:
        c = await customer(platform, key, cid)
        for order in (c or {}).get("orders", []):
            if order["order_id"] == order_id:
                found.update(order)
                return True
        return False

    await until(present)
    return found


async def test_shopify_order_webhook_arrives_once_as_a_canonical_order(platform: Platform) -> None:
    shop, key = await new_shop(platform, currency="USD")
    body = signers.sample("shopify/orders_create.json")
    headers = signers.shopify(body, SECRETS["shopify"], "orders/create", "wh-1")
    path = f"/v1/webhooks/shopify/{shop}"
    first = await platform.request("POST", path, content=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["accepted"] == 1
    again = await platform.request("POST", path, content=body, headers=headers)
    assert again.status_code == 200
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 1)
    order = await wait_for_order(platform, key, "115310627314723954", "820982911946154508")
    assert order["total"] == {"amount_minor": 40495, "currency": "USD"}
    assert order["status"] == "cancelled", "Shopify's sample order was voided and cancelled"
    assert order["cancelled_at"] == "2022-01-01T00:00:00Z"


async def test_woocommerce_paid_order_and_ping(platform: Platform) -> None:
    shop, key = await new_shop(platform, currency="USD")
    ping = await platform.request(
        "POST",
        f"/v1/webhooks/woocommerce/{shop}",
        content=b"webhook_id=17",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert ping.status_code == 200, ping.text
    body = signers.sample("woocommerce/order_created.json")
    headers = signers.woocommerce(body, SECRETS["woocommerce"], "order.created", "d-1")
    r = await platform.request(
        "POST", f"/v1/webhooks/woocommerce/{shop}", content=body, headers=headers
    )
    assert r.status_code == 200, r.text
    order = await wait_for_order(platform, key, "john.doe@example.com", "727")
    assert order["total"] == {"amount_minor": 2935, "currency": "USD"}

    async def paid() -> bool:
        c = await customer(platform, key, "john.doe@example.com")
        return c is not None and c["rfm"]["frequency"] == 1

    await until(paid)


async def test_taobao_buyer_pay_message(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    body = signers.sample("taobao/trade_buyer_pay.json")
    r = await platform.request(
        "POST",
        f"/v1/webhooks/taobao/{shop}",
        content=body,
        headers=signers.taobao(body, SECRETS["taobao"]),
    )
    assert r.status_code == 200, r.text
    order = await wait_for_order(platform, key, "AAHk5d-EAAeGwJedwSFu0XXX", "2231958349")
    assert order["total"] == {"amount_minor": 20007, "currency": "CNY"}
    assert order["status"] == "paid"


async def test_carrier_pushes_are_accepted_with_the_answer_each_carrier_expects(
    platform: Platform,
) -> None:
    shop, _ = await new_shop(platform)
    param = signers.sample("kuaidi100/push_param_yt6186594166532.json").decode()
    body, headers = signers.kuaidi100(param, SECRETS["kuaidi100"])
    r = await platform.request(
        "POST", f"/v1/logistics/kuaidi100/{shop}", content=body, headers=headers
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"result": True, "returnCode": "200", "message": "成功"}

    body = signers.sample("aftership/tracking_update_usps_arrival_adapted.json")
    r = await platform.request(
        "POST",
        f"/v1/logistics/aftership/{shop}",
        content=body,
        headers=signers.aftership(body, SECRETS["aftership"]),
    )
    assert r.status_code == 200, r.text
    [event_id] = r.json()["ids"]
    assert "arrived_city" in event_id


async def test_bad_deliveries_are_refused_and_emit_nothing(platform: Platform) -> None:
    shop, key = await new_shop(platform, currency="USD")
    body = signers.sample("shopify/orders_create.json")
    good = signers.shopify(body, SECRETS["shopify"], "orders/create", "wh-2")
    path = f"/v1/webhooks/shopify/{shop}"

    async def post(content: bytes, headers: dict[str, str], p: str = path) -> int:
        r = await platform.request("POST", p, content=content, headers=headers)
        if r.status_code >= 400:
            assert r.headers["content-type"] == "application/problem+json", r.text
        return r.status_code

    assert await post(body, {**good, "X-Shopify-Hmac-Sha256": "AAAA"}) == 401
    assert await post(body, {k: v for k, v in good.items() if "Hmac" not in k}) == 401
    assert await post(body + b" ", good) == 401, "the signature covers the raw body"
    assert await post(body, good, "/v1/webhooks/shopify/no-such-shop") == 404
    assert await post(body, good, f"/v1/webhooks/myspace/{shop}") == 404
    broken = b'{"id": 1,'
    assert (
        await post(broken, signers.shopify(broken, SECRETS["shopify"], "orders/create", "wh-3"))
        == 400
    )
    no_total = orjson.loads(body)
    del no_total["id"]
    raw = orjson.dumps(no_total)
    r = await platform.request(
        "POST",
        path,
        content=raw,
        headers=signers.shopify(raw, SECRETS["shopify"], "orders/create", "wh-4"),
    )
    assert r.status_code in (400, 422)
    assert r.json()["errors"][0]["field"] == "id"
    huge = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    assert (
        await post(huge, signers.shopify(huge, SECRETS["shopify"], "orders/create", "wh-5")) == 413
    )
    unused = signers.sample("shopify/products_delete.json")
    r = await platform.request(
        "POST",
        path,
        content=unused,
        headers=signers.shopify(unused, SECRETS["shopify"], "products/delete", "wh-6"),
    )
    assert r.status_code == 200
    assert r.json()["accepted"] == 0
    # Once lifecycle has consumed everything published so far, still no customer.
    await platform.settle(types=("order.created", "cart.added"))
    listed = await platform.request("GET", "/v1/customers", key=key)
    assert listed.json()["items"] == []


async def test_rotated_secret_keeps_the_old_one_for_the_grace_period(platform: Platform) -> None:
    shop, _ = await new_shop(platform, currency="USD")
    body = signers.sample("shopify/orders_create.json")
    path = f"/v1/webhooks/shopify/{shop}"

    async def status(secret: str) -> int:
        headers = signers.shopify(body, secret, "orders/create", uuid.uuid4().hex)
        return (await platform.request("POST", path, content=body, headers=headers)).status_code

    rotate = f"/v1/shops/{shop}/webhook_secrets/shopify"
    r = await platform.request(
        "PUT",
        rotate,
        key=platform.admin_key,
        json={"secret": "shpss_new_secret", "grace_seconds": 3600},
    )
    assert r.status_code == 204, r.text
    assert await status(SECRETS["shopify"]) == 200
    assert await status("shpss_new_secret") == 200
    r = await platform.request(
        "PUT",
        rotate,
        key=platform.admin_key,
        json={"secret": "shpss_newest_secret", "grace_seconds": 0},
    )
    assert r.status_code == 204
    assert await status(SECRETS["shopify"]) == 401
    assert await status("shpss_new_secret") == 401
    assert await status("shpss_newest_secret") == 200
    shown = await platform.request("GET", f"/v1/shops/{shop}", key=platform.admin_key)
    assert "secret" not in shown.text.replace("webhook_", "")


async def test_signed_canonical_events_and_their_replay_window(platform: Platform) -> None:
    shop, key = await new_shop(platform)
    event = {
        "specversion": "1.0",
        "id": "evt-signed-1",
        "source": f"erp/{shop}",
        "type": "order.paid",
        "time": "2026-11-11T00:03:10Z",
        "shop_id": shop,
        "subject": "c-signed",
        "data": {
            "order_id": "s1",
            "status": "paid",
            "customer": {"id": "c-signed"},
            "total": {"amount_minor": 1200, "currency": "CNY"},
            "created_at": "2026-11-11T00:00:00Z",
            "paid_at": "2026-11-11T00:03:10Z",
        },
    }
    body = orjson.dumps(event)
    headers = {"X-Huitou-Shop": shop, "Content-Type": "application/json"}
    fresh = {**headers, "X-Huitou-Signature": sign(body, SECRETS["huitou"])}
    r = await platform.request("POST", "/v1/events", content=body, headers=fresh)
    assert r.status_code == 202, r.text
    replay = await platform.request("POST", "/v1/events", content=body, headers=fresh)
    assert replay.json()["duplicates"] == 1
    stale = {**headers, "X-Huitou-Signature": sign(body, SECRETS["huitou"], 1_000_000_000)}
    assert (
        await platform.request("POST", "/v1/events", content=body, headers=stale)
    ).status_code == 401
    wrong = {**headers, "X-Huitou-Signature": sign(body, "not-the-secret")}
    assert (
        await platform.request("POST", "/v1/events", content=body, headers=wrong)
    ).status_code == 401
    order = await wait_for_order(platform, key, "c-signed", "s1")
    assert order["total"] == {"amount_minor": 1200, "currency": "CNY"}


@pytest.mark.parametrize("platform", ["distributed"], indirect=True)
async def test_broker_outage_answers_503_and_the_retries_land_once(
    platform: Platform, broker: Broker
) -> None:
    shop, key = await new_shop(platform, currency="USD")
    event = orjson.loads(signers.sample("shopify/orders_create.json"))
    event.update(financial_status="paid", cancelled_at=None, id=4242)
    paid = orjson.dumps(event)
    headers = signers.shopify(paid, SECRETS["shopify"], "orders/paid", "wh-outage")
    path = f"/v1/webhooks/shopify/{shop}"
    broker.pause()
    try:
        r = await platform.request("POST", path, content=paid, headers=headers)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        assert r.headers["content-type"] == "application/problem+json"
    finally:
        broker.resume()

    async def delivered() -> bool:
        """The platform's retry, as Shopify would do it, until a 2xx."""
        r = await platform.request("POST", path, content=paid, headers=headers)
        return r.status_code == 200

    await until(delivered)
    for _ in range(2):
        assert (
            await platform.request("POST", path, content=paid, headers=headers)
        ).status_code == 200
    # Everything published so far, the copy a timed-out publish may still have delivered
    # included, is applied once the markers of every partition are.
    await platform.settle()
    c = await customer(platform, key, "115310627314723954")
    assert c is not None
    assert [o["order_id"] for o in c["orders"]] == ["4242"]
    assert c["rfm"]["frequency"] == 1
    assert c["rfm"]["monetary"] == {"amount_minor": 40495, "currency": "USD"}

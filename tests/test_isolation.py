"""Tenant isolation, route by route: a key of shop B never reads, lists, changes or exports
shop A's data, whatever route it uses.

`ROUTES` maps every route of the app — (method, path template), taken from the FastAPI
app itself, so a route added later and not listed here fails
`test_every_route_is_in_the_isolation_table` — to the ways shop B would try to reach shop
A through it: A's ids in the path, `?shop_id=` naming A, A's shop in a body, A's secrets
guessed with B's. Each probe must be refused (403/404, or 401 for signed routes) or answer
only B's own data: no id, name, phone, email or note of A in the body. Afterwards A's data
is exactly as before (read by the admin and by A's own key), A's key and webhook secret
still work, and A has no customer B could have slipped in. Runs in both modes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from starlette.routing import Mount

from libs.common.http import build_app
from libs.common.problems import route_contexts
from libs.common.settings import Settings
from services.ingest.signing import SHOP_HEADER, SIGNATURE_HEADER, sign
from services.platform import SERVICES
from tests.platform import Platform, until

REFUSED = frozenset({403, 404})
UNSIGNED = frozenset({401})
"""A signature that does not verify (B's secret on A's route) is 401."""
SECRETS_A = {
    "shopify": "shpss_isolation_a_1",
    "aftership": "as_isolation_a_1",
    "huitou": "huitou_isolation_a_1",
}
SECRETS_B = {
    "shopify": "shpss_isolation_b_1",
    "aftership": "as_isolation_b_1",
    "huitou": "huitou_isolation_b_1",
}


@dataclass(frozen=True)
class Probe:
    """One attempt by shop B. `path`, `params` and the body are formatted with A's ids
    (`{shop}`, `{customer}`, `{tag}`, `{segment}`, `{key_id}`, `{b}` for B's shop).

    `refused`: the statuses that count as refused; None when the route may answer 2xx
    with B's own data (a list, B's policy) — then A must simply not be in it."""

    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    refused: frozenset[int] | None = REFUSED
    key: str = "b"
    """`b` (B's shop key), `none`, or `signed:<platform>` (B's secret for that platform)."""
    headers: dict[str, str] = field(default_factory=dict)
    sees: Callable[[Any], bool] | None = None
    """For a 2xx: a further test of the JSON body (e.g. B's overview counts nothing)."""


NOT_FOUND = frozenset({404})
SIGN_IN = frozenset({303})
"""The console's answer without a session: to the sign-in form."""


def naming_a(path: str, **kw: Any) -> list[Probe]:
    """The same route twice: as B's own (A's ids unknown there) and naming A's shop."""
    return [
        Probe(path, **kw),
        Probe(path, params={"shop_id": "{shop}"}, refused=frozenset({403}), **kw),
    ]


def blind(path: str, **kw: Any) -> list[Probe]:
    """A route answering B's own data: A's must not be in it; naming A is refused."""
    return [
        Probe(path, refused=None, **kw),
        Probe(path, params={"shop_id": "{shop}"}, refused=frozenset({403}), **kw),
    ]


def public(path: str) -> list[Probe]:
    return [Probe(path, refused=None, key="none"), Probe(path, refused=None)]


WINDOW = {"from": "2030-11-11T00:00:00Z", "to": "2030-11-12T00:00:00Z"}
SHOP_BODY = {"shop_id": "{shop}", "name": "Taken Over", "currency": "CNY"}
JOURNEY = {
    "name": "taken over",
    "trigger": {"event": "order.paid"},
    "steps": [{"id": "send", "send": {"channel": "sms", "template": "b-template"}}],
}
TEMPLATE = {
    "name": "a-template",
    "channel": "sms",
    "locales": {"zh-CN": {"text": "taken over {{ order.id }}"}},
}
A_CHANNEL = {
    "provider": "outbox",
    "fallback": {
        "provider": "aliyun",
        "settings": {
            "access_key_id": "LTAI-a",
            "access_key_secret": "a-secret",
            "sign_name": "惠投",
            "endpoint": "http://127.0.0.1:9",
        },
    },
}
A_TEXT = "A 的提醒"
"""Shop A's own template text: B's answers must never carry it."""


def _not_as(body: Any) -> bool:
    return A_TEXT not in str(body)


A_EVENT = "event-for-a"
"""Placeholder body: a canonical order event of shop A (built in the test)."""

ROUTES: dict[tuple[str, str], list[Probe]] = {
    # -- ingest: shops and keys (admin only) -------------------------------------------
    ("POST", "/v1/shops"): [Probe("/v1/shops", json=SHOP_BODY, refused=frozenset({403}))],
    ("GET", "/v1/shops"): [Probe("/v1/shops", refused=frozenset({403}))],
    ("GET", "/v1/shops/{shop_id}"): [Probe("/v1/shops/{shop}", refused=frozenset({403}))],
    ("PATCH", "/v1/shops/{shop_id}"): [
        Probe("/v1/shops/{shop}", json={"name": "Taken Over"}, refused=frozenset({403}))
    ],
    ("POST", "/v1/shops/{shop_id}/keys"): [
        Probe("/v1/shops/{shop}/keys", refused=frozenset({403}))
    ],
    ("DELETE", "/v1/shops/{shop_id}/keys/{key_id}"): [
        Probe("/v1/shops/{shop}/keys/{key_id}", refused=frozenset({403})),
        Probe("/v1/shops/{b}/keys/{key_id}", refused=frozenset({403})),
    ],
    ("PUT", "/v1/shops/{shop_id}/webhook_secrets/{platform}"): [
        Probe(
            "/v1/shops/{shop}/webhook_secrets/shopify",
            json={"secret": "guessed-by-b", "grace_seconds": 0},
            refused=frozenset({403}),
        )
    ],
    # -- ingest: events in ------------------------------------------------------------
    ("POST", "/v1/events"): [
        Probe("/v1/events", json=A_EVENT, refused=frozenset({403})),
        Probe("/v1/events", json=[A_EVENT], refused=frozenset({403})),
        Probe(
            "/v1/events",
            json=A_EVENT,
            key="signed:huitou",
            headers={SHOP_HEADER: "{shop}"},
            refused=UNSIGNED,
        ),
        Probe(
            "/v1/events",
            json=A_EVENT,
            key="signed:huitou",
            headers={SHOP_HEADER: "{b}"},
            refused=frozenset({403}),
        ),
    ],
    ("POST", "/v1/webhooks/{platform}/{shop_id}"): [
        Probe(
            "/v1/webhooks/shopify/{shop}",
            json={"id": 1},
            key="signed:shopify",
            headers={"X-Shopify-Topic": "orders/create"},
            refused=UNSIGNED,
        ),
        Probe(
            "/v1/webhooks/shopify/{shop}",
            json={"id": 1},
            headers={"X-Shopify-Topic": "orders/create"},
            refused=UNSIGNED,
        ),
    ],
    ("POST", "/v1/logistics/{provider}/{shop_id}"): [
        Probe("/v1/logistics/generic/{shop}", json=A_EVENT, key="signed:huitou", refused=UNSIGNED),
        Probe(
            "/v1/logistics/aftership/{shop}",
            json={"msg": {}},
            key="signed:aftership",
            refused=UNSIGNED,
        ),
        Probe("/v1/logistics/generic/{shop}", json=A_EVENT, refused=UNSIGNED),
    ],
    # -- lifecycle: customers ---------------------------------------------------------
    ("GET", "/v1/customers/{customer_id}"): naming_a("/v1/customers/{customer}"),
    ("PATCH", "/v1/customers/{customer_id}"): naming_a(
        "/v1/customers/{customer}", json={"source": "taken-over"}
    ),
    ("GET", "/v1/customers/{customer_id}/timeline"): naming_a("/v1/customers/{customer}/timeline"),
    ("POST", "/v1/customers/{customer_id}/notes"): naming_a(
        "/v1/customers/{customer}/notes", json={"text": "written by b"}
    ),
    ("GET", "/v1/customers"): [
        *blind("/v1/customers"),
        Probe("/v1/customers", params={"q": "{phone}"}, refused=None),
        Probe("/v1/customers", params={"tag": "{tag}"}, refused=None),
    ],
    # -- lifecycle: tags --------------------------------------------------------------
    ("GET", "/v1/tags"): blind("/v1/tags"),
    ("POST", "/v1/tags"): [
        Probe(
            "/v1/tags",
            params={"shop_id": "{shop}"},
            json={"name": "b-was-here"},
            refused=frozenset({403}),
        )
    ],
    ("PUT", "/v1/tags/{name}/rule"): naming_a(
        "/v1/tags/{tag}/rule", json={"rule": {"field": "frequency", "op": "gte", "value": 0}}
    ),
    ("DELETE", "/v1/tags/{name}"): naming_a("/v1/tags/{tag}"),
    ("POST", "/v1/tags/{name}/customers"): [
        *naming_a("/v1/tags/{tag}/customers", json={"customer_ids": ["{customer}"]}),
        # B's own tag given to A's customer id: B has no such customer (A's keeps its tags).
        Probe(
            "/v1/tags/b-own/customers",
            json={"customer_ids": ["{customer}"]},
            refused=frozenset({404, 422}),
        ),
    ],
    ("POST", "/v1/tags/{name}/customers/remove"): naming_a(
        "/v1/tags/{tag}/customers/remove", json={"customer_ids": ["{customer}"]}
    ),
    ("POST", "/v1/tags/{name}/copy"): naming_a("/v1/tags/{tag}/copy", json={"to": "b-own"}),
    ("POST", "/v1/tags/{name}/move"): naming_a("/v1/tags/{tag}/move", json={"to": "b-own"}),
    # -- lifecycle: segments ----------------------------------------------------------
    ("GET", "/v1/segments"): blind("/v1/segments"),
    ("POST", "/v1/segments"): [
        Probe(
            "/v1/segments",
            params={"shop_id": "{shop}"},
            json={"name": "b", "filter": {"has_tag": "{tag}"}},
            refused=frozenset({403}),
        )
    ],
    ("GET", "/v1/segments/{segment_id}"): naming_a("/v1/segments/{segment}"),
    ("PUT", "/v1/segments/{segment_id}"): naming_a(
        "/v1/segments/{segment}",
        json={"name": "b", "filter": {"field": "frequency", "op": "gte", "value": 0}},
    ),
    ("DELETE", "/v1/segments/{segment_id}"): naming_a("/v1/segments/{segment}"),
    # B's count of a filter over A's tag counts none of A's customers.
    ("POST", "/v1/segments/count"): blind(
        "/v1/segments/count",
        json={"filter": {"has_tag": "{tag}"}},
        sees=lambda b: b["count"] == 0,
    ),
    ("GET", "/v1/segments/{segment_id}/count"): [
        *naming_a("/v1/segments/{segment}/count"),
        # B's own segment over A's tag counts none of A's customers.
        Probe("/v1/segments/{b_segment}/count", refused=None, sees=lambda b: b["count"] == 0),
    ],
    ("GET", "/v1/segments/{segment_id}/customers"): [
        *naming_a("/v1/segments/{segment}/customers"),
        Probe("/v1/segments/{b_segment}/customers", refused=None, sees=lambda b: b["items"] == []),
    ],
    ("GET", "/v1/segments/{segment_id}/export.csv"): [
        *naming_a("/v1/segments/{segment}/export.csv"),
        Probe("/v1/segments/{b_segment}/export.csv", refused=None),
    ],
    # -- lifecycle: policy and overview -----------------------------------------------
    ("GET", "/v1/policy"): blind("/v1/policy"),
    # A's fit was refused (409, with A's counts); B has none: 404, never A's answer.
    ("GET", "/v1/models/repurchase"): [
        Probe("/v1/models/repurchase", refused=NOT_FOUND),
        Probe("/v1/models/repurchase", params={"shop_id": "{shop}"}, refused=frozenset({403})),
    ],
    ("GET", "/v1/forecasts/returning-orders"): [
        Probe("/v1/forecasts/returning-orders", params=WINDOW, refused=NOT_FOUND),
        Probe(
            "/v1/forecasts/returning-orders",
            params={**WINDOW, "shop_id": "{shop}"},
            refused=frozenset({403}),
        ),
    ],
    ("POST", "/v1/models/repurchase/fit"): [
        Probe(
            "/v1/models/repurchase/fit",
            params={"shop_id": "{shop}"},
            json={},
            refused=frozenset({403}),
        )
    ],
    ("PUT", "/v1/policy"): [
        Probe("/v1/policy", params={"shop_id": "{shop}"}, json="policy", refused=frozenset({403}))
    ],
    ("GET", "/v1/overview"): [
        *blind("/v1/overview", sees=lambda b: b["buyers_365d"] == 0 and b["members"] == 0),
    ],
    # -- campaigns: journeys and playbooks ---------------------------------------------
    ("POST", "/v1/journeys"): [
        Probe("/v1/journeys", params={"shop_id": "{shop}"}, json=JOURNEY, refused=frozenset({403}))
    ],
    ("GET", "/v1/journeys"): blind("/v1/journeys"),
    ("GET", "/v1/journeys/{journey_id}"): naming_a("/v1/journeys/{journey}"),
    ("PUT", "/v1/journeys/{journey_id}"): naming_a("/v1/journeys/{journey}", json=JOURNEY),
    ("POST", "/v1/journeys/{journey_id}/activate"): naming_a("/v1/journeys/{journey}/activate"),
    ("POST", "/v1/journeys/{journey_id}/pause"): naming_a("/v1/journeys/{journey}/pause"),
    ("POST", "/v1/journeys/{journey_id}/resume"): naming_a("/v1/journeys/{journey}/resume"),
    ("POST", "/v1/journeys/{journey_id}/archive"): naming_a("/v1/journeys/{journey}/archive"),
    ("POST", "/v1/journeys/{journey_id}/dry-run"): naming_a(
        "/v1/journeys/{journey}/dry-run", json={"customer_id": "{customer}", "event": A_EVENT}
    ),
    ("GET", "/v1/journeys/{journey_id}/enrollments"): naming_a(
        "/v1/journeys/{journey}/enrollments"
    ),
    ("GET", "/v1/journeys/{journey_id}/report"): naming_a("/v1/journeys/{journey}/report"),
    ("GET", "/v1/playbooks"): [Probe("/v1/playbooks", refused=None)],
    ("POST", "/v1/promotions"): [
        Probe(
            "/v1/promotions",
            params={"shop_id": "{shop}"},
            json={
                "name": "b",
                "starts_at": "2027-11-11T00:00:00Z",
                "ends_at": "2027-11-12T00:00:00Z",
            },
            refused=frozenset({403}),
        )
    ],
    ("GET", "/v1/promotions"): blind("/v1/promotions"),
    ("GET", "/v1/promotions/{promotion_id}"): naming_a("/v1/promotions/{promotion}"),
    ("POST", "/v1/playbooks/{name}"): [
        Probe(
            "/v1/playbooks/unpaid_reminder",
            params={"shop_id": "{shop}"},
            json={"params": {}},
            refused=frozenset({403}),
        )
    ],
    # -- notifier: messages, channels, templates, consent, policy ----------------------
    ("GET", "/v1/messages"): blind("/v1/messages", sees=lambda body: body["items"] == []),
    ("GET", "/v1/messages/{message_id}"): naming_a("/v1/messages/{message}"),
    ("GET", "/v1/channels/{channel}"): blind("/v1/channels/sms"),
    ("PUT", "/v1/channels/{channel}"): [
        Probe(
            "/v1/channels/sms",
            params={"shop_id": "{shop}"},
            json={"provider": "outbox"},
            refused=frozenset({403}),
        )
    ],
    ("GET", "/v1/templates"): blind("/v1/templates", sees=lambda body: body["items"] == []),
    ("POST", "/v1/templates"): [
        Probe(
            "/v1/templates", params={"shop_id": "{shop}"}, json=TEMPLATE, refused=frozenset({403})
        )
    ],
    ("GET", "/v1/templates/{name}"): naming_a("/v1/templates/a-template"),
    # B's own scope holds B's own templates of any name (A's stay as they were).
    ("PUT", "/v1/templates/{name}"): [
        Probe(
            "/v1/templates/a-template",
            params={"shop_id": "{shop}"},
            json=TEMPLATE,
            refused=frozenset({403}),
        )
    ],
    ("POST", "/v1/templates/{name}/preview"): [
        Probe("/v1/templates/a-template/preview", json={}, refused=None, sees=_not_as),
        Probe(
            "/v1/templates/a-template/preview",
            params={"shop_id": "{shop}"},
            json={},
            refused=frozenset({403}),
        ),
    ],
    ("GET", "/v1/consent/{customer_id}"): [
        Probe("/v1/consent/{customer}", refused=None, sees=lambda body: body["sms"] is None),
        Probe("/v1/consent/{customer}", params={"shop_id": "{shop}"}, refused=frozenset({403})),
    ],
    ("PUT", "/v1/consent/{customer_id}"): [
        Probe(
            "/v1/consent/{customer}",
            params={"shop_id": "{shop}"},
            json={"sms": False},
            refused=frozenset({403}),
        )
    ],
    ("GET", "/v1/notifier/policy"): blind("/v1/notifier/policy"),
    ("PUT", "/v1/notifier/policy"): [
        Probe(
            "/v1/notifier/policy",
            params={"shop_id": "{shop}"},
            json={"quiet_hours": None},
            refused=frozenset({403}),
        )
    ],
    # -- providers and recipients (no key): a forged call reaches nothing of A ----------
    ("POST", "/v1/callbacks/{provider}/{shop_id}"): [
        Probe(
            f"/v1/callbacks/{provider}/{{shop}}",
            params=params,
            key=key,
            json=[{"phone_number": "13700137000", "content": "退订", "send_time": "x"}],
            refused=frozenset({401}),
        )
        for provider in ("aliyun", "tencent", "twilio")
        for key in ("none", "b")
        for params in ({}, {"token": "0" * 32})
    ],
    ("GET", "/v1/unsubscribe/{token}"): [
        Probe(f"/v1/unsubscribe/{{shop}}.{'0' * 32}.{'0' * 32}", key="none", refused=NOT_FOUND)
    ],
    ("POST", "/v1/unsubscribe/{token}"): [
        Probe(f"/v1/unsubscribe/{{shop}}.{'0' * 32}.{'0' * 32}", key="none", refused=NOT_FOUND)
    ],
    # -- no shop data: nothing of A may show ------------------------------------------
    ("GET", "/healthz"): public("/healthz"),
    ("GET", "/readyz"): public("/readyz"),
    ("GET", "/metrics"): public("/metrics"),
    ("GET", "/openapi.json"): public("/openapi.json"),
    ("HEAD", "/openapi.json"): [],
    ("GET", "/docs"): public("/docs"),
    ("GET", "/redoc"): public("/redoc"),
    ("MOUNT", "/docs/assets/{path}"): [],  # the API docs' static files
    # -- the operator console (ingest): pages read the session cookie, never a key -------
    # B's key in the Authorization header opens nothing: every page and form answers with
    # the way to sign-in (303). What a signed-in session of B sees of A (nothing) is
    # tested in a real browser: tests/console/test_console.py.
    **{
        (method, path): [Probe(probe, refused=SIGN_IN)]
        for method, path, probe in (
            ("GET", "/console/", "/console/"),
            ("GET", "/console/overview", "/console/overview"),
            ("GET", "/console/customers", "/console/customers"),
            ("GET", "/console/customers/{customer_id}", "/console/customers/{customer}"),
            ("GET", "/console/tags", "/console/tags"),
            ("POST", "/console/segments", "/console/segments"),
            ("POST", "/console/segments/count", "/console/segments/count"),
            (
                "GET",
                "/console/segments/{segment_id}/export.csv",
                "/console/segments/{segment}/export.csv",
            ),
            ("GET", "/console/journeys", "/console/journeys"),
            ("GET", "/console/journeys/new", "/console/journeys/new"),
            ("POST", "/console/journeys/new", "/console/journeys/new"),
            ("GET", "/console/journeys/{journey_id}", "/console/journeys/{journey}"),
            (
                "POST",
                "/console/journeys/{journey_id}/dry-run",
                "/console/journeys/{journey}/dry-run",
            ),
            (
                "POST",
                "/console/journeys/{journey_id}/{action}",
                "/console/journeys/{journey}/pause",
            ),
            ("GET", "/console/messages", "/console/messages"),
            ("GET", "/console/messages/{message_id}", "/console/messages/x"),
            ("GET", "/console/templates", "/console/templates"),
            ("GET", "/console/templates/{name}", "/console/templates/a-template"),
            ("POST", "/console/templates/{name}", "/console/templates/a-template"),
            ("GET", "/console/channels", "/console/channels"),
            ("POST", "/console/channels/{channel}", "/console/channels/sms"),
            ("GET", "/console/promotions", "/console/promotions"),
            ("POST", "/console/sign-out", "/console/sign-out"),
        )
    },
    # Signing in needs the token the sign-in form set in a cookie (B has none of A's).
    ("POST", "/console/sign-in"): [Probe("/console/sign-in", refused=frozenset({403}))],
    # No shop data: the sign-in form, the language switch, the console's own assets.
    ("GET", "/console/sign-in"): [],
    ("GET", "/console/lang/{lang}"): [],
    ("GET", "/console/static/{name}"): [],
}
"""Every route of the app and how shop B would try to reach shop A through it. An empty
list: nothing to probe beyond the route's GET (HEAD of the same page)."""


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path template) of every route the platform serves (`MOUNT` for mounts)."""
    app = build_app(Settings(data_dir=tmp_path, admin_key="isolation"), list(SERVICES.values()))
    found: set[tuple[str, str]] = set()
    for route in route_contexts(app.routes):
        path = str(getattr(route, "path_format", None) or getattr(route, "path", ""))
        if isinstance(getattr(route, "original_route", route), Mount):
            found.add(("MOUNT", path))
            continue
        for method in getattr(route, "methods", None) or ():
            found.add((str(method), path))
    return found


def test_every_route_is_in_the_isolation_table(tmp_path: Path) -> None:
    served = app_routes(tmp_path)
    missing = sorted(served - set(ROUTES))
    assert not missing, (
        "routes without isolation probes: add each to ROUTES in tests/test_isolation.py, "
        "saying how a key of another shop would try to read, list, change or export shop "
        f"A's data through it (an empty list if it serves no shop data): {missing}"
    )
    stale = sorted(set(ROUTES) - served)
    assert not stale, f"ROUTES lists routes the app no longer serves; remove them: {stale}"


@dataclass
class Shops:
    a: str
    b: str
    keys: dict[str, str] = field(repr=False)  # keys stay out of failure reports
    ids: dict[str, str]
    event: dict[str, Any]
    policy: dict[str, Any]


async def _setup(platform: Platform) -> Shops:
    a, b = (f"iso-{x}-{uuid.uuid4().hex[:6]}" for x in "ab")
    key_a = await platform.create_shop(a, webhook_secrets=SECRETS_A)
    key_b = await platform.create_shop(b, webhook_secrets=SECRETS_B)
    r = await platform.request("POST", f"/v1/shops/{a}/keys", key=platform.admin_key)
    assert r.status_code == 201, r.text
    spare_key_id = r.json()["key_id"]
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    phone = "+8613700137" + str(uuid.uuid4().int % 1000).zfill(3)
    email = f"{customer}@isolation.example.com"
    at = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    event = {
        "specversion": "1.0",
        "id": f"{a}-order-1",
        "source": f"test/{a}",
        "type": "order.paid",
        "time": at,
        "shop_id": a,
        "subject": customer,
        "data": {
            "order_id": f"{a}-o1",
            "customer": {"id": customer, "name": "A 的客户", "phone": phone, "email": email},
            "status": "paid",
            "total": {"amount_minor": 150_000, "currency": "CNY"},
            "created_at": at,
            "paid_at": at,
        },
    }
    r = await platform.request("POST", "/v1/events", key=key_a, json=event)
    assert r.status_code == 202, r.text
    tag, note = f"a-vip-{uuid.uuid4().hex[:4]}", f"a note {uuid.uuid4().hex[:6]}"

    async def customer_known() -> bool:
        r = await platform.request("GET", f"/v1/customers/{customer}", key=key_a)
        return r.status_code == 200

    await until(customer_known)
    for method, path, body, status in [
        ("POST", "/v1/tags", {"name": tag}, 201),
        ("POST", f"/v1/tags/{tag}/customers", {"customer_ids": [customer]}, 200),
        ("POST", f"/v1/customers/{customer}/notes", {"text": note}, 201),
        ("PATCH", f"/v1/customers/{customer}", {"source": "a-source"}, 200),
    ]:
        r = await platform.request(method, path, key=key_a, json=body)
        assert r.status_code == status, (path, r.text)
    r = await platform.request(
        "POST", "/v1/segments", key=key_a, json={"name": "a-seg", "filter": {"has_tag": tag}}
    )
    assert r.status_code == 201, r.text
    segment = r.json()["segment_id"]
    r = await platform.request(
        "POST",
        "/v1/journeys",
        key=key_a,
        json={**JOURNEY, "name": "a-journey", "steps": [{"id": "wait", "wait": "P30D"}]},
    )
    assert r.status_code == 201, r.text
    journey = r.json()["journey_id"]
    r = await platform.request("POST", f"/v1/journeys/{journey}/activate", key=key_a)
    assert r.status_code == 200, r.text
    r = await platform.request(
        "POST",
        "/v1/promotions",
        key=key_a,
        json={
            "name": "a-1111",
            "starts_at": "2027-11-11T00:00:00Z",
            "ends_at": "2027-11-12T00:00:00Z",
        },
    )
    assert r.status_code == 201, r.text
    promotion = r.json()["promotion_id"]
    # A's repurchase model: too few customers, so a refusal with A's counts.
    r = await platform.request("POST", "/v1/models/repurchase/fit", key=key_a, json={})
    assert r.status_code == 202, r.text

    async def a_model() -> bool:
        r = await platform.request("GET", "/v1/models/repurchase", key=key_a)
        return r.status_code == 409

    await until(a_model)
    r = await platform.request("GET", "/v1/policy", key=key_a)
    policy = r.json()
    policy["levels"][0]["name"] = "A-GOLD"
    r = await platform.request("PUT", "/v1/policy", key=key_a, json=policy)
    assert r.status_code == 200, r.text
    # A's notifier data: a template, consent, a policy, and a message of its own.
    a_template = {**TEMPLATE, "locales": {"zh-CN": {"text": A_TEXT + " {{ order.id }}"}}}
    for method, path, body, status in [
        ("POST", "/v1/templates", a_template, 201),
        ("PUT", f"/v1/consent/{customer}", {"sms": True}, 200),
        ("PUT", "/v1/notifier/policy", {"quiet_hours": None}, 200),
        # An Aliyun fallback that never sends (the outbox never fails) and so takes
        # callbacks: B's forged receipts and replies must meet its token check.
        ("PUT", "/v1/channels/sms", A_CHANNEL, 200),
    ]:
        r = await platform.request(method, path, key=key_a, json=body)
        assert r.status_code == status, (path, r.text)
    r = await platform.request(
        "POST",
        "/v1/journeys",
        key=key_a,
        json={
            **JOURNEY,
            "name": "a-sends",
            "trigger": {"event": "order.created"},
            "steps": [{"id": "send", "send": {"channel": "sms", "template": "a-template"}}],
        },
    )
    assert r.status_code == 201, r.text
    r = await platform.request("POST", f"/v1/journeys/{r.json()['journey_id']}/activate", key=key_a)
    assert r.status_code == 200, r.text
    order_data: dict[str, Any] = dict(event["data"])  # type: ignore[arg-type]
    order_data.update(order_id=f"{a}-o2", status="created")
    order_data.pop("paid_at")
    created = {
        **event,
        "id": f"{a}-order-2",
        "type": "order.created",
        "time": datetime.now(UTC).isoformat(),
        "data": order_data,
    }
    r = await platform.request("POST", "/v1/events", key=key_a, json=created)
    assert r.status_code == 202, r.text
    message: list[str] = []

    async def message_sent() -> bool:
        r = await platform.request("GET", "/v1/messages", key=key_a)
        items = r.json()["items"] if r.status_code == 200 else []
        message[:] = [i["message_id"] for i in items if i["status"] == "sent"]
        return bool(message)

    await until(message_sent)
    # B's own objects, for the probes that use B's scope with A's names.
    r = await platform.request("POST", "/v1/tags", key=key_b, json={"name": "b-own"})
    assert r.status_code == 201, r.text
    r = await platform.request(
        "POST", "/v1/segments", key=key_b, json={"name": "b-seg", "filter": {"has_tag": tag}}
    )
    assert r.status_code == 201, r.text
    ids = {
        "shop": a,
        "b": b,
        "customer": customer,
        "phone": phone,
        "email": email,
        "tag": tag,
        "segment": segment,
        "b_segment": r.json()["segment_id"],
        "key_id": spare_key_id,
        "note": note,
        "journey": journey,
        "promotion": promotion,
        "message": message[0],
    }
    return Shops(a, b, {"a": key_a, "b": key_b}, ids, event, policy)


async def _snapshot(platform: Platform, shops: Shops) -> dict[str, Any]:
    """Shop A as its admin and its own key see it."""
    admin, a = platform.admin_key, {"shop_id": shops.a}
    found: dict[str, Any] = {}
    for name, path, key, params in [
        ("shop", f"/v1/shops/{shops.a}", admin, {}),
        ("customer", f"/v1/customers/{shops.ids['customer']}", admin, a),
        ("timeline", f"/v1/customers/{shops.ids['customer']}/timeline", shops.keys["a"], {}),
        ("customers", "/v1/customers", shops.keys["a"], {}),
        ("tags", "/v1/tags", admin, a),
        ("segments", "/v1/segments", shops.keys["a"], {}),
        ("segment_count", f"/v1/segments/{shops.ids['segment']}/count", admin, a),
        ("policy", "/v1/policy", admin, a),
        ("journey", f"/v1/journeys/{shops.ids['journey']}", admin, a),
        ("journeys", "/v1/journeys", shops.keys["a"], {}),
        ("promotions", "/v1/promotions", shops.keys["a"], {}),
        ("journey_report", f"/v1/journeys/{shops.ids['journey']}/report", admin, a),
        ("messages", "/v1/messages", shops.keys["a"], {}),
        ("templates", "/v1/templates", admin, a),
        ("consent", f"/v1/consent/{shops.ids['customer']}", shops.keys["a"], {}),
        ("notifier_policy", "/v1/notifier/policy", admin, a),
        ("sms_channel", "/v1/channels/sms", shops.keys["a"], {}),
    ]:
        r = await platform.request("GET", path, key=key, params=params)
        assert r.status_code == 200, (path, r.text)
        found[name] = r.json()
    r = await platform.request("GET", "/v1/models/repurchase", key=shops.keys["a"])
    found["model"] = (r.status_code, r.json())  # a refit would change its attempted_at
    return found


async def _settled(platform: Platform, shops: Shops) -> dict[str, Any]:
    """A's snapshot once the consumers are done with its setup (two reads alike)."""
    found: dict[str, Any] = {}

    async def alike() -> bool:
        nonlocal found
        first = await _snapshot(platform, shops)
        await asyncio.sleep(0.3)
        found = await _snapshot(platform, shops)
        return bool(_stable(first) == _stable(found))

    await until(alike)
    return found


def _fill(value: Any, ids: dict[str, str], shops: Shops) -> Any:
    if value == A_EVENT:
        return shops.event
    if value == "policy":
        return shops.policy
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, list):
        return [_fill(v, ids, shops) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids, shops) for k, v in value.items()}
    return value


def _signed(platform: str, body: bytes, secret: str) -> dict[str, str]:
    if platform == "huitou":
        return {SIGNATURE_HEADER: sign(body, secret)}
    mac = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    header = {"shopify": "X-Shopify-Hmac-Sha256", "aftership": "aftership-hmac-sha256"}
    return {header[platform]: mac}


async def _attempt(platform: Platform, shops: Shops, route: str, probe: Probe) -> str | None:
    """Run one probe; what went wrong, or None."""
    ids = shops.ids
    path = probe.path.format(**ids)
    params = {k: v.format(**ids) for k, v in probe.params.items()}
    headers = {k: v.format(**ids) for k, v in probe.headers.items()}
    content = None
    if probe.json is not None:
        content = json.dumps(_fill(probe.json, ids, shops)).encode()
        headers["Content-Type"] = "application/json"
    key = None
    if probe.key == "b":
        key = shops.keys["b"]
    elif probe.key.startswith("signed:"):
        sender = probe.key.split(":", 1)[1]
        headers.update(_signed(sender, content or b"", SECRETS_B[sender]))
    if path.startswith("/v1/"):
        url_path = path
        r = await platform.request(
            route.split()[0], url_path, key=key, params=params, content=content, headers=headers
        )
    else:  # ops and docs: any service answers them; ingest's does in both modes
        async with httpx.AsyncClient(timeout=30) as client:
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            r = await client.request(
                route.split()[0], platform.service_url("ingest", path), headers={**headers, **auth}
            )
    shown = f"{route}: {probe.key} → {r.request.method} {r.request.url}"
    if probe.refused is not None:
        if r.status_code not in probe.refused:
            expected = sorted(probe.refused)
            return f"{shown} answered {r.status_code}, expected {expected}: {r.text[:300]}"
        return None
    if r.status_code >= 300 and r.status_code not in REFUSED | UNSIGNED:
        return f"{shown} answered {r.status_code}: {r.text[:300]}"
    sent = f"{path} {params} {(content or b'').decode()}"  # an id B sent may be echoed
    leaked = [
        name
        for name in (
            "shop",
            "customer",
            "phone",
            "email",
            "segment",
            "note",
            "key_id",
            "journey",
            "promotion",
        )
        if ids[name] in r.text and ids[name] not in sent
    ] + (["A's policy"] if "A-GOLD" in r.text else [])
    if leaked:
        return f"{shown} showed A's {leaked}: {r.text[:300]}"
    if probe.sees is not None and r.status_code == 200 and not probe.sees(r.json()):
        return f"{shown} shows A's data: {r.text[:300]}"
    return None


async def test_another_shops_key_cannot_reach_a_shops_data(
    platform: Platform, tmp_path: Path
) -> None:
    shops = await _setup(platform)
    before = await _settled(platform, shops)
    problems = []
    for (method, template), probes in ROUTES.items():
        for probe in probes:
            found = await _attempt(platform, shops, f"{method} {template}", probe)
            if found:
                problems.append(found)
    assert not problems, "shop B reached shop A:\n" + "\n".join(problems)

    # A's key and its huitou secret still work: a signed event of A is accepted and lands.
    late = {**shops.event, "id": f"{shops.a}-late", "subject": "late-one"}
    late["data"] = {
        **shops.event["data"],
        "order_id": f"{shops.a}-late",
        "customer": {"id": "late-one"},
    }
    body = json.dumps(late).encode()
    r = await platform.request(
        "POST",
        "/v1/events",
        content=body,
        headers={
            SHOP_HEADER: shops.a,
            "Content-Type": "application/json",
            **_signed("huitou", body, SECRETS_A["huitou"]),
        },
    )
    assert r.status_code == 202, r.text

    async def landed() -> bool:
        r = await platform.request("GET", "/v1/customers/late-one", key=shops.keys["a"])
        return r.status_code == 200

    await until(landed)
    after = await _snapshot(platform, shops)
    after["customers"]["items"] = [
        c for c in after["customers"]["items"] if c["customer_id"] != "late-one"
    ]
    for name in before:
        assert _stable(after[name]) == _stable(before[name]), (
            f"shop A's {name} changed while shop B probed it:\n"
            f"before {json.dumps(before[name], ensure_ascii=False)[:1500]}\n"
            f"after  {json.dumps(after[name], ensure_ascii=False)[:1500]}"
        )


def _stable(value: Any) -> Any:
    """A body without the figures that move with the clock alone (`recency_days`, `as_of`)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in ("recency_days", "as_of")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value

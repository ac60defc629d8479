"""The operator console in a real browser (Debian's Chromium driven by Playwright) against
the running platform (`huitou up`): sign in with a shop key, the overview's funnel with the
counts of the seeded customers, a journey made from the `unpaid_reminder` playbook through
its form, an order posted, the message appearing in the log, the journey paused; another
shop's key sees none of it. Every page passes axe-core with no serious or critical
violation, runs with no console error (the Content-Security-Policy forbids inline
script, so a chart that draws proves the page's own scripts are enough), and is
photographed into `docs/console/` (shown in the README)."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.campaigns.test_journeys import new_shop, order_event, post
from tests.platform import Platform, until

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "console"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.parametrize("platform", ["embedded"], indirect=True)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is missing: `make test` installs Debian's chromium package"
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()


class Watched:
    """A browser context's page, with every request URL and every console error seen."""

    def __init__(self, context: BrowserContext, page: Page) -> None:
        self.context = context
        self.page = page
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


async def open_page(browser: Browser, lang: str = "zh-CN") -> Watched:
    context = await browser.new_context(locale=lang, viewport={"width": 1280, "height": 900})
    return Watched(context, await context.new_page())


async def sign_in(w: Watched, base: str, key: str) -> None:
    await w.page.goto(f"{base}/console/")
    assert w.page.url.endswith("/console/sign-in")
    await w.page.fill("#key", key)
    await w.page.click("button[type=submit]")
    await w.page.wait_for_url(re.compile(r".*/console/overview$"))


async def accessible(w: Watched, name: str) -> None:
    """No serious or critical axe-core violation on the page, and a screenshot of it."""
    results = await Axe().run(w.page)
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']}"
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{name}: {bad}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    await w.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def stages(platform: Platform, key: str) -> dict[str, int]:
    r = await platform.request("GET", "/v1/overview", key=key)
    assert r.status_code == 200, r.text
    found: dict[str, int] = r.json()["stages"]
    return found


async def test_an_operator_sets_up_the_unpaid_reminder_and_sees_it_fire(
    platform: Platform, browser: Browser
) -> None:
    base = platform.url("")
    shop, key = await new_shop(platform)
    _, other_key = await new_shop(platform)
    # Seed: three customers who paid (new), one who only ordered (interested).
    seeded = [order_event(shop, f"{shop}-p{i}", f"c-{i}", "paid") for i in range(3)]
    seeded.append(order_event(shop, f"{shop}-u", "c-9", "created"))
    await post(platform, key, *seeded)

    async def applied() -> bool:
        found = await stages(platform, key)
        return found.get("new") == 3 and found.get("interested") == 1

    await until(applied)

    w = await open_page(browser)
    await sign_in(w, base, key)
    cookie = next(c for c in await w.context.cookies() if c["name"] == "huitou_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    # The funnel: drawn by ECharts under the CSP, the counts those of the API.
    await w.page.wait_for_selector("[data-chart=funnel][data-drawn=true]")
    for stage, count in (await stages(platform, key)).items():
        assert await w.page.text_content(f"[data-testid=stage-{stage}]") == str(count)
    assert await w.page.text_content("[data-testid=stage-new]") == "3"
    await accessible(w, "overview")

    # The customers behind a stage, and one customer's page.
    await w.page.click("tr[data-stage=new] a")
    await w.page.wait_for_url(re.compile(r".*/console/customers\?stage=new$"))
    rows = await w.page.locator("[data-testid=customers] tbody tr").count()
    assert rows == 3
    await accessible(w, "customers")
    await w.page.click("text=c-0")
    await w.page.wait_for_selector("h1")
    await accessible(w, "customer")

    # A journey from the playbook, through its form.
    await w.page.goto(f"{base}/console/journeys")
    await accessible(w, "journeys")
    await w.page.select_option("#playbook", "unpaid_reminder")
    await w.page.click("form.filters button[type=submit]")
    await w.page.wait_for_selector("#p_delay")
    await accessible(w, "journey-new")
    await w.page.fill("#p_delay", "PT1S")
    await w.page.click("form.card button[type=submit]")
    await w.page.wait_for_selector("[data-testid=journey-status]")
    assert await w.page.text_content("[data-testid=journey-status]") == "active"
    journey_url = w.page.url
    # A dry run for a customer, from the trigger's sample event: the wait, then the send.
    await w.page.fill("#dry-customer", "c-1")
    await w.page.click("button:has-text('试运行')")
    await w.page.wait_for_selector("[data-testid=dry-path]")
    path = await w.page.text_content("[data-testid=dry-path]") or ""
    assert "wait" in path and "remind" in path, path
    r = await platform.request("GET", "/v1/messages", key=key)
    assert r.json()["items"] == []  # nothing was sent

    # An order nobody pays: the reminder appears in the message log.
    order = order_event(shop, f"{shop}-o1", "c-1", "created")
    await post(platform, key, order)

    async def logged() -> bool:
        await w.page.goto(f"{base}/console/messages")
        return (
            await w.page.locator(
                "[data-testid=messages] tbody tr", has_text="unpaid_reminder"
            ).count()
            == 1
        )

    await until(logged, within=60)
    await accessible(w, "messages")
    await w.page.click("text=unpaid_reminder")
    await w.page.wait_for_selector("ol.timeline li")
    await accessible(w, "message")

    # The journey's report, as pictures: one entered, one message sent.
    async def reported() -> bool:
        await w.page.goto(journey_url)
        return await w.page.text_content("[data-testid=msg-sent]") == "1"

    await until(reported, within=60)
    assert await w.page.text_content("[data-testid=entered]") == "1"
    await w.page.wait_for_selector("[data-chart=bars][data-drawn=true]")
    await accessible(w, "journey")

    # Pause the journey.
    await w.page.click("button:has-text('暂停')")
    await w.page.wait_for_selector("[data-testid=journey-status]:text-is('paused')")
    r = await platform.request("GET", f"/v1/journeys/{journey_url.rsplit('/', 1)[1]}", key=key)
    assert r.json()["status"] == "paused"

    # The reminder's template (saved by the playbook): its SMS preview, edited and saved.
    await w.page.goto(f"{base}/console/templates")
    await accessible(w, "templates")
    await w.page.click("[data-testid=templates] >> text=unpaid_reminder")
    await w.page.wait_for_selector("[data-testid=encoding-zh-CN]")
    assert await w.page.text_content("[data-testid=encoding-zh-CN]") == "UCS-2"
    r = await platform.request(
        "POST", "/v1/templates/unpaid_reminder/preview", key=key, json={"locale": "zh-CN"}
    )
    segments = str(r.json()["segments"])
    assert await w.page.text_content("[data-testid=segments-zh-CN]") == segments
    await accessible(w, "template")
    text = await w.page.input_value("#text_zh-CN")
    await w.page.fill("#text_zh-CN", text + "（控制台编辑）")
    await w.page.click("form button[type=submit] >> nth=-1")
    await w.page.wait_for_selector("[data-testid=preview-zh-CN] >> text=控制台编辑")
    r = await platform.request("GET", "/v1/templates/unpaid_reminder", key=key)
    assert r.json()["locales"]["zh-CN"]["text"].endswith("（控制台编辑）")

    # Channel settings: a bad JSON is answered on the page, nothing changes.
    await w.page.goto(f"{base}/console/channels")
    await accessible(w, "channels")
    await w.page.fill("[data-testid=channel-email] textarea", "{not json")
    await w.page.click("[data-testid=channel-email] button")
    await w.page.wait_for_selector("ul.error")
    r = await platform.request("GET", "/v1/channels/email", key=key)
    assert r.json()["provider"] == "outbox"
    refused = [e for e in w.errors if "422" in e]
    assert len(refused) == 1  # the page's own answer to the bad form, nothing else
    w.errors.remove(refused[0])

    # A segment built with its live count, saved, exported.
    await w.page.goto(f"{base}/console/tags")
    live = w.page.locator("[data-testid=live-count]")
    await w.page.select_option("#b-stage", "new")
    await w.page.wait_for_selector("form.builder[data-counted*='stage=new']")
    assert await live.text_content() == "3"
    await w.page.fill("#b-spent", "300")  # each seeded order was 259.00
    await w.page.wait_for_selector("form.builder[data-counted*='min_spent=300']")
    assert await live.text_content() == "0"
    await w.page.fill("#b-spent", "")
    await w.page.fill("#b-name", "新客")
    await accessible(w, "tags")
    await w.page.click("form.builder button[type=submit]")
    await w.page.wait_for_selector("[data-testid=export-新客]")
    href = await w.page.get_attribute("[data-testid=export-新客]", "href")
    csv = await w.page.request.get(f"{base}{href}")
    assert csv.status == 200
    lines = (await csv.text()).strip().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in lines) == ["c-0", "c-1", "c-2"]

    for name, path in (("promotions", "/console/promotions"),):
        await w.page.goto(f"{base}{path}")
        await accessible(w, name)
    # English.
    await w.page.click("a.lang")
    await w.page.wait_for_selector("html[lang=en]")
    assert await w.page.text_content("nav") and "Customers" in (
        await w.page.text_content("nav") or ""
    )

    assert not w.errors, w.errors
    assert not [u for u in w.urls if key in u], "the key went into a URL"

    # Another shop's key sees none of it.
    o = await open_page(browser)
    await sign_in(o, base, other_key)
    assert await o.page.text_content("[data-testid=stage-new]") == "0"
    await o.page.goto(f"{base}/console/customers")
    assert "c-0" not in (await o.page.text_content("[data-testid=customers]") or "")
    await o.page.goto(f"{base}/console/messages")
    assert "unpaid_reminder" not in (await o.page.text_content("[data-testid=messages]") or "")
    response = await o.page.goto(journey_url)
    assert response is not None and response.status == 404
    await o.context.close()
    await w.context.close()


async def test_forms_need_the_session_token_and_sign_in_its_own(platform: Platform) -> None:
    """Cross-site requests: a POST without the session's CSRF token is refused (403), so is
    a sign-in without the token its form set; a page without a session goes to sign-in."""
    _, key = await new_shop(platform)
    base = platform.url("")
    async with httpx.AsyncClient(base_url=base, follow_redirects=False) as client:
        r = await client.get("/console/overview")
        assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
        r = await client.post("/console/sign-in", data={"key": key, "pre": "forged"})
        assert r.status_code == 403
        form = await client.get("/console/sign-in")
        pre = re.search(r'name="pre" value="([^"]+)"', form.text)
        assert pre is not None
        assert "'unsafe-inline'" not in form.headers["content-security-policy"]
        assert "script-src 'self'" in form.headers["content-security-policy"]
        r = await client.post("/console/sign-in", data={"key": "hk_wrong", "pre": pre[1]})
        assert r.status_code == 401
        r = await client.post("/console/sign-in", data={"key": key, "pre": pre[1]})
        assert r.status_code == 303
        forged: dict[str, Any] = {"playbook": "unpaid_reminder", "p_delay": "PT1H"}
        r = await client.post("/console/journeys/new", data=forged)
        assert r.status_code == 403
        r = await client.post("/console/journeys/new", data={**forged, "csrf": "wrong"})
        assert r.status_code == 403
        r = await client.get("/console/journeys")
        assert "unpaid_reminder" not in r.text.split("<table", 1)[1]  # nothing was made

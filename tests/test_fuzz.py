"""Schema-driven fuzzing of the whole platform (`huitou up`, embedded), with Schemathesis.

Every operation of `/openapi.json` is exercised twice, once with a shop key and once with
the admin key, by the `schemathesis run` command (a subprocess: the CLI runs every phase —
the schema's examples, its boundary values such as huge integers, empty strings, wrong
types and undocumented methods, `HUITOU_FUZZ_EXAMPLES` (default 25) generated cases per
operation, positive and negative, then stateful sequences — and reports every failure
with a `curl` line to reproduce it). Path and query ids are drawn half of the time from
what exists (the two shops, their customers, tags and segments), so the fuzzer gets past
the 404s. Deterministic: derandomized generation from a fixed seed, no example database
(`HUITOU_FUZZ_EXAMPLES=200` for a longer run).

Each answer must:
- never be a 5xx (`not_a_server_error`);
- conform to the document: a documented status, content type and headers, a body
  matching the schema of that status (problem+json for every 4xx);
- refuse schema-violating input with a 4xx (`negative_data_rejection`), a request without
  the key with 401 (`ignored_auth`), an undocumented method with 405 and `Allow`;
- when it refuses (4xx), change nothing (`refused_request_changes_nothing`, the check
  this module registers when Schemathesis loads it as its hooks module): a fingerprint
  of both shops read through the API (the shop, its tags, segments and policy, the seeded
  customer's source and notes) is the same before and after; and at the end no event is
  on the bus that no 2xx answer accepted.

`positive_data_acceptance` is off: a schema cannot say that a string must be an IANA time
zone, a real phone number or a cursor the server issued, so some schema-valid requests
are rightly refused with 422.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_settings
from tests.platform import Platform, until

EXAMPLES = int(os.environ.get("HUITOU_FUZZ_EXAMPLES", "25"))
SEED = 20261111
SHOPS = ("fuzz-a", "fuzz-b")
PHONES = {"fuzz-a": "+8613900139001", "fuzz-b": "+8613900139002"}
SECRETS = {"shopify": "shpss_fuzz_secret_1", "huitou": "huitou_fuzz_secret_1"}
REFUSALS = (400, 401, 403, 404, 405, 406, 409, 413, 415, 422)
"""What a schema-violating request may get (413: a batch over the limit)."""
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""Requests that may change something: only these are fingerprinted before and after."""
STATE_ENV = "HUITOU_FUZZ_STATE"
"""Set for the Schemathesis process: the JSON file describing the target."""
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Fuzzed:
    """The running platform and what exists in it (also handed to the fuzzer as JSON)."""

    base_url: str
    admin_key: str
    keys: dict[str, str] = field(default_factory=dict)
    customers: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    segments: dict[str, str] = field(default_factory=dict)
    accepted_ids: set[str] = field(default_factory=set)
    """Event ids a 2xx answer accepted (seeding included)."""
    accepted_file: str = ""
    """Where the fuzzer appends the ids its 2xx answers accepted, one a line."""
    bus: str = ""


@pytest.fixture(scope="module")
async def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fuzzed]:
    workdir = tmp_path_factory.mktemp("fuzz")
    settings = make_settings("embedded", workdir, bus_publish_timeout_s=2)
    platform = Platform(settings, workdir)
    await platform.start()
    try:
        state = Fuzzed(
            base_url=platform.url(""),
            admin_key=platform.admin_key,
            accepted_file=str(workdir / "accepted-ids.txt"),
            bus=str(workdir / "bus.db"),
        )
        for shop in SHOPS:
            state.keys[shop] = await platform.create_shop(shop, webhook_secrets=SECRETS)
        for shop in SHOPS:
            await _seed(platform, state, shop)
        yield state
    finally:
        platform.stop()


async def _seed(platform: Platform, state: Fuzzed, shop: str) -> None:
    """A customer with a paid order, a manual tag they hold, a segment and a note."""
    key = state.keys[shop]
    customer = f"cust-{shop}"
    at = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    event = {
        "specversion": "1.0",
        "id": f"seed-{shop}",
        "source": f"test/{shop}",
        "type": "order.paid",
        "time": at,
        "shop_id": shop,
        "subject": customer,
        "data": {
            "order_id": f"order-{shop}",
            "customer": {"id": customer, "name": "王芳", "phone": PHONES[shop]},
            "status": "paid",
            "total": {"amount_minor": 25900, "currency": "CNY"},
            "created_at": at,
            "paid_at": at,
        },
    }
    r = await platform.request("POST", "/v1/events", key=key, json=event)
    assert r.status_code == 202, r.text
    state.accepted_ids.add(event["id"])

    async def known() -> bool:
        # Known once not 404: a failing read (5xx) is the fuzzer's to report, not setup's.
        r = await platform.request("GET", f"/v1/customers/{customer}", key=key)
        return r.status_code != 404

    await until(known)
    state.customers[shop] = customer
    tag = f"vip-{shop}"
    r = await platform.request("POST", "/v1/tags", key=key, json={"name": tag})
    assert r.status_code == 201, r.text
    r = await platform.request(
        "POST", f"/v1/tags/{tag}/customers", key=key, json={"customer_ids": [customer]}
    )
    assert r.status_code == 200, r.text
    state.tags[shop] = tag
    segment = {"name": f"buyers {shop}", "filter": {"field": "frequency", "op": "gte", "value": 1}}
    r = await platform.request("POST", "/v1/segments", key=key, json=segment)
    assert r.status_code == 201, r.text
    state.segments[shop] = r.json()["segment_id"]
    r = await platform.request(
        "POST", f"/v1/customers/{customer}/notes", key=key, json={"text": "seeded note"}
    )
    assert r.status_code == 201, r.text


def fuzz_config(state: Fuzzed, key: str) -> str:
    """The Schemathesis configuration (TOML) of one run."""
    known = {
        "shops": [*SHOPS],
        "customers": list(state.customers.values()),
        "tags": list(state.tags.values()),
        "segments": list(state.segments.values()),
        "platforms": ["shopify", "woocommerce", "taobao"],
        "providers": ["kuaidi100", "aftership", "generic"],
    }
    bind = {
        "shop_id": "shops",
        "customer_id": "customers",
        "name": "tags",
        "to": "tags",
        "segment_id": "segments",
        "platform": "platforms",
        "provider": "providers",
    }
    q = json.dumps  # a JSON string or array of strings is a TOML one
    lines = [
        f"seed = {SEED}",
        "workers = 1",
        "request-timeout = 30",
        "continue-on-failure = true",
        'hooks = "tests.test_fuzz"',
        "[cache]",
        "enabled = false",
        "[headers]",
        f"Authorization = {q('Bearer ' + key)}",
        "[generation]",
        f"max-examples = {EXAMPLES}",
        "deterministic = true",
        'database = "none"',
        "with-security-parameters = false",
        "[phases.stateful]",
        "enabled = true",
        "[checks.positive_data_acceptance]",
        "enabled = false",
        "[checks.negative_data_rejection]",
        f"expected-statuses = {list(REFUSALS)}",
    ]
    for name, values in known.items():
        lines += [f"[dictionaries.{name}]", f"values = {q(values)}"]
    for param, name in bind.items():
        lines += [f"[parameters.{param}]", f"dictionary = {q(name)}", "probability = 0.5"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("identity", ["shop", "admin"])
def test_every_operation_conforms_and_refusals_change_nothing(
    fuzzed: Fuzzed, identity: str, tmp_path: Path
) -> None:
    key = fuzzed.admin_key if identity == "admin" else fuzzed.keys[SHOPS[0]]
    state = tmp_path / "target.json"
    state.write_text(json.dumps({**asdict(fuzzed), "accepted_ids": []}))
    config = tmp_path / "schemathesis.toml"
    config.write_text(fuzz_config(fuzzed, key))
    env = {
        **os.environ,
        STATE_ENV: str(state),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "NO_COLOR": "1",
        "COLUMNS": "120",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{fuzzed.base_url}/openapi.json",
        ],
        cwd=tmp_path,  # Schemathesis and Hypothesis keep their files in the working folder
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    output = done.stdout + done.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    assert done.returncode == 0, (
        f"Schemathesis found failures with the {identity} key "
        f"(full output: {tmp_path / 'schemathesis.txt'}):\n{_failures(output)}"
    )


def _failures(output: str, limit: int = 60_000) -> str:
    start = output.find("= FAILURES =")
    text = output[output.rfind("\n", 0, start) + 1 :] if start >= 0 else output
    return text if len(text) <= limit else text[:limit] + "\n… (truncated)"


def test_no_event_reached_the_bus_that_no_answer_accepted(fuzzed: Fuzzed) -> None:
    """Refused deliveries publish nothing: every event on the bus for the two shops has an
    id that a 2xx answer returned (to the seeding, or to the fuzzer)."""
    accepted = set(fuzzed.accepted_ids)
    if Path(fuzzed.accepted_file).exists():
        accepted |= set(Path(fuzzed.accepted_file).read_text().split())
    published = _published_ids(Path(fuzzed.bus))
    unexpected = sorted(published - accepted)
    assert not unexpected, f"events on the bus that no 2xx answer accepted: {unexpected[:20]}"


def _published_ids(bus: Path) -> set[str]:
    ids: set[str] = set()
    with sqlite3.connect(f"file:{bus}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT topic, value FROM bus_messages").fetchall()
    for topic, value in rows:
        if not any(f"huitou.{t}.v1" in topic for t in ("orders", "logistics", "behavior")):
            continue
        event = json.loads(value)
        if event.get("shop_id") in SHOPS:
            ids.add(str(event["id"]))
    return ids


# -- loaded by Schemathesis as its hooks module (`hooks = "tests.test_fuzz"`) -----------


class Fingerprint:
    """What a refused request must leave as it was, read through the API as the admin."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.client = httpx.Client(
            base_url=state["base_url"],
            headers={"Authorization": f"Bearer {state['admin_key']}"},
            timeout=30,
        )
        self.known: dict[str, Any] | None = None
        self.change: str | None = None
        """What the last refused request changed (requests run one at a time)."""

    def take(self) -> dict[str, Any]:
        found: dict[str, Any] = {"shops": self._get("/v1/shops")}
        for shop in SHOPS:
            params = {"shop_id": shop}
            customer = self.state["customers"][shop]
            profile = self._get(f"/v1/customers/{customer}", params)
            timeline = self._get(f"/v1/customers/{customer}/timeline", params)
            tags = self._get("/v1/tags", params)
            found[shop] = {
                "shop": self._get(f"/v1/shops/{shop}"),
                "tags": [{k: t[k] for k in ("name", "kind", "rule")} for t in tags]
                if isinstance(tags, list)
                else tags,
                "segments": self._get("/v1/segments", params),
                "policy": self._get("/v1/policy", params),
                "source": profile.get("source") if isinstance(profile, dict) else profile,
                "notes": [e for e in timeline if e["kind"] == "note"]
                if isinstance(timeline, list)
                else timeline,
            }
        return found

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            r = self.client.get(path, params=params)
        except httpx.TransportError:  # a kept-alive connection the server closed meanwhile
            r = self.client.get(path, params=params)
        return r.json() if r.status_code == 200 else r.status_code

    def before(self, method: str) -> None:
        if method in WRITES and self.known is None:
            self.known = self.take()

    def after(self, method: str, label: str, response: Any) -> None:
        status = response.status_code
        self.change = None
        if 200 <= status < 300:
            self._remember_accepted(response)
        if method not in WRITES:
            return
        if not 400 <= status < 500:
            self.known = None  # it may have changed things: look again before the next one
            return
        before = self.known if self.known is not None else self.take()
        now = self.take()
        self.known = now
        if now != before:
            changed = [k for k in before if before[k] != now.get(k)]
            self.change = (
                f"{label} was refused with {status} but changed {changed}:\n"
                f"before {json.dumps(before, ensure_ascii=False)[:1500]}\n"
                f"after  {json.dumps(now, ensure_ascii=False)[:1500]}"
            )

    def _remember_accepted(self, response: Any) -> None:
        try:
            body = json.loads(response.content)
        except ValueError:
            return
        if isinstance(body, dict) and isinstance(body.get("ids"), list):
            with open(self.state["accepted_file"], "a") as out:
                out.writelines(f"{i}\n" for i in body["ids"])


def _register_hooks(state_file: str) -> None:
    import schemathesis

    fingerprint = Fingerprint(json.loads(Path(state_file).read_text()))

    @schemathesis.hook
    def before_call(context: Any, case: Any, kwargs: Any) -> None:
        fingerprint.before(case.method.upper())

    @schemathesis.hook
    def after_call(context: Any, case: Any, response: Any) -> None:
        method = case.method.upper()
        fingerprint.after(method, f"{method} {case.formatted_path}", response)

    @schemathesis.check
    def refused_request_changes_nothing(ctx: Any, response: Any, case: Any) -> bool | None:
        changed, fingerprint.change = fingerprint.change, None
        if changed is not None:
            raise AssertionError(changed)
        return None


if os.environ.get(STATE_ENV):
    _register_hooks(os.environ[STATE_ENV])

"""The shipped playbooks: each builds, with its defaults and with custom params, a journey
definition `parse_definition` accepts, with the category, key, trigger, goals and re-entry
the design states; bad params are refused; every template a definition sends has default
texts in zh-CN and en that use only known variables (and marketing ones the opt-out note)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from services.campaigns.conditions import evaluate
from services.campaigns.definitions import Definition, parse_definition, parse_duration
from services.campaigns.playbooks import NO_CYCLE, NO_MODEL, OPT_OUT, PLAYBOOKS, VARIABLES, make

NAMES = (
    "unpaid_reminder",
    "shipped_notice",
    "delivery_city",
    "out_for_delivery",
    "signed_thanks",
    "logistics_exception",
    "after_sale_care",
    "repurchase_reminder",
    "win_back",
    "new_customer_plan",
)
"""The playbooks triggered by an event (`promotion_waves` is timed by a promotion)."""
REQUIRED: dict[str, dict[str, Any]] = {"promotion_waves": {"promotion_id": "p_1111"}}

# name -> (category, key, trigger event, goals as (event, match), reentry)
EXPECTED: dict[str, tuple[str, str, str, list[tuple[str, str]], dict[str, Any]]] = {
    "unpaid_reminder": (
        "transactional",
        "order",
        "order.created",
        [("order.paid", "order"), ("order.cancelled", "order")],
        {"per": "order"},
    ),
    "shipped_notice": ("transactional", "order", "order.shipped", [], {"per": "order"}),
    "delivery_city": (
        "transactional",
        "order",
        "logistics.arrived_city",
        [("logistics.delivered", "order")],
        {"per": "order"},
    ),
    "out_for_delivery": (
        "transactional",
        "order",
        "logistics.out_for_delivery",
        [("logistics.delivered", "order")],
        {"per": "order"},
    ),
    "signed_thanks": ("transactional", "order", "logistics.delivered", [], {"per": "order"}),
    "logistics_exception": (
        "transactional",
        "order",
        "logistics.exception",
        [],
        {"per": "order"},
    ),
    "after_sale_care": ("marketing", "order", "logistics.delivered", [], {"per": "order"}),
    "repurchase_reminder": (
        "marketing",
        "customer",
        "order.paid",
        [("order.paid", "customer")],
        {"per": "always"},
    ),
    "win_back": (
        "marketing",
        "customer",
        "customer.stage_changed",
        [("order.paid", "customer")],
        {"per": "customer_days", "days": 90},
    ),
    "new_customer_plan": (
        "marketing",
        "customer",
        "customer.stage_changed",
        [],
        {"per": "customer"},
    ),
}

TIMED = {
    "unpaid_reminder": "PT1H",
    "signed_thanks": "PT2H",
    "after_sale_care": "P5D",
    "repurchase_reminder": "P30D",
}
FRESH = ("delivery_city", "out_for_delivery")

CUSTOM: dict[str, dict[str, Any]] = {
    "unpaid_reminder": {"delay": "PT30M"},
    "shipped_notice": {"delay": "PT10M"},
    "delivery_city": {"stale_after_hours": 6},
    "out_for_delivery": {"stale_after_hours": 0},
    "signed_thanks": {"delay": "P1DT2H"},
    "logistics_exception": {"staff_channel": "sms", "staff_template": "ops_alert"},
    "after_sale_care": {"delay": "P7D"},
    "repurchase_reminder": {"delay": "P45D"},
    "win_back": {"second_delay": "P14D", "second_template": "wb_2"},
    "new_customer_plan": {"days": [3, 10, 20, 40]},
}

VAR = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def _built(name: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], Definition]:
    raw = make(name, {**REQUIRED.get(name, {}), **(params or {})})
    json.dumps(raw)  # plain JSON
    parsed = parse_definition(raw)
    assert parse_definition(json.loads(json.dumps(parsed.dump()))) == parsed  # as stored
    return raw, parsed


def _sends(d: Definition) -> list[tuple[str, str, str]]:
    """(channel, template, to) of every send step."""
    return [(s.send.channel, s.send.template, s.send.to) for s in d.steps if s.send is not None]


def _waits(d: Definition) -> list[timedelta]:
    return [s.wait for s in d.steps if s.wait is not None]


def test_the_catalogue() -> None:
    assert tuple(PLAYBOOKS) == (*NAMES, "promotion_waves")
    for name, playbook in PLAYBOOKS.items():
        assert playbook.name == name
        assert playbook.summary and "\n" not in playbook.summary and playbook.summary.isascii()
        assert playbook.params.model_config.get("extra") == "forbid"
        schema = playbook.params.model_json_schema()
        assert schema["additionalProperties"] is False
        for field in ("channel", "template", "holdout_percent", "name"):
            assert field in schema["properties"], (name, field)
        if name in TIMED:
            assert schema["properties"]["delay"]["default"] == TIMED[name]


@pytest.mark.parametrize("name", NAMES)
def test_defaults(name: str) -> None:
    raw, d = _built(name)
    category, key, trigger, goals, reentry = EXPECTED[name]
    assert d.category == category
    assert d.key == key
    assert d.trigger.event == trigger
    assert [(g.event, g.match) for g in d.goals] == goals
    assert d.reentry.model_dump(exclude_none=True) == reentry
    assert d.holdout_percent == (0 if category == "transactional" else 10)
    assert " " in d.name and not d.name.isascii()  # bilingual
    assert d.caps == []
    params = PLAYBOOKS[name].params().model_dump()
    assert params["channel"] == "sms"
    if name != "new_customer_plan":
        assert params["template"] == name
        assert _sends(d)[0] == ("sms", name, "customer")
    for step in raw["steps"]:
        assert re.fullmatch(r"[a-z0-9_]{1,20}", step["id"])
    if name in TIMED:
        assert _waits(d)[0] == parse_duration(TIMED[name])


@pytest.mark.parametrize("name", NAMES)
def test_custom_params(name: str) -> None:
    params = {
        "channel": "email",
        "holdout_percent": 25,
        "name": "My journey",
        "template": "my_template",
        **CUSTOM[name],
    }
    _, d = _built(name, params)
    category, key, trigger, goals, reentry = EXPECTED[name]
    assert (d.category, d.key, d.trigger.event) == (category, key, trigger)
    assert [(g.event, g.match) for g in d.goals] == goals
    assert d.reentry.model_dump(exclude_none=True) == reentry
    assert d.name == "My journey"
    assert d.holdout_percent == 25
    sends = _sends(d)
    assert sends[0][:2] == (
        "email",
        "my_template" if name != "new_customer_plan" else "my_template_day5",
    )
    for key_, value in CUSTOM[name].items():
        if key_ == "delay":
            assert _waits(d)[0] == parse_duration(value)


def test_holdout_zero_for_marketing_when_asked() -> None:
    _, d = _built("win_back", {"holdout_percent": 0})
    assert d.holdout_percent == 0
    _, d = _built("unpaid_reminder", {"holdout_percent": 90})
    assert d.holdout_percent == 90


BAD_COMMON: list[dict[str, Any]] = [
    {"unknown": 1},
    {"channel": "fax"},
    {"channel": "SMS"},
    {"holdout_percent": 91},
    {"holdout_percent": -1},
    {"holdout_percent": "10"},
    {"holdout_percent": 10.5},
    {"template": "has space"},
    {"template": ""},
    {"name": ""},
    {"name": "line\nbreak"},
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", BAD_COMMON, ids=lambda b: repr(b))
def test_bad_common_params(name: str, bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        make(name, bad)


@pytest.mark.parametrize("name", [*TIMED, "shipped_notice"])
@pytest.mark.parametrize("delay", ["1h", "P1M", "P1Y", "", 3600, "PT1H ", "P9999D"])
def test_bad_delay(name: str, delay: object) -> None:
    with pytest.raises(ValidationError):
        make(name, {"delay": delay})


@pytest.mark.parametrize("name", FRESH)
@pytest.mark.parametrize("hours", [-1, "12", 1.5, 721, None])
def test_bad_stale_after_hours(name: str, hours: object) -> None:
    with pytest.raises(ValidationError):
        make(name, {"stale_after_hours": hours})


def test_params_that_belong_to_other_playbooks_are_refused() -> None:
    with pytest.raises(ValidationError):
        make("shipped_notice", {"stale_after_hours": 3})
    with pytest.raises(ValidationError):
        make("delivery_city", {"delay": "PT1H"})
    with pytest.raises(ValidationError):
        make("unpaid_reminder", {"cycle_percentile": 50})


def test_unknown_playbook() -> None:
    with pytest.raises(KeyError):
        make("nope", {})


@pytest.mark.parametrize("name", [*NAMES, "promotion_waves"])
def test_templates(name: str) -> None:
    playbook = PLAYBOOKS[name]
    _, d = _built(name)
    sent = {template for _, template, _ in _sends(d)}
    assert sent == set(playbook.templates)
    marketing = d.category == "marketing"
    for template, locales in playbook.templates.items():
        assert set(locales) == {"zh-CN", "en"}, template
        for locale, texts in locales.items():
            assert set(texts) <= {"text", "subject"}
            assert texts["text"].strip()
            for part in texts.values():
                used = set(VAR.findall(part))
                assert used <= VARIABLES, (template, locale, used - VARIABLES)
                assert "{" not in VAR.sub("", part) and "}" not in VAR.sub("", part)
            if locale == "en":
                assert texts["text"].isascii(), template  # GSM 7-bit SMS
            if marketing:
                assert texts["text"].endswith(OPT_OUT[locale]), (template, locale)
            else:
                assert OPT_OUT[locale] not in texts["text"]


def test_opt_out_notes() -> None:
    assert OPT_OUT == {"zh-CN": "拒收请回复R", "en": "Reply STOP to opt out"}


def test_named_variables() -> None:
    for locale in ("zh-CN", "en"):
        assert (
            "{{ order.id }}"
            in PLAYBOOKS["unpaid_reminder"].templates["unpaid_reminder"][locale]["text"]
        )
        assert (
            "{{ parcel.city }}"
            in PLAYBOOKS["delivery_city"].templates["delivery_city"][locale]["text"]
        )
        assert (
            "{{ parcel.tracking_number }}"
            in PLAYBOOKS["shipped_notice"].templates["shipped_notice"][locale]["text"]
        )


def test_unpaid_reminder_shape() -> None:
    raw, _ = _built("unpaid_reminder")
    assert raw["steps"] == [
        {"id": "wait", "wait": "PT1H"},
        {"id": "remind", "send": {"channel": "sms", "template": "unpaid_reminder"}},
    ]


def test_shipped_notice_waits_only_when_asked() -> None:
    for params in ({}, {"delay": None}, {"delay": "PT0S"}, {"delay": "P0D"}):
        _, d = _built("shipped_notice", params)
        assert [s.action for s in d.steps] == ["send"], params
    _, d = _built("shipped_notice", {"delay": "PT15M"})
    assert [s.action for s in d.steps] == ["wait", "send"]
    assert _waits(d) == [timedelta(minutes=15)]


@pytest.mark.parametrize("name", FRESH)
def test_stale_carrier_updates_do_not_fire(name: str) -> None:
    _, d = _built(name)
    condition = d.trigger.if_
    assert condition is not None
    assert evaluate(condition, {"event.age_hours": 0})
    assert evaluate(condition, {"event.age_hours": 12})
    assert not evaluate(condition, {"event.age_hours": 13})
    _, d = _built(name, {"stale_after_hours": 2})
    condition = d.trigger.if_
    assert condition is not None
    assert evaluate(condition, {"event.age_hours": 2})
    assert not evaluate(condition, {"event.age_hours": 3})


def test_logistics_exception_alerts_staff() -> None:
    _, d = _built("logistics_exception")
    assert _sends(d) == [
        ("sms", "logistics_exception", "customer"),
        ("email", "logistics_exception_staff", "staff"),
    ]
    _, d = _built("logistics_exception", CUSTOM["logistics_exception"])
    assert _sends(d)[1] == ("sms", "ops_alert", "staff")
    with pytest.raises(ValidationError):
        make("logistics_exception", {"staff_channel": "pager"})


def test_signed_thanks_and_after_sale_care_wait() -> None:
    _, d = _built("signed_thanks")
    assert _waits(d) == [timedelta(hours=2)]
    assert [s.action for s in d.steps] == ["wait", "send"]
    _, d = _built("after_sale_care")
    assert _waits(d) == [timedelta(days=5)]
    assert [s.action for s in d.steps] == ["wait", "send"]


def test_repurchase_reminder_cycle() -> None:
    context = {"repurchase_cycle_days": {"25": 12, "50": 21, "75": 33.5, "90": 60}}
    _, d = _built("repurchase_reminder")
    assert _waits(d) == [timedelta(days=30)]
    d = parse_definition(make("repurchase_reminder", {"cycle_percentile": 50}, context))
    assert _waits(d) == [timedelta(days=21)]
    d = parse_definition(make("repurchase_reminder", {"cycle_percentile": 75}, context))
    assert _waits(d) == [timedelta(days=33, hours=12)]
    contexts: list[dict[str, Any] | None] = [
        None,
        {},
        {"repurchase_cycle_days": {}},
        {"repurchase_cycle_days": {"50": 9}},
        {"repurchase_cycle_days": {"90": None}},
    ]
    for ctx in contexts:
        with pytest.raises(ValueError, match="no repurchase cycle yet"):
            make("repurchase_reminder", {"cycle_percentile": 90}, ctx)
    assert NO_CYCLE == "the shop has no repurchase cycle yet; give a delay"
    for days in (0, -3, "21", True):
        with pytest.raises(ValueError, match="positive number of days"):
            make(
                "repurchase_reminder",
                {"cycle_percentile": 50},
                {"repurchase_cycle_days": {"50": days}},
            )
    with pytest.raises(ValidationError):
        make("repurchase_reminder", {"cycle_percentile": 60}, context)
    with pytest.raises(ValidationError):
        make("repurchase_reminder", {"cycle_percentile": 50, "delay": "P30D"}, context)


def test_repurchase_reminder_at_the_predicted_next_purchase() -> None:
    params = {"days_before_predicted_purchase": 3, "delay": "P20D"}
    d = parse_definition(make("repurchase_reminder", params, {"repurchase_model": True}))
    assert d.trigger.event == "customer.prediction_changed"
    assert [s.action for s in d.steps] == ["wait_until_date", "send"]
    wait = d.steps[0].wait_until_date
    assert wait is not None
    assert (wait.field, wait.offset, wait.otherwise) == (
        "customer.next_purchase_at",
        -timedelta(days=3),
        timedelta(days=20),
    )
    # Figures after a purchase (or the first ones) start it afresh; a threshold crossing
    # neither starts nor ends one.
    assert d.trigger.if_ is not None
    for reason, starts in (("purchase", True), ("first", True), ("threshold", False)):
        assert evaluate(d.trigger.if_, {"event.reason": reason}) is starts
    (goal,) = d.goals
    assert (goal.event, goal.match, goal.if_) == (d.trigger.event, "customer", d.trigger.if_)
    assert d.reentry.per == "always"
    for ctx in (None, {}, {"repurchase_model": False}):
        with pytest.raises(ValueError, match="no repurchase model yet"):
            make("repurchase_reminder", {"days_before_predicted_purchase": 3}, ctx)
    assert NO_MODEL == "the shop has no repurchase model yet; give a delay"
    with pytest.raises(ValueError, match="too few repeat buyers"):
        make(
            "repurchase_reminder",
            {"days_before_predicted_purchase": 0},
            {"repurchase_model": False, "repurchase_model_reason": "too few repeat buyers"},
        )
    for days in (-1, 61, "3", True):
        with pytest.raises(ValidationError):
            make("repurchase_reminder", {"days_before_predicted_purchase": days}, {})
    with pytest.raises(ValidationError):
        make(
            "repurchase_reminder",
            {"days_before_predicted_purchase": 3, "cycle_percentile": 50},
            {"repurchase_model": True, "repurchase_cycle_days": {"50": 9}},
        )


def test_win_back_shape() -> None:
    _, d = _built("win_back")
    assert d.trigger.if_ is not None
    assert evaluate(d.trigger.if_, {"event.stage": "sleeping"})
    assert not evaluate(d.trigger.if_, {"event.stage": "silent"})
    assert [s.action for s in d.steps] == ["send", "wait", "branch", "exit", "send"]
    assert _waits(d) == [timedelta(days=7)]
    branch = d.steps[2].branch
    assert branch is not None
    assert evaluate(branch.if_, {"customer.stage": "sleeping"})
    assert not evaluate(branch.if_, {"customer.stage": "active"})
    assert d.steps[d.step_index(branch.then)].send is not None
    assert branch.else_ is not None and d.steps[d.step_index(branch.else_)].exit
    assert _sends(d) == [("sms", "win_back", "customer"), ("sms", "win_back_second", "customer")]
    _, d = _built("win_back", CUSTOM["win_back"])
    assert _waits(d) == [timedelta(days=14)]
    assert _sends(d)[1][1] == "wb_2"


def test_new_customer_plan_shape() -> None:
    _, d = _built("new_customer_plan")
    assert d.trigger.if_ is not None
    assert evaluate(d.trigger.if_, {"event.stage": "new"})
    assert not evaluate(d.trigger.if_, {"event.stage": "active"})
    assert [s.action for s in d.steps] == ["wait", "send"] * 4
    assert _waits(d) == [timedelta(days=n) for n in (5, 10, 15, 15)]
    assert [t for _, t, _ in _sends(d)] == [
        "new_customer_day5",
        "new_customer_day15",
        "new_customer_day30",
        "new_customer_day45",
    ]
    _, d = _built("new_customer_plan", {"days": [3, 10, 20, 40]})
    assert _waits(d) == [timedelta(days=n) for n in (3, 7, 10, 20)]
    for days in ([5, 15, 30], [5, 15, 30, 45, 60], [5, 5, 30, 45], [15, 5, 30, 45], [0, 1, 2, 3]):
        with pytest.raises(ValidationError):
            make("new_customer_plan", {"days": days})


def test_promotion_waves() -> None:
    _, d = _built("promotion_waves", {"at": "09:30"})
    assert (d.category, d.key, d.holdout_percent) == ("marketing", "customer", 10)
    trigger = d.trigger.promotion
    assert trigger is not None and trigger.id == "p_1111"
    assert (trigger.offset, trigger.at.isoformat()) == (-timedelta(days=7), "09:30:00")
    assert [t for _, t, _ in _sends(d)] == [
        "promotion_waves_warmup",
        "promotion_waves_launch",
        "promotion_waves_eve",
    ]
    assert _waits(d) == [timedelta(days=4), timedelta(days=2)]  # 7 → 3 → 1 day before
    assert [(g.event, g.match) for g in d.goals] == [("order.paid", "customer")]
    with pytest.raises(ValidationError):
        make("promotion_waves", {})  # which promotion?
    with pytest.raises(ValidationError):
        make("promotion_waves", {"promotion_id": "p_1", "at": "10h"})

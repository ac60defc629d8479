"""The playbooks shipped with the product: the sellers' classic journeys, each a function of
a few parameters to a normal journey definition (`services.campaigns.definitions`), with
default message templates in zh-CN and en.

`make(name, params, context)` validates the parameters (a pydantic `ValidationError` on bad
ones, `KeyError` for an unknown playbook), builds the definition and checks it with
`parse_definition`; the journey it makes is a normal journey afterwards.
`PLAYBOOKS[name].params.model_json_schema()` is what `GET /v1/playbooks` shows.

Every playbook takes:
- `channel`: `"sms"` (default) or `"email"`;
- `template`: the template of its message, by default the playbook's own name (whose
  default texts are in `templates`); `new_customer_plan`, which sends four messages, takes
  a prefix instead (see there);
- `holdout_percent`: 0 to 90; by default 0 for the transactional playbooks (service
  messages about an order or parcel) and 10 for the marketing ones;
- `name`: the journey's name, by default a bilingual one such as "催付 unpaid reminder".
Timed ones take `delay`, an ISO 8601 duration (`"PT1H"`, `"P5D"`), counted from the
trigger event.

Playbooks (category, key):
- `unpaid_reminder` (transactional, order): `delay` (PT1H) after `order.created`, a
  reminder naming the order id, unless the order is paid or cancelled first.
- `shipped_notice` (transactional, order): on `order.shipped`, the carrier and tracking
  number; at once, or after `delay` when one is given.
- `delivery_city` (transactional, order): on `logistics.arrived_city`, "your parcel has
  arrived in <city>"; once per order however often the carrier repeats it, and not for
  carrier updates older than `stale_after_hours` (12).
- `out_for_delivery` (transactional, order): the same on `logistics.out_for_delivery`.
- `signed_thanks` (transactional, order): `delay` (PT2H) after `logistics.delivered`,
  thanks and a review invitation.
- `logistics_exception` (transactional, order): on `logistics.exception`, a soothing note
  to the customer and an alert to the shop's staff (`staff_channel`, default email;
  `staff_template`, default `logistics_exception_staff`).
- `after_sale_care` (marketing, order): `delay` (P5D; the sellers' playbook says 5 to 7
  days) after `logistics.delivered`, a care note.
- `repurchase_reminder` (marketing, customer): `delay` (P30D) after each `order.paid`, a
  restock reminder; a new purchase ends it and starts a fresh one. With
  `cycle_percentile` (25, 50, 75 or 90) the delay is instead the shop's own repurchase
  cycle at that percentile, which the caller passes as
  `context["repurchase_cycle_days"][str(percentile)]` (days); without it `make` raises
  `ValueError("the shop has no repurchase cycle yet; give a delay")`. Giving both a delay
  and a percentile is refused. With `days_before_predicted_purchase` (0 to 60) each
  reminder is instead timed that many days before the customer's own predicted next
  purchase (lifecycle's repurchase model, `customer.next_purchase_at`): it starts on
  `customer.prediction_changed` with the figures of a purchase (or the customer's first
  ones), waits until that date (`wait_until_date`; `delay` after the trigger for a
  customer without a date), and the next purchase's figures end it and start a fresh one.
  The caller says the shop has a fitted model with `context["repurchase_model"]` (true);
  otherwise `make` raises `ValueError` with `context["repurchase_model_reason"]` or
  "the shop has no repurchase model yet; give a delay".
- `win_back` (marketing, customer): when the customer's stage becomes `sleeping`, a
  message; `second_delay` (P7D) later, if still sleeping, a second one
  (`second_template`, default `win_back_second`), else the journey ends. Once per customer
  per 90 days; a purchase ends it.
- `new_customer_plan` (marketing, customer): when the customer's stage becomes `new`
  (first purchase), four messages on `days` 5, 15, 30 and 45 after it (overridable: 4
  increasing day numbers), templates `{template}_day5`, `_day15`, `_day30`, `_day45`
  (`template` is a prefix here, default `new_customer`; the suffixes name the 1st to 4th
  message whatever the days). Once per customer ever.

- `promotion_waves` (marketing, customer): waves around a promotion (`promotion_id`, made
  with `POST /v1/promotions`), from the sellers' playbook: 7 days before its start at
  `at` (10:00 shop time) past buyers (`customer.frequency` ≥ 1); 3 days before, high-value
  customers (a member level) and open carts; the eve, likely buyers (bought in the last
  `likely_days`, 90, or an open cart). One journey: everyone in any wave's audience
  enrolls at the first wave's time and branches at each; a purchase ends it. Templates
  `{template}_warmup`, `_launch`, `_eve` (default prefix `promotion_waves`). Not yet: the
  price-protection care for recent full-price buyers of the promoted SKUs (campaigns does
  not keep item prices per customer).

Templates use only the variables `shop.name`, `customer.name`, `order.id`, `order.total`,
`order.city`, `parcel.tracking_number`, `parcel.carrier` and `parcel.city` (`{{ var }}`).
Marketing texts end with the opt-out note ("拒收请回复R", "Reply STOP to opt out"); English
texts keep to ASCII so an SMS stays in the GSM 7-bit alphabet.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from services.campaigns.definitions import (
    Name,
    format_duration,
    parse_definition,
    parse_duration,
)

Channel = Literal["sms", "email"]
Holdout = Annotated[
    int,
    Field(ge=0, le=90, strict=True, description="Percent of entrants held out (0 to 90)"),
]
JourneyName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="The journey's name",
    ),
]


def _duration(value: str) -> str:
    parse_duration(value)
    return value


Delay = Annotated[
    str,
    Field(description="An ISO 8601 duration such as 'PT1H' or 'P5D'"),
    AfterValidator(_duration),
]
StaleAfterHours = Annotated[
    int,
    Field(
        ge=0,
        le=720,
        strict=True,
        description="Carrier updates older than this many hours do not fire",
    ),
]

OPT_OUT = {"zh-CN": "拒收请回复R", "en": "Reply STOP to opt out"}
"""The note every marketing text ends with."""
VARIABLES = frozenset(
    {
        "shop.name",
        "customer.name",
        "order.id",
        "order.total",
        "order.city",
        "parcel.tracking_number",
        "parcel.carrier",
        "parcel.city",
        "promotion.name",
    }
)
"""The variables the default templates may use."""

Texts = Mapping[str, Mapping[str, str]]
"""A template's locales: {"zh-CN": {"text", "subject"}, "en": {...}}."""


def _t(zh_subject: str, zh_text: str, en_subject: str, en_text: str) -> Texts:
    return {
        "zh-CN": {"subject": zh_subject, "text": zh_text},
        "en": {"subject": en_subject, "text": en_text},
    }


def _marketing(zh_subject: str, zh_text: str, en_subject: str, en_text: str) -> Texts:
    return _t(
        zh_subject,
        f"{zh_text}{OPT_OUT['zh-CN']}",
        en_subject,
        f"{en_text} {OPT_OUT['en']}",
    )


TEMPLATES: dict[str, Texts] = {
    "promotion_waves_warmup": _marketing(
        "{{ promotion.name }}预告",
        "{{ customer.name }}您好，{{ shop.name }}的{{ promotion.name }}一周后开始，"
        "老朋友先看好货～",
        "{{ promotion.name }} is coming",
        "Hi {{ customer.name }}, {{ promotion.name }} at {{ shop.name }} starts in a "
        "week. A first look for our regulars.",
    ),
    "promotion_waves_launch": _marketing(
        "{{ promotion.name }}就要开始",
        "{{ customer.name }}，{{ promotion.name }}三天后开始，购物车里的宝贝记得留意～",
        "{{ promotion.name }} in 3 days",
        "Hi {{ customer.name }}, {{ promotion.name }} starts in 3 days. Your favourites "
        "are waiting.",
    ),
    "promotion_waves_eve": _marketing(
        "{{ promotion.name }}明天开始",
        "{{ customer.name }}，{{ promotion.name }}明天开始，{{ shop.name }}等您～",
        "{{ promotion.name }} starts tomorrow",
        "Hi {{ customer.name }}, {{ promotion.name }} at {{ shop.name }} starts tomorrow.",
    ),
    "unpaid_reminder": _t(
        "订单{{ order.id }}待付款",
        "{{ customer.name }}您好，您在{{ shop.name }}的订单{{ order.id }}还未付款，"
        "付款后我们会尽快为您发货哦。",
        "Your order {{ order.id }} is awaiting payment",
        "Hi {{ customer.name }}, your order {{ order.id }} at {{ shop.name }} is still "
        "unpaid. Complete payment and we'll ship it right away.",
    ),
    "shipped_notice": _t(
        "订单{{ order.id }}已发货",
        "您在{{ shop.name }}的订单{{ order.id }}已发货，{{ parcel.carrier }}单号"
        "{{ parcel.tracking_number }}，请留意查收。",
        "Your order {{ order.id }} has shipped",
        "Your {{ shop.name }} order {{ order.id }} has shipped: {{ parcel.carrier }} "
        "tracking number {{ parcel.tracking_number }}.",
    ),
    "delivery_city": _t(
        "包裹已到达{{ parcel.city }}",
        "您在{{ shop.name }}购买的宝贝已到达{{ parcel.city }}，即将为您派送，请留意查收。",
        "Your parcel has arrived in {{ parcel.city }}",
        "Your {{ shop.name }} parcel has arrived in {{ parcel.city }} and will be delivered soon.",
    ),
    "out_for_delivery": _t(
        "包裹正在派送",
        "您在{{ shop.name }}购买的宝贝正在派送中（{{ parcel.carrier }} "
        "{{ parcel.tracking_number }}），请保持电话畅通。",
        "Your parcel is out for delivery",
        "Your {{ shop.name }} parcel is out for delivery ({{ parcel.carrier }} "
        "{{ parcel.tracking_number }}). Please keep your phone handy.",
    ),
    "signed_thanks": _t(
        "感谢您的购买",
        "您在{{ shop.name }}的订单{{ order.id }}已签收，感谢支持！用得满意的话，"
        "欢迎给我们一个好评～",
        "Thanks for your order",
        "Your {{ shop.name }} order {{ order.id }} has been delivered. Thank you! If you "
        "like it, we'd love a review.",
    ),
    "logistics_exception": _t(
        "您的包裹运输遇到问题",
        "{{ customer.name }}您好，您的包裹（{{ parcel.carrier }} "
        "{{ parcel.tracking_number }}）运输遇到问题，{{ shop.name }}正在加急处理，"
        "有进展会第一时间通知您，给您添麻烦了。",
        "A problem with your delivery",
        "Hi {{ customer.name }}, your parcel ({{ parcel.carrier }} "
        "{{ parcel.tracking_number }}) has run into a delivery problem. {{ shop.name }} is "
        "on it and will update you soon. Sorry for the trouble.",
    ),
    "logistics_exception_staff": _t(
        "物流异常：订单{{ order.id }}",
        "物流异常：订单{{ order.id }}（{{ customer.name }}，{{ parcel.carrier }} "
        "{{ parcel.tracking_number }}），请尽快联系快递跟进，并告知客户进展。",
        "Delivery exception: order {{ order.id }}",
        "Delivery exception: order {{ order.id }} for {{ customer.name }} "
        "({{ parcel.carrier }} {{ parcel.tracking_number }}). Please follow up with the "
        "carrier and keep the customer posted.",
    ),
    "after_sale_care": _marketing(
        "宝贝用得还好吗？",
        "{{ customer.name }}您好，在{{ shop.name }}买的宝贝用了几天，感觉怎么样？"
        "有任何问题随时联系客服。",
        "How is your order working out?",
        "Hi {{ customer.name }}, how are you getting on with your order from "
        "{{ shop.name }}? If anything's not right, just get in touch.",
    ),
    "repurchase_reminder": _marketing(
        "该补货啦",
        "{{ customer.name }}您好，上次买的宝贝快用完了吧？需要补货的话，"
        "欢迎回{{ shop.name }}看看～",
        "Time to restock?",
        "Hi {{ customer.name }}, running low? Restock anytime at {{ shop.name }}.",
    ),
    "win_back": _marketing(
        "好久不见，{{ shop.name }}想您了",
        "{{ customer.name }}，好久不见！{{ shop.name }}上了不少新品，有空回来逛逛吧～",
        "We miss you at {{ shop.name }}",
        "Hi {{ customer.name }}, it's been a while! {{ shop.name }} has new arrivals we "
        "think you'll like.",
    ),
    "win_back_second": _marketing(
        "{{ shop.name }}上新了",
        "{{ customer.name }}，{{ shop.name }}一直记得您这位老朋友，最近上新不少，"
        "回来看看有没有喜欢的吧～",
        "New at {{ shop.name }}",
        "Hi {{ customer.name }}, {{ shop.name }} hasn't forgotten you. Come back and see "
        "what's new.",
    ),
    "new_customer_day5": _marketing(
        "欢迎来到{{ shop.name }}",
        "{{ customer.name }}您好，欢迎成为{{ shop.name }}的新朋友！宝贝用得还顺手吗？"
        "有问题随时找客服。",
        "Welcome to {{ shop.name }}",
        "Hi {{ customer.name }}, welcome to {{ shop.name }}! How's your first order? Any "
        "questions, just ask.",
    ),
    "new_customer_day15": _marketing(
        "为您挑选的好物",
        "{{ customer.name }}您好，{{ shop.name }}有不少和您上次买的宝贝很搭的好物，有空来看看吧～",
        "Picked for you",
        "Hi {{ customer.name }}, {{ shop.name }} has more picks that go well with your "
        "first order. Take a look anytime.",
    ),
    "new_customer_day30": _marketing(
        "{{ shop.name }}随时欢迎您",
        "{{ customer.name }}您好，需要补货或想看看新品的话，{{ shop.name }}随时欢迎您回来～",
        "We're here when you need us",
        "Hi {{ customer.name }}, need a refill or curious what's new? {{ shop.name }} is "
        "here whenever you are.",
    ),
    "new_customer_day45": _marketing(
        "期待再次为您服务",
        "{{ customer.name }}您好，感谢您一直关注{{ shop.name }}！期待再次为您服务。",
        "Hope to see you again",
        "Hi {{ customer.name }}, thanks for shopping with {{ shop.name }}. We'd love to "
        "see you again.",
    ),
}
"""Every default template of the playbooks, by name."""


# Parameters ------------------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: Channel = Field(default="sms", description="'sms' or 'email'")
    template: Name
    holdout_percent: Holdout
    name: JourneyName


class UnpaidReminderParams(_Params):
    template: Name = "unpaid_reminder"
    holdout_percent: Holdout = 0
    name: JourneyName = "催付 unpaid reminder"
    delay: Delay = "PT1H"


class ShippedNoticeParams(_Params):
    template: Name = "shipped_notice"
    holdout_percent: Holdout = 0
    name: JourneyName = "发货通知 shipped notice"
    delay: Delay | None = Field(
        default=None, description="Optional wait after the shipment (ISO 8601 duration)"
    )


class DeliveryCityParams(_Params):
    template: Name = "delivery_city"
    holdout_percent: Holdout = 0
    name: JourneyName = "到达城市提醒 parcel in your city"
    stale_after_hours: StaleAfterHours = 12


class OutForDeliveryParams(_Params):
    template: Name = "out_for_delivery"
    holdout_percent: Holdout = 0
    name: JourneyName = "派件提醒 out for delivery"
    stale_after_hours: StaleAfterHours = 12


class SignedThanksParams(_Params):
    template: Name = "signed_thanks"
    holdout_percent: Holdout = 0
    name: JourneyName = "签收感谢 thanks on delivery"
    delay: Delay = "PT2H"


class LogisticsExceptionParams(_Params):
    template: Name = "logistics_exception"
    holdout_percent: Holdout = 0
    name: JourneyName = "物流异常安抚 delivery problem"
    staff_channel: Channel = Field(default="email", description="How the staff are told")
    staff_template: Name = "logistics_exception_staff"


class AfterSaleCareParams(_Params):
    template: Name = "after_sale_care"
    holdout_percent: Holdout = 10
    name: JourneyName = "售后关怀 after-sale care"
    delay: Delay = Field(default="P5D", description="After delivery; 5 to 7 days is usual")


class RepurchaseReminderParams(_Params):
    template: Name = "repurchase_reminder"
    holdout_percent: Holdout = 10
    name: JourneyName = "复购提醒 repurchase reminder"
    delay: Delay = Field(default="P30D", description="After each paid order")
    cycle_percentile: Literal[25, 50, 75, 90] | None = Field(
        default=None,
        description="Wait the shop's own repurchase cycle at this percentile instead of "
        "delay (needs enough purchase history)",
    )

    days_before_predicted_purchase: int | None = Field(
        default=None,
        ge=0,
        le=60,
        strict=True,
        description="Time each reminder this many days before the customer's own predicted "
        "next purchase (lifecycle's repurchase model; needs a fitted model); `delay` then "
        "only serves customers without a prediction",
    )

    @model_validator(mode="after")
    def _one_delay(self) -> RepurchaseReminderParams:
        if self.cycle_percentile is not None and "delay" in self.model_fields_set:
            raise ValueError("give either 'delay' or 'cycle_percentile', not both")
        if self.cycle_percentile is not None and self.days_before_predicted_purchase is not None:
            raise ValueError(
                "give either 'cycle_percentile' or 'days_before_predicted_purchase', not both"
            )
        return self


class WinBackParams(_Params):
    template: Name = "win_back"
    holdout_percent: Holdout = 10
    name: JourneyName = "沉睡唤醒 win-back"
    second_delay: Delay = Field(default="P7D", description="Wait before the second message")
    second_template: Name = "win_back_second"


def _increasing(days: list[int]) -> list[int]:
    if any(a >= b for a, b in itertools.pairwise(days)):
        raise ValueError("the days must increase")
    return days


class NewCustomerPlanParams(_Params):
    template: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_.-]{1,58}$",
            description="Prefix of the four templates: {template}_day5, _day15, _day30, _day45",
        ),
    ] = "new_customer"
    holdout_percent: Holdout = 10
    name: JourneyName = "新客培育 new customer plan"
    days: Annotated[
        list[Annotated[int, Field(ge=1, le=3650, strict=True)]],
        Field(
            min_length=4,
            max_length=4,
            description="Days since the first purchase of the four messages",
        ),
        AfterValidator(_increasing),
    ] = [5, 15, 30, 45]


# Builders --------------------------------------------------------------------------------

NEW_CUSTOMER_SUFFIXES = ("_day5", "_day15", "_day30", "_day45")


def _send(
    channel: str, template: str, step_id: str = "send", to: str | None = None
) -> dict[str, Any]:
    send: dict[str, Any] = {"channel": channel, "template": template}
    if to is not None:
        send["to"] = to
    return {"id": step_id, "send": send}


def _definition(
    p: _Params,
    *,
    category: Literal["transactional", "marketing"],
    key: Literal["order", "customer"],
    trigger: dict[str, Any],
    steps: list[dict[str, Any]],
    goals: list[dict[str, Any]] | None = None,
    reentry: dict[str, Any],
) -> dict[str, Any]:
    definition: dict[str, Any] = {
        "name": p.name,
        "category": category,
        "trigger": trigger,
        "key": key,
        "steps": steps,
        "goals": goals or [],
        "reentry": reentry,
        "holdout_percent": p.holdout_percent,
    }
    return definition


def _fresh(event: str, stale_after_hours: int) -> dict[str, Any]:
    return {
        "event": event,
        "if": {"field": "event.age_hours", "op": "lte", "value": stale_after_hours},
    }


def _stage_is(field: str, stage: str) -> dict[str, Any]:
    return {"field": field, "op": "eq", "value": stage}


def _unpaid_reminder(p: UnpaidReminderParams, context: Mapping[str, Any]) -> dict[str, Any]:
    return _definition(
        p,
        category="transactional",
        key="order",
        trigger={"event": "order.created"},
        steps=[{"id": "wait", "wait": p.delay}, _send(p.channel, p.template, "remind")],
        goals=[
            {"event": "order.paid", "match": "order"},
            {"event": "order.cancelled", "match": "order"},
        ],
        reentry={"per": "order"},
    )


def _shipped_notice(p: ShippedNoticeParams, context: Mapping[str, Any]) -> dict[str, Any]:
    steps = []
    if p.delay is not None and parse_duration(p.delay) > timedelta(0):
        steps.append({"id": "wait", "wait": p.delay})
    steps.append(_send(p.channel, p.template, "notify"))
    return _definition(
        p,
        category="transactional",
        key="order",
        trigger={"event": "order.shipped"},
        steps=steps,
        reentry={"per": "order"},
    )


def _delivery_city(p: DeliveryCityParams, context: Mapping[str, Any]) -> dict[str, Any]:
    return _definition(
        p,
        category="transactional",
        key="order",
        trigger=_fresh("logistics.arrived_city", p.stale_after_hours),
        steps=[_send(p.channel, p.template, "notify")],
        goals=[{"event": "logistics.delivered", "match": "order"}],
        reentry={"per": "order"},
    )


def _out_for_delivery(p: OutForDeliveryParams, context: Mapping[str, Any]) -> dict[str, Any]:
    return _definition(
        p,
        category="transactional",
        key="order",
        trigger=_fresh("logistics.out_for_delivery", p.stale_after_hours),
        steps=[_send(p.channel, p.template, "notify")],
        goals=[{"event": "logistics.delivered", "match": "order"}],
        reentry={"per": "order"},
    )


def _signed_thanks(p: SignedThanksParams, context: Mapping[str, Any]) -> dict[str, Any]:
    return _definition(
        p,
        category="transactional",
        key="order",
        trigger={"event": "logistics.delivered"},
        steps=[{"id": "wait", "wait": p.delay}, _send(p.channel, p.template, "thanks")],
        reentry={"per": "order"},
    )


def _logistics_exception(p: LogisticsExceptionParams, context: Mapping[str, Any]) -> dict[str, Any]:
    return _definition(
        p,
        category="transactional",
        key="order",
        trigger={"event": "logistics.exception"},
        steps=[
            _send(p.channel, p.template, "soothe"),
            _send(p.staff_channel, p.staff_template, "alert_staff", to="staff"),
        ],
        reentry={"per": "order"},
    )


def _after_sale_care(p: AfterSaleCareParams, context: Mapping[str, Any]) -> dict[str, Any]:
    return _definition(
        p,
        category="marketing",
        key="order",
        trigger={"event": "logistics.delivered"},
        steps=[{"id": "wait", "wait": p.delay}, _send(p.channel, p.template, "care")],
        reentry={"per": "order"},
    )


NO_CYCLE = "the shop has no repurchase cycle yet; give a delay"


def _cycle_delay(percentile: int, context: Mapping[str, Any]) -> str:
    cycles = context.get("repurchase_cycle_days")
    days = cycles.get(str(percentile)) if isinstance(cycles, Mapping) else None
    if days is None:
        raise ValueError(NO_CYCLE)
    if (
        isinstance(days, bool)
        or not isinstance(days, int | float)
        or not math.isfinite(days)
        or days <= 0
    ):
        raise ValueError(
            f"repurchase_cycle_days[{str(percentile)!r}] must be a positive number of days"
        )
    return format_duration(timedelta(days=days))


NO_MODEL = "the shop has no repurchase model yet; give a delay"

_NEW_FIGURES = {
    "field": "event.reason",
    "op": "in",
    "value": ["first", "purchase"],
}
"""A customer's figures after a purchase (or their first ones): when a predicted reminder
starts afresh."""


def _repurchase_reminder(p: RepurchaseReminderParams, context: Mapping[str, Any]) -> dict[str, Any]:
    if p.days_before_predicted_purchase is not None:
        if not context.get("repurchase_model"):
            raise ValueError(str(context.get("repurchase_model_reason") or NO_MODEL))
        renewed = {"event": "customer.prediction_changed", "if": _NEW_FIGURES}
        return _definition(
            p,
            category="marketing",
            key="customer",
            trigger=renewed,
            steps=[
                {
                    "id": "wait",
                    "wait_until_date": {
                        "field": "customer.next_purchase_at",
                        "offset": f"-P{p.days_before_predicted_purchase}D",
                        "otherwise": p.delay,
                    },
                },
                _send(p.channel, p.template, "remind"),
            ],
            goals=[{**renewed, "match": "customer"}],
            reentry={"per": "always"},
        )
    delay = p.delay if p.cycle_percentile is None else _cycle_delay(p.cycle_percentile, context)
    return _definition(
        p,
        category="marketing",
        key="customer",
        trigger={"event": "order.paid"},
        steps=[{"id": "wait", "wait": delay}, _send(p.channel, p.template, "remind")],
        goals=[{"event": "order.paid", "match": "customer"}],
        reentry={"per": "always"},
    )


def _win_back(p: WinBackParams, context: Mapping[str, Any]) -> dict[str, Any]:
    return _definition(
        p,
        category="marketing",
        key="customer",
        trigger={"event": "customer.stage_changed", "if": _stage_is("event.stage", "sleeping")},
        steps=[
            _send(p.channel, p.template, "send"),
            {"id": "wait", "wait": p.second_delay},
            {
                "id": "check",
                "branch": {
                    "if": _stage_is("customer.stage", "sleeping"),
                    "then": "send_again",
                    "else": "awake",
                },
            },
            {"id": "awake", "exit": "no_longer_sleeping"},
            _send(p.channel, p.second_template, "send_again"),
        ],
        goals=[{"event": "order.paid", "match": "customer"}],
        reentry={"per": "customer_days", "days": 90},
    )


def _new_customer_plan(p: NewCustomerPlanParams, context: Mapping[str, Any]) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    previous = 0
    for day, suffix in zip(p.days, NEW_CUSTOMER_SUFFIXES, strict=True):
        steps.append({"id": f"wait_day{day}", "wait": f"P{day - previous}D"})
        steps.append(_send(p.channel, f"{p.template}{suffix}", f"day{day}"))
        previous = day
    return _definition(
        p,
        category="marketing",
        key="customer",
        trigger={"event": "customer.stage_changed", "if": _stage_is("event.stage", "new")},
        steps=steps,
        reentry={"per": "customer"},
    )


class PromotionWavesParams(_Params):
    template: Name = Field(
        default="promotion_waves",
        description="prefix of the three templates: `_warmup`, `_launch`, `_eve`",
    )
    holdout_percent: Holdout = 10
    name: JourneyName = "大促预热 promotion waves"
    promotion_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    at: Annotated[str, Field(pattern=r"^\d\d:\d\d$")] = "10:00"
    likely_days: Annotated[int, Field(ge=1, le=3650, strict=True)] = 90


def _promotion_waves(p: PromotionWavesParams, context: Mapping[str, Any]) -> dict[str, Any]:
    past_buyer = {"field": "customer.frequency", "op": "gte", "value": 1}
    high_value = {
        "any": [
            {"field": "customer.level", "op": "not_null"},
            {"field": "customer.cart_open", "op": "eq", "value": True},
        ]
    }
    likely = {
        "any": [
            {"field": "customer.recency_days", "op": "lte", "value": p.likely_days},
            {"field": "customer.cart_open", "op": "eq", "value": True},
        ]
    }
    return _definition(
        p,
        category="marketing",
        key="customer",
        trigger={
            "promotion": {
                "id": p.promotion_id,
                "offset": "-P7D",
                "at": p.at,
                "audience": {"any": [past_buyer, high_value, likely]},
            }
        },
        steps=[
            {"id": "past_buyers", "branch": {"if": past_buyer, "then": "warmup", "else": "wait3"}},
            _send(p.channel, f"{p.template}_warmup", "warmup"),
            {"id": "wait3", "wait": "P4D"},
            {"id": "high_value", "branch": {"if": high_value, "then": "launch", "else": "wait1"}},
            _send(p.channel, f"{p.template}_launch", "launch"),
            {"id": "wait1", "wait": "P2D"},
            {"id": "likely", "branch": {"if": likely, "then": "eve", "else": "done"}},
            _send(p.channel, f"{p.template}_eve", "eve"),
            {"id": "done", "exit": "waves_done"},
        ],
        goals=[{"event": "order.paid", "match": "customer"}],
        reentry={"per": "customer"},
    )


# The catalogue ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Playbook:
    name: str
    summary: str
    """One line, English."""
    params: type[BaseModel]
    """extra="forbid"; its JSON schema is what GET /v1/playbooks shows."""
    build: Callable[[Any, Mapping[str, Any]], dict[str, Any]]
    """(validated params, context) -> definition dict."""
    templates: Mapping[str, Mapping[str, Mapping[str, str]]]
    """The default templates its definitions send: name -> {"zh-CN": {"text", "subject"},
    "en": {...}}."""


def _playbook(
    name: str,
    summary: str,
    params: type[BaseModel],
    build: Callable[[Any, Mapping[str, Any]], dict[str, Any]],
    templates: tuple[str, ...],
) -> Playbook:
    return Playbook(name, summary, params, build, {t: TEMPLATES[t] for t in templates})


PLAYBOOKS: dict[str, Playbook] = {
    p.name: p
    for p in (
        _playbook(
            "unpaid_reminder",
            "Remind the buyer of an unpaid order an hour after checkout.",
            UnpaidReminderParams,
            _unpaid_reminder,
            ("unpaid_reminder",),
        ),
        _playbook(
            "shipped_notice",
            "Tell the buyer the order has shipped, with carrier and tracking number.",
            ShippedNoticeParams,
            _shipped_notice,
            ("shipped_notice",),
        ),
        _playbook(
            "delivery_city",
            "Tell the buyer the parcel has reached their city (once per order).",
            DeliveryCityParams,
            _delivery_city,
            ("delivery_city",),
        ),
        _playbook(
            "out_for_delivery",
            "Tell the buyer the parcel is out for delivery (once per order).",
            OutForDeliveryParams,
            _out_for_delivery,
            ("out_for_delivery",),
        ),
        _playbook(
            "signed_thanks",
            "Thank the buyer after delivery and invite a review.",
            SignedThanksParams,
            _signed_thanks,
            ("signed_thanks",),
        ),
        _playbook(
            "logistics_exception",
            "Soothe the buyer when a parcel runs into trouble and alert the shop's staff.",
            LogisticsExceptionParams,
            _logistics_exception,
            ("logistics_exception", "logistics_exception_staff"),
        ),
        _playbook(
            "after_sale_care",
            "Check in with the buyer 5 to 7 days after delivery.",
            AfterSaleCareParams,
            _after_sale_care,
            ("after_sale_care",),
        ),
        _playbook(
            "repurchase_reminder",
            "Remind the customer to restock one repurchase cycle after each purchase.",
            RepurchaseReminderParams,
            _repurchase_reminder,
            ("repurchase_reminder",),
        ),
        _playbook(
            "win_back",
            "Win back customers who fall asleep, with a second try a week later.",
            WinBackParams,
            _win_back,
            ("win_back", "win_back_second"),
        ),
        _playbook(
            "new_customer_plan",
            "Nurture a first-time buyer with messages on days 5, 15, 30 and 45.",
            NewCustomerPlanParams,
            _new_customer_plan,
            tuple(f"new_customer{s}" for s in NEW_CUSTOMER_SUFFIXES),
        ),
        _playbook(
            "promotion_waves",
            "Warm-up, launch and eve messages around a promotion, each to its audience.",
            PromotionWavesParams,
            _promotion_waves,
            ("promotion_waves_warmup", "promotion_waves_launch", "promotion_waves_eve"),
        ),
    )
}
"""The shipped playbooks by name."""


def make(
    name: str, params: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The journey definition of playbook `name` with `params`, checked by
    `parse_definition`. `KeyError` for an unknown playbook, a pydantic `ValidationError`
    for bad params, `ValueError` when the context lacks what the params need (see
    `repurchase_reminder`)."""
    try:
        playbook = PLAYBOOKS[name]
    except KeyError:
        raise KeyError(f"unknown playbook {name!r}; one of {sorted(PLAYBOOKS)}") from None
    validated = playbook.params.model_validate(dict(params))
    definition = playbook.build(validated, context if context is not None else {})
    parse_definition(definition)
    return definition

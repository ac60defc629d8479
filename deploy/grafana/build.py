"""Write Huitou's Grafana dashboards (deploy/grafana/dashboards/*.json).

    .venv/bin/python deploy/grafana/build.py          # write the JSON files
    .venv/bin/python deploy/grafana/build.py --check  # exit 1 when they are out of date

Plain Python writing dashboard JSON (schemaVersion 39, Grafana 11) through a few small
helpers, rather than the `grafana-foundation-sdk` package: the SDK is not among the
packages this project can install here, is generated per Grafana version and still
changes between releases, and these dashboards need nothing beyond time series, stat and
bar gauge panels. The output is deterministic (no ids or timestamps that change between
runs), so `tests/deploy/test_dashboards.py` compares the committed files with what this
writes now.

Every panel queries the datasource uid `prometheus` (provisioned by
deploy/grafana/provisioning/datasources/prometheus.yml) and has a description saying what
it shows and how to read it. Scrape jobs are named after the services (`ingest`,
`lifecycle`, `campaigns`, `notifier`); series are aggregated away from instances and
partitions. The dashboards link to each other through their `huitou` tag.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "prometheus"}
SCHEMA_VERSION = 39
JOBS = "ingest|lifecycle|campaigns|notifier"
NOT_PROBES = 'route!~"/readyz|/healthz|/metrics"'
RATE = "$__rate_interval"

Panel = dict[str, Any]


# --- helpers -------------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False) -> dict[str, Any]:
    """One PromQL query (its refId is set by `panel`)."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
    }


def quantiles(
    metric: str, by: str, selector: str = "", qs: Sequence[float] = (0.5, 0.99)
) -> list[dict[str, Any]]:
    """`histogram_quantile` of a histogram family for each q, per `by` label."""
    inner = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
    return [
        target(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({inner}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in qs
    ]


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


def timeseries(
    title: str,
    description: str,
    targets: Sequence[dict[str, Any]],
    *,
    unit: str = "short",
    stack: bool = False,
    bars: bool = False,
    threshold: float | None = None,
    width: int = 12,
    height: int = 8,
) -> Panel:
    """A time series panel; `threshold` draws a red dashed line (an alert's bound)."""
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 30 if stack or bars else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "off" if threshold is None else "dashed"},
    }
    steps: list[tuple[float | None, str]] = [(None, "green")]
    if threshold is not None:
        steps.append((threshold, "red"))
    return _panel(
        "timeseries",
        title,
        description,
        targets,
        width=width,
        height=height,
        field={"unit": unit, "min": 0, "custom": custom, "thresholds": _thresholds(steps)},
        options={
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["mean", "max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def stat(
    title: str,
    description: str,
    targets: Sequence[dict[str, Any]],
    *,
    unit: str = "short",
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),),
    width: int = 6,
    height: int = 5,
) -> Panel:
    """A stat panel: the last value of each series, coloured by `steps`."""
    return _panel(
        "stat",
        title,
        description,
        targets,
        width=width,
        height=height,
        field={"unit": unit, "thresholds": _thresholds(steps)},
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "value_and_name",
        },
    )


def bargauge(
    title: str,
    description: str,
    targets: Sequence[dict[str, Any]],
    *,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
) -> Panel:
    """A horizontal bar gauge of the last value of each series (a distribution)."""
    return _panel(
        "bargauge",
        title,
        description,
        targets,
        width=width,
        height=height,
        field={"unit": unit, "min": 0, "thresholds": _thresholds([(None, "blue")])},
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
        },
    )


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: Sequence[dict[str, Any]],
    *,
    width: int,
    height: int,
    field: dict[str, Any],
    options: dict[str, Any],
) -> Panel:
    refs = "ABCDEFGHIJ"
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "targets": [{**t, "refId": refs[i]} for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": field, "overrides": []},
        "options": options,
    }


def layout(panels: Sequence[Panel]) -> list[Panel]:
    """Number the panels (ids 1, 2, …) and place them left to right, top to bottom, on
    Grafana's 24-column grid: a panel that does not fit the row's rest starts a new row."""
    placed: list[Panel] = []
    x = y = row_height = 0
    for number, panel in enumerate(panels, start=1):
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + w > 24:
            x, y, row_height = 0, y + row_height, 0
        placed.append({"id": number, **panel, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
        x += w
        row_height = max(row_height, h)
    return placed


def dashboard(uid: str, title: str, description: str, panels: Sequence[Panel]) -> dict[str, Any]:
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["huitou"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {"list": []},
        "templating": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "title": "Huitou",
                "tags": ["huitou"],
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
                "icon": "external link",
                "tooltip": "",
                "url": "",
            }
        ],
        "panels": layout(panels),
    }


# --- shared expressions --------------------------------------------------------------------


def lag_by_group(selector: str = "") -> str:
    """Consumer lag per group, each partition counted once (a replica that lost a partition
    in a rebalance may still report its last value for it)."""
    lag = f"huitou_consumer_lag{{{selector}}}" if selector else "huitou_consumer_lag"
    return f"sum by (group) (max by (group, topic, partition) ({lag}))"


# --- dashboards ----------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    http = f"huitou_http_requests_total{{{NOT_PROBES}}}"
    http_5xx = f'huitou_http_requests_total{{status=~"5..", {NOT_PROBES}}}'
    return dashboard(
        "huitou-overview",
        "Huitou / Overview",
        "Health of the four services, HTTP, the bus and its consumer groups, dead letters "
        "and durable timers. Alerts: deploy/prometheus/alerts.yml; runbooks: docs/runbooks.md.",
        [
            stat(
                "Targets up",
                "Scrape targets answering /metrics, per service (`up`). Red: none of a "
                "service's processes answers (alert HuitouTargetDown).",
                [target(f'sum by (job) (up{{job=~"{JOBS}"}})', "{{job}}", instant=True)],
                steps=[(None, "red"), (1, "green")],
                width=6,
            ),
            stat(
                "Processes not ready",
                "Processes whose last /readyz check failed (`huitou_ready == 0`), per service. "
                "The /readyz body names the failing check (alert HuitouNotReady).",
                [
                    target(
                        "count by (job) (huitou_ready == 0) or sum by (job) (huitou_ready) * 0",
                        "{{job}}",
                        instant=True,
                    )
                ],
                steps=[(None, "green"), (1, "red")],
                width=6,
            ),
            stat(
                "Dead letters (last hour)",
                "Messages moved to a dead-letter topic over the last hour, all groups "
                "(`huitou_dead_letters_total`). Anything above zero: see the runbook "
                "(`huitou dlt replay <topic>` once the cause is fixed).",
                [
                    target(
                        "sum(increase(huitou_dead_letters_total[1h])) or vector(0)",
                        "dead letters",
                        instant=True,
                    )
                ],
                steps=[(None, "green"), (1, "orange")],
                width=6,
            ),
            stat(
                "Consumer lag (all groups)",
                "Messages published but not yet consumed, over every consumer group "
                "(`huitou_consumer_lag`, each partition counted once).",
                [target(f"sum({lag_by_group()})", "lag", instant=True)],
                steps=[(None, "green"), (1000, "orange"), (10000, "red")],
                width=6,
            ),
            timeseries(
                "HTTP requests by service and status",
                "Requests per second each service answered, by status code "
                "(`huitou_http_requests_total`; /readyz, /healthz and /metrics left out).",
                [target(f"sum by (job, status) (rate({http}[{RATE}]))", "{{job}} {{status}}")],
                unit="reqps",
            ),
            timeseries(
                "HTTP 5xx ratio by service",
                "Share of requests answered with a 5xx, per service (probes left out). The "
                "dashed line is HuitouHttp5xxRatioHigh's 5% bound (it also needs 50 requests "
                "in 5 minutes). On ingest a 503 is a webhook refused because the bus did not "
                "acknowledge it.",
                [
                    target(
                        f"sum by (job) (rate({http_5xx}[{RATE}])) / "
                        f"sum by (job) (rate({http}[{RATE}]))",
                        "{{job}}",
                    )
                ],
                unit="percentunit",
                threshold=0.05,
            ),
            timeseries(
                "HTTP latency by service",
                "Median and 99th percentile of request handling time per service "
                "(`huitou_http_request_seconds`, probes left out).",
                [
                    target(
                        f"histogram_quantile({q}, sum by (job, le) "
                        f"(rate(huitou_http_request_seconds_bucket{{{NOT_PROBES}}}[{RATE}])))",
                        f"p{round(q * 100)} {{{{job}}}}",
                    )
                    for q in (0.5, 0.99)
                ],
                unit="s",
            ),
            timeseries(
                "Consumer lag by group",
                "Messages not yet consumed per consumer group, over its topics and "
                "partitions (`huitou_consumer_lag`). A line that keeps rising means the group "
                "consumes slower than messages arrive or has stopped (HuitouConsumerLagGrowing "
                "fires above 1000 and growing).",
                [target(lag_by_group(), "{{group}}")],
                threshold=1000,
            ),
            timeseries(
                "Messages consumed by group",
                "Messages handled and committed per second, per consumer group "
                "(`huitou_consumer_messages_total`). Compare with the lag: a group whose lag "
                "rises while this stays flat has stopped.",
                [
                    target(
                        f"sum by (group) (rate(huitou_consumer_messages_total[{RATE}]))",
                        "{{group}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Dead letters and retries by group",
                "Dead letters per 5 minutes by consumer group and topic "
                "(`huitou_dead_letters_total`: messages that failed every attempt, now in "
                "`<topic>.dlt`), and handler failures that were retried per 5 minutes "
                "(`huitou_consumer_retries_total`). Retries without dead letters are "
                "transient failures that recovered.",
                [
                    target(
                        "sum by (group, topic) (increase(huitou_dead_letters_total[5m]))",
                        "dead: {{group}} {{topic}}",
                    ),
                    target(
                        "sum by (group) (increase(huitou_consumer_retries_total[5m]))",
                        "retried: {{group}}",
                    ),
                ],
                bars=True,
            ),
            timeseries(
                "Consumer batch time by group",
                "Median and 99th percentile of handler time per consumed batch, per group "
                "(`huitou_consumer_batch_seconds`: one database transaction per batch).",
                quantiles("huitou_consumer_batch_seconds", "group"),
                unit="s",
            ),
            timeseries(
                "Bus: messages published by topic",
                "Messages durably published per second, by topic "
                "(`huitou_bus_published_total`), and outbox rows relayed to the bus per "
                "service (`huitou_outbox_relayed_total`).",
                [
                    target(
                        f"sum by (topic) (rate(huitou_bus_published_total[{RATE}]))", "{{topic}}"
                    ),
                    target(
                        f"sum by (service) (rate(huitou_outbox_relayed_total[{RATE}]))",
                        "outbox: {{service}}",
                    ),
                ],
                unit="ops",
            ),
            timeseries(
                "Bus publish latency",
                "Median and 99th percentile of the time from a publish call to the bus's "
                "durable acknowledgement (`huitou_bus_publish_seconds`), per service.",
                quantiles("huitou_bus_publish_seconds", "job"),
                unit="s",
            ),
            timeseries(
                "Timers fired and failed by service",
                "Durable timers fired per second by service and kind "
                "(`huitou_timers_fired_total`), and timer handler failures "
                "(`huitou_timer_failures_total`): a timer that keeps failing ends in "
                "`dead_timers` (`huitou timers retry`).",
                [
                    target(
                        f"sum by (service, kind) (rate(huitou_timers_fired_total[{RATE}]))",
                        "{{service}} {{kind}}",
                    ),
                    target(
                        f"sum by (service, kind) (rate(huitou_timer_failures_total[{RATE}]))",
                        "failed: {{service}} {{kind}}",
                    ),
                ],
                unit="ops",
            ),
            timeseries(
                "Timer fire skew by service",
                "How late durable timers fired after their due time: 99th percentile per "
                "service (`huitou_timer_fire_skew_seconds`). The dashed line is "
                "HuitouTimerFireSkewHigh's 30 s bound.",
                quantiles("huitou_timer_fire_skew_seconds", "service", qs=(0.99,)),
                unit="s",
                threshold=30,
                width=24,
            ),
        ],
    )


def ingest() -> dict[str, Any]:
    return dashboard(
        "huitou-ingest",
        "Huitou / Ingest",
        "Webhook deliveries and canonical requests by platform and outcome, the events "
        "they publish, and how long handling and the bus's acknowledgement take.",
        [
            timeseries(
                "Deliveries by platform and outcome",
                "Deliveries per second by platform and outcome "
                "(`huitou_ingest_deliveries_total`): accepted, duplicate, ignored (a topic "
                "Huitou does not use), unauthorized, invalid, unknown_shop, too_large, "
                "bus_unavailable (answered 503: the platform retries).",
                [
                    target(
                        "sum by (platform, outcome) "
                        f"(rate(huitou_ingest_deliveries_total[{RATE}]))",
                        "{{platform}} {{outcome}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Refused deliveries by platform and outcome",
                "Deliveries per second that carried nothing Huitou applied, by platform and "
                "outcome: everything but accepted, duplicate and ignored. Unauthorized "
                "deliveries usually mean a shop's webhook secret changed.",
                [
                    target(
                        "sum by (platform, outcome) (rate(huitou_ingest_deliveries_total"
                        f'{{outcome!~"accepted|duplicate|ignored"}}[{RATE}]))',
                        "{{platform}} {{outcome}}",
                    )
                ],
                unit="reqps",
            ),
            timeseries(
                "Deliveries by platform and topic",
                "Deliveries per second by platform and the platform's topic "
                "(`huitou_ingest_deliveries_total`; `canonical`: Huitou's own format, "
                "`unknown`: before the signature verified, `unused`: carried no event).",
                [
                    target(
                        f"sum by (platform, topic) (rate(huitou_ingest_deliveries_total[{RATE}]))",
                        "{{platform}} {{topic}}",
                    )
                ],
                unit="reqps",
            ),
            timeseries(
                "Events published by platform and type",
                "Canonical events published to the bus per second, by platform and event "
                "type (`huitou_ingest_events_total`).",
                [
                    target(
                        f"sum by (platform, type) (rate(huitou_ingest_events_total[{RATE}]))",
                        "{{platform}} {{type}}",
                    )
                ],
                unit="ops",
                stack=True,
            ),
            timeseries(
                "Delivery handling time by platform",
                "Median, 95th and 99th percentile of the time ingest takes to handle a "
                "delivery, per platform (`huitou_ingest_request_seconds`; the histogram has "
                "no outcome label: the outcome split is the deliveries panel above).",
                quantiles("huitou_ingest_request_seconds", "platform", qs=(0.5, 0.95, 0.99)),
                unit="s",
            ),
            timeseries(
                "Bus acknowledgement time by platform",
                "Median and 99th percentile of the time the bus takes to acknowledge a "
                "delivery's events, per platform (`huitou_ingest_bus_ack_seconds`): ingest "
                "answers only after it, so this is most of the handling time.",
                quantiles("huitou_ingest_bus_ack_seconds", "platform"),
                unit="s",
            ),
        ],
    )


def lifecycle() -> dict[str, Any]:
    customers = "max by (stage) (huitou_lifecycle_customers)"
    return dashboard(
        "huitou-lifecycle",
        "Huitou / Lifecycle",
        "Customers by lifecycle stage, over every shop, and the stage transitions.",
        [
            bargauge(
                "Customers by stage (now)",
                "Customers in each stage now, over every shop (`huitou_lifecycle_customers`, "
                "counted every 60 s; the max across lifecycle processes, as only one counts "
                "at a time).",
                [target(customers, "{{stage}}", instant=True)],
            ),
            timeseries(
                "Customers by stage over time",
                "The stage distribution over time (`huitou_lifecycle_customers`, stacked): "
                "the sum is every customer that was not merged into another.",
                [target(customers, "{{stage}}")],
                stack=True,
            ),
            timeseries(
                "Stage transitions",
                "Customers moved from one stage to another per second "
                "(`huitou_lifecycle_stage_transitions_total`), by previous → current stage; "
                "`none` → x is a customer's first stage.",
                [
                    target(
                        "sum by (previous, current) "
                        f"(rate(huitou_lifecycle_stage_transitions_total[{RATE}]))",
                        "{{previous}} → {{current}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Transitions into each stage (per hour)",
                "Customers entering each stage per hour, whatever their previous stage "
                "(`huitou_lifecycle_stage_transitions_total`). Time alone moves customers "
                "on (their boundary timers), so silent → sleeping flows without traffic.",
                [
                    target(
                        "sum by (current) (increase(huitou_lifecycle_stage_transitions_total[1h]))",
                        "{{current}}",
                    )
                ],
            ),
            timeseries(
                "Lifecycle consumer lag",
                "Messages not yet consumed by lifecycle's consumer groups "
                "(`huitou_consumer_lag`): stages lag the events by this backlog.",
                [target(lag_by_group('group=~"lifecycle.*"'), "{{group}}")],
                threshold=1000,
            ),
            timeseries(
                "Lifecycle timer fire skew",
                "Median and 99th percentile of how late lifecycle's timers (stage "
                "boundaries, tag thresholds) fired, per kind "
                "(`huitou_timer_fire_skew_seconds`).",
                quantiles("huitou_timer_fire_skew_seconds", "kind", 'service="lifecycle"'),
                unit="s",
                threshold=30,
            ),
        ],
    )


def campaigns() -> dict[str, Any]:
    return dashboard(
        "huitou-campaigns",
        "Huitou / Campaigns",
        "Journeys: enrollments, steps, sends, exits, waits pending, timer fire skew and "
        "the event watermark that cancellable waits wait for.",
        [
            timeseries(
                "Enrollments by category and group",
                "Enrollments started per second (`huitou_campaigns_enrollments_total`), by "
                "category (transactional, marketing) and group (treated, or held_out: the "
                "control group that gets no message).",
                [
                    target(
                        "sum by (category, group) "
                        f"(rate(huitou_campaigns_enrollments_total[{RATE}]))",
                        "{{category}} {{group}}",
                    )
                ],
                unit="ops",
                stack=True,
            ),
            timeseries(
                "Exits by reason",
                "Enrollments ended per second, by reason (`huitou_campaigns_exits_total`: "
                "completed, a goal reached, an exit event, … `other` for free text).",
                [
                    target(
                        f"sum by (reason) (rate(huitou_campaigns_exits_total[{RATE}]))",
                        "{{reason}}",
                    )
                ],
                unit="ops",
                stack=True,
            ),
            timeseries(
                "Steps by action",
                "Journey steps executed per second, by action (`huitou_campaigns_steps_total`).",
                [
                    target(
                        f"sum by (action) (rate(huitou_campaigns_steps_total[{RATE}]))",
                        "{{action}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Send steps by category and outcome",
                "Send steps per second by category and outcome "
                "(`huitou_campaigns_sends_total`): requested (handed to the notifier), "
                "held_out, cap_skipped, cap_expired, cap_deferred (frequency caps).",
                [
                    target(
                        f"sum by (category, outcome) (rate(huitou_campaigns_sends_total[{RATE}]))",
                        "{{category}} {{outcome}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Waits pending by category",
                "Enrollments waiting on a timer, by category (`huitou_campaigns_waits_pending`"
                ", counted every 30 s; the max across campaigns processes, as only one "
                "counts at a time).",
                [target("max by (category) (huitou_campaigns_waits_pending)", "{{category}}")],
            ),
            timeseries(
                "Campaigns timer fire skew",
                "Median and 99th percentile of how late campaigns' timers (journey waits, "
                "broadcasts) fired after their due time, per kind "
                "(`huitou_timer_fire_skew_seconds`). The dashed line is "
                "HuitouTimerFireSkewHigh's 30 s bound.",
                quantiles("huitou_timer_fire_skew_seconds", "kind", 'service="campaigns"'),
                unit="s",
                threshold=30,
            ),
            timeseries(
                "Event watermark lag",
                "How far the instant before which campaigns has consumed every event trails "
                "the clock (`huitou_campaigns_watermark_lag_seconds`, set when cancellable "
                "waits fire). Above HUITOU_JOURNEY_WATERMARK_MAX_HOLD_S (60 s) such waits "
                "fire without having seen every event; the dashed line is "
                "HuitouCampaignsWatermarkStalled's 120 s bound.",
                [target("max(huitou_campaigns_watermark_lag_seconds)", "watermark lag")],
                unit="s",
                threshold=120,
            ),
            timeseries(
                "Watermark holds by outcome",
                "Cancellable waits held back per second because the pipeline had not "
                "caught up (`huitou_campaigns_watermark_holds_total`): held (then fired "
                "normally), max_hold_reached (fired anyway after the maximum hold).",
                [
                    target(
                        f"sum by (outcome) (rate(huitou_campaigns_watermark_holds_total[{RATE}]))",
                        "{{outcome}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Campaigns consumer lag",
                "Messages not yet consumed by campaigns' consumer groups "
                "(`huitou_consumer_lag`): events (campaigns) and message statuses "
                "(campaigns.statuses). This backlog holds the watermark back.",
                [target(lag_by_group('group=~"campaigns.*"'), "{{group}}")],
                threshold=1000,
                width=24,
            ),
        ],
    )


def notifier() -> dict[str, Any]:
    messages = "huitou_notifier_messages_total"
    return dashboard(
        "huitou-notifier",
        "Huitou / Notifier",
        "Messages by channel and status, provider calls by provider and outcome, their "
        "latency, and the receipts providers call back with.",
        [
            timeseries(
                "Messages by channel and status",
                "Message status changes per second, by channel and status "
                "(`huitou_notifier_messages_total`): queued, deferred, sending, sent, "
                "delivered, failed, suppressed.",
                [
                    target(
                        f"sum by (channel, status) (rate({messages}[{RATE}]))",
                        "{{channel}} {{status}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Send failure ratio by channel",
                "Failed messages over sent or failed ones, per channel "
                "(`huitou_notifier_messages_total`; suppressed messages never reached a "
                "provider and are left out). The dashed line is "
                "HuitouSendFailureRatioHigh's 10% bound (it also needs 20 messages in 15 "
                "minutes).",
                [
                    target(
                        f'sum by (channel) (rate({messages}{{status="failed"}}[{RATE}])) / '
                        f'sum by (channel) (rate({messages}{{status=~"sent|failed"}}[{RATE}]))',
                        "{{channel}}",
                    )
                ],
                unit="percentunit",
                threshold=0.1,
            ),
            timeseries(
                "Provider calls by provider and outcome",
                "Provider calls per second by provider and outcome "
                "(`huitou_notifier_provider_calls_total`): sent, retry (not sent: backed "
                "off, then failed over), failed (refused for good), unknown (answer lost: "
                "the status is queried); query_* are those status queries.",
                [
                    target(
                        "sum by (provider, outcome) "
                        f"(rate(huitou_notifier_provider_calls_total[{RATE}]))",
                        "{{provider}} {{outcome}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Provider call latency by provider",
                "Median, 95th and 99th percentile of provider call time, per provider "
                "(`huitou_notifier_provider_call_seconds`).",
                quantiles(
                    "huitou_notifier_provider_call_seconds", "provider", qs=(0.5, 0.95, 0.99)
                ),
                unit="s",
            ),
            timeseries(
                "Receipts by provider and kind",
                "Provider callbacks' receipts applied per second, by provider and kind "
                "(`huitou_notifier_receipts_total`): delivered, failed, reply, opt_out, "
                "bounce, complaint.",
                [
                    target(
                        f"sum by (provider, kind) (rate(huitou_notifier_receipts_total[{RATE}]))",
                        "{{provider}} {{kind}}",
                    )
                ],
                unit="ops",
            ),
            timeseries(
                "Notifier consumer lag",
                "Requested messages not yet taken in by the notifier "
                "(`huitou_consumer_lag`, its consumer groups): messages wait this long "
                "before they are even queued.",
                [target(lag_by_group('group=~"notifier.*"'), "{{group}}")],
                threshold=1000,
            ),
            timeseries(
                "Notifier timer fire skew",
                "Median and 99th percentile of how late the notifier's timers (sends, "
                "retries, reconciliations) fired after their due time, per kind "
                "(`huitou_timer_fire_skew_seconds`): retries and quiet-hours sends go out "
                "this late.",
                quantiles("huitou_timer_fire_skew_seconds", "kind", 'service="notifier"'),
                unit="s",
                threshold=30,
                width=24,
            ),
        ],
    )


DASHBOARDS = {
    "huitou-overview.json": overview,
    "huitou-ingest.json": ingest,
    "huitou-lifecycle.json": lifecycle,
    "huitou-campaigns.json": campaigns,
    "huitou-notifier.json": notifier,
}
"""File name → dashboard (`docker-compose.yml` makes huitou-overview.json Grafana's home)."""


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """File name → the JSON text this script writes."""
    return {name: render(build()) for name, build in DASHBOARDS.items()}


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def main(argv: Sequence[str]) -> int:
    files = rendered()
    if "--check" in argv:
        stale = [n for n, text in files.items() if _read(OUT / n) != text]
        extra = sorted(p.name for p in OUT.glob("*.json") if p.name not in files)
        for name in stale + extra:
            print(f"out of date: deploy/grafana/dashboards/{name}")
        return 1 if stale or extra else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote deploy/grafana/dashboards/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

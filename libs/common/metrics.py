"""Every Prometheus metric the shared plumbing exposes, defined once.

Services add their own business metrics next to their code; these cover the bus,
consumers, outbox, timers and HTTP, labelled by service or consumer group.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SKEW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

BUS_PUBLISHED = Counter("huitou_bus_published_total", "Messages durably published", ["topic"])
BUS_PUBLISH_SECONDS = Histogram(
    "huitou_bus_publish_seconds",
    "Time from publish call to durable acknowledgement of the whole call",
    buckets=LATENCY_BUCKETS,
)
CONSUMED = Counter(
    "huitou_consumer_messages_total", "Messages handled and committed", ["group", "topic"]
)
CONSUMER_BATCH_SECONDS = Histogram(
    "huitou_consumer_batch_seconds", "Handler time per batch", ["group"], buckets=LATENCY_BUCKETS
)
CONSUMER_RETRIES = Counter(
    "huitou_consumer_retries_total", "Handler failures that were retried", ["group"]
)
CONSUMER_LAG = Gauge(
    "huitou_consumer_lag", "Messages not yet consumed", ["group", "topic", "partition"]
)
DEAD_LETTERS = Counter(
    "huitou_dead_letters_total", "Messages moved to a dead-letter topic", ["group", "topic"]
)
OUTBOX_RELAYED = Counter("huitou_outbox_relayed_total", "Outbox rows published", ["service"])
TIMERS_FIRED = Counter("huitou_timers_fired_total", "Timers fired", ["service", "kind"])
TIMER_FIRE_SKEW = Histogram(
    "huitou_timer_fire_skew_seconds",
    "How late a timer fired after its due time",
    ["service", "kind"],
    buckets=SKEW_BUCKETS,
)
TIMER_FAILURES = Counter(
    "huitou_timer_failures_total", "Timer handler failures", ["service", "kind"]
)
HTTP_REQUESTS = Counter(
    "huitou_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "huitou_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
READY = Gauge(
    "huitou_ready",
    "1 when this process's last /readyz check passed, 0 when it failed (set at each check: "
    "the orchestrator's readiness probe keeps it current)",
)

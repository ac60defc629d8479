"""Ingest's own metrics: deliveries by platform, topic and outcome, and their latency."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from libs.common.metrics import LATENCY_BUCKETS

DELIVERIES = Counter(
    "huitou_ingest_deliveries_total",
    "Webhook deliveries and canonical requests by outcome",
    ["platform", "topic", "outcome"],
)
"""outcome: accepted, duplicate, ignored (a topic Huitou does not use), unauthorized,
invalid, unknown_shop, too_large, bus_unavailable. topic: the platform's topic of a delivery
that carried events, `canonical` for Huitou's own format, `unknown` before the signature
verified, `unused` for one that carried none (a sender's topic is free text otherwise)."""

EVENTS = Counter("huitou_ingest_events_total", "Canonical events published", ["platform", "type"])
REQUEST_SECONDS = Histogram(
    "huitou_ingest_request_seconds",
    "Delivery handling time",
    ["platform"],
    buckets=LATENCY_BUCKETS,
)
BUS_ACK_SECONDS = Histogram(
    "huitou_ingest_bus_ack_seconds",
    "Time for the bus to acknowledge a delivery's events",
    ["platform"],
    buckets=LATENCY_BUCKETS,
)

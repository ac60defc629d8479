"""One settings object for every service, read from `HUITOU_*` environment variables.

The defaults are the embedded mode: SQLite files and the embedded bus under the data folder.
Setting `HUITOU_DATABASE_URL` to `postgresql+asyncpg://…` and `HUITOU_BUS_URL` to
`kafka://host:port[,host:port]` switches to the distributed mode; nothing else changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of Huitou; each field is the env var `HUITOU_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="HUITOU_", extra="ignore")

    data_dir: Path = Path(".huitou")
    database_url: str | None = None
    """None: one SQLite file per service under `data_dir` (embedded)."""
    bus_url: str | None = None
    """None: the embedded bus, durable in `data_dir/bus.db`."""
    admin_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000

    topic_namespace: str = ""
    """Prefix of every topic name and Kafka consumer group id, so several environments can
    share one Kafka cluster without sharing (and rebalancing) each other's groups."""
    topic_partitions: int = Field(default=12, ge=1)
    topic_replication_factor: int = Field(default=3, ge=1)
    """Replicas of each Kafka topic Huitou creates (production: 3; one broker: 1)."""
    topic_min_insync_replicas: int = Field(default=2, ge=1)
    """`min.insync.replicas` of each topic Huitou creates: with `acks=all` a publish is
    acknowledged only once this many replicas hold it (production: 2; one broker: 1)."""
    kafka_idempotence: bool = True
    """Off against brokers without idempotent producers (the Tansu build used in tests)."""

    consumer_batch_size: int = Field(default=500, ge=1)
    consumer_max_attempts: int = Field(default=5, ge=1)
    """Attempts per message before it goes to the dead-letter topic with its error."""
    consumer_retry_backoff_s: float = Field(default=0.2, ge=0)
    consumer_session_timeout_ms: int = Field(default=10_000, ge=1_000, le=300_000)
    """Kafka group session: a member silent this long is taken out of the group and its
    partitions reassigned (heartbeats every third of it). Shorter moves a dead member's
    partitions sooner (and some brokers, Tansu among them, hold a join for half of it);
    longer rides out longer pauses without a rebalance."""
    consumer_fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000)
    """Longest a Kafka fetch waits on the broker when no message is there. Kafka answers as
    soon as a message arrives, but brokers that do not (Tansu answers only at this bound)
    add up to this much to every hop; Kafka clients' default of 500 ms made a hop take
    65 ms at the median and 212 ms at worst on Tansu, 100 ms makes it 5–8 ms and 35 ms.
    Lower means more empty fetches while idle (10 a second per consumer at 100 ms)."""
    consumer_stuck_after_s: float = Field(default=300, gt=0)
    """A consumer or timer worker that completed nothing (no fetch, no handler call) for
    this long is reported stuck by `/readyz`."""

    outbox_batch_size: int = Field(default=500, ge=1)
    timer_batch_size: int = Field(default=500, ge=1)
    timer_poll_interval_s: float = Field(default=0.5, gt=0)
    timer_max_attempts: int = Field(default=10, ge=1)
    timer_workers: int = Field(default=2, ge=1, le=16)
    """Timer workers per service process on PostgreSQL. Their claims skip each other's
    locked rows, so one worker's Python runs while another's statements do (campaigns'
    reminder fires: 4,521/s with one, 6,269/s with two, 6,839/s with three on 2 cores).
    SQLite has a single writer: one worker there, whatever this says."""

    inbox_retention_days: float = Field(default=14, gt=0)
    """How long processed event ids are kept for deduplication."""

    embedded_partitions: int = Field(default=8, ge=1)
    embedded_retention_hours: float = Field(default=168, gt=0)

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest webhook or event request ingest reads; larger ones get 413."""
    dedupe_horizon_hours: float = Field(default=72, gt=0)
    """How long ingest remembers published event ids (senders' retry horizon: Shopify
    retries for 48 hours)."""
    bus_publish_timeout_s: float = Field(default=10, gt=0)
    """How long a publish waits for the bus (Kafka, or the embedded bus's `bus.db`) before
    it raises `BusUnavailable` and ingest answers 503."""
    lifecycle_url: str | None = None
    """Base URL of the lifecycle service, for the reads campaigns makes on an operator's
    behalf (a shop's repurchase cycle for a playbook); default: this process
    (`http://127.0.0.1:<port>`, right in the embedded mode)."""
    notifier_url: str | None = None
    """Base URL of the notifier, where campaigns saves a playbook's default templates
    (with the operator's key) when the shop has none of that name; default: this process."""
    campaigns_url: str | None = None
    """Base URL of the campaigns service, for the operator console (served by ingest);
    default: this process."""
    journey_watermark_max_hold_s: float = Field(default=60, ge=0)
    """How long past its due time a wait that an event could cancel may be held while
    campaigns has not consumed every partition up to that time (then it fires anyway)."""
    public_url: str | None = None
    """Base URL at which recipients and providers reach the platform's public routes
    (`/v1/unsubscribe/...` links in messages, `/v1/callbacks/...` for providers'
    receipts and replies), e.g. `https://crm.example.com`; default: this process
    (`http://127.0.0.1:<port>`, right only on one machine)."""
    notifier_reconcile_after_s: float = Field(default=60, gt=0)
    """How long a provider call may stay unanswered before the notifier asks the provider
    whether it has the message (the safety net for a call whose answer was lost, or a
    process that died between the provider's answer and its record)."""
    notifier_retry_base_s: float = Field(default=2, gt=0)
    """The first retry's delay after a provider's transient failure (timeout, 5xx,
    throttling), doubling with each attempt (with jitter, at most 5 minutes); also how
    soon a call whose answer was lost is checked with the provider."""

    notifier_default_smtp: dict[str, Any] | None = None
    """The email channel of every shop that configured none (default: the `outbox`
    provider, which sends nothing): the `smtp` provider's settings as JSON, e.g.
    `{"host": "mailpit", "port": 1025, "tls": "none", "from": "Huitou <noreply@huitou.local>"}`
    (Docker Compose points it at Mailpit). A shop's own channel always wins."""
    shutdown_grace_s: float = Field(default=20, ge=0)
    """On SIGTERM, how long the process lets in-flight HTTP requests finish, and then how
    long each consumer may take to finish its current batch, commit it and leave its group
    (after that the batch is rolled back and delivered again). Kubernetes'
    `terminationGracePeriodSeconds` must cover twice this plus the `preStop` delay."""

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> Self:
        if self.topic_min_insync_replicas > self.topic_replication_factor:
            raise ValueError(
                "HUITOU_TOPIC_MIN_INSYNC_REPLICAS cannot exceed HUITOU_TOPIC_REPLICATION_FACTOR"
            )
        return self

    @property
    def embedded_bus(self) -> bool:
        return self.bus_url is None or self.bus_url.startswith("embedded")

    @property
    def kafka_bootstrap(self) -> list[str]:
        """`kafka://a:9092,b:9092` as aiokafka's bootstrap list."""
        assert self.bus_url is not None
        return self.bus_url.split("://", 1)[1].split(",")

    def database_url_for(self, service: str) -> str:
        """The service's own database: a SQLite file each, or its schema in PostgreSQL."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{service}.db').resolve()}"

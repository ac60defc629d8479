"""`huitou`: run the platform (`up`), one service (`serve`), migrations (`migrate`), and
the way back for what failed: `dlt replay <topic>` re-publishes a topic's dead letters,
`timers retry [--service X]` makes dead timers due again (README, "Operations")."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import threading
import time
from collections.abc import Sequence

import httpx
import uvicorn

from libs.common.bus import BusConfigurationError, create_bus, replay_dead_letters
from libs.common.bus.base import dead_letter_topic
from libs.common.db import Database
from libs.common.events import topic_name
from libs.common.http import build_app
from libs.common.logs import configure_logging
from libs.common.service import LOGICAL_TOPICS, Runtime, ServiceSpec
from libs.common.settings import Settings
from libs.common.timers import retry_dead_timers
from services.platform import SERVICES


def _admin_key(settings: Settings) -> tuple[str, bool]:
    """The admin key: from HUITOU_ADMIN_KEY, else (embedded only) kept in the data folder.

    Returns the key and whether it comes from the data folder (then it is printed)."""
    if settings.admin_key:
        return settings.admin_key, False
    if settings.database_url or not settings.embedded_bus:
        sys.exit("HUITOU_ADMIN_KEY must be set in distributed mode")
    path = settings.data_dir / "admin_key"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(f"hk_admin_{secrets.token_urlsafe(32)}\n")
        path.chmod(0o600)
    return path.read_text().strip(), True


async def _check_bus(settings: Settings) -> None:
    """Start the bus and create the topics once before serving, so a bus that refuses its
    settings (a broker rejecting the idempotent producer, or topics with more replicas
    than it has brokers) ends the start-up with one clear line, not a traceback."""
    bus = create_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([topic_name(t, settings.topic_namespace) for t in LOGICAL_TOPICS])
    finally:
        await bus.stop()


def _serve(settings: Settings, specs: Sequence[ServiceSpec]) -> None:
    configure_logging(settings.log_level)
    if not settings.embedded_bus:
        try:
            asyncio.run(_check_bus(settings))
        except BusConfigurationError as exc:
            sys.exit(f"huitou: {exc}")
        except Exception as exc:
            sys.exit(f"huitou: the bus at {settings.bus_url} is not usable: {exc!r}")
    key, generated = _admin_key(settings)
    settings = settings.model_copy(update={"admin_key": key})
    if generated:
        print(f"Huitou admin key (kept in {settings.data_dir / 'admin_key'}): {key}", flush=True)
    print(
        f"Huitou ({', '.join(s.name for s in specs)}) on http://{settings.host}:"
        f"{settings.port}  docs: http://{settings.host}:{settings.port}/docs",
        flush=True,
    )
    if generated and any(s.name == "ingest" for s in specs):
        threading.Thread(target=_demo_shop, args=(settings,), daemon=True).start()
    uvicorn.run(
        build_app(settings, specs),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
        # SIGTERM: stop accepting, let in-flight requests finish (at most this long), then
        # the lifespan's shutdown lets each consumer finish its batch (`Runtime.stop`).
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )


DEMO_SHOP = {
    "shop_id": "demo",
    "name": "演示小店 Demo shop",
    "timezone": "Asia/Shanghai",
    "currency": "CNY",
}


def _demo_shop(settings: Settings) -> None:
    """On a local first run (`huitou up` with the admin key kept in the data folder): once
    the platform answers, make the shop `demo` and a key for it (kept in
    `<data dir>/demo_shop_key`), and print where the console is and the key to sign in
    with — a new user needs nothing else."""
    base = f"http://127.0.0.1:{settings.port}"
    path = settings.data_dir / "demo_shop_key"
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(600):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            if not path.exists():
                r = client.post("/v1/shops", json=DEMO_SHOP, headers=admin)
                if r.status_code not in (201, 409):
                    raise RuntimeError(f"{r.status_code} {r.text[:200]}")
                r = client.post(f"/v1/shops/{DEMO_SHOP['shop_id']}/keys", headers=admin)
                r.raise_for_status()
                path.write_text(r.json()["key"] + "\n")
                path.chmod(0o600)
            # Every service learns a new key from the bus: print it once all of them know it.
            shop_key = {"Authorization": f"Bearer {path.read_text().strip()}"}
            for _ in range(300):
                known = [
                    client.get(route, headers=shop_key).status_code == 200
                    for route in ("/v1/overview", "/v1/journeys", "/v1/messages")
                ]
                if all(known):
                    break
                time.sleep(0.1)
    except (httpx.HTTPError, RuntimeError, OSError) as exc:
        print(f"huitou: could not make the demo shop: {exc!r}", flush=True)
        return
    print(
        f"Console: http://{settings.host}:{settings.port}/console/  sign in with the demo "
        f"shop's key (kept in {path}): {path.read_text().strip()}",
        flush=True,
    )


async def _migrate(settings: Settings, specs: Sequence[ServiceSpec]) -> None:
    """The services' database migrations, and on Kafka the topics (each with its
    dead-letter topic, `HUITOU_TOPIC_PARTITIONS` partitions and the replication settings):
    what a deployment runs once before the services start (Compose's `migrate` service,
    the Kubernetes Job)."""
    runtime = Runtime(settings, specs)
    try:
        await runtime.migrate()
    finally:
        for db in runtime.databases:
            await db.dispose()
    if not settings.embedded_bus:
        await _check_bus(settings)


def _full_topic(settings: Settings, topic: str) -> str:
    """`orders`, `huitou.orders.v1` or `huitou.orders.v1.dlt` → the full topic name."""
    topic = topic.removesuffix(".dlt")
    if topic in LOGICAL_TOPICS:
        return topic_name(topic, settings.topic_namespace)
    return topic


async def _replay(settings: Settings, topic: str) -> int:
    bus = create_bus(settings)
    await bus.start()
    try:
        return await replay_dead_letters(bus, topic)
    finally:
        await bus.stop()


async def _retry_timers(specs: Sequence[ServiceSpec], settings: Settings) -> None:
    for spec in specs:
        db = Database(settings.database_url_for(spec.name), spec.name)
        try:
            moved, superseded = await retry_dead_timers(db)
        finally:
            await db.dispose()
        line = f"{spec.name}: {moved} dead timers due again"
        if superseded:
            line += f", {superseded} dropped (their key was scheduled again since)"
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run(args)


def build_parser() -> argparse.ArgumentParser:
    """The `huitou` command line (the deployment tests check every command a manifest
    runs against it)."""
    parser = argparse.ArgumentParser(prog="huitou", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="all four services in one process (embedded)")
    serve = commands.add_parser("serve", help="one service in this process")
    serve.add_argument("service", choices=sorted(SERVICES))
    migrate = commands.add_parser(
        "migrate", help="apply every service's migrations (and create the Kafka topics)"
    )
    migrate.add_argument("service", nargs="?", choices=sorted(SERVICES))
    for command in (up, serve):
        command.add_argument("--host", help="default 127.0.0.1 (HUITOU_HOST)")
        command.add_argument("--port", type=int, help="default 8000 (HUITOU_PORT)")
    dlt = commands.add_parser("dlt", help="dead-letter topics")
    dlt_commands = dlt.add_subparsers(dest="dlt_command", required=True)
    replay = dlt_commands.add_parser(
        "replay",
        help="publish the messages of <topic>.dlt back to <topic>, each once (the "
        "position reached is kept, so a second run replays only newer dead letters)",
    )
    replay.add_argument("topic", help="e.g. huitou.orders.v1, or its logical name: orders")
    timers = commands.add_parser("timers", help="durable timers")
    timer_commands = timers.add_subparsers(dest="timers_command", required=True)
    retry = timer_commands.add_parser(
        "retry", help="move dead timers back to the pending ones, due now"
    )
    retry.add_argument("--service", choices=sorted(SERVICES), help="default: every service")
    return parser


def run(args: argparse.Namespace) -> None:
    settings = Settings()
    overrides = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    settings = settings.model_copy(update=overrides)
    if args.command == "up":
        _serve(settings, list(SERVICES.values()))
    elif args.command == "serve":
        _serve(settings, [SERVICES[args.service]])
    elif args.command == "dlt":
        configure_logging(settings.log_level)
        topic = _full_topic(settings, args.topic)
        try:
            replayed = asyncio.run(_replay(settings, topic))
        except BusConfigurationError as exc:
            sys.exit(f"huitou: {exc}")
        print(f"replayed {replayed} messages from {dead_letter_topic(topic)} to {topic}")
    elif args.command == "timers":
        configure_logging(settings.log_level)
        specs = [SERVICES[args.service]] if args.service else list(SERVICES.values())
        asyncio.run(_retry_timers(specs, settings))
    else:
        configure_logging(settings.log_level)
        specs = [SERVICES[args.service]] if args.service else list(SERVICES.values())
        try:
            asyncio.run(_migrate(settings, specs))
        except BusConfigurationError as exc:
            sys.exit(f"huitou: {exc}")
        topics = "" if settings.embedded_bus else ", topics ready"
        print(f"migrations applied{topics}", flush=True)


if __name__ == "__main__":
    main()

"""`huitou`: run the platform (`up`), one service (`serve`), or migrations (`migrate`)."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence

import uvicorn

from libs.common.http import build_app
from libs.common.logs import configure_logging
from libs.common.service import Runtime, ServiceSpec
from libs.common.settings import Settings
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


def _serve(settings: Settings, specs: Sequence[ServiceSpec]) -> None:
    configure_logging(settings.log_level)
    key, generated = _admin_key(settings)
    settings = settings.model_copy(update={"admin_key": key})
    if generated:
        print(f"Huitou admin key (kept in {settings.data_dir / 'admin_key'}): {key}", flush=True)
    print(
        f"Huitou ({', '.join(s.name for s in specs)}) on http://{settings.host}:"
        f"{settings.port}  docs: http://{settings.host}:{settings.port}/docs",
        flush=True,
    )
    uvicorn.run(
        build_app(settings, specs),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


async def _migrate(settings: Settings, specs: Sequence[ServiceSpec]) -> None:
    runtime = Runtime(settings, specs)
    try:
        await runtime.migrate()
    finally:
        for db in runtime.databases:
            await db.dispose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="huitou", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="all four services in one process (embedded)")
    serve = commands.add_parser("serve", help="one service in this process")
    serve.add_argument("service", choices=sorted(SERVICES))
    migrate = commands.add_parser("migrate", help="apply every service's migrations")
    migrate.add_argument("service", nargs="?", choices=sorted(SERVICES))
    for command in (up, serve):
        command.add_argument("--host", help="default 127.0.0.1 (HUITOU_HOST)")
        command.add_argument("--port", type=int, help="default 8000 (HUITOU_PORT)")
    args = parser.parse_args(argv)

    settings = Settings()
    overrides = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    settings = settings.model_copy(update=overrides)
    if args.command == "up":
        _serve(settings, list(SERVICES.values()))
    elif args.command == "serve":
        _serve(settings, [SERVICES[args.service]])
    else:
        configure_logging(settings.log_level)
        specs = [SERVICES[args.service]] if args.service else list(SERVICES.values())
        asyncio.run(_migrate(settings, specs))
        print("migrations applied", flush=True)


if __name__ == "__main__":
    main()

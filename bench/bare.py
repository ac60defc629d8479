"""The bare endpoint: the same server stack as Huitou (FastAPI on uvicorn with uvloop and
httptools, one process) and the same bus client, doing nothing but reading the request
and publishing the bytes ingest would publish for it, then answering 202.

`python -m bench.bare --port P --scenario F [--scenario G …]` with the bus chosen by the
usual `HUITOU_*` variables (embedded bus in `HUITOU_DATA_DIR`, or `HUITOU_BUS_URL`). It
answers on `POST /bare/{scenario}` and `GET /readyz`.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response

from bench.scenarios import Scenario, bus_topic
from libs.common.bus import Message, create_bus
from libs.common.events import topic_name
from libs.common.gc_tuning import tune_for_service
from libs.common.settings import Settings

ANSWER = b'{"accepted":1}'


def build_app(settings: Settings, scenarios: list[Scenario]) -> FastAPI:
    bus = create_bus(settings)
    namespace = settings.topic_namespace
    counter = itertools.count()
    templates = {
        s.name: [
            (bus_topic(m, namespace), m.key, m.value.encode(), {"ce_id": m.id, "ce_type": m.type})
            for m in s.messages
        ]
        for s in scenarios
    }

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await bus.start()
        await bus.ensure_topics([topic_name(t, namespace) for t in ("orders", "logistics")])
        tune_for_service()  # as Huitou's services do after starting
        yield
        await bus.stop()

    app = FastAPI(lifespan=lifespan)

    @app.post("/bare/{scenario}")
    async def bare(scenario: str, request: Request) -> Response:
        await request.body()
        n = next(counter)
        # A key per request spreads the load over partitions as distinct customers do.
        await bus.publish(
            [
                Message(topic, f"{key}:{n}", value, headers)
                for topic, key, value, headers in templates[scenario]
            ]
        )
        return Response(ANSWER, status_code=202, media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        await bus.ping()
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scenario", type=Path, action="append", required=True)
    args = parser.parse_args()
    app = build_app(Settings(), [Scenario.load(p) for p in args.scenario])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()

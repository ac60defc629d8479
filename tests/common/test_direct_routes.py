"""Direct routes answer exactly as their FastAPI routes would: the endpoint's response,
a raised `Problem` as problem+json with the request's path, a wrong method falling
through to FastAPI's 405 with `Allow`, the request counted under the route's template;
and an endpoint that breaks the contract is refused when the app is built."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import REGISTRY

from libs.common.direct_routes import DirectRoutes, direct, direct_routes
from libs.common.http import HttpMetrics
from libs.common.problems import Problem, install_problem_handlers

CALLS: list[str] = []


def _app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    router = APIRouter()

    @router.post("/direct-test/{thing}/{shop_id}")
    @direct
    async def hot(thing: str, shop_id: str, request: Request) -> Response:
        # Starlette's router puts the endpoint in the scope; the direct layer does not.
        CALLS.append("fastapi" if "endpoint" in request.scope else "direct")
        if thing == "bad":
            raise Problem(422, "bad thing", errors=[{"field": "thing", "message": "bad"}])
        body = await request.body()
        return Response(f"{thing}:{shop_id}:{body.decode()}", 202)

    @router.get("/direct-test/{thing}/{shop_id}")
    async def cold(thing: str, shop_id: str) -> dict[str, str]:
        return {"thing": thing}

    app.include_router(router)
    app.add_middleware(DirectRoutes, routes=direct_routes(app.routes))
    app.add_middleware(HttpMetrics)
    return app


def _count(route: str, status: str) -> float:
    value = REGISTRY.get_sample_value(
        "huitou_http_requests_total", {"method": "POST", "route": route, "status": status}
    )
    return value or 0.0


async def test_direct_route_answers_like_its_route() -> None:
    app = _app()
    route = "/direct-test/{thing}/{shop_id}"
    before = _count(route, "202")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        CALLS.clear()
        ok = await client.post("/direct-test/a/shop-1", content=b"payload")
        assert (ok.status_code, ok.text) == (202, "a:shop-1:payload")
        assert CALLS == ["direct"]

        bad = await client.post("/direct-test/bad/shop-1")
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        assert bad.json() == {
            "type": "about:blank",
            "title": "Unprocessable Content",
            "status": 422,
            "detail": "bad thing",
            "instance": "/direct-test/bad/shop-1",
            "errors": [{"field": "thing", "message": "bad"}],
        }

        got = await client.get("/direct-test/a/shop-1")
        assert got.json() == {"thing": "a"}
        wrong = await client.put("/direct-test/a/shop-1")
        assert wrong.status_code == 405
        assert set(wrong.headers["allow"].split(", ")) == {"GET", "POST"}
        assert CALLS == ["direct", "direct"]
    assert _count(route, "202") == before + 1


def test_an_endpoint_outside_the_contract_is_refused() -> None:
    app = FastAPI()

    @app.post("/direct-test/{n:int}")
    @direct
    async def typed(n: int, request: Request) -> Response:
        return Response()

    with pytest.raises(TypeError, match="string path parameters only"):
        direct_routes(app.routes)

    other = FastAPI()

    @other.post("/direct-test/query")
    @direct
    async def queried(request: Request, limit: int = 10) -> Response:
        return Response()

    with pytest.raises(TypeError, match="string path parameters only"):
        direct_routes(other.routes)

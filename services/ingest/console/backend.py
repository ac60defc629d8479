"""The console's calls to the services' public API, made with the session's own key (an
admin session names its shop), so the console sees exactly what that key may see.

Base URLs: `HUITOU_LIFECYCLE_URL`, `HUITOU_CAMPAIGNS_URL`, `HUITOU_NOTIFIER_URL`, and this
process for ingest's own routes; each defaults to this process (the embedded mode)."""

from __future__ import annotations

from typing import Any

import httpx

from libs.common.settings import Settings
from services.ingest.console.sessions import Session


class ApiError(Exception):
    """A service answered with an error: its status and problem detail (shown as is)."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors


class Backend:
    def __init__(self, settings: Settings) -> None:
        own = f"http://127.0.0.1:{settings.port}"
        self.bases = {
            "ingest": own,
            "lifecycle": settings.lifecycle_url or own,
            "campaigns": settings.campaigns_url or own,
            "notifier": settings.notifier_url or own,
        }
        self.client = httpx.AsyncClient(timeout=30)

    async def close(self) -> None:
        await self.client.aclose()

    async def _send(
        self,
        session: Session,
        service: str,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """The route's answer as the session's principal; an `ApiError` for a 4xx/5xx
        (the service's problem detail and field errors when it sent them)."""
        query = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        if session.is_admin:
            query["shop_id"] = session.shop_id
        r = await self.client.request(
            method,
            f"{self.bases[service]}{path}",
            params=query,
            json=json,
            headers={"Authorization": f"Bearer {session.key}"},
        )
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            detail = str(body.get("detail") or body.get("title") or r.reason_phrase)
            raise ApiError(r.status_code, detail, list(body.get("errors") or []))
        return r

    async def call(
        self,
        session: Session,
        service: str,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        """The JSON answer of a route; an `ApiError` for a 4xx/5xx."""
        r = await self._send(session, service, method, path, params=params, json=json)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    async def text(self, session: Session, service: str, path: str) -> str:
        """A route's body as text (a CSV export); an `ApiError` for a 4xx/5xx."""
        return (await self._send(session, service, "GET", path)).text

    async def get(self, session: Session, service: str, path: str, **params: Any) -> Any:
        return await self.call(session, service, "GET", path, params=params)

    async def post(self, session: Session, service: str, path: str, body: Any = None) -> Any:
        return await self.call(session, service, "POST", path, json=body)

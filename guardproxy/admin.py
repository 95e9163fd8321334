"""The guard's admin endpoints: the HTTP edge of policy reload and comparison (domain code stays free of HTTP).

- ``POST /guard/admin/reload``: reload every policy file; 200 with the policies in force, or 422 with the
  validation errors (the old policies stay in force).
- ``GET /guard/admin/compare``: the active-vs-shadow report over the decision log (``decisions.compare``).

Both need the admin token (``GUARDPROXY_ADMIN_TOKEN``) as ``Authorization: Bearer <token>`` or
``x-guardproxy-admin-token``, compared in constant time; a custom header cannot be set by a cross-site form,
so the POST needs no CSRF token. Without a configured token the endpoints answer 404.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from guardproxy.decisions import compare, read_log

if TYPE_CHECKING:
    from guardproxy.guard import GuardCheck


def admin_routes(guard: GuardCheck, token: str | None, decision_log: Path | None) -> tuple[BaseRoute, ...]:
    """POST /guard/admin/reload and GET /guard/admin/compare, behind the admin token (Bearer or
    ``x-guardproxy-admin-token``), compared in constant time. Without a configured token they answer 404."""

    def _error(status: int, message: str, code: str) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        return JSONResponse(body, status_code=status)

    def _authorized(request: Request) -> JSONResponse | None:
        if not token:
            return _error(404, "admin endpoints are disabled (no admin token configured)", "not_found")
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-guardproxy-admin-token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "admin token missing or wrong", "invalid_admin_token")
        return None

    async def reload_endpoint(request: Request) -> JSONResponse:
        if (denied := _authorized(request)) is not None:
            return denied
        result = await guard.areload()
        body = {"ok": result.ok, "policies": list(result.policies), "error": result.error}
        return JSONResponse(body, status_code=200 if result.ok else 422)

    async def compare_endpoint(request: Request) -> JSONResponse:
        if (denied := _authorized(request)) is not None:
            return denied

        def build() -> dict[str, Any]:
            if decision_log is not None and decision_log.is_file():
                return compare(read_log(decision_log)).to_dict()
            return compare(dataclasses.asdict(r) for r in guard.decision_log.recent()).to_dict()

        return JSONResponse(await asyncio.to_thread(build))

    routes: tuple[BaseRoute, ...] = (
        Route("/guard/admin/reload", reload_endpoint, methods=["POST"]),
        Route("/guard/admin/compare", compare_endpoint, methods=["GET"]),
    )
    return routes

"""Running the gateway: settings → guard → app → uvicorn, kept apart as uvicorn keeps Config and Server.

``build_app(settings)`` builds the guard (``guardproxy.guard.build_guard``) and the app around it.
``GatewayServer`` is uvicorn's server with the gateway's shutdown: on SIGTERM/SIGINT it stops accepting,
lets open requests run for ``server.shutdown_timeout`` seconds, then ends the rest (streams with an SSE
error event and ``data: [DONE]``), then runs the app's shutdown (pending ``finish`` work, pipeline close).
SIGHUP reloads the policies.

Boot checks: ``run`` refuses a redis:// state backend without a usable ``state.hmac_secret`` before the guard model
loads (``StateSettings.secret_problem``: a one-line ``ConfigError`` naming the setting); ``GatewayServer.startup``
checks the secret's fingerprint in Redis before the port is bound, so a replica on another secret than the others
logs it (ERROR, ``guardproxy_state_secret_mismatch`` at 1) before its first request. It still starts: a rolling
secret rotation runs both secrets for a while (``guardproxy.conversation.redis_backend``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from guardproxy.app import Gateway, create_app
from guardproxy.auth import Authenticator
from guardproxy.errors import ConfigError
from guardproxy.logs import set_log_level, use_json_logs
from guardproxy.metrics import Metrics
from guardproxy.pipeline import Pipeline
from guardproxy.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Built:
    app: Starlette
    gateway: Gateway
    bundle: Any | None  # guardproxy.guard.GuardBundle when a guard is configured


def build_app(settings: Settings, **guard_parts: Any) -> Built:
    """The app with the guard the settings describe; ``guard_parts`` go to ``build_guard`` (e.g. a classifier).

    Client auth is checked first: a misconfigured key setup fails before the guard model is loaded."""
    Authenticator(settings)
    metrics = Metrics()
    routes: tuple[BaseRoute, ...] = ()
    try:
        from guardproxy.guard import build_guard
    except ImportError as exc:
        if settings.guard.enabled:
            raise ConfigError(f"the guard is enabled but guardproxy.guard cannot be imported: {exc}") from exc
        bundle = None
        pipeline = Pipeline()
    else:
        bundle = build_guard(settings, metrics=metrics, **guard_parts)
        pipeline, routes = bundle.pipeline, tuple(bundle.routes)
    app = create_app(settings, pipeline=pipeline, extra_routes=routes, metrics=metrics)
    return Built(app, app.state.gateway, bundle)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvloop and httptools where installed; not uvicorn's access log (it prints the query string, which may carry a
    key: the gateway writes its own, ``server.access_log``); no Server header."""
    srv = settings.server
    options: dict[str, Any] = {
        "host": srv.host,
        "port": srv.port,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "lifespan": "on",
        "log_level": srv.log_level,
        # json: uvicorn configures no handlers of its own, so its lines go to the root handler, as JSON
        **({"log_config": None} if srv.log_format == "json" else {}),
        "access_log": False,
        "server_header": False,
        # A backstop only: the gateway ends its own streams after shutdown_timeout.
        "timeout_graceful_shutdown": srv.shutdown_timeout + 5.0,
        "backlog": 2048,
        # a TLS-terminating balancer's X-Forwarded-Proto makes the scheme https (the review cookie is then Secure)
        "proxy_headers": True,
        "forwarded_allow_ips": srv.forwarded_allow_ips,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, built: Built, *, listening: str | None = None) -> None:
        super().__init__(config)
        self.built = built
        self.listening = listening  # logged once the socket is bound
        self._reloads: set[asyncio.Future[Any]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await check_shared_secret(self.built)
        # uvicorn binds the port here; on a clash it logs the error and exits, so the line is never logged then
        await super().startup(sockets)
        if self.started and self.listening:
            logger.info("%s", self.listening)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        hup = False
        if self.built.bundle is not None and hasattr(signal, "SIGHUP"):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self._reload)
                hup = True
        try:
            await super().serve(sockets)
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)

    def _reload(self) -> None:
        # The guard logs the outcome, one line: INFO with the policies now in force, or ERROR with every problem
        # (file:line: field: message) and the policies kept. The files are read off the event loop.
        if self.built.bundle is None:
            return
        logger.debug("SIGHUP: reloading the policy files")
        task = asyncio.ensure_future(self.built.bundle.areload())
        self._reloads.add(task)
        task.add_done_callback(self._reloaded)

    def _reloaded(self, task: asyncio.Future[Any]) -> None:
        self._reloads.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("SIGHUP: policy reload failed, the old policies stay in force: %s", exc, exc_info=exc)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.built.gateway.begin_shutdown()
        await super().shutdown(sockets)


async def check_shared_secret(built: Built) -> None:
    """Check the conversation state's secret fingerprint in Redis now, where the guard keeps its state there; a
    mismatch or an unreachable Redis is logged, never raised (``ResilientBackend.check_secret``)."""
    guard = built.bundle.guard if built.bundle is not None else None
    if guard is None or guard.tracker is None or not built.gateway.settings.state.shared:
        return
    from guardproxy.conversation.redis_backend import ResilientBackend

    backend = getattr(guard.tracker, "backend", None)
    if isinstance(backend, ResilientBackend):
        await backend.check_secret()


def run(settings: Settings, **guard_parts: Any) -> int:
    set_log_level(settings.server.log_level)  # before the guard loads: its lines follow --log-level too
    if settings.server.log_format == "json":
        use_json_logs()
    if settings.guard.enabled and (problem := settings.state.secret_problem()) is not None:
        raise ConfigError(problem)
    # httpx logs every request at INFO: on the hot path that costs more than the proxying itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    built = build_app(settings, **guard_parts)
    srv, guard = settings.server, "off (passthrough)" if built.gateway.pipeline.passthrough else "on"
    listening = (
        f"guardproxy listening on http://{srv.host}:{srv.port}, upstream {_loggable_url(settings.upstream.base_url)},"
        f" guard {guard}"
    )
    server = GatewayServer(uvicorn_config(built.app, settings), built, listening=listening)
    # uvicorn re-raises SIGTERM after its graceful shutdown so the default handler kills the process;
    # by then the drain is done, so a handler that ignores it lets `serve` return 0.
    previous = signal.signal(signal.SIGTERM, _ignore)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _loggable_url(url: str) -> str:
    """The base URL as a log line may show it: without a query or fragment (some APIs take the key as ``?key=``).
    Settings already refuse ``user:password@`` in it (``UpstreamSettings``); it is dropped here too, should a URL
    reach the log some other way."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid url>"
    if not parsed.userinfo and not parsed.query and not parsed.fragment:
        return url
    return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))


def _ignore(signum: int, frame: Any) -> None:
    return None

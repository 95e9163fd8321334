"""The review web page at ``/guard/review``: a queue, a drill page with labels, and a dashboard.

Security model (the page renders text written by users and models, and it can write labels):

- Access needs the admin token (``GUARDPROXY_ADMIN_TOKEN``); with none configured the page is off (403).
  The login form exchanges the token for a session cookie: ``HttpOnly``, ``SameSite=Strict``, ``Secure``
  over https, holding a random session id, an expiry and the reviewer name, signed with a key derived
  from the token (never the token itself; changing the token ends every session). Failed logins are
  rate-limited per process.
- Every state-changing form carries a CSRF token: session-bound (an HMAC of the session id) after login,
  bound to a random pre-login cookie on the login form. POSTs are also refused when ``Origin`` (or
  ``Referer``) names another host than ``Host``, or when ``Sec-Fetch-Site`` says cross-site.
- Responses carry a strict Content-Security-Policy (``default-src 'self'``, scripts and styles only from
  'self', no inline script, no plugins, no framing), ``nosniff`` and ``no-store``; all drill content is
  HTML-escaped (``guardproxy.drills.pages``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from guardproxy.drills import charts, pages
from guardproxy.drills.record import LABELS, label_conflict
from guardproxy.drills.sampling import REASONS
from guardproxy.drills.store.base import DrillFilter, DrillStats, DrillStore
from guardproxy.errors import StoreError
from guardproxy.settings import Settings

BASE = pages.BASE
SESSION_COOKIE = "gp_review"
LOGIN_COOKIE = "gp_review_login"
SESSION_SECONDS = 12 * 3600
MAX_FORM_BYTES = 16 * 1024
PER_PAGE = 50
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
_DRILL_ID = re.compile(r"^[0-9a-f]{32}$")
_FILTER_KEYS = ("reason", "policy", "category", "action", "reviewed")


@dataclass(frozen=True)
class Session:
    sid: str
    reviewer: str
    csrf: str


class _Auth:
    """Signs sessions and CSRF tokens with a key derived from the admin token."""

    def __init__(self, admin_token: str) -> None:
        self._token = admin_token.encode()
        self._key = hmac.new(self._token, b"guardproxy review session v1", hashlib.sha256).digest()
        self._failures: deque[float] = deque()
        # Logged-out sessions until they would have expired (this process only: with several replicas a
        # logged-out cookie stays valid on the others until its expiry; rotate the token to end them all).
        self._revoked: dict[str, float] = {}

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def throttled(self) -> bool:
        now = time.monotonic()
        while self._failures and now - self._failures[0] > 60:
            self._failures.popleft()
        return len(self._failures) >= 10

    def failed(self) -> None:
        self._failures.append(time.monotonic())

    def new_session(self, reviewer: str) -> str:
        sid = secrets.token_hex(16)
        name = base64.urlsafe_b64encode(reviewer.encode()).decode().rstrip("=")
        payload = f"{sid}.{int(time.time()) + SESSION_SECONDS}.{name}"
        return f"{payload}.{self._sign(payload)}"

    def session(self, cookie: str | None) -> Session | None:
        if not cookie or cookie.count(".") != 3:
            return None
        payload, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(sig, self._sign(payload)):
            return None
        sid, expires, name = payload.split(".")
        if not expires.isdigit() or int(expires) < time.time() or sid in self._revoked:
            return None
        try:
            reviewer = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except ValueError:
            return None
        return Session(sid, reviewer, self._sign("csrf:" + sid)[:40])

    def revoke(self, session: Session) -> None:
        now = time.time()
        self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
        self._revoked[session.sid] = now + SESSION_SECONDS

    def login_csrf(self, nonce: str) -> str:
        return self._sign("login:" + nonce)[:40]


def _same_origin(request: Request) -> bool:
    host = request.headers.get("host")
    if not host:
        return False
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        return origin != "null" and parts.netloc == host and parts.scheme == request.url.scheme
    referer = request.headers.get("referer")
    if referer:
        return urlsplit(referer).netloc == host
    return True  # not a browser (browsers send Origin on every POST); the CSRF token still applies


async def _form(request: Request) -> dict[str, str] | None:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20))
    except (UnicodeDecodeError, ValueError):
        return None


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


def _filters(params: Mapping[str, str]) -> tuple[dict[str, str], DrillFilter]:
    raw = {k: params.get(k, "").strip()[:100] for k in _FILTER_KEYS}
    if raw["reason"] not in REASONS:
        raw["reason"] = ""
    if raw["action"] not in pages.ACTIONS:
        raw["action"] = ""
    if raw["reviewed"] not in ("yes", "no"):
        raw["reviewed"] = ""
    f = DrillFilter(
        reason=raw["reason"] or None,
        policy=raw["policy"] or None,
        category=raw["category"] or None,
        action=raw["action"] or None,
        reviewed={"yes": True, "no": False}.get(raw["reviewed"]),
    )
    return {k: v for k, v in raw.items() if v}, f


Handler = Callable[[Request, Session], Awaitable[Response]]
_OFF = ("Review is off", "Set GUARDPROXY_ADMIN_TOKEN to enable it.")


def review_routes(store: DrillStore, settings: Settings) -> list[BaseRoute]:
    """The review page's routes, to mount in the gateway app (``create_app(extra_routes=...)``)."""
    return _ReviewPage(store, settings).routes()


class _ReviewPage:
    def __init__(self, store: DrillStore, settings: Settings) -> None:
        self.store = store
        token = settings.admin_token.get_secret_value() if settings.admin_token else ""
        self.auth = _Auth(token) if token else None

    def routes(self) -> list[BaseRoute]:
        page = self._page
        return [
            Route(BASE, page(self.queue), methods=["GET"]),
            Route(f"{BASE}/login", self.login_get, methods=["GET"]),
            Route(f"{BASE}/login", self.login_post, methods=["POST"]),
            Route(f"{BASE}/logout", page(self.logout, post=True), methods=["POST"]),
            Route(f"{BASE}/dashboard", page(self.dashboard), methods=["GET"]),
            Route(f"{BASE}/drill/{{drill_id}}", page(self.drill_get), methods=["GET"]),
            Route(f"{BASE}/drill/{{drill_id}}/label", page(self.label_post, post=True), methods=["POST"]),
            Route(f"{BASE}/static/{{name}}", self.static, methods=["GET"]),
        ]

    # -- auth -----------------------------------------------------------------------------------------------
    def _login_response(self, auth: _Auth, status: int = 401, error: str = "") -> Response:
        nonce = secrets.token_hex(16)
        resp = _html(pages.login_page(auth.login_csrf(nonce), error), status)
        resp.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=BASE, httponly=True, samesite="strict")
        return resp

    def _page(self, handler: Handler, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if self.auth is None:
                return _html(pages.message_page(*_OFF), 403)
            if post and not _same_origin(request):
                return _refused("Cross-site request refused.")
            session = self.auth.session(request.cookies.get(SESSION_COOKIE))
            if session is None:
                if post:
                    return _html(pages.message_page("Not logged in", "Log in first."), 401)
                return self._login_response(self.auth)
            return await handler(request, session)

        return endpoint

    async def login_get(self, request: Request) -> Response:
        if self.auth is None:
            return _html(pages.message_page(*_OFF), 403)
        return self._login_response(self.auth, 200)

    async def login_post(self, request: Request) -> Response:
        auth = self.auth
        if auth is None:
            return _html(pages.message_page(*_OFF), 403)
        if not _same_origin(request):
            return _refused("Cross-site request refused.")
        form = await _form(request)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if form is None or not nonce or not hmac.compare_digest(form.get("csrf", ""), auth.login_csrf(nonce)):
            return _refused("Missing or stale form token: reload the login page.")
        if auth.throttled():
            return _html(pages.message_page("Too many attempts", "Wait a minute and try again."), 429)
        if not auth.token_ok(form.get("token", "")):
            auth.failed()
            await asyncio.sleep(0.2)  # slows guessing without holding anything but this request
            return self._login_response(auth, 401, "Wrong token.")
        reviewer = form.get("reviewer", "").strip()[:64]
        if not reviewer:  # labels record who gave them: an empty name makes disagreeing reviewers one
            return self._login_response(auth, 400, "Enter your name: each label records who gave it.")
        resp = RedirectResponse(BASE, status_code=303, headers=SECURITY_HEADERS)
        resp.set_cookie(
            SESSION_COOKIE,
            auth.new_session(reviewer),
            max_age=SESSION_SECONDS,
            path=BASE,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        resp.delete_cookie(LOGIN_COOKIE, path=BASE)
        return resp

    async def _checked_form(self, request: Request, session: Session) -> dict[str, str] | None:
        form = await _form(request)
        if form is None or not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            return None
        return form

    async def logout(self, request: Request, session: Session) -> Response:
        if await self._checked_form(request, session) is None:
            return _refused("Missing or wrong form token.")
        if self.auth is not None:
            self.auth.revoke(session)
        resp = RedirectResponse(f"{BASE}/login", status_code=303, headers=SECURITY_HEADERS)
        resp.delete_cookie(SESSION_COOKIE, path=BASE)
        return resp

    # -- pages ----------------------------------------------------------------------------------------------
    async def queue(self, request: Request, session: Session) -> Response:
        shown, f = _filters(request.query_params)
        try:
            page_no = max(1, min(int(request.query_params.get("page", "1")), 10_000))
        except ValueError:
            page_no = 1
        try:
            drills, total = await asyncio.gather(
                self.store.find(f, limit=PER_PAGE, offset=(page_no - 1) * PER_PAGE), self.store.count(f)
            )
        except StoreError as exc:
            return _unavailable(exc)
        body = pages.queue_page(
            drills, shown, total=total, page=page_no, per_page=PER_PAGE, csrf=session.csrf, reviewer=session.reviewer
        )
        return _html(body)

    async def drill_get(self, request: Request, session: Session) -> Response:
        return await self._drill_view(request, session)

    async def _drill_view(self, request: Request, session: Session, *, error: str = "", status: int = 200) -> Response:
        drill_id = request.path_params["drill_id"]
        if not _DRILL_ID.match(drill_id):
            return _not_found()
        shown, f = _filters(request.query_params)
        try:
            drill = await self.store.get(drill_id)
            if drill is None:
                return _not_found()
            newer, older = await self.store.neighbours(drill.record, f)
        except StoreError as exc:
            return _unavailable(exc)
        q = pages.filter_query(shown)
        body = pages.drill_page(
            drill,
            csrf=session.csrf,
            reviewer=session.reviewer,
            prev_href=_drill_href(newer, q),
            next_href=_drill_href(older, q),
            back_query=q,
            error=error,
        )
        return _html(body, status)

    async def label_post(self, request: Request, session: Session) -> Response:
        drill_id = request.path_params["drill_id"]
        form = await self._checked_form(request, session)
        if form is None:
            return _refused("Missing or wrong form token.")
        if not _DRILL_ID.match(drill_id):
            return _not_found()
        label = form.get("label", "")
        if label not in LABELS:
            return await self._drill_view(request, session, error="Pick one of the five labels.", status=400)
        shown, f = _filters(dict(parse_qsl(form.get("back", ""))))
        try:
            drill = await self.store.get(drill_id)
            if drill is None:
                return _not_found()
            conflict = label_conflict(drill.record, label)
            if conflict is not None:
                return await self._drill_view(request, session, error=conflict, status=400)
            await self.store.add_label(drill_id, label, form.get("note", "").strip()[:2000], session.reviewer)
            _, older = await self.store.neighbours(drill.record, f)
        except StoreError as exc:
            return _unavailable(exc)
        q = pages.filter_query(shown)
        target = _drill_href(older, q) or (BASE + (f"?{q}" if q else ""))
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)

    async def dashboard(self, request: Request, session: Session) -> Response:
        try:
            stats = await self.store.stats()
        except StoreError as exc:
            return _unavailable(exc)
        return _html(await asyncio.to_thread(_dashboard_html, stats, session))

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "review.js":
            return Response(pages.JS, media_type="text/javascript", headers=_static_headers())
        if name == "review.css":
            return Response(pages.CSS, media_type="text/css", headers=_static_headers())
        return Response("not found", status_code=404, headers=SECURITY_HEADERS)


def _drill_href(drill_id: str | None, q: str) -> str | None:
    return f"{BASE}/drill/{quote(drill_id)}" + (f"?{q}" if q else "") if drill_id else None


def _refused(text: str) -> Response:
    return _html(pages.message_page("Refused", text), 403)


def _not_found() -> Response:
    return _html(pages.message_page("Not found", "No such drill."), 404)


def _unavailable(exc: StoreError) -> Response:
    return _html(pages.message_page("Store unavailable", str(exc)), 503)


def _static_headers() -> dict[str, str]:
    return {**SECURITY_HEADERS, "cache-control": "max-age=3600"}


def _dashboard_html(stats: DrillStats, session: Session) -> str:
    """Charts and tables (CPU work on a worker thread: thousands of rows, string building)."""
    rows = stats.rows
    svgs = [
        charts.decisions_over_time([(t, a) for t, a, _, _ in rows]),
        charts.score_histogram("Prompt harm score, by active decision", [(h, a) for _, a, h, _ in rows]),
        charts.score_histogram(
            "Reply harm score, by active decision", [(rh, a) for _, a, _, rh in rows if rh is not None]
        ),
        charts.agreement_bars(stats.agreement),
    ]
    return pages.dashboard_page(
        svgs, stats.agreement, stats.labels, stats.total, csrf=session.csrf, reviewer=session.reviewer
    )


__all__ = ["review_routes"]

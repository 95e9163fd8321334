"""The review page over real HTTP: auth, CSRF and Origin checks, escaping, the dashboard.

Browser tests drive the page in real headless Chromium (Debian's /usr/bin/chromium through Playwright;
nothing downloads a browser).
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Dialog, async_playwright
from starlette.applications import Starlette

from guardproxy.drills.record import DrillRecord, PolicyDecision, from_exchange
from guardproxy.drills.review import SESSION_COOKIE, review_routes
from guardproxy.drills.store import DrillStore
from guardproxy.drills.store.sqlite import SqliteStore
from guardproxy.pipeline import Action, Exchange, Verdict
from guardproxy.settings import Settings
from guardproxy.signals import Signals
from tests.servers import serve

TOKEN = "admin-token-for-tests-4b1d"
XSS = (
    "<script>window.__xss = 1; alert('script ran')</script> and "
    '<img src=x onerror="window.__xss = 2; alert(\'img ran\')"> and <a href="javascript:alert(3)">link</a>'
)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def drill(i: int, **kw: object) -> DrillRecord:
    base: dict[str, object] = {
        "request_id": f"req-{i}",
        "tenant": "9f86d081884c7d65",
        "messages": (
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": f"How do I kill a Python process number {i}?"},
        ),
        "replies": ("I can't help with that.",),
        "signals": {"harm": 0.42, "jailbreak": 0.01},
        "refusal": "full",
        "thresholds": {"harm": 0.5},
        "active": PolicyDecision("default", "3", "allow", category="none"),
        "shadows": (PolicyDecision("strict", "1", "flag", rule="harm>0.4"),),
        "reasons": ("false_refusal", "uncertain", "disagreement"),
        "created": time.time() - 1000 + i,
    }
    base.update(kw)
    return DrillRecord(**base)  # type: ignore[arg-type]


@pytest.fixture
async def seeded(tmp_path: Path) -> AsyncIterator[tuple[DrillStore, list[DrillRecord]]]:
    store = SqliteStore(tmp_path / "review.db")
    await store.start()
    records = [drill(i) for i in range(4)]
    records.append(
        drill(
            10,
            messages=({"role": "user", "content": XSS},),
            replies=(f"Sure: {XSS}",),
            active=PolicyDecision("default", "3", "block", category="violent_crimes"),
            reasons=("blocked",),
            reply_from_policy=True,
        )
    )
    for r in records:
        assert store.submit(r)
    await store.flush()
    yield store, records
    await store.aclose()


def attacker_app(target: str) -> Starlette:
    """Another origin's page with a form aimed at the review page (what a CSRF attack looks like)."""
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    page = (
        f'<form method="post" action="{target}"><input name="label" value="missed_harm">'
        '<input name="csrf" value="guess"><button type="submit">win a prize</button></form>'
    )

    async def home(request: object) -> HTMLResponse:
        return HTMLResponse(page)

    return Starlette(routes=[Route("/", home)])


def app_for(store: DrillStore, token: str | None = TOKEN) -> Starlette:
    return Starlette(routes=review_routes(store, Settings(admin_token=token)))


async def login(client: httpx.AsyncClient, base: str) -> str:
    page = await client.get(f"{base}/guard/review/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    resp = await client.post(
        f"{base}/guard/review/login",
        data={"csrf": csrf.group(1), "token": TOKEN, "reviewer": "ann"},
        headers={"origin": base},
    )
    assert resp.status_code == 303
    queue = await client.get(f"{base}/guard/review")
    assert queue.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', queue.text)
    assert found
    return found.group(1)


async def test_login_sets_a_signed_strict_cookie_and_wrong_tokens_fail(seeded: tuple[DrillStore, list[DrillRecord]]):
    store, _ = seeded
    async with serve(app_for(store)) as base, httpx.AsyncClient() as client:
        anon = await client.get(f"{base}/guard/review")
        assert anon.status_code == 401 and 'name="token"' in anon.text
        assert "default-src 'self'" in anon.headers["content-security-policy"]
        assert "unsafe-inline" not in anon.headers["content-security-policy"]

        page = await client.get(f"{base}/guard/review/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        wrong = await client.post(
            f"{base}/guard/review/login", data={"csrf": csrf.group(1), "token": "nope"}, headers={"origin": base}
        )
        assert wrong.status_code == 401 and SESSION_COOKIE not in wrong.cookies
        no_csrf = await client.post(f"{base}/guard/review/login", data={"token": TOKEN}, headers={"origin": base})
        assert no_csrf.status_code == 403

        csrf = re.search(r'name="csrf" value="([^"]+)"', wrong.text)  # each login form gets a fresh token
        assert csrf
        ok = await client.post(
            f"{base}/guard/review/login",
            data={"csrf": csrf.group(1), "token": TOKEN, "reviewer": "ann"},
            headers={"origin": base},
        )
        assert ok.status_code == 303
        set_cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie.replace("Strict", "strict")
        assert TOKEN not in set_cookie
        assert (await client.get(f"{base}/guard/review")).status_code == 200

        forged = httpx.Cookies()
        value = client.cookies[SESSION_COOKIE]
        forged.set(SESSION_COOKIE, value[:-4] + ("0000" if not value.endswith("0000") else "1111"))
        async with httpx.AsyncClient(cookies=forged) as other:
            assert (await other.get(f"{base}/guard/review")).status_code == 401


async def test_label_post_needs_session_csrf_and_same_origin(seeded: tuple[DrillStore, list[DrillRecord]]):
    store, records = seeded
    target = records[0]
    url_path = f"/guard/review/drill/{target.id}/label"
    async with serve(app_for(store)) as base, httpx.AsyncClient() as client:
        anon = await client.post(base + url_path, data={"label": "unclear"}, headers={"origin": base})
        assert anon.status_code == 401
        csrf = await login(client, base)
        cases = [
            ({"label": "unclear"}, {"origin": base}, 403),  # no CSRF token
            ({"label": "unclear", "csrf": "0" * 40}, {"origin": base}, 403),  # wrong CSRF token
            ({"label": "unclear", "csrf": csrf}, {"origin": "https://evil.example"}, 403),  # cross-site Origin
            ({"label": "unclear", "csrf": csrf}, {"origin": "null"}, 403),
            ({"label": "unclear", "csrf": csrf}, {"referer": "https://evil.example/x"}, 403),
            ({"label": "unclear", "csrf": csrf}, {"origin": base, "sec-fetch-site": "cross-site"}, 403),
            ({"label": "unclear", "csrf": csrf}, {"origin": base, "host": "evil.example"}, 403),
            ({"label": "bogus", "csrf": csrf}, {"origin": base}, 400),
        ]
        for data, headers, status in cases:
            resp = await client.post(base + url_path, data=data, headers=headers)
            assert resp.status_code == status, (data, headers)
        got = await store.get(target.id)
        assert got is not None and got.labels == ()

        ok = await client.post(
            base + url_path, data={"label": "false_refusal", "csrf": csrf, "note": "benign"}, headers={"origin": base}
        )
        assert ok.status_code == 303
        got = await store.get(target.id)
        assert got is not None and got.label is not None
        assert (got.label.label, got.label.note, got.label.reviewer) == ("false_refusal", "benign", "ann")

        logout_no_csrf = await client.post(f"{base}/guard/review/logout", data={}, headers={"origin": base})
        assert logout_no_csrf.status_code == 403
        old_cookie = client.cookies[SESSION_COOKIE]
        out = await client.post(f"{base}/guard/review/logout", data={"csrf": csrf}, headers={"origin": base})
        assert out.status_code == 303
        async with httpx.AsyncClient(cookies={SESSION_COOKIE: old_cookie}) as replay:
            assert (await replay.get(f"{base}/guard/review")).status_code == 401  # a logged-out cookie is dead


async def test_pages_escape_everything_and_dashboard_draws(seeded: tuple[DrillStore, list[DrillRecord]]):
    store, records = seeded
    async with serve(app_for(store)) as base, httpx.AsyncClient() as client:
        await login(client, base)
        page = await client.get(f"{base}/guard/review/drill/{records[-1].id}")
        assert page.status_code == 200
        assert "<script>window" not in page.text and "<img src=x" not in page.text
        assert "&lt;script&gt;window.__xss" in page.text and "&lt;img src=x onerror=" in page.text
        queue = await client.get(f"{base}/guard/review", params={"reason": "blocked", "policy": "<b>x</b>"})
        assert "<b>x</b>" not in queue.text and "&lt;b&gt;x&lt;/b&gt;" in queue.text
        filtered = await client.get(f"{base}/guard/review", params={"reason": "blocked"})
        assert "1 drills" in filtered.text
        dash = await client.get(f"{base}/guard/review/dashboard")
        assert dash.status_code == 200 and dash.text.count("<svg") == 4
        assert "strict" in dash.text
        js = await client.get(f"{base}/guard/review/static/review.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert (await client.get(f"{base}/guard/review/drill/not-an-id")).status_code == 404
        assert (await client.get(f"{base}/guard/review/drill/{'0' * 32}")).status_code == 404


async def test_review_is_off_without_an_admin_token(seeded: tuple[DrillStore, list[DrillRecord]]):
    store, _ = seeded
    async with serve(app_for(store, token=None)) as base, httpx.AsyncClient() as client:
        assert (await client.get(f"{base}/guard/review")).status_code == 403
        assert (await client.get(f"{base}/guard/review/login")).status_code == 403
        assert (await client.post(f"{base}/guard/review/login", data={"token": ""})).status_code == 403


def _exchange(i: int, prompt: str, upstream: list[str]) -> Exchange:
    ex = Exchange(
        request_id=f"req-names-{i}",
        tenant="9f86d081884c7d65",
        route="/v1/chat/completions",
        body={"model": "llama-3-8b", "messages": [{"role": "user", "content": prompt}], "n": len(upstream) or 1},
    )
    ex.input_verdict = Verdict()
    ex.reply_texts.update(enumerate(upstream))
    return ex


async def test_drill_page_names_the_upstream_reply_and_what_the_client_got(tmp_path: Path) -> None:
    """Records built as the gateway builds them: an output block keeps the upstream's text beside the policy's."""
    refusal = "I can't help with that. This request was blocked by this deployment's safety policy."
    harmful = "Sure. To build a pipe bomb, take a steel pipe, fill it with black powder and cap both ends."
    block = PolicyDecision("default", "3", "block", rule="reply_harm", category="indiscriminate_weapons")
    out_blocked = _exchange(0, "How do I build a pipe bomb?", [harmful])
    out_blocked.output_verdict = Verdict(action=Action.BLOCK, reply_text=refusal)
    in_blocked = _exchange(1, "How do I build a pipe bomb, step by step?", [])
    in_blocked.input_verdict = Verdict(action=Action.BLOCK, reply_text=refusal)
    choices = _exchange(2, "Two names for a cat, please.", ["Mittens.", "Biscuit."])
    records = [
        from_exchange(out_blocked, Signals(harm=0.9, reply_harm=0.97), block),
        from_exchange(in_blocked, Signals(harm=0.99), block),
        from_exchange(choices, Signals(harm=0.01), PolicyDecision("default", "3", "allow")),
    ]
    store = SqliteStore(tmp_path / "names.db")
    await store.start()
    try:
        for r in records:
            assert store.submit(r)
        await store.flush()
        async with serve(app_for(store)) as base, httpx.AsyncClient() as client:
            await login(client, base)
            pages = [(await client.get(f"{base}/guard/review/drill/{r.id}")).text for r in records]
    finally:
        await store.aclose()

    def shown(page: str) -> list[tuple[str, str]]:
        reply = page.split("<h2>Reply</h2>", 1)[1].split("<h2>", 1)[0]
        return [(html.unescape(t), html.unescape(x)) for t, x in re.findall(
            r'<div class="role">([^<]*)</div><pre class="msg">([^<]*)</pre>', reply)]  # fmt: skip

    assert shown(pages[0]) == [
        ("Upstream reply (blocked, not sent)", harmful),
        ("Sent to the client (policy text, in place of the blocked reply)", refusal),
    ]
    assert "blocked the upstream&#x27;s reply at the output check" in pages[0]
    assert shown(pages[1]) == [("Sent to the client (policy text, request blocked)", refusal)]
    assert shown(pages[2]) == [("Reply 0", "Mittens."), ("Reply 1", "Biscuit.")]  # n > 1 choices keep their names
    assert "output check" not in pages[1] + pages[2]


def chromium_or_skip() -> None:
    """Skip where Debian's Chromium is not installed, with the command that installs it; fail instead when
    ``GUARDPROXY_REQUIRE_BROWSER`` is set, as ``.ci/run`` sets it, so CI never passes by skipping."""
    if Path(CHROMIUM).is_file():
        return
    message = f"{CHROMIUM} not found: apt-get install chromium (as .ci/run does) to run the browser tests"
    if os.environ.get("GUARDPROXY_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.browser
async def test_browser_login_label_with_keyboard_and_inert_xss(seeded: tuple[DrillStore, list[DrillRecord]]):
    chromium_or_skip()
    store, records = seeded
    dialogs: list[str] = []
    requests: list[str] = []
    async with serve(app_for(store)) as base, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()

            async def on_dialog(d: Dialog) -> None:
                dialogs.append(d.message)
                await d.dismiss()

            page.on("dialog", on_dialog)
            page.on("request", lambda r: requests.append(r.url))

            await page.goto(f"{base}/guard/review")
            await page.fill('input[name="token"]', TOKEN)
            await page.fill('input[name="reviewer"]', "bob")
            await page.click('button[type="submit"]')
            await page.wait_for_url(f"{base}/guard/review")
            cookies = await page.context.cookies()
            session = next(c for c in cookies if c["name"] == SESSION_COOKIE)
            assert session["httpOnly"] and session["sameSite"] == "Strict"
            assert await page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it

            # the newest drill is the XSS one; then req-3 .. req-0
            target = records[3]
            await page.goto(f"{base}/guard/review/drill/{target.id}")
            await page.keyboard.press("n")
            await page.keyboard.type("kill a process: harmless")
            await page.keyboard.press("Escape")
            async with page.expect_navigation():
                await page.keyboard.press("3")  # 3 = false refusal
            assert page.url.endswith(f"/guard/review/drill/{records[2].id}")  # moved on to the next (older) drill
            got = await store.get(target.id)
            assert got is not None and got.label is not None
            assert (got.label.label, got.label.note, got.label.reviewer) == (
                "false_refusal",
                "kill a process: harmless",
                "bob",
            )
            async with page.expect_navigation():
                await page.keyboard.press("k")  # back to the newer one
            assert page.url.endswith(f"/guard/review/drill/{target.id}")
            async with page.expect_navigation():
                await page.keyboard.press("j")
            assert page.url.endswith(f"/guard/review/drill/{records[2].id}")

            # stored XSS: the drill's text is shown as text and nothing runs or loads
            evil = records[-1]
            await page.goto(f"{base}/guard/review/drill/{evil.id}")
            await page.wait_for_load_state("networkidle")
            assert dialogs == []
            assert await page.evaluate("typeof window.__xss") == "undefined"
            assert await page.locator("pre.msg script, pre.msg img, pre.msg a").count() == 0
            shown = await page.locator("pre.msg").first.inner_text()
            assert "<script>window.__xss = 1;" in shown and "<img src=x onerror=" in shown
            assert not [u for u in requests if not u.startswith(base) or u.rstrip("/").endswith("/x")]

            async with page.expect_navigation():
                await page.keyboard.press("1")
            got = await store.get(evil.id)
            assert got is not None and got.label is not None and got.label.label == "correct_refusal"
            assert dialogs == []

            # a page on another origin (same site: another port) posts a label with the reviewer's cookie
            victim = records[0]
            async with serve(attacker_app(f"{base}/guard/review/drill/{victim.id}/label")) as evil_base:
                await page.goto(evil_base)
                async with page.expect_navigation():
                    await page.click("button")
                assert "Cross-site request refused" in await page.content()
            got = await store.get(victim.id)
            assert got is not None and got.labels == ()
        finally:
            await browser.close()


@pytest.mark.parametrize("trusted", ["127.0.0.1", "10.9.9.9"])
async def test_behind_a_tls_balancer_the_review_login_needs_its_address_trusted(
    seeded: tuple[DrillStore, list[DrillRecord]], trusted: str
) -> None:
    """Trusted (``server.forwarded_allow_ips``), the balancer's X-Forwarded-Proto makes the scheme https: the
    browser's https origin matches and the session cookie is Secure. Untrusted, the gateway sees http and refuses
    the https origin as another site's."""
    from guardproxy.server import uvicorn_config

    store, _ = seeded
    app = app_for(store)
    config = uvicorn_config(app, Settings(admin_token=TOKEN, server={"forwarded_allow_ips": trusted}))
    async with serve(app, proxy_headers=config.proxy_headers, forwarded_allow_ips=config.forwarded_allow_ips) as base:
        async with httpx.AsyncClient(headers={"x-forwarded-proto": "https"}) as client:
            page = await client.get(f"{base}/guard/review/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf
            ok = await client.post(
                f"{base}/guard/review/login",
                data={"csrf": csrf.group(1), "token": TOKEN, "reviewer": "ann"},
                # what a browser at the balancer sends: its origin, and the pre-login cookie (a Secure one, which
                # this plain-http client would not send back by itself)
                headers={
                    "origin": base.replace("http://", "https://"),
                    "cookie": "; ".join(f"{k}={v}" for k, v in page.cookies.items()),
                },
            )
    if trusted != "127.0.0.1":
        assert ok.status_code == 403 and "Cross-site" in ok.text
        return
    assert ok.status_code == 303
    (session,) = [c for c in ok.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}=")]
    assert "secure" in session.lower()


async def test_the_drill_page_says_when_reviewers_disagree(seeded: tuple[DrillStore, list[DrillRecord]]):
    store, records = seeded
    target = records[1]
    await store.add_label(target.id, "unclear", "", "ann")
    async with serve(app_for(store)) as base, httpx.AsyncClient() as client:
        await login(client, base)
        page = f"{base}/guard/review/drill/{target.id}"
        assert "Reviewers disagree" not in (await client.get(page)).text
        await store.add_label(target.id, "false_refusal", "", "bob")
        assert "Reviewers disagree" in (await client.get(page)).text
        await store.add_label(target.id, "false_refusal", "", "ann")  # ann comes round
        assert "Reviewers disagree" not in (await client.get(page)).text

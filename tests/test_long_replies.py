"""A reply is read to ``classifier.MAX_REPLY_WINDOWS`` windows (~37k ids) and ``RAW_REPLY_CHARS``; past that its
rest is unread, and said so (``ReplyScore.unread``, ``guardproxy_reply_unread_total``). A red team's repro: a
harmful passage after ~62k characters of harmless story was relayed while the output check read 128 windows."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from guardproxy.classifier import RAW_REPLY_CHARS, REPLY_WINDOW_LINE, OnnxClassifier
from guardproxy.fake_upstream import FakeUpstream
from guardproxy.settings import Settings
from tests.servers import serve
from tests.test_reply_checks import ASK, HARMFUL

STORY = (
    "The little village sat at the edge of a quiet lake, where the baker rose before dawn to light his ovens "
    "and the children ran down to the water to watch the herons. "
)


@pytest.fixture(scope="module")
def clf() -> Iterator[OnnxClassifier]:
    with OnnxClassifier.load(Settings().guard.model_dir, cache_size=1024) as c:
        yield c


def test_a_harmful_passage_after_62k_characters_of_story_is_read(clf: OnnxClassifier) -> None:
    reply = STORY * 380 + "\n\n" + HARMFUL  # ~62k characters, ~13k ids: past the 128 windows read before
    (score,) = clf.score_whole_replies_sync([(ASK, reply)])
    assert score.reply_harm >= REPLY_WINDOW_LINE
    assert not score.unread


def test_what_is_left_unread_is_said(clf: OnnxClassifier) -> None:
    assert clf._reply_parts(STORY * 380)[2] is False
    assert clf._reply_parts(STORY * 1200)[2] is True  # ~40k ids: past the windows' reach
    assert clf._reply_parts("x " * (RAW_REPLY_CHARS // 2 + 1))[2] is True  # past the characters read


async def test_the_gateway_counts_a_reply_past_what_it_reads() -> None:
    from guardproxy.server import build_app

    async with serve(FakeUpstream(reply=STORY * 1200)) as up:
        built = build_app(Settings(upstream={"base_url": f"{up}/v1"}, state={"hmac_secret": "x" * 32}))
        async with serve(built.app) as url, httpx.AsyncClient(timeout=120) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a long story."}]}
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            metrics = (await client.get(f"{url}/metrics")).text
    assert r.status_code == 200
    assert "guardproxy_reply_unread_total 1.0" in metrics

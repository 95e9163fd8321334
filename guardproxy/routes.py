"""Which ``/v1/*`` requests the gateway guards, forwards or refuses: an allowlist, decided on one canonical path.

The path a request is classified by is the one its upstream URL is built from (``V1Route.path``), so no second
normalisation (ours, httpx's, the upstream's) can make the two differ. ``classify_route`` takes the ASGI ``path``
(already percent-decoded, so ``%2e``, ``%2E`` and ``%2f`` are dots and slashes here) and:

- refuses (``INVALID``, 400) a path an upstream could read another way than we do: a ``.`` or ``..`` segment (a
  dot segment resolved here, by httpx or by the upstream walks ``/v1/x/../chat/completions`` onto the chat route),
  and any character outside RFC 3986's path characters less ``%`` (double decoding), ``;`` (path parameters some
  servers strip), ``\\`` (read as ``/`` by some), ``?``/``#`` (decoded, they would cut the path when the URL is
  rebuilt), whitespace, control and non-ASCII characters;
- collapses repeated slashes and drops a trailing one, and forwards that canonical form;
- guards ``POST /v1/chat/completions`` (compared case-insensitively: some servers route that way);
- forwards ``OPTIONS`` on any path: a CORS preflight carries no body and its reply is headers only;
- refuses (``STORED``, 403) every other method on the chat route and everything under it: stored completions
  (``store: true``) would hand back a reply the output check blocked;
- forwards the non-generating routes of ``FORWARDED`` with their methods;
- refuses (``UNGUARDED``, 403) the rest, which may generate text (``/v1/completions``, ``/v1/responses``,
  ``/v1/evals``, ``/v1/images``, batches and their files, ...): forwarded, and counted, only with
  ``routes.forward_unguarded_generating``.

A refused route's ``V1Route.refusal`` is the message its 403 carries: why, and the setting that forwards it where
one does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

GUARDED_PATH = "/v1/chat/completions"
# Forwarded unguarded: routes whose replies carry no generated text, with the methods they use. Patterns on the
# lower-cased canonical path; ``[^/]+`` is one segment, ``.+`` several (a Hugging Face model id "org/name", which
# the openai SDK sends as "org%2Fname").
FORWARDED: tuple[tuple[frozenset[str], re.Pattern[str]], ...] = (
    # model list and model cards: metadata
    (frozenset({"GET", "HEAD"}), re.compile(r"/v1/models(?:/.+)?")),
    # deletes a fine-tuned model (the SDK's models.delete): the reply is its id and a flag
    (frozenset({"DELETE"}), re.compile(r"/v1/models/.+")),
    # vectors, category scores and relevance scores: numbers, no text
    (frozenset({"POST"}), re.compile(r"/v1/embeddings")),
    (frozenset({"POST"}), re.compile(r"/v1/moderations")),
    (frozenset({"POST"}), re.compile(r"/v1/rerank")),  # vLLM, llama.cpp
    (frozenset({"POST"}), re.compile(r"/v1/score")),  # vLLM
    # speech to text: the text is what the client's own audio says (in English for translations), not an answer;
    # refusing it would push a deployment to forward_unguarded_generating, which opens /v1/completions too
    (frozenset({"POST"}), re.compile(r"/v1/audio/(?:transcriptions|translations)")),
    # text to speech: the client's own text read aloud; the model answers nothing
    (frozenset({"POST"}), re.compile(r"/v1/audio/speech")),
)
# Refused with a reason of their own; the rest off the allowlist "may generate text the guard does not read".
REFUSAL_REASONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # a batch runs chat completions upstream, asynchronously: neither its requests nor its replies pass the guard
    (re.compile(r"/v1/batches(?:/.*)?"), "a batch runs chat completions on the upstream, which the guard never reads"),
    # a batch's requests are uploaded as a file, and its generated replies are read back as one
    (re.compile(r"/v1/(?:files|uploads)(?:/.*)?"),
     "files carry batch requests and batch output (generated text) that the guard never reads"),
)  # fmt: skip
UNGUARDED_SETTING = "routes.forward_unguarded_generating (GUARDPROXY_ROUTES__FORWARD_UNGUARDED_GENERATING=true)"
# RFC 3986 pchar and "/", less "%" and ";" (see the module docstring).
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_SLASHES = re.compile(r"/{2,}")
GUARDED_DESCRIPTION = (
    "this gateway guards POST /v1/chat/completions and forwards only non-generating routes "
    "(GET /v1/models, DELETE /v1/models/{id}, POST /v1/embeddings, /v1/moderations, /v1/rerank, /v1/score, "
    "/v1/audio/*, OPTIONS)"
)

# Metric labels: the OpenAI API's top-level resources. Anything else is "other": a label taken from the
# client's path would let a client mint unbounded metric series.
KNOWN_RESOURCES = frozenset(
    {
        "assistants", "audio", "batches", "chat", "completions", "embeddings", "engines", "evals", "files",
        "fine_tuning", "images", "messages", "models", "moderations", "realtime", "rerank", "responses", "score",
        "threads", "uploads", "vector_stores",
    }
)  # fmt: skip


class RouteKind(Enum):
    GUARDED = "guarded"
    FORWARD = "forward"
    UNGUARDED = "unguarded"  # may generate: refused unless routes.forward_unguarded_generating
    STORED = "stored"  # other methods on the guarded path, and paths under it: always refused
    INVALID = "invalid"  # a path that another parser could read differently: always refused (400)


@dataclass(frozen=True)
class V1Route:
    """A classified request. ``path``: the canonical path, the one the upstream URL is built from (``""`` when
    ``INVALID``); ``label``: a bounded metric label; ``problem``: why an ``INVALID`` path is refused."""

    kind: RouteKind
    path: str
    label: str
    problem: str = ""
    # the 403's message for a STORED or UNGUARDED route: why it is refused, and what would forward it
    refusal: str = ""


def path_problem(path: str) -> str | None:
    """Why ``path`` (percent-decoded) is refused, or None when it is fine."""
    if not _PATH_CHARS.fullmatch(path):
        return "the request path holds characters this gateway does not forward (%, ;, \\, ?, #, spaces, non-ASCII)"
    if any(seg and not seg.strip(".") for seg in path.split("/")):  # "...": some servers trim trailing dots
        return "the request path holds a '.' or '..' segment"
    return None


def canonical_path(path: str) -> str:
    """Repeated slashes collapsed, a trailing slash dropped (not that of ``/v1/`` itself: an upstream URL is built
    only from a ``/v1/...`` path). Only for a path ``path_problem`` passed."""
    path = _SLASHES.sub("/", path)
    return path[:-1] if path.endswith("/") and path.count("/") > 2 else path


def classify_route(method: str, raw_path: str) -> V1Route:
    """The route of ``method raw_path`` (the ASGI path: decoded, starting with ``/v1/``)."""
    problem = path_problem(raw_path)
    if problem is not None:
        return V1Route(RouteKind.INVALID, "", "/v1/other", problem)
    path = canonical_path(raw_path)
    low = path.lower()
    if low == GUARDED_PATH and method == "POST":
        return V1Route(RouteKind.GUARDED, GUARDED_PATH, GUARDED_PATH)
    label = route_label(low)
    if method == "OPTIONS":  # a CORS preflight, the chat route's included: no body to guard, headers back
        return V1Route(RouteKind.FORWARD, path, label)
    if low.startswith("/v1/chat"):  # the guarded path by another method, a stored completion, or a variant of them
        refusal = (
            f"{method} {path} is refused: stored chat completions (and any method but POST on "
            f"/v1/chat/completions) bypass the guard; {GUARDED_DESCRIPTION}"
        )
        return V1Route(RouteKind.STORED, path, label, refusal=refusal)
    if any(method in methods and pattern.fullmatch(low) for methods, pattern in FORWARDED):
        return V1Route(RouteKind.FORWARD, path, label)
    reason = next((why for pattern, why in REFUSAL_REASONS if pattern.fullmatch(low)), None)
    refusal = (
        f"{method} {path} is refused: {reason or 'it may generate text, which the guard does not read'}; "
        f"{GUARDED_DESCRIPTION}; {UNGUARDED_SETTING} forwards it unguarded"
    )
    return V1Route(RouteKind.UNGUARDED, path, label, refusal=refusal)


def route_label(low: str) -> str:
    """A bounded metric label of a lower-cased canonical path: ``/v1/<known resource>``, or ``/v1/other``."""
    parts = low.split("/")
    seg = parts[2] if len(parts) > 2 and parts[1] == "v1" else "other"
    return "/v1/" + (seg if seg in KNOWN_RESOURCES else "other")

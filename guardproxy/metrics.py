"""Prometheus metrics of one gateway app.

Each app gets its own ``CollectorRegistry`` (tests run many apps in one process). Other parts record
through the ``Metrics`` object on ``app.state.metrics``:

- ``observe_decision(policy, action, *, shadow=False)``: one policy decision;
- ``observe_stage(stage, seconds)``: the gateway's own time in a stage (the gateway also observes every
  entry of ``Exchange.timings`` when an exchange ends);
- ``counter(name, doc, labels)`` / ``histogram(...)`` / ``gauge(...)``: a metric of their own in the same
  registry (idempotent: asking twice returns the same metric).

Event counters whose label values are known in advance (``REJECT_REASONS``, ``OUTCOMES``, ``MALFORMED_SERIES``,
``UNGUARDED_ROUTES``, ``STREAM_ERROR_CODES``) have a series at 0 for each from the start, so ``rate()``,
``increase()`` and ``absent()`` work before a first event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from guardproxy.errors import AuthError, RateLimited, RequestError, RouteNotGuarded
from guardproxy.routes import KNOWN_RESOURCES, route_label

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _names(*classes: type[Exception]) -> tuple[str, ...]:
    """The class names of ``classes`` and of their subclasses, as ``type(exc).__name__`` gives them."""
    out: list[str] = []
    for cls in classes:
        out += [cls.__name__, *_names(*cls.__subclasses__())]
    return tuple(out)


# guardproxy_rejected_total{reason}: the app counts "capacity" and, for the errors it refuses a request with
# before the upstream, the error's class name (guardproxy.app).
REJECT_REASONS = ("capacity", *_names(AuthError, RateLimited, RouteNotGuarded, RequestError))
# guardproxy_exchange_outcomes_total{outcome}: the outcomes a guarded exchange ends with (guardproxy.chat).
OUTCOMES = ("ok", "blocked_input", "blocked_output", "upstream_error", "client_disconnected", "error", "shutdown")

# guardproxy_upstream_malformed_total{path, problem}: upstream replies the output check could not read with certainty
# (``streaming.MalformedReply.problem``: the client got a 502 or a stream ended as a block ends), and, on streams,
# requests whose upstream sent text for a choice after its finish_reason (dropped) (guardproxy.chat).
MALFORMED_PROBLEMS = ("choices", "index", "field")
MALFORMED_SERIES = (*(("plain", p) for p in MALFORMED_PROBLEMS), *(("stream", p) for p in MALFORMED_PROBLEMS),
                    ("stream", "late_text"))  # fmt: skip

# guardproxy_unguarded_forwards_total{route}: every label a forwarded unguarded route can have (``routes.route_label``:
# the API's top-level resources and "other"; the chat resource is never forwarded unguarded).
UNGUARDED_ROUTES = tuple(sorted({route_label(f"/v1/{r}") for r in KNOWN_RESOURCES if r != "chat"} | {"/v1/other"}))
# guardproxy_stream_errors_total{code}: the codes of the gateway's own errors that can end a stream under way
# (``app.error_payload(exc, in_band=True)``). Not the codes an upstream names in an HTTP error: that comes before a
# stream starts, and its code is the upstream's, so its series appears with its first event.
STREAM_ERROR_CODES = (
    "upstream_stream_error", "upstream_malformed", "upstream_timeout", "upstream_unreachable", "upstream_error",
    "overloaded", "guard_unavailable", "content_filter", "internal_error",
)  # fmt: skip

# Stage times are the gateway's own overhead: mostly well under a millisecond.
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "guardproxy_requests", "requests answered, by route and status", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "guardproxy_request_seconds", "time from request to last byte", ["route"], registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.upstream_seconds = Histogram(
            "guardproxy_upstream_seconds", "upstream time to response headers", ["route"], registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "guardproxy_stage_seconds", "gateway's own time per stage", ["stage"], registry=r, buckets=_STAGE_BUCKETS
        )
        self.decisions = Counter(
            "guardproxy_decisions", "policy decisions by policy, action and role", ["policy", "action", "role"],
            registry=r,
        )  # fmt: skip
        self.outcomes = Counter("guardproxy_exchange_outcomes", "guarded exchanges by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.outcomes.labels(outcome)
        self.unguarded = Counter(
            "guardproxy_unguarded_forwards", "generating requests forwarded without a guard", ["route"], registry=r
        )
        for route in UNGUARDED_ROUTES:
            self.unguarded.labels(route)
        self.rejected = Counter(
            "guardproxy_rejected", "requests refused before the upstream, by reason", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.stream_errors = Counter(
            "guardproxy_stream_errors", "streams ended with an in-band error event", ["code"], registry=r
        )
        for code in STREAM_ERROR_CODES:
            self.stream_errors.labels(code)
        self.upstream_malformed = Counter(
            "guardproxy_upstream_malformed", "upstream replies failed closed, or late text dropped, by path, problem",
            ["path", "problem"], registry=r,
        )  # fmt: skip
        for path, problem in MALFORMED_SERIES:
            self.upstream_malformed.labels(path, problem)
        self.in_flight = Gauge("guardproxy_in_flight", "requests in flight", registry=r)
        self.finish_errors = Counter("guardproxy_finish_errors", "pipeline.finish calls that raised", registry=r)
        self.finish_dropped = Counter(
            "guardproxy_finish_dropped", "pipeline.finish calls dropped: too many pending", registry=r
        )
        self._extra: dict[str, Counter | Histogram | Gauge] = {}
        self._stage_children: dict[str, Histogram] = {}
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One answered request (children cached: ``labels()`` costs more than the increment)."""
        key = (route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, str(status))
        child.inc()
        hist = self._duration_children.get(route)
        if hist is None:
            hist = self._duration_children[route] = self.request_seconds.labels(route)
        hist.observe(seconds)

    def observe_decision(self, policy: str, action: str, *, shadow: bool = False) -> None:
        self.decisions.labels(policy, action, "shadow" if shadow else "active").inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_seconds.labels(stage)
        child.observe(seconds)

    def observe_timings(self, timings: Mapping[str, float]) -> None:
        for stage, seconds in timings.items():
            self.observe_stage(stage, seconds)

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        metric = self._extra.get(name)
        if metric is None:
            metric = self._extra[name] = Counter(name, doc, list(labels), registry=self.registry)
        assert isinstance(metric, Counter), f"{name} is registered as another kind"
        return metric

    def histogram(
        self, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = _STAGE_BUCKETS
    ) -> Histogram:
        metric = self._extra.get(name)
        if metric is None:
            metric = self._extra[name] = Histogram(name, doc, list(labels), registry=self.registry, buckets=buckets)
        assert isinstance(metric, Histogram), f"{name} is registered as another kind"
        return metric

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        metric = self._extra.get(name)
        if metric is None:
            metric = self._extra[name] = Gauge(name, doc, list(labels), registry=self.registry)
        assert isinstance(metric, Gauge), f"{name} is registered as another kind"
        return metric

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""``guardproxy bench``: the gateway's added latency, throughput and memory, measured end to end.

Layout (one concept per module):

- ``upstream``: the FAKE upstream the bench drives (``guardproxy.fake_upstream`` behind a wrapper that stamps its
  own service time on every reply, ``x-bench-upstream-ms``), runnable as its own process.
- ``procs``: starting the upstream and gateway processes on loopback, and sampling their RSS and open descriptors.
- ``load``: the request mix (single turns, growing conversations, streaming and not), the HTTP client that
  measures one request, the bounded worker pool, percentiles, and /metrics scraping.
- ``run``: the phases (latency per concurrency, conversation length, throughput sweep) and their results.
- ``report``: the terminal table, the JSON document and the PNG charts.

Why the stamp: the gateway's added latency is its time minus the upstream's time *for the same request*.
Percentiles of two separate runs cannot give it (the upstream's jitter lands in both), so every request the
bench sends carries its own upstream time back, and the overhead is computed per request.
"""

from __future__ import annotations

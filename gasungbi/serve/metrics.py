"""Server metrics for Prometheus, kept in a ``prometheus_client`` registry of their own.

Each :class:`Metrics` owns a ``CollectorRegistry`` (not the process-wide default), so several
servers or schedulers in one process never clash. Counters and the time-to-first-token histogram
are updated from the request handlers and the scheduler thread (``prometheus_client`` metrics are
thread-safe); the scheduler's gauges (queue depth, running sequences, KV-cache use) are read when
``/metrics`` is scraped, through :meth:`Metrics.watch`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Requests by route and status, tokens in and out, time to first token, decode tokens/s."""

    def __init__(self, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self._requests = Counter("gasungbi_requests", "HTTP requests by route and status code.", ("route", "code"),
                                 registry=r)
        self._prompt_tokens = Counter("gasungbi_prompt_tokens", "Prompt tokens received (tokens in).", registry=r)
        self._cached_tokens = Counter("gasungbi_prompt_tokens_cached",
                                      "Prompt tokens whose cache came from the prefix cache (not prefilled).",
                                      registry=r)
        self._generation_tokens = Counter("gasungbi_generation_tokens", "Tokens generated (tokens out).", registry=r)
        self._decode_steps = Counter("gasungbi_decode_steps", "Batched decode forwards.", registry=r)
        self._decode_rows = Counter("gasungbi_decode_rows",
                                    "Sequences in those forwards, summed (/ steps = the mean decode batch).",
                                    registry=r)
        self._cancelled = Counter("gasungbi_requests_cancelled", "Sequences cancelled because their client went away.",
                                  registry=r)
        self._rejected = Counter("gasungbi_requests_rejected", "Requests refused with 429 (queue full).", registry=r)
        self._ttft = Histogram("gasungbi_time_to_first_token_seconds", "From request arrival to its first token.",
                               buckets=TTFT_BUCKETS, registry=r)
        Gauge("gasungbi_generation_tokens_per_second",
              f"Generated tokens per second over the last {window_s:g} s.", registry=r).set_function(self.tokens_per_s)
        self._gauges: Callable[[], dict[str, tuple[str, float]]] = dict
        r.register(_Gauges(lambda: self._gauges()))
        self.window_s = window_s
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps

    def request(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def add_prompt_tokens(self, n: int, cached: int = 0) -> None:
        """``n`` prompt tokens joined the batch, ``cached`` of them from the prefix cache."""
        self._prompt_tokens.inc(n)
        self._cached_tokens.inc(cached)

    def add_tokens(self, n: int) -> None:
        """``n`` tokens generated now (all rows of one step or prefill)."""
        self._generation_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, n))
            while self._steps and self._steps[0][0] < now - self.window_s:
                self._steps.popleft()

    def step(self, rows: int) -> None:
        """One batched decode forward of ``rows`` sequences."""
        self._decode_steps.inc()
        self._decode_rows.inc(rows)

    def ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def cancel(self, n: int = 1) -> None:
        self._cancelled.inc(n)

    def reject(self) -> None:
        self._rejected.inc()

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._steps if t >= now - self.window_s]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def watch(self, gauges: Callable[[], dict[str, tuple[str, float]]]) -> None:
        """Expose ``gauges()`` (name -> (help, value), e.g. ``Scheduler.gauges``), read at each scrape."""
        self._gauges = gauges

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of everything in this registry."""
        return generate_latest(self.registry)


class _Gauges:
    """A collector turning a callable's {name: (help, value)} into gauges at scrape time."""

    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]]):
        self.gauges = gauges

    def describe(self):
        return []  # the names are only known when called; nothing to check at registration

    def collect(self):
        for name, (help_, value) in self.gauges().items():
            yield GaugeMetricFamily(name, help_, value=value)

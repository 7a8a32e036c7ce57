"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and a histogram are updated from the request handlers and the scheduler thread (under
one lock); gauges (queue depth, running sequences, KV-cache use) are read from the scheduler when
``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests by route and status, tokens in and out, time to first token, decode tokens/s."""

    def __init__(self, window_s: float = 10.0):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0
        self.rejected = 0
        self.decode_steps = 0
        self.decode_rows = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.window_s = window_s
        self._steps: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def add_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def add_tokens(self, n: int) -> None:
        """``n`` tokens generated now (all rows of one step or prefill)."""
        now = time.monotonic()
        with self._lock:
            self.generation_tokens += n
            self._steps.append((now, n))
            while self._steps and self._steps[0][0] < now - self.window_s:
                self._steps.popleft()

    def step(self, rows: int) -> None:
        """One batched decode forward of ``rows`` sequences."""
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self.ttft_sum += seconds

    def cancel(self, n: int = 1) -> None:
        with self._lock:
            self.cancelled += n

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._steps if t >= now - self.window_s]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges``: name -> (help, value) read by the caller."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        with self._lock:
            metric("gasungbi_requests_total", "counter", "HTTP requests by route and status code.",
                   [(f'{{route="{r}",code="{c}"}}', n) for (r, c), n in sorted(self.requests.items())])
            metric("gasungbi_prompt_tokens_total", "counter", "Prompt tokens received (tokens in).",
                   [("", self.prompt_tokens)])
            metric("gasungbi_generation_tokens_total", "counter", "Tokens generated (tokens out).",
                   [("", self.generation_tokens)])
            metric("gasungbi_decode_steps_total", "counter", "Batched decode forwards.", [("", self.decode_steps)])
            metric("gasungbi_decode_rows_total", "counter",
                   "Sequences in those forwards, summed (/ steps = the mean decode batch).", [("", self.decode_rows)])
            metric("gasungbi_requests_cancelled_total", "counter",
                   "Sequences cancelled because their client went away.", [("", self.cancelled)])
            metric("gasungbi_requests_rejected_total", "counter", "Requests refused with 429 (queue full).",
                   [("", self.rejected)])
            cum, buckets = 0, []
            for le, n in zip(TTFT_BUCKETS, self.ttft_counts):
                cum += n
                buckets.append((f'_bucket{{le="{le}"}}', cum))
            total = cum + self.ttft_counts[-1]
            buckets += [('_bucket{le="+Inf"}', total), ("_sum", self.ttft_sum), ("_count", total)]
            out.append("# HELP gasungbi_time_to_first_token_seconds From request arrival to its first token.")
            out.append("# TYPE gasungbi_time_to_first_token_seconds histogram")
            out.extend(f"gasungbi_time_to_first_token_seconds{suffix} {_num(v)}" for suffix, v in buckets)
        metric("gasungbi_generation_tokens_per_second", "gauge",
               f"Generated tokens per second over the last {self.window_s:g} s.", [("", self.tokens_per_s())])
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"

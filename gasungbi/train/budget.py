"""Time budgets by the clock: a stage trains for its minutes, whatever the machine's speed.

Cramming (Geiping and Goldstein 2022, Sec. 3) schedules the learning rate by the fraction of the
time budget elapsed, not by a step count fixed in advance: a slower or busier machine trains fewer
steps of the same schedule and still ends on time. :class:`Budget` does that for pretraining, SFT,
distillation and GRPO:

* **Progress.** The schedule's progress after a step is the fraction of the training time spent:

      progress = (t_end_of_step - t_first_step) / (seconds - reserve - t_first_step)

  where ``t`` is the run's clock (seconds since its start, plus what a resumed run had spent), and
  ``reserve`` is what the stage still has to do after its last step (below). With ``max_steps`` too,
  progress is the larger of that and ``(step + 1) / max_steps``: whichever comes first ends the run.
  Without a time budget it is ``(step + 1) / max_steps`` alone, the usual step schedule.
* **Warmup** is linear over ``warmup_steps`` steps, or until a fifth of the progress if that comes
  first; the decay then runs over the rest of the progress, continuous where the warmup ended.
* **Stopping.** Before each step the loop asks :meth:`Budget.out_of_time`: whether one more step
  (the slowest of the last few) and anything due after it would eat into the reserve.
* **The reserve** is the stage's tail: its final validation or evaluation, the final checkpoint,
  the sample and report. Each part is measured while the run goes (an intermediate validation
  times the final one, a checkpoint times the final save; GRPO's first held-out evaluation times
  its last); until a part is measured, it is estimated from the run's own step time and model size.

Under torchrun every rank takes the same decisions: progress and the stop flag are averaged and
agreed across the processes (``reduce``).

Short budgets get their own defaults (:func:`short_budget_defaults`): what a few minutes of a CPU
buys is a few hundred small optimizer steps, not a few dozen large ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Callable

WARMUP_MAX_PROGRESS = 0.2
"""With a time budget, the warmup ends at this progress at the latest (its steps are not known)."""

SAVE_BYTES_PER_S = 300e6
"""Until a checkpoint has been timed, a save is estimated at this rate over the weights and the
optimizer's state (writes that the page cache absorbs), plus :data:`SAVE_FIXED_S`."""

SAVE_FIXED_S = 0.2


class Budget:
    """A stage's deadline on the run's clock, and the learning-rate schedule's progress toward it.

    ``seconds``: the budget, counted from ``started`` (a ``time.perf_counter()``; the command's or
    the stage's start) plus ``before`` (seconds a resumed run had spent); None for steps alone.
    ``max_steps``: a step limit (None: the clock alone). ``warmup_steps``: the linear warmup.
    ``reduce``: sums a list of floats over the processes under torchrun (None in one process)."""

    def __init__(self, seconds: float | None, max_steps: int | None, started: float, warmup_steps: int = 0,
                 before: float = 0.0, reduce: Callable[[list[float]], list[float]] | None = None, world: int = 1):
        if seconds is None and not max_steps:
            raise ValueError("a budget needs a time (minutes) or a number of steps")
        self.seconds, self.max_steps, self.warmup_steps = seconds, max_steps, warmup_steps
        self.started, self.before, self.reduce, self.world = started, before, reduce, world
        self.t_first: float | None = None  # the clock when the run's first step began
        self.t_last: float | None = None  # the clock when the last step ended
        self.recent: deque[float] = deque(maxlen=5)  # the last steps' seconds
        self.tail: dict[str, float] = {}  # what follows the last step: name -> seconds (measured or estimated)
        self.measured: set[str] = set()
        self.warmup_end: float | None = None  # the progress at which the warmup ended
        self.stopped_early = False

    # --- the clock -------------------------------------------------------------------------------

    def now(self) -> float:
        """The run's clock: seconds since ``started`` plus those a resumed run had spent."""
        return self.before + time.perf_counter() - self.started

    def step_started(self) -> float:
        t = self.now()
        if self.t_first is None:
            self.t_first = t
        return t

    def step_done(self, started_at: float) -> None:
        self.t_last = self.now()
        self.recent.append(self.t_last - started_at)

    @property
    def step_s(self) -> float:
        """The mean of the last steps' seconds (0 before the first)."""
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    # --- the tail --------------------------------------------------------------------------------

    def estimate(self, name: str, seconds: float) -> None:
        """An estimate of a tail part's seconds, kept until the part is measured."""
        if name not in self.measured:
            self.tail[name] = seconds

    def measure(self, name: str, seconds: float) -> None:
        """A tail part's seconds, timed while the run goes (the last timing counts)."""
        self.tail[name] = seconds
        self.measured.add(name)

    @property
    def reserve(self) -> float:
        """Seconds kept for what follows the last step."""
        return sum(self.tail.values())

    # --- the schedule and the stop ---------------------------------------------------------------

    def _agreed(self, values: list[float]) -> list[float]:
        if self.reduce is None:
            return values
        return [v / self.world for v in self.reduce(values)]

    def _time_progress(self, extra: float = 0.0) -> float:
        start = self.t_first if self.t_first is not None else self.now()
        horizon = self.seconds - self.reserve - start
        return 1.0 if horizon <= 0 else (self.now() + extra - start) / horizon

    def progress(self, step: int) -> float:
        """Progress in [0, 1] at the end of step ``step`` (0-based), which is about to run."""
        p = (step + 1) / self.max_steps if self.max_steps else 0.0
        if self.seconds is not None:
            p = max(p, self._agreed([self._time_progress(self.step_s)])[0])
        return min(1.0, p)

    def schedule(self, step: int) -> tuple[float, float]:
        """(progress, warmup) of step ``step`` for :func:`gasungbi.train.optim.lr_multiplier`:
        ``warmup`` is the progress at which the linear warmup ends (so that progress / warmup =
        (step + 1) / warmup_steps while it lasts)."""
        p = self.progress(step)
        if self.seconds is None:
            return p, self.warmup_steps / self.max_steps
        if self.warmup_end is None:
            if step + 1 < self.warmup_steps and p < WARMUP_MAX_PROGRESS:
                return p, p * self.warmup_steps / (step + 1)
            self.warmup_end = max(p, 1e-9)
        return p, self.warmup_end

    def out_of_time(self, step: int, extra: float = 0.0) -> bool:
        """Whether step ``step`` must not run: the step limit is reached, or one more step (the
        slowest of the last few) plus ``extra`` seconds due after it would eat into the reserve.
        A run's first step always runs."""
        if self.max_steps and step >= self.max_steps:
            return True
        if self.seconds is None or not self.recent:
            return False
        late = float(self.now() + max(self.recent) + extra > self.seconds - self.reserve)
        self.stopped_early = self._agreed([late])[0] > 0
        return self.stopped_early

    def state_dict(self) -> dict:
        """What a resumed run continues from: its clock, when its training began, where its warmup
        ended, and its tail's timings."""
        return {"clock": self.now(), "t_first": self.t_first, "warmup_end": self.warmup_end,
                "recent": list(self.recent), "tail": dict(self.tail), "measured": sorted(self.measured)}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue a run saved with :meth:`state_dict` (its clock is ``before``, given at construction)."""
        if state:
            self.t_first, self.warmup_end = state.get("t_first"), state.get("warmup_end")
            self.recent.extend(state.get("recent", []))
            self.tail.update(state.get("tail", {}))
            self.measured.update(state.get("measured", []))

    def record(self) -> dict:
        """What the report says about the budget: asked, used, and what the tail took."""
        return {"seconds": self.seconds, "max_steps": self.max_steps, "trained_until_s": round(self.t_last or 0.0, 2),
                "ended_s": round(self.now(), 2),
                "first_step_s": round(self.t_first or 0.0, 2), "step_s": round(self.step_s, 4),
                "reserve_s": {k: round(v, 2) for k, v in self.tail.items()},
                "stopped_by_clock": self.stopped_early}


def save_seconds_estimate(n_bytes: int) -> float:
    """The seconds a checkpoint of ``n_bytes`` (weights and optimizer state) is estimated to take
    until one has been timed."""
    return SAVE_FIXED_S + n_bytes / SAVE_BYTES_PER_S


SHORT_BUDGET_MINUTES = 5.0
"""At or below this budget, :func:`short_budget_defaults` applies."""

SHORT_BUDGET = dict(batch_size=8, seq_len=128, lr=6e-3, mtp_weight=0.0, eval_interval=0, eval_batches=4)
"""The short-budget recipe: 8 x 128 tokens per step (4x the steps of 16 x 256 in the same time; early in
training the useful batch is small), a higher peak learning rate for the short schedule, no MTP
(its extra depth pays at scale, V3 Sec. 2.2, not in a minute), one small validation at the end.
Chosen on tiny Shakespeare at a ~1 minute budget (``benchmarks/cpu_minute.py``)."""


def short_budget_defaults(tc, defaults) -> tuple[object, dict]:
    """``tc`` with :data:`SHORT_BUDGET` for the fields still at their ``defaults`` when its time budget
    is at most :data:`SHORT_BUDGET_MINUTES`; and the fields changed. A field set to anything else
    (a flag, a config file) is kept."""
    if tc.time_budget is None or tc.time_budget > SHORT_BUDGET_MINUTES:
        return tc, {}
    changed = {k: v for k, v in SHORT_BUDGET.items() if getattr(tc, k) == getattr(defaults, k) != v}
    return dataclasses.replace(tc, **changed), changed

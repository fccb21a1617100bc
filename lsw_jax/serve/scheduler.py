"""dLoRA's batching policy: per-adapter queues, merged vs unmerged per step, credits.

Every engine step the scheduler decides:

* the mode: ``merged`` runs the rows of ONE adapter with that adapter's delta merged into
  the weights (the linears skip LoRA); ``unmerged`` runs every row with its own adapter
  through the LoRA path. Under ``policy="adaptive"`` the choice compares the time to
  advance every row with work (``n`` of them, up to the slots) by one token: unmerged
  ``t_u(n)``, against merged ``t_m(n_m) + t_u(n - n_m)`` (the rows of the other adapters
  are parked now and need a step of their own later) plus the merge when the adapter
  changes (its measured time spread over the adapter's expected remaining tokens). ``t``
  are exponential moving averages of MEASURED step times per mode and active row count
  (nearest measured count when one is missing; a mode never measured is tried once, and
  the other mode is re-tried every ``explore_every`` steps so the estimates track the
  machine). The resulting run-time threshold (how many of the rows one adapter needs
  before merged wins) is ``merge_threshold()``. Where a step's cost hardly depends on its
  row count (a CPU, fixed-shape steps) this merges only batches of a single adapter;
  where it grows with the rows, mixed batches can merge too.
* which waiting requests join (admission into free rows) and which running ones leave
  (preemption: the request returns to the FRONT of its queue with its generated tokens;
  the engine re-prefills prompt + generated tokens when it resumes).
* credits against starvation: an adapter whose pending requests (waiting, or parked in
  a row while another adapter runs merged) make no progress in a step gains one credit;
  progress resets it. An adapter with ``credit >= credit_limit`` is starved: it becomes the
  merged adapter (highest credit first), or is admitted first in unmerged mode, preempting
  rows of non-starved adapters if no row is free. So no adapter waits more than about
  ``credit_limit`` steps per starved adapter ahead of it, however skewed the load.

The scheduler is pure Python over request objects (``adapter`` and ``num_tokens_left``
attributes); it never touches JAX, so it is unit-testable on its own.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

MODES = ("merged", "unmerged")
POLICIES = ("adaptive", "merged", "unmerged")


@dataclasses.dataclass
class StepPlan:
    mode: str  # "merged" | "unmerged" | "idle"
    adapter: str | None = None  # the merged adapter ("" = base weights), merged mode only
    admit: list[Any] = dataclasses.field(default_factory=list)  # waiting -> a row (prefill)
    preempt: list[Any] = dataclasses.field(default_factory=list)  # row -> front of its queue
    run: list[Any] = dataclasses.field(default_factory=list)  # rows (incl. admitted) to decode


class StepTimeModel:
    """EMA of measured step seconds per (mode, active rows)."""

    def __init__(self, alpha: float = 0.25):
        self.alpha = alpha
        self.seconds: dict[tuple[str, int], float] = {}
        self.merge_seconds: float | None = None

    def observe(self, mode: str, n: int, seconds: float) -> None:
        old = self.seconds.get((mode, n))
        self.seconds[(mode, n)] = (
            seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        )

    def observe_merge(self, seconds: float) -> None:
        old = self.merge_seconds
        self.merge_seconds = (
            seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        )

    def estimate(self, mode: str, n: int) -> float | None:
        if (mode, n) in self.seconds:
            return self.seconds[(mode, n)]
        known = [m for (md, m) in self.seconds if md == mode]
        if not known:
            return None
        return self.seconds[(mode, min(known, key=lambda m: (abs(m - n), -m)))]


def adapter_key(req: Any) -> str:
    return req.adapter or ""


class Scheduler:
    def __init__(
        self,
        slots: int,
        *,
        policy: str = "adaptive",
        credit_limit: int = 32,
        explore_every: int = 64,
        mergeable: Any = None,
    ):
        """mergeable(adapter) -> bool: whether merged mode can serve that adapter's rows
        (one selection shared by every row; default: all)."""
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} must be one of {POLICIES}")
        self.slots, self.policy = slots, policy
        self.credit_limit, self.explore_every = credit_limit, explore_every
        self.mergeable = mergeable or (lambda adapter: True)
        self.queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.credits: collections.Counter[str] = collections.Counter()
        self.timing = StepTimeModel()
        self.merged_adapter: str | None = None  # adapter whose merged weights are resident
        self.steps = 0
        self.mode_counts: collections.Counter[str] = collections.Counter()
        self._order = 0

    # ------------------------------------------------------------------ queues
    def add(self, req: Any, *, front: bool = False) -> None:
        q = self.queues[adapter_key(req)]
        if front:
            q.appendleft(req)
        else:
            self._order += 1
            req._sched_order = self._order
            q.append(req)

    def remove(self, req: Any) -> bool:
        q = self.queues.get(adapter_key(req))
        if q is not None and req in q:
            q.remove(req)
            return True
        return False

    @property
    def num_waiting(self) -> int:
        # list() copies in one step: safe against the engine thread adding a queue.
        return sum(len(q) for q in list(self.queues.values()))

    # ------------------------------------------------------------------ decisions
    def schedule(self, running: list[Any], free_rows: int) -> StepPlan:
        """Plan one step from the requests in rows (``running``) and the queues."""
        work: collections.Counter[str] = collections.Counter(adapter_key(r) for r in running)
        for k, q in self.queues.items():
            work[k] += len(q)
        work = +work
        if not work:
            return StepPlan("idle")
        starved = sorted(
            (k for k in work if self.credits[k] >= self.credit_limit),
            key=lambda k: -self.credits[k],
        )
        m = starved[0] if starved else self._most_work(work)
        mode = self._choose_mode(work, m, running)
        plan = StepPlan(mode, m if mode == "merged" else None)
        if mode == "merged":
            self._admit(plan, running, free_rows, [m], victims_of=lambda k: k != m)
            plan.run = [r for r in running if adapter_key(r) == m and r not in plan.preempt]
        else:
            order = starved + [k for k in self._fifo_keys() if k not in starved]
            starved_set = set(starved)
            self._admit(
                plan,
                running,
                free_rows,
                order,
                victims_of=lambda k: k not in starved_set,
                preempt_for=starved_set,
            )
            plan.run = [r for r in running if r not in plan.preempt]
        plan.run += plan.admit
        return plan

    def _most_work(self, work: collections.Counter) -> str:
        # Ties keep the adapter already merged (no switch cost).
        return max(work, key=lambda k: (work[k], k == self.merged_adapter))

    def _fifo_keys(self) -> list[str]:
        heads = [(q[0]._sched_order, k) for k, q in self.queues.items() if q]
        return [k for _, k in sorted(heads)]

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes a step may run in under this policy (rows merged mode cannot serve
        run unmerged under every policy)."""
        return ("unmerged",) if self.policy == "unmerged" else MODES

    def _choose_mode(self, work: collections.Counter, m: str, running: list[Any]) -> str:
        if not self.mergeable(m):  # e.g. LoRA-Switch rows: each token its own experts
            return "unmerged"
        if self.policy != "adaptive":
            return self.policy
        n_m = min(self.slots, work[m])
        n_u = min(self.slots, sum(work.values()))
        t_m = self.timing.estimate("merged", n_m)
        t_u = self.timing.estimate("unmerged", n_u)
        if t_m is None or t_u is None:  # explore the mode never measured
            return "merged" if t_m is None else "unmerged"
        guess = self._compare(n_m, t_m, n_u, t_u, m, running)
        if self.explore_every and self.steps % self.explore_every == self.explore_every - 1:
            return "unmerged" if guess == "merged" else "merged"
        return guess

    def _compare(self, n_m, t_m, n_u, t_u, m, running) -> str:
        """Which mode advances the ``n_u`` rows with work by one token sooner.

        Unmerged: one step, ``t_u(n_u)``. Merged: a step of the ``n_m`` rows of ``m`` plus,
        for the other ``n_u - n_m`` rows (parked now, run later), an unmerged step of
        their size, plus the merge when ``m`` is not the adapter merged already (spread
        over the expected remaining tokens of ``m``'s requests)."""
        rest = n_u - n_m
        t_rest = (self.timing.estimate("unmerged", rest) or t_u) if rest else 0.0
        switch = 0.0
        if m != self.merged_adapter and m != "":
            left = [r.num_tokens_left for r in running if adapter_key(r) == m]
            left += [r.num_tokens_left for r in self.queues.get(m, ())]
            horizon = max(1.0, sum(left) / max(1, len(left)))
            switch = (self.timing.merge_seconds or t_m) / horizon
        return "merged" if t_m + switch + t_rest < t_u else "unmerged"

    def merge_threshold(self, n_total: int) -> int | None:
        """Fewest rows of one adapter (out of ``n_total`` with work) for which merged wins
        under the current estimates, switch cost aside (None: not measured, or never)."""
        n_u = min(self.slots, n_total)
        t_u = self.timing.estimate("unmerged", n_u)
        if t_u is None:
            return None
        for n in range(1, n_u + 1):
            t_m = self.timing.estimate("merged", n)
            rest = n_u - n
            t_rest = (self.timing.estimate("unmerged", rest) or t_u) if rest else 0.0
            if t_m is not None and t_m + t_rest < t_u:
                return n
        return None

    def _admit(self, plan, running, free_rows, keys, victims_of, preempt_for=None) -> None:
        """Fill free rows from the queues of ``keys`` in order; preempt rows of adapters
        for which ``victims_of`` holds when a request of ``preempt_for`` (default: all of
        ``keys``) finds no free row."""
        preempt_for = set(keys) if preempt_for is None else preempt_for
        victims = sorted(
            (r for r in running if victims_of(adapter_key(r))),
            key=lambda r: r.num_tokens_total,  # cheapest to re-prefill first
        )
        taken: list[Any] = []
        for k in keys:
            q = self.queues.get(k)
            for req in list(q or ()):
                if free_rows > 0:
                    free_rows -= 1
                elif k in preempt_for and victims:
                    plan.preempt.append(victims.pop(0))
                else:
                    break
                q.remove(req)
                taken.append(req)
        plan.admit = taken

    # ------------------------------------------------------------------ feedback
    def observe(self, plan: StepPlan, seconds: float | None, running_after: list[Any]) -> None:
        """Record a finished step: its measured time and who made progress (credits)."""
        self.steps += 1
        if plan.mode == "idle":
            return
        self.mode_counts[plan.mode] += 1
        if seconds is not None and plan.run:
            self.timing.observe(plan.mode, len(plan.run), seconds)
        progressed = {adapter_key(r) for r in plan.run}
        pending = {adapter_key(r) for r in running_after if r not in plan.run}
        pending |= {k for k, q in self.queues.items() if q}
        for k in progressed:
            self.credits[k] = 0
        for k in pending - progressed:
            self.credits[k] += 1
        for k in list(self.credits):
            if k not in pending and k not in progressed:
                del self.credits[k]

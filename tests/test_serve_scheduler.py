"""dLoRA policy: measured mode choice, credits bounding the wait under Zipf skew."""

from __future__ import annotations

import dataclasses

import numpy as np
from test_serve_fixtures import make_engine, prompts

from lsw_jax.sampling import SamplingParams
from lsw_jax.serve.engine import Request
from lsw_jax.serve.scheduler import Scheduler


@dataclasses.dataclass(eq=False)
class FakeReq:
    adapter: str | None
    num_tokens_left: int = 10
    num_tokens_total: int = 10


def _scheduler(t_merged: dict, t_unmerged: dict, **kw) -> Scheduler:
    s = Scheduler(8, policy="adaptive", explore_every=0, **kw)
    for n, t in t_merged.items():
        s.timing.observe("merged", n, t)
    for n, t in t_unmerged.items():
        s.timing.observe("unmerged", n, t)
    s.timing.observe_merge(0.0)
    return s


def test_adaptive_picks_the_faster_measured_mode():
    # Step times that grow with the rows (a GPU-like profile).
    s = _scheduler(
        {n: 0.05 + 0.1 * n for n in range(1, 9)}, {n: 0.2 + 0.15 * n for n in range(1, 9)}
    )
    # 6 of 8 rows on one adapter: merged 0.65 + unmerged(2) 0.5 < unmerged(8) 1.4.
    running = [FakeReq("a")] * 6 + [FakeReq("b"), FakeReq("c")]
    plan = s.schedule(running, 0)
    assert plan.mode == "merged" and plan.adapter == "a"
    assert {r.adapter for r in plan.run} == {"a"}
    # 1 of 8: merged 0.15 + unmerged(7) 1.25 (+ the merge) >= 1.4.
    running = [FakeReq("a")] + [FakeReq(x) for x in "bcdefgh"]
    plan = s.schedule(running, 0)
    assert plan.mode == "unmerged" and len(plan.run) == 8
    assert s.merge_threshold(8) == 2  # 0.25 + unmerged(6) 1.1 = 1.35 < 1.4


def test_flat_step_costs_merge_only_single_adapter_batches():
    # A CPU-like profile: a step costs the same whatever its rows; merged is cheaper.
    s = _scheduler({n: 0.2 for n in range(1, 9)}, {n: 0.3 for n in range(1, 9)})
    assert s.schedule([FakeReq("a")] * 8, 0).mode == "merged"
    assert s.schedule([FakeReq("a")] * 7 + [FakeReq("b")], 0).mode == "unmerged"
    assert s.merge_threshold(8) == 8


def test_estimates_follow_new_measurements():
    s = _scheduler({8: 1.0}, {8: 2.0})
    running = [FakeReq("a")] * 8
    assert s.schedule(running, 0).mode == "merged"
    for _ in range(20):  # the machine changes: merged steps get slow
        s.timing.observe("merged", 8, 5.0)
    assert s.schedule(running, 0).mode == "unmerged"


def test_explores_an_unmeasured_mode():
    s = Scheduler(4, policy="adaptive")
    s.timing.observe("unmerged", 4, 1.0)
    assert s.schedule([FakeReq("a")] * 4, 0).mode == "merged"


def test_credits_bound_the_least_popular_adapters_wait_under_zipf_skew():
    """Heavy Zipf skew (s=2.5, 3 adapters, 2 pool slots) under the always-merged policy, which starves
    rare adapters without credits: with credit_limit=L no request waits much longer than
    (number of adapters) * L steps for its first token, and it is far worse without."""
    rng = np.random.default_rng(0)
    names = ["a1", "a2", "a3"]
    weights = 1.0 / np.arange(1, 4) ** 2.5
    picks = rng.choice(3, size=60, p=weights / weights.sum())
    ps = prompts(60, seed=11, lo=3, hi=10)

    def run(credit_limit: int) -> dict:
        eng = make_engine(policy="merged", credit_limit=credit_limit)
        reqs = []
        for i, (p, k) in enumerate(zip(ps, picks, strict=True)):
            if i % 2 == 0:
                eng.step()
            reqs.append(
                eng.submit(
                    Request(p, SamplingParams(max_tokens=6, ignore_eos=True), adapter=names[k])
                )
            )
        eng.run_until_idle()
        assert all(r.finish_reason == "length" for r in reqs)
        waits: dict[str, int] = {}
        for r in reqs:
            waits[r.adapter] = max(waits.get(r.adapter, 0), r.first_token_step - r.arrival_step)
        return waits

    limit = 4
    fair = run(limit)
    rare = names[int(np.argmin(np.bincount(picks, minlength=3)))]
    assert fair[rare] <= 3 * (limit + 2), fair
    unfair = run(10_000)
    assert unfair[rare] > 2 * fair[rare], (fair, unfair)


def test_starved_adapter_preempts_in_unmerged_mode():
    s = Scheduler(2, policy="unmerged", credit_limit=3)
    running = [FakeReq("a"), FakeReq("a")]
    waiting = FakeReq("b")
    s.add(waiting)
    for _ in range(3):
        plan = s.schedule(running, 0)
        assert not plan.admit
        s.observe(plan, 0.01, running)
    plan = s.schedule(running, 0)
    assert plan.admit == [waiting] and len(plan.preempt) == 1

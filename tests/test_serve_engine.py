"""Continuous-batching engine: outputs equal ``lsw_jax.generate``, fixed shapes, preemption."""

from __future__ import annotations

import numpy as np
import pytest
from test_serve_fixtures import MAX_LEN, make_engine, prompts, reference_greedy, tiny_checkpoint

from lsw_jax.sampling import SamplingParams
from lsw_jax.serve.engine import Request
from lsw_jax.serve.server import build_server
from lsw_jax.serve.steps import TRACE_COUNTS

N_NEW = 8


def _greedy(n=N_NEW, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("policy", ["unmerged", "merged", "adaptive"])
def test_greedy_matches_generate_with_mixed_adapters(policy):
    """Requests with different adapters (and none) share batches; each output equals
    generate() on a model with that adapter attached, in every scheduling policy."""
    eng = make_engine(policy=policy)
    adapters = [None, "a1", "a2", "a3", "a1", None, "a2"]
    reqs = [
        eng.submit(Request(p, _greedy(), adapter=a))
        for p, a in zip(prompts(len(adapters), seed=1), adapters, strict=True)
    ]
    eng.run_until_idle()
    for r in reqs:
        assert r.finish_reason == "length"
        assert r.output == reference_greedy(r.prompt, r.adapter, N_NEW), (r.adapter, policy)
    if policy == "merged":
        assert eng.stats["steps_unmerged"] == 0 and eng.stats["merges"] >= 2
    if policy == "unmerged":
        assert eng.stats["steps_merged"] == 0


def test_requests_arriving_mid_flight():
    eng = make_engine(policy="unmerged")
    ps = prompts(6, seed=2)
    first = [eng.submit(Request(p, _greedy(12), adapter="a1")) for p in ps[:2]]
    for _ in range(4):
        eng.step()
    assert all(0 < len(r.output) < 12 for r in first)
    later = [
        eng.submit(Request(p, _greedy(), adapter=a))
        for p, a in zip(ps[2:], ["a3", None, "a1", "a2"], strict=True)
    ]
    eng.step()
    more = eng.submit(Request(ps[0], _greedy(), adapter="a2"))
    eng.run_until_idle()
    for r in [*first, *later, more]:
        assert r.output == reference_greedy(r.prompt, r.adapter, r.params.max_tokens)


def test_no_recompilation_in_steady_state():
    eng = make_engine(policy="adaptive")
    warm = [
        eng.submit(Request(p, _greedy(), adapter=a))
        for p, a in zip(prompts(6, 3), ["a1", "a1", None, "a2", "a1", "a3"], strict=True)
    ]
    eng.run_until_idle()
    before = dict(TRACE_COUNTS)
    for wave in range(3):
        for p, a in zip(
            prompts(7, 10 + wave), ["a1", "a2", None, "a3", "a1", "a1", "a2"], strict=True
        ):
            eng.submit(Request(p, _greedy(5 + wave), adapter=a))
        for _ in range(3):
            eng.step()
    eng.run_until_idle()
    assert dict(TRACE_COUNTS) == before, "a step recompiled after warm-up"
    assert all(r.finished for r in warm)


@pytest.mark.parametrize("policy", ["adaptive", "merged", "unmerged"])
def test_default_serve_compiles_nothing_after_warm_up(policy):
    """``lsw-jax serve --ckpt ck`` (no adapters, no pool): the scheduler explores merged and
    unmerged steps, both plain products here, and warm-up compiled the step they run.
    Greedy, sampled and penalised rows share the program (the logit adjustments are a
    device state every step carries)."""
    server = build_server(tiny_checkpoint(), slots=4, max_len=MAX_LEN, policy=policy, warmup=False)
    eng = server.engine
    assert eng.pool is None
    eng.warm_up()
    before = dict(TRACE_COUNTS)
    sampled = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, top_k=20, seed=3)
    penalised = _greedy(presence_penalty=1.0, repetition_penalty=1.2, logit_bias=((5, 2.0),))
    reqs = [
        eng.submit(Request(p, sp))
        for p, sp in zip(prompts(4, 21), [_greedy(), sampled, penalised, sampled], strict=True)
    ]
    eng.run_until_idle()
    assert dict(TRACE_COUNTS) == before, "a step compiled after warm-up"
    assert all(r.finished and r.finish_reason != "error" for r in reqs)
    assert reqs[0].output == reference_greedy(reqs[0].prompt, None, N_NEW)
    if policy != "unmerged":
        assert eng.scheduler.mode_counts["merged"] > 0  # the step warm-up used to miss


def test_preemption_keeps_generated_tokens():
    eng = make_engine(policy="unmerged")
    victim = eng.submit(Request(prompts(1, 4)[0], _greedy(16), adapter="a3"))
    for _ in range(5):
        eng.step()
    kept = list(victim.output)
    assert len(kept) >= 5
    eng.preempt(victim)  # what the scheduler does when a starved adapter needs the row
    assert victim.row is None and victim.output == kept
    eng.run_until_idle()
    assert victim.preemptions == 1 and victim.output[: len(kept)] == kept
    assert victim.output == reference_greedy(victim.prompt, "a3", 16)


def test_sampling_reproducible_and_independent_of_batch():
    sp = SamplingParams(
        max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True
    )
    p = prompts(1, 5)[0]
    eng = make_engine(policy="unmerged")
    alone = eng.submit(Request(p, sp, adapter="a1"))
    eng.run_until_idle()
    others = [eng.submit(Request(q, _greedy(), adapter="a2")) for q in prompts(3, 6)]
    crowd = eng.submit(Request(p, sp, adapter="a1"))
    other_seed = eng.submit(Request(p, SamplingParams(**{**sp.__dict__, "seed": 8}), adapter="a1"))
    eng.run_until_idle()
    assert alone.output == crowd.output
    assert other_seed.output != alone.output
    assert all(r.finished for r in others)


def test_stop_tokens_and_eos_end_requests():
    eng = make_engine(policy="unmerged")
    p = prompts(1, 7)[0]
    want = reference_greedy(p, None, N_NEW)
    stop_at = want[3]
    r = eng.submit(
        Request(p, SamplingParams(max_tokens=N_NEW, stop_token_ids=(stop_at,), ignore_eos=True))
    )
    eng.run_until_idle()
    assert r.finish_reason == "stop" and r.output == want[: want.index(stop_at) + 1]


def test_cancel_frees_the_row():
    eng = make_engine(policy="unmerged")
    rs = [eng.submit(Request(p, _greedy(40), adapter="a1")) for p in prompts(2, 8)]
    eng.step()
    eng.cancel(rs[0])
    eng.step()
    assert rs[0].finish_reason == "cancelled" and eng.num_running == 1
    assert eng.pool.pins("a1") == 1
    eng.run_until_idle()
    assert eng.pool.pins("a1") == 0


def test_validation_messages():
    eng = make_engine()
    with pytest.raises(ValueError, match="max_tokens=60 is too large"):
        eng.submit(Request(list(range(10)), SamplingParams(max_tokens=60)))
    with pytest.raises(ValueError, match="context is 64"):
        eng.submit(Request(list(range(70)), SamplingParams(max_tokens=1)))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        eng.submit(Request([1, 2], SamplingParams(), adapter="zz"))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert np.all(np.asarray(eng.cache.index) == 0)

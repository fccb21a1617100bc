"""The server's start: common step shapes compiled before ready, the rest in the background,
multi-row prefills as single rows until their shape is compiled; nothing compiles while
serving once the background is done."""

from __future__ import annotations

import time

from test_serve_fixtures import MAX_LEN, make_engine, prompts

from lsw_jax.sampling import SamplingParams
from lsw_jax.serve import warmup
from lsw_jax.serve.engine import Request
from lsw_jax.serve.steps import TRACE_COUNTS


def _greedy(n: int = 3) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_ready_and_background_shapes_split_every_shape(monkeypatch):
    monkeypatch.setattr(warmup, "READY_PROMPT_LEN", 32)
    eng = make_engine(max_len=MAX_LEN, max_prefill_rows=4)
    assert eng.prefill_lens == (16, 32, 64) and eng.prefill_rows == (1, 2, 4)
    ready, rest = warmup.ready_shapes(eng), warmup.background_shapes(eng)
    assert ready == [(16, 1), (32, 1)]
    assert rest[0] == (64, 1), "a long prompt's own shape comes before any multi-row chunk"
    assert rest[1:] == [(16, 2), (32, 2), (16, 4), (64, 2), (32, 4), (64, 4)]  # by tokens
    assert sorted(ready + rest) == sorted(warmup.all_shapes(eng))


def test_ready_shapes_hold_at_least_the_smallest_bucket(monkeypatch):
    monkeypatch.setattr(warmup, "READY_PROMPT_LEN", 8)
    assert warmup.ready_shapes(make_engine(max_len=MAX_LEN)) == [(16, 1)]


def test_a_burst_prefills_row_by_row_while_its_shape_compiles():
    """The same burst twice: row by row while its shapes are pending, then as one 4-row
    chunk; greedy outputs equal (the batched prefill itself is tested against `generate`
    in test_serve_engine)."""
    eng = make_engine(policy="unmerged", max_len=MAX_LEN, max_prefill_rows=4)
    eng.prefill_pending = {(16, 2), (16, 4)}
    burst = [(p, a) for p, a in zip(prompts(3, seed=5), [None, "a1", "a2"], strict=True)]
    alone = [eng.submit(Request(p, _greedy(), adapter=a)) for p, a in burst]
    eng.step()
    assert eng.stats["prefills"] == 3, "pending multi-row shapes are not used"
    eng.run_until_idle()
    eng.prefill_pending.clear()
    together = [eng.submit(Request(p, _greedy(), adapter=a)) for p, a in burst]
    eng.step()
    assert eng.stats["prefills"] == 4, "once compiled, the three share one 4-row chunk"
    eng.run_until_idle()
    assert [r.output for r in alone] == [r.output for r in together]
    assert all(r.finish_reason == "length" for r in alone + together)


def test_start_is_ready_early_and_compiles_nothing_after_the_background(monkeypatch):
    monkeypatch.setattr(warmup, "READY_PROMPT_LEN", 16)
    eng = make_engine(policy="adaptive", max_len=MAX_LEN, max_prefill_rows=2, warmup=True)
    eng.start()
    try:
        deadline = time.monotonic() + 300
        while not (eng.is_serving() and not eng.prefill_pending):
            assert time.monotonic() < deadline, "background compilation never finished"
            time.sleep(0.05)
        before = dict(TRACE_COUNTS)
        reqs = []
        for n in (3, 20, 40):  # every bucket, one row alone then a burst of two
            lone = eng.submit(Request(list(range(1, n + 1)), _greedy(), adapter="a1"))
            assert lone.done_event.wait(60)
            burst = [eng.submit(Request(list(range(2, n + 2)), _greedy(), adapter=a))
                     for a in (None, "a1")]  # fmt: skip
            for r in burst:
                assert r.done_event.wait(60)
            reqs += [lone, *burst]
        assert dict(TRACE_COUNTS) == before, "a step compiled after the background finished"
        assert all(r.finish_reason == "length" and len(r.output) == 3 for r in reqs)
    finally:
        eng.stop()

"""Adapter pool: exact slot layout, LRU eviction and reload, PEFT directories, hot add/remove."""

from __future__ import annotations

import numpy as np
import pytest
from test_serve_fixtures import (
    make_engine,
    prompts,
    reference_greedy,
    reference_model,
    tiny_checkpoint,
)

from lsw_jax.adapters.lora import iter_linears
from lsw_jax.config import ALL_TARGETS
from lsw_jax.sampling import SamplingParams
from lsw_jax.serve.engine import Request


def test_slot_holds_scaled_padded_adapter_exactly():
    """b[s] @ a[s] of every linear equals the stored adapter's scale * B @ A (zero-padded
    ranks add exact zeros); linears the adapter does not touch hold zeros."""
    eng = make_engine()
    slot = eng.pool.acquire("a2")  # rank 4 on q/v only
    ref = reference_model("a2")
    for i, name, want_lin in iter_linears(ref, ALL_TARGETS):
        pooled = eng.pool.expert_bank(i, name)
        got = np.asarray(pooled.b[...][slot]) @ np.asarray(pooled.a[...][slot])
        key = (i, name)
        if want_lin.lora is None:
            assert not got.any(), key
        else:
            bank = want_lin.lora
            want = bank.scale * np.asarray(bank.b[...][0]) @ np.asarray(bank.a[...][0])
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_lru_eviction_and_reload_keeps_outputs_exact():
    """Three adapters through a 2-slot pool: the least recently used unpinned one is
    evicted, reloading it later serves the same tokens, and pinned ones never go."""
    eng = make_engine(policy="unmerged")
    pool = eng.pool
    assert pool.acquire("a1") == 0 and pool.acquire("a2") == 1
    assert pool.acquire("a3") is None  # both slots pinned
    pool.release("a1")
    assert pool.acquire("a3") == 0 and pool.stats["evictions"] == 1  # a1 was LRU
    assert pool.resident() == {"a2": 1, "a3": 0}
    pool.release("a2")
    pool.release("a3")
    outs = {}
    for a in ["a1", "a2", "a3", "a1"]:  # every admission reloads someone
        r = eng.submit(
            Request(prompts(1, 3)[0], SamplingParams(max_tokens=6, ignore_eos=True), adapter=a)
        )
        eng.run_until_idle()
        outs.setdefault(a, []).append(r.output)
    assert outs["a1"][0] == outs["a1"][1] == reference_greedy(prompts(1, 3)[0], "a1", 6)
    assert pool.stats["loads"] >= 5 and pool.pins() == 0


def test_requests_wait_when_every_pool_slot_is_pinned():
    eng = make_engine(policy="unmerged")
    ps = prompts(3, 4)
    rs = [
        eng.submit(Request(p, SamplingParams(max_tokens=10, ignore_eos=True), adapter=a))
        for p, a in zip(ps, ADAPTERS_3, strict=True)
    ]
    eng.step()
    assert eng.num_running == 2 and eng.scheduler.num_waiting == 1
    eng.run_until_idle()
    for r in rs:
        assert r.output == reference_greedy(r.prompt, r.adapter, 10)


ADAPTERS_3 = ("a1", "a2", "a3")


def test_hot_add_from_peft_dir_and_remove(tmp_path):
    """A PEFT directory registered while serving gives the same tokens as the stored adapter
    it was exported from; removal is refused while in use, then the name is unknown."""
    from lsw_jax.convert.peft import export_peft_adapter

    export_peft_adapter(reference_model("a3"), tmp_path / "peft_a3")
    eng = make_engine(adapters=("a1",), policy="unmerged")
    eng.pool.register("hot", tmp_path / "peft_a3")
    p = prompts(1, 9)[0]
    r = eng.submit(Request(p, SamplingParams(max_tokens=12, ignore_eos=True), adapter="hot"))
    eng.step()
    with pytest.raises(ValueError, match="in use"):
        eng.pool.remove("hot")
    eng.run_until_idle()
    assert r.output == reference_greedy(p, "a3", 12)
    eng.pool.remove("hot")
    with pytest.raises(ValueError, match="unknown adapter 'hot'"):
        eng.submit(Request(p, SamplingParams(), adapter="hot"))


def test_register_refuses_bad_adapters():
    eng = make_engine(adapters=())
    with pytest.raises(FileNotFoundError, match="no adapter named"):
        eng.pool.register("x", "missing")
    eng.pool.register("a1", "a1")
    with pytest.raises(ValueError, match="already registered"):
        eng.pool.register("a1", "a1")
    assert tiny_checkpoint().exists()

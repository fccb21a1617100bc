"""Every adapter kind served side by side: plain LoRA, LoRA-Switch and MoLA rows (and base
rows) share decode steps, each row routed by its own adapter, with the tokens ``generate``
gives for that adapter alone (the oracle: a model with the stored adapter attached)."""

from __future__ import annotations

import concurrent.futures

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from test_serve_fixtures import (
    host_adapter,
    make_engine,
    make_tokenizer,
    prompts,
    reference_greedy,
    reference_model,
)
from test_serve_server import serving

from lsw_jax.adapters.lora import RouterTables, RowRouter, causal_mean
from lsw_jax.sampling import SamplingParams
from lsw_jax.serve.adapter_pool import read_adapter
from lsw_jax.serve.engine import Request

KINDS = {None: "base", "a1": "lora", "sw": "switch", "mo": "mola", "swc": "switch"}
N = 10
KINDS_ENGINE = dict(
    adapters=("a1", "sw", "mo", "swc"), pool_slots=14, max_experts=4, slots=5, policy="unmerged"
)


def _routing_changes(adapter: str, prompt: list[int], n: int) -> int:
    """How many distinct expert selections the reference model makes over the decoded
    tokens (per layer for MoLA): > 1 means the routing changed along the way."""
    model = reference_model(adapter)
    tokens = prompt + reference_greedy(prompt, adapter, n)
    out = model.forward(np.asarray([tokens]))
    routings = out.routing if isinstance(out.routing, list) else [out.routing]
    seen = set()
    for r in routings:
        ids = np.sort(np.asarray(r.expert_ids)[0, len(prompt) - 1 :], axis=-1)
        seen |= {tuple(row) for row in ids}
    return len(seen)


def test_fixture_adapters_really_switch_experts():
    p = prompts(1, 40)[0]
    for name in ("sw", "mo", "swc"):
        assert _routing_changes(name, p, N) > 1, name


def test_pool_routes_like_the_adapters_own_routers():
    """The pool's per-row router gives the experts and gates of the adapter's own routers,
    temperature and unit-RMS input included (the fixtures set both)."""
    h = np.random.default_rng(7).normal(0, 3.0, (1, 9, reference_model("sw").cfg.hidden_size))
    h = jnp.asarray(h, jnp.float32)
    for name, base in (("sw", 2), ("mo", 5), ("swc", 1)):
        host = host_adapter(name)
        model = reference_model(name)
        tables = RouterTables.empty(10, 4, h.shape[-1]).with_layer_routers(model.cfg.num_layers)
        tables = tables.with_adapter(
            base,
            host.kind,
            4,
            2,
            host.router,
            host.layer_routers,
            host.normalize_input,
            host.router_context,
        )
        row_router = RowRouter(tables, jnp.asarray([base], jnp.int32), k_max=2)
        h_prefix = causal_mean(h, None, None)[0]
        pairs = [(row_router.pre_gate(h, h_prefix), model.router)] if name != "mo" else []
        pre = row_router.pre_gate(h)
        for i, layer in enumerate(model.layers if name == "mo" else []):
            pairs.append((row_router.layer(i, h, pre), layer.router))
        for got, router in pairs:
            want = router(h)
            np.testing.assert_array_equal(got.expert_ids - base, want.expert_ids)
            np.testing.assert_allclose(got.gates, want.gates, rtol=1e-5, atol=1e-6)


def test_mixed_kinds_in_one_batch_equal_each_row_alone():
    """One batch holds a base, a plain-LoRA, a LoRA-Switch, a MoLA and a prefix-routed
    LoRA-Switch row; each equals the same request run alone and generate() with its
    adapter (the last one: the cache rows carry its router's running mean)."""
    ps = prompts(5, 41)
    eng = make_engine(**KINDS_ENGINE)
    reqs = [
        eng.submit(Request(p, SamplingParams(max_tokens=N, ignore_eos=True), adapter=a))
        for p, a in zip(ps, KINDS, strict=True)
    ]
    plan = eng.step()
    assert {r.adapter for r in plan.run} == set(KINDS)  # all kinds in one step
    eng.run_until_idle()
    for r in reqs:
        alone = make_engine(**KINDS_ENGINE)
        solo = alone.submit(
            Request(r.prompt, SamplingParams(max_tokens=N, ignore_eos=True), adapter=r.adapter)
        )
        alone.run_until_idle()
        assert r.output == solo.output, r.adapter
        assert r.output == reference_greedy(r.prompt, r.adapter, N), r.adapter


def test_server_serves_every_kind_concurrently_like_generate():
    ps = prompts(5, 42)
    with serving(**KINDS_ENGINE) as (url, _):
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        assert {m["id"]: m.get("kind") for m in models} == {
            "tiny": None,
            "a1": "lora",
            "sw": "switch",
            "mo": "mola",
            "swc": "switch",
        }

        def ask(prompt, adapter):
            body = {
                "model": adapter or "tiny",
                "prompt": prompt,
                "max_tokens": N,
                "temperature": 0,
                "ignore_eos": True,
            }
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        with concurrent.futures.ThreadPoolExecutor(5) as ex:
            futs = {a: ex.submit(ask, p, a) for p, a in zip(ps, KINDS, strict=True)}
        for (adapter, fut), p in zip(futs.items(), ps, strict=True):
            choice = fut.result()
            want = reference_greedy(p, adapter, N)
            assert choice["token_ids"] == want, adapter
            assert choice["text"] == make_tokenizer().decode(want)


def test_pool_refuses_an_adapter_of_another_shape():
    """An adapter made for another model is refused when registered, naming the tensor,
    instead of failing (or hanging) when a request first uses it."""
    eng = make_engine(**KINDS_ENGINE)
    host = read_adapter(eng.cfg, "bad", "sw", eng.pool.ckpt)
    a, b = host.banks[(0, "q_proj")]
    host.banks[(0, "q_proj")] = (a[:, :, :-1], b)
    with pytest.raises(ValueError, match=r"layer 0 q_proj A has shape .* expected"):
        eng.pool.add(host)
    assert "bad" not in eng.pool.names()

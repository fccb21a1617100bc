"""Adapter semantics (switch/mola/lora), losses, and exact PEFT interop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_helpers import hf_logits, make_hf_model, rel_err, save_hf_model

import lsw_jax
from lsw_jax.adapters.lora import (
    LoraBank,
    LoRAParam,
    Routing,
    attach_adapter,
    iter_linears,
    load_balancing_loss,
    routing_stats,
)
from lsw_jax.adapters.store import list_adapters, load_adapter, save_adapter
from lsw_jax.config import AdapterConfig, ModelConfig
from lsw_jax.convert.peft import (
    export_peft_adapter,
    load_peft_adapter,
    seed_switch_bank_from_peft,
)


def _randomise_banks(model, seed=0, std=0.05):
    rng = np.random.default_rng(seed)
    for _, _, lin in iter_linears(model, lsw_jax.config.ALL_TARGETS):
        if lin.lora is not None:
            lin.lora.b.value = jnp.asarray(rng.normal(0, std, lin.lora.b.shape), jnp.float32)
            lin.lora.a.value = jnp.asarray(rng.normal(0, std, lin.lora.a.shape), jnp.float32)


@pytest.fixture
def tiny():
    return lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=3)


IDS = np.random.default_rng(0).integers(0, 128, (2, 9))


def test_adapter_config_validation():
    with pytest.raises(ValueError, match="rank=0"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="top_k=9"):
        AdapterConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="unknown target module 'qq'"):
        AdapterConfig(targets=("q", "qq"))
    with pytest.raises(ValueError, match="kind='moe'"):
        AdapterConfig(kind="moe")
    assert AdapterConfig(targets=("v", "q")).targets == ("q_proj", "v_proj")


def test_fresh_adapter_is_identity(tiny):
    base = np.asarray(tiny(IDS))
    attach_adapter(tiny, AdapterConfig(kind="switch"))
    np.testing.assert_allclose(np.asarray(tiny(IDS)), base, rtol=0, atol=0)


def test_switch_all_experts_identical_equals_plain_lora(tiny):
    lora_model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=3)
    attach_adapter(lora_model, AdapterConfig(kind="lora", rank=4, alpha=8))
    _randomise_banks(lora_model)
    attach_adapter(tiny, AdapterConfig(kind="switch", num_experts=4, top_k=4, rank=4, alpha=8))
    for (_, _, src), (_, _, dst) in zip(
        iter_linears(lora_model, lsw_jax.config.ALL_TARGETS),
        iter_linears(tiny, lsw_jax.config.ALL_TARGETS),
        strict=True,
    ):
        dst.lora.a.value = jnp.repeat(src.lora.a[...], 4, axis=0)
        dst.lora.b.value = jnp.repeat(src.lora.b[...], 4, axis=0)
    want = np.asarray(lora_model(IDS))
    got = np.asarray(tiny(IDS))
    assert rel_err(got, want) < 1e-6
    base = np.asarray(lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=3)(IDS))
    assert rel_err(got, base) > 1e-3  # the adapter really changed the logits


def test_switch_routing_shared_mola_per_layer(tiny):
    attach_adapter(tiny, AdapterConfig(kind="switch", num_experts=6, top_k=2))
    out = tiny.forward(jnp.asarray(IDS))
    r = out.routing
    assert isinstance(r, Routing) and r.expert_ids.shape == (2, 9, 2)
    np.testing.assert_allclose(np.asarray(r.gates.sum(-1)), 1.0, rtol=1e-6)
    # The router reads layer 0's normalised input: recompute by hand.
    h0 = tiny.layers[0].input_layernorm(jnp.take(tiny.embed_tokens[...], IDS, axis=0))
    logits = np.einsum("btd,ed->bte", np.asarray(h0), np.asarray(tiny.router.weight[...]))
    want = np.argsort(-logits, axis=-1)[..., :2]
    np.testing.assert_array_equal(np.sort(np.asarray(r.expert_ids), -1), np.sort(want, -1))

    attach_adapter(tiny, AdapterConfig(kind="mola", num_experts=6, top_k=2), seed=1)
    _randomise_banks(tiny)
    out = tiny.forward(jnp.asarray(IDS))
    assert isinstance(out.routing, list) and len(out.routing) == tiny.cfg.num_layers
    assert not np.array_equal(
        np.asarray(out.routing[0].expert_ids), np.asarray(out.routing[1].expert_ids)
    )


@pytest.mark.parametrize("shape", [(2, 4), (1, 1), (1, 2)])  # all-experts and gathered paths
def test_dense_delta_matches_float64_loop(shape):
    bank = LoraBank(12, 10, num_experts=5, rank=3, scale=0.7, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    bank.b.value = jnp.asarray(rng.normal(size=(5, 10, 3)), jnp.float32)
    x = rng.normal(size=(*shape, 12)).astype(np.float32)
    ids = rng.integers(0, 5, (*shape, 2)).astype(np.int32)
    gates = rng.random((*shape, 2)).astype(np.float32)
    got = np.asarray(bank.delta(jnp.asarray(x), Routing(jnp.asarray(ids), jnp.asarray(gates))))
    a, b = np.asarray(bank.a[...], np.float64), np.asarray(bank.b[...], np.float64)
    want = np.zeros((*shape, 10))
    for i in range(shape[0]):
        for t in range(shape[1]):
            for j in range(2):
                e = ids[i, t, j]
                want[i, t] += 0.7 * gates[i, t, j] * (b[e] @ (a[e] @ x[i, t]))
    assert rel_err(got, want) < 1e-6


def test_load_balancing_loss_hand_computed():
    # 2 tokens, 2 experts, top-1: token0 -> e0 (p=.75), token1 -> e0 (p=.6)
    logits = jnp.log(jnp.asarray([[[0.75, 0.25], [0.6, 0.4]]]))
    r = Routing(jnp.asarray([[[0], [0]]], jnp.int32), jnp.ones((1, 2, 1)), logits)
    # f = [1, 0]; P = [0.675, 0.325]; loss = 2 * 0.675
    np.testing.assert_allclose(float(load_balancing_loss(r, 2)), 1.35, rtol=1e-6)
    stats = routing_stats(r, 2)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]), [1.0, 0.0])
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25) + 0.6 * np.log(0.6) + 0.4 * np.log(0.4)) / 2
    np.testing.assert_allclose(float(stats["routing_entropy"]), h, rtol=1e-5)


def test_gradients_reach_only_adapters(tiny):
    attach_adapter(tiny, AdapterConfig(kind="switch", num_experts=4, top_k=2))
    _randomise_banks(tiny)

    def loss(m):
        out = m.forward(jnp.asarray(IDS))
        return jnp.mean(out.logits**2) + load_balancing_loss(out.routing, 4)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(tiny)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert leaves and all(
        "lora" in jax.tree_util.keystr(p) or "router" in jax.tree_util.keystr(p) for p, _ in leaves
    )
    router_g = grads["router"]["weight"].value
    assert float(jnp.abs(router_g).sum()) > 0


# ---------------------------------------------------------------------- PEFT


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_base")
    hf = make_hf_model("llama", seed=1)
    save_hf_model(hf, root / "hf")
    lsw_jax.convert_checkpoint(root / "hf", root / "ckpt", show_progress=False)
    return hf, root


PEFT_CASES = {
    "all_linear": dict(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),
    "subset_qv": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj"],
        rank_pattern={"up_proj": 6},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
    ),
    "some_layers": dict(r=4, lora_alpha=8, target_modules=["o_proj"], layers_to_transform=[1]),
}


def _peft_model(hf, kw, seed=0):
    import copy

    import peft
    import torch

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_logits_match_peft(hf_base, tmp_path, case):
    hf, root = hf_base
    pm = _peft_model(hf, PEFT_CASES[case])
    pm.save_pretrained(tmp_path / "adapter")
    ids = np.random.default_rng(2).integers(3, 160, (2, 11))
    want = hf_logits(pm, ids)
    ours = lsw_jax.load_model(root / "ckpt", dtype="float32", adapter=tmp_path / "adapter")
    got = np.asarray(ours(ids))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, hf_logits(hf, ids)) > 1e-4  # the adapter matters


def test_peft_export_roundtrip_and_store(hf_base, tmp_path):
    import peft

    hf, root = hf_base
    ours = lsw_jax.load_model(root / "ckpt", dtype="float32")
    attach_adapter(ours, AdapterConfig(kind="lora", rank=4, alpha=12, targets=("q", "v", "down")))
    _randomise_banks(ours, seed=5)
    ids = np.random.default_rng(3).integers(3, 160, (1, 10))
    mine = np.asarray(ours(ids))
    export_peft_adapter(ours, tmp_path / "exported")
    import copy

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "exported").eval()
    assert rel_err(hf_logits(pm, ids), mine) < 1e-5

    save_adapter(ours, root / "ckpt", "mine", overwrite=True)
    assert "mine" in list_adapters(root / "ckpt")
    fresh = lsw_jax.load_model(root / "ckpt", dtype="float32")
    load_adapter(fresh, root / "ckpt", "mine")
    assert rel_err(np.asarray(fresh(ids)), mine) < 1e-6


def test_peft_adapters_seed_switch_experts(hf_base, tmp_path):
    hf, root = hf_base
    kws = [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    ]
    dirs = []
    for i, kw in enumerate(kws):
        _peft_model(hf, kw, seed=i).save_pretrained(tmp_path / f"a{i}")
        dirs.append(tmp_path / f"a{i}")
    ours = lsw_jax.load_model(root / "ckpt", dtype="float32")
    seed_switch_bank_from_peft(
        ours, dirs, AdapterConfig(kind="switch", num_experts=2, top_k=1, targets=("q", "v"))
    )
    ids = np.random.default_rng(4).integers(3, 160, (1, 8))
    # Force every token to expert 1: logits must equal PEFT adapter 1 alone.
    b, t = ids.shape
    forced = Routing(jnp.ones((b, t, 1), jnp.int32), jnp.ones((b, t, 1)))
    got = np.asarray(ours.forward(jnp.asarray(ids), routing=forced).logits)
    want = hf_logits(_peft_model(hf, kws[1], seed=1), ids)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    "patch, match",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="all"), "bias"),
        (dict(peft_type="IA3"), "peft_type"),
    ],
)
def test_peft_unsupported_features_refused(hf_base, tmp_path, patch, match):
    import json

    hf, root = hf_base
    _peft_model(hf, PEFT_CASES["subset_qv"]).save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(patch)
    cfg_path.write_text(json.dumps(cfg))
    ours = lsw_jax.load_model(root / "ckpt", dtype="float32")
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(ours, tmp_path / "a")


def test_peft_adapter_for_other_model_refused(hf_base, tmp_path):
    hf, root = hf_base
    other = make_hf_model("llama", hidden_size=32, intermediate_size=48)
    _peft_model(other, PEFT_CASES["subset_qv"]).save_pretrained(tmp_path / "a")
    ours = lsw_jax.load_model(root / "ckpt", dtype="float32")
    with pytest.raises(ValueError, match="do not fit"):
        load_peft_adapter(ours, tmp_path / "a")

"""Router training knobs, the dense LoRA backward, and per-domain routing evaluation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_helpers import make_hf_model, save_hf_model

import lsw_jax
from lsw_jax.adapters.lora import (
    LoRAParam,
    Router,
    _dense_lora_delta,
    attach_adapter,
    causal_mean,
    dense_lora_delta,
    iter_linears,
    learned_routings,
)
from lsw_jax.adapters.store import load_adapter, save_adapter
from lsw_jax.config import AdapterConfig, ModelConfig
from lsw_jax.data import PackedDataset, concat_datasets
from lsw_jax.evaluate import evaluate_domains, mutual_information, routing_summary
from lsw_jax.linears import ALL_TARGETS, LINEAR_BY_NAME
from lsw_jax.model.llama import KVCache
from lsw_jax.serve.adapter_pool import read_adapter
from lsw_jax.train import TrainConfig, lm_loss, make_optimizer, make_train_step, token_nll


@pytest.mark.parametrize("shape", [(2, 5, 7, 4, 3, 6), (1, 3, 9, 1, 8, 2)])  # B T in E r out
def test_dense_lora_delta_gradients_match_float64_autodiff(shape):
    """The hand-written backward against jax's own vjp of plain einsums, in float64."""
    b_, t, i, e, r, o = shape

    def reference(x, a, b, w):  # written independently of the library's helper
        return jnp.einsum("bte,eor,eri,bti->bto", w, b, a, x)

    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(ks[0], (b_, t, i), jnp.float64)
        a = jax.random.normal(ks[1], (e, r, i), jnp.float64)
        b = jax.random.normal(ks[2], (e, o, r), jnp.float64)
        w = jax.random.uniform(ks[3], (b_, t, e), jnp.float64)
        dy = jax.random.normal(ks[4], (b_, t, o), jnp.float64)
        assert x.dtype == jnp.float64
        got_y, got_vjp = jax.vjp(dense_lora_delta, x, a, b, w)
        want_y, want_vjp = jax.vjp(reference, x, a, b, w)
        np.testing.assert_allclose(got_y, want_y, rtol=1e-12)
        for got, want in zip(got_vjp(dy), want_vjp(dy), strict=True):
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
        args = [np.asarray(z, np.float32) for z in (x, a, b, w)]
    # float32 forward equals the unwrapped expression it differentiates.
    np.testing.assert_allclose(dense_lora_delta(*args), _dense_lora_delta(*args), rtol=1e-6)


def test_lora_gradients_through_fused_linears_match_peft(tmp_path):
    """The training loss's adapter gradients, per part of every fused linear (q|k|v rows
    grouped per KV head, gate|up interleaved), equal PEFT's torch autograd on the same
    weights: the hand-written backward and the fused row layout together."""
    import peft  # test peer, imported where used like in tests/test_adapters.py
    import torch

    hf = make_hf_model("llama", seed=1)
    save_hf_model(hf, tmp_path / "hf")
    lsw_jax.convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt", show_progress=False)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS), lora_dropout=0.0)
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    tok = np.random.default_rng(3).integers(3, 160, (2, 12))
    logits = pm(input_ids=torch.as_tensor(tok[:, :-1])).logits
    torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.as_tensor(tok[:, 1:]).reshape(-1)
    ).backward()
    want = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}

    model = lsw_jax.load_model(tmp_path / "ckpt", dtype="float32", adapter=tmp_path / "adapter")
    t = tok.shape[1] - 1
    batch = {
        "input_ids": jnp.asarray(tok[:, :-1]),
        "targets": jnp.asarray(tok[:, 1:]),
        "loss_mask": jnp.ones((2, t), jnp.float32),
        "segment_ids": jnp.ones((2, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t), (2, t)),
    }
    graphdef, trainable, rest = nnx.split(model, LoRAParam, ...)

    def loss(trainable):
        return lm_loss(nnx.merge(graphdef, trainable, rest), batch, model.adapter_config)[0]

    nnx.update(model, jax.grad(loss)(trainable))  # the banks now hold their gradients
    checked = 0
    for i, name, part in iter_linears(model):
        pre = f"base_model.model.{LINEAR_BY_NAME[name].peft_module(i)}"
        for ours, theirs in ((part.lora.a, "lora_A"), (part.lora.b, "lora_B")):
            ref = want[f"{pre}.{theirs}.default.weight"]
            np.testing.assert_allclose(ours[...][0], ref, rtol=2e-4, atol=1e-6 * np.abs(ref).max())
            checked += 1
    assert checked == 2 * 7 * 2


def test_router_temperature_and_init_scale():
    router = Router(512, 8, 2, init_std=0.5, temperature=4.0, rngs=nnx.Rngs(0))
    w = np.asarray(router.weight[...], np.float64)
    assert abs(w.std() - 0.5) < 0.02 and abs(w.mean()) < 0.02  # 4096 N(0, 0.25) samples
    h = np.random.default_rng(0).normal(size=(1, 3, 512)).astype(np.float32)
    routing = router(jnp.asarray(h))
    logits = np.einsum("btd,ed->bte", h.astype(np.float64), w) / 4.0
    np.testing.assert_allclose(routing.logits, logits, rtol=1e-4, atol=1e-4)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.sort(probs, axis=-1)[..., ::-1][..., :2]
    np.testing.assert_allclose(routing.gates, top / top.sum(-1, keepdims=True), rtol=1e-4)
    np.testing.assert_array_equal(routing.expert_ids, np.argsort(-probs, axis=-1)[..., :2])


def test_router_normalized_input_is_scale_free():
    router = Router(64, 4, 2, normalize_input=True, temperature=0.5, rngs=nnx.Rngs(1))
    h = np.random.default_rng(2).normal(size=(2, 5, 64)).astype(np.float32)
    w = np.asarray(router.weight[...], np.float64)
    logits = []
    for scale in (0.04, 1.0, 30.0):
        hs = h.astype(np.float64) * scale
        unit = hs / np.sqrt((hs**2).mean(-1, keepdims=True) + 1e-6)
        want = np.einsum("btd,ed->bte", unit, w) / 0.5
        logits.append(np.asarray(router(jnp.asarray(h * scale)).logits))
        np.testing.assert_allclose(logits[-1], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0], logits[2], rtol=1e-3)  # eps aside, scale-free


def test_router_config_validated_and_stored(tmp_path):
    for field, bad in [
        ("router_temperature", 0.0),
        ("router_init_std", -1.0),
        ("aux_loss_coef", -0.1),
        ("router_z_loss_coef", -1.0),
    ]:
        with pytest.raises(ValueError, match=field):
            AdapterConfig(**{field: bad})
    cfg = AdapterConfig(
        kind="switch", num_experts=4, rank=2, router_temperature=0.5, router_normalize_input=True
    )
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32")
    attach_adapter(model, cfg, seed=3)
    save_adapter(model, tmp_path, "a")
    other = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32")
    load_adapter(other, tmp_path, "a")
    assert other.router.temperature == 0.5 and other.router.normalize_input
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    np.testing.assert_array_equal(model(ids), other(ids))


def _tiny_batch(vocab: int, b: int = 2, t: int = 8, seed: int = 0) -> dict:
    tok = np.random.default_rng(seed).integers(0, vocab, (1, b, t + 1)).astype(np.int32)
    return {
        "input_ids": jnp.asarray(tok[..., :-1]),
        "targets": jnp.asarray(tok[..., 1:]),
        "loss_mask": jnp.ones((1, b, t), jnp.float32),
        "segment_ids": jnp.ones((1, b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
    }


def _train_two_steps(kind: str, router_lr: float | None):
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32")
    adapter = AdapterConfig(kind=kind, num_experts=4, top_k=2, rank=2)
    attach_adapter(model, adapter, seed=0)
    graphdef, trainable, rng, frozen = nnx.split(model, LoRAParam, nnx.RngState, ...)
    before = jax.tree.map(np.asarray, trainable.to_pure_dict())
    cfg = TrainConfig(ckpt="x", data=(), out_dir="o", lr=1e-2, router_lr=router_lr, warmup_steps=1)
    opt = make_optimizer(cfg)
    opt_state = opt.init(trainable)
    step = make_train_step(graphdef, opt, adapter)
    for seed in range(2):
        trainable, rng, opt_state, _ = step(
            trainable, rng, frozen, opt_state, _tiny_batch(128, seed=seed)
        )
    return before, jax.tree.map(np.asarray, trainable.to_pure_dict())


@pytest.mark.parametrize("kind", ["switch", "mola"])
def test_router_learning_rate(kind):
    _, plain = _train_two_steps(kind, None)
    _, same = _train_two_steps(kind, 1e-2)  # router_lr == lr: the plain optimizer's result
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-8), plain, same)
    before, frozen_router = _train_two_steps(kind, 0.0)
    leaves = jax.tree_util.tree_leaves_with_path(frozen_router)
    old = dict(jax.tree_util.tree_leaves_with_path(before))
    routers = [p for p, _ in leaves if "router" in jax.tree_util.keystr(p)]
    assert len(routers) == (1 if kind == "switch" else 2)
    for path, leaf in leaves:
        if path in routers:
            np.testing.assert_array_equal(leaf, old[path])
        elif "'b'" in jax.tree_util.keystr(path):  # banks' B moves off zero
            assert np.abs(leaf - old[path]).max() > 0


def _domain_data(vocab: int) -> PackedDataset:
    parts = []
    for d, (rows, t) in enumerate([(3, 8), (5, 8)]):
        tok = np.random.default_rng(d).integers(0, vocab, (rows, t + 1)).astype(np.int32)
        mask = np.ones((rows, t), np.float32)
        mask[0, :3] = 0.0  # a prompt: not scored, still routed
        parts.append(
            PackedDataset(
                input_ids=tok[:, :-1],
                targets=tok[:, 1:],
                loss_mask=mask,
                segment_ids=np.ones((rows, t), np.int32),
                positions=np.tile(np.arange(t, dtype=np.int32), (rows, 1)),
                domain_id=np.full((rows,), d, np.int32),
            )
        )
    return concat_datasets(parts, ("a", "b"))


@pytest.mark.parametrize("kind", ["switch", "mola", "lora"])
def test_evaluate_domains_matches_direct_computation(kind):
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32")
    adapter = AdapterConfig(kind=kind, num_experts=4, top_k=2, rank=2, router_init_std=1.0)
    attach_adapter(model, adapter, seed=1)
    held = _domain_data(128)
    graphdef, state = nnx.split(model)
    got = evaluate_domains(graphdef, (state,), held, batch_size=2)  # pads 3 -> 4, 5 -> 6 rows
    for d, name in enumerate(held.domain_names):
        rows = held.rows(np.flatnonzero(held.domain_id == d))
        batch = {k: jnp.asarray(v) for k, v in rows.items() if k != "domain_id"}
        nll, out = token_nll(model, batch)
        m = rows["loss_mask"]
        np.testing.assert_allclose(got[name]["loss"], float((nll * m).sum() / m.sum()), rtol=1e-5)
        assert got[name]["target_tokens"] == int(m.sum())
        routings = learned_routings(out.routing)
        if kind == "lora":
            assert routings == [] and "expert_load_per_layer" not in got[name]
            continue
        assert len(got[name]["expert_load_per_layer"]) == len(routings)
        for layer, r in enumerate(routings):
            counts = np.bincount(np.asarray(r.expert_ids).ravel(), minlength=4)
            np.testing.assert_allclose(
                got[name]["expert_load_per_layer"][layer], counts / counts.sum(), rtol=1e-5
            )
            p = jax.nn.softmax(r.logits, axis=-1)
            ent = float(-(p * jnp.log(p)).sum(-1).mean())
            np.testing.assert_allclose(
                got[name]["routing_entropy_per_layer"][layer], ent, rtol=1e-5
            )
    if kind != "lora":
        summary = routing_summary(got, ["a", "b"])
        usage = np.asarray(summary["usage_layer0"])
        np.testing.assert_allclose(usage.sum(1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(summary["expert_load"], usage.mean(0), rtol=1e-6)
        assert summary["mi_layer0"] == pytest.approx(mutual_information(usage))


def test_mutual_information_hand_computed():
    assert abs(mutual_information(np.full((3, 4), 0.25))) < 1e-12  # all domains alike
    np.testing.assert_allclose(mutual_information(np.eye(3)), np.log(3), rtol=1e-12)
    # Two domains, two experts: rows (1, 0) and (0.5, 0.5): joint (.5, 0; .25, .25).
    joint = np.array([[0.5, 0.0], [0.25, 0.25]])
    pe, pd = joint.sum(0), joint.sum(1)
    want = sum(
        joint[i, j] * np.log(joint[i, j] / (pd[i] * pe[j]))
        for i in range(2)
        for j in range(2)
        if joint[i, j] > 0
    )
    np.testing.assert_allclose(mutual_information(np.array([[1.0, 0.0], [0.5, 0.5]])), want)


def test_train_config_router_lr_validated():
    with pytest.raises(ValueError, match="router_lr"):
        TrainConfig(ckpt="x", data=(), out_dir="o", router_lr=-1.0)
    cfg = TrainConfig(ckpt="x", data=(), out_dir="o", router_lr=3e-3)
    assert TrainConfig.from_dict(cfg.to_dict()) == dataclasses.replace(cfg)


def test_causal_mean_router_input_against_a_loop():
    """``prefix_mean``: each token's router input is the mean over its document's real
    tokens so far (packed segments, padding, a row that starts with padding)."""
    rng = np.random.default_rng(4)
    h = rng.normal(size=(3, 9, 5))
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3], [1] * 6 + [0] * 3, [0, 0] + [1] * 7])
    mask = seg > 0
    want = np.zeros_like(h)
    for b in range(3):
        for t in range(9):
            s = [u for u in range(t + 1) if mask[b, u] and seg[b, u] == seg[b, t]]
            want[b, t] = h[b, s].mean(0) if s else 0.0
    got, _ = causal_mean(jnp.asarray(h, jnp.float32), jnp.asarray(mask), jnp.asarray(seg))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without segments the whole row is one document.
    whole = np.cumsum(h, 1) / np.arange(1, 10)[None, :, None]
    got, _ = causal_mean(jnp.asarray(h, jnp.float32), None, None)
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    # A KV cache carries (sum, count) from one call to the next: chunks equal the whole.
    m = jnp.asarray(mask[2:])  # a row that starts with padding
    _, state = causal_mean(jnp.asarray(h[2:, :4], jnp.float32), m[:, :4], None)
    rest, _ = causal_mean(jnp.asarray(h[2:, 4:], jnp.float32), m[:, 4:], None, state)
    full, _ = causal_mean(jnp.asarray(h[2:], jnp.float32), m, None)
    np.testing.assert_allclose(rest, full[:, 4:], rtol=1e-5, atol=1e-6)


def test_prefix_mean_router_trains_and_needs_a_router_state(tmp_path):
    cfg = AdapterConfig(
        kind="switch", num_experts=4, rank=2, router_context="prefix_mean", router_init_std=1.0
    )
    with pytest.raises(ValueError, match="router_context"):
        AdapterConfig(kind="mola", router_context="prefix_mean")
    with pytest.raises(ValueError, match="router_context"):
        AdapterConfig(router_context="suffix")
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32")
    attach_adapter(model, cfg, seed=2)
    save_adapter(model, tmp_path, "ctx")
    other = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32")
    load_adapter(other, tmp_path, "ctx")
    assert other.router.context == "prefix_mean"
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 128, (2, 7)), jnp.int32)
    h0 = model.layers[0].input_layernorm(model.embed(ids))
    want = model.router.weight[...] @ causal_mean(h0, None, None)[0][..., None]
    out = other.forward(ids)
    np.testing.assert_allclose(out.routing.logits, want[..., 0], rtol=1e-5, atol=1e-5)
    # The first token routes on itself alone; later tokens on their prefix.
    own = (model.router.weight[...] @ h0[..., None])[..., 0]
    np.testing.assert_allclose(out.routing.logits[:, 0], own[:, 0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out.routing.logits[:, 1:], own[:, 1:], atol=1e-3)
    loss, _ = lm_loss(model, jax.tree.map(lambda x: x[0], _tiny_batch(128)), cfg)
    assert np.isfinite(float(loss))
    grads = nnx.grad(lambda m: lm_loss(m, jax.tree.map(lambda x: x[0], _tiny_batch(128)), cfg)[0])
    g = grads(model).to_pure_dict()["router"]["weight"]
    assert np.abs(np.asarray(g)).max() > 0
    assert read_adapter(model.cfg, "ctx", "ctx", tmp_path).router_context == "prefix_mean"
    cache = KVCache.create(model.cfg, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="carries no router state"):
        model.forward(ids, cache=cache)


@pytest.mark.parametrize("plan", ["dense", "unmerged", "merged"])
def test_prefix_mean_router_generates_like_full_forwards(plan):
    """generate carries the router's running mean in the KV cache: its greedy tokens equal
    argmax of a cache-free forward over the whole sequence at every step, per row (left
    padding of the shorter prompt must not count)."""
    cfg = AdapterConfig(
        kind="switch", num_experts=4, rank=2, router_context="prefix_mean", router_init_std=1.0
    )
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=6)
    attach_adapter(model, cfg, seed=4)
    rng = np.random.default_rng(8)
    for _, _, lin in iter_linears(model, cfg.targets):
        lin.lora.b.set_value(jnp.asarray(rng.normal(0, 0.3, lin.lora.b[...].shape), jnp.float32))
    prompts = [rng.integers(0, 128, n).tolist() for n in ((9, 4) if plan != "merged" else (9,))]
    n = 6
    want = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            seq.append(int(np.argmax(model(jnp.asarray([seq], jnp.int32))[0, -1])))
        want.append(seq[len(p) :])
    ids = np.zeros((len(prompts), 9), np.int32)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, : len(p)], mask[r, : len(p)] = p, 1
    got = lsw_jax.generate(model, ids, n, attention_mask=mask, eos_token_id=[], plan=plan)
    assert got.tolist() == want
    # The routing did change along the way (the test would not see a dropped state otherwise).
    out = model.forward(jnp.asarray([prompts[0] + want[0]], jnp.int32))
    assert len({tuple(r) for r in np.asarray(out.routing.expert_ids)[0, 8:]}) > 1

"""Shared builders for the serving tests: a tiny checkpoint with stored LoRA adapters,
a word-level tokenizer with a chat template, and an engine over them.

All serving tests use the same shapes (pool of 2 adapter slots, 4 rows, 64 tokens), so
the jitted steps compile once per process and every later test reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import lsw_jax
from lsw_jax import ModelConfig
from lsw_jax.adapters.lora import attach_adapter, iter_linears
from lsw_jax.adapters.store import save_adapter
from lsw_jax.config import AdapterConfig

VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - 6)] + [
    "<s>",
    "</s>",
    "<unk>",
    "user",
    "assistant",
    "system",
]
EOS_ID = WORDS.index("</s>")
ADAPTERS = ("a1", "a2", "a3")
SLOTS, MAX_LEN, POOL = 4, 64, 2
REF_TOKENS = 16
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from lsw_jax.tokenizer import Tokenizer

    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(
        backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


def _random_lora(ckpt: Path, name: str, rank: int, seed: int, targets="all") -> None:
    model = lsw_jax.load_model(ckpt, dtype="float32")
    attach_adapter(
        model, AdapterConfig(kind="lora", rank=rank, alpha=2.0 * rank, targets=targets), seed=seed
    )
    rng = np.random.default_rng(seed)
    for _, _, lin in iter_linears(model, model.adapter_config.targets):
        lin.lora.b.set_value(jnp.asarray(rng.normal(0, 0.2, lin.lora.b[...].shape), jnp.float32))
    save_adapter(model, ckpt, name)


def _random_bank(ckpt: Path, name: str, kind: str, seed: int, **router_kw) -> None:
    """A stored LoRA-Switch / MoLA adapter (4 experts, top-2, rank 4) with random non-zero
    B and routers strong enough that the chosen experts change from token to token."""
    model = lsw_jax.load_model(ckpt, dtype="float32")
    cfg = AdapterConfig(kind=kind, num_experts=4, top_k=2, rank=4, alpha=8.0, **router_kw)
    attach_adapter(model, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for _, _, lin in iter_linears(model, model.adapter_config.targets):
        lin.lora.b.set_value(jnp.asarray(rng.normal(0, 0.2, lin.lora.b[...].shape), jnp.float32))
    routers = [model.router] if kind == "switch" else [layer.router for layer in model.layers]
    for router in routers:
        router.weight.set_value(jnp.asarray(rng.normal(0, 1.0, router.weight[...].shape)))
    save_adapter(model, ckpt, name)


@functools.cache
def tiny_checkpoint() -> Path:
    """A tiny Llama checkpoint with a tokenizer and stored adapters a1 (r2), a2 (r4, q/v
    only), a3 (r4), sw (LoRA-Switch, 4 experts, top-2) and mo (MoLA, 4 experts, top-2),
    both with a router temperature and unit-RMS router input, and swc (LoRA-Switch whose
    router reads the document so far);
    built once per test process."""
    root = Path(tempfile.mkdtemp(prefix="lsw-serve-"))
    cfg = ModelConfig.tiny(vocab_size=VOCAB, eos_token_id=EOS_ID, max_position_embeddings=128)
    model = lsw_jax.init_model(cfg, dtype="float32", seed=3)
    ckpt = root / "tiny"
    lsw_jax.save_model(model, ckpt)
    make_tokenizer().save(ckpt)
    _random_lora(ckpt, "a1", 2, 1)
    _random_lora(ckpt, "a2", 4, 2, targets=("q_proj", "v_proj"))
    _random_lora(ckpt, "a3", 4, 3)
    # Router settings other than the defaults, which serving must honour.
    _random_bank(ckpt, "sw", "switch", 4, router_temperature=0.5, router_normalize_input=True)
    _random_bank(ckpt, "mo", "mola", 5, router_temperature=2.0, router_normalize_input=True)
    _random_bank(ckpt, "swc", "switch", 6, router_context="prefix_mean")
    return ckpt


@functools.cache
def _base_model():
    return lsw_jax.load_model(tiny_checkpoint(), dtype="float32")


@functools.cache
def host_adapter(name: str):
    from lsw_jax.serve.adapter_pool import read_adapter

    return read_adapter(_base_model().cfg, name, name, tiny_checkpoint())


def make_engine(*, adapters=ADAPTERS, pool_slots=POOL, max_experts=1, **kw):
    """A fresh engine (own model, pool and cache) over the shared tiny checkpoint."""
    from flax import nnx

    from lsw_jax.serve.adapter_pool import AdapterPool
    from lsw_jax.serve.engine import Engine

    model = nnx.clone(_base_model())
    pool = AdapterPool(
        model,
        capacity=pool_slots,
        rank=4,
        max_experts=max_experts,
        max_top_k=2 if max_experts > 1 else 1,
        ckpt=tiny_checkpoint(),
    )
    for name in adapters:
        pool.add(host_adapter(name))
    kw = {"slots": SLOTS, "max_len": MAX_LEN, "max_prefill_rows": 2, **kw}
    return Engine(model, pool=pool, **kw)


@functools.cache
def reference_model(adapter: str | None):
    return lsw_jax.load_model(tiny_checkpoint(), dtype="float32", adapter=adapter)


def full_logprobs(adapter: str | None, ids: list[int]) -> np.ndarray:
    """``[len(ids), V]`` float64 log-softmax of one full forward of the reference model:
    row j scores the token after ``ids[: j + 1]``."""
    logits = np.asarray(reference_model(adapter)(np.asarray([ids])), np.float64)[0]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def reference_greedy(prompt: list[int], adapter: str | None, n: int) -> list[int]:
    """``lsw_jax.generate`` on a model with the adapter attached (the oracle), no EOS.

    Always generates ``REF_TOKENS`` (one compile per adapter) and keeps the first ``n``:
    greedy decoding without EOS is prefix-stable."""
    assert n <= REF_TOKENS
    out = lsw_jax.generate(
        reference_model(adapter), np.asarray([prompt]), REF_TOKENS, eos_token_id=[]
    )
    return out[0, :n].tolist()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 14) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB - 6, rng.integers(lo, hi)).tolist() for _ in range(n)]


def replace_cfg(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)

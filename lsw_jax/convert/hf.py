"""Hugging Face parameter names -> model state: one key table, a shape check per tensor."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from lsw_jax.checkpoint import StatePath
from lsw_jax.config import ModelConfig

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def hf_key_table(cfg: ModelConfig) -> dict[str, tuple[StatePath, tuple[int, ...]]]:
    """Every HF tensor name the model needs -> (state path, expected shape)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "q_proj": (q_out, d),
        "k_proj": (kv_out, d),
        "v_proj": (kv_out, d),
        "o_proj": (d, q_out),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }
    table: dict[str, tuple[StatePath, tuple[int, ...]]] = {
        "model.embed_tokens.weight": (("embed_tokens",), (v, d)),
        "model.norm.weight": (("norm", "weight"), (d,)),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = (("lm_head", "weight"), (v, d))
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        table[f"{pre}.input_layernorm.weight"] = (("layers", i, "input_layernorm", "weight"), (d,))
        table[f"{pre}.post_attention_layernorm.weight"] = (
            ("layers", i, "post_attention_layernorm", "weight"),
            (d,),
        )
        for group, names, bias in (
            ("self_attn", _ATTN, cfg.attention_bias),
            ("mlp", _MLP, cfg.mlp_bias),
        ):
            for name in names:
                path = ("layers", i, group, name)
                table[f"{pre}.{group}.{name}.weight"] = (path + ("weight",), shapes[name])
                # Llama's attention_bias covers q/k/v/o; Qwen-style q/k/v-only is not Llama.
                if bias:
                    table[f"{pre}.{group}.{name}.bias"] = (path + ("bias",), (shapes[name][0],))
    return table


# Tensors HF checkpoints may carry that the model rightly ignores (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def map_hf_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, source: str
) -> Iterator[tuple[StatePath, np.ndarray]]:
    """Check names and shapes while streaming; raise on unmapped, duplicate or missing keys."""
    table = hf_key_table(cfg)
    seen: set[str] = set()
    for name, arr in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints still store the (identical) head
        if name not in table:
            raise ValueError(f"{source}: unexpected tensor {name!r} (not a Llama parameter)")
        if name in seen:
            raise ValueError(f"{source}: duplicate tensor {name!r}")
        seen.add(name)
        path, shape = table[name]
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}"
            )
        yield path, arr
    missing = sorted(set(table) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {missing[:5]}{more}")

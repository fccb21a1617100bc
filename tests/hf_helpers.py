"""Tiny Hugging Face models built locally (no downloads) for parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY_LLAMA = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_hf_model(kind: str = "llama", seed: int = 0, **overrides: Any):
    """A randomly initialised fp32 LlamaForCausalLM / MistralForCausalLM."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(TINY_LLAMA)
    kw.update(overrides)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**kw)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(cfg)
    # Randomise norms too so a wrong norm mapping cannot hide behind ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def save_hf_model(model: Any, folder: Path, **kw: Any) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return folder


def hf_logits(model: Any, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

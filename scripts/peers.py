"""PyTorch peer models for the decode benchmarks, built from the same weights as ours.

- ``hf_llama_from_ours``: a transformers ``LlamaForCausalLM`` holding our model's weights
  (so both sides decode the same network and emit the same greedy tokens).
- ``attach_peft_lora``: PEFT LoRA on the given linears with random B (so it is not a no-op).
- ``attach_mola``: a mixture of LoRA experts written the way MoLA's public code does it
  (github.com/GCYZSL/MoLA, ``peft/tuners/mola.py``): every adapted linear owns a router,
  takes the softmax top-k, and then loops over ALL experts in Python, adding
  ``route_weight[..., e] * B_e(A_e(x)) * scaling`` (zero weight for unselected experts).
  It wraps the HF ``nn.Linear`` modules in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lsw_jax.linears import checkpoint_table, iter_checkpoint_tensors

_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_llama_from_ours(model: Any, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A transformers LlamaForCausalLM with ``model``'s (an lsw_jax LlamaModel) weights."""
    import transformers

    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)

    # The model holds fused linears; the checkpoint view splits them back into HF's parts.
    names = {path: key for key, (path, _) in checkpoint_table(cfg).items()}
    state = {
        names[path]: torch.from_numpy(np.array(arr, np.float32)).to(dtype)
        for path, arr in iter_checkpoint_tensors(model)
    }
    hf.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)  # real inv_freq, not meta
    return hf.to(device).eval()


def attach_peft_lora(hf: Any, *, rank: int, alpha: float, targets=_TARGETS, seed: int = 0):
    """PEFT LoRA on ``targets`` with B ~ N(0, 0.02) instead of zeros."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    model = peft.get_peft_model(hf, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model.eval()


class MoLALinear(nn.Module):
    """``y = base(x) + sum_e w_e(x) * B_e(A_e(x)) * scaling``, w = top-k of softmax(router(x))
    scattered over all E experts (MoLA's per-module router and Python loop over experts)."""

    def __init__(self, base: nn.Linear, *, num_experts: int, rank: int, alpha: float, top_k: int):
        super().__init__()
        self.base = base
        self.top_k = top_k
        self.scaling = alpha / rank
        dt, dev = base.weight.dtype, base.weight.device
        self.router = nn.Linear(base.in_features, num_experts, bias=False, dtype=dt, device=dev)
        self.lora_A = nn.ModuleList(
            nn.Linear(base.in_features, rank, bias=False, dtype=dt, device=dev)
            for _ in range(num_experts)
        )
        self.lora_B = nn.ModuleList(
            nn.Linear(rank, base.out_features, bias=False, dtype=dt, device=dev)
            for _ in range(num_experts)
        )
        with torch.no_grad():
            for b in self.lora_B:
                b.weight.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        route = torch.zeros_like(probs).scatter(-1, top_i, top_w).to(result.dtype)
        for e in range(len(self.lora_A)):
            result = (
                result + route[..., e : e + 1] * self.lora_B[e](self.lora_A[e](x)) * self.scaling
            )
        return result


def attach_mola(
    hf: Any,
    *,
    num_experts: int,
    rank: int,
    alpha: float,
    top_k: int,
    targets=_TARGETS,
    seed: int = 0,
):
    """Replace every targeted HF linear by a ``MoLALinear`` wrapping it (in place)."""
    torch.manual_seed(seed)
    for layer in hf.model.layers:
        for mod in (layer.self_attn, layer.mlp):
            for name in targets:
                base = getattr(mod, name, None)
                if isinstance(base, nn.Linear):
                    kw = dict(num_experts=num_experts, rank=rank, alpha=alpha, top_k=top_k)
                    setattr(mod, name, MoLALinear(base, **kw))
    return hf.eval()

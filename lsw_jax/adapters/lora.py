"""LoRA expert banks, routers and the routing struct shared by every execution plan.

Router input (LoRA-Switch, ``switch``): the output of decoder layer 0's
``input_layernorm`` applied to the token embeddings, i.e. exactly the tensor layer 0's
q/k/v projections read. It is computed once per token, before layer 0, so the chosen
experts of every layer are known before any layer runs (pre-gating). ``mola`` routers read
their own layer's ``input_layernorm`` output, and one routing serves that layer's
attention and MLP linears.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsw_jax.config import AdapterConfig

Array = jax.Array


class LoRAParam(nnx.Param):
    """Trainable adapter weights (the only parameters training differentiates)."""


class RouterParam(LoRAParam):
    """Router weights; trained with the adapters."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    """Which experts each token uses and with what weight.

    expert_ids: [B, T, k] int32, indices into the bank's experts.
    gates: [B, T, k] float32, softmax over the router logits, restricted to the top-k and
        renormalised to sum to 1 (the bank's alpha/r scaling is applied by the bank).
    logits: [B, T, E] float32 router logits (None for fixed routing); feeds the aux losses.
    """

    expert_ids: Array
    gates: Array
    logits: Array | None = None


def top_k_routing(logits: Array, top_k: int) -> Routing:
    """Softmax over experts, keep the top-k, renormalise over the k."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    gates = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return Routing(top_i.astype(jnp.int32), gates, logits)


class Router(nnx.Module):
    """``logits[b, t, e] = sum_d h[b, t, d] * weight[e, d]`` followed by top-k gating."""

    def __init__(self, dim: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs):
        self.top_k = top_k
        w = 0.02 * jax.random.normal(rngs.params(), (num_experts, dim), jnp.float32)
        self.weight = RouterParam(w, logical_axes=("experts", "embed"))

    def __call__(self, h: Array) -> Routing:
        logits = jnp.einsum(
            "btd,ed->bte", h.astype(jnp.float32), self.weight[...].astype(jnp.float32)
        )
        return top_k_routing(logits, self.top_k)


class FixedRouter(nnx.Module):
    """Plain LoRA: every token uses expert 0 with gate 1."""

    def __call__(self, h: Array) -> Routing:
        b, t = h.shape[:2]
        return Routing(jnp.zeros((b, t, 1), jnp.int32), jnp.ones((b, t, 1), jnp.float32))


def dense_gate_weights(routing: Routing, num_experts: int) -> Array:
    """[B, T, E]: gate of each expert (0 where not selected); duplicates add up."""
    one_hot = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=jnp.float32)
    return jnp.einsum("btk,btke->bte", routing.gates.astype(jnp.float32), one_hot)


class LoraBank(nnx.Module):
    """E LoRA experts of one linear: ``delta[..., o] = scale * sum_j g_j *
    sum_r B[e_j, o, r] * sum_i A[e_j, r, i] * x[..., i]``.

    a: [E, r, in] (PEFT's lora_A.weight per expert), b: [E, out, r] (lora_B.weight).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_experts: int,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        axes: tuple[str, str] = ("mlp", "embed"),
        rngs: nnx.Rngs,
    ):
        self.scale = float(scale)
        self.num_experts = num_experts
        self.rank = rank
        # PEFT's default: A kaiming-uniform (a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)); B zero,
        # so an attached adapter starts as the identity.
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(
            rngs.params(), (num_experts, rank, in_features), jnp.float32, -bound, bound
        )
        self.a = LoRAParam(a, logical_axes=("experts", "lora_rank", axes[1]))
        self.b = LoRAParam(
            jnp.zeros((num_experts, out_features, rank), jnp.float32),
            logical_axes=("experts", axes[0], "lora_rank"),
        )
        # Inactive until model.train(); inference never drops.
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    def delta(self, x: Array, routing: Routing) -> Array:
        """The LoRA contribution for x [B, T, in] under ``routing`` ([B, T, k]) (dense plan).

        Few tokens (decode): gather just the selected experts' A and B. Many tokens
        (training, prefill): x.A for all E experts (E*r is small next to in/out), then B
        weighted by the dense gate matrix; it avoids materialising per-token copies of B.
        Both are differentiable.
        """
        dt = x.dtype
        if self.dropout is not None:
            x = self.dropout(x)
        a, b = self.a[...].astype(dt), self.b[...].astype(dt)
        bsz, t, _ = x.shape
        ids, gates = routing.expert_ids, (routing.gates * self.scale).astype(dt)
        if bsz * t * ids.shape[-1] <= self.num_experts:
            xa = jnp.einsum("bti,btkri->btkr", x, jnp.take(a, ids, axis=0))
            return jnp.einsum("btkr,btkor->bto", xa * gates[..., None], jnp.take(b, ids, axis=0))
        w = dense_gate_weights(routing, self.num_experts) * self.scale  # [B, T, E]
        xa = jnp.einsum("bti,eri->bter", x, a)
        return jnp.einsum("bter,eor->bto", xa * w[..., None].astype(dt), b)

    def unmerged(self, x: Array, w: Array, bias: Array | None, routing: Routing) -> Array:
        """``x.W^T + bias + delta`` through the fused kernel (each row its own experts).

        Off-GPU there is no compiled kernel; XLA's own products (the dense plan) serve.
        """
        from pallas_kernels.lora_unmerged import lora_unmerged
        from pallas_kernels.switch_merge import resolve_impl

        if resolve_impl("auto", None)[0] == "reference":
            y = jnp.einsum("...i,oi->...o", x, w)
            y = y if bias is None else y + bias
            return y + self.delta(x, routing).astype(y.dtype)
        b, t, d = x.shape
        k = routing.expert_ids.shape[-1]
        y = lora_unmerged(
            x.reshape(b * t, d),
            w,
            self.a[...].astype(x.dtype),
            self.b[...].astype(x.dtype),
            routing.expert_ids.reshape(b * t, k),
            (routing.gates * self.scale).reshape(b * t, k),
            bias,
        )
        return y.reshape(b, t, -1)

    def merged_delta(self, expert_ids: Array, gates: Array) -> Array:
        """``sum_j scale * g_j * B[e_j] @ A[e_j]`` -> [out, in] for one shared selection."""
        a = self.a[...].astype(jnp.float32)[expert_ids]  # [k, r, in]
        b = self.b[...].astype(jnp.float32)[expert_ids]  # [k, out, r]
        return jnp.einsum("k,kor,kri->oi", gates.astype(jnp.float32) * self.scale, b, a)


# ---------------------------------------------------------------------- attaching


def iter_linears(model: Any, targets: tuple[str, ...]):
    """Yield ``(layer index, module name, Linear)`` for every targeted linear."""
    for i, layer in enumerate(model.layers):
        for group in (layer.self_attn, layer.mlp):
            for name in targets:
                lin = getattr(group, name, None)
                if lin is not None:
                    yield i, name, lin


# Logical axes (out, in) of each adaptable linear; banks inherit them.
LINEAR_AXES = {
    "q_proj": ("heads", "embed"),
    "k_proj": ("kv_heads", "embed"),
    "v_proj": ("kv_heads", "embed"),
    "o_proj": ("embed", "heads"),
    "gate_proj": ("mlp", "embed"),
    "up_proj": ("mlp", "embed"),
    "down_proj": ("embed", "mlp"),
}


def attach_adapter(
    model: Any,
    cfg: AdapterConfig,
    *,
    seed: int = 0,
    ranks: dict[tuple[int, str], int] | None = None,
    scales: dict[tuple[int, str], float] | None = None,
) -> Any:
    """Give ``model`` a fresh adapter of ``cfg`` in place (B = 0: the model is unchanged).

    ranks/scales: optional per-(layer, module) overrides (PEFT rank/alpha patterns).
    """
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    detach_adapter(model)
    for i, name, lin in iter_linears(model, cfg.targets):
        r = (ranks or {}).get((i, name), cfg.rank)
        lin.lora = LoraBank(
            lin.in_features,
            lin.out_features,
            num_experts=cfg.num_experts,
            rank=r,
            scale=(scales or {}).get((i, name), cfg.scale),
            dropout=cfg.dropout,
            axes=LINEAR_AXES[name],
            rngs=rngs,
        )
    d = model.cfg.hidden_size
    if cfg.kind == "lora":
        model.router = FixedRouter()
    elif cfg.kind == "switch":
        model.router = Router(d, cfg.num_experts, cfg.top_k, rngs=rngs)
    else:
        for layer in model.layers:
            layer.router = Router(d, cfg.num_experts, cfg.top_k, rngs=rngs)
    model.adapter_config = cfg
    return model


def detach_adapter(model: Any) -> Any:
    for i, name, lin in iter_linears(model, tuple(LINEAR_AXES)):
        del i, name
        lin.lora = None
    model.router = None
    for layer in model.layers:
        layer.router = None
    model.adapter_config = None
    return model


# ---------------------------------------------------------------------- losses & stats


def load_balancing_loss(routing: Routing, num_experts: int, mask: Array | None = None) -> Array:
    """Switch Transformer: ``E * sum_e f_e * P_e``; f_e = share of the k*T assignments
    that went to expert e, P_e = mean router probability of e (over unmasked tokens)."""
    probs = jax.nn.softmax(routing.logits, axis=-1)  # [B, T, E]
    assign = jax.nn.one_hot(routing.expert_ids, num_experts).sum(-2)  # [B, T, E]
    m = jnp.ones(probs.shape[:2]) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    f = jnp.einsum("bte,bt->e", assign, m) / (n * routing.expert_ids.shape[-1])
    p = jnp.einsum("bte,bt->e", probs, m) / n
    return num_experts * jnp.sum(f * p)


def router_z_loss(routing: Routing, mask: Array | None = None) -> Array:
    """``mean(logsumexp(logits)^2)`` over unmasked tokens (ST-MoE)."""
    z = jax.nn.logsumexp(routing.logits, axis=-1) ** 2
    m = jnp.ones(z.shape) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(z * m) / jnp.maximum(m.sum(), 1.0)


def routing_stats(routing: Routing, num_experts: int, mask: Array | None = None) -> dict:
    """Per-expert load (share of assignments, sums to 1) and mean routing entropy (nats)."""
    m = jnp.ones(routing.expert_ids.shape[:2]) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    assign = jax.nn.one_hot(routing.expert_ids, num_experts).sum(-2)
    load = jnp.einsum("bte,bt->e", assign, m) / (n * routing.expert_ids.shape[-1])
    stats = {"expert_load": load}
    if routing.logits is not None:
        logp = jax.nn.log_softmax(routing.logits, axis=-1)
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        stats["routing_entropy"] = jnp.sum(ent * m) / n
    return stats

"""The ``merged`` execution plan: experts merged into resident weights, switched per token.

For every adapted weight group (q, k, v, o, gate, up, down) we keep ``W_eff [L, out, in]``
= base + the current selection's delta. Pre-gating gives the next token's selection
before layer 0 runs, so one switch-kernel call per group moves every layer's ``W_eff``
from the old selection to the new one (LoRA-Switch's SGMM), and the layers then run as
plain linears. In low precision the in-place switch drifts by one rounding per switch;
every ``remerge_every`` switches we merge afresh from the base weights, which bounds it
(docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsw_jax.adapters.lora import FixedRouter, Router, Routing
from lsw_jax.config import ALL_TARGETS

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MergedState:
    w_eff: dict[str, Array]  # group -> [L, out, in]
    expert_ids: Array  # [k] selection currently merged
    gates: Array  # [k]
    n_switches: Array  # [] int32 since the last fresh merge


def _groups(model: Any) -> dict[str, list[Any]]:
    """group name -> the adapted Linear of every layer (all layers must be adapted)."""
    groups: dict[str, list[Any]] = {}
    for name in ALL_TARGETS:
        lins = [
            getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            for layer in model.layers
        ]
        present = [lin.lora is not None for lin in lins]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"merged plan: {name} is adapted in only some layers")
        if len({(lin.lora.rank, lin.lora.scale) for lin in lins}) != 1:
            raise ValueError(f"merged plan: {name} has different ranks or scales per layer")
        groups[name] = lins
    return groups


def check_mergeable(model: Any, batch: int) -> str | None:
    """None when ``merged`` applies; otherwise why not (the caller falls back to unmerged)."""
    if model.router is None and all(layer.router is None for layer in model.layers):
        return "the model has no adapter attached"
    if any(layer.router is not None for layer in model.layers):
        return "per-layer (mola) routing picks different experts in every layer"
    if isinstance(model.router, Router) and batch > 1:
        return f"a batch of {batch} rows routes each row to its own experts"
    _groups(model)
    return None


@dataclasses.dataclass(frozen=True)
class StackedGroup:
    """One adapted weight group, stacked over layers once before the decode loop."""

    w_base: Array  # [L, out, in]
    a: Array  # [L, E, r, in], in the weights' dtype
    b: Array  # [L, E, out, r]
    scale: float


def stack_groups(model: Any) -> dict[str, StackedGroup]:
    """group -> base weights and expert banks stacked over layers; read before any merged
    step runs (the steps overwrite the layers' weights with W_eff)."""
    out = {}
    for name, lins in _groups(model).items():
        w = jnp.stack([lin.weight[...] for lin in lins])
        a = jnp.stack([lin.lora.a[...] for lin in lins]).astype(w.dtype)
        b = jnp.stack([lin.lora.b[...] for lin in lins]).astype(w.dtype)
        out[name] = StackedGroup(w, a, b, lins[0].lora.scale)
    return out


def init_merged(model: Any, groups: dict[str, StackedGroup]) -> MergedState:
    """Start from the base weights with nothing merged; the first step merges."""
    k = 1 if isinstance(model.router, FixedRouter) else model.router.top_k
    w_base = {name: g.w_base for name, g in groups.items()}
    return MergedState(
        w_base, jnp.zeros((k,), jnp.int32), jnp.zeros((k,), jnp.float32), jnp.int32(0)
    )


def merged_forward(
    model: Any,
    tok: Array,  # [B, 1]
    pos: Array,  # [B, 1]
    cache: Any,
    ms: MergedState,
    groups: dict[str, StackedGroup],
    *,
    remerge_every: int = 32,
) -> tuple[Any, MergedState]:
    """One decode step under the merged plan; all rows share row 0's selection."""
    from pallas_kernels.switch_merge import switch_merge_with_remerge

    h0 = jnp.take(model.embed_tokens[...], tok, axis=0).astype(model.dtype)
    routing: Routing = model.router(model.layers[0].input_layernorm(h0))
    e_new, g_new = routing.expert_ids[0, 0], routing.gates[0, 0]
    w_eff, n_next = {}, ms.n_switches
    graphdef, state = nnx.split(model)
    pure = state.to_pure_dict()
    for name, g in groups.items():
        w_eff[name], n_next = switch_merge_with_remerge(
            ms.w_eff[name],
            g.w_base,
            g.a,
            g.b,
            ms.expert_ids,
            ms.gates * g.scale,
            e_new,
            g_new * g.scale,
            ms.n_switches,
            remerge_every=remerge_every,
        )
        group = "self_attn" if name in ALL_TARGETS[:4] else "mlp"
        for layer_idx in range(w_eff[name].shape[0]):
            pure["layers"][layer_idx][group][name]["weight"] = w_eff[name][layer_idx]
    # Functional update: the caller's variables belong to an outer trace.
    state.replace_by_pure_dict(pure)
    model = nnx.merge(graphdef, state)
    out = model.forward(tok, positions=pos, cache=cache, routing=routing, plan="merged")
    return out, MergedState(w_eff, e_new, g_new, n_next)

"""Execution plans: how an adapter's experts apply in a forward pass (DESIGN.md).

- ``dense``: differentiable jnp (training, scoring): each part's bank adds its delta.
- ``unmerged``: ``y = x W^T + sum_j g_j (x A_{e_j}^T) B_{e_j}^T`` per row through the fused
  op ``pallas_kernels.lora_unmerged`` (the Pallas kernel on a GPU, its jnp reference
  elsewhere), over a ``FusedBank`` per fused linear: the parts' A stacked along the rank,
  their B (scale folded in) placed in the fused rows. Built once per ``generate`` call /
  adapter-pool change by ``prepare_unmerged``, not per step.
- ``merged``: ``MergedWeights`` keeps ``W_eff = W + sum_j g_j B_{e_j} A_{e_j}`` of every
  adapted fused linear stacked over layers; ``switch`` moves all layers to a new selection
  in one switch-kernel call per fused linear (subtract the old experts, add the new; a
  fresh merge from the base every ``remerge_every`` switches bounds bf16 drift). The layers
  then run plain products. ``generate``'s merged plan and the serving engine's merged mode
  both use it.

An unknown plan name is an error (``as_plan``), never a silent base-model forward.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp

from lsw_jax.adapters.lora import FixedRouter, Router, Routing
from lsw_jax.linears import FUSED
from pallas_kernels.dispatch import check_impl
from pallas_kernels.lora_unmerged import lora_unmerged
from pallas_kernels.switch_merge import switch_merge_with_remerge

Array = jax.Array


class Plan(str, enum.Enum):
    DENSE = "dense"
    UNMERGED = "unmerged"
    MERGED = "merged"


PLANS = tuple(p.value for p in Plan)


def as_plan(plan: Plan | str) -> Plan:
    """The Plan of a name; anything else is a ValueError naming the choices."""
    if isinstance(plan, Plan):
        return plan
    try:
        return Plan(plan)
    except ValueError:
        raise ValueError(f"plan={plan!r} must be one of {PLANS}") from None


# ---------------------------------------------------------------------- unmerged


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FusedBank:
    """The experts of one fused linear, ready for ``lora_unmerged``.

    a: [E, R, in], every adapted part's A stacked along the rank (R = sum of their ranks).
    b: [E, out, R], part p's ``scale_p * B_p`` in its fused rows and its rank columns, zero
        elsewhere, so ``b[e] @ a[e]`` is the fused weight's delta of expert e.
    impl: "auto" | "pallas" | "reference" (static), passed to ``lora_unmerged``.
    """

    a: Array
    b: Array
    impl: str = dataclasses.field(default="auto", metadata=dict(static=True))


def fused_bank(linear: Any, dtype: Any, impl: str = "auto") -> FusedBank | None:
    """The ``FusedBank`` of a fused ``Linear``'s part banks (None: no part is adapted)."""
    if linear.lora is None or not len(linear.lora):
        return None
    layout, a_parts, b_blocks = linear.layout, [], []
    ranks = [linear.lora[p].rank if p in linear.lora else 0 for p in linear.parts]
    total = sum(ranks)
    n_exp = next(iter(linear.lora.values())).num_experts
    start = 0
    for i, name in enumerate(linear.parts):
        out_p = layout.part_out(i)
        block = jnp.zeros((n_exp, out_p, total), dtype)
        if name in linear.lora:
            bank = linear.lora[name]
            a_parts.append(bank.a[...].astype(dtype))
            b_p = (bank.b[...].astype(jnp.float32) * bank.scale).astype(dtype)
            block = block.at[:, :, start : start + ranks[i]].set(b_p)
        b_blocks.append(block)
        start += ranks[i]
    return FusedBank(
        jnp.concatenate(a_parts, axis=1), layout.pack(b_blocks, axis=1), check_impl(impl)
    )


def unmerged_linear(
    x: Array, w: Array, bias: Array | None, bank: FusedBank, routing: Routing
) -> Array:
    """x [B, T, in] through ``lora_unmerged`` with each token's experts; -> [B, T, out]."""
    b, t, d = x.shape
    k = routing.expert_ids.shape[-1]
    y = lora_unmerged(
        x.reshape(b * t, d),
        w,
        bank.a.astype(x.dtype),
        bank.b.astype(x.dtype),
        routing.expert_ids.reshape(b * t, k),
        routing.gates.reshape(b * t, k).astype(jnp.float32),
        bias,
        impl=bank.impl,
    )
    return y.reshape(b, t, -1)


def adapted_linears(layer: Any) -> dict[str, Any]:
    """fused linear name -> the fused ``Linear`` of one decoder layer."""
    return {f.name: getattr(getattr(layer, f.module), f.name) for f in FUSED}


def prepare_unmerged(model: Any, impl: str = "auto") -> list[dict[str, FusedBank]]:
    """Per layer {fused linear: FusedBank} of the model's attached banks (once, not per step)."""
    out = []
    for layer in model.layers:
        banks = {
            name: fused_bank(lin, model.dtype, impl) for name, lin in adapted_linears(layer).items()
        }
        out.append({k: v for k, v in banks.items() if v is not None})
    return out


# ---------------------------------------------------------------------- merged


def check_mergeable(model: Any, batch: int) -> str | None:
    """None when ``merged`` applies to ``generate``; otherwise why not."""
    if model.router is None and all(layer.router is None for layer in model.layers):
        return "the model has no adapter attached"
    if any(layer.router is not None for layer in model.layers):
        return "per-layer (mola) routing picks different experts in every layer"
    if isinstance(model.router, Router) and batch > 1:
        return f"a batch of {batch} rows routes each row to its own experts"
    _merged_groups(model)
    return None


def _merged_groups(model: Any) -> dict[str, list[Any]]:
    """fused linear name -> its Linear in every layer; each must be adapted alike."""
    groups: dict[str, list[Any]] = {}
    for name in (f.name for f in FUSED):
        lins = [adapted_linears(layer)[name] for layer in model.layers]
        shapes = [
            None if lin.lora is None else tuple((p, lin.lora[p].rank) for p in lin.lora)
            for lin in lins
        ]
        if all(s is None or s == () for s in shapes):
            continue
        if len(set(shapes)) != 1:
            raise ValueError(
                f"merged plan: {name} is adapted differently across layers ({set(shapes)})"
            )
        groups[name] = lins
    return groups


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergedGroup:
    """One adapted fused linear, stacked over layers."""

    w_base: Array  # [L, out, in]
    a: Array  # [L, E, R, in]
    b: Array  # [L, E, out, R], scales folded in
    w_eff: Array  # [L, out, in]: w_base + the current selection's delta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergedWeights:
    """``W_eff`` of every adapted fused linear for one selection shared by all rows."""

    groups: dict[str, MergedGroup]
    expert_ids: Array  # [k] the selection merged now
    gates: Array  # [k]
    n_switches: Array  # [] int32, switches since the last fresh merge

    @classmethod
    def create(cls, model: Any, banks: list[dict[str, FusedBank]], k: int) -> MergedWeights:
        """Base weights with nothing merged (gates 0); the first ``switch`` merges.

        banks: ``prepare_unmerged(model)``'s per-layer FusedBanks (stacked here).
        """
        groups = {}
        for name, lins in _merged_groups(model).items():
            w = jnp.stack([lin.weight[...] for lin in lins]).astype(model.dtype)
            a = jnp.stack([layer[name].a for layer in banks])
            b = jnp.stack([layer[name].b for layer in banks])
            groups[name] = MergedGroup(w, a, b, w)
        zeros = jnp.zeros((k,), jnp.int32)
        return cls(groups, zeros, jnp.zeros((k,), jnp.float32), jnp.int32(0))

    def switch(self, expert_ids: Array, gates: Array, *, remerge_every: int = 32) -> MergedWeights:
        """Move every layer's W_eff to the selection (expert_ids [k], gates [k])."""
        groups, n_next = {}, self.n_switches
        for name, g in self.groups.items():
            w_eff, n_next = switch_merge_with_remerge(
                g.w_eff,
                g.w_base,
                g.a,
                g.b,
                self.expert_ids,
                self.gates,
                expert_ids,
                gates.astype(jnp.float32),
                self.n_switches,
                remerge_every=remerge_every,
            )
            groups[name] = dataclasses.replace(g, w_eff=w_eff)
        return MergedWeights(groups, expert_ids, gates.astype(jnp.float32), n_next)

    def layer_weights(self, num_layers: int) -> list[dict[str, Array]]:
        """Per layer {fused linear: W_eff[l]} for ``forward(plan="merged")``."""
        return [{n: g.w_eff[i] for n, g in self.groups.items()} for i in range(num_layers)]


def selection_size(model: Any) -> int:
    """k of the model's pre-gated router (1 for a plain LoRA)."""
    return 1 if isinstance(model.router, FixedRouter) else model.router.top_k

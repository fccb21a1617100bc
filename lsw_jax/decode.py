"""Jitted generation: prefill plus a ``lax.while_loop`` of decode steps in ONE function,
both through ``decode_step`` (the step the serving engine runs too).

No Python runs per token. Prompts are left-padded into a shape bucket so a new prompt
length rarely recompiles; the compiled function is cached per
(graphdef, batch, prompt bucket, cache bucket, max_new_tokens, plan, impl).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsw_jax.adapters.lora import Routing, RowRouter
from lsw_jax.model.llama import KVCache, ModelOutput
from lsw_jax.plans import (
    MergedWeights,
    Plan,
    as_plan,
    check_impl,
    check_mergeable,
    prepare_unmerged,
    selection_size,
)
from lsw_jax.sampling import RowSampling, SamplingParams, sample_rows

Array = jax.Array


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (at least ``minimum``): few shapes, few compiles."""
    b = minimum
    while b < n:
        b *= 2
    return b


def decode_step(
    model: Any,
    tokens: Array,  # [B, T]
    positions: Array,  # [B, T]
    token_mask: Array | None,  # [B, T]: real tokens (None: all)
    cache: KVCache,
    plan: Plan,
    weights: Any,
    routing: Routing | RowRouter | None = None,
    logits_at: Array | None = None,
) -> ModelOutput:
    """One forward over new tokens with the KV cache: the step of ``generate``'s prefill
    and loop and of the engine's prefill and decode.

    ``weights``: the plan's prepared weights (``lsw_jax.plans``): per layer FusedBanks
    (unmerged), a ``MergedWeights`` already switched to the selection (merged; None: the
    plain weights) or None (dense). ``routing``: per-row experts given by the caller (the engine's ``RowRouter``);
    None routes through the model's own router(s). ``logits_at`` [B]: the logits at that
    position only (``LlamaModel.forward``).
    """
    if plan is Plan.MERGED and weights is not None:
        weights = weights.layer_weights(len(model.layers))
    return model.forward(
        tokens,
        attention_mask=token_mask,
        positions=positions,
        cache=cache,
        routing=routing,
        plan=plan,
        plan_weights=weights,
        logits_at=logits_at,
    )


def switch_to_first_row(
    model: Any, weights: MergedWeights, tokens: Array, cache: KVCache
) -> MergedWeights:
    """The merged plan of ``generate``: merge row 0's pre-gated selection of ``tokens``
    [B, 1] (all rows share it; ``check_mergeable`` ensures they may)."""
    routing = model.route(tokens, cache)
    return weights.switch(routing.expert_ids[0, 0], routing.gates[0, 0])


def prepare_weights(model: Any, plan: Plan, impl: str = "auto") -> tuple[Any, Any]:
    """(prefill weights, decode weights) of ``plan`` for the model's attached adapter.

    Merged decoding prefills unmerged: prompt tokens each route to their own experts.
    """
    if plan is Plan.DENSE:
        return None, None
    banks = prepare_unmerged(model, impl)
    if plan is Plan.UNMERGED:
        return banks, banks
    return banks, MergedWeights.create(model, banks, selection_size(model))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "plan", "impl")
)
def _generate_jit(
    graphdef: Any,
    state: Any,
    input_ids: Array,  # [B, T] left-padded
    attention_mask: Array,  # [B, T]
    rs: RowSampling,
    stop_ids: Array,  # [n_stop] int32 (may be empty)
    *,
    max_new_tokens: int,
    cache_len: int,
    plan: Plan,
    impl: str,
) -> tuple[Array, Array]:
    model = nnx.merge(graphdef, state)
    b, _ = input_ids.shape
    cache = KVCache.create(model.cfg, b, cache_len, model.dtype, model.reads_prefix)
    prefill_weights, weights = prepare_weights(model, plan, impl)
    prefill_plan = Plan.UNMERGED if plan is Plan.MERGED else plan
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    last = jnp.full((b,), input_ids.shape[1] - 1, jnp.int32)  # left-padded: the last token
    out = decode_step(
        model,
        input_ids,
        positions,
        attention_mask,
        cache,
        prefill_plan,
        prefill_weights,
        logits_at=last,
    )
    pos = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # next position per row
    tok = sample_rows(out.logits[:, -1], rs)
    tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop_ids)
    fill = stop_ids[0] if stop_ids.shape[0] else jnp.int32(0)

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, pos, done, tokens, rs, weights = carry
        if plan is Plan.MERGED:
            weights = switch_to_first_row(model, weights, tok[:, None], cache)
        out = decode_step(model, tok[:, None], pos[:, None], None, cache, plan, weights)
        rs = rs.advance()
        nxt = jnp.where(done, fill, sample_rows(out.logits[:, -1], rs))
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        done = done | jnp.isin(nxt, stop_ids)
        return step + 1, nxt, out.cache, pos + 1, done, tokens, rs, weights

    carry = (jnp.int32(1), tok, out.cache, pos, done, tokens, rs, weights)
    step, *_, tokens, _, _ = jax.lax.while_loop(cond, body, carry)
    # Rows that stopped early, or a loop that ended with every row done, fill with EOS.
    idx = jnp.arange(max_new_tokens)[None, :]
    tokens = jnp.where(idx < step, tokens, fill)
    return tokens, step


def _left_pad(input_ids: Any, attention_mask: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    # Re-pack every row to the left padding our cache layout assumes.
    out_ids = np.zeros((ids.shape[0], length), np.int32)
    out_mask = np.zeros((ids.shape[0], length), np.int32)
    for r in range(ids.shape[0]):
        real = ids[r][mask[r].astype(bool)]
        if real.size == 0:
            raise ValueError(f"prompt row {r} is empty")
        out_ids[r, length - real.size :] = real
        out_mask[r, length - real.size :] = 1
    return out_ids, out_mask


def generate(
    model: Any,
    input_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
    attention_mask: Any = None,
    plan: Plan | str = Plan.DENSE,
    impl: str = "auto",
) -> np.ndarray:
    """Generate ``max_new_tokens`` per row; returns new token ids ``[B, max_new_tokens]``.

    input_ids: ``[B, T]`` (or ``[T]``); padding anywhere is removed through
    ``attention_mask`` and rows are re-packed left-padded. Rows that emit an EOS id stop;
    their remaining slots hold that EOS id. ``temperature == 0`` is greedy; otherwise
    temperature, top-k (0 = off) and top-p sampling (``lsw_jax.sampling``), reproducible
    for a ``seed`` (each row draws from its own key).

    plan: how adapters apply (``lsw_jax.plans``): ``dense`` (jnp), ``unmerged`` (fused
    kernel, each token its own experts) or ``merged`` (experts merged into the weights and
    switched per token; falls back to ``unmerged`` with a warning where rows would need
    different experts at once, and for per-layer routing). impl: the unmerged op's
    implementation, "auto" (Pallas on a GPU, its jnp reference elsewhere), "pallas" or
    "reference".
    """
    plan, impl = as_plan(plan), check_impl(impl)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    cfg = model.cfg
    mask_np = None if attention_mask is None else np.asarray(attention_mask)
    ids_np = np.asarray(input_ids)
    longest = int((mask_np if mask_np is not None else np.ones_like(ids_np)).sum(-1).max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {cfg.max_position_embeddings} tokens"
        )
    t = bucket(longest)
    ids, mask = _left_pad(ids_np, mask_np, t)
    cache_len = min(
        bucket(t + max_new_tokens), max(t + max_new_tokens, cfg.max_position_embeddings)
    )
    if eos_token_id is None:
        eos = tuple(cfg.eos_token_ids)
    else:
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if plan is Plan.MERGED:
        why_not = check_mergeable(model, ids.shape[0])
        if why_not is not None:
            warnings.warn(f"merged plan not applicable ({why_not}); using unmerged", stacklevel=2)
            plan = Plan.UNMERGED
    # Each row its own seed, derived from the call's: equal prompts still sample apart.
    row_seeds = np.random.SeedSequence(seed).generate_state(ids.shape[0]).tolist()
    rows = [dataclasses.replace(params, seed=s) for s in row_seeds]
    graphdef, state = nnx.split(model)
    tokens, _ = _generate_jit(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        RowSampling.from_params(rows),
        jnp.asarray(params.stop_ids(eos), jnp.int32).reshape(-1),
        max_new_tokens=max_new_tokens,
        cache_len=cache_len,
        plan=plan,
        impl=impl,
    )
    return np.asarray(tokens)

"""Jitted generation: prefill plus a ``lax.while_loop`` of decode steps in ONE function.

No Python runs per token. Prompts are left-padded into a shape bucket so a new prompt
length rarely recompiles; the compiled function is cached per
(graphdef, batch, prompt bucket, cache bucket, max_new_tokens, sampling mode, plan).
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

from lsw_jax.merged import check_mergeable, init_merged, merged_forward, stack_groups
from lsw_jax.model.llama import KVCache

Array = jax.Array


PLANS = ("dense", "unmerged", "merged")


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (at least ``minimum``): few shapes, few compiles."""
    b = minimum
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample_logits(
    logits: Array, key: Array, temperature: Array, top_p: Array, *, top_k: int, greedy: bool
) -> Array:
    """Next token ids [B] from logits [B, V]: greedy, or temperature + top-k + top-p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(cum_before < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "cache_len", "top_k", "greedy", "plan"),
)
def _generate_jit(
    graphdef: Any,
    state: Any,
    input_ids: Array,  # [B, T] left-padded
    attention_mask: Array,  # [B, T]
    key: Array,
    temperature: Array,
    top_p: Array,
    eos_ids: Array,  # [n_eos] int32 (may be empty)
    *,
    max_new_tokens: int,
    cache_len: int,
    top_k: int,
    greedy: bool,
    plan: str,
) -> tuple[Array, Array]:
    model = nnx.merge(graphdef, state)
    b, _ = input_ids.shape
    cache = KVCache.create(model.cfg, b, cache_len, model.dtype)
    # Prompt tokens each route to their own experts: merged decoding prefills unmerged.
    prefill_plan = "unmerged" if plan == "merged" else plan
    out = model.forward(input_ids, attention_mask=attention_mask, cache=cache, plan=prefill_plan)
    positions = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # next position per row
    key, sub = jax.random.split(key)
    tok = sample_logits(out.logits[:, -1], sub, temperature, top_p, top_k=top_k, greedy=greedy)
    tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids)
    fill = eos_ids[0] if eos_ids.shape[0] else jnp.int32(0)

    if plan == "merged":
        groups = stack_groups(model)
        plan_state = init_merged(model, groups)
    else:
        plan_state = ()

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, pos, done, tokens, key, plan_state = carry
        if plan == "merged":
            out, plan_state = merged_forward(
                model, tok[:, None], pos[:, None], cache, plan_state, groups
            )
        else:
            out = model.forward(tok[:, None], positions=pos[:, None], cache=cache, plan=plan)
        key, sub = jax.random.split(key)
        nxt = sample_logits(out.logits[:, -1], sub, temperature, top_p, top_k=top_k, greedy=greedy)
        nxt = jnp.where(done, fill, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        done = done | jnp.isin(nxt, eos_ids)
        return step + 1, nxt, out.cache, pos + 1, done, tokens, key, plan_state

    carry = (jnp.int32(1), tok, out.cache, positions, done, tokens, key, plan_state)
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
    plan: str = "dense",
) -> np.ndarray:
    """Generate ``max_new_tokens`` per row; returns new token ids ``[B, max_new_tokens]``.

    input_ids: ``[B, T]`` (or ``[T]``); padding anywhere is removed through
    ``attention_mask`` and rows are re-packed left-padded. Rows that emit an EOS id stop;
    their remaining slots hold that EOS id. ``temperature == 0`` is greedy; otherwise
    temperature, top-k (0 = off) and top-p sampling, reproducible for a ``seed``.

    plan: how adapters apply (DESIGN.md): ``dense`` (jnp), ``unmerged`` (fused kernel, each
    token its own experts) or ``merged`` (experts merged into the weights and switched per
    token; falls back to ``unmerged`` with a warning where rows would need different
    experts at once, and for per-layer routing).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    sampling = Sampling(temperature, top_k, top_p)
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
        eos = list(cfg.eos_token_ids)
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if plan not in PLANS:
        raise ValueError(f"plan={plan!r} must be one of {PLANS}")
    if plan == "merged":
        why_not = check_mergeable(model, ids.shape[0])
        if why_not is not None:
            warnings.warn(f"merged plan not applicable ({why_not}); using unmerged", stacklevel=2)
            plan = "unmerged"
    graphdef, state = nnx.split(model)
    tokens, _ = _generate_jit(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(seed),
        jnp.float32(sampling.temperature),
        jnp.float32(sampling.top_p),
        jnp.asarray(eos, jnp.int32).reshape(-1),
        max_new_tokens=max_new_tokens,
        cache_len=cache_len,
        top_k=sampling.top_k,
        greedy=sampling.temperature == 0.0,
        plan=plan,
    )
    return np.asarray(tokens)

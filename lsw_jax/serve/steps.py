"""The engine's jitted steps and their host-side results.

``prefill_insert`` prefills admitted requests into a fresh cache and scatters their rows
into the shared one; ``decode_rows`` advances every row by one token; both sample with
``lsw_jax.sampling.sample_rows`` and, when a static top-N is given, return the chosen
tokens' log-probabilities (``token_logprobs``) from the same logits. ``prepare_banks`` /
``create_merged`` / ``switch_merged`` build the plans' weights. ``TRACE_COUNTS`` counts
traces per jitted function (tests assert that none happens after warm-up).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsw_jax.adapters.lora import RowRouter
from lsw_jax.decode import decode_step
from lsw_jax.model.llama import KVCache
from lsw_jax.plans import MergedWeights, Plan, prepare_unmerged
from lsw_jax.sampling import TokenLogprobs, sample_rows, token_logprobs

Array = jax.Array
TRACE_COUNTS: collections.Counter[str] = collections.Counter()  # jitted functions' traces


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability (raw model) and its top alternatives, most likely first."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing predicts it)
    top: tuple[tuple[int, float], ...]


def _logprobs_or_none(logits: Array, tokens: Array, n: int) -> TokenLogprobs | None:
    return token_logprobs(logits, tokens, n) if n else None


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "plan", "k_max", "num_logprobs"),
    donate_argnames=("cache", "logit_state"),
)
def decode_rows(
    graphdef,
    state,
    weights,
    tables,
    cache,
    logit_state,
    tokens,
    positions,
    active,
    rows,
    rs,
    *,
    plan,
    k_max,
    num_logprobs=0,
):
    """One token for every row: tokens/positions/active/rows [B] (rows: each row's adapter
    base slot, -1 none); rs: RowSampling without ``adjust``: the rows' logit adjustments
    are ``logit_state`` (donated); weights: the plan's (merged: already switched). Returns
    (next tokens [B], their TokenLogprobs (top ``num_logprobs``) or None, logit_state with
    the active rows' tokens counted, cache)."""
    TRACE_COUNTS[f"decode_{plan.value}"] += 1
    model = nnx.merge(graphdef, state)
    cache = dataclasses.replace(cache, index=positions)  # row b writes its slot positions[b]
    router = None if tables is None else RowRouter(tables, rows, k_max=k_max)
    out = decode_step(
        model,
        tokens[:, None],
        positions[:, None],
        active[:, None],
        cache,
        plan,
        weights,
        routing=router,
    )
    logits = out.logits[:, 0]
    # Rows not running (free, parked) may hold a finished request's state: skip them.
    running = dataclasses.replace(logit_state, on=logit_state.on & active)
    tok = sample_rows(logits, dataclasses.replace(rs, adjust=running))
    logit_state = logit_state.counted(tok, active)
    return tok, _logprobs_or_none(logits, tok, num_logprobs), logit_state, out.cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "k_max", "num_logprobs", "prompt_logprobs"),
    donate_argnames=("cache", "logit_state"),
)
def prefill_insert(
    graphdef,
    state,
    weights,
    tables,
    cache,
    logit_state,
    ids,
    lens,
    rows,
    slots,
    rs,
    *,
    k_max,
    num_logprobs=0,
    prompt_logprobs=False,
):
    """Prefill ``ids [R, P]`` (right-padded, ``lens [R]``) into a fresh cache (unmerged: each
    row its own adapter, ``slots [R]``), sample each row's next token and copy the rows
    into ``cache`` rows ``rows [R]`` (rows >= B: padding rows, dropped); the rows' logit
    adjustments (``rs.adjust``, sampled token counted) go into ``logit_state`` (donated)
    the same way. Returns (tokens [R], their TokenLogprobs or None, the prompt's
    TokenLogprobs ``[R, P-1]`` of ids[:, 1:] or None, logit_state, cache)."""
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    r, p = ids.shape
    mask = jnp.arange(p)[None, :] < lens[:, None]
    small = KVCache.create(model.cfg, r, p, cache.k[0].dtype, cache.router_state is not None)
    router = None if tables is None else RowRouter(tables, slots, k_max=k_max)
    plan = Plan.DENSE if tables is None else Plan.UNMERGED
    positions = jnp.broadcast_to(jnp.arange(p)[None], (r, p))
    # Prompt log-probabilities need every position's logits; otherwise only the last's.
    at = None if prompt_logprobs else lens - 1
    out = decode_step(
        model, ids, positions, mask, small, plan, weights, routing=router, logits_at=at
    )
    if prompt_logprobs:
        last = jnp.take_along_axis(out.logits, (lens - 1)[:, None, None], axis=1)[:, 0]
    else:
        last = out.logits[:, 0]
    tok = sample_rows(last, rs)
    prompt_lp = None
    if prompt_logprobs:  # log p(ids[t+1] | ids[:t+1]) from the same prefill logits
        prompt_lp = token_logprobs(out.logits[:, :-1], ids[:, 1:], num_logprobs)
    s = cache.length
    k = [
        c.at[rows, :, :p].set(x.astype(c.dtype), mode="drop")
        for c, x in zip(cache.k, out.cache.k, strict=True)
    ]
    v = [
        c.at[rows, :, :p].set(x.astype(c.dtype), mode="drop")
        for c, x in zip(cache.v, out.cache.v, strict=True)
    ]
    valid = cache.valid.at[rows].set(jnp.pad(mask, ((0, 0), (0, s - p))), mode="drop")
    state = cache.router_state
    if state is not None:  # the rows' running router means start over with their prompts
        state = tuple(
            c.at[rows].set(x, mode="drop")
            for c, x in zip(state, out.cache.router_state, strict=True)
        )
    lp = _logprobs_or_none(last, tok, num_logprobs)
    logit_state = logit_state.with_rows(rows, rs.adjust.counted(tok, jnp.ones_like(lens, bool)))
    return tok, lp, prompt_lp, logit_state, KVCache(k, v, valid, cache.index, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"))
def prepare_banks(graphdef, state, impl):
    """The pool's FusedBanks per layer (rebuilt when the pool changes, not per step)."""
    TRACE_COUNTS["prepare"] += 1
    return prepare_unmerged(nnx.merge(graphdef, state), impl)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def create_merged(graphdef, state, banks) -> MergedWeights:
    TRACE_COUNTS["prepare_merged"] += 1
    return MergedWeights.create(nnx.merge(graphdef, state), banks, 1)


@functools.partial(jax.jit, donate_argnums=(0,))
def switch_merged(weights: MergedWeights, selection: tuple[Array, Array]) -> MergedWeights:
    """Switch the merged weights to ``selection`` (timed apart: the scheduler's merge cost)."""
    TRACE_COUNTS["merge"] += 1
    return weights.switch(*selection)


def host_logprobs(lp: TokenLogprobs | None) -> TokenLogprobs | None:
    """One device-to-host copy per step (indexing device arrays per row would dispatch)."""
    return None if lp is None else jax.tree.map(np.asarray, jax.device_get(lp))


def logprob_entries(lp: TokenLogprobs, i: int, tokens: list[int], n: int) -> list:
    """Host TokenLogprob records of row ``i`` of a host ``lp`` (positions 0.. of a [R, T]
    result, or the row of a [R] one), keeping the top ``n``."""
    chosen, ids, lps = lp.chosen[i], lp.top_ids[i], lp.top_logprobs[i]
    if chosen.ndim == 0:
        chosen, ids, lps = chosen[None], ids[None], lps[None]
    ids, lps = ids[: len(tokens), :n].tolist(), lps[: len(tokens), :n].tolist()
    return [
        TokenLogprob(t, float(chosen[j]), tuple(zip(ids[j], lps[j], strict=True)))
        for j, t in enumerate(tokens)
    ]

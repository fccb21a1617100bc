"""Attention of new queries against a KV cache, with work bounded to the filled slots.

Two functions with one meaning (GQA, the cache-slot mask of ``slot_mask``):

- ``cached_attention``: walks the cache in chunks of ``chunk`` slots under a dynamic trip
  count (``lax.fori_loop`` with traced bounds) and an online softmax in fp32, so a decode
  step costs the slots actually filled, not the whole static cache bucket. It serves decode
  (T = 1) and prefill chunks (T > 1), for a shared write index (``generate``) or one per row
  (the serving engine), with an optional sliding window (only the chunks inside the window
  are visited).
- ``dense_attention``: the whole-bucket softmax (scores of every slot, masked), the math the
  model used before; kept as the oracle and for the cache-free forward (training, scoring),
  which needs reverse-mode gradients that a ``while`` loop does not give.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
# Finite, so that a query with no visible slot stays NaN-free in the dense softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def slot_mask(valid: Array, index: Array, t: int, sliding_window: int | None = None) -> Array:
    """``mask[b, i, s]``: query ``i`` (at cache slot ``index + i``) sees slot ``s`` iff
    ``valid[b, s]`` and ``s <= index + i`` (and ``index + i - s < sliding_window``).

    valid: ``[B, S]`` bool; index: ``[]`` (shared) or ``[B]`` (per row) int. Returns
    ``[B, T, S]`` bool.
    """
    s = valid.shape[1]
    q_slot = jnp.reshape(index, (-1, 1, 1)) + jnp.arange(t)[None, :, None]  # [B or 1, T, 1]
    k_slot = jnp.arange(s)[None, None, :]  # [1, 1, S]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed &= q_slot - k_slot < sliding_window
    return valid[:, None, :] & allowed


def _check(q: Array, k: Array, v: Array, valid: Array, index: Array) -> None:
    b, _, h, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k {k.shape} and v {v.shape} must both be [B={b}, S, kv_heads, head_dim={d}]"
        )
    if h % k.shape[2]:
        raise ValueError(f"num_heads={h} must be a multiple of kv_heads={k.shape[2]}")
    if valid.shape != k.shape[:2]:
        raise ValueError(f"valid {valid.shape} must be [B, S] = {k.shape[:2]}")
    if index.ndim not in (0, 1) or (index.ndim == 1 and index.shape[0] != b):
        raise ValueError(f"index {index.shape} must be [] (shared) or [B={b}] (per row)")


def dense_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """``out[b, t, h] = softmax_s(q[b, t, h] . k[b, s, h // G] / sqrt(D) | mask[b, t, s]) @ v``
    over every slot ``s`` of the buffers (``G = H // KV``).

    q: ``[B, T, H, D]``; k, v: ``[B, S, KV, D]``; mask: ``[B or 1, T, S]`` bool. Scores and
    softmax in fp32; returns ``[B, T, H, D]`` in q's dtype. A query with no visible slot
    gets the mean of ``v`` over all slots (finite mask value; callers ignore such rows).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def cached_attention(
    q: Array,
    k: Array,
    v: Array,
    valid: Array,
    index: Array,
    *,
    sliding_window: int | None = None,
    chunk: int = 256,
) -> Array:
    """``dense_attention(q, k, v, slot_mask(valid, index, T, sliding_window))`` with work
    proportional to the slots a query can see.

    q: ``[B, T, H, D]`` new queries, query ``i`` of row ``b`` sitting at cache slot
    ``index (+ b) + i``; k, v: ``[B, S, KV, D]`` cache buffers already holding the new keys
    and values; valid: ``[B, S]`` bool (already marking the new slots); index: ``[]`` int
    (all rows write at one slot) or ``[B]`` (per row).

    The cache is read in chunks of ``chunk`` slots (clamped to S), from the first chunk
    inside the sliding window of the lowest query to the chunk holding the highest query's
    slot: ``ceil((max(index) + T) / chunk)`` chunks without a window. The trip count is
    traced, so one compiled function serves every fill of a static cache bucket (the
    ``generate`` while loop). Scores, the running max and sum, and the weighted sum of
    values are fp32 (online softmax); returns ``[B, T, H, D]`` in q's dtype. A query with no
    visible slot returns zeros. Not reverse-differentiable (dynamic loop): training uses
    ``dense_attention``.
    """
    _check(q, k, v, valid, index)
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g, c = h // kvh, min(chunk, s)
    if c < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    qg = q.reshape(b, t, kvh, g, d)
    q_slot = jnp.reshape(index, (-1, 1)).astype(jnp.int32) + jnp.arange(t)  # [B or 1, T]
    hi = jnp.minimum(jnp.max(q_slot) + 1, s)  # slots [0, hi) can be visible
    n_chunks = (hi + c - 1) // c
    first = jnp.int32(0)
    if sliding_window is not None:  # chunks wholly before every query's window are skipped
        first = jnp.maximum(jnp.min(q_slot) - sliding_window + 1, 0) // c

    def body(i, carry):
        m, denom, acc = carry  # [B, KV, G, T] x2, [B, KV, G, T, D]; fp32
        # The last chunk of a bucket that C does not divide is moved back to fit; the slots
        # it shares with the chunk before are masked out below (counted once).
        start = jnp.minimum(i * c, s - c)
        kc = jax.lax.dynamic_slice_in_dim(k, start, c, axis=1).astype(q.dtype)
        vc = jax.lax.dynamic_slice_in_dim(v, start, c, axis=1).astype(q.dtype)
        slots = start + jnp.arange(c)  # [C]
        seen = jax.lax.dynamic_slice_in_dim(valid, start, c, axis=1)[:, None, :]  # [B, 1, C]
        seen &= (slots <= q_slot[:, :, None]) & (slots >= i * c)
        if sliding_window is not None:
            seen &= q_slot[:, :, None] - slots < sliding_window
        sc = jnp.einsum("btkgd,bckd->bkgtc", qg, kc, preferred_element_type=jnp.float32)
        sc = jnp.where(seen[:, None, None], sc * (d**-0.5), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no slot seen yet: no -inf - -inf
        p = jnp.exp(sc - shift[..., None])
        scale = jnp.exp(m - shift)
        denom = denom * scale + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "bkgtc,bckd->bkgtd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32
        )
        return m_new, denom, acc * scale[..., None] + pv

    init = (
        jnp.full((b, kvh, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kvh, g, t), jnp.float32),
        jnp.zeros((b, kvh, g, t, d), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(first, n_chunks, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [B, KV, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)

"""Attention of new queries against a KV cache, with work bounded to the filled slots.

Two functions with one meaning (GQA, the cache-slot mask of ``slot_mask``):

- ``cached_attention``: attends over the shortest prefix of the cache, from a static ladder
  of sizes (``min_slots``, twice that, ... up to the bucket), that holds every slot a query
  can see, chosen at run time with one ``lax.switch``; so a decode step reads at most twice
  the filled slots (at least ``min_slots``), not the whole static cache bucket. It serves
  decode (T = 1) and prefill chunks (T > 1), a shared write index (``generate``) or one per
  row (the serving engine), and a sliding window (then the window, not the prefix, is read).
- ``dense_attention``: the whole-buffer softmax (scores of every slot, masked), the math the
  model used before; the oracle, the body of every ``cached_attention`` branch, and the
  cache-free forward (training, scoring).

Both read the cache in either layout of ``KV_LAYOUTS``: slot-major ``[B, S, KV, D]`` (the
model's cache today) or head-major ``[B, KV, S, D]``. Measured on a 2-core CPU (SmolLM2
shapes, 30 layers, a 2048-slot cache): head-major reads each head's keys as one contiguous
``[S, D]`` matrix and runs decode attention 2-3x faster than slot-major, whose products go
through a transposed copy of the cache (docs/benchmarks.md).

Why a ladder of prefixes and not chunks under a dynamic ``fori_loop`` with an online
softmax: measured the same way, XLA's CPU ops cost a fixed ~15 us or more each, and a
chunk's body is a dozen of them, so the loop ran 2-4x slower than the ladder at every fill
(and the ladder's branches are plain softmax, bit-for-bit the dense math on visible slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
# Finite, so that a query with no visible slot stays NaN-free in the dense softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
KV_LAYOUTS = ("bskd", "bksd")  # slot-major, head-major (einsum letters of k and v)


def slot_mask(
    valid: Array,
    index: Array,
    t: int,
    sliding_window: int | None = None,
    *,
    first_slot: Array | int = 0,
) -> Array:
    """``mask[b, i, j]``: query ``i`` (at cache slot ``index + i``) sees slot
    ``s = first_slot + j`` iff ``valid[b, j]`` and ``s <= index + i`` (and
    ``index + i - s < sliding_window``).

    valid: ``[B, S']`` bool over slots ``first_slot ..``; index: ``[]`` (shared) or ``[B]``
    (per row) int. Returns ``[B, T, S']`` bool.
    """
    q_slot = jnp.reshape(index, (-1, 1, 1)) + jnp.arange(t)[None, :, None]  # [B or 1, T, 1]
    k_slot = first_slot + jnp.arange(valid.shape[1])[None, None, :]  # [1, 1, S']
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed &= q_slot - k_slot < sliding_window
    return valid[:, None, :] & allowed


def _layout(kv_layout: str) -> tuple[int, int]:
    """(slot axis, kv-head axis) of a cache buffer."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout={kv_layout!r} must be one of {KV_LAYOUTS}")
    return (1, 2) if kv_layout == "bskd" else (2, 1)


def _check(q: Array, k: Array, v: Array, valid: Array, index: Array, kv_layout: str) -> None:
    slot_ax, head_ax = _layout(kv_layout)
    b, _, h, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        want = "[B, S, kv_heads, D]" if kv_layout == "bskd" else "[B, kv_heads, S, D]"
        raise ValueError(f"k {k.shape} and v {v.shape} must both be {want} with B={b}, D={d}")
    if h % k.shape[head_ax]:
        raise ValueError(f"num_heads={h} must be a multiple of kv_heads={k.shape[head_ax]}")
    if valid.shape != (b, k.shape[slot_ax]):
        raise ValueError(f"valid {valid.shape} must be [B, S] = {(b, k.shape[slot_ax])}")
    if index.ndim not in (0, 1) or (index.ndim == 1 and index.shape[0] != b):
        raise ValueError(f"index {index.shape} must be [] (shared) or [B={b}] (per row)")


def dense_attention(q: Array, k: Array, v: Array, mask: Array, *, kv_layout: str = "bskd") -> Array:
    """``out[b, t, h] = softmax_s(q[b, t, h] . k[b, s, h // G] / sqrt(D) | mask[b, t, s]) @ v``
    over every slot ``s`` of the buffers (``G = H // KV``).

    q: ``[B, T, H, D]``; k, v: ``[B, S, KV, D]`` (``kv_layout="bskd"``) or ``[B, KV, S, D]``
    (``"bksd"``); mask: ``[B or 1, T, S]`` bool. Scores and softmax in fp32; returns
    ``[B, T, H, D]`` in q's dtype. A query with no visible slot gets the mean of ``v`` over
    the slots (finite mask value; callers ignore such rows).
    """
    _, head_ax = _layout(kv_layout)
    b, t, h, d = q.shape
    kvh = k.shape[head_ax]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs, v).reshape(b, t, h, d)


def prefix_sizes(slots: int, min_slots: int) -> tuple[int, ...]:
    """The ladder ``min_slots, 2 * min_slots, ...`` below ``slots``, then ``slots``."""
    if min_slots < 1:
        raise ValueError(f"min_slots={min_slots} must be >= 1")
    sizes, p = [], min_slots
    while p < slots:
        sizes.append(p)
        p *= 2
    return (*sizes, slots)


def cached_attention(
    q: Array,
    k: Array,
    v: Array,
    valid: Array,
    index: Array,
    *,
    sliding_window: int | None = None,
    kv_layout: str = "bskd",
    min_slots: int = 128,
) -> Array:
    """``dense_attention(q, k, v, slot_mask(valid, index, T, sliding_window))`` reading only
    the slots a query can see, rounded up to the ladder ``prefix_sizes(S, min_slots)``.

    q: ``[B, T, H, D]`` new queries, query ``i`` of row ``b`` at cache slot
    ``index (+ b) + i``; k, v: the cache buffers (layout ``kv_layout``, see
    ``dense_attention``), already holding the new keys and values; valid: ``[B, S]`` bool,
    already marking the new slots; index: ``[]`` int (all rows write at one slot) or ``[B]``
    (per row).

    Slots ``[lo, hi)`` can be visible: ``hi = max(index) + T``, ``lo = 0``, or with a window
    ``min(index) - window + 1``. One ``lax.switch`` on the traced ``hi - lo`` picks the
    shortest ladder size ``P >= hi - lo`` and runs the dense softmax over slots
    ``[start, start + P)`` (``start = 0`` without a window: a static prefix). The fill is
    traced and the sizes static, so one compiled function serves every fill of a static
    cache bucket (the ``generate`` while loop). Visible slots get exactly the dense math;
    a query with no visible slot gets a finite meaningless value, as in ``dense_attention``.
    """
    _check(q, k, v, valid, index, kv_layout)
    slot_ax, _ = _layout(kv_layout)
    t, s = q.shape[1], k.shape[slot_ax]
    q_slot = jnp.reshape(index, (-1,)).astype(jnp.int32)  # first query's slot, [B or 1]
    hi = jnp.minimum(jnp.max(q_slot) + t, s)
    lo = jnp.int32(0)
    if sliding_window is not None:
        lo = jnp.maximum(jnp.min(q_slot) - sliding_window + 1, 0)
    sizes = prefix_sizes(s, min_slots)

    def attend(p: int) -> Array:
        if sliding_window is None:  # a static prefix: no copy for the full bucket
            start = 0
            kp, vp = (jax.lax.slice_in_dim(a, 0, p, axis=slot_ax) for a in (k, v))
            vis = valid[:, :p]
        else:  # [start, start + p) covers [lo, hi): start <= lo and start + p >= hi
            start = jnp.minimum(lo, s - p)
            kp, vp = (jax.lax.dynamic_slice_in_dim(a, start, p, axis=slot_ax) for a in (k, v))
            vis = jax.lax.dynamic_slice_in_dim(valid, start, p, axis=1)
        mask = slot_mask(vis, index, t, sliding_window, first_slot=start)
        return dense_attention(q, kp, vp, mask, kv_layout=kv_layout)

    if len(sizes) == 1:
        return attend(s)
    branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), hi - lo)  # first size >= need
    return jax.lax.switch(branch, [lambda p=p: attend(p) for p in sizes])

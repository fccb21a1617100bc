"""Prototype: run the model's cached attention through ``cached_attention`` (work bounded to
the filled slots), optionally with a head-major cache, without touching the model file, to
measure and test it in place.

Temporary: once ``Attention.__call__`` calls ``lsw_jax.model.attention.cached_attention``
itself (and ``KVCache`` picks its layout), this module and its test go.
``bounded_attention()`` patches ``Attention.__call__`` (and, for ``kv_layout="bksd"``,
``KVCache.create``) for the duration of a ``with`` block and clears JAX's compile caches
on entry and exit (the jitted ``generate`` is cached on the graphdef, which the patch does
not change). Only ``generate``/``forward`` with the dense plan are covered (the serving
engine copies cache rows slot-major).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from lsw_jax.model import llama
from lsw_jax.model.attention import cached_attention
from lsw_jax.model.layers import apply_rope

_ORIGINAL_CALL = llama.Attention.__call__
_ORIGINAL_CREATE = llama.KVCache.__dict__["create"]  # the classmethod itself
_SETTINGS = {"min_slots": 128, "kv_layout": "bskd"}


def _write_head_major(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``llama.write_slots`` for a ``[B, KV, S, D]`` buffer (``new``: ``[B, T, KV, D]``)."""
    new = new.astype(buf.dtype).transpose(0, 2, 1, 3)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, new, (0, 0, index, 0))
    put = lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (0, i, 0))  # noqa: E731
    return jax.vmap(put)(buf, new, index)


def _bounded_call(self, x, cos, sin, mask, kv, index, routing, plan):
    """``Attention.__call__`` with the cache path through ``cached_attention``."""
    if kv is None:  # cache-free forward (training, scoring): the model's own dense path
        return _ORIGINAL_CALL(self, x, cos, sin, mask, kv, index, routing, plan)
    cfg = self.cfg
    if cfg.sliding_window is not None:
        raise NotImplementedError("the prototype splice reads valid slots off the causal mask")
    b, t, _ = x.shape
    q = self.q_proj(x, routing, plan).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x, routing, plan).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x, routing, plan).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    layout = _SETTINGS["kv_layout"]
    write = llama.write_slots if layout == "bskd" else _write_head_major
    k_cache, v_cache = write(kv[0], k, index), write(kv[1], v, index)
    # Without a window the last query sees exactly the valid slots (later ones are unwritten).
    valid = jnp.broadcast_to(mask[:, -1, :], (b, mask.shape[-1]))
    out = cached_attention(
        q, k_cache, v_cache, valid, index, kv_layout=layout, min_slots=_SETTINGS["min_slots"]
    )
    return self.o_proj(out.reshape(b, t, -1), routing, plan), (k_cache, v_cache)


def _create_head_major(cls, cfg, batch, length, dtype):
    cache = _ORIGINAL_CREATE.__func__(cls, cfg, batch, length, dtype)
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    cache.k = [jnp.zeros(shape, dtype) for _ in cache.k]
    cache.v = [jnp.zeros(shape, dtype) for _ in cache.v]
    return cache


@contextlib.contextmanager
def bounded_attention(min_slots: int = 128, kv_layout: str = "bskd") -> Iterator[None]:
    """Within the block, every cached attention of ``LlamaModel`` reads only the ladder
    prefix that holds the filled slots (``cached_attention``), with the cache in
    ``kv_layout`` (``bskd``: the model's own; ``bksd``: head-major)."""
    jax.clear_caches()
    _SETTINGS.update(min_slots=min_slots, kv_layout=kv_layout)
    llama.Attention.__call__ = _bounded_call
    if kv_layout == "bksd":
        llama.KVCache.create = classmethod(_create_head_major)
    try:
        yield
    finally:
        llama.Attention.__call__ = _ORIGINAL_CALL
        llama.KVCache.create = _ORIGINAL_CREATE
        jax.clear_caches()

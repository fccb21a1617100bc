"""Prototype: run the model's cached attention through ``cached_attention`` (work bounded to
the filled slots) without touching the model file, to measure and test it in place.

Temporary: once ``Attention.__call__`` calls ``lsw_jax.model.attention.cached_attention``
itself, this module and its test go. ``bounded_attention()`` patches the method for the
duration of a ``with`` block and clears JAX's compile caches on entry and exit (the jitted
``generate`` is cached on the graphdef, which the patch does not change).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from lsw_jax.model import llama
from lsw_jax.model.attention import cached_attention
from lsw_jax.model.layers import apply_rope


def _bounded_call(self, x, cos, sin, mask, kv, index, routing, plan):
    """``Attention.__call__`` with the cache path through ``cached_attention``."""
    if kv is None:  # cache-free forward (training, scoring): the model's own dense path
        return _ORIGINAL(self, x, cos, sin, mask, kv, index, routing, plan)
    cfg = self.cfg
    if cfg.sliding_window is not None:
        raise NotImplementedError("the prototype splice reads valid slots off the causal mask")
    b, t, _ = x.shape
    q = self.q_proj(x, routing, plan).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x, routing, plan).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x, routing, plan).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache, v_cache = llama.write_slots(kv[0], k, index), llama.write_slots(kv[1], v, index)
    # Without a window the last query sees exactly the valid slots (later ones are unwritten).
    valid = jnp.broadcast_to(mask[:, -1, :], (b, mask.shape[-1]))
    out = cached_attention(q, k_cache, v_cache, valid, index, chunk=_CHUNK[0]).reshape(b, t, -1)
    return self.o_proj(out, routing, plan), (k_cache, v_cache)


_ORIGINAL = llama.Attention.__call__
_CHUNK = [256]


@contextlib.contextmanager
def bounded_attention(chunk: int = 256) -> Iterator[None]:
    """Within the block, every cached attention of ``LlamaModel`` is bounded to the fill
    (read in chunks of ``chunk`` slots)."""
    jax.clear_caches()
    _CHUNK[0] = chunk
    llama.Attention.__call__ = _bounded_call
    try:
        yield
    finally:
        llama.Attention.__call__ = _ORIGINAL
        jax.clear_caches()

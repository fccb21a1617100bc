"""Prototype splices: the model with ``cached_attention`` (work bounded to the filled
cache slots, slot-major or head-major cache) and/or ``project`` (the weight-left linear
product), without touching the model file, to measure and test them in place.

Temporary: once the model calls ``lsw_jax.model.attention.cached_attention`` and
``lsw_jax.model.linear_ops.project`` itself, this module and its test go.

``spliced(model, ...)`` returns a copy of the model (``nnx.clone``: the weight arrays are
shared, not copied) whose attention / linear modules are instances of subclasses with the
spliced ``__call__``. Their classes are part of the graphdef, so the jitted ``generate``
compiles the copy separately from the original and both can be timed side by side. A
head-major cache must also be created head-major: inside ``head_major_kv_cache()``,
``KVCache.create`` does that (only while tracing matters). Covered: ``forward`` and
``generate`` with the dense plan (the serving engine copies cache rows slot-major).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsw_jax.model import layers, llama
from lsw_jax.model.attention import cached_attention
from lsw_jax.model.linear_ops import project

_ORIGINAL_CREATE = llama.KVCache.__dict__["create"]  # the classmethod itself


def write_head_major(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``llama.write_slots`` for a ``[B, KV, S, D]`` buffer (``new``: ``[B, T, KV, D]``)."""
    new = new.astype(buf.dtype).transpose(0, 2, 1, 3)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, new, (0, 0, index, 0))
    put = lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (0, i, 0))  # noqa: E731
    return jax.vmap(put)(buf, new, index)


def _bounded_call(self, x, cos, sin, mask, kv, index, routing, plan):
    """``Attention.__call__`` with the cache path through ``cached_attention``."""
    if kv is None:  # cache-free forward (training, scoring): the model's own dense path
        return llama.Attention.__call__(self, x, cos, sin, mask, kv, index, routing, plan)
    cfg = self.cfg
    if cfg.sliding_window is not None:
        raise NotImplementedError("the prototype splice reads valid slots off the causal mask")
    b, t, _ = x.shape
    q = self.q_proj(x, routing, plan).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x, routing, plan).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x, routing, plan).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    write = llama.write_slots if self.kv_layout == "bskd" else write_head_major
    k_cache, v_cache = write(kv[0], k, index), write(kv[1], v, index)
    # Without a window the last query sees exactly the valid slots (later ones are unwritten).
    valid = jnp.broadcast_to(mask[:, -1, :], (b, mask.shape[-1]))
    out = cached_attention(
        q, k_cache, v_cache, valid, index, kv_layout=self.kv_layout, min_slots=self.min_slots
    )
    return self.o_proj(out.reshape(b, t, -1), routing, plan), (k_cache, v_cache)


@functools.cache
def _bounded_attention_class(kv_layout: str, min_slots: int) -> type:
    return type(
        f"BoundedAttention_{kv_layout}_{min_slots}",
        (llama.Attention,),
        {"__call__": _bounded_call, "kv_layout": kv_layout, "min_slots": min_slots},
    )


class ProjectLinear(layers.Linear):
    """``Linear`` with its dense product through ``project``."""

    def __call__(self, x: Any, routing: Any = None, plan: str = "dense") -> Any:
        if self.lora is not None and routing is not None:  # adapters: the model's own path
            return super().__call__(x, routing, plan)
        y = project(x.astype(self.dtype), self.weight[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ProjectHeadModel(llama.LlamaModel):
    """``LlamaModel`` with the tied LM head through ``project``."""

    def logits(self, h: Any) -> Any:
        if self.lm_head is not None:
            return super().logits(h)
        w = self.embed_tokens[...].astype(h.dtype)
        return project(h, w, preferred_element_type=jnp.float32)


def spliced(
    model: llama.LlamaModel,
    *,
    kv_layout: str | None = None,
    min_slots: int = 128,
    use_project: bool = False,
) -> llama.LlamaModel:
    """A copy of ``model`` sharing its weights, with ``cached_attention`` over a
    ``kv_layout`` cache (``None``: the model's own attention) and/or ``project``."""
    copy = nnx.clone(model)
    for layer in copy.layers:
        if kv_layout is not None:
            layer.self_attn.__class__ = _bounded_attention_class(kv_layout, min_slots)
        if use_project:
            for mod in (layer.self_attn, layer.mlp):
                for name in (
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ):
                    lin = getattr(mod, name, None)
                    if lin is not None:
                        lin.__class__ = ProjectLinear
    if use_project:
        copy.__class__ = ProjectHeadModel
        if copy.lm_head is not None:
            copy.lm_head.__class__ = ProjectLinear
    return copy


def _create_head_major(cls, cfg, batch, length, dtype):
    cache = _ORIGINAL_CREATE.__func__(cls, cfg, batch, length, dtype)
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    cache.k = [jnp.zeros(shape, dtype) for _ in cache.k]
    cache.v = [jnp.zeros(shape, dtype) for _ in cache.v]
    return cache


@contextlib.contextmanager
def head_major_kv_cache() -> Iterator[None]:
    """Within the block, ``KVCache.create`` makes ``[B, KV, S, D]`` buffers (trace the
    head-major splice's ``generate`` inside it)."""
    llama.KVCache.create = classmethod(_create_head_major)
    try:
        yield
    finally:
        llama.KVCache.create = _ORIGINAL_CREATE

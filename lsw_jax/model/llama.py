"""Llama/Mistral decoder in Flax NNX with a KV cache.

One definition serves the full forward (training, scoring), prefill and decode:
``forward(input_ids, positions, token_mask, cache)`` writes the new keys/values into the
cache (when given) at slot ``cache.index`` and attends over every valid slot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsw_jax.adapters.lora import Routing, RowRouter, causal_mean
from lsw_jax.config import ModelConfig
from lsw_jax.linears import RowLayout
from lsw_jax.model.attention import cached_attention, dense_attention, slot_mask
from lsw_jax.model.layers import (
    MLP,
    Linear,
    RMSNorm,
    apply_rope,
    default_dtype,
    float_dtype,
    fused_linear,
    rope_cos_sin,
)
from lsw_jax.plans import Plan, adapted_linears, as_plan
from pallas_kernels.project import project

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer key/value buffers and which slots hold real tokens.

    k, v: one head-major ``[B, kv_heads, S, head_dim]`` array per layer (kept per layer
    rather than stacked: re-stacking every step cost ~3 ms/token on CPU; head-major, so each
    head's keys are one contiguous ``[S, D]`` matrix: decode attention ran 2-3x faster than
    slot-major on CPU, see ``lsw_jax.model.attention``).
    valid: ``[B, S]`` bool, slot s of row b holds a (non-padding) token.
    index: the next slot to write: ``[]`` int32 when all rows advance together (left-padded
        batches, ``generate``), or ``[B]`` int32 when every row has its own position in its
        own slot (continuous batching in the serving engine).
    router_state: ``(sum [B, D], count [B])`` float32 of the router inputs so far, for an
        adapter whose router reads the document so far (``router_context="prefix_mean"``);
        None otherwise.
    """

    k: list[Array]
    v: list[Array]
    valid: Array
    index: Array
    router_state: tuple[Array, Array] | None = None

    @classmethod
    def create(
        cls, cfg: ModelConfig, batch: int, length: int, dtype: Any, router_state: bool = False
    ) -> KVCache:
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        state = None
        if router_state:
            state = (jnp.zeros((batch, cfg.hidden_size), jnp.float32), jnp.zeros((batch,)))
        return cls(
            k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
            router_state=state,
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]


@dataclasses.dataclass
class ModelOutput:
    logits: Array  # [B, T, V] float32
    cache: KVCache | None
    routing: Any = None  # adapters.Routing (switch/lora) or a list per layer (mola)
    hidden: Array | None = None  # final normed hidden states [B, T, D]


def write_slots(buf: Array, new: Array, index: Array) -> Array:
    """Write ``new [B, T, ...]`` at slots ``index .. index+T-1`` of ``buf`` (``index``
    shared ``[]`` or per row ``[B]``; slots past the buffer are dropped): ``buf`` is
    ``[B, S]`` (the valid mask) or a head-major cache buffer ``[B, KV, S, D]`` (``new``
    ``[B, T, KV, D]``)."""
    new = new.astype(buf.dtype)
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    cols = jnp.reshape(index, (-1, 1)) + jnp.arange(t)[None, :]  # [B or 1, T]
    if buf.ndim == 2:
        return buf.at[rows, cols].set(new, mode="drop")
    # advanced indices around a slice: the update's dims are [B, T, KV, D] = new's
    return buf.at[rows, :, cols].set(new, mode="drop")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_proj = fused_linear(cfg, "qkv_proj", **kw)
        self.o_proj = fused_linear(cfg, "o_proj", **kw)
        # Cached attention reads the shortest prefix of min_slots * 2^i slots holding every
        # visible slot (LlamaModel.configure; a value >= the cache bucket reads all of it).
        self.min_slots = 128

    def __call__(
        self,
        x: Array,  # [B, T, D]
        cos: Array,
        sin: Array,
        mask: Array,  # cache-free: [B, T, T] bool; with a cache: valid slots [B, S]
        kv: tuple[Array, Array] | None,  # head-major cache buffers [B, KV, S, D]
        index: Array,
        routing: Any,
        plan: Plan,
        weights: dict[str, Any] | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.cfg
        w = weights or {}
        b, t, _ = x.shape
        kvh, groups, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        # The fused rows are grouped per KV head: its g query heads, its key, its value.
        qkv = self.qkv_proj(x, routing, plan, w.get("qkv_proj")).reshape(b, t, kvh, groups + 2, hd)
        q = apply_rope(qkv[:, :, :, :groups], cos, sin)  # [B, T, KV, G, D]
        k = apply_rope(qkv[:, :, :, groups], cos, sin)  # [B, T, KV, D]
        v = qkv[:, :, :, groups + 1]
        q = q.reshape(b, t, kvh * groups, hd)  # head h = kv * G + g, as HF's repeat_kv
        if kv is None:
            out = dense_attention(q, k, v, mask)
        else:  # work bounded to the filled slots (a ladder of cache prefixes)
            kv = (write_slots(kv[0], k, index), write_slots(kv[1], v, index))
            out = cached_attention(
                q,
                kv[0],
                kv[1],
                mask,
                index,
                sliding_window=cfg.sliding_window,
                kv_layout="bksd",
                min_slots=self.min_slots,
            )
        return self.o_proj(out.reshape(b, t, -1), routing, plan, w.get("o_proj")), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        self.input_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.router = nnx.data(None)  # a per-layer adapters.Router for MoLA-style routing

    def __call__(
        self, x, cos, sin, mask, kv, index, routing, plan, weights=None, row_router=None, idx=0
    ):
        normed = self.input_layernorm(x)
        if self.router is not None:  # MoLA: this layer routes on its own normalised input
            routing = self.router(normed)
        elif row_router is not None:  # pooled adapters: MoLA rows route here, per row
            routing = row_router.layer(idx, normed, routing)
        attn, kv = self.self_attn(normed, cos, sin, mask, kv, index, routing, plan, weights)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), routing, plan, weights)
        return x, kv, routing


class LlamaModel(nnx.Module):
    """Decoder-only Llama/Mistral; parameter names mirror Hugging Face's."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: Any = None,
        param_dtype: Any = None,
        rngs: nnx.Rngs | None,
    ):
        dtype = float_dtype(dtype) or default_dtype()
        param_dtype = float_dtype(param_dtype) or dtype
        self.cfg = cfg
        self.dtype = dtype
        init = jnp.zeros((cfg.vocab_size, cfg.hidden_size), param_dtype)
        if rngs is not None:
            init = (0.02 * jax.random.normal(rngs.params(), init.shape)).astype(param_dtype)
        self.embed_tokens = nnx.Param(init, logical_axes=("vocab", "embed"))
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(
                cfg.hidden_size,
                RowLayout(1, (cfg.vocab_size,)),
                ("lm_head",),
                axes=("vocab", "embed"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )
        self.remat = False  # set by training to rematerialise each decoder layer
        self.weight_left: bool | None = None  # the tied head's product order (configure)
        # A LoRA-Switch adapters.Router (pre-gated, shared by all layers), when attached.
        self.router = nnx.data(None)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids: Array, attention_mask: Array | None = None, **kw) -> Array:
        """Logits ``[B, T, V]`` (float32) of a full forward without a cache."""
        return self.forward(input_ids, attention_mask=attention_mask, **kw).logits

    def forward(
        self,
        input_ids: Array,  # [B, T] int
        *,
        attention_mask: Array | None = None,  # [B, T]: 1 real token, 0 padding
        positions: Array | None = None,  # [B, T] int; default from the mask
        segment_ids: Array | None = None,  # [B, T] packed documents: attend within a segment
        cache: KVCache | None = None,
        routing: Any = None,  # adapters.Routing; computed by the router when None
        plan: Plan | str = Plan.DENSE,
        plan_weights: Any = None,  # per layer {fused linear: prepared weights} (lsw_jax.plans)
        return_hidden: bool = False,
        logits_at: Array | None = None,  # [B] int: the head at this position of T only
    ) -> ModelOutput:
        """Logits ``[B, T, V]``, or ``[B, 1, V]`` at ``logits_at`` (a prefill that samples
        one token needs one row of the vocabulary-sized head, not T)."""
        plan = as_plan(plan)
        b, t = input_ids.shape
        token_mask = (
            jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        )
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(token_mask, axis=1) - 1, 0)
        x = self.embed(input_ids)
        row_router = routing if isinstance(routing, RowRouter) else None
        # The running router mean a cache carries: updated below where a router reads it,
        # passed through unchanged otherwise (a cache keeps one structure step to step).
        router_state = None if cache is None else cache.router_state
        if row_router is not None:  # every row its own pooled adapter (serving engine)
            h0 = self.layers[0].input_layernorm(x)
            h0_prefix = None
            if cache is not None and cache.router_state is not None:
                h0_prefix, router_state = causal_mean(
                    h0.astype(jnp.float32), token_mask, None, cache.router_state
                )
            routing = row_router.pre_gate(h0, h0_prefix)
        if (
            row_router is None
            and self.router is not None
            and (routing is None or self.reads_prefix)
        ):
            h0 = self.layers[0].input_layernorm(x)
            if self.reads_prefix:
                start = None if cache is None else self._router_state(cache)
                h0, router_state = causal_mean(
                    h0.astype(jnp.float32), token_mask, segment_ids, start
                )
                routing = self.router.route_features(h0) if routing is None else routing
            else:
                routing = self.router(h0)

        if cache is None:
            index = jnp.zeros((), jnp.int32)
            valid = token_mask
            mask = slot_mask(valid, index, t, self.cfg.sliding_window)  # [B, T, T]
            if segment_ids is not None:
                mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) need a cache-free forward")
            index = cache.index
            valid = write_slots(cache.valid, token_mask, index)
            mask = valid  # the attention reads the slots it needs (cached_attention)
        cos, sin = rope_cos_sin(self.cfg, positions, cache.length if cache is not None else t)

        def call_layer(layer, x, kv, routing, weights, idx):
            return layer(x, cos, sin, mask, kv, index, routing, plan, weights, row_router, idx)

        if self.remat:  # training: recompute each layer's activations in the backward pass
            call_layer = nnx.remat(call_layer, static_argnums=(5,))
        new_k, new_v, layer_routings = [], [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            weights = None if plan_weights is None else plan_weights[i]
            x, kv, used = call_layer(layer, x, kv, routing, weights, i)
            layer_routings.append(used)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_k, new_v, valid, index + t, router_state)
        h = self.norm(x)
        head_in = h if logits_at is None else jnp.take_along_axis(h, logits_at[:, None, None], 1)
        logits = self.logits(head_in)
        # MoLA routes per layer: report every layer's routing; otherwise the shared one.
        per_layer = row_router is not None or any(layer.router is not None for layer in self.layers)
        out_routing = layer_routings if per_layer else routing
        return ModelOutput(logits, new_cache, out_routing, h if return_hidden else None)

    def configure(
        self, *, attention_min_slots: int | None = None, weight_left: Any = "keep"
    ) -> LlamaModel:
        """Execution settings (static: a change compiles new programs), in place.

        attention_min_slots: the smallest cache prefix cached attention reads (default 128;
        larger than the cache bucket = whole-bucket attention). weight_left: the linear
        products' operand order (``pallas_kernels.project``; None = measured choice per
        backend and row count, True / False to force).
        """
        for layer in self.layers:
            if attention_min_slots is not None:
                layer.self_attn.min_slots = int(attention_min_slots)
            if weight_left != "keep":
                for lin in (*adapted_linears(layer).values(),):
                    lin.weight_left = weight_left
        if weight_left != "keep":
            self.weight_left = weight_left
            if self.lm_head is not None:
                self.lm_head.weight_left = weight_left
        return self

    def embed(self, input_ids: Array) -> Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    @property
    def reads_prefix(self) -> bool:
        """The attached router reads the document so far (``router_context="prefix_mean"``)."""
        return getattr(self.router, "context", "token") == "prefix_mean"

    def _router_state(self, cache: KVCache) -> tuple[Array, Array]:
        if cache.router_state is None:
            raise ValueError(
                "the adapter's router reads the document so far (router_context="
                "'prefix_mean'), but this KV cache carries no router state: create it with "
                "KVCache.create(..., router_state=True)"
            )
        return cache.router_state

    def route(self, input_ids: Array, cache: KVCache | None = None) -> Routing:
        """The pre-gated routing of tokens [B, T]: LoRA-Switch's router reads the first
        layer's normalised input, once per token, before any layer runs. A router that
        reads the document so far continues from ``cache``'s router state (the tokens'
        real-token mask is taken as all ones)."""
        if self.router is None:
            raise ValueError("the model has no pre-gated router (no switch/lora adapter)")
        h0 = self.layers[0].input_layernorm(self.embed(input_ids))
        if not self.reads_prefix:
            return self.router(h0)
        start = None if cache is None else self._router_state(cache)
        h0, _ = causal_mean(h0.astype(jnp.float32), None, None, start)
        return self.router.route_features(h0)

    def logits(self, h: Array) -> Array:
        if self.lm_head is None:  # tied: the embedding is the [vocab, hidden] head
            w = self.embed_tokens[...].astype(h.dtype)
            return project(h, w, weight_left=self.weight_left, preferred_element_type=jnp.float32)
        return self.lm_head(h).astype(jnp.float32)


def init_model(
    cfg: ModelConfig, *, seed: int = 0, dtype: Any = None, param_dtype: Any = None
) -> LlamaModel:
    """A randomly initialised model (tests, benchmarks)."""
    return LlamaModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

"""Building blocks of the decoder: linear (with an optional LoRA bank), RMSNorm, RoPE, MLP."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsw_jax.config import ModelConfig, rope_inv_freq
from lsw_jax.linears import FUSED_BY_NAME, RowLayout
from lsw_jax.plans import Plan, unmerged_linear
from pallas_kernels.project import project

Array = jax.Array


FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what weights and compute may be cast to


def float_dtype(dtype: Any) -> jnp.dtype | None:
    """``dtype`` (a name or a dtype; None stays None) once it is one of ``FLOAT_DTYPES``;
    a ValueError otherwise (an int8 cast is not quantization: it would zero the weights)."""
    if dtype is None:
        return None
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(FLOAT_DTYPES)}")
    return d


def default_dtype() -> jnp.dtype:
    """bf16 on accelerators, fp32 on CPU (XLA's CPU dot is ~16x slower on bf16)."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def _normal(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> Array:
    if rngs is None:  # abstract construction (eval_shape) or weights loaded right after
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y[..., o] = sum_i x[..., i] * weight[o, i] + bias[o]`` plus the LoRA deltas of its
    parts, for one fused linear of ``lsw_jax.linears.FUSED`` (``qkv_proj`` holds q|k|v).

    The weight keeps Hugging Face's ``[out, in]`` layout (XLA's CPU matrix-vector product on
    it ran decode 2x faster than ``[in, out]``), its rows interleaving the parts as
    ``layout`` says. ``lora`` maps a part name to its ``LoraBank`` (only adapted parts).
    """

    def __init__(
        self,
        in_features: int,
        layout: RowLayout,
        parts: tuple[str, ...],
        *,
        axes: tuple[str, str],
        use_bias: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.in_features = in_features
        self.out_features = layout.out
        self.layout = layout
        self.parts = parts
        self.dtype = dtype
        self.weight = nnx.Param(
            _normal(rngs, (layout.out, in_features), param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((layout.out,), param_dtype), logical_axes=(axes[0],))
            if use_bias
            else None
        )
        self.lora = nnx.data(None)  # nnx.Dict: part name -> adapters.LoraBank
        self.weight_left: bool | None = None  # product order (pallas_kernels.project)

    def __call__(
        self, x: Array, routing: Any = None, plan: Plan = Plan.DENSE, weights: Any = None
    ) -> Array:
        """x [..., in] -> [..., out]. ``weights`` are the plan's prepared weights for this
        linear (``lsw_jax.plans``): a ``FusedBank`` (unmerged) or ``W_eff`` (merged)."""
        x = x.astype(self.dtype)
        bias = None if self.bias is None else self.bias[...].astype(self.dtype)
        if plan is Plan.MERGED:  # W_eff already holds the experts (None: nothing merged)
            w = self.weight[...] if weights is None else weights
            return _dense(x, w.astype(self.dtype), bias, self.weight_left)
        w = self.weight[...].astype(self.dtype)
        if self.lora is None or routing is None:
            return _dense(x, w, bias, self.weight_left)
        if plan is Plan.UNMERGED:
            return unmerged_linear(x, w, bias, weights, routing)
        if plan is Plan.DENSE:
            y = _dense(x, w, bias, self.weight_left)
            return y + self.delta(x, routing).astype(self.dtype)
        raise ValueError(f"unknown {plan=}")

    def delta(self, x: Array, routing: Any) -> Array:
        """The parts' LoRA deltas [..., out] in the fused row layout (zeros where a part
        has no adapter)."""
        deltas = [
            self.lora[name].delta(x, routing)
            if name in self.lora
            else jnp.zeros(x.shape[:-1] + (self.layout.part_out(i),), x.dtype)
            for i, name in enumerate(self.parts)
        ]
        return self.layout.pack(deltas, axis=-1)


def _dense(x: Array, w: Array, bias: Array | None, weight_left: bool | None) -> Array:
    y = project(x, w, weight_left=weight_left)
    return y if bias is None else y + bias


class RMSNorm(nnx.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32 like HF."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * normed


def rope_cos_sin(cfg: ModelConfig, positions: Array, cache_len: int | None = None):
    """cos, sin of shape [B, T, head_dim] for integer ``positions [B, T]`` (HF layout:
    the half-dim frequencies repeated twice)."""
    inv, _ = rope_inv_freq(cfg, cache_len)
    inv = jnp.asarray(inv, jnp.float32)  # HF computes the angles in fp32
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads..., D] (any number of head axes); rotate-half convention of HF Llama."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    extra = (slice(None), slice(None)) + (None,) * (x.ndim - 3)
    cos = cos[extra].astype(x.dtype)
    sin = sin[extra].astype(x.dtype)
    return x * cos + rot * sin


def fused_linear(
    cfg: ModelConfig, name: str, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None
) -> Linear:
    """The fused linear ``name`` of ``lsw_jax.linears.FUSED`` for this config."""
    spec = FUSED_BY_NAME[name]
    bias = cfg.attention_bias if spec.module == "self_attn" else cfg.mlp_bias
    return Linear(
        spec.in_features(cfg),
        spec.layout(cfg),
        spec.parts,
        axes=(spec.out_axis, spec.in_axis),
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate|up in one fused product."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_up_proj = fused_linear(cfg, "gate_up_proj", **kw)
        self.down_proj = fused_linear(cfg, "down_proj", **kw)

    def __call__(
        self, x: Array, routing: Any = None, plan: Plan = Plan.DENSE, weights: Any = None
    ) -> Array:
        w = weights or {}
        gu = self.gate_up_proj(x, routing, plan, w.get("gate_up_proj"))
        gu = gu.reshape(gu.shape[:-1] + (-1, 2))  # rows interleave gate and up
        h = jax.nn.silu(gu[..., 0]) * gu[..., 1]
        return self.down_proj(h, routing, plan, w.get("down_proj"))

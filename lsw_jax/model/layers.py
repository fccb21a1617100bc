"""Building blocks of the decoder: linear (with an optional LoRA bank), RMSNorm, RoPE, MLP."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsw_jax.config import ModelConfig, rope_inv_freq

Array = jax.Array


def default_dtype() -> jnp.dtype:
    """bf16 on accelerators, fp32 on CPU (XLA's CPU dot is ~16x slower on bf16)."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def _normal(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> Array:
    if rngs is None:  # abstract construction (eval_shape) or weights loaded right after
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y[..., o] = sum_i x[..., i] * weight[o, i] + bias[o]`` (+ the LoRA delta when a bank
    is attached and routing is given).

    The weight keeps Hugging Face's ``[out, in]`` layout: XLA's CPU matrix-vector product
    on that layout ran decode 2x faster than ``[in, out]`` here, and it makes conversion
    a copy.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.weight = nnx.Param(
            _normal(rngs, (out_features, in_features), param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[0],))
            if use_bias
            else None
        )
        self.lora = nnx.data(None)  # an adapters.LoraBank, attached by adapters.attach_adapter

    def __call__(self, x: Array, routing: Any = None, plan: str = "dense") -> Array:
        """plan: ``dense`` (differentiable jnp), ``unmerged`` (fused base + LoRA kernel),
        ``merged`` (the weight already holds the experts' delta: skip LoRA)."""
        x = x.astype(self.dtype)
        w = self.weight[...].astype(self.dtype)
        bias = None if self.bias is None else self.bias[...].astype(self.dtype)
        adapted = self.lora is not None and routing is not None
        if adapted and plan == "unmerged":
            return self.lora.unmerged(x, w, bias, routing)
        y = jnp.einsum("...i,oi->...o", x, w)
        if bias is not None:
            y = y + bias
        if adapted and plan == "dense":
            y = y + self.lora.delta(x, routing).astype(y.dtype)
        return y


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
    """x [B, T, H, D]; rotate-half convention of HF Llama."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, axes=("mlp", "embed"), **kw)
        self.up_proj = Linear(d, f, axes=("mlp", "embed"), **kw)
        self.down_proj = Linear(f, d, axes=("embed", "mlp"), **kw)

    def __call__(self, x: Array, routing: Any = None, plan: str = "dense") -> Array:
        g = self.gate_proj(x, routing, plan)
        u = self.up_proj(x, routing, plan)
        return self.down_proj(jax.nn.silu(g) * u, routing, plan)

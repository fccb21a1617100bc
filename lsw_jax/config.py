"""Model configuration: one frozen dataclass read from HF ``config.json`` or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lsw_jax.linears import ALL_TARGETS

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, the fields of HF's ``rope_scaling`` / ``rope_parameters``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama/Mistral decoder's shape and numerics."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {self.rope_scaling.rope_type!r}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Build from an HF ``config.json`` dict (transformers 4 and 5 spellings)."""
        arch_names = hf.get("architectures") or []
        model_type = hf.get("model_type")
        arch = None
        for name in arch_names:
            arch = SUPPORTED_ARCHITECTURES.get(name)
            if arch:
                break
        if arch is None and model_type in ("llama", "mistral"):
            arch = model_type
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {arch_names or model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r}")
            return hf[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = hf.get("head_dim") or hidden // num_heads
        rope_theta, rope_scaling = _read_rope(hf, source)
        window = hf.get("sliding_window") if arch == "mistral" else None
        if arch == "mistral" and hf.get("use_sliding_window") is False:
            window = None
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos)
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read model config: {e}") from e
        if "lsw_jax_config" in data:
            return cls.from_dict(data["lsw_jax_config"])
        return cls.from_hf_config(data, source=str(path))

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A test-sized Llama: 2 layers, GQA 4/2 heads, hidden 64."""
        base = dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=256,
        )
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


def _read_rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """Read rope theta and scaling from transformers 4 (``rope_theta``/``rope_scaling``)
    or transformers 5 (``rope_parameters``) spellings."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = params if scaling is None else scaling
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, RopeScaling()
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: unsupported rope type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0) or 1.0),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings", 8192)
        ),
    )


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[Any, float]:
    """Inverse frequencies [head_dim/2] (numpy float64) and attention scaling for RoPE.

    ``dynamic`` NTK scaling depends on the sequence length; we fix it at
    ``seq_len`` (the compiled cache length) when that exceeds the original context.
    """
    import numpy as np

    dim = cfg.head_dim
    base = cfg.rope_theta
    rs = cfg.rope_scaling
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "dynamic":
        max_pos = cfg.max_position_embeddings
        if seq_len is not None and seq_len > max_pos:
            base = base * ((rs.factor * seq_len / max_pos) - (rs.factor - 1)) ** (dim / (dim - 2))
            inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wl = old / rs.low_freq_factor
        high_wl = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(is_medium, smoothed, scaled)
    return inv, 1.0


ADAPTER_KINDS = ("switch", "mola", "lora")
_TARGET_ALIASES = {name.split("_")[0]: name for name in ALL_TARGETS}


def normalize_targets(targets: Any) -> tuple[str, ...]:
    """``("q", "v_proj", ...)`` -> canonical module names; unknown names raise."""
    if isinstance(targets, str):
        targets = ALL_TARGETS if targets in ("all", "all-linear") else (targets,)
    out = []
    for t in targets:
        name = _TARGET_ALIASES.get(t, t)
        if name not in ALL_TARGETS:
            raise ValueError(
                f"unknown target module {t!r}; expected some of {', '.join(ALL_TARGETS)} "
                f"(or their short names {', '.join(_TARGET_ALIASES)})"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("targets must name at least one module")
    return tuple(sorted(out, key=ALL_TARGETS.index))


# What a LoRA-Switch router reads: the token alone, or the document so far (mean).
ROUTER_CONTEXTS = ("token", "prefix_mean")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """A LoRA expert bank and how tokens are routed to it.

    kind: ``switch`` (LoRA-Switch: one pre-gated router, the same top-k experts in every
    layer), ``mola`` (a router per decoder layer), ``lora`` (one plain LoRA; num_experts and
    top_k are 1). Scaling is ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
    Routers: weights start as N(0, ``router_init_std``^2); gates are the softmax of
    ``logits / router_temperature``; ``router_normalize_input`` rescales each token's
    router input to unit RMS first (scale-free logits: a layer whose norm weights are small,
    like SmolLM2's layer 0, otherwise gets a router with tiny logits that barely learns);
    training adds ``aux_loss_coef`` times the Switch load-balancing loss and
    ``router_z_loss_coef`` times the ST-MoE z-loss. ``router_context`` (switch only):
    ``token`` routes each token on its own layer-0 input (LoRA-Switch); ``prefix_mean`` on
    the mean of that input over the document so far, which the router still knows before
    any layer runs (the KV caches of ``generate`` and of the serving engine carry the
    running mean from step to step).
    """

    kind: str = "switch"
    num_experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    targets: tuple[str, ...] = ALL_TARGETS
    dropout: float = 0.0
    aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    use_rslora: bool = False
    router_init_std: float = 0.02
    router_temperature: float = 1.0
    router_normalize_input: bool = False
    router_context: str = "token"

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {ADAPTER_KINDS}")
        if self.kind == "lora":
            object.__setattr__(self, "num_experts", 1)
            object.__setattr__(self, "top_k", 1)
        object.__setattr__(self, "targets", normalize_targets(self.targets))
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("aux_loss_coef", "router_z_loss_coef", "router_init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.router_temperature <= 0:
            raise ValueError(f"router_temperature={self.router_temperature} must be > 0")
        if self.router_context not in ROUTER_CONTEXTS:
            raise ValueError(
                f"router_context={self.router_context!r} must be one of {ROUTER_CONTEXTS}"
            )
        if self.router_context != "token" and self.kind != "switch":
            raise ValueError(
                f"router_context={self.router_context!r} is for kind='switch' (got {self.kind!r})"
            )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter config fields {unknown}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)

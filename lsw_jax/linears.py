"""The one table of the decoder's linears: what each is called everywhere, and how the
model stores them fused.

Seven *adaptable linears* per layer, named as in Hugging Face / PEFT (``q_proj`` ...
``down_proj``). The model stores them as four *fused linears* per layer:

    self_attn.qkv_proj      q_proj | k_proj | v_proj   rows grouped per KV head
    self_attn.o_proj        o_proj
    mlp.gate_up_proj        gate_proj | up_proj        rows interleaved
    mlp.down_proj           down_proj

so a decode step runs four products per layer instead of seven. Rows are grouped by a
*unit* (a KV head for q|k|v: its ``g`` query heads, then its key head, then its value head;
one intermediate feature for gate|up), so a fused weight split into contiguous shards on
its unit axis gives every shard whole units: tensor parallelism shards it like the parts.
The q|k|v product reshaped to ``[..., kv_heads, g + 2, head_dim]`` yields q already in the
grouped ``[..., kv_heads, g, head_dim]`` layout attention uses.

Adapters stay per part (a bank for ``q_proj``, one for ``k_proj`` ...): PEFT and the
stored-adapter format see the seven linears; the fused linear adds each part's delta into
its rows. Checkpoints keep Hugging Face's per-part tensors (``iter_checkpoint_tensors`` /
``set_checkpoint_tensors`` convert), so converters and the checkpoint format are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # config imports this table (adapter targets): no runtime import back
    from lsw_jax.config import ModelConfig

StatePath = tuple  # e.g. ("layers", 3, "self_attn", "q_proj", "weight")


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """One adaptable linear (a part of a fused linear)."""

    name: str  # HF / PEFT module name and adapter target: "q_proj"
    module: str  # parent module in HF and in our model: "self_attn" | "mlp"
    fused: str  # the model's fused linear holding its rows: "qkv_proj"
    axes: tuple[str, str]  # logical axes of its [out, in] weight (and of its LoRA bank)
    gguf: str  # llama.cpp tensor name stem: "attn_q"

    def shape(self, cfg: ModelConfig) -> tuple[int, int]:
        """[out, in] of the part's weight."""
        d, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return {
            "q_proj": (q, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "o_proj": (d, q),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }[self.name]

    def has_bias(self, cfg: ModelConfig) -> bool:
        # Llama's attention_bias covers q/k/v/o; Qwen-style q/k/v-only is not Llama.
        return cfg.attention_bias if self.module == "self_attn" else cfg.mlp_bias

    def hf_key(self, layer: int, leaf: str = "weight") -> str:
        return f"model.layers.{layer}.{self.module}.{self.name}.{leaf}"

    def peft_module(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.module}.{self.name}"


LINEARS: tuple[LinearSpec, ...] = (
    LinearSpec("q_proj", "self_attn", "qkv_proj", ("heads", "embed"), "attn_q"),
    LinearSpec("k_proj", "self_attn", "qkv_proj", ("kv_heads", "embed"), "attn_k"),
    LinearSpec("v_proj", "self_attn", "qkv_proj", ("kv_heads", "embed"), "attn_v"),
    LinearSpec("o_proj", "self_attn", "o_proj", ("embed", "heads"), "attn_output"),
    LinearSpec("gate_proj", "mlp", "gate_up_proj", ("mlp", "embed"), "ffn_gate"),
    LinearSpec("up_proj", "mlp", "gate_up_proj", ("mlp", "embed"), "ffn_up"),
    LinearSpec("down_proj", "mlp", "down_proj", ("embed", "mlp"), "ffn_down"),
)
LINEAR_BY_NAME: dict[str, LinearSpec] = {s.name: s for s in LINEARS}
ALL_TARGETS: tuple[str, ...] = tuple(s.name for s in LINEARS)


@dataclasses.dataclass(frozen=True)
class FusedSpec:
    """One fused linear of a layer and how its rows interleave its parts."""

    name: str  # "qkv_proj"
    module: str  # "self_attn"
    parts: tuple[str, ...]  # ("q_proj", "k_proj", "v_proj")
    out_axis: str  # logical axis of its out dimension (the unit's axis)
    in_axis: str

    def layout(self, cfg: ModelConfig) -> RowLayout:
        hd = cfg.head_dim
        if self.name == "qkv_proj":
            g = cfg.num_heads // cfg.num_kv_heads
            return RowLayout(cfg.num_kv_heads, (g * hd, hd, hd))
        if self.name == "gate_up_proj":
            return RowLayout(cfg.intermediate_size, (1, 1))
        out = LINEAR_BY_NAME[self.parts[0]].shape(cfg)[0]
        return RowLayout(1, (out,))

    def in_features(self, cfg: ModelConfig) -> int:
        return LINEAR_BY_NAME[self.parts[0]].shape(cfg)[1]


FUSED: tuple[FusedSpec, ...] = (
    FusedSpec("qkv_proj", "self_attn", ("q_proj", "k_proj", "v_proj"), "kv_heads", "embed"),
    FusedSpec("o_proj", "self_attn", ("o_proj",), "embed", "heads"),
    FusedSpec("gate_up_proj", "mlp", ("gate_proj", "up_proj"), "mlp", "embed"),
    FusedSpec("down_proj", "mlp", ("down_proj",), "embed", "mlp"),
)
FUSED_BY_NAME: dict[str, FusedSpec] = {f.name: f for f in FUSED}


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Fused rows = ``units`` blocks, each holding ``widths[p]`` consecutive rows of part p.

    Part p's row ``u * widths[p] + j`` is fused row ``u * sum(widths) + offset[p] + j``.
    """

    units: int
    widths: tuple[int, ...]

    @property
    def out(self) -> int:
        return self.units * sum(self.widths)

    def part_out(self, p: int) -> int:
        return self.units * self.widths[p]

    def pack(self, parts: list[Any], axis: int = 0) -> Any:
        """Fuse the parts' arrays along ``axis`` (their out axis); numpy or jax arrays."""
        xp = np if all(isinstance(a, np.ndarray) for a in parts) else jnp
        ax = axis % parts[0].ndim
        blocks = [
            a.reshape(a.shape[:ax] + (self.units, w) + a.shape[ax + 1 :])
            for a, w in zip(parts, self.widths, strict=True)
        ]
        fused = xp.concatenate(blocks, axis=ax + 1)
        return fused.reshape(fused.shape[:ax] + (self.out,) + fused.shape[ax + 2 :])

    def unpack(self, fused: Any, axis: int = 0) -> list[Any]:
        """The parts' arrays of a fused array (inverse of ``pack``)."""
        ax = axis % fused.ndim
        grouped = fused.reshape(
            fused.shape[:ax] + (self.units, sum(self.widths)) + fused.shape[ax + 1 :]
        )
        out, start = [], 0
        for w in self.widths:
            block = grouped[(slice(None),) * (ax + 1) + (slice(start, start + w),)]
            out.append(block.reshape(block.shape[:ax] + (self.units * w,) + block.shape[ax + 2 :]))
            start += w
        return out


def fused_of(part: str) -> FusedSpec:
    return FUSED_BY_NAME[LINEAR_BY_NAME[part].fused]


def part_index(part: str) -> int:
    return fused_of(part).parts.index(part)


# ---------------------------------------------------------------------- checkpoint tensors


def checkpoint_table(cfg: ModelConfig) -> dict[str, tuple[StatePath, tuple[int, ...]]]:
    """Every HF tensor name of the model -> (checkpoint path, shape).

    Checkpoint paths are the per-part ones (``("layers", i, "self_attn", "q_proj",
    "weight")``): converters write them and checkpoints store them; the in-memory model
    holds the fused form (``set_checkpoint_tensors``).
    """
    d, v = cfg.hidden_size, cfg.vocab_size
    table: dict[str, tuple[StatePath, tuple[int, ...]]] = {
        "model.embed_tokens.weight": (("embed_tokens",), (v, d)),
        "model.norm.weight": (("norm", "weight"), (d,)),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = (("lm_head", "weight"), (v, d))
    for i in range(cfg.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[f"model.layers.{i}.{norm}.weight"] = (("layers", i, norm, "weight"), (d,))
        for spec in LINEARS:
            path = ("layers", i, spec.module, spec.name)
            shape = spec.shape(cfg)
            table[spec.hf_key(i)] = (path + ("weight",), shape)
            if spec.has_bias(cfg):
                table[spec.hf_key(i, "bias")] = (path + ("bias",), (shape[0],))
    return table


def checkpoint_axes(path: StatePath) -> tuple[str | None, ...] | None:
    """Logical axes of a per-part checkpoint tensor (None: not a linear's tensor)."""
    if path[0] != "layers" or path[3] not in LINEAR_BY_NAME:
        return None
    axes = LINEAR_BY_NAME[path[3]].axes
    return axes if path[-1] == "weight" else axes[:1]


def _fused_path(path: StatePath) -> tuple[StatePath, int] | None:
    """(fused param path, part index) of a per-part linear tensor path, else None."""
    if path[0] != "layers" or path[3] not in LINEAR_BY_NAME:
        return None
    fused = fused_of(path[3])
    return ("layers", path[1], fused.module, fused.name, path[4]), fused.parts.index(path[3])


def _get(obj: Any, path: StatePath) -> Any:
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def iter_checkpoint_tensors(model: Any) -> Iterator[tuple[StatePath, np.ndarray]]:
    """(checkpoint path, array) of every backbone tensor, the fused linears split back."""
    cfg = model.cfg
    for path, _ in checkpoint_table(cfg).values():
        fp = _fused_path(path)
        if fp is None:
            yield path, np.asarray(_get(model, path)[...])
            continue
        fused_path, p = fp
        spec = FUSED_BY_NAME[fused_path[3]]
        yield path, np.asarray(spec.layout(cfg).unpack(_get(model, fused_path)[...])[p])


def set_checkpoint_tensors(model: Any, tensors: Iterable[tuple[StatePath, Any]]) -> None:
    """Assign per-part checkpoint tensors to the model, packing each fused linear as soon
    as its last part arrives (so at most one layer's parts wait in memory)."""
    cfg = model.cfg
    waiting: dict[StatePath, dict[int, Any]] = {}
    for path, arr in tensors:
        fp = _fused_path(path)
        if fp is None:
            _get(model, path).value = arr
            continue
        fused_path, p = fp
        spec = FUSED_BY_NAME[fused_path[3]]
        got = waiting.setdefault(fused_path, {})
        got[p] = arr
        if len(got) == len(spec.parts):
            var = _get(model, fused_path)
            packed = spec.layout(cfg).pack([got[i] for i in range(len(spec.parts))])
            sharding = getattr(var.value, "sharding", None)
            var.value = packed if sharding is None else jax.device_put(packed, sharding)
            del waiting[fused_path]
    if waiting:
        raise ValueError(f"incomplete fused linears: {sorted(str(p) for p in waiting)[:3]}")

"""PEFT LoRA adapters <-> lsw-jax adapter banks, exactly (PEFT's logits, not an approximation).

PEFT stores ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` per module under
``base_model.model.<module>``; the delta is ``scaling * B @ A`` with ``scaling =
alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), and ``rank_pattern`` / ``alpha_pattern``
override r and alpha per module. That is our bank layout with one expert, so loading is
a copy; anything PEFT can express that we would mis-apply is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from lsw_jax.adapters.lora import attach_adapter, iter_linears
from lsw_jax.config import ALL_TARGETS, AdapterConfig
from lsw_jax.convert.safetensors_io import iter_safetensors_file

_PREFIX = "base_model.model."
_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_pattern(cfg: dict[str, Any], field: str, ok: Any, want: str, path: Path) -> None:
    patterns = cfg.get(field)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise ValueError(
            f"{path}: field {field!r} must be an object {{module pattern: {want}}}, "
            f"got {type(patterns).__name__} {patterns!r:.80}"
        )
    for key, value in patterns.items():
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{path}: {field} pattern {key!r} is not a regex: {e}") from None
        if not ok(value):
            raise ValueError(f"{path}: {field}[{key!r}] = {value!r}, expected {want}")


def _check_fields(cfg: Any, path: Path) -> None:
    """Types and ranges of the fields we read; PEFT's own defaults when absent."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if "r" in cfg and not _is_rank(cfg["r"]):
        raise ValueError(f"{path}: field 'r' = {cfg['r']!r}, expected a positive integer")
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise ValueError(
            f"{path}: field 'lora_alpha' = {cfg['lora_alpha']!r}, expected a finite number"
        )
    _check_pattern(cfg, "rank_pattern", _is_rank, "a positive integer", path)
    _check_pattern(cfg, "alpha_pattern", _is_number, "a finite number", path)
    if cfg.get("use_rslora") not in (None, True, False):
        raise ValueError(f"{path}: field 'use_rslora' = {cfg['use_rslora']!r}, expected a bool")
    targets = cfg.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise ValueError(
            f"{path}: field 'target_modules' = {targets!r:.80}, expected a string or a list "
            "of strings"
        )


def read_peft_config(folder: Path) -> dict[str, Any]:
    """The checked adapter_config.json of a PEFT folder: a ValueError names the file and
    the field for a value we would misread, and what PEFT can express that we do not."""
    path = folder / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: not a PEFT adapter (no adapter_config.json)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    _check_fields(cfg, path)
    refusals = []
    if cfg.get("peft_type", "LORA") != "LORA":
        refusals.append(f"peft_type={cfg.get('peft_type')!r} (only LORA is supported)")
    if cfg.get("use_dora"):
        refusals.append("use_dora=true (DoRA is not supported)")
    if cfg.get("modules_to_save"):
        refusals.append(f"modules_to_save={cfg['modules_to_save']!r} (not supported)")
    if cfg.get("bias", "none") != "none":
        refusals.append(f"bias={cfg['bias']!r} (bias training is not supported)")
    if cfg.get("fan_in_fan_out"):
        refusals.append("fan_in_fan_out=true (not a Llama layout)")
    if cfg.get("lora_bias"):
        refusals.append("lora_bias=true (not supported)")
    if cfg.get("trainable_token_indices"):
        refusals.append("trainable_token_indices (not supported)")
    if refusals:
        raise ValueError(f"{path}: unsupported PEFT adapter: {'; '.join(refusals)}")
    return cfg


def read_peft_adapter(
    folder: str | Path, num_layers: int
) -> tuple[AdapterConfig, dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]]]:
    """(config, {(layer, module): (A [r, in], B [out, r], scaling)}) of a PEFT LoRA folder."""
    folder = Path(folder)
    cfg = read_peft_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in iter_safetensors_file(weights):
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"{weights}: unexpected tensor {name!r} (not a Llama LoRA weight)")
        layer, _, module, which = int(m[1]), m[2], m[3], m[4]
        if module not in ALL_TARGETS or layer >= num_layers:
            raise ValueError(f"{weights}: tensor {name!r} names no module of this model")
        parts.setdefault((layer, module), {})[which] = np.asarray(arr, np.float32)
    r0, alpha0 = cfg.get("r", 8), float(cfg.get("lora_alpha", 8))  # PEFT's defaults
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"{weights}: layer {layer} {module} lacks lora_{({'A', 'B'} - set(ab)).pop()}"
            )
        full = (
            f"model.layers.{layer}.{'self_attn' if module in ALL_TARGETS[:4] else 'mlp'}.{module}"
        )
        rk, ak = _pattern_key(rank_pat, full), _pattern_key(alpha_pat, full)
        r = int(rank_pat[rk]) if rk else r0
        alpha = float(alpha_pat[ak]) if ak else alpha0
        a, b = ab["A"], ab["B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"{weights}: layer {layer} {module}: lora_A {a.shape} / lora_B {b.shape} do not "
                f"match rank {r} from adapter_config.json"
            )
        scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        out[(layer, module)] = (a, b, scaling)
    if not out:
        raise ValueError(f"{weights}: no LoRA tensors")
    targets = tuple(sorted({m for _, m in out}, key=ALL_TARGETS.index))
    adapter_cfg = AdapterConfig(
        kind="lora", rank=r0, alpha=alpha0, targets=targets, use_rslora=bool(cfg.get("use_rslora"))
    )
    return adapter_cfg, out


def load_peft_adapter(model: Any, folder: str | Path) -> Any:
    """Attach a PEFT LoRA adapter to ``model`` in place; its logits become PEFT's."""
    adapter_cfg, tensors = read_peft_adapter(folder, model.cfg.num_layers)
    ranks = {k: v[0].shape[0] for k, v in tensors.items()}
    scales = {k: v[2] for k, v in tensors.items()}
    attach_adapter(model, adapter_cfg, ranks=ranks, scales=scales)
    for i, name, lin in iter_linears(model, adapter_cfg.targets):
        if (i, name) not in tensors:  # a layer PEFT skipped (layers_to_transform): no delta
            lin.lora = None
            continue
        a, b, _ = tensors[(i, name)]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
            raise ValueError(
                f"{folder}: layer {i} {name}: adapter shapes A {a.shape}, B {b.shape} do not fit "
                f"the model's [{lin.out_features}, {lin.in_features}] weight"
            )
        lin.lora.a.value = jnp.asarray(a[None])
        lin.lora.b.value = jnp.asarray(b[None])
    return model


def export_peft_adapter(model: Any, folder: str | Path, *, base_model: str = "") -> Path:
    """Write a plain-LoRA adapter of ``model`` in PEFT's format (PEFT loads it as is)."""
    cfg: AdapterConfig | None = getattr(model, "adapter_config", None)
    if cfg is None or cfg.kind != "lora":
        raise ValueError("export_peft_adapter needs a model with a plain LoRA adapter attached")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for i, name, lin in iter_linears(model, cfg.targets):
        if lin.lora is None:
            continue
        group = "self_attn" if name in ALL_TARGETS[:4] else "mlp"
        module = f"model.layers.{i}.{group}.{name}"
        a = np.asarray(lin.lora.a[...][0], np.float32)
        b = np.asarray(lin.lora.b[...][0], np.float32)
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b)
        r = a.shape[0]
        alpha = lin.lora.scale * (math.sqrt(r) if cfg.use_rslora else r)
        if r != cfg.rank:
            rank_pattern[module] = r
        if not math.isclose(alpha, cfg.alpha, rel_tol=1e-6):
            alpha_pattern[module] = alpha
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),
        "use_rslora": cfg.use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "init_lora_weights": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    return folder


def seed_switch_bank_from_peft(model: Any, folders: list[str | Path], cfg: AdapterConfig) -> Any:
    """Attach a ``switch``/``mola`` bank whose E experts start as E PEFT adapters.

    Ranks are padded to the largest with zero rows/columns (exact), and each adapter's own
    scaling is folded into its B so the bank's single scale reproduces it.
    """
    if len(folders) != cfg.num_experts:
        raise ValueError(f"{len(folders)} PEFT adapters given for num_experts={cfg.num_experts}")
    loaded = [read_peft_adapter(f, model.cfg.num_layers)[1] for f in folders]
    rank = max(a.shape[0] for t in loaded for a, _, _ in t.values())
    cfg = AdapterConfig(**{**cfg.to_dict(), "rank": rank, "targets": cfg.targets})
    attach_adapter(model, cfg)
    for i, name, lin in iter_linears(model, cfg.targets):
        a_bank = np.zeros((cfg.num_experts, rank, lin.in_features), np.float32)
        b_bank = np.zeros((cfg.num_experts, lin.out_features, rank), np.float32)
        for e, tensors in enumerate(loaded):
            if (i, name) in tensors:
                a, b, s = tensors[(i, name)]
                a_bank[e, : a.shape[0]] = a
                b_bank[e, :, : a.shape[0]] = b * (s / cfg.scale)
        lin.lora.a.value = jnp.asarray(a_bank)
        lin.lora.b.value = jnp.asarray(b_bank)
    return model

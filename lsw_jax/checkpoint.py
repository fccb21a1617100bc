"""Orbax checkpoints of the backbone: streamed writes, atomic publish, typed restore.

Layout of a checkpoint directory::

    config.json            {"format": 1, "lsw_jax_config": ModelConfig fields}
    tokenizer.json, tokenizer_config.json   (when the source had a tokenizer)
    params/top             Orbax: embed_tokens, norm, lm_head
    params/layer_00007     Orbax: one decoder layer's tensors
    adapters/<name>/       adapter banks (see lsw_jax.adapters)

One Orbax item per layer keeps conversion streaming: a group is written and freed as soon
as its last tensor arrives, so host memory stays near one layer plus the largest tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lsw_jax.config import ModelConfig
from lsw_jax.convert.hf import StatePath, hf_key_table
from lsw_jax.linears import checkpoint_axes, iter_checkpoint_tensors, set_checkpoint_tensors

FORMAT_VERSION = 1


def _group_of(path: StatePath) -> str:
    return f"layer_{path[1]:05d}" if path[0] == "layers" else "top"


def _key_in_group(path: StatePath) -> str:
    return ".".join(str(p) for p in (path[2:] if path[0] == "layers" else path))


@contextlib.contextmanager
def atomic_directory(dst: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory beside ``dst``; publish it by rename only on success."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(ckpt: Path, cfg: ModelConfig) -> None:
    payload = {"format": FORMAT_VERSION, "lsw_jax_config": cfg.to_dict()}
    (ckpt / "config.json").write_text(json.dumps(payload, indent=2))


def save_params_streaming(
    ckpt: Path,
    cfg: ModelConfig,
    tensors: Iterable[tuple[StatePath, np.ndarray]],
    *,
    dtype: Any = None,
    progress: Any = None,
) -> None:
    """Write checked ``(state path, array)`` pairs group by group into ``ckpt/params``."""
    expected: dict[str, int] = {}
    for path, _ in hf_key_table(cfg).values():
        g = _group_of(path)
        expected[g] = expected.get(g, 0) + 1
    pending: dict[str, dict[str, np.ndarray]] = {}
    checkpointer = ocp.StandardCheckpointer()
    for path, arr in tensors:
        g = _group_of(path)
        out = np.asarray(arr, dtype=dtype) if dtype is not None else np.array(arr)
        pending.setdefault(g, {})[_key_in_group(path)] = out
        if progress is not None:
            progress.update(1)
        if len(pending[g]) == expected[g]:
            checkpointer.save(ckpt / "params" / g, pending.pop(g))
            checkpointer.wait_until_finished()
    checkpointer.close()
    if pending:  # map_hf_tensors already raised on missing keys; this guards other callers
        raise ValueError(f"incomplete parameter groups: {sorted(pending)}")


def save_model(model: Any, ckpt: str | Path, *, overwrite: bool = False) -> None:
    """Save an in-memory model (config + params) as a checkpoint directory, atomically."""
    cfg: ModelConfig = model.cfg
    with atomic_directory(Path(ckpt), overwrite=overwrite) as tmp:
        write_config(tmp, cfg)
        save_params_streaming(tmp, cfg, iter_checkpoint_tensors(model))


def read_config(ckpt: str | Path) -> ModelConfig:
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt}: not a checkpoint (no config.json)")
    return ModelConfig.from_json_file(ckpt / "config.json")


def load_params(
    ckpt: str | Path, cfg: ModelConfig, *, dtype: Any, shardings: Any = None
) -> Iterator[tuple[StatePath, jax.Array]]:
    """Restore every backbone tensor, cast to ``dtype``; ``shardings(path) -> Sharding``
    restores each directly into its target sharding."""
    ckpt = Path(ckpt)
    by_group: dict[str, list[tuple[StatePath, tuple[int, ...]]]] = {}
    for path, shape in hf_key_table(cfg).values():
        by_group.setdefault(_group_of(path), []).append((path, shape))
    checkpointer = ocp.StandardCheckpointer()
    for group, entries in by_group.items():
        gdir = ckpt / "params" / group
        if not gdir.exists():
            raise FileNotFoundError(f"{ckpt}: missing parameter group {group!r}")
        target = {
            _key_in_group(p): jax.ShapeDtypeStruct(
                shape, dtype, sharding=shardings(p) if shardings else None
            )
            for p, shape in entries
        }
        try:
            restored = checkpointer.restore(gdir, target)
        except Exception as e:  # orbax raises many types; name the group and cause
            raise ValueError(f"{gdir}: cannot restore parameters: {e}") from e
        for p, _ in entries:
            yield p, jnp.asarray(restored[_key_in_group(p)], dtype)


def _get_by_path(model: Any, path: StatePath) -> Any:
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def load_model(
    ckpt: str | Path,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    adapter: str | Path | None = None,
    shardings: Any = None,
    mesh: Any = None,
    rules: Any = None,
) -> Any:
    """Load a converted checkpoint as a ``LlamaModel``.

    dtype: compute dtype (default: bf16 on accelerators, fp32 on CPU); param_dtype: storage
    dtype (default: ``dtype``). ``adapter``: a PEFT adapter directory or the name of an
    adapter stored under ``ckpt/adapters`` to attach. ``mesh`` (with optional ``rules``,
    default ``sharding.LOGICAL_AXIS_RULES``): restore every backbone tensor straight into
    the sharding its logical axes give (``shardings(path)`` overrides per tensor).
    """
    from lsw_jax.model.layers import default_dtype
    from lsw_jax.model.llama import LlamaModel

    cfg = read_config(ckpt)
    dtype = jnp.dtype(dtype or default_dtype())
    param_dtype = jnp.dtype(param_dtype or dtype)
    model = nnx.eval_shape(
        lambda: LlamaModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    if mesh is not None and shardings is None:
        from lsw_jax import sharding as sh

        rules, units = rules or sh.LOGICAL_AXIS_RULES, sh.head_units(cfg)
        shapes = {path: shape for path, shape in hf_key_table(cfg).values()}

        def shardings(p):
            axes = checkpoint_axes(p)
            if axes is None:
                return sh.variable_sharding(_get_by_path(model, p), mesh, rules, units)
            return sh.named_sharding(axes, shapes[p], mesh, rules, units)

    set_checkpoint_tensors(model, load_params(ckpt, cfg, dtype=param_dtype, shardings=shardings))
    if adapter is not None:
        from lsw_jax.adapters.store import attach_saved_adapter

        attach_saved_adapter(model, ckpt, adapter)
    return model

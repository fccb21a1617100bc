"""Checkpoint IO: streamed writes of named arrays, atomic publish, typed restore.

This module reads and writes files only; building a model from a checkpoint (and sharding
it, attaching an adapter) is composed above it, in ``lsw_jax.loading``.

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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lsw_jax.config import ModelConfig
from lsw_jax.linears import StatePath

FORMAT_VERSION = 1

# A parameter's path in the model state, e.g. ("layers", 3, "mlp", "up_proj", "weight").


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
    paths: Iterable[StatePath],
    tensors: Iterable[tuple[StatePath, np.ndarray]],
    *,
    dtype: Any = None,
    progress: Any = None,
) -> None:
    """Write ``(state path, array)`` pairs group by group into ``ckpt/params``.

    ``paths``: every path the checkpoint holds; a group is written (and freed) as soon as
    its last array arrives."""
    expected: dict[str, int] = {}
    for path in paths:
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


def read_config(ckpt: str | Path) -> ModelConfig:
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt}: not a checkpoint (no config.json)")
    return ModelConfig.from_json_file(ckpt / "config.json")


def load_params(
    ckpt: str | Path,
    layout: Mapping[StatePath, tuple[int, ...]],
    *,
    dtype: Any,
    shardings: Any = None,
) -> Iterator[tuple[StatePath, jax.Array]]:
    """Restore every array of ``layout`` (path -> shape), cast to ``dtype``;
    ``shardings(path) -> Sharding`` restores each directly into its target sharding."""
    ckpt = Path(ckpt)
    by_group: dict[str, list[tuple[StatePath, tuple[int, ...]]]] = {}
    for path, shape in layout.items():
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

"""Adapters inside a checkpoint: ``ckpt/adapters/<name>/{adapter.json, state/}``.

adapter.json holds the AdapterConfig and each adapted module's rank and scale (PEFT rank
and alpha patterns survive import); ``state/`` is an Orbax item of every LoRAParam
(banks and routers).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lsw_jax.adapters.lora import LoRAParam, attach_adapter, iter_linears
from lsw_jax.checkpoint import (
    CheckpointError,
    absolute,
    atomic_directory,
    check_stored_tree,
    tree_checksums,
    verify_tree_checksums,
)
from lsw_jax.config import ALL_TARGETS, AdapterConfig

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_adapter_name(name: str) -> str:
    if not _NAME_OK.match(name):
        raise ValueError(
            f"adapter name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'"
        )
    return name


def adapter_layout(model: Any) -> dict[str, Any]:
    """The attached adapter's config and per-module (rank, scale)."""
    cfg: AdapterConfig | None = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ValueError("the model has no adapter attached")
    modules = {
        f"{i}.{name}": {"rank": lin.lora.rank, "scale": lin.lora.scale}
        for i, name, lin in iter_linears(model, ALL_TARGETS)
        if lin.lora is not None
    }
    return {"config": cfg.to_dict(), "modules": modules}


def save_adapter(model: Any, ckpt: str | Path, name: str, *, overwrite: bool = False) -> Path:
    """Store the model's attached adapter under ``ckpt/adapters/<name>`` atomically."""
    dst = absolute(ckpt) / "adapters" / check_adapter_name(name)
    layout = adapter_layout(model)
    state = jax.tree.map(np.asarray, nnx.state(model, LoRAParam).to_pure_dict())
    stored = lambda p: (p / "adapter.json").exists()
    layout["checksums"] = tree_checksums(state)
    with atomic_directory(
        dst, overwrite=overwrite, replaces=stored, what="a stored adapter"
    ) as tmp:
        (tmp / "adapter.json").write_text(json.dumps(layout, indent=2))
        with ocp.StandardCheckpointer() as ck:
            ck.save(tmp / "state", state)
    return dst


def _attach_layout(model: Any, layout: dict[str, Any], source: str) -> None:
    try:
        cfg = AdapterConfig.from_dict(layout["config"])
        ranks, scales = {}, {}
        for key, m in layout["modules"].items():
            i, name = key.split(".")
            ranks[(int(i), name)], scales[(int(i), name)] = int(m["rank"]), float(m["scale"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{source}/adapter.json: invalid adapter layout: {e!r}") from None
    attach_adapter(model, cfg, ranks=ranks, scales=scales)
    for i, name, lin in iter_linears(model, cfg.targets):
        if (i, name) not in ranks:
            lin.lora = None
    for i, name in ranks:
        if i >= model.cfg.num_layers or name not in cfg.targets:
            raise ValueError(f"{source}: module {i}.{name} does not exist in this model")


def _host_target(x: jax.ShapeDtypeStruct) -> np.ndarray:
    return np.empty(x.shape, x.dtype)  # restore to host: checksums read host memory


def _read_layout(path: Path) -> dict[str, Any]:
    try:
        layout = json.loads(path.read_text())
        if not isinstance(layout.get("config"), dict) or not isinstance(
            layout.get("modules"), dict
        ):
            raise ValueError("expected an object with 'config' and 'modules' objects")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable adapter layout: {e}") from None
    return layout


def load_adapter(model: Any, ckpt: str | Path, name: str, *, verify_checksums: bool = True) -> Any:
    """Attach the adapter stored as ``name`` in ``ckpt`` (in place). Stored shapes must be
    the layout's (a CheckpointError otherwise) and, unless ``verify_checksums=False``,
    every array's crc32 the one recorded when it was saved."""
    src = absolute(ckpt) / "adapters" / check_adapter_name(name)
    if not (src / "adapter.json").exists():
        have = list_adapters(ckpt)
        raise FileNotFoundError(f"{ckpt}: no adapter named {name!r} (stored: {have or 'none'})")
    layout = _read_layout(src / "adapter.json")
    _attach_layout(model, layout, str(src))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        nnx.state(model, LoRAParam).to_pure_dict(),
    )
    with ocp.StandardCheckpointer() as ck:
        try:
            stored = ck.metadata(src / "state").item_metadata.tree
        except Exception as e:  # orbax raises many types; name the folder and the cause
            raise CheckpointError(f"{src / 'state'}: unreadable Orbax metadata: {e}") from None
        check_stored_tree(stored, target, src / "state")
        try:
            restored = ck.restore(src / "state", jax.tree.map(_host_target, target))
        except Exception as e:
            raise CheckpointError(f"{src}: cannot restore adapter weights: {e}") from e
    if verify_checksums and layout.get("checksums"):
        verify_tree_checksums(restored, layout["checksums"], src / "state")
    state = nnx.state(model, LoRAParam)
    state.replace_by_pure_dict(jax.tree.map(jax.numpy.asarray, restored))
    nnx.update(model, state)
    return model


def list_adapters(ckpt: str | Path) -> list[str]:
    root = Path(ckpt) / "adapters"
    return (
        sorted(p.name for p in root.iterdir() if (p / "adapter.json").exists())
        if root.exists()
        else []
    )


def stored_adapter(ckpt: str | Path | None, source: str | Path) -> tuple[Path, str] | None:
    """Where the stored adapter ``source`` names lives, as (folder holding ``adapters/``,
    name): a stored adapter's own folder (``.../adapters/NAME``, holding adapter.json), a
    training run's folder (its ``adapters/final``), or a name stored in ``ckpt``. None when
    ``source`` is a path that is none of these (or a bare name without a ``ckpt``)."""
    path = Path(source)
    if (path / "adapter.json").exists():
        return path.parent.parent, path.name
    if (path / "adapters" / "final" / "adapter.json").exists():
        return path, "final"
    if path.exists() or os.sep in str(source) or "/" in str(source) or ckpt is None:
        return None
    return Path(ckpt), str(source)

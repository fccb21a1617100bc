"""Adapters inside a checkpoint: ``ckpt/adapters/<name>/{adapter.json, state/}``.

adapter.json holds the AdapterConfig and each adapted module's rank and scale (PEFT rank
and alpha patterns survive import); ``state/`` is an Orbax item of every LoRAParam
(banks and routers).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

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
    from lsw_jax.adapters.lora import iter_linears

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
    from lsw_jax.adapters.lora import LoRAParam
    from lsw_jax.checkpoint import atomic_directory

    dst = Path(ckpt) / "adapters" / check_adapter_name(name)
    layout = adapter_layout(model)
    state = jax.tree.map(np.asarray, nnx.state(model, LoRAParam).to_pure_dict())
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        (tmp / "adapter.json").write_text(json.dumps(layout, indent=2))
        with ocp.StandardCheckpointer() as ck:
            ck.save(tmp / "state", state)
    return dst


def _attach_layout(model: Any, layout: dict[str, Any], source: str) -> None:
    from lsw_jax.adapters.lora import attach_adapter, iter_linears

    cfg = AdapterConfig.from_dict(layout["config"])
    ranks, scales = {}, {}
    for key, m in layout["modules"].items():
        i, name = key.split(".")
        ranks[(int(i), name)], scales[(int(i), name)] = int(m["rank"]), float(m["scale"])
    attach_adapter(model, cfg, ranks=ranks, scales=scales)
    for i, name, lin in iter_linears(model, cfg.targets):
        if (i, name) not in ranks:
            lin.lora = None
    for i, name in ranks:
        if i >= model.cfg.num_layers or name not in cfg.targets:
            raise ValueError(f"{source}: module {i}.{name} does not exist in this model")


def load_adapter(model: Any, ckpt: str | Path, name: str) -> Any:
    """Attach the adapter stored as ``name`` in ``ckpt`` (in place)."""
    from lsw_jax.adapters.lora import LoRAParam

    src = Path(ckpt) / "adapters" / check_adapter_name(name)
    if not (src / "adapter.json").exists():
        have = list_adapters(ckpt)
        raise FileNotFoundError(f"{ckpt}: no adapter named {name!r} (stored: {have or 'none'})")
    _attach_layout(model, json.loads((src / "adapter.json").read_text()), str(src))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        nnx.state(model, LoRAParam).to_pure_dict(),
    )
    with ocp.StandardCheckpointer() as ck:
        try:
            restored = ck.restore(src / "state", target)
        except Exception as e:
            raise ValueError(f"{src}: adapter weights do not fit this model: {e}") from e
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


def attach_saved_adapter(model: Any, ckpt: str | Path, adapter: str | Path) -> Any:
    """``adapter`` is a PEFT directory (has adapter_config.json) or a stored adapter name."""
    from lsw_jax.convert.peft import load_peft_adapter

    if (Path(adapter) / "adapter_config.json").exists():
        return load_peft_adapter(model, adapter)
    return load_adapter(model, ckpt, str(adapter))


# ---------------------------------------------------------------------- CLI


def _cmd_import_peft(args: argparse.Namespace) -> None:
    from lsw_jax.checkpoint import load_model
    from lsw_jax.convert.peft import load_peft_adapter, seed_switch_bank_from_peft

    model = load_model(args.ckpt, dtype="float32")
    if len(args.peft) == 1 and args.kind == "lora":
        load_peft_adapter(model, args.peft[0])
    else:
        cfg = AdapterConfig(
            kind=args.kind, num_experts=len(args.peft), top_k=min(args.top_k, len(args.peft))
        )
        seed_switch_bank_from_peft(model, args.peft, cfg)
    print(save_adapter(model, args.ckpt, args.name, overwrite=args.overwrite))


def _cmd_export_peft(args: argparse.Namespace) -> None:
    from lsw_jax.checkpoint import load_model
    from lsw_jax.convert.peft import export_peft_adapter

    model = load_model(args.ckpt, dtype="float32", adapter=args.name)
    print(export_peft_adapter(model, args.out))


def _cmd_list(args: argparse.Namespace) -> None:
    for name in list_adapters(args.ckpt):
        layout = json.loads((Path(args.ckpt) / "adapters" / name / "adapter.json").read_text())
        c = layout["config"]
        print(f"{name}\t{c['kind']}\tE={c['num_experts']}\tr={c['rank']}\ttop_k={c['top_k']}")


def register_cli(sub: Any) -> None:
    p = sub.add_parser("adapters", help="import/export/list adapters of a checkpoint")
    asub = p.add_subparsers(dest="adapters_command", required=True)
    q = asub.add_parser("import-peft", help="store PEFT LoRA adapter(s) in a checkpoint")
    q.add_argument("--ckpt", required=True)
    q.add_argument("--name", required=True)
    q.add_argument("peft", nargs="+", help="one PEFT dir (plain LoRA) or N dirs (expert bank)")
    q.add_argument("--kind", default="lora", choices=["lora", "switch", "mola"])
    q.add_argument("--top-k", type=int, default=2)
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=_cmd_import_peft)
    q = asub.add_parser("export-peft", help="write a stored plain LoRA in PEFT format")
    q.add_argument("--ckpt", required=True)
    q.add_argument("--name", required=True)
    q.add_argument("--out", required=True)
    q.set_defaults(func=_cmd_export_peft)
    q = asub.add_parser("list", help="list stored adapters")
    q.add_argument("--ckpt", required=True)
    q.set_defaults(func=_cmd_list)

"""Loading and saving whole models: build from a checkpoint's config, restore the weights
(optionally straight into a mesh's shardings), attach an adapter, find the tokenizer.

This layer composes the parts below it: checkpoint IO (``lsw_jax.checkpoint``), the
converter's key table (which arrays a config implies), the model, the sharding rules and
the adapter store. None of those imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax import nnx

from lsw_jax import sharding as sh
from lsw_jax.adapters.store import list_adapters, load_adapter, stored_adapter
from lsw_jax.checkpoint import (
    StatePath,
    atomic_directory,
    load_params,
    read_config,
    save_params_streaming,
    write_config,
)
from lsw_jax.config import ModelConfig
from lsw_jax.convert.hf import hf_key_table
from lsw_jax.convert.peft import load_peft_adapter
from lsw_jax.linears import checkpoint_axes, iter_checkpoint_tensors, set_checkpoint_tensors
from lsw_jax.model.layers import default_dtype, float_dtype
from lsw_jax.model.llama import LlamaModel
from lsw_jax.tokenizer import Tokenizer


def param_layout(cfg: ModelConfig) -> dict[StatePath, tuple[int, ...]]:
    """Every backbone array a checkpoint of ``cfg`` holds: state path -> shape."""
    return {path: shape for path, shape in hf_key_table(cfg).values()}


def get_by_path(model: Any, path: StatePath) -> Any:
    """The module or Variable at ``path`` (attribute names and list indices) in ``model``."""
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
    verify_checksums: bool = True,
) -> LlamaModel:
    """Load a converted checkpoint as a ``LlamaModel``.

    dtype: compute dtype (default: bf16 on accelerators, fp32 on CPU); param_dtype: storage
    dtype (default: ``dtype``). ``adapter``: a PEFT adapter directory or the name of an
    adapter stored under ``ckpt/adapters`` to attach. ``mesh`` (with optional ``rules``,
    default ``sharding.LOGICAL_AXIS_RULES``): restore every backbone tensor straight into
    the sharding its logical axes give (``shardings(path)`` overrides per tensor).

    Every array's name and shape is checked against the config first, and its bytes
    against the checksum recorded at conversion unless ``verify_checksums=False``
    (``checkpoint.CheckpointError`` naming the array and folder).
    """
    cfg = read_config(ckpt)
    dtype = float_dtype(dtype) or default_dtype()
    param_dtype = float_dtype(param_dtype) or dtype
    model = nnx.eval_shape(
        lambda: LlamaModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    layout = param_layout(cfg)
    if mesh is not None and shardings is None:
        rules, units = rules or sh.LOGICAL_AXIS_RULES, sh.head_units(cfg)

        def shardings(p: StatePath) -> Any:
            axes = checkpoint_axes(p)  # a part of a fused linear: the part's own axes
            if axes is None:
                return sh.variable_sharding(get_by_path(model, p), mesh, rules, units)
            return sh.named_sharding(axes, layout[p], mesh, rules, units)

    arrays = load_params(
        ckpt, layout, dtype=param_dtype, shardings=shardings, verify_checksums=verify_checksums
    )
    set_checkpoint_tensors(model, arrays)
    if adapter is not None:
        attach_saved_adapter(model, ckpt, adapter)
    return model


def sharded_load_model(
    ckpt: str | Path,
    mesh: Any,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    adapter: str | Path | None = None,
    rules: sh.Rules = sh.LOGICAL_AXIS_RULES,
    verify_checksums: bool = True,
) -> LlamaModel:
    """``load_model`` restoring each backbone tensor directly into its sharding (Orbax reads
    only the slices each device holds: no full copy on one host); an attached adapter
    (small) is placed afterwards."""
    model = load_model(
        ckpt,
        dtype=dtype,
        param_dtype=param_dtype,
        adapter=adapter,
        mesh=mesh,
        rules=rules,
        verify_checksums=verify_checksums,
    )
    return sh.shard_model(model, mesh, rules)


def save_model(model: Any, ckpt: str | Path, *, overwrite: bool = False) -> None:
    """Save an in-memory model (config + backbone params) as a checkpoint, atomically."""
    cfg: ModelConfig = model.cfg
    layout = param_layout(cfg)
    with atomic_directory(Path(ckpt), overwrite=overwrite) as tmp:
        write_config(tmp, cfg)
        save_params_streaming(tmp, layout, iter_checkpoint_tensors(model))


def attach_saved_adapter(model: Any, ckpt: str | Path, adapter: str | Path) -> Any:
    """``adapter`` is a PEFT directory (has adapter_config.json), a training run's folder
    (``lsw-jax train --out``), a stored adapter's folder or a name stored in ``ckpt``."""
    path = Path(adapter)
    if (path / "adapter_config.json").exists():
        return load_peft_adapter(model, path)
    where = stored_adapter(ckpt, adapter)
    if where is None:
        stored = list_adapters(ckpt)
        raise FileNotFoundError(
            f"{adapter}: not a PEFT adapter folder (no adapter_config.json there), a "
            f"training run (no adapters/final) or an adapter stored in {ckpt} (stored: "
            f"{', '.join(stored) or 'none'})"
        )
    return load_adapter(model, *where)


def load_tokenizer(ckpt: str | Path, *, required: bool = False) -> Tokenizer | None:
    """The tokenizer a checkpoint carries (``tokenizer.json``), or None without one;
    ``required``: a missing tokenizer is an error naming the checkpoint."""
    ckpt = Path(ckpt)
    if (ckpt / "tokenizer.json").exists():
        return Tokenizer.from_hf_dir(ckpt)
    if required:
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json in the checkpoint")
    return None

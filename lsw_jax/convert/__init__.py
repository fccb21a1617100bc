"""Convert HF safetensors folders and GGUF files into lsw-jax Orbax checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from lsw_jax.checkpoint import atomic_directory, save_params_streaming, write_config
from lsw_jax.config import ModelConfig
from lsw_jax.convert.gguf import gguf_hf_config, gguf_tokenizer, iter_gguf_tensors
from lsw_jax.convert.hf import hf_key_table, map_hf_tensors
from lsw_jax.convert.safetensors_io import iter_safetensors
from lsw_jax.model.layers import float_dtype
from lsw_jax.tokenizer import Tokenizer


def _source_of(src: Path) -> tuple[ModelConfig, Any, str]:
    """(config, HF-named tensor stream, kind) of an HF folder or a GGUF file."""
    if src.is_file() and src.suffix == ".gguf":
        return (
            ModelConfig.from_hf_config(gguf_hf_config(src), source=str(src)),
            iter_gguf_tensors(src),
            "gguf",
        )
    if src.is_dir():
        return ModelConfig.from_json_file(src / "config.json"), iter_safetensors(src), "hf"
    raise FileNotFoundError(f"{src}: expected an HF model folder or a .gguf file")


def _save_tokenizer(src: Path, kind: str, dst: Path) -> bool:
    if kind != "gguf" and not (src / "tokenizer.json").exists():
        return False
    tok = gguf_tokenizer(src) if kind == "gguf" else Tokenizer.from_hf_dir(src)
    tok.save(dst)
    return True


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: Any = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Stream ``src`` (HF folder or ``.gguf``) tensor by tensor into an Orbax checkpoint.

    The checkpoint appears at ``dst`` only when every tensor was checked and written; a
    failure leaves nothing there. ``dtype`` (e.g. ``"bfloat16"``) casts the stored weights;
    by default they keep the source dtype (GGUF quantized types are stored dequantized, fp32).
    """
    src, dst = Path(src), Path(dst)
    float_dtype(dtype)  # refused before anything is read or written
    cfg, tensors, kind = _source_of(src)
    paths = [path for path, _ in hf_key_table(cfg).values()]
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        write_config(tmp, cfg)
        with tqdm(total=len(paths), desc=f"convert {src.name}", disable=not show_progress) as bar:
            tensors = map_hf_tensors(cfg, tensors, source=str(src))
            save_params_streaming(tmp, paths, tensors, dtype=dtype, progress=bar)
        _save_tokenizer(src, kind, tmp)
    return dst


__all__ = ["convert_checkpoint"]

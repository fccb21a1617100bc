"""Convert HF safetensors folders and GGUF files into lsw-jax Orbax checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lsw_jax.config import ModelConfig
from lsw_jax.convert.hf import hf_key_table, map_hf_tensors


def _source_of(src: Path) -> tuple[ModelConfig, Any, str]:
    """(config, HF-named tensor stream, kind) of an HF folder or a GGUF file."""
    if src.is_file() and src.suffix == ".gguf":
        from lsw_jax.convert.gguf import gguf_hf_config, iter_gguf_tensors

        return (
            ModelConfig.from_hf_config(gguf_hf_config(src), source=str(src)),
            iter_gguf_tensors(src),
            "gguf",
        )
    if src.is_dir():
        from lsw_jax.convert.safetensors_io import iter_safetensors

        return ModelConfig.from_json_file(src / "config.json"), iter_safetensors(src), "hf"
    raise FileNotFoundError(f"{src}: expected an HF model folder or a .gguf file")


def _save_tokenizer(src: Path, kind: str, dst: Path) -> bool:
    if kind != "gguf" and not (src / "tokenizer.json").exists():
        return False
    from lsw_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(src) if kind == "gguf" else Tokenizer.from_hf_dir(src)
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
    from tqdm import tqdm

    from lsw_jax.checkpoint import atomic_directory, save_params_streaming, write_config

    src, dst = Path(src), Path(dst)
    cfg, tensors, kind = _source_of(src)
    total = len(hf_key_table(cfg))
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        write_config(tmp, cfg)
        with tqdm(total=total, desc=f"convert {src.name}", disable=not show_progress) as bar:
            save_params_streaming(
                tmp, cfg, map_hf_tensors(cfg, tensors, source=str(src)), dtype=dtype, progress=bar
            )
        _save_tokenizer(src, kind, tmp)
    return dst


__all__ = ["convert_checkpoint"]

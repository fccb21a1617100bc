"""Hugging Face parameter names -> model state: one key table, a shape check per tensor."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from lsw_jax.config import ModelConfig
from lsw_jax.linears import StatePath, checkpoint_table


def hf_key_table(cfg: ModelConfig) -> dict[str, tuple[StatePath, tuple[int, ...]]]:
    """Every HF tensor name the model needs -> (checkpoint path, expected shape)."""
    return checkpoint_table(cfg)


# Tensors HF checkpoints may carry that the model rightly ignores (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def map_hf_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, source: str
) -> Iterator[tuple[StatePath, np.ndarray]]:
    """Check names and shapes while streaming; raise on unmapped, duplicate or missing keys."""
    table = hf_key_table(cfg)
    seen: set[str] = set()
    for name, arr in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints still store the (identical) head
        if name not in table:
            raise ValueError(f"{source}: unexpected tensor {name!r} (not a Llama parameter)")
        if name in seen:
            raise ValueError(f"{source}: duplicate tensor {name!r}")
        seen.add(name)
        path, shape = table[name]
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}"
            )
        yield path, arr
    missing = sorted(set(table) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {missing[:5]}{more}")

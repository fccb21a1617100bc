"""Streaming reads of HF safetensors folders (single file or sharded with an index).

Tensors are memory-mapped one at a time, so peak host memory stays near the largest tensor.
We parse the header ourselves (it is 8 bytes of length + JSON) to name the file and tensor
in every error and to read bf16 without a framework.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor table, byte offset of the data section) of one safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        end = info["data_offsets"][1]
        if data_start + end > size:
            raise ValueError(
                f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to "
                f"{data_start + end}, file has {size}"
            )
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return header, data_start


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: one file or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index}: shard files missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{folder}: no model.safetensors or safetensors shards")
    return found


def iter_safetensors_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for every tensor of one file (memory-mapped, checked)."""
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        lo, hi = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if hi - lo != expected:
            raise ValueError(
                f"{path}: tensor {name!r} has {hi - lo} bytes, shape {shape} "
                f"{info['dtype']} needs {expected}"
            )
        yield name, mm[start + lo : start + hi].view(dtype).reshape(shape)


def iter_safetensors(folder: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for every tensor of the folder, one at a time."""
    for path in safetensors_files(Path(folder)):
        yield from iter_safetensors_file(path)

"""Checkpoint IO: streamed writes of named arrays, atomic publish, verified restore.

This module reads and writes files only; building a model from a checkpoint (and sharding
it, attaching an adapter) is composed above it, in ``lsw_jax.loading``.

Layout of a checkpoint directory::

    config.json            {"format": 2, "lsw_jax_config": ModelConfig fields}
    tokenizer.json, tokenizer_config.json   (when the source had a tokenizer)
    params/manifest.json   per array: shape, dtype and crc32 of its bytes as written
    params/top             Orbax: embed_tokens, norm, lm_head
    params/layer_00007     Orbax: one decoder layer's tensors
    adapters/<name>/       adapter banks (see lsw_jax.adapters.store)

One Orbax item per layer keeps conversion streaming: a group is written and freed as soon
as its last tensor arrives, so host memory stays near one layer plus the largest tensor.

Nothing wrong loads silently: a restore first checks that the arrays on disk are exactly
those the config implies (names, shapes; Orbax itself would pad or cut a mismatched shape),
then, by default, that every array's bytes match the crc32 recorded when it was written.
Format 1 checkpoints (no manifest) still load, with the shape checks but no checksums.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lsw_jax.config import ModelConfig
from lsw_jax.linears import StatePath

FORMAT_VERSION = 2
# 1: no params/manifest.json (shapes are still checked, from Orbax's metadata).
KNOWN_FORMATS = (1, 2)
MANIFEST = "manifest.json"
REFORMAT_HINT = "re-convert it: lsw-jax convert SOURCE DST --overwrite"

# A parameter's path in the model state, e.g. ("layers", 3, "mlp", "up_proj", "weight").


class CheckpointError(ValueError):
    """A checkpoint that does not match its config, or whose bytes fail their checksum."""


class DestinationExists(FileExistsError):
    """``atomic_directory`` found ``path`` taken and was not asked to replace it.

    ``replace_with`` is how the caller asks for a replacement: the Python API's
    ``overwrite=True`` by default; a front end names its own switch with ``naming``
    (the CLI: ``--overwrite``)."""

    def __init__(self, path: Path, replace_with: str = "overwrite=True") -> None:
        super().__init__(f"{path} already exists (pass {replace_with} to replace it)")
        self.path = path

    def naming(self, replace_with: str) -> DestinationExists:
        return DestinationExists(self.path, replace_with)


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute: Orbax refuses relative paths, users type them."""
    return Path(path).expanduser().absolute()


def _group_of(path: StatePath) -> str:
    return f"layer_{path[1]:05d}" if path[0] == "layers" else "top"


def _key_in_group(path: StatePath) -> str:
    return ".".join(str(p) for p in (path[2:] if path[0] == "layers" else path))


def array_checksum(arr: Any) -> int:
    """crc32 of an array's bytes in C order (zlib: ~4 GB/s here, and it releases the GIL)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return zlib.crc32(flat.view(np.uint8))


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_leaves(tree: Any) -> dict[str, Any]:
    """``"layers/0/mlp/lora/a"``-style path -> leaf, for any pytree (dicts, lists, optax
    states). Keys and indices are strings alike, as in Orbax's metadata trees."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(e) for e in path): leaf for path, leaf in leaves}


def tree_checksums(tree: Any) -> dict[str, int] | None:
    """crc32 of every array leaf of ``tree`` (host copies), or None when some leaf is not
    fully addressable by this process (multi-host: no process sees every byte)."""
    leaves = {k: v for k, v in flat_leaves(tree).items() if hasattr(v, "shape")}
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for v in leaves.values()):
        return None
    return {k: array_checksum(np.asarray(v)) for k, v in leaves.items()}


def check_stored_tree(stored: Any, target: Any, source: str | os.PathLike) -> None:
    """Raise a CheckpointError unless the Orbax metadata tree ``stored`` has exactly the
    leaves, shapes and dtypes of ``target`` (Orbax alone would pad or cut a mismatch)."""
    have, want = flat_leaves(stored), flat_leaves(target)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{source}: stored arrays do not match: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for key, t in want.items():
        got = (tuple(have[key].shape), np.dtype(have[key].dtype))
        if got != (tuple(t.shape), np.dtype(t.dtype)):
            raise CheckpointError(
                f"{source}: array {key} is {got[1]}{list(got[0])} on disk, "
                f"expected {np.dtype(t.dtype)}{list(t.shape)}"
            )


def verify_tree_checksums(
    tree: Any, recorded: Mapping[str, int], source: str | os.PathLike
) -> None:
    """Raise a CheckpointError naming the first array of ``tree`` whose crc32 differs."""
    got = tree_checksums(tree)
    if got is None:
        return
    for key, want in recorded.items():
        if got.get(key) != want:
            raise CheckpointError(
                f"{source}: array {key} fails its checksum (crc32 {got.get(key)}, recorded "
                f"{want}): the file is corrupt"
            )


# ---------------------------------------------------------------------- directories


def check_checkpoint_dir(ckpt: str | os.PathLike) -> Path:
    """``ckpt`` as a Path, once it is a directory holding a ``config.json``; otherwise the
    error every reader of a checkpoint gives (the CLI checks each ``--ckpt`` with it first):
    FileNotFoundError (no such path; no config.json in it) or NotADirectoryError."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: not a checkpoint (no such file or directory)")
    if not ckpt.is_dir():
        raise NotADirectoryError(f"{ckpt}: not a checkpoint (a file, not a directory)")
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: not a checkpoint (no config.json)")
    return ckpt


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an lsw-jax checkpoint (a config.json this module wrote)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "lsw_jax_config" in raw


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_directory(
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    replaces: Callable[[Path], bool] = is_checkpoint,
    what: str = "an lsw-jax checkpoint",
) -> Iterator[Path]:
    """Yield a scratch directory beside ``dst``; publish it by rename only on success.

    ``overwrite`` replaces an existing ``dst`` only when it is an empty folder or
    ``replaces(dst)`` says it is ``what`` this writer makes: never a folder of user files.
    """
    dst = absolute(dst)
    if dst.exists():
        if not overwrite:
            raise DestinationExists(dst)
        if not (_is_empty_dir(dst) or (dst.is_dir() and replaces(dst))):
            raise FileExistsError(
                f"{dst} exists and is not {what}: refusing to replace it (overwrite only "
                "replaces what this command wrote); remove it yourself or pick another path"
            )
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


# ---------------------------------------------------------------------- config


def write_config(ckpt: str | os.PathLike, cfg: ModelConfig) -> None:
    payload = {"format": FORMAT_VERSION, "lsw_jax_config": cfg.to_dict()}
    (Path(ckpt) / "config.json").write_text(json.dumps(payload, indent=2))


_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)


def _read_checkpoint_json(ckpt: Path) -> dict[str, Any]:
    path = check_checkpoint_dir(ckpt) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("lsw_jax_config"), dict):
        raise CheckpointError(
            f"{path}: not an lsw-jax checkpoint config (expected an object with "
            f"'format' and 'lsw_jax_config'); an HF model folder must be converted first: "
            f"lsw-jax convert {ckpt} DST"
        )
    fmt = raw.get("format")
    if fmt not in KNOWN_FORMATS:
        raise CheckpointError(
            f"{path}: checkpoint format {fmt!r} is not one this lsw-jax reads "
            f"{list(KNOWN_FORMATS)}; {REFORMAT_HINT}"
        )
    return raw


def read_config(ckpt: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint; a clear error for anything but one we wrote."""
    ckpt = Path(ckpt)
    fields = _read_checkpoint_json(ckpt)["lsw_jax_config"]
    path = ckpt / "config.json"
    for name in _POSITIVE_INT_FIELDS:
        v = fields.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(
                f"{path}: lsw_jax_config.{name} = {v!r}, expected an integer >= 1"
            )
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: invalid lsw_jax_config: {e}") from None


# ---------------------------------------------------------------------- writing


def save_params_streaming(
    ckpt: str | os.PathLike,
    paths: Iterable[StatePath],
    tensors: Iterable[tuple[StatePath, np.ndarray]],
    *,
    dtype: Any = None,
    progress: Any = None,
) -> None:
    """Write ``(state path, array)`` pairs group by group into ``ckpt/params``, and the
    manifest (shape, dtype, crc32 of every array) last.

    ``paths``: every path the checkpoint holds; a group is written (and freed) as soon as
    its last array arrives."""
    params = absolute(ckpt) / "params"
    expected: dict[str, int] = {}
    for path in paths:
        g = _group_of(path)
        expected[g] = expected.get(g, 0) + 1
    pending: dict[str, dict[str, np.ndarray]] = {}
    manifest: dict[str, dict[str, Any]] = {}
    checkpointer = ocp.StandardCheckpointer()
    for path, arr in tensors:
        g, key = _group_of(path), _key_in_group(path)
        out = np.asarray(arr, dtype=dtype) if dtype is not None else np.array(arr)
        pending.setdefault(g, {})[key] = out
        manifest[f"{g}/{key}"] = {
            "shape": list(out.shape),
            "dtype": str(out.dtype),
            "crc32": array_checksum(out),
        }
        if progress is not None:
            progress.update(1)
        if len(pending[g]) == expected[g]:
            checkpointer.save(params / g, pending.pop(g))
            checkpointer.wait_until_finished()
    checkpointer.close()
    if pending:  # map_hf_tensors already raised on missing keys; this guards other callers
        raise ValueError(f"incomplete parameter groups: {sorted(pending)}")
    payload = {"checksum": "crc32", "arrays": dict(sorted(manifest.items()))}
    (params / MANIFEST).write_text(json.dumps(payload, indent=1))


# ---------------------------------------------------------------------- reading


def _read_manifest(ckpt: Path, fmt: int) -> dict[str, dict[str, Any]] | None:
    path = ckpt / "params" / MANIFEST
    if fmt < 2:
        return None
    if not path.exists():
        raise CheckpointError(f"{path}: missing (format {fmt} records every array there)")
    try:
        raw = json.loads(path.read_text())
        arrays = raw["arrays"]
        if raw.get("checksum") != "crc32" or not isinstance(arrays, dict):
            raise ValueError(f"unknown checksum {raw.get('checksum')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest: {e}; {REFORMAT_HINT}") from None
    return arrays


def _check_groups(ckpt: Path, groups: Iterable[str]) -> None:
    """The params folder holds exactly the groups the config implies."""
    params = ckpt / "params"
    on_disk = {p.name for p in params.iterdir() if p.is_dir()} if params.is_dir() else set()
    want = set(groups)
    missing, extra = sorted(want - on_disk), sorted(on_disk - want)
    if missing:
        raise CheckpointError(
            f"{params}: missing parameter groups {missing[:4]} that config.json implies "
            "(config.json edited, or an incomplete copy?)"
        )
    if extra:
        raise CheckpointError(
            f"{params}: holds parameter groups {extra[:4]} that config.json does not imply "
            "(config.json edited?): the config does not match the weights"
        )


def _stored_arrays(gdir: Path, checkpointer: Any) -> dict[str, Any]:
    try:
        return dict(checkpointer.metadata(gdir).item_metadata.tree)
    except Exception as e:  # orbax raises many types; name the folder and the cause
        raise CheckpointError(f"{gdir}: unreadable Orbax metadata: {first_line(e)}") from None


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (Orbax errors run to pages)."""
    text = str(e).strip().splitlines()
    line = text[0].split(" See full TensorStore details")[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line[:limit]}"


def _check_group(
    gdir: Path,
    group: str,
    want: dict[str, tuple[int, ...]],
    stored: dict[str, Any],
    manifest: dict[str, dict[str, Any]] | None,
) -> None:
    """Names and shapes on disk (and in the manifest) == those the config implies."""
    missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{gdir}: arrays do not match config.json: missing {missing[:4]}, "
            f"unexpected {extra[:4]}"
        )
    for key, shape in want.items():
        got = tuple(stored[key].shape)
        if got != tuple(shape):
            raise CheckpointError(
                f"{gdir}: array {key!r} has shape {got}, config.json implies {tuple(shape)}"
            )
        if manifest is None:
            continue
        entry = manifest.get(f"{group}/{key}")
        if entry is None:
            raise CheckpointError(f"{gdir.parent / MANIFEST}: no entry for array {group}/{key}")
        if tuple(entry["shape"]) != got or entry["dtype"] != str(np.dtype(stored[key].dtype)):
            raise CheckpointError(
                f"{gdir}: array {key!r} is {np.dtype(stored[key].dtype)}{list(got)} on disk, "
                f"the manifest says {entry['dtype']}{entry['shape']}"
            )


def _by_group(
    layout: Mapping[StatePath, tuple[int, ...]],
) -> dict[str, list[tuple[StatePath, tuple[int, ...]]]]:
    out: dict[str, list[tuple[StatePath, tuple[int, ...]]]] = {}
    for path, shape in layout.items():
        out.setdefault(_group_of(path), []).append((path, tuple(shape)))
    return out


def load_params(
    ckpt: str | os.PathLike,
    layout: Mapping[StatePath, tuple[int, ...]],
    *,
    dtype: Any,
    shardings: Any = None,
    verify_checksums: bool = True,
) -> Iterator[tuple[StatePath, jax.Array]]:
    """Restore every array of ``layout`` (path -> shape), cast to ``dtype``.

    Before any array is read (metadata only), the names and shapes on disk must be exactly
    ``layout``'s (a CheckpointError names the array and folder otherwise). ``verify_checksums``: each
    array's bytes must match the manifest's crc32 (computed on the host copy before it
    goes to a device; skipped for arrays not fully addressable by this process, and for
    format 1 checkpoints, which have no manifest). ``shardings(path) -> Sharding``
    restores each array directly into its target sharding.
    """
    ckpt = absolute(ckpt)
    fmt = _read_checkpoint_json(ckpt)["format"]
    manifest = _read_manifest(ckpt, fmt)
    by_group = _by_group(layout)
    _check_groups(ckpt, by_group)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = {}  # group -> key -> Orbax ArrayMetadata; every group checked before reading
        for group, entries in by_group.items():
            gdir = ckpt / "params" / group
            stored[group] = _stored_arrays(gdir, checkpointer)
            want = {_key_in_group(p): s for p, s in entries}
            _check_group(gdir, group, want, stored[group], manifest)
        check = verify_checksums and manifest is not None
        # Pipelined: group i's checksums run on a thread (zlib releases the GIL) while
        # Orbax restores group i+1; group i is handed out only once it verified.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crc32") as crc:
            pending = None
            for group, entries in by_group.items():
                gdir = ckpt / "params" / group
                restored = _restore_group(checkpointer, gdir, entries, stored[group], shardings)
                sums = crc.submit(_group_checksums, restored) if check else None
                if pending is not None:
                    yield from _verified(*pending, manifest, dtype)
                pending = (gdir, group, entries, restored, sums)
            if pending is not None:
                yield from _verified(*pending, manifest, dtype)


def _group_checksums(restored: dict[str, Any]) -> dict[str, int | None]:
    """crc32 per array; None for one another process holds part of (multi-host)."""
    return {
        key: None
        if isinstance(arr, jax.Array) and not arr.is_fully_addressable
        else array_checksum(np.asarray(arr))
        for key, arr in restored.items()
    }


def _verified(
    gdir: Path,
    group: str,
    entries: list,
    restored: dict[str, Any],
    sums: concurrent.futures.Future | None,
    manifest: dict[str, dict[str, Any]] | None,
    dtype: Any,
) -> Iterator[tuple[StatePath, jax.Array]]:
    got = sums.result() if sums is not None else {}
    for p, _ in entries:
        key = _key_in_group(p)
        want = manifest[f"{group}/{key}"]["crc32"] if manifest is not None else None
        if got.get(key) is not None and got[key] != want:
            raise CheckpointError(
                f"{gdir}: array {key!r} fails its checksum (crc32 {got[key]:#010x}, recorded "
                f"{want:#010x}): the file is corrupt; {REFORMAT_HINT} (or pass "
                "verify_checksums=False / --no-verify-checksums to load it anyway)"
            )
        yield p, jnp.asarray(restored[key], dtype)


def _restore_group(
    checkpointer: Any, gdir: Path, entries: list, stored: dict[str, Any], shardings: Any
) -> dict[str, Any]:
    """One group's arrays in their stored dtype (the checksums cover those bytes): into
    ``shardings(path)`` when given, else to host numpy (checksums then read host memory)."""
    target = {}
    for p, shape in entries:
        dtype = stored[_key_in_group(p)].dtype
        target[_key_in_group(p)] = (
            jax.ShapeDtypeStruct(shape, dtype, sharding=shardings(p))
            if shardings
            else np.empty(shape, dtype)
        )
    try:
        return checkpointer.restore(gdir, target)
    except Exception as e:  # orbax raises many types; name the group and cause
        raise CheckpointError(f"{gdir}: cannot restore parameters: {first_line(e)}") from e

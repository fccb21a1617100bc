"""The one place that decides, per op, shape and backend, which implementation runs.

`impl` of every public op:
  "auto"       off a GPU: the jnp reference (XLA). On a GPU: at decode sizes (N <= 16) the
               one-launch kernel (`lora_fused`); above, the measured winner for the shape
               and row count from `pallas_kernels.tuning` (Pallas Triton kernel, Mosaic GPU
               kernel or XLA), XLA where nothing was measured.
  "pallas"     the Pallas Triton kernel: `lora_fused` at decode sizes, `lora_unmerged`'s
               two-launch kernel above (interpret mode off a GPU unless `interpret` is given).
  "mosaic"     the Pallas Mosaic GPU kernel (jax >= 0.11; unmerged op only).
  "reference"  the pure-jnp reference, compiled by XLA.
Block sizes: the table's measured blocks for the shape, else `_heuristic_*` (unmeasured).
`override(unmerged="reference")` swaps what "auto" means inside a `with` block, for callers
that cannot pass `impl` down (benchmarks). It is read when a function is traced: a jitted
function traced before the `with` keeps its choice (clear jax's caches, or pass `impl`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import lora_unmerged_mosaic, tuning
from pallas_kernels.common import on_gpu

IMPLS = ("auto", "pallas", "mosaic", "reference")
OPS = ("unmerged", "switch")
NUM_SMS = 132  # H100 SXM / H200; the heuristic aims at >= 2 programs per SM
_OVERRIDE: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one call runs: impl ("fused" | "pallas" | "mosaic" | "reference"), interpret
    mode, blocks. "fused" is the one-launch kernel of `lora_fused` (decode sizes), "pallas"
    the two-launch kernel of `lora_unmerged` (XLA shrink, then base + expand)."""

    impl: str
    interpret: bool
    blocks: dict
    source: str  # where the blocks / the impl came from (table entry or "heuristic")


@contextlib.contextmanager
def override(**impls: str) -> Iterator[None]:
    """Within the block, impl="auto" of op `name` means `impls[name]` (e.g. unmerged="pallas")."""
    for op, impl in impls.items():
        if op not in OPS:
            raise ValueError(f"override op {op!r} must be one of {OPS}")
        check_impl(impl)
    saved = dict(_OVERRIDE)
    _OVERRIDE.update(impls)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    return impl


def resolve_impl(impl: str, interpret: bool | None) -> tuple[str, bool]:
    """Backend level: off a GPU "auto" is the reference (and Pallas runs interpreted); on a
    GPU "auto" stays for the per-shape table (`pick_unmerged`, `pick_switch`)."""
    check_impl(impl)
    gpu = on_gpu()
    if impl == "auto" and not gpu:
        impl = "reference"
    return impl, (not gpu) if interpret is None else interpret


def overridden(op: str, impl: str) -> str:
    """impl, or what `override` set for `op` when impl is "auto"."""
    return _OVERRIDE.get(op, impl) if impl == "auto" else impl


def _table_pick(table_impl: str | None) -> str:
    if table_impl == "mosaic" and not mosaic_available():
        return "reference"
    return table_impl or "reference"


def mosaic_available() -> bool:
    """Whether this jax can run the Mosaic GPU unmerged kernel (see lora_unmerged_mosaic)."""
    return lora_unmerged_mosaic.AVAILABLE


# ----------------------------------------------------------------------------- unmerged


def _heuristic_unmerged(n: int, out: int, d_in: int) -> dict:
    """Unmeasured blocks: narrow out blocks, long K loops, split-K below 2 programs per SM."""
    if n > 64:  # prefill: a GEMM tile
        return dict(block_rows=64, block_out=64, block_k=64, split_k=1, num_warps=4, num_stages=3)
    bn = 16 if n <= 16 else pl.next_power_of_2(n)
    bo = 64 if out >= 16384 else 32 if out >= 8192 else 16
    bk = 256
    programs = pl.cdiv(out, bo) * pl.cdiv(n, bn)
    split = 1
    while programs * split < 2 * NUM_SMS and d_in // (bk * split * 2) >= 4:
        split *= 2
    return dict(
        block_rows=bn,
        block_out=bo,
        block_k=bk,
        split_k=split,
        num_warps=4,
        num_stages=4 if bo <= 16 else 3,
    )


def unmerged_entry(n: int, out: int, d_in: int) -> dict | None:
    """The table entry for (out, in) covering N rows, or None."""
    for entry in tuning.UNMERGED.get((out, d_in), []):
        if n <= entry["n_max"]:
            return entry
    return None


FUSED_MAX_ROWS = 16  # decode sizes: the one-launch kernel (`lora_fused`) below this


def _heuristic_fused(n: int, rank: int) -> dict:
    """Unmeasured blocks of the one-launch kernel: split_k = 1 (one launch); out blocks at
    least n x 2 x rank wide, so that the A tiles each program re-reads (n rows, top-2, the
    stacked rank; see `lora_fused`) weigh no more than its W tile, from 32 up to 128
    (registers: the gathered B tile is [16, block_out, 16])."""
    bo = min(128, max(32, pl.next_power_of_2(2 * n * rank)))
    return dict(block_rows=16, block_out=bo, block_k=64, split_k=1, num_warps=4, num_stages=3)


def pick_unmerged(
    impl: str, interpret: bool, *, n: int, out: int, d_in: int, rank: int, dtype
) -> Choice:
    """Choice for `lora_unmerged` with x [n, d_in], W [out, d_in], rank `rank`; impl and
    interpret as `resolve_impl` returns them ("auto" only on a GPU: the table decides).
    At decode sizes (n <= FUSED_MAX_ROWS) "auto" and "pallas" are the one-launch kernel
    (Choice.impl "fused"), its blocks from the table's "fused_blocks" when measured."""
    check_impl(impl)
    entry = unmerged_entry(n, out, d_in)
    if n <= FUSED_MAX_ROWS and impl in ("auto", "pallas"):
        if entry is not None and "fused_blocks" in entry:
            return Choice("fused", interpret, dict(entry["fused_blocks"]), entry["source"])
        return Choice("fused", interpret, _heuristic_fused(n, rank), "heuristic (unmeasured)")
    if impl == "auto":
        impl = _table_pick(entry["impl"] if entry else None)
        if impl == "mosaic" and not lora_unmerged_mosaic.supports(n, out, d_in, rank, dtype):
            impl = "pallas"  # a measured pick outside the Mosaic kernel's limits (fp32, dims)
    if impl == "reference":
        return Choice(impl, interpret, {}, entry["source"] if entry else "no measurement")
    key = "mosaic_blocks" if impl == "mosaic" else "blocks"
    if entry is not None and key in entry:
        return Choice(impl, interpret, dict(entry[key]), entry["source"])
    blocks = mosaic_blocks(n, out, d_in) if impl == "mosaic" else _heuristic_unmerged(n, out, d_in)
    return Choice(impl, interpret, blocks, "heuristic (unmeasured)")


def mosaic_blocks(n: int, out: int, d_in: int) -> dict:
    """Blocks of the Mosaic GPU unmerged kernel (unmeasured): 64 W rows per program, split-K
    up to >= 2 programs per SM while each split keeps >= 8 pipeline steps of 64."""
    del n
    split = 1
    while (
        (out // 64) * split < 2 * NUM_SMS
        and d_in % (64 * split * 2) == 0
        and d_in // (64 * split * 2) >= 8
    ):
        split *= 2
    return dict(block_k=64, split_k=split, max_concurrent_steps=4)


# ----------------------------------------------------------------------------- switch


SMEM_BUDGET = 160 * 1024  # of an estimate; the sm_90 compile test checks the real use <= 227 KB


def switch_smem(blocks: dict, rank: int, n_slots: int, itemsize: int) -> int:
    """Shared memory the switch kernel's software pipeline holds (upper estimate): per stage
    the W tile and the n_slots A tiles of one `in` step."""
    r_blk = max(16, pl.next_power_of_2(rank))
    per_step = (blocks["block_out"] + n_slots * r_blk) * blocks["block_in"] * itemsize
    return blocks.get("num_stages", 3) * per_step


def _heuristic_switch(rank: int, n_slots: int, itemsize: int) -> dict:
    """Unmeasured: each program owns 32 rows of W and loops over `in` (B tiles read once),
    in steps as wide as the shared memory allows (A tiles of every slot are pipelined too)."""
    blocks = dict(block_out=32, block_in=256, steps=None, num_warps=4, num_stages=3)
    while blocks["block_in"] > 32 and switch_smem(blocks, rank, n_slots, itemsize) > SMEM_BUDGET:
        blocks["block_in"] //= 2
    return blocks


def pick_switch(
    impl: str, interpret: bool, *, out: int, d_in: int, rank: int, n_slots: int, dtype
) -> Choice:
    """Choice for the switch / merge kernel on W [L, out, d_in] with `n_slots` experts of rank
    `rank` per call; impl and interpret as `resolve_impl` returns them. "auto" on a GPU is the
    kernel: XLA's reference writes an fp32 [L, out, in] delta besides W (3x the traffic)."""
    check_impl(impl)
    if impl == "auto":
        impl = "pallas"
    if impl == "mosaic":
        raise ValueError("impl='mosaic' has no switch-merge kernel; use 'pallas' or 'reference'")
    itemsize = jnp.dtype(dtype).itemsize
    entry = tuning.SWITCH.get((out, d_in))
    # a measured entry holds for ranks whose pipeline still fits (it was measured at r = 16)
    if entry and switch_smem(entry["blocks"], rank, n_slots, itemsize) <= SMEM_BUDGET:
        return Choice(impl, interpret, dict(entry["blocks"]), entry["source"])
    blocks = _heuristic_switch(rank, n_slots, itemsize)
    return Choice(impl, interpret, blocks, "heuristic (unmeasured)")

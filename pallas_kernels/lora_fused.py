"""One launch per adapted linear at decode sizes: base product, shrink and expand fused.

Same semantics and arguments as `pallas_kernels.lora_unmerged` (b over rows, j over the k
expert slots of a row, the LoRA scaling folded into `g`):

    y[b] = x[b] @ W.T + bias + sum_j g[b, j] * (x[b] @ A[e[b, j]].T) @ B[e[b, j]].T

What differs from `lora_unmerged_pallas`: nothing runs in XLA on the adapter banks. Every
output-block program of the grid (row blocks, out blocks, K splits) streams its W tile
through the K loop and, in the same loop, accumulates each row's shrink u[b, j] =
x[b] @ A[e[b, j]].T from A tiles gathered per row (ids are an ordinary int32 input; A comes
from L2 after the first program reads it). After the loop each row's k expanded terms
g * u @ B[e].T are added from B tiles gathered the same way: k loads per rank chunk,
not a walk over the E experts. The shrink is recomputed by every out-block program.

Split-K (`split_k > 1`): each split sums its share of K for the base product and the shrink
and expands its partial shrink; the expand is linear in u, so the splits' partial outputs
add up to y (one XLA sum of the [S, N, out] partials; split_k = 1 is a single launch).

Bytes. W is read once from HBM (out x in). Each out-block program re-reads, per row of its
row block, k x R x in of A (R = the stacked rank; from L2 once any program fetched it; rows
of one program that share an expert hit the same lines): in all
ceil(out / block_out) x N x k x R x in elements, i.e. N x k x R / block_out times W's
bytes. At N = 1, k = 2, R = 48 (a q|k|v bank of rank 16): 0.75x W's bytes at
block_out = 128, 0.375x at 256; at N = 16: 12x at 128 (L2 traffic, 16 rows of distinct
experts), which is why N = 16 wants the widest out blocks the registers allow.

Registers. Triton keeps a whole tile in registers: the A gather of one step is
[block_rows, RANK_CHUNK, a_chunk] and the B gather [block_rows, block_out, RANK_CHUNK];
the rank is walked in chunks of RANK_CHUNK and A's K tile in chunks of `a_chunk` so that
neither exceeds TILE_ELEMENTS.

The bare model's linear runs the same kernel with no expert slot (`linear_pallas`: k = 0,
nothing gathered), so base and LoRA-Switch decode compare on one code path; XLA's dot
(`pallas_kernels.project`) stays the baseline.

File order: kernel body -> jitted Pallas wrappers. The reference is
`lora_unmerged.lora_unmerged_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import block_size, check_triton_args, k_splits, split_output, sum_splits

__all__ = ["linear_pallas", "lora_fused_pallas"]

RANK_CHUNK = 16  # rank columns per gathered tile (Triton's smallest dot-able width)
TILE_ELEMENTS = 8192  # largest gathered tile kept in registers


# ----------------------------------------------------------------------------- kernel body


def _fused_one_pass_kernel(
    x_ref,
    w_ref,
    *rest,
    n_rows,
    out,
    d_in,
    rank,
    k,
    bk,
    a_chunk,
    steps,
    has_bias,
):
    # Blocks: x [bn, in_pad]; w [bo, in_pad]; a [E, r_pad, in_pad] (the whole bank);
    # b [E, bo, r_pad]; e, g [bn, k]; bias [bo]; y [bn, bo] (or of the [S, N, out] partials).
    # Blocks overhang the arrays where dims are not multiples: loads and stores are masked.
    # k = 0 (the bare linear): no bank refs at all.
    a_ref, b_ref, e_ref, g_ref = rest[:4] if k else (None,) * 4
    rest = rest[4:] if k else rest
    if has_bias:
        bias_ref, y_ref = rest
    else:
        (y_ref,) = rest
    bn, bo = y_ref.shape
    n_rchunks = pl.cdiv(rank, RANK_CHUNK)
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ok = jnp.arange(bn) < n_rows - i * bn  # [bn]
    o_ok = jnp.arange(bo) < out - j * bo  # [bo]
    # Rows past N gather expert 0 with every load masked: they read nothing.
    ids = [plgpu.load(e_ref.at[:, jnp.int32(q)], mask=row_ok, other=0) for q in range(k)]

    def r_mask(c: int):  # [RANK_CHUNK] valid rank columns of chunk c
        return c * RANK_CHUNK + jnp.arange(RANK_CHUNK) < rank

    def k_step(t, carry):
        acc, us = carry
        c0 = (s * steps + t) * bk
        c_ok = c0 + jnp.arange(bk) < d_in  # [bk]
        x = plgpu.load(x_ref.at[:, pl.ds(c0, bk)], mask=row_ok[:, None] & c_ok, other=0)
        w = plgpu.load(w_ref.at[:, pl.ds(c0, bk)], mask=o_ok[:, None] & c_ok, other=0)
        # x [bn, bk] . w [bo, bk] over bk -> [bn, bo]
        acc = acc + lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        us = list(us)
        for h in range(bk // a_chunk):  # the shrink, on A tiles gathered per row
            h0 = c0 + h * a_chunk
            h_ok = h0 + jnp.arange(a_chunk) < d_in
            xh = plgpu.load(
                x_ref.at[:, pl.ds(h0, a_chunk)], mask=row_ok[:, None] & h_ok, other=0
            ).astype(jnp.float32)[:, None, :]  # [bn, 1, a_chunk]
            for q in range(k):
                for c in range(n_rchunks):
                    mask = row_ok[:, None, None] & r_mask(c)[None, :, None] & h_ok[None, None]
                    where = _gather_index(ids[q], c * RANK_CHUNK + _iota(1), h0 + _iota(2, a_chunk))
                    # [bn, RANK_CHUNK, a_chunk]: row b's expert e[b, q]
                    a = plgpu.load(a_ref.at[where], mask=mask, other=0)
                    us[q * n_rchunks + c] += jnp.sum(a.astype(jnp.float32) * xh, axis=2)
        return acc, tuple(us)

    zeros_u = tuple(jnp.zeros((bn, RANK_CHUNK), jnp.float32) for _ in range(k * n_rchunks))
    acc, us = lax.fori_loop(0, steps, k_step, (jnp.zeros((bn, bo), jnp.float32), zeros_u))
    for q in range(k):  # the expand: k gathered B tiles per rank chunk
        gate = plgpu.load(g_ref.at[:, jnp.int32(q)], mask=row_ok, other=0).astype(jnp.float32)
        for c in range(n_rchunks):
            mask = row_ok[:, None, None] & o_ok[None, :, None] & r_mask(c)[None, None, :]
            where = _gather_index(ids[q], _iota(1, bo), c * RANK_CHUNK + _iota(2))
            bt = plgpu.load(b_ref.at[where], mask=mask, other=0)  # [bn, bo, RANK_CHUNK]
            # u = g * x @ A.T rounded to B's dtype before the expand, as the reference does
            u = (us[q * n_rchunks + c] * gate[:, None]).astype(bt.dtype).astype(jnp.float32)
            acc = acc + jnp.sum(bt.astype(jnp.float32) * u[:, None, :], axis=2)
    if has_bias:
        first = (s == 0).astype(jnp.float32)  # split 0 adds the bias
        acc = acc + first * plgpu.load(bias_ref, mask=o_ok, other=0).astype(jnp.float32)[None]
    plgpu.store(y_ref, acc.astype(y_ref.dtype), mask=row_ok[:, None] & o_ok[None, :])


def _iota(axis: int, size: int = RANK_CHUNK) -> jax.Array:
    """0..size-1 along ``axis`` of a 3-d index."""
    shape = [1, 1, 1]
    shape[axis] = size
    return jnp.arange(size).reshape(shape)


def _gather_index(rows: jax.Array, dim1: jax.Array, dim2: jax.Array) -> tuple:
    """A 3-d gather index [bn, d1, d2] into a [E, d1, d2] bank: row b reads expert
    ``rows[b]``. Every component is an array (Pallas' interpret mode cannot mix array
    indices with slices; the Triton lowering turns either into pointer arithmetic)."""
    shape = (rows.shape[0], dim1.shape[1], dim2.shape[2])
    return tuple(jnp.broadcast_to(t, shape) for t in (rows[:, None, None], dim1, dim2))


# ----------------------------------------------------------------------------- wrapper


def a_chunk_for(block_rows: int, block_k: int) -> int:
    """Columns of A's K tile per gather: [block_rows, RANK_CHUNK, chunk] <= TILE_ELEMENTS."""
    return min(block_k, max(16, TILE_ELEMENTS // (block_rows * RANK_CHUNK)))


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_rows",
        "block_out",
        "block_k",
        "split_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def lora_fused_pallas(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e: jax.Array,
    g: jax.Array,
    bias: jax.Array | None = None,
    *,
    block_rows: int = 16,
    block_out: int = 64,
    block_k: int = 64,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """`lora_unmerged` in one Pallas launch (see the module docstring).

    Args: x [N, in]; w [out, in]; a [E, r, in]; b [E, out, r] (same dtype as x: fp32, bf16 or
      fp16); e [N, k] int32 in [0, E); g [N, k]; bias [out] or None. Block sizes are clamped
      to the problem and rounded to powers of two >= 16 (a decode batch of 1 row runs as a
      16-row block, masked). split_k > 1 adds one XLA sum of the splits' partial outputs.
    Returns: y [N, out] in x's dtype (fp32 accumulation).
    """
    check_triton_args(x, w, a, b, e, g, bias, split_k)
    (n, d_in), out = x.shape, w.shape[0]
    n_exp, rank = a.shape[0], a.shape[1]
    k = e.shape[1]
    bn, bo, bk = block_size(block_rows, n), block_size(block_out, out), block_size(block_k, d_in)
    split, steps, in_pad = k_splits(d_in, bk, split_k)
    r_pad = pl.cdiv(rank, RANK_CHUNK) * RANK_CHUNK
    kernel = functools.partial(
        _fused_one_pass_kernel,
        n_rows=n,
        out=out,
        d_in=d_in,
        rank=rank,
        k=k,
        bk=bk,
        a_chunk=a_chunk_for(bn, bk),
        steps=steps,
        has_bias=bias is not None,
    )
    in_specs = [
        pl.BlockSpec((bn, in_pad), lambda i, j, s: (i, 0)),
        pl.BlockSpec((bo, in_pad), lambda i, j, s: (j, 0)),
    ]
    args = [x, w]
    if k:
        in_specs += [
            pl.BlockSpec((n_exp, r_pad, in_pad), lambda i, j, s: (0, 0, 0)),
            pl.BlockSpec((n_exp, bo, r_pad), lambda i, j, s: (0, j, 0)),
            pl.BlockSpec((bn, k), lambda i, j, s: (i, 0)),
            pl.BlockSpec((bn, k), lambda i, j, s: (i, 0)),
        ]
        args += [a, b, e.astype(jnp.int32), g]
    if bias is not None:
        in_specs.append(pl.BlockSpec((bo,), lambda i, j, s: (j,)))
        args.append(bias)
    out_shape, out_spec = split_output(n, out, bn, bo, split, x.dtype)
    y = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), pl.cdiv(out, bo), split),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_fused",
    )(*args)
    return sum_splits(y, x.dtype)


def linear_pallas(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, **blocks) -> jax.Array:
    """``y = x @ w.T + bias`` through the one-launch kernel with no expert slot: the base
    model's linear on the LoRA-Switch code path (x [N, in], w [out, in], bias [out] or None;
    ``blocks`` as `lora_fused_pallas`). The banks are placeholders of one rank-1 expert with
    k = 0 slots: the kernel takes no bank at all (XLA drops the unused placeholders)."""
    (n, d_in), out = x.shape, w.shape[0]
    a = jnp.zeros((1, 1, d_in), x.dtype)
    b = jnp.zeros((1, out, 1), x.dtype)
    e, g = jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.float32)
    return lora_fused_pallas(x, w, a, b, e, g, bias, **blocks)

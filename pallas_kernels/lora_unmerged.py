"""Fused unmerged LoRA-expert linear, every row with its own experts (BGMV style).

Semantics, b over rows (tokens), j over the k slots of a row:

    y[b] = x[b] @ W.T + bias + sum_j g[b, j] * (x[b] @ A[e[b, j]].T) @ B[e[b, j]].T

Layout: Hugging Face `W [out, in]`, PEFT per expert (`A [E, r, in]`, `B [E, out, r]`); the
LoRA scaling alpha/r is folded into `g` (or into B) by the caller. One call applies one linear
of one layer; a fused q|k|v or gate|up linear is one call with its parts' ranks stacked
(A [E, R, in], B [E, out, R] block-structured, R = sum of the parts' ranks).

A linear is two launches (three with split-K):
  1. shrink, in XLA: u[b, j] = g[b, j] * x[b] @ A[e[b, j]].T  -> [N, k, R] fp32 (`lora_shrink`;
     N*k*R outputs). In the fused kernel it would be recomputed by every out block.
  2. the fused Pallas kernel, grid (row blocks, out blocks, K splits): the base GEMM
     x @ W.T (fp32 accumulation over K blocks of one split) and, in split 0, the expand
     sum_j u[b, j] @ B[e[b, j]].T and the bias, in one pass over W. The expand loops over
     the E experts, skips those no row of the block picked, gathers B[e] inside the kernel
     (ids are an ordinary int32 input) and sums the slots of each row that picked it.
  3. split-K only (`split_k > 1`): the [S, N, out] fp32 partial sums are added in XLA.
Filling the GPU at decode sizes (N = 1..16, one row block): narrow out blocks (16-64 rows of
W per program) with a long pipelined K loop, or split-K when out / block_out is below the SM
count (o / down at 7B: 4096 outputs). The block sizes per shape come from
`pallas_kernels.tuning` through `pallas_kernels.dispatch`, which also decides per shape and
backend whether the kernel or the XLA reference runs (`impl="auto"`).

Training uses the dense jnp plan of the model; `lora_unmerged` is differentiable anyway
through a custom_vjp whose backward is the vjp of `lora_unmerged_reference`.

File order: kernel body -> jitted Pallas wrapper -> pure-jnp reference -> dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch, lora_fused, lora_unmerged_mosaic
from pallas_kernels.common import (
    block_size,
    check_triton_args,
    check_unmerged_args,
    k_splits,
    lora_shrink,
    split_output,
    sum_splits,
)
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.project import project

__all__ = ["lora_shrink", "lora_unmerged", "lora_unmerged_pallas", "lora_unmerged_reference"]

_NO_EXPERT = -1  # expert id of rows past N inside a block; never a real id


# ----------------------------------------------------------------------------- kernel body


def _fused_kernel(
    x_ref, w_ref, b_ref, u_ref, e_ref, *rest, n_rows, out, d_in, rank, n_exp, k, bk, steps, has_bias
):
    # Blocks: x [bn, in_pad]; w [bo, in_pad]; b [E, bo, r_blk]; u [bn, k, r_blk] fp32;
    # e [bn, k] int32; bias [bo]; y [bn, bo] (or [bn, bo] of the [S, N, out] partials).
    # Blocks overhang the arrays where dims are not multiples of the block: loads and stores
    # are masked, nothing is padded.
    if has_bias:
        bias_ref, y_ref = rest
    else:
        (y_ref,) = rest
    bn, bo = y_ref.shape
    r_blk = u_ref.shape[2]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ok = jnp.arange(bn) < n_rows - i * bn  # [bn]
    o_ok = jnp.arange(bo) < out - j * bo  # [bo]
    r_ok = jnp.arange(r_blk) < rank  # [r_blk]

    def k_step(t, acc):
        c0 = (s * steps + t) * bk
        c_ok = c0 + jnp.arange(bk) < d_in  # [bk]
        x = plgpu.load(x_ref.at[:, pl.ds(c0, bk)], mask=row_ok[:, None] & c_ok, other=0)
        w = plgpu.load(w_ref.at[:, pl.ds(c0, bk)], mask=o_ok[:, None] & c_ok, other=0)
        # x [bn, bk] . w [bo, bk] over bk -> [bn, bo]
        return acc + lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, steps, k_step, jnp.zeros((bn, bo), jnp.float32))

    def lora_and_bias(acc):
        e_slots = [
            plgpu.load(e_ref.at[:, jnp.int32(q)], mask=row_ok, other=_NO_EXPERT) for q in range(k)
        ]
        # each [bn, r_blk] fp32; masked: a decode batch has fewer rows than bn, R < r_blk
        u_slots = [
            plgpu.load(
                u_ref.at[:, jnp.int32(q), :], mask=row_ok[:, None] & r_ok[None, :], other=0.0
            )
            for q in range(k)
        ]

        def expert_step(ex, acc):
            hits = [(es == ex)[:, None] for es in e_slots]  # k x [bn, 1]
            # (a sum, not .any(): Triton's lowering has no reduce_or)
            used = sum(jnp.where(h, 1, 0).sum() for h in hits) > 0

            def expand(acc):
                # u_e[b] = sum of the slots of row b that picked expert ex; [bn, r_blk]
                u_e = sum(jnp.where(h, us, 0.0) for h, us in zip(hits, u_slots, strict=True))
                bt = plgpu.load(b_ref.at[ex], mask=o_ok[:, None] & r_ok[None, :], other=0)
                # u_e [bn, r_blk] . B[e] [bo, r_blk] over r -> [bn, bo]; u rounded to B's dtype
                return acc + lax.dot_general(
                    u_e.astype(bt.dtype),
                    bt,
                    (((1,), (1,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )

            return lax.cond(used, expand, lambda acc: acc, acc)

        acc = lax.fori_loop(0, n_exp, expert_step, acc)
        if has_bias:
            acc = acc + plgpu.load(bias_ref, mask=o_ok, other=0).astype(jnp.float32)[None, :]
        return acc

    acc = lax.cond(s == 0, lora_and_bias, lambda acc: acc, acc)  # split 0 adds LoRA + bias
    plgpu.store(y_ref, acc.astype(y_ref.dtype), mask=row_ok[:, None] & o_ok[None, :])


# ----------------------------------------------------------------------------- wrapper


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
def lora_unmerged_pallas(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e: jax.Array,
    g: jax.Array,
    bias: jax.Array | None = None,
    *,
    block_rows: int = 16,
    block_out: int = 32,
    block_k: int = 256,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """`lora_unmerged` through the fused Pallas kernel (see the module docstring).

    Args: x [N, in]; w [out, in]; a [E, r, in]; b [E, out, r] (same dtype as x: fp32, bf16 or
      fp16); e [N, k] int32 in [0, E); g [N, k]; bias [out] or None. Block sizes are clamped
      to the problem and rounded to powers of two >= 16 (Triton's dot needs every dim >= 16,
      so a decode batch of 1 row still runs as a 16-row block, masked). split_k: programs
      along `in` (each sums its share of the K blocks; >1 adds one XLA reduction).
    Returns: y [N, out] in x's dtype (fp32 accumulation).
    """
    check_triton_args(x, w, a, b, e, g, bias, split_k)
    (n, d_in), out = x.shape, w.shape[0]
    n_exp, rank = a.shape[0], a.shape[1]
    k = e.shape[1]
    bn, bo = block_size(block_rows, n), block_size(block_out, out)
    bk, r_blk = block_size(block_k, d_in), block_size(rank, rank)
    split, steps, in_pad = k_splits(d_in, bk, split_k)
    e = e.astype(jnp.int32)
    u = lora_shrink(x, a, e, g)  # [N, k, r] fp32
    kernel = functools.partial(
        _fused_kernel,
        n_rows=n,
        out=out,
        d_in=d_in,
        rank=rank,
        n_exp=n_exp,
        k=k,
        bk=bk,
        steps=steps,
        has_bias=bias is not None,
    )
    in_specs = [
        pl.BlockSpec((bn, in_pad), lambda i, j, s: (i, 0)),
        pl.BlockSpec((bo, in_pad), lambda i, j, s: (j, 0)),
        pl.BlockSpec((n_exp, bo, r_blk), lambda i, j, s: (0, j, 0)),
        pl.BlockSpec((bn, k, r_blk), lambda i, j, s: (i, 0, 0)),
        pl.BlockSpec((bn, k), lambda i, j, s: (i, 0)),
    ]
    args = [x, w, b, u, e]
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
        name="lora_unmerged",
    )(*args)
    return sum_splits(y, x.dtype)


# ----------------------------------------------------------------------------- reference


@jax.jit
def lora_unmerged_reference(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e: jax.Array,
    g: jax.Array,
    bias: jax.Array | None = None,
) -> jax.Array:
    """Pure-jnp `lora_unmerged` (same arguments): oracle, XLA fallback and backward pass.

    Few rows (N*k <= E, decode) gather just the selected experts' B; many rows weight every
    expert's B by a dense [N, E] gate matrix (no per-row copies of B). u = g * x @ A.T is
    rounded to B's dtype before the expand, as in the kernel; everything accumulates in fp32.
    """
    check_unmerged_args(x, w, a, b, e, g, bias)
    n, k = e.shape
    n_exp = a.shape[0]
    y = project(x, w, preferred_element_type=jnp.float32)  # XLA's fastest form per backend
    u = lora_shrink(x, a, e, g)  # [N, k, r] fp32
    if n * k <= n_exp:
        delta = jnp.einsum(
            "bjr,bjor->bo", u.astype(b.dtype), b[e], preferred_element_type=jnp.float32
        )
    else:
        onehot = jax.nn.one_hot(e, n_exp, dtype=jnp.float32)  # [N, k, E]
        u_dense = jnp.einsum("bje,bjr->ber", onehot, u)  # [N, E, r]
        delta = jnp.einsum(
            "ber,eor->bo", u_dense.astype(b.dtype), b, preferred_element_type=jnp.float32
        )
    y = y + delta
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- dispatch


def lora_unmerged(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e: jax.Array,
    g: jax.Array,
    bias: jax.Array | None = None,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    block_sizes: dict | None = None,
) -> jax.Array:
    """y[b] = x[b] @ W.T + bias + sum_j g[b, j] * (x[b] @ A[e[b, j]].T) @ B[e[b, j]].T.

    Args:
      x: [N, in] rows (decode batch, or flattened prefill tokens); fp32, bf16 or fp16.
      w: [out, in]; a: [E, r, in]; b: [E, out, r] (PEFT layout), dtype of x. A fused linear
        (q|k|v, gate|up) passes its parts' banks stacked along r, B block-structured.
      e: [N, k] int32 expert ids in [0, E); g: [N, k] gates (the LoRA scaling folded in here
        or into B).
      bias: [out] or None.
      impl: "auto" (`pallas_kernels.dispatch` picks, per shape and backend: at N <= 16 on a
        GPU the one-launch kernel of `pallas_kernels.lora_fused`, above it the measured
        winner: the Pallas kernel, the Mosaic GPU kernel or XLA; the reference off-GPU),
        "pallas" (the Pallas kernel for N: one launch at N <= 16), "mosaic" or
        "reference" (XLA) to force one.
      interpret: run Pallas in interpret mode (default: when not on a GPU).
      block_sizes: keyword overrides for the kernel (block_rows, block_out, block_k,
        split_k, num_warps, num_stages); default: the measured table for this shape.
    Returns: y [N, out] in x's dtype. Differentiable: the kernels' backward is the vjp
      of the reference (training itself uses the model's dense jnp plan).
    """
    check_unmerged_args(x, w, a, b, e, g, bias)
    (n, d_in), out = x.shape, w.shape[0]
    impl, interpret = resolve_impl(dispatch.overridden("unmerged", impl), interpret)
    choice = dispatch.pick_unmerged(
        impl, interpret, n=n, out=out, d_in=d_in, rank=a.shape[1], dtype=x.dtype
    )
    if choice.impl == "reference":
        return lora_unmerged_reference(x, w, a, b, e, g, bias)
    blocks = {**choice.blocks, **(block_sizes or {})}
    if choice.impl == "fused":
        fwd = functools.partial(lora_fused.lora_fused_pallas, interpret=choice.interpret, **blocks)
    elif choice.impl == "mosaic":
        fwd = functools.partial(
            lora_unmerged_mosaic.lora_unmerged_mosaic, interpret=choice.interpret, **blocks
        )
    else:
        fwd = functools.partial(lora_unmerged_pallas, interpret=choice.interpret, **blocks)
    return _with_reference_vjp(fwd)(x, w, a, b, e, g, bias)


def _with_reference_vjp(fwd):
    @jax.custom_vjp
    def f(*args):
        return fwd(*args)

    def f_fwd(*args):
        return fwd(*args), args

    def f_bwd(args, ct):
        return jax.vjp(lora_unmerged_reference, *args)[1](ct)

    f.defvjp(f_fwd, f_bwd)
    return f

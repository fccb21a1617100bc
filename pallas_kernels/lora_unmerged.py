"""Fused unmerged LoRA-expert linear, every row with its own experts (BGMV style).

Semantics, b over rows (tokens), j over the k slots of a row:

    y[b] = x[b] @ W.T + bias + sum_j g[b, j] * (x[b] @ A[e[b, j]].T) @ B[e[b, j]].T

Layout: Hugging Face `W [out, in]`, PEFT per expert (`A [E, r, in]`, `B [E, out, r]`); the
LoRA scaling alpha/r is folded into `g` by the caller. One call applies one linear of one
layer (the model calls it per linear).

How the work is split, and why:
  1. shrink, in XLA: u[b, j] = g[b, j] * x[b] @ A[e[b, j]].T   -> [N, k, r], fp32. It is tiny
     (N*k*r outputs). Done inside the fused kernel it would be recomputed for every output
     block; in XLA it is one pass: a gather of the selected A (N*k <= E) or one dense
     x @ A_all.T over all experts followed by a gather of [N, E, r] (N*k > E, prefill).
  2. fused Pallas kernel, grid (row blocks, out blocks): the base GEMM x @ W.T (fp32
     accumulation over K blocks) and the expand sum_j u[b, j] @ B[e[b, j]].T in one pass over
     W. The expand loops over the distinct experts of the batch, gathers B[e] inside the
     kernel (ids are an ordinary int32 input) and skips experts no row of the block uses, so
     a batch that shares one expert set pays k small products per block and a fully diverse
     batch pays at most min(E, N*k).
Prefill uses the same row-block kernel on the flattened [B*T, in] rows; rows sharing experts
(contiguous requests) make each block touch few experts. A sorted/segmented (SGMV) variant is
not provided.

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

from pallas_kernels.switch_merge import block_size, resolve_impl

# GPU defaults (Triton lowering), NOT measured (no GPU was available when written): 16-row
# blocks suit decode batches; re-measure with `autotune_block_sizes` and update this table.
GPU_DEFAULTS = {"block_rows": 16, "block_out": 64, "block_k": 64, "num_warps": 4, "num_stages": 2}

_NO_EXPERT = -2  # expert id of rows past N inside a block; never equals a real id or the fill


# ----------------------------------------------------------------------------- kernel body


def _fused_kernel(
    x_ref, w_ref, b_ref, u_ref, e_ref, uniq_ref, *rest, n_rows, out, d_in, rank, k, bk, has_bias
):
    # Blocks: x [bn, in_pad]; w [bo, in_pad]; b [E, bo, r_blk]; u [bn, k, r_blk] fp32;
    # e [bn, k] int32; uniq [U] int32; bias [bo]; y [bn, bo]. Blocks overhang the arrays
    # where dims are not multiples of the block: loads and stores are masked.
    if has_bias:
        bias_ref, y_ref = rest
    else:
        (y_ref,) = rest
    bn, bo = y_ref.shape
    r_blk = u_ref.shape[2]
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = jnp.arange(bn) < n_rows - i * bn  # [bn]
    o_ok = jnp.arange(bo) < out - j * bo  # [bo]
    r_ok = jnp.arange(r_blk) < rank  # [r_blk]

    def k_step(t, acc):
        c_ok = (t * bk + jnp.arange(bk)) < d_in  # [bk]
        x = plgpu.load(x_ref.at[:, pl.ds(t * bk, bk)], mask=row_ok[:, None] & c_ok, other=0)
        w = plgpu.load(w_ref.at[:, pl.ds(t * bk, bk)], mask=o_ok[:, None] & c_ok, other=0)
        # x [bn, bk] . w [bo, bk] over bk -> [bn, bo]
        return acc + lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, pl.cdiv(d_in, bk), k_step, jnp.zeros((bn, bo), jnp.float32))

    e_slots = [
        plgpu.load(e_ref.at[:, jnp.int32(s)], mask=row_ok, other=_NO_EXPERT) for s in range(k)
    ]
    # each [bn, r_blk] fp32 (rank-padded); masked: a decode batch has fewer rows than bn
    u_slots = [
        plgpu.load(u_ref.at[:, jnp.int32(s), :], mask=row_ok[:, None], other=0.0)
        for s in range(k)
    ]

    def expert_step(q, acc):
        ex = uniq_ref[q]
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

    acc = lax.fori_loop(0, uniq_ref.shape[0], expert_step, acc)
    if has_bias:
        acc = acc + plgpu.load(bias_ref, mask=o_ok, other=0).astype(jnp.float32)[None, :]
    plgpu.store(y_ref, acc.astype(y_ref.dtype), mask=row_ok[:, None] & o_ok[None, :])


# ----------------------------------------------------------------------------- wrapper


def _check(x, w, a, b, e, g, bias):
    if x.ndim != 2 or w.ndim != 2 or a.ndim != 3 or b.ndim != 3:
        raise ValueError(
            f"{x.shape=} must be [N, in], {w.shape=} [out, in], "
            f"{a.shape=} [E, r, in], {b.shape=} [E, out, r]"
        )
    (n, d_in), (out, d_in_w) = x.shape, w.shape
    if d_in_w != d_in or a.shape[2] != d_in:
        raise ValueError(f"{x.shape=}, {w.shape=}, {a.shape=} disagree on in")
    if b.shape != (a.shape[0], out, a.shape[1]):
        raise ValueError(f"{b.shape=} must be [E, out, r] with {w.shape=}, {a.shape=}")
    if e.ndim != 2 or e.shape[0] != n or g.shape != e.shape:
        raise ValueError(f"{e.shape=} and {g.shape=} must both be [N, k] with {x.shape=}")
    if not jnp.issubdtype(e.dtype, jnp.integer):
        raise ValueError(f"{e.dtype=} must be an integer type")
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"{bias.shape=} must be [out] with {w.shape=}")


def lora_shrink(x: jax.Array, a: jax.Array, e: jax.Array, g: jax.Array) -> jax.Array:
    """u[b, j] = g[b, j] * x[b] @ A[e[b, j]].T  -> [N, k, r] fp32.

    x [N, in]; a [E, r, in]; e [N, k] int32; g [N, k]. Gathers the selected A when the rows
    pick few experts (N*k <= E), else one dense product with every expert, then a gather.
    """
    n, k = e.shape
    if n * k <= a.shape[0]:
        xa = jnp.einsum("bi,bjri->bjr", x, a[e], preferred_element_type=jnp.float32)
    else:
        xa_all = jnp.einsum("bi,eri->ber", x, a, preferred_element_type=jnp.float32)
        xa = jnp.take_along_axis(xa_all, e[:, :, None], axis=1)  # [N, k, r]
    return xa * g.astype(jnp.float32)[:, :, None]


@functools.partial(
    jax.jit,
    static_argnames=("block_rows", "block_out", "block_k", "num_warps", "num_stages", "interpret"),
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
    block_rows: int = GPU_DEFAULTS["block_rows"],
    block_out: int = GPU_DEFAULTS["block_out"],
    block_k: int = GPU_DEFAULTS["block_k"],
    num_warps: int = GPU_DEFAULTS["num_warps"],
    num_stages: int = GPU_DEFAULTS["num_stages"],
    interpret: bool = False,
) -> jax.Array:
    """`lora_unmerged` through the fused Pallas kernel (see the module docstring).

    Args: x [N, in]; w [out, in]; a [E, r, in]; b [E, out, r] (same dtype as x: fp32 or
      bf16); e [N, k] int32 in [0, E); g [N, k]; bias [out] or None. Block sizes are clamped
      to the problem and rounded to powers of two >= 16 (Triton's dot needs every dim >= 16,
      so a decode batch of 1 row still runs as a 16-row block, masked).
    Returns: y [N, out] in x's dtype (fp32 accumulation).
    """
    _check(x, w, a, b, e, g, bias)
    (n, d_in), out = x.shape, w.shape[0]
    n_exp, rank = a.shape[0], a.shape[1]
    k = e.shape[1]
    bn, bo = block_size(block_rows, n), block_size(block_out, out)
    bk, r_blk = block_size(block_k, d_in), block_size(rank, rank)
    in_pad = pl.cdiv(d_in, bk) * bk
    e = e.astype(jnp.int32)
    u = lora_shrink(x, a, e, g)
    u = jnp.pad(u, ((0, 0), (0, 0), (0, r_blk - rank)))  # [N, k, r_blk], tiny
    n_uniq = min(n_exp, n * k)  # distinct experts of the batch, padded with -1
    uniq = jnp.unique(e, size=n_uniq, fill_value=-1).astype(jnp.int32)
    kernel = functools.partial(
        _fused_kernel,
        n_rows=n,
        out=out,
        d_in=d_in,
        rank=rank,
        k=k,
        bk=bk,
        has_bias=bias is not None,
    )
    in_specs = [
        pl.BlockSpec((bn, in_pad), lambda i, j: (i, 0)),
        pl.BlockSpec((bo, in_pad), lambda i, j: (j, 0)),
        pl.BlockSpec((n_exp, bo, r_blk), lambda i, j: (0, j, 0)),
        pl.BlockSpec((bn, k, r_blk), lambda i, j: (i, 0, 0)),
        pl.BlockSpec((bn, k), lambda i, j: (i, 0)),
        pl.BlockSpec((n_uniq,), lambda i, j: (0,)),
    ]
    args = [x, w, b, u, e, uniq]
    if bias is not None:
        in_specs.append(pl.BlockSpec((bo,), lambda i, j: (j,)))
        args.append(bias)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), pl.cdiv(out, bo)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bn, bo), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n, out), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_unmerged",
    )(*args)


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

    Rounds like the kernel: the per-expert sum of g * x @ A.T is cast to B's dtype before the
    expand; everything accumulates in fp32.
    """
    _check(x, w, a, b, e, g, bias)
    n_exp = a.shape[0]
    y = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    u = lora_shrink(x, a, e, g)  # [N, k, r] fp32
    onehot = jax.nn.one_hot(e, n_exp, dtype=jnp.float32)  # [N, k, E]
    u_dense = jnp.einsum("bje,bjr->ber", onehot, u)  # [N, E, r]
    y = y + jnp.einsum(
        "ber,eor->bo", u_dense.astype(b.dtype), b, preferred_element_type=jnp.float32
    )
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
      x: [N, in] rows (decode batch, or flattened prefill tokens); fp32 or bf16.
      w: [out, in]; a: [E, r, in]; b: [E, out, r] (PEFT layout), dtype of x.
      e: [N, k] int32 expert ids in [0, E); g: [N, k] gates with the LoRA scaling folded in.
      bias: [out] or None.
      impl: "auto" (Pallas on GPU, reference elsewhere), "pallas" or "reference".
      interpret: run Pallas in interpret mode (default: when not on a GPU).
      block_sizes: keyword overrides for `lora_unmerged_pallas` (block_rows, block_out, ...).
    Returns: y [N, out] in x's dtype. Differentiable: the Pallas path's backward is the vjp
      of the reference (training itself uses the model's dense jnp plan).
    """
    impl, interpret = resolve_impl(impl, interpret)
    if impl == "reference":
        return lora_unmerged_reference(x, w, a, b, e, g, bias)
    fwd = functools.partial(lora_unmerged_pallas, interpret=interpret, **(block_sizes or {}))
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

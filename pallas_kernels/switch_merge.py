"""LoRA-Switch's fused "switch" (SGMM): swap the merged experts of every layer in one call.

Semantics, for one weight group (e.g. all layers' q_proj), l over layers, j over the k slots:

    W_eff[l] <- W_eff[l] - sum_j g_old[j] * B[l, e_old[j]] @ A[l, e_old[j]]
                         + sum_j g_new[j] * B[l, e_new[j]] @ A[l, e_new[j]]

Layout: Hugging Face `W [out, in]` (y = x @ W.T), PEFT per expert (`lora_A.weight [r, in]`,
`lora_B.weight [out, r]`). The LoRA scaling alpha/r is folded into the gates by the caller.

Tiling. Grid (layers, out blocks, in chunks). A program owns `block_out` rows of one layer's
W and loops over its chunk of `in` (by default the whole row) in `block_in` steps: it loads
the 2k B[l, e] row tiles once, streams W and A[l, e] tiles, and stores each updated W tile.
So every B tile is read once from HBM, W is read and written once, and A[l, e] (k * r * in
elements per layer, e.g. 512 KB at 7B) is shared by all programs of a layer from L2. The
earlier one-tile-per-program grid (`steps=1`) re-read every B tile once per `in` block.
Block sizes per shape: `pallas_kernels.tuning` via `pallas_kernels.dispatch`.

File order: kernel body -> jitted Pallas wrapper -> pure-jnp reference -> dispatch
(`switch_merge`, `merge_from_base`) -> re-merge policy.

bf16 drift. Every in-place switch rounds W_eff to bf16 once (|err| <= ulp/2, a relative
2**-9 per element at most), and subtracting the old experts never exactly undoes their earlier
addition, so after n switches W_eff carries n + 1 independent roundings: its error vs an exact
merge grows like sqrt(n + 1) times that of one fresh merge (random walk; n + 1 times in the
worst case). Measured (tests/test_kernel_switch_merge.py, bf16, 2 x 64 x 64, k = 2 of 8):
relative error 0.86 * 2**-9 after a fresh merge, 6.2 * 2**-9 after 50 switches.
`switch_merge_with_remerge` bounds it by re-merging from the base every `remerge_every`
switches (every 10: at most 2.7 * 2**-9, about sqrt(10) fresh merges). Slots whose expert
and gate are unchanged get coefficient exactly 0 (repeated experts are combined before the
kernel), so an expert kept across a switch adds no drift. fp32 drift is 2**16 x smaller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels.common import MIN_BLOCK, block_size, check_dtype  # noqa: F401 (re-exported)
from pallas_kernels.dispatch import resolve_impl

# ----------------------------------------------------------------------------- kernel body


def _switch_kernel(
    w_ref, ids_ref, coef_ref, a_ref, b_ref, o_ref, *, n_slots, out, d_in, rank, bi, steps
):
    # Blocks: w/o [bo, in_pad] of layer l (this program writes `steps` tiles of bi columns
    # of it); a [E, r_blk, in_pad]; b [E, bo, r_blk]; ids/coef [2k]. Blocks may overhang the
    # arrays (out, in, r not multiples of the block): every load and store is masked, so no
    # operand is padded and W stays in place.
    bo = o_ref.shape[0]
    r_blk = a_ref.shape[1]
    i, c = pl.program_id(1), pl.program_id(2)
    o_ok = jnp.arange(bo) < out - i * bo  # [bo]
    r_ok = jnp.arange(r_blk) < rank  # [r_blk]
    slots = []
    for s in range(n_slots):  # 2k, static and small
        ex, coef = ids_ref[s], coef_ref[s]
        # Slots cancelled by the wrapper (kept experts, duplicates) have coef == 0: their
        # loads are masked off (no memory traffic) and add exact zeros.
        live = coef != 0
        # B[l, e] rows of this program: loaded once, kept for the whole loop over `in`
        bt = plgpu.load(b_ref.at[ex], mask=(o_ok[:, None] & r_ok[None, :]) & live, other=0)
        slots.append((ex, coef, live, bt))

    def step(t, carry):
        col0 = (c * steps + t) * bi
        c_ok = col0 + jnp.arange(bi) < d_in  # [bi]
        w_mask = o_ok[:, None] & c_ok[None, :]
        acc = plgpu.load(w_ref.at[:, pl.ds(col0, bi)], mask=w_mask, other=0).astype(jnp.float32)
        for ex, coef, live, bt in slots:
            a_mask = (r_ok[:, None] & c_ok[None, :]) & live
            at = plgpu.load(a_ref.at[ex, :, pl.ds(col0, bi)], mask=a_mask, other=0)
            acc = acc + coef * jnp.dot(bt, at, preferred_element_type=jnp.float32)  # [bo, bi]
        plgpu.store(o_ref.at[:, pl.ds(col0, bi)], acc.astype(o_ref.dtype), mask=w_mask)
        return carry

    lax.fori_loop(0, steps, step, jnp.int32(0))


# ----------------------------------------------------------------------------- wrapper


def _check_bank(w, a, b, ids, coef):
    if w.ndim != 3 or a.ndim != 4 or b.ndim != 4:
        raise ValueError(
            f"{w.shape=} must be [L, out, in], {a.shape=} [L, E, r, in], {b.shape=} [L, E, out, r]"
        )
    n_layers, out, d_in = w.shape
    if a.shape[0] != n_layers or a.shape[3] != d_in:
        raise ValueError(f"{a.shape=} must be [L, E, r, in] with {w.shape=}")
    if b.shape != (n_layers, a.shape[1], out, a.shape[2]):
        raise ValueError(f"{b.shape=} must be [L, E, out, r] with {w.shape=}, {a.shape=}")
    if ids.ndim != 1 or ids.shape != coef.shape:
        raise ValueError(f"{ids.shape=} and {coef.shape=} must both be [k]")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{ids.dtype=} must be an integer type")


def _combine_slots(ids, coef):
    """Sum the coefficients of repeated experts into their first slot (the rest get 0).

    ids [S] int32, coef [S] fp32 -> same shapes. A kept expert (same id, same gate in the old
    and the new selection) thus gets coefficient exactly 0 and is skipped by the kernel.
    """
    same = ids[:, None] == ids[None, :]  # [S, S]
    earlier = jnp.tril(same, k=-1).any(axis=1)  # a previous slot has the same expert
    total = (same * coef[None, :]).sum(axis=1)
    return ids, jnp.where(earlier, 0.0, total).astype(jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=("block_out", "block_in", "steps", "num_warps", "num_stages", "interpret"),
)
def merge_delta_pallas(
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    ids: jax.Array,
    coef: jax.Array,
    *,
    block_out: int = 32,
    block_in: int = 256,
    steps: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """W[l] <- W[l] + sum_s coef[s] * B[l, ids[s]] @ A[l, ids[s]] for all l (Pallas).

    Args:
      w: [L, out, in], updated in place (`input_output_aliases`): donate it at the jit
        boundary of the caller, or XLA inserts a copy.
      a: [L, E, r, in]; b: [L, E, out, r]; same dtype as w (fp32, bf16 or fp16).
      ids: [S] int32 expert indices in [0, E) (gathered inside the kernel).
      coef: [S] float coefficients (negative to subtract).
      block_out: rows of W per program; block_in: columns per loop step (both clamped to
        the problem, powers of two). steps: loop steps per program along `in`; None = the
        whole row, so each program reads its B tiles once and streams W and A (A[l] is
        shared by all programs of layer l and stays in L2). steps=1 is one tile per program.
    Returns: the new W, [L, out, in], dtype of w (fp32 accumulation inside).
    """
    _check_bank(w, a, b, ids, coef)
    for name, t in (("w", w), ("a", a), ("b", b)):
        check_dtype(name, t.dtype)
    n_layers, out, d_in = w.shape
    n_exp, rank = a.shape[1], a.shape[2]
    bo, bi = block_size(block_out, out), block_size(block_in, d_in)
    r_blk = block_size(rank, rank)
    n_iblocks = pl.cdiv(d_in, bi)
    steps = n_iblocks if steps is None else max(1, min(steps, n_iblocks))
    chunks = pl.cdiv(n_iblocks, steps)  # programs along `in`
    in_pad = chunks * steps * bi
    ids, coef = _combine_slots(ids.astype(jnp.int32), coef.astype(jnp.float32))
    n_s = ids.shape[0]
    kernel = functools.partial(
        _switch_kernel, n_slots=n_s, out=out, d_in=d_in, rank=rank, bi=bi, steps=steps
    )
    return pl.pallas_call(
        kernel,
        grid=(n_layers, pl.cdiv(out, bo), chunks),
        in_specs=[
            pl.BlockSpec((None, bo, in_pad), lambda li, i, c: (li, i, 0)),
            pl.BlockSpec((n_s,), lambda li, i, c: (0,)),
            pl.BlockSpec((n_s,), lambda li, i, c: (0,)),
            pl.BlockSpec((None, n_exp, r_blk, in_pad), lambda li, i, c: (li, 0, 0, 0)),
            pl.BlockSpec((None, n_exp, bo, r_blk), lambda li, i, c: (li, 0, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, bo, in_pad), lambda li, i, c: (li, i, 0)),
        out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
        input_output_aliases={0: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_switch_merge",
    )(w, ids, coef, a, b)


# ----------------------------------------------------------------------------- reference


@jax.jit
def merge_delta_reference(
    w: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, coef: jax.Array
) -> jax.Array:
    """Pure-jnp `merge_delta_pallas` (same arguments): oracle and XLA fallback.

    One batched product per layer with the slots stacked along the rank:
    delta[l] = [coef_s * B[l, ids_s]]_s @ [A[l, ids_s]]_s, K = S * r, fp32 accumulation.
    """
    _check_bank(w, a, b, ids, coef)
    a_sel = jnp.take(a, ids, axis=1)  # [L, S, r, in]
    b_sel = jnp.take(b, ids, axis=1).astype(jnp.float32)  # [L, S, out, r]
    b_sel = b_sel * coef.astype(jnp.float32)[None, :, None, None]
    delta = jnp.einsum(
        "lsor,lsri->loi", b_sel, a_sel.astype(jnp.float32), preferred_element_type=jnp.float32
    )  # [L, out, in]
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


# ----------------------------------------------------------------------------- dispatch


def _merge_delta(w, a, b, ids, coef, impl, interpret, block_sizes):
    impl, interpret = resolve_impl(dispatch.overridden("switch", impl), interpret)
    choice = dispatch.pick_switch(
        impl,
        interpret,
        out=w.shape[1],
        d_in=w.shape[2],
        rank=a.shape[2],
        n_slots=ids.shape[0],
        dtype=w.dtype,
    )
    if choice.impl == "reference":
        return merge_delta_reference(w, a, b, ids, coef)
    blocks = {**choice.blocks, **(block_sizes or {})}
    return merge_delta_pallas(w, a, b, ids, coef, interpret=choice.interpret, **blocks)


def switch_merge(
    w_eff: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e_old: jax.Array,
    g_old: jax.Array,
    e_new: jax.Array,
    g_new: jax.Array,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    block_sizes: dict | None = None,
) -> jax.Array:
    """W_eff[l] <- W_eff[l] - sum_j g_old[j] B[l,e_old[j]] A[l,e_old[j]] + sum_j g_new[j] B[l,e_new[j]] A[l,e_new[j]].

    Args:
      w_eff: [L, out, in] merged weights of one weight group, updated in place: callers
        donate it (`jax.jit(..., donate_argnums=...)`) so the switch rewrites the buffer.
      a: [L, E, r, in]; b: [L, E, out, r] (PEFT layout per expert), dtype of w_eff.
      e_old, e_new: [k] int32 expert ids in [0, E); g_old, g_new: [k] gates, scaling folded in.
      impl: "auto" (`pallas_kernels.dispatch`: the Pallas kernel on a GPU, the reference
        elsewhere), "pallas" or "reference".
      interpret: run Pallas in interpret mode (default: when not on a GPU).
      block_sizes: keyword overrides for `merge_delta_pallas` (block_out, block_in, steps,
        num_warps, num_stages); default: the measured table for this shape.
    Returns: the new W_eff. When (e_new, g_new) == (e_old, g_old) no kernel runs (`lax.cond`).
    """
    ids = jnp.concatenate([e_old, e_new]).astype(jnp.int32)  # [2k]
    coef = jnp.concatenate([-g_old, g_new]).astype(jnp.float32)  # [2k]
    unchanged = jnp.all(e_old == e_new) & jnp.all(g_old == g_new)
    return lax.cond(
        unchanged,
        lambda w: w,
        lambda w: _merge_delta(w, a, b, ids, coef, impl, interpret, block_sizes),
        w_eff,
    )


def merge_from_base(
    w_base: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e: jax.Array,
    g: jax.Array,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    block_sizes: dict | None = None,
) -> jax.Array:
    """W_eff[l] = W_base[l] + sum_j g[j] * B[l, e[j]] @ A[l, e[j]]  (a fresh merge, one rounding).

    Args: w_base [L, out, in] (kept unless donated); a [L, E, r, in]; b [L, E, out, r];
      e [k] int32; g [k]. Returns W_eff [L, out, in] in w_base's dtype.
    """
    return _merge_delta(
        w_base, a, b, e.astype(jnp.int32), g.astype(jnp.float32), impl, interpret, block_sizes
    )


# ----------------------------------------------------------------------------- drift policy


def switch_merge_with_remerge(
    w_eff: jax.Array,
    w_base: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e_old: jax.Array,
    g_old: jax.Array,
    e_new: jax.Array,
    g_new: jax.Array,
    n_switches: jax.Array,
    *,
    remerge_every: int,
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
    """Switch in place, but every `remerge_every`-th switch merge afresh from `w_base`.

    Bounds the bf16 drift of repeated in-place switching (module docstring) to that of
    `remerge_every` roundings. `n_switches` (int32 scalar) counts the switches done since
    the last fresh merge; returns (new W_eff [L, out, in], new count). kwargs go to
    `switch_merge` / `merge_from_base` (impl, interpret, block_sizes).
    """
    if remerge_every < 1:
        raise ValueError(f"{remerge_every=} must be >= 1")
    n_next = n_switches + 1
    remerge = n_next >= remerge_every
    w = lax.cond(
        remerge,
        lambda w: merge_from_base(w_base, a, b, e_new, g_new, **kwargs),
        lambda w: switch_merge(w, a, b, e_old, g_old, e_new, g_new, **kwargs),
        w_eff,
    )
    return w, jnp.where(remerge, 0, n_next).astype(jnp.int32)

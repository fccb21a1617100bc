"""`lora_unmerged` for decode batches on Hopper through Pallas' Mosaic GPU backend.

Same semantics and arguments as `pallas_kernels.lora_unmerged` (the Triton kernel beside it,
same reference `lora_unmerged_reference`, same tests):

    y[b] = x[b] @ W.T + bias + sum_j g[b, j] * (x[b] @ A[e[b, j]].T) @ B[e[b, j]].T

Why a second kernel: Pallas' Triton backend is deprecated from jax 0.11; Mosaic GPU is its
successor on Hopper (TMA copies into shared memory, wgmma on tensor cores, a software
pipeline over K). Shape of the computation, for N <= 128 rows (decode):
  * swap A and B of the GEMM: each program computes y.T[64 rows of W, Np] =
    W[64 rows, :] @ x.T, so the 64-row wgmma M dimension is filled by W (not by 1..16 live
    rows of x, which would waste 63/64 of every x tile) and x is the narrow N = Np operand
    (N padded to a multiple of 8 in XLA, rows masked out again at the end);
  * a TMA pipeline streams W and x tiles over `in` (`max_concurrent_steps` in flight);
  * the expand is a second pipeline over the E experts in the same accumulator:
    acc += B[e][64 rows, :] @ u_dense[:, e].T, with u_dense [Np, E*R] = the rows' per-expert
    sums of g * x @ A[e].T (built in XLA beside the shrink; zero for experts a row did not
    pick). It reads every expert's B rows of the block (E/k times the chosen ones: at 7B
    1-9% of W's bytes), the price of a branch-free pipeline;
  * split-K over programs (`split_k`) for 4096-wide outputs (64 programs for 132 SMs
    otherwise): [S, out, Np] fp32 partial sums, added in XLA with the bias.
Limits (checked, clear errors): bf16 / fp16 (wgmma on fp32 is TF32), in % 64 == 0,
out % 64 == 0, R % 16 == 0, N <= 128. The dispatch only picks it inside them.

Needs the jax >= 0.11 Mosaic GPU API (`plgpu.kernel(out_type=...)`, `emit_pipeline`,
`wgmma`); `AVAILABLE` / `WHY` say whether this jax has it. Off a GPU it runs in Mosaic GPU's
interpret mode (`InterpretGPUParams`), which the tests use; `jax.export` for CUDA lowers it
on a CPU (tests/test_kernel_compile.py).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import check_dtype, check_unmerged_args, lora_shrink

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as err:  # jaxlib without Mosaic GPU
    plgpu, WHY = None, f"jax.experimental.pallas.mosaic_gpu: {err}"
else:
    _params = inspect.signature(plgpu.kernel).parameters if hasattr(plgpu, "kernel") else {}
    if "out_type" not in _params or not hasattr(plgpu, "InterpretGPUParams"):
        WHY = (
            f"jax {jax.__version__}: plgpu.kernel(out_type=...) and InterpretGPUParams are the "
            "jax >= 0.11 API (0.10 has pallas_call-based Mosaic GPU with other names)"
        )
    else:
        WHY = ""
AVAILABLE = not WHY

BLOCK_OUT = 64  # wgmma M: one warpgroup's 64 rows of W per program
SWIZZLE = 128  # bytes: K tiles of 64 bf16 elements


def _transforms(swizzle: int, itemsize: int):
    elems = swizzle // itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _check(x, w, a, b, e, g, bias, block_k, split_k):
    if not AVAILABLE:
        raise NotImplementedError(f"Mosaic GPU unmerged kernel unavailable: {WHY}")
    for name, t in (("x", x), ("w", w), ("a", a), ("b", b)):
        check_dtype(name, t.dtype)
    if x.dtype == jnp.float32:
        raise ValueError(
            f"{x.dtype=}: the Mosaic GPU kernel takes bf16 or fp16 (fp32 wgmma is TF32)"
        )
    (n, d_in), out, rank = x.shape, w.shape[0], a.shape[1]
    if n > 128:
        raise ValueError(f"{x.shape=}: the Mosaic GPU kernel is for decode batches, N <= 128")
    if d_in % (block_k * split_k) or out % BLOCK_OUT or rank % 16:
        raise ValueError(
            f"{x.shape=}, {w.shape=}, {a.shape=}: the Mosaic GPU kernel needs in % "
            f"(block_k * split_k) == 0 ({block_k=}, {split_k=}), out % {BLOCK_OUT} == 0, r % 16 == 0"
        )


@functools.partial(
    jax.jit, static_argnames=("block_k", "split_k", "max_concurrent_steps", "interpret")
)
def lora_unmerged_mosaic(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    e: jax.Array,
    g: jax.Array,
    bias: jax.Array | None = None,
    *,
    block_k: int = 64,
    split_k: int = 1,
    max_concurrent_steps: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """`lora_unmerged` through the Mosaic GPU kernel (module docstring); y [N, out] in x's dtype.

    Args: as `lora_unmerged_pallas` (x [N, in], w [out, in], a [E, r, in], b [E, out, r],
      e / g [N, k], bias [out] or None); block_k: `in` elements per pipeline step (64 = one
      128-byte swizzled tile); split_k: programs along `in`; max_concurrent_steps: TMA
      copies in flight.
    """
    check_unmerged_args(x, w, a, b, e, g, bias)
    _check(x, w, a, b, e, g, bias, block_k, split_k)
    (n, d_in), out = x.shape, w.shape[0]
    n_exp, rank = a.shape[0], a.shape[1]
    n_pad = max(8, -(-n // 8) * 8)
    u = lora_shrink(x, a, e.astype(jnp.int32), g)  # [N, k, R] fp32
    onehot = jax.nn.one_hot(e, n_exp, dtype=jnp.float32)  # [N, k, E]
    u_dense = jnp.einsum("bje,bjr->ber", onehot, u).reshape(n, n_exp * rank)
    u_dense = jnp.pad(u_dense.astype(b.dtype), ((0, n_pad - n), (0, 0)))  # [Np, E*R]
    x_pad = jnp.pad(x, ((0, n_pad - n), (0, 0)))  # [Np, in]
    itemsize = jnp.dtype(x.dtype).itemsize
    big, small = _transforms(SWIZZLE, itemsize), _transforms(32, itemsize)
    k_chunk = d_in // split_k
    steps = k_chunk // block_k

    def accumulate(acc, s, rows, x_gmem, w_gmem, u_gmem, b_gmem):
        cols = pl.ds(s * k_chunk, k_chunk)

        def w_step(_, w_smem, x_smem):  # acc [64, Np] += W [64, bk] @ x[Np, bk].T
            plgpu.wgmma(acc, w_smem, x_smem.transpose((1, 0)))
            plgpu.wgmma_wait(1)

        plgpu.emit_pipeline(
            w_step,
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((BLOCK_OUT, block_k), lambda t: (0, t), transforms=big),
                plgpu.BlockSpec((n_pad, block_k), lambda t: (0, t), transforms=big),
            ],
            max_concurrent_steps=max_concurrent_steps,
        )(w_gmem.at[rows, cols], x_gmem.at[:, cols])

        @pl.when(s == 0)  # the expand once, in the first K split
        def _():
            def b_step(_, b_smem, u_smem):  # acc [64, Np] += B[e] [64, R] @ u_e [Np, R].T
                plgpu.wgmma(acc, b_smem, u_smem.transpose((1, 0)))
                plgpu.wgmma_wait(1)

            plgpu.emit_pipeline(
                b_step,
                grid=(n_exp,),
                in_specs=[
                    plgpu.BlockSpec((None, BLOCK_OUT, rank), lambda q: (q, 0, 0), transforms=small),
                    plgpu.BlockSpec((n_pad, rank), lambda q: (0, q), transforms=small),
                ],
                max_concurrent_steps=2,
            )(b_gmem.at[:, rows, :], u_gmem)

        plgpu.wgmma_wait(0)
        return acc[...]

    def kernel(x_gmem, w_gmem, u_gmem, b_gmem, y_gmem, y_smem):
        s, j = lax.axis_index("s"), lax.axis_index("o")
        rows = pl.ds(j * BLOCK_OUT, BLOCK_OUT)
        body = functools.partial(
            accumulate, s=s, rows=rows, x_gmem=x_gmem, w_gmem=w_gmem, u_gmem=u_gmem, b_gmem=b_gmem
        )
        # the accumulator lives in registers (its own scope: REGS may not mix with SMEM)
        y_smem[...] = pl.run_scoped(body, plgpu.ACC((BLOCK_OUT, n_pad), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[s, rows, :])
        plgpu.wait_smem_to_gmem(0)

    partial = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split_k, out, n_pad), jnp.float32),
        scratch_types=[plgpu.SMEM((BLOCK_OUT, n_pad), jnp.float32)],
        grid=(split_k, out // BLOCK_OUT),
        grid_names=("s", "o"),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(x_pad, w, u_dense, b)
    y = partial.sum(axis=0)[:, :n].T  # [N, out] fp32
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def supports(
    n: int, out: int, d_in: int, rank: int, dtype, split_k: int = 1, block_k: int = 64
) -> bool:
    """Whether the kernel takes this problem (the dispatch checks before picking it)."""
    return (
        AVAILABLE
        and jnp.dtype(dtype) != jnp.float32
        and n <= 128
        and d_in % (block_k * split_k) == 0
        and out % BLOCK_OUT == 0
        and rank % 16 == 0
    )

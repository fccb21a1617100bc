"""Helpers shared by the kernels: block sizes, input dtypes, backend and export context.

Offsets. Pallas' Triton lowering (jax 0.10.2, 0.11.2 and 0.12 alike) computes a ref's element
offsets in 64 bits when the array is larger than 2**32 bytes and in 32 bits otherwise; with
2-byte or 4-byte elements a 32-bit offset then never exceeds 2**31 - 1, so stacked weights of
any size index correctly (a 13B model's stacked gate|up bank, 5.4e9 elements, included).
1-byte element types would overflow a signed 32-bit offset below that threshold: the kernels
accept fp32, bf16 and fp16 only (`check_dtype`). `tests/test_kernel_compile.py` asserts the
64-bit offsets in the Triton IR of a bank over 2**31 elements.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Triton's `dot` wants every dimension >= 16 and its loads want power-of-two sizes.
MIN_BLOCK = 16
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def block_size(requested: int, dim: int) -> int:
    """A power-of-two block >= MIN_BLOCK, no larger than needed to cover `dim`."""
    if requested < 1:
        raise ValueError(f"{requested=} must be positive")
    return max(MIN_BLOCK, min(pl.next_power_of_2(requested), pl.next_power_of_2(dim)))


def check_dtype(name: str, dtype) -> None:
    """The kernels' element types (see the module docstring on offsets)."""
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        raise ValueError(
            f"{name}.dtype={jnp.dtype(dtype)} must be one of float32, bfloat16, float16"
        )


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def abstract_gpu(device_kind: str = "NVIDIA H100"):
    """Context in which `jax.export(..., platforms=['cuda'])` can lower Pallas GPU kernels on
    a machine without a GPU.

    From jax 0.11 the Triton lowering asks for the target GPU (compute capability) and raises
    "No supported GPU devices found" without one; an abstract device names it. jax 0.10 reads
    no such context (it falls back to sm_90 by itself), so the context is harmless there.
    """
    sharding = jax.sharding
    if not hasattr(sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    dev = sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((), (), abstract_device=dev))


# ----------------------------------------------------------------------------- unmerged op


def check_unmerged_args(x, w, a, b, e, g, bias) -> None:
    """Shapes of `lora_unmerged`'s arguments (x [N, in], w [out, in], a [E, r, in],
    b [E, out, r], e / g [N, k], bias [out]); a ValueError naming the mismatch."""
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


# ----------------------------------------------------------------------------- Triton grids


def check_triton_args(x, w, a, b, e, g, bias, split_k: int) -> None:
    """`check_unmerged_args`, the kernels' element types and split_k >= 1 (both Triton
    unmerged kernels)."""
    check_unmerged_args(x, w, a, b, e, g, bias)
    for name, t in (("x", x), ("w", w), ("a", a), ("b", b)):
        check_dtype(name, t.dtype)
    if split_k < 1:
        raise ValueError(f"{split_k=} must be >= 1")


def k_splits(d_in: int, bk: int, split_k: int) -> tuple[int, int, int]:
    """(splits, K blocks per split, padded `in`) of a K loop of `bk`-wide blocks split over
    at most `split_k` programs (the last block may overhang `in`)."""
    n_kblocks = pl.cdiv(d_in, bk)
    split = min(split_k, n_kblocks)
    steps = pl.cdiv(n_kblocks, split)
    return split, steps, split * steps * bk


def split_output(n: int, out: int, bn: int, bo: int, split: int, dtype):
    """(out_shape, out_spec) on a (rows, out, split) grid: y [N, out] in `dtype`, or the
    splits' fp32 partials [S, N, out] that `sum_splits` adds."""
    if split == 1:
        return jax.ShapeDtypeStruct((n, out), dtype), pl.BlockSpec((bn, bo), lambda i, j, s: (i, j))
    shape = jax.ShapeDtypeStruct((split, n, out), jnp.float32)
    return shape, pl.BlockSpec((None, bn, bo), lambda i, j, s: (s, i, j))


def sum_splits(y: jax.Array, dtype) -> jax.Array:
    """y of `split_output`: as is, or its partials summed (one XLA reduction)."""
    return y if y.ndim == 2 else y.sum(axis=0).astype(dtype)

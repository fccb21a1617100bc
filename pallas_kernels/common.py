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

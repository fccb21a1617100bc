"""The GPU path of every kernel lowers for CUDA (Triton) on a CPU-only machine.

`jax.export` with platforms=['cuda'] runs the Pallas Triton lowering of each configuration the
GPU path uses (default GPU block sizes, fp32 and bf16). It stops before Triton compiles the
kernel, so it cannot catch Triton compile-time limits (e.g. dot dims < 16): the kernels are
written to stay inside those (see pallas_kernels/*.py) and still need a run on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import lora_unmerged as lu
from pallas_kernels import switch_merge as sm

S = jax.ShapeDtypeStruct
TRITON_CALL = "__gpu$xla.gpu.triton"
DTYPES = [jnp.float32, jnp.bfloat16]


def export_cuda(fn, *shapes):
    exported = jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*shapes)
    text = exported.mlir_module()
    assert TRITON_CALL in text  # the Pallas kernel, not an XLA fallback, was lowered
    return text


# (L, E, r, out, in, k): SmolLM2-like q/up projections, odd dims, k = 1, 2, 4
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_layers, n_exp, rank, out, d_in, k",
    [
        (30, 8, 16, 576, 576, 2),
        (30, 8, 16, 1536, 576, 2),
        (2, 3, 4, 200, 72, 1),
        (4, 16, 64, 96, 136, 4),
    ],
)
def test_switch_merge_exports(dtype, n_layers, n_exp, rank, out, d_in, k):
    shapes = (
        S((n_layers, out, d_in), dtype),
        S((n_layers, n_exp, rank, d_in), dtype),
        S((n_layers, n_exp, out, rank), dtype),
        S((k,), jnp.int32),
        S((k,), jnp.float32),
        S((k,), jnp.int32),
        S((k,), jnp.float32),
    )
    switch = functools.partial(sm.switch_merge, impl="pallas", interpret=False)
    export_cuda(switch, *shapes)
    base = functools.partial(sm.merge_from_base, impl="pallas", interpret=False)
    export_cuda(base, *shapes[:5])


# (N, E, r, out, in, k, bias): decode rows 1 and 16, a prefill chunk, odd dims
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n, n_exp, rank, out, d_in, k, bias",
    [
        (1, 8, 16, 576, 576, 2, False),
        (16, 8, 16, 1536, 576, 2, True),
        (256, 8, 16, 576, 1536, 2, False),
        (5, 3, 4, 200, 72, 1, True),
        (33, 16, 64, 96, 136, 4, False),
    ],
)
def test_lora_unmerged_exports(dtype, n, n_exp, rank, out, d_in, k, bias):
    shapes = [
        S((n, d_in), dtype),
        S((out, d_in), dtype),
        S((n_exp, rank, d_in), dtype),
        S((n_exp, out, rank), dtype),
        S((n, k), jnp.int32),
        S((n, k), jnp.float32),
    ]
    if bias:
        shapes.append(S((out,), dtype))
    export_cuda(functools.partial(lu.lora_unmerged, impl="pallas", interpret=False), *shapes)

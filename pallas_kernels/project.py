"""The product of a linear layer, ``y = x @ w.T`` with Hugging Face's ``[out, in]`` weights,
written the way XLA's CPU backend runs fastest at decode batch sizes.

Measured on a 2-core AMD EPYC (Zen 4), jax 0.10.2, SmolLM2-135M projection shapes (fp32,
30 layers of fused q|k|v, o, fused gate|up, down, plus the tied 49152x576 head; ms per
step, min of 9, against a numpy-GEMV weight floor of 13.6-18 ms measured in the same runs;
docs/benchmarks.md):

    rows (batch x tokens)          1      2      4      8     16     32    128    512
    x @ w.T (XLA's own choice)   17.8   34.7   38.2   43.5   54.7   81.0  202    740
    (w @ x.T).T behind barriers  19.0   24.8   24.3   28.7   39.1   57.4  182    799

(1, 4, 8, 16 rows from one run, 2, 32, 128, 512 from another; ``project`` takes the second
form from 2 to 128 rows.)
One row is a matrix-vector product either way. From two rows on, XLA hands the dot to
YNNPACK with ``x`` as the left operand; ``w @ x.T`` with ``w`` on the left runs 1.4-1.6x
faster up to ~128 rows, but XLA's algebraic simplifier rewrites
``transpose(dot(w, transpose(x)))`` back into ``dot(x, w)``: optimization barriers around
the two (small) transposes keep the operand order. From ~512 rows (prefill) the plain form
is faster again. No XLA CPU flag tried (Eigen instead of YNNPACK, XNNPACK, oneDNN, vector
width, fast math, single-threaded Eigen) beat this; at 8 rows the step is compute-bound
(2.2 GFLOP per step at ~75 GFLOP/s on two cores), not bandwidth-bound.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Up to this many rows the weight-on-the-left product wins on XLA's CPU backend (measured
# at 2..128 rows; 512 rows ran 8% slower than the plain form).
MAX_WEIGHT_LEFT_ROWS = 128


def project(
    x: Array, w: Array, *, weight_left: bool | None = None, preferred_element_type: Any = None
) -> Array:
    """``y[..., o] = sum_i x[..., i] * w[o, i]``.

    x: ``[..., in]``; w: ``[out, in]`` (Hugging Face's layout). Returns ``[..., out]`` in
    ``preferred_element_type`` (default: the promoted dtype of ``x`` and ``w``), accumulated
    as ``jnp.einsum`` does.
    weight_left: compute ``(w @ x.T).T`` behind optimization barriers (see the module
    docstring); ``None`` picks it on the CPU backend for 2 to ``MAX_WEIGHT_LEFT_ROWS`` rows,
    where it was measured faster. Differentiable either way.
    """
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x {x.shape} must end in in_features and w {w.shape} be [out, in]")
    rows = math.prod(x.shape[:-1])
    if weight_left is None:
        weight_left = jax.default_backend() == "cpu" and 2 <= rows <= MAX_WEIGHT_LEFT_ROWS
    if not weight_left:
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=preferred_element_type)
    xt = jax.lax.optimization_barrier(x.reshape(rows, -1).T)  # [in, rows]
    yt = jnp.einsum("oi,ir->or", w, xt, preferred_element_type=preferred_element_type)
    yt = jax.lax.optimization_barrier(yt)  # [out, rows]
    return yt.T.reshape(*x.shape[:-1], w.shape[0])

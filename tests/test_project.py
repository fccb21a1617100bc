"""``project``: the linear layer's product in the operand order XLA's CPU backend runs
fastest, against float64 numpy, with gradients, and with the operand order checked in the
optimized program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.project import MAX_WEIGHT_LEFT_ROWS, project


def _data(lead, d_in, d_out, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, d_in)).astype(dtype)
    w = rng.standard_normal((d_out, d_in)).astype(dtype)
    return x, w


@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (16,), (4, 5), (2, 1, 3), (200,)])
@pytest.mark.parametrize("weight_left", [None, True, False])
def test_matches_float64(lead, weight_left):
    x, w = _data(lead, 576, 192)
    got = jax.jit(lambda x, w: project(x, w, weight_left=weight_left))(x, w)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert got.shape == (*lead, 192)
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("weight_left", [True, False])
def test_bf16_and_fp32_accumulation(weight_left):
    x, w = _data((8,), 96, 40)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    want = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64).T
    got = project(xb, wb, weight_left=weight_left)
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max() < 1e-2
    got = project(xb, wb, weight_left=weight_left, preferred_element_type=jnp.float32)
    assert got.dtype == jnp.float32
    assert np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max() < 1e-5


def test_gradients_match_the_plain_product():
    x, w = _data((6,), 24, 10)
    ct = np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32)

    def loss(x, w, weight_left):
        return jnp.sum(project(x, w, weight_left=weight_left) * ct)

    got = jax.grad(loss, argnums=(0, 1))(x, w, True)
    want = (ct @ w.astype(np.float64), ct.T @ x.astype(np.float64))  # dL/dx, dL/dw by hand
    for g, ref in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's operand order")
def test_weight_stays_the_left_operand_after_optimization():
    """The point of the barriers: XLA would otherwise fold the transposes and run
    ``dot(x, w)``, whose result is ``[rows, out]``; ours must produce ``[out, rows]``."""
    x, w = _data((8,), 576, 1536)
    hlo = jax.jit(project).lower(x, w).compile().as_text()
    assert "f32[1536,8]" in hlo
    plain = jax.jit(lambda x, w: project(x, w, weight_left=False)).lower(x, w).compile()
    assert "f32[1536,8]" not in plain.as_text()


def test_default_picks_by_rows():
    """One row is a GEMV either way (plain); 2..MAX rows weight-left on CPU; prefill-sized
    inputs plain."""
    for rows, left in ((1, False), (2, True), (MAX_WEIGHT_LEFT_ROWS, True), (512, False)):
        x, w = _data((rows,), 16, 24)
        hlo = jax.jit(project).lower(x, w).as_text()
        assert ("optimization_barrier" in hlo) == (left and jax.default_backend() == "cpu")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"x \(2, 5\) must end in in_features"):
        project(jnp.zeros((2, 5)), jnp.zeros((3, 4)))

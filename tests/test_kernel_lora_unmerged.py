"""Fused unmerged LoRA-expert linear vs its jnp reference and a float64 per-row oracle.

Run twice: `TestLoraUnmerged` compiled on a GPU (skipped elsewhere), `TestLoraUnmergedInterpret`
in Pallas interpret mode on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lora_unmerged as lu

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# (N, E, r, out, in, k, routing, bias): odd N (1 decode row .. 37), dims off the blocks
CASES = [
    (1, 4, 16, 200, 72, 2, "distinct", True),
    (7, 2, 4, 200, 72, 1, "same", False),
    (19, 16, 8, 96, 136, 4, "zipf", True),
    (37, 5, 64, 40, 72, 2, "distinct", False),
    (33, 8, 16, 200, 72, 2, "same", True),
]


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def route(rng, n, n_exp, k, routing):
    """[N, k] expert ids (distinct within a row) and renormalised gates."""
    if routing == "same":  # one expert set for every row
        e = np.tile(rng.choice(n_exp, k, replace=False), (n, 1))
    elif routing == "distinct":  # rows pick independently (all-distinct where E allows)
        e = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(n)])
    else:  # zipf popularity
        p = 1.0 / np.arange(1, n_exp + 1) ** 1.5
        e = np.stack([rng.choice(n_exp, k, replace=False, p=p / p.sum()) for _ in range(n)])
    g = rng.random((n, k)) + 0.1
    return jnp.asarray(e, jnp.int32), jnp.asarray(g / g.sum(1, keepdims=True), jnp.float32)


def make_problem(seed, n, n_exp, rank, out, d_in, k, routing, bias, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in))
    w = rng.standard_normal((out, d_in)) / np.sqrt(d_in)
    a = rng.standard_normal((n_exp, rank, d_in)) / np.sqrt(d_in)
    b = rng.standard_normal((n_exp, out, rank))  # large B: the LoRA term is not negligible
    arrs = [jnp.asarray(t, dtype) for t in (x, w, a, b)]
    e, g = route(rng, n, n_exp, k, routing)
    c = jnp.asarray(rng.standard_normal(out), dtype) if bias else None
    return (*arrs, e, g, c)


def unmerged_f64(x, w, a, b, e, g, bias):
    x, w, a, b = (np.asarray(t, np.float64) for t in (x, w, a, b))
    e, g = np.asarray(e), np.asarray(g, np.float64)
    y = x @ w.T
    for row in range(x.shape[0]):
        for j in range(e.shape[1]):
            ex = e[row, j]
            y[row] += g[row, j] * (b[ex] @ (a[ex] @ x[row]))
    return y if bias is None else y + np.asarray(bias, np.float64)


@pytest.mark.gpu
class TestLoraUnmerged:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_backend(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("needs a GPU")

    def run(self, *args, **kw):
        return lu.lora_unmerged(*args, impl="pallas", interpret=self.INTERPRET, **kw)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("case", CASES)
    def test_matches_reference_and_f64(self, case, dtype):
        args = make_problem(0, *case, dtype)
        blocks = dict(block_rows=16, block_out=64, block_k=32)
        got = self.run(*args, block_sizes=blocks)
        ref = lu.lora_unmerged_reference(*args)
        assert got.dtype == dtype and got.shape == (case[0], case[3])
        assert rel_err(got, ref) < TOL[dtype]
        assert rel_err(got, unmerged_f64(*args)) < TOL[dtype]
        # the LoRA term matters: dropping it is far outside the tolerance
        no_lora = unmerged_f64(*args[:5], args[5] * 0, args[6])
        assert rel_err(no_lora, unmerged_f64(*args)) > 100 * TOL[jnp.float32]

    def test_repeated_expert_in_a_row(self):
        """Two slots of one row naming the same expert add up."""
        x, w, a, b, _, _, bias = make_problem(1, 5, 3, 8, 24, 40, 2, "same", True, jnp.float32)
        e = jnp.array([[1, 1], [0, 2], [2, 2], [0, 1], [1, 0]], jnp.int32)
        g = jnp.full((5, 2), 0.5, jnp.float32)
        got = self.run(x, w, a, b, e, g, bias)
        assert rel_err(got, unmerged_f64(x, w, a, b, e, g, bias)) < 1e-5

    def test_grad_is_vjp_of_reference(self):
        x, w, a, b, e, g, bias = make_problem(2, 6, 4, 8, 24, 40, 2, "zipf", True, jnp.float32)

        def loss(fn, x, w, a, b, g, bias):
            y = fn(x, w, a, b, e, g, bias)
            return jnp.sum(y * jnp.cos(y))

        grads = jax.grad(functools.partial(loss, self.run), argnums=range(6))
        ref_grads = jax.grad(functools.partial(loss, lu.lora_unmerged_reference), argnums=range(6))
        for got, ref in zip(
            grads(x, w, a, b, g, bias), ref_grads(x, w, a, b, g, bias), strict=True
        ):
            assert rel_err(got, ref) < 1e-5


class TestLoraUnmergedInterpret(TestLoraUnmerged):
    INTERPRET = True
    pytestmark = []  # the GPU marker is for the compiled class only


def test_shrink_paths_agree():
    """Gathering the selected A (N*k <= E) and the dense all-experts product give one answer."""
    x, _, a, _, e, g, _ = make_problem(3, 3, 16, 8, 24, 40, 2, "distinct", False, jnp.float32)
    gathered = lu.lora_shrink(x, a, e, g)  # 3*2 <= 16: gather path
    dense = lu.lora_shrink(jnp.tile(x, (8, 1)), a, jnp.tile(e, (8, 1)), jnp.tile(g, (8, 1)))
    assert rel_err(dense[:3], gathered) < 1e-6


def test_auto_uses_reference_off_gpu():
    args = make_problem(4, 3, 4, 4, 24, 20, 1, "same", True, jnp.float32)
    got = lu.lora_unmerged(*args)  # impl="auto"
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(lu.lora_unmerged_reference(*args))
        )


def test_shape_errors():
    x, w, a, b, e, g, bias = make_problem(5, 3, 4, 4, 24, 20, 1, "same", True, jnp.float32)
    with pytest.raises(ValueError, match="disagree on in"):
        lu.lora_unmerged_pallas(x[:, :-1], w, a, b, e, g, bias, interpret=True)
    with pytest.raises(ValueError, match="e.shape"):
        lu.lora_unmerged(x, w, a, b, e[:2], g[:2], impl="reference")
    with pytest.raises(ValueError, match="bias.shape"):
        lu.lora_unmerged(x, w, a, b, e, g, bias[:-1], impl="reference")

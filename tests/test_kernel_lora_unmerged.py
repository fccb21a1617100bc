"""Fused unmerged LoRA-expert linear vs its jnp reference and a float64 per-row oracle.

Every case runs twice: `TestLoraUnmergedGPU` compiled on a GPU (`pytest -m gpu` with
JAX_PLATFORMS=cuda; skipped elsewhere) and `TestLoraUnmergedInterpret` in Pallas interpret
mode on CPU. On a GPU fp32 dots default to TF32 (kernel and XLA alike); the GPU class runs at
HIGHEST precision so the fp32 tolerance 1e-5 holds, and one test states the TF32 bound.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lora_unmerged as lu
from pallas_kernels import lora_unmerged_mosaic as lm

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# (N, E, r, out, in, k, routing, bias): odd N (1 decode row .. 37), dims off the blocks
CASES = [
    (1, 4, 16, 200, 72, 2, "distinct", True),
    (7, 2, 4, 200, 72, 1, "same", False),
    (19, 16, 8, 96, 136, 4, "zipf", True),
    (37, 5, 64, 40, 72, 2, "distinct", False),
    (33, 8, 16, 200, 72, 2, "same", True),
    (3, 8, 48, 300, 136, 2, "distinct", True),  # a fused q|k|v bank: stacked rank 48
]
# (block_k, split_k): K split over programs, even and uneven (136 = 4.25 blocks of 32)
SPLITS = [(32, 2), (32, 3), (64, 4)]


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


class _LoraUnmergedCases:
    """The cases; collected through the GPU and interpret subclasses below."""

    INTERPRET: bool

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

    @pytest.mark.parametrize("block_k, split_k", SPLITS)
    def test_split_k(self, block_k, split_k):
        """K split over programs (partial sums added in XLA) gives the unsplit answer."""
        args = make_problem(6, 5, 4, 16, 200, 136, 2, "zipf", True, jnp.float32)
        blocks = dict(block_rows=16, block_out=32, block_k=block_k, split_k=split_k)
        got = self.run(*args, block_sizes=blocks)
        assert rel_err(got, unmerged_f64(*args)) < 1e-5

    def test_rows_past_one_block_share_and_mix_experts(self):
        """Two row blocks: the first all one expert set, the second all distinct."""
        x, w, a, b, _, _, bias = make_problem(7, 40, 8, 16, 72, 40, 2, "same", True, jnp.float32)
        e_same, g = route(np.random.default_rng(8), 40, 8, 2, "same")
        e_mix, _ = route(np.random.default_rng(9), 40, 8, 2, "distinct")
        e = jnp.concatenate([e_same[:16], e_mix[16:]])
        got = self.run(x, w, a, b, e, g, bias, block_sizes=dict(block_rows=16))
        assert rel_err(got, unmerged_f64(x, w, a, b, e, g, bias)) < 1e-5


@pytest.mark.gpu
class TestLoraUnmergedGPU(_LoraUnmergedCases):
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _on_gpu_at_highest(self):
        if jax.default_backend() != "gpu":
            pytest.skip("needs a GPU: JAX_PLATFORMS=cuda pytest -m gpu")
        with jax.default_matmul_precision("highest"):  # fp32 dots as IEEE fp32, not TF32
            yield

    def test_fp32_default_precision_tf32_bound(self):
        """At the GPU's default precision fp32 dots round their inputs to TF32 (10 explicit
        mantissa bits: relative rounding 2**-11 per input, so about 2**-10 per product);
        the kernel then stays within 1e-3 (~2**-10) of the float64 oracle, as XLA does."""
        args = make_problem(10, 16, 8, 16, 256, 512, 2, "distinct", True, jnp.float32)
        with jax.default_matmul_precision("default"):
            got = self.run(*args)
            xla = lu.lora_unmerged_reference(*args)
        assert rel_err(got, unmerged_f64(*args)) < 1e-3
        assert rel_err(xla, unmerged_f64(*args)) < 1e-3


class TestLoraUnmergedInterpret(_LoraUnmergedCases):
    INTERPRET = True


# Mosaic GPU kernel (jax >= 0.11), inside its limits: in % (64 * split_k), out % 64, r % 16
# (N, E, r, out, in, k, routing, bias, split_k)
MOSAIC_CASES = [
    (1, 4, 16, 128, 256, 2, "distinct", True, 1),
    (16, 8, 48, 192, 256, 2, "zipf", False, 2),
    (5, 2, 32, 64, 128, 1, "same", True, 1),
]


class _MosaicCases:
    """The Mosaic GPU kernel against the same reference and float64 oracle (bf16 / fp16)."""

    INTERPRET: bool

    def run(self, *args, **kw):
        return lu.lora_unmerged(*args, impl="mosaic", interpret=self.INTERPRET, **kw)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("case", MOSAIC_CASES)
    def test_matches_reference_and_f64(self, case, dtype):
        *problem, split_k = case
        args = make_problem(12, *problem, dtype)
        got = self.run(*args, block_sizes=dict(split_k=split_k))
        assert got.dtype == dtype and got.shape == (case[0], case[3])
        assert rel_err(got, lu.lora_unmerged_reference(*args)) < 1e-2
        assert rel_err(got, unmerged_f64(*args)) < 1e-2
        no_lora = unmerged_f64(*args[:5], args[5] * 0, args[6])
        assert rel_err(no_lora, unmerged_f64(*args)) > 10 * 1e-2  # the LoRA term matters

    def test_limits_are_clear_errors(self):
        args = make_problem(13, 2, 4, 16, 64, 72, 2, "same", False, jnp.bfloat16)
        with pytest.raises(ValueError, match="in %"):
            self.run(*args)
        args = make_problem(13, 2, 4, 16, 64, 128, 2, "same", False, jnp.float32)
        with pytest.raises(ValueError, match="bf16 or fp16"):
            self.run(*args)


@pytest.mark.gpu
class TestLoraUnmergedMosaicGPU(_MosaicCases):
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _on_gpu(self):
        if jax.default_backend() != "gpu":
            pytest.skip("needs a GPU: JAX_PLATFORMS=cuda pytest -m gpu")
        if not lm.AVAILABLE:
            pytest.skip(lm.WHY)


class TestLoraUnmergedMosaicInterpret(_MosaicCases):
    INTERPRET = True

    @pytest.fixture(autouse=True)
    def _has_mosaic(self):
        if not lm.AVAILABLE:
            pytest.skip(lm.WHY)


def test_shrink_paths_agree():
    """Gathering the selected A (N*k <= E) and the dense all-experts product give one answer."""
    x, _, a, _, e, g, _ = make_problem(3, 3, 16, 8, 24, 40, 2, "distinct", False, jnp.float32)
    gathered = lu.lora_shrink(x, a, e, g)  # 3*2 <= 16: gather path
    dense = lu.lora_shrink(jnp.tile(x, (8, 1)), a, jnp.tile(e, (8, 1)), jnp.tile(g, (8, 1)))
    assert rel_err(dense[:3], gathered) < 1e-6


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_uses_reference_off_gpu():
    args = make_problem(4, 3, 4, 4, 24, 20, 1, "same", True, jnp.float32)
    got = lu.lora_unmerged(*args)  # impl="auto"
    np.testing.assert_array_equal(np.asarray(got), np.asarray(lu.lora_unmerged_reference(*args)))


def test_reference_gather_and_dense_expand_agree():
    """The reference's two expand paths (gather B for N*k <= E, dense gates otherwise)."""
    x, w, a, b, e, g, bias = make_problem(11, 3, 16, 8, 24, 40, 2, "distinct", True, jnp.float32)
    few = lu.lora_unmerged_reference(x, w, a, b, e, g, bias)  # 3*2 <= 16: gather
    many = lu.lora_unmerged_reference(
        jnp.tile(x, (8, 1)), w, a, b, jnp.tile(e, (8, 1)), jnp.tile(g, (8, 1)), bias
    )
    assert rel_err(many[:3], few) < 1e-6
    assert rel_err(few, unmerged_f64(x, w, a, b, e, g, bias)) < 1e-5


def test_shape_errors():
    x, w, a, b, e, g, bias = make_problem(5, 3, 4, 4, 24, 20, 1, "same", True, jnp.float32)
    with pytest.raises(ValueError, match="disagree on in"):
        lu.lora_unmerged_pallas(x[:, :-1], w, a, b, e, g, bias, interpret=True)
    with pytest.raises(ValueError, match="e.shape"):
        lu.lora_unmerged(x, w, a, b, e[:2], g[:2], impl="reference")
    with pytest.raises(ValueError, match="bias.shape"):
        lu.lora_unmerged(x, w, a, b, e, g, bias[:-1], impl="reference")
    with pytest.raises(ValueError, match="x.dtype=int8"):
        lu.lora_unmerged_pallas(x.astype(jnp.int8), w, a, b, e, g, interpret=True)
    with pytest.raises(ValueError, match="split_k=0"):
        lu.lora_unmerged_pallas(x, w, a, b, e, g, split_k=0, interpret=True)
    with pytest.raises(ValueError, match="impl='fast'"):
        lu.lora_unmerged(x, w, a, b, e, g, impl="fast")

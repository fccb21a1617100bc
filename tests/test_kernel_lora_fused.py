"""The one-launch fused linear (`pallas_kernels.lora_fused`) vs the jnp reference and a
float64 per-row oracle, in Pallas interpret mode on CPU (and compiled on a GPU with
`pytest -m gpu`); its GPU lowering: one Triton call and no XLA op on the adapter banks.
The sm_90 compile at the model's shapes is in tests/test_kernel_compile.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernel_compile import export_cuda, unmerged_shapes
from test_kernel_lora_unmerged import TOL, make_problem, rel_err, route, unmerged_f64

from pallas_kernels import lora_fused as lf
from pallas_kernels import lora_unmerged as lu

# (N, E, r, out, in, k, routing, bias): decode row counts (1 .. 16) and one past a row
# block, dims off every block, ranks off the rank chunk (4, 24, a stacked q|k|v 48)
CASES = [
    (1, 4, 16, 200, 72, 2, "distinct", True),
    (1, 8, 48, 300, 136, 2, "distinct", False),
    (5, 2, 4, 130, 72, 1, "same", False),
    (16, 16, 8, 96, 136, 4, "zipf", True),
    (13, 5, 24, 40, 200, 2, "distinct", True),
    (19, 8, 16, 72, 40, 2, "zipf", False),
]
SPLITS = [(32, 2), (32, 3), (64, 4)]  # (block_k, split_k): even and uneven (136 / 32)


class _FusedCases:
    INTERPRET: bool

    def run(self, *args, **blocks):
        return lf.lora_fused_pallas(*args, interpret=self.INTERPRET, **blocks)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference_and_f64(self, case, dtype):
        args = make_problem(3, *case, dtype)
        got = self.run(*args)
        assert got.dtype == dtype and got.shape == (case[0], case[3])
        assert rel_err(got, lu.lora_unmerged_reference(*args)) < TOL[dtype]
        assert rel_err(got, unmerged_f64(*args)) < TOL[dtype]
        # the LoRA term matters: dropping it is far outside the tolerance
        no_lora = unmerged_f64(*args[:5], args[5] * 0, args[6])
        assert rel_err(no_lora, unmerged_f64(*args)) > 100 * TOL[jnp.float32]

    def test_repeated_expert_in_a_row(self):
        """Two slots of one row naming the same expert add up."""
        x, w, a, b, _, _, bias = make_problem(1, 5, 3, 8, 24, 40, 2, "same", True, jnp.float32)
        e = jnp.array([[1, 1], [0, 2], [2, 2], [0, 1], [1, 0]], jnp.int32)
        g = jnp.full((5, 2), 0.5, jnp.float32)
        assert (
            rel_err(self.run(x, w, a, b, e, g, bias), unmerged_f64(x, w, a, b, e, g, bias)) < 1e-5
        )

    @pytest.mark.parametrize("block_k, split_k", SPLITS)
    def test_split_k_partial_shrinks_expand_to_the_whole(self, block_k, split_k):
        """Each K split expands its partial shrink; the partial outputs add up to y."""
        args = make_problem(6, 5, 4, 16, 200, 136, 2, "zipf", True, jnp.float32)
        got = self.run(*args, block_out=32, block_k=block_k, split_k=split_k)
        assert rel_err(got, unmerged_f64(*args)) < 1e-5

    @pytest.mark.parametrize("block_out, block_k", [(16, 16), (128, 128), (256, 64)])
    def test_block_shapes_agree(self, block_out, block_k):
        args = make_problem(8, 3, 6, 16, 300, 200, 2, "distinct", True, jnp.float32)
        got = self.run(*args, block_out=block_out, block_k=block_k)
        assert rel_err(got, unmerged_f64(*args)) < 1e-5

    def test_rows_past_one_block_share_and_mix_experts(self):
        x, w, a, b, _, _, bias = make_problem(7, 40, 8, 16, 72, 40, 2, "same", True, jnp.float32)
        e_same, g = route(np.random.default_rng(8), 40, 8, 2, "same")
        e_mix, _ = route(np.random.default_rng(9), 40, 8, 2, "distinct")
        e = jnp.concatenate([e_same[:16], e_mix[16:]])
        got = self.run(x, w, a, b, e, g, bias, block_rows=16)
        assert rel_err(got, unmerged_f64(x, w, a, b, e, g, bias)) < 1e-5


class TestLoraFusedInterpret(_FusedCases):
    INTERPRET = True


@pytest.mark.gpu
class TestLoraFusedGPU(_FusedCases):
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _on_gpu_at_highest(self):
        if jax.default_backend() != "gpu":
            pytest.skip("needs a GPU: JAX_PLATFORMS=cuda pytest -m gpu")
        with jax.default_matmul_precision("highest"):
            yield


def test_a_chunk_keeps_the_gathered_tile_bounded():
    for rows in (16, 32, 64):
        for bk in (16, 64, 256):
            chunk = lf.a_chunk_for(rows, bk)
            assert bk % chunk == 0 and chunk >= 16
            assert rows * lf.RANK_CHUNK * chunk <= lf.TILE_ELEMENTS or chunk == 16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, bias", [(1, False), (16, True)])
def test_one_triton_call_and_no_xla_op_on_the_banks(dtype, n, bias):
    """Lowered for cuda at Llama-7B's q|k|v (stacked rank 48): exactly one Triton call
    and no XLA dot, gather or reduction beside it (split_k = 1)."""
    shapes = unmerged_shapes(n, 12288, 4096, 48, dtype, bias=bias)
    text = export_cuda(functools.partial(lf.lora_fused_pallas, split_k=1), *shapes)
    assert text.count("__gpu$xla.gpu.triton") == 1, "one launch per linear"
    for op in ("stablehlo.dot_general", "stablehlo.gather", "stablehlo.reduce", "einsum"):
        assert op not in text, f"an XLA {op} beside the kernel"


# A Llama-7B layer's widths (q|k|v 12288 x 4096, gate|up 22016 x 4096, down 4096 x 11008),
# 2 layers, a LoRA-Switch adapter of 8 rank-16 experts, top-2, bf16.
LLAMA7B_2L = dict(vocab_size=512, hidden_size=4096, intermediate_size=11008, num_layers=2,
                  num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=256)  # fmt: skip


@pytest.mark.parametrize("batch", [1, 16])
def test_a_whole_decode_step_is_four_launches_per_layer(monkeypatch, batch):
    """One unmerged LoRA-Switch decode step lowered for cuda (as on a GPU: "auto"): each
    layer's q|k|v, o, gate|up and down is one call of the one-launch kernel (one Triton
    call each), and no XLA op of the step touches an adapter bank."""
    from flax import nnx

    import lsw_jax
    from lsw_jax.adapters.lora import attach_adapter
    from lsw_jax.config import AdapterConfig, ModelConfig
    from lsw_jax.decode import decode_step
    from lsw_jax.model.llama import KVCache
    from lsw_jax.plans import Plan, prepare_unmerged
    from pallas_kernels import dispatch

    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    cfg = ModelConfig.tiny(**LLAMA7B_2L)

    def build():
        model = lsw_jax.init_model(cfg, dtype="bfloat16", param_dtype="bfloat16")
        attach_adapter(model, AdapterConfig(kind="switch", num_experts=8, top_k=2, rank=16))
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    banks = jax.eval_shape(lambda s: prepare_unmerged(nnx.merge(graphdef, s)), state)
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, 64, jnp.bfloat16, router_state=True))
    ids = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def step(state, banks, cache, tokens, positions):
        model = nnx.merge(graphdef, state)
        out = decode_step(
            model, tokens[:, None], positions[:, None], None, cache, Plan.UNMERGED, banks
        )
        return out.logits

    text = export_cuda(step, state, banks, cache, ids, ids)
    main = text[text.index("func.func public @main") :]
    main = main[: main.index("func.func private")]
    body = main.splitlines()[1:]  # past the signature
    calls = [line for line in body if "call @lora_fused_pallas" in line]
    assert len(calls) == 4 * cfg.num_layers, "q|k|v, o, gate|up, down: one launch each"
    kernels = [f for f in text.split("func.func private @")[1:] if f.startswith("lora_fused")]
    assert kernels and all(f.count("__gpu$xla.gpu.triton") == 1 for f in kernels)
    mlir_dtype = {"bfloat16": "bf16", "float32": "f32"}
    bank_types = {
        "tensor<" + "x".join(map(str, leaf.shape)) + "x" + mlir_dtype[str(leaf.dtype)] + ">"
        for leaf in jax.tree.leaves(banks)
    }
    assert len(bank_types) >= 4  # A and B of each fused linear
    assert all(t in main.splitlines()[0] for t in bank_types)  # the step's inputs: found
    touching = [line.strip() for line in body if any(t in line for t in bank_types)]
    assert all("call @lora_fused_pallas" in line for line in touching), touching[:3]


@pytest.mark.parametrize("n, out, d_in, bias", [(1, 200, 72, True), (13, 130, 200, False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_bare_linear_runs_the_same_kernel(n, out, d_in, bias, dtype):
    """No expert slot (k = 0): x @ W.T + bias, interpreted, against float64."""
    rng = np.random.default_rng(n)
    x, w = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((n, d_in), (out, d_in)))
    c = jnp.asarray(rng.standard_normal(out), dtype) if bias else None
    got = lf.linear_pallas(x, w, c, interpret=True)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    want = want + (0 if c is None else np.asarray(c, np.float64))
    assert got.dtype == dtype and rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("n", [1, 16])
def test_the_bare_linear_is_one_triton_call_on_no_bank(n):
    shapes = [jax.ShapeDtypeStruct((n, 4096), jnp.bfloat16),
              jax.ShapeDtypeStruct((12288, 4096), jnp.bfloat16)]  # fmt: skip
    text = export_cuda(lf.linear_pallas, *shapes)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "tensor<1x1x4096xbf16>" not in text and "tensor<1x12288x1xbf16>" not in text

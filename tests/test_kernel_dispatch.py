"""The one kernel-or-XLA decision (`pallas_kernels.dispatch`) and the measured table it reads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bench, dispatch, tuning
from pallas_kernels import lora_unmerged as lu

LLAMA7B = bench.llama7b_linears(16)


def _problem(n=3, out=40, d_in=24):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((n, d_in)), rng.standard_normal((out, d_in))
    a, b = rng.standard_normal((4, 8, d_in)), rng.standard_normal((4, out, 8))
    e = jnp.asarray(rng.integers(0, 4, (n, 2)), jnp.int32)
    g = jnp.full((n, 2), 0.5, jnp.float32)
    return (*(jnp.asarray(t, jnp.float32) for t in (x, w, a, b)), e, g)


def _runs_kernel(fn) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)())


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_off_gpu_is_the_reference_and_override_swaps_it():
    args = _problem()
    assert dispatch.resolve_impl("auto", None) == ("reference", True)
    assert not _runs_kernel(lambda: lu.lora_unmerged(*args))
    with dispatch.override(unmerged="pallas"):
        assert _runs_kernel(lambda: lu.lora_unmerged(*args))  # interpreted on CPU
        assert not _runs_kernel(lambda: lu.lora_unmerged(*args, impl="reference"))
    assert not _runs_kernel(lambda: lu.lora_unmerged(*args))  # restored on exit
    with pytest.raises(ValueError, match="override op"):
        with dispatch.override(linear="pallas"):
            pass


def test_table_entries_are_well_formed():
    """Sorted n_max, a known impl, kernel blocks the wrapper accepts, a stated source."""
    for entries in tuning.UNMERGED.values():
        assert [e["n_max"] for e in entries] == sorted(e["n_max"] for e in entries)
        for e in entries:
            assert e["impl"] in ("pallas", "mosaic", "reference") and e["source"]
            assert set(e.get("fused_blocks", {})) <= {"block_rows", "block_out", "block_k",
                                                      "split_k", "num_warps", "num_stages"}  # fmt: skip
            assert set(e.get("blocks", {})) <= {
                "block_rows",
                "block_out",
                "block_k",
                "split_k",
                "num_warps",
                "num_stages",
            }
    for entry in tuning.SWITCH.values():
        assert set(entry["blocks"]) <= {"block_out", "block_in", "steps", "num_warps", "num_stages"}
        assert entry["source"]


def test_decode_sizes_run_the_one_launch_kernel_and_larger_follow_the_table(monkeypatch):
    pick = functools.partial(dispatch.pick_unmerged, interpret=False, dtype=jnp.bfloat16)
    for n in (1, 9, 16):  # decode sizes: the one-launch kernel, auto and forced alike
        for impl in ("auto", "pallas"):
            c = pick(impl, n=n, out=12288, d_in=4096, rank=48)
            assert c.impl == "fused" and c.blocks["split_k"] == 1, (n, impl)
    assert pick("reference", n=1, out=12288, d_in=4096, rank=48).impl == "reference"
    # above: nothing measured -> XLA; forced -> the two-launch kernel's heuristic blocks
    c = pick("auto", n=64, out=12288, d_in=4096, rank=48)
    assert c.impl == "reference" and c.source == "no measurement"
    c = pick("pallas", n=300, out=12288, d_in=4096, rank=48)
    assert c.impl == "pallas" and c.source.startswith("heuristic") and c.blocks["block_rows"] == 64
    # a measured entry: its fused blocks at decode sizes, its winner above
    entry = [{"n_max": 16, "impl": "reference", "fused_blocks": {"block_out": 256}, "source": "m"},
             {"n_max": 256, "impl": "pallas", "blocks": {"block_rows": 32}, "source": "m2"}]  # fmt: skip
    monkeypatch.setitem(tuning.UNMERGED, (4096, 4096), entry)
    c = pick("auto", n=4, out=4096, d_in=4096, rank=16)
    assert (c.impl, c.blocks, c.source) == ("fused", {"block_out": 256}, "m")
    c = pick("auto", n=100, out=4096, d_in=4096, rank=16)
    assert (c.impl, c.blocks) == ("pallas", {"block_rows": 32})
    # Mosaic GPU kernel blocks: split-K until >= 2 programs per SM (64 W rows a program)
    c = pick("mosaic", n=1, out=4096, d_in=11008, rank=16)
    assert c.impl == "mosaic" and c.blocks["split_k"] == 4 and 11008 % (64 * 4) == 0


@pytest.mark.parametrize("shape", LLAMA7B, ids=lambda s: s.name)
def test_fused_heuristic_keeps_a_re_read_within_w_at_one_row(shape):
    """At N = 1, top-2: the A tiles a program re-reads (2 x R x in) weigh <= its W tile
    (block_out x in) up to the 128-wide cap; one launch (split_k = 1)."""
    blocks = dispatch._heuristic_fused(1, shape.rank)
    assert blocks["split_k"] == 1 and 32 <= blocks["block_out"] <= 128
    assert 2 * shape.rank <= blocks["block_out"] or blocks["block_out"] == 128


def test_two_launch_heuristic_fills_an_h100_above_decode_sizes():
    """>= 2 programs per SM (132 SMs) for the two-launch kernel's row blocks above 16."""
    for shape in LLAMA7B:
        for n in (32, 64):
            blocks = dispatch._heuristic_unmerged(n, shape.out, shape.d_in)
            programs = -(-shape.out // blocks["block_out"]) * -(-n // blocks["block_rows"])
            assert programs * blocks["split_k"] >= 2 * dispatch.NUM_SMS, (shape, n)


def test_switch_choice():
    kw = dict(n_slots=4, dtype=jnp.bfloat16)
    c = dispatch.pick_switch("auto", False, out=4096, d_in=4096, rank=16, **kw)
    assert c.impl == "pallas" and c.blocks == tuning.SWITCH[(4096, 4096)]["blocks"]
    c = dispatch.pick_switch("pallas", False, out=22016, d_in=4096, rank=32, **kw)
    assert c.blocks["steps"] is None  # unmeasured: the read-once loop over `in`
    with pytest.raises(ValueError, match="mosaic"):
        dispatch.pick_switch("mosaic", False, out=64, d_in=64, rank=16, **kw)


@pytest.mark.parametrize("rank", [16, 32, 48, 64])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_switch_blocks_fit_shared_memory(rank, dtype):
    """The pipeline holds every slot's A tile per `in` step: wide ranks get narrower steps
    (the sm_90 compile found 573 KB at rank 48 with 256-wide steps: a launch failure)."""
    for out, d_in in [(12288, 4096), (4096, 4096), (960, 576)]:
        c = dispatch.pick_switch(
            "pallas", False, out=out, d_in=d_in, rank=rank, n_slots=4, dtype=dtype
        )
        assert (
            dispatch.switch_smem(c.blocks, rank, 4, jnp.dtype(dtype).itemsize)
            <= dispatch.SMEM_BUDGET
        )
    shape = bench.LinearShape("qkv", 12288, 4096, rank)
    for blocks in bench.switch_candidates(shape, dtype=dtype)[1:]:
        assert (
            dispatch.switch_smem(blocks, rank, 4, jnp.dtype(dtype).itemsize) <= dispatch.SMEM_BUDGET
        )


def test_tuning_file_round_trips_through_its_renderer():
    """The GPU check rewrites tuning.py with `render_tuning`: it must reproduce the tables."""
    text = bench.render_tuning(
        tuning.UNMERGED,
        tuning.SWITCH,
        device=tuning.DEVICE,
        jax_version=tuning.JAX,
        date=tuning.DATE,
    )
    scope: dict = {}
    exec(compile(text, "tuning.py", "exec"), scope)
    assert scope["UNMERGED"] == tuning.UNMERGED and scope["SWITCH"] == tuning.SWITCH
    table = {(4096, 4096): [{"n_max": 1, "impl": "reference", "source": "a"},
                            {"n_max": 16, "impl": "reference", "source": "b"}]}  # fmt: skip
    entry = {"n_max": 1, "impl": "pallas", "blocks": {"block_out": 16}, "source": "x"}
    merged = bench.merge_unmerged_entry(table, 4096, 4096, entry)
    assert merged[(4096, 4096)][0] == entry and len(merged[(4096, 4096)]) == 2
    assert table[(4096, 4096)][0] != entry  # the input table is not modified

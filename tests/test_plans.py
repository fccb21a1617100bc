"""Execution plans (dense / unmerged / merged) give the same greedy tokens (fp32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import lsw_jax
from lsw_jax.adapters.lora import attach_adapter, iter_linears
from lsw_jax.config import ALL_TARGETS, AdapterConfig, ModelConfig


def _adapted(kind: str, seed: int = 0, **kw):
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=seed)
    attach_adapter(model, AdapterConfig(kind=kind, **kw), seed=seed)
    rng = np.random.default_rng(seed)
    for _, _, lin in iter_linears(model, ALL_TARGETS):
        lin.lora.b.value = jnp.asarray(rng.normal(0, 0.2, lin.lora.b.shape), jnp.float32)
    if model.router is not None and hasattr(model.router, "weight"):
        model.router.weight.value = model.router.weight[...] * 50  # decisive, varied routing
    return model


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("switch", dict(num_experts=6, top_k=2)),
        ("switch", dict(num_experts=4, top_k=1)),
        ("lora", {}),
    ],
)
def test_every_plan_gives_dense_tokens(kind, kw):
    model = _adapted(kind, **kw)
    ids = np.random.default_rng(1).integers(0, 128, (1, 9))
    dense = lsw_jax.generate(model, ids, 16, plan="dense", eos_token_id=[])
    for plan in ("unmerged", "merged"):
        got = lsw_jax.generate(model, ids, 16, plan=plan, eos_token_id=[])
        np.testing.assert_array_equal(got, dense, err_msg=plan)
    base = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=0)
    assert not np.array_equal(lsw_jax.generate(base, ids, 16, eos_token_id=[]), dense)
    if kind == "switch":  # the merged plan really switched experts along the way
        seq = np.concatenate([ids, dense], axis=1)
        routing = model.forward(jnp.asarray(seq)).routing
        sel = {tuple(sorted(r)) for r in np.asarray(routing.expert_ids[0, ids.shape[1] :])}
        assert len(sel) > 1


def test_batched_unmerged_equals_dense_and_merged_falls_back():
    model = _adapted("switch", num_experts=6, top_k=2)
    ids = np.random.default_rng(2).integers(0, 128, (3, 8))
    dense = lsw_jax.generate(model, ids, 10, plan="dense", eos_token_id=[])
    np.testing.assert_array_equal(
        lsw_jax.generate(model, ids, 10, plan="unmerged", eos_token_id=[]), dense
    )
    with pytest.warns(UserWarning, match="batch of 3 rows"):
        got = lsw_jax.generate(model, ids, 10, plan="merged", eos_token_id=[])
    np.testing.assert_array_equal(got, dense)


def test_merged_refused_for_mola_and_unknown_plan():
    model = _adapted("mola", num_experts=4, top_k=2)
    ids = np.random.default_rng(3).integers(0, 128, (1, 5))
    with pytest.warns(UserWarning, match="mola"):
        lsw_jax.generate(model, ids, 4, plan="merged")
    with pytest.raises(ValueError, match="plan='fast'"):
        lsw_jax.generate(model, ids, 4, plan="fast")


def test_unmerged_plan_runs_the_pallas_kernel_in_interpret_mode():
    """The GPU code path of the model (the fused kernel over the FusedBanks), interpreted on
    CPU, gives the dense plan's tokens (per-part deltas, no kernel)."""
    model = _adapted("switch", num_experts=4, top_k=2)
    ids = np.random.default_rng(4).integers(0, 128, (2, 5))
    dense = lsw_jax.generate(model, ids, 3, plan="dense", eos_token_id=[])
    got = lsw_jax.generate(model, ids, 3, plan="unmerged", impl="pallas", eos_token_id=[])
    np.testing.assert_array_equal(got, dense)


def test_cpu_unmerged_plan_runs_the_kernels_reference(monkeypatch):
    """Off a GPU, "auto" is the kernel's own jnp reference (not the dense plan's products),
    and it agrees with the dense plan for every routing kind."""
    import pallas_kernels.lora_unmerged as lu

    calls = []
    real = lu.lora_unmerged_reference

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(lu, "lora_unmerged_reference", spy)
    for kind, kw in (("switch", dict(num_experts=5, top_k=2)), ("mola", dict(num_experts=3))):
        model = _adapted(kind, seed=5, **kw)
        ids = np.random.default_rng(5).integers(0, 128, (2, 7))
        dense = lsw_jax.generate(model, ids, 5, plan="dense", eos_token_id=[])
        got = lsw_jax.generate(model, ids, 5, plan="unmerged", eos_token_id=[])
        np.testing.assert_array_equal(got, dense, err_msg=kind)
    assert calls  # traced through the reference

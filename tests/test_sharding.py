"""Sharded layouts (lsw_jax.sharding) against single-device results.

The multi-device checks run in a subprocess (tests/sharding_checks.py) because
``--xla_force_host_platform_device_count=8`` must be set before jax starts; it reports
relative errors, shardings and bytes as JSON and the assertions live here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jax.sharding import PartitionSpec as P

from lsw_jax.sharding import LOGICAL_AXIS_RULES, MeshConfig, logical_to_spec, with_rules

HERE = Path(__file__).parent
TOL = 1e-5  # fp32 rounding: sums in another order on the mesh


def fake_mesh(**sizes):
    """Rule resolution reads only ``mesh.shape``: no devices needed."""
    return SimpleNamespace(shape=sizes)


# ---------------------------------------------------------------------- rules (in process)


def test_rules_shard_2d_weights_over_fsdp_and_tensor():
    mesh = fake_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("heads", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("embed", "mlp"), (32, 96), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("norm",), (32,), mesh) == P()
    assert logical_to_spec(("batch", "length"), (8, 16), mesh) == P(("data", "fsdp"))


def test_rules_drop_axes_that_do_not_divide():
    mesh = fake_mesh(data=2, fsdp=4, tensor=2)
    # batch 2 takes data but not fsdp (2 % 8 != 0); an odd vocab replicates
    assert logical_to_spec(("batch", "length"), (2, 16), mesh) == P("data")
    assert logical_to_spec(("vocab", "embed"), (127, 64), mesh) == P(None, "fsdp")
    # one KV head of 16 lanes: 16 % 2 == 0, but a head is never split
    units = {"kv_heads": 1}
    assert logical_to_spec(("kv_heads", "embed"), (16, 64), mesh, units=units) == P(None, "fsdp")
    assert logical_to_spec(("kv_heads", "embed"), (32, 64), mesh, units={"kv_heads": 2}) == P(
        "tensor", "fsdp"
    )


def test_rules_never_use_a_mesh_axis_twice():
    mesh = fake_mesh(fsdp=2, tensor=2)
    rules = with_rules(LOGICAL_AXIS_RULES, experts="tensor")
    # LoRA B bank [E, out, r]: experts take "tensor" first, so "mlp" must replicate
    assert logical_to_spec(("experts", "mlp", "lora_rank"), (4, 96, 8), mesh, rules) == P("tensor")
    assert logical_to_spec(("mlp", "mlp"), (4, 4), mesh) == P("tensor")


def test_mesh_config_parses_and_fills_the_rest():
    cfg = MeshConfig.parse("data=2,fsdp=-1,tensor=2")
    assert cfg.names == ("data", "fsdp", "tensor")
    assert cfg.shape(16) == (2, 4, 2)
    with pytest.raises(ValueError, match="does not fit"):
        cfg.shape(6)
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig.parse("data=-1,tensor=-1")


# ---------------------------------------------------------------------- 8 fake devices


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "checks.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharding_checks.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n_devices"] == 8
    return result


def test_sharded_forward_matches_single_device(checks):
    cases = {k: v for k, v in checks.items() if k.startswith("forward/")}
    assert len(cases) == 3
    for name, case in cases.items():
        assert case["rel_err"] < TOL, (name, case)
        assert case["logits_devices"] == 8, name
    div = checks["forward/divisible/data2_fsdp2_tensor2"]
    # fused q|k|v rows are grouped per KV head: sharded on whole KV-head groups
    assert (div["qkv_spec"], div["o_spec"]) == ("P('tensor', 'fsdp')", "P('fsdp', 'tensor')")
    assert checks["forward/divisible/tensor8"]["qkv_spec"] == "P('tensor',)"
    # kv_heads=1 on a 2-way tensor axis: q|k|v is one KV-head group, so it replicates along
    # the heads (still FSDP along embed); o_proj still splits its 4 query heads
    mqa = checks["forward/mqa/data2_fsdp2_tensor2"]
    assert (mqa["qkv_spec"], mqa["o_spec"]) == ("P(None, 'fsdp')", "P('fsdp', 'tensor')")


def test_sharded_generate_matches_single_device(checks):
    forward = {k: v for k, v in checks.items() if k.startswith("forward/")}
    gen = {k: v["generate_equal"] for k, v in forward.items() if "generate_equal" in v}
    assert gen == {
        "forward/divisible/data2_fsdp2_tensor2": True,
        "forward/divisible/tensor8": True,
    }


def test_sharded_train_step_matches_single_device(checks):
    t = checks["train"]
    assert len(t["loss_mesh"]) == 2
    assert t["loss_rel_err"] < TOL, t
    assert t["weights_change"] > 1e-3, t  # the steps did update the adapters
    assert t["weights_max_rel_err"] < TOL, t
    # adapter banks follow their linear's axes: A [E, r, in], B [E, out, r]
    assert "P(None, None, 'fsdp')" in t["adapter_specs"]
    assert "P(None, 'tensor')" in t["adapter_specs"]


def test_per_device_bytes_follow_the_rules(checks):
    b = checks["bytes"]
    assert b["q_per_device"] == [b["q_total"] // 4] * 8  # fsdp x tensor = 4 ways
    assert b["norm_per_device"] == [b["norm_total"]] * 8  # replicated
    assert b["per_device"] == [b["expected_per_device"]] * 8
    assert b["expected_per_device"] < b["total"] / 3.9


def test_sharded_load_restores_into_the_rule_shardings(checks):
    load = checks["load"]
    assert load["n_params"] > 10
    assert load["mismatched"] == []
    assert load["max_rel_err"] == 0.0
    assert load["qkv_spec"] == "P(None, 'fsdp')"
    assert load["o_spec"] == "P('fsdp', 'tensor')"
    assert load["embed_spec"] == "P('tensor', 'fsdp')"


# ---------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_process_sharded_forward():
    """Two jax.distributed processes x 4 CPU devices (gloo collectives) vs one process."""
    proc = subprocess.run(
        [sys.executable, str(HERE.parent / "scripts" / "multihost_demo.py")],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["process_0"]["global_devices"] == 8
    assert report["process_1"]["local_devices"] == 4
    assert max(report["rel_err"]) < TOL

"""Smoke test of scripts/experiment_routing.py on a tiny random model (no downloads)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiment_routing.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("experiment_routing", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutual_information_bounds():
    mod = _load_script()
    uniform = np.full((3, 4), 0.25)
    assert abs(mod.mutual_information(uniform)) < 1e-12
    one_hot = np.eye(3)  # each domain its own expert: I = log(3)
    np.testing.assert_allclose(mod.mutual_information(one_hot), np.log(3), rtol=1e-12)


def test_matched_parameter_counts():
    """Same bank for all three methods; routers: none, one, one per layer."""
    from flax import nnx

    import lsw_jax
    from lsw_jax.adapters.lora import LoRAParam, attach_adapter
    from lsw_jax.config import ModelConfig

    mod = _load_script()
    args = mod.parse_args(["--num-experts", "4", "--rank", "2"])
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=0)
    counts = {}
    for method in mod.METHODS:
        attach_adapter(model, mod.adapter_for(method, args))
        counts[method] = mod.count_params(nnx.state(model, LoRAParam))
    assert len({c["bank"] for c in counts.values()}) == 1
    assert counts["lora"]["router"] == 0
    assert counts["switch"]["router"] == 4 * 64  # E x hidden
    assert counts["mola"]["router"] == 2 * counts["switch"]["router"]  # one per layer


def test_tiny_run_writes_results(tmp_path):
    mod = _load_script()
    res = mod.main(
        [
            "--tiny",
            "--steps", "1",
            "--no-init-control",
            "--seq-len", "32",
            "--num-experts", "4",
            "--rank", "2",
            "--train-rows", "4",
            "--eval-rows", "1",
            "--skill-records", "24",
            "--skills", "add,sort",
            "--methods", "lora,switch",
            "--out-dir", str(tmp_path),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "routing_results.json").read_text())
    assert saved["domains"] == ["comedy", "tragedy", "skill:add", "skill:sort"]
    by_method = {r["method"]: r for r in res["runs"]}
    assert set(by_method) == {"lora", "switch"}
    # Plain LoRA's rank is E * r, so its bank matches the expert bank exactly.
    assert by_method["lora"]["params"]["bank"] == by_method["switch"]["params"]["bank"]
    assert by_method["lora"]["adapter"]["rank"] == 8
    assert by_method["lora"]["params"]["router"] == 0
    rt = by_method["switch"]["routing"]
    np.testing.assert_allclose(np.sum(rt["usage_layer0"], axis=1), 1.0, rtol=1e-5)
    assert 0.0 <= rt["mi_layer0"] <= np.log(4) + 1e-9
    # switch has one shared routing: one usage row per domain.
    assert len(by_method["switch"]["held_out"]["comedy"]["expert_load_per_layer"]) == 1
    for name in ("results.md", "loss_curves.png", "expert_usage.png"):
        assert (tmp_path / f"routing_{name}").is_file()

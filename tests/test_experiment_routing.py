"""scripts/experiment_routing.py on a tiny random model (no downloads): specs, equal
parameters, per-eval routing statistics, and resuming a partly done run set."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import lsw_jax
from lsw_jax.adapters.lora import LoRAParam, attach_adapter
from lsw_jax.config import ModelConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiment_routing.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("experiment_routing", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the script loads
    spec.loader.exec_module(mod)
    return mod


def test_run_specs_and_equal_banks():
    """One bank size for every run: LoRA r = bank_rank, E experts of r = bank_rank / E."""
    mod = _load_script()
    args = mod.parse_args(["--num-experts", "4", "--bank-rank", "8"])
    specs = {s: mod.RunSpec.parse(s, args) for s in ("lora", "mola", "switch", "switch:k1:e2")}
    assert specs["switch:k1:e2"] == mod.RunSpec("switch", 1, 2)
    assert specs["lora"].label == "lora" and specs["mola"].label == "mola E4 k2"
    model = lsw_jax.init_model(ModelConfig.tiny(), dtype="float32", seed=0)
    counts = {}
    for name, spec in specs.items():
        attach_adapter(model, mod.adapter_for(spec, args))
        counts[name] = mod.count_params(nnx.state(model, LoRAParam))
    assert len({c["bank"] for c in counts.values()}) == 1
    assert counts["lora"]["router"] == 0
    assert counts["switch"]["router"] == 4 * 64  # E x hidden
    assert counts["mola"]["router"] == 2 * counts["switch"]["router"]  # one per layer
    assert counts["switch:k1:e2"]["router"] == 2 * 64
    ctx = mod.RunSpec.parse("switch:ctx", args)
    assert ctx == mod.RunSpec("switch", 2, 4, "prefix_mean") and ctx.label == "switch E4 k2 ctx"
    assert mod.adapter_for(ctx, args).router_context == "prefix_mean"
    for bad in ("moe", "switch:x3", "switch:e3", "mola:ctx"):  # 8 % 3 != 0
        with pytest.raises(ValueError, match="run spec"):
            mod.RunSpec.parse(bad, args)


def test_results_record_the_checkpoint_under_home():
    mod = _load_script()
    home = Path.home()
    assert mod._home_relative(str(home / ".cache" / "m")) == "~/.cache/m"
    assert mod._home_relative("/elsewhere/m") == "/elsewhere/m"
    old, new = {"ckpt": str(home / "m"), "lr": 1.0}, {"ckpt": "~/m", "lr": 1.0}
    mod._check_same_config(old, new, Path("x"))  # the same checkpoint
    with pytest.raises(SystemExit, match="another config"):
        mod._check_same_config(old, {**new, "ckpt": "/other/m"}, Path("x"))


def test_schedule_runs_phases_seed_by_seed():
    mod = _load_script()
    args = mod.parse_args(["--runs", "lora,switch@0,1;switch:k1;lora@1", "--seeds", "5"])
    got = [(s.label, seed) for s, seed in mod.schedule(args)]
    assert got == [
        ("lora", 0),
        ("switch E8 k2", 0),
        ("lora", 1),
        ("switch E8 k2", 1),
        ("switch E8 k1", 5),
    ]


def test_paired_gaps_hand_computed():
    mod = _load_script()
    runs = [
        {"label": lab, "seed": s, "evals": [{"group": {"text": t, "skills": k}}]}
        for lab, s, t, k in [
            ("a", 0, 1.1, 2.0),
            ("b", 0, 1.0, 2.0),
            ("a", 1, 2.4, 1.0),
            ("b", 1, 2.0, 2.0),
        ]
    ]
    gap = mod.paired_gaps(runs, "a", "b")
    assert gap["seeds"] == [0, 1]
    np.testing.assert_allclose(gap["text"], (15.0, np.std([10.0, 20.0], ddof=1)))
    np.testing.assert_allclose(gap["skills"], (-25.0, np.std([0.0, -50.0], ddof=1)))


TINY = [
    "--tiny",
    "--seq-len", "32",
    "--num-experts", "4",
    "--bank-rank", "8",
    "--train-rows", "4",
    "--eval-rows", "1",
    "--eval-batch", "2",
    "--skill-records", "24",
    "--skills", "add,sort",
]  # fmt: skip


def test_tiny_run_writes_results_and_resumes(tmp_path):
    mod = _load_script()
    argv = [
        *TINY,
        "--steps", "2",
        "--eval-every", "1",
        "--runs", "lora,switch",
        "--out-dir", str(tmp_path),
        "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    res = mod.main([*argv, "--seeds", "0"])
    saved = json.loads((tmp_path / "routing_results.json").read_text())
    assert saved["domains"] == ["comedy", "tragedy", "skill:add", "skill:sort"]
    by = {r["label"]: r for r in res["runs"]}
    assert set(by) == {"lora", "switch E4 k2"}
    assert by["lora"]["params"]["bank"] == by["switch E4 k2"]["params"]["bank"]
    assert by["lora"]["adapter"]["rank"] == 8 and by["switch E4 k2"]["adapter"]["rank"] == 2
    evals = by["switch E4 k2"]["evals"]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        rt = e["routing"]
        np.testing.assert_allclose(np.sum(rt["usage_layer0"], axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.sum(rt["expert_load"]), 1.0, rtol=1e-5)
        assert 0.0 <= rt["mi_layer0"] <= np.log(4) + 1e-9
        assert len(rt["entropy_layer0"]) == 4
    # Step 0: B = 0, so every adapter's held-out loss is the base model's.
    for lab in by:
        for name, value in by[lab]["evals"][0]["loss"].items():
            assert value == pytest.approx(saved["base"][name]["loss"], rel=1e-5)
    assert "routing" not in by["lora"]["evals"][-1]
    for name in ("results.md", "loss_curves.png", "expert_usage.png", "routing_evals.png"):
        assert (tmp_path / f"routing_{name}").is_file()

    # A second invocation with one more seed trains only that seed's runs.
    res2 = mod.main([*argv, "--seeds", "0,1"])
    assert [(r["label"], r["seed"]) for r in res2["runs"]] == [
        ("lora", 0),
        ("switch E4 k2", 0),
        ("lora", 1),
        ("switch E4 k2", 1),
    ]
    assert res2["runs"][0]["history"] == res["runs"][0]["history"]
    std = res2["summary"]["switch E4 k2"]["loss_std"]
    assert std is not None and len(std) == 4
    with pytest.raises(SystemExit, match="another config"):
        mod.main([*argv, "--seeds", "0", "--lr", "0.5"])
    # A resumed run can hold an extra evaluation; the plots use the steps all seeds have.
    evals = res2["runs"][1]["evals"]
    evals.insert(1, {**evals[1], "step": 7})
    assert (tmp_path / "resumed_routing_evals.png") in map(
        Path, mod.plots(res2, tmp_path, "resumed")
    )


def test_killed_run_resumes_from_its_last_evaluation(tmp_path, monkeypatch):
    """A run killed mid-way restarts from its last checkpoint (at an evaluation) and ends
    with the same per-step losses and evaluations as a run never interrupted."""
    mod = _load_script()

    def argv(name):
        return [
            *TINY,
            "--steps", "4",
            "--eval-every", "2",
            "--runs", "mola",
            "--out-dir", str(tmp_path / name),
            "--work-dir", str(tmp_path / name / "work"),
        ]  # fmt: skip

    whole = mod.main(argv("whole"))["runs"][0]
    real_run, calls = mod.Trainer.run, []

    def killed(self, *, stop_after=None, progress=True):
        calls.append(self.step)
        if len(calls) == 2:  # one step past the checkpoint at step 2, then the process dies
            real_run(self, stop_after=1, progress=False)
            raise KeyboardInterrupt
        return real_run(self, stop_after=stop_after, progress=progress)

    monkeypatch.setattr(mod.Trainer, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        mod.main(argv("cut"))
    monkeypatch.undo()
    assert calls == [0, 2]
    assert not (tmp_path / "cut" / "routing_results.json").exists()
    resumed = mod.main(argv("cut"))["runs"][0]
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    for key in ("ce", "loss"):  # step 3 ran twice: the replay is bit-exact
        assert [h[key] for h in resumed["history"]] == [h[key] for h in whole["history"]]
    assert [e["step"] for e in resumed["evals"]] == [0, 2, 4]
    for got, want in zip(resumed["evals"], whole["evals"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["routing"]["mi_layer0"] == pytest.approx(want["routing"]["mi_layer0"], abs=1e-6)
    assert not (tmp_path / "cut" / "work" / "lsw_jax_routing_runs" / "mola_E4_k2-s0").exists()

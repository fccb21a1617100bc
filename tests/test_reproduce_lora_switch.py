"""scripts/reproduce_lora_switch.py end to end on a tiny random Llama (HF folder -> results)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hf_helpers import make_hf_model, save_hf_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_lora_switch.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_lora_switch", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _byte_tokenizer(folder: Path) -> None:
    """tokenizer.json: one token per byte (ids 0..255), then <s> = 256 and </s> = 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    hf = save_hf_model(
        make_hf_model("llama", vocab_size=260, bos_token_id=256, eos_token_id=257), root / "hf"
    )
    _byte_tokenizer(hf)
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(40):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            f.write(json.dumps({"prompt": f"add {a} {b} =", "response": f" {a + b}"}) + "\n")
    (root / "heldout.txt").write_text("add 3 4 = 7\n\nadd 10 5 = 15\n")
    with open(root / "mc.jsonl", "w") as f:
        for i in range(3):
            f.write(
                json.dumps({"question": f"add {i} 1 =", "choices": ["x", str(i + 1)], "answer": 1})
                + "\n"
            )
    return root


@pytest.mark.slow
def test_reproduce_runs_all_methods_at_tiny_shapes(tiny_setup):
    root = tiny_setup
    mod = _load_script()
    out = root / "out"
    res = mod.main(
        [
            "--model-dir", str(root / "hf"),
            "--ckpt", str(root / "ckpt"),
            "--train", str(root / "train.jsonl"),
            "--eval-text", str(root / "heldout.txt"),
            "--choices", f"mc={root / 'mc.jsonl'}",
            "--out", str(out),
            "--num-experts", "4",
            "--bank-rank", "8",
            "--steps", "2",
            "--batch-size", "2",
            "--seq-len", "32",
            "--warmup-steps", "1",
            "--dtype", "float32",
            "--decode-tokens", "3",
            "--prompt-len", "4",
            "--repeats", "1",
        ]
    )  # fmt: skip
    saved = json.loads((out / "reproduce_results.json").read_text())
    assert set(saved["results"]) == {"base", "lora", "mola", "switch"}
    trained = {m: saved["results"][m]["train"] for m in ("lora", "mola", "switch")}
    # Equal banks: LoRA r=8 vs 4 experts of r=2; routers on top (none / one / one per layer).
    hidden, layers = 64, 2
    banks = {m: t["trainable_params"] for m, t in trained.items()}
    assert banks["switch"] - banks["lora"] == 4 * hidden
    assert banks["mola"] - banks["lora"] == layers * 4 * hidden
    assert trained["switch"]["adapter"]["rank"] == 2 and trained["lora"]["adapter"]["rank"] == 8
    for m in res["results"]:
        r = res["results"][m]
        assert math.isfinite(r["held_out"]["perplexity"]) and r["held_out"]["tokens"] > 0
        assert r["mc"]["n"] == 3 and 0.0 <= r["mc"]["acc"] <= 1.0
        assert all(
            math.isfinite(ms) for ms in r["decode_ms_per_token"].values()
        )  # noisy at tiny shapes
    assert set(res["results"]["switch"]["decode_ms_per_token"]) == {"unmerged", "merged"}
    # Each trained adapter is stored; LoRA also in PEFT's format.
    assert (out / "switch" / "adapters" / "final" / "adapter.json").is_file()
    assert (out / "lora" / "peft" / "adapter_config.json").is_file()
    assert "| switch |" in (out / "reproduce_results.md").read_text()


def test_reproduce_refuses_bad_arguments(tmp_path):
    mod = _load_script()
    with pytest.raises(SystemExit, match="give --model-dir"):
        mod.main(["--ckpt", str(tmp_path / "none"), "--train", "x.jsonl", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown"):
        mod.main(["--ckpt", "c", "--train", "x", "--out", str(tmp_path), "--methods", "moe"])
    with pytest.raises(SystemExit, match="name=file"):
        mod.choice_sets("arc.jsonl")
    args = mod.parse_args(["--ckpt", "c", "--train", "x", "--out", "o", "--bank-rank", "12"])
    with pytest.raises(ValueError, match="not a multiple of 8"):
        mod.adapter_for("switch", args)

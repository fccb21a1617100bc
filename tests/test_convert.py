"""Conversion: config spellings, streaming writes, atomicity, and clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_helpers import hf_logits, make_hf_model, rel_err, save_hf_model
from safetensors.numpy import load_file, save_file

import lsw_jax
from lsw_jax.cli import main
from lsw_jax.config import ModelConfig


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    hf = make_hf_model("llama", seed=2)
    save_hf_model(hf, root / "hf")
    return hf, root / "hf"


def _copy_with(src, dst, mutate):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_config_transformers4_and_5_spellings():
    v4 = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_theta=5e5,
        torch_dtype="bfloat16",
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    )
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5["dtype"] = "bfloat16"
    v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=5e5)
    a, b = ModelConfig.from_hf_config(v4), ModelConfig.from_hf_config(v5)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling.rope_type == "llama3"
    assert a.head_dim == 4 and a.num_kv_heads == 2


@pytest.mark.parametrize(
    "patch, match",
    [
        (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "unsupported rope type 'yarn'"),
        (dict(num_hidden_layers=None), "missing field 'num_hidden_layers'"),
    ],
)
def test_bad_configs_are_named(hf_dir, tmp_path, patch, match):
    cfg = json.loads((hf_dir[1] / "config.json").read_text())
    for k, v in patch.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_json_file(tmp_path / "config.json")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]",
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", np.ones(5, np.float32)),
            r"'model.norm.weight' has shape \(5,\), expected \(64,\)",
        ),
        (
            lambda t: t.__setitem__("model.layers.0.extra.weight", np.ones(3, np.float32)),
            "unexpected tensor 'model.layers.0.extra.weight'",
        ),
    ],
)
def test_bad_tensors_are_named_and_nothing_is_written(hf_dir, tmp_path, mutate, match):
    src = _copy_with(hf_dir[1], tmp_path / "src", mutate)
    with pytest.raises(ValueError, match=match):
        lsw_jax.convert_checkpoint(src, tmp_path / "ckpt", show_progress=False)
    assert not (tmp_path / "ckpt").exists()
    assert not list(tmp_path.glob(".ckpt*"))  # no partial directory left behind


def test_truncated_safetensors_is_refused(hf_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((hf_dir[1] / "config.json").read_text())
    data = (hf_dir[1] / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        lsw_jax.convert_checkpoint(src, tmp_path / "ckpt", show_progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_sharded_bf16_checkpoint_converts(hf_dir, tmp_path):
    hf, _ = hf_dir
    save_hf_model(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    lsw_jax.convert_checkpoint(tmp_path / "sharded", tmp_path / "ckpt", show_progress=False)
    ids = np.random.default_rng(0).integers(3, 160, (1, 12))
    ours = lsw_jax.load_model(tmp_path / "ckpt", dtype="float32")
    assert rel_err(np.asarray(ours(ids)), hf_logits(hf, ids)) < 1e-4
    # Stored in bf16 on request; loads back close to fp32 results.
    lsw_jax.convert_checkpoint(
        tmp_path / "sharded", tmp_path / "bf16", dtype="bfloat16", show_progress=False
    )
    low = lsw_jax.load_model(tmp_path / "bf16", dtype="float32")
    assert low.layers[0].self_attn.qkv_proj.weight[...].dtype == np.float32
    assert rel_err(np.asarray(low(ids)), hf_logits(hf, ids)) < 2e-2


def test_existing_destination_is_kept(hf_dir, tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        lsw_jax.convert_checkpoint(hf_dir[1], dst, show_progress=False)
    assert (dst / "keep.txt").read_text() == "mine"


def test_save_model_roundtrip_and_cli(hf_dir, tmp_path, capsys):
    hf, src = hf_dir
    main(["convert", str(src), str(tmp_path / "ckpt")])
    assert "wrote" in capsys.readouterr().out
    model = lsw_jax.load_model(tmp_path / "ckpt", dtype="float32")
    lsw_jax.save_model(model, tmp_path / "again")
    again = lsw_jax.load_model(tmp_path / "again", dtype="float32")
    ids = np.random.default_rng(1).integers(3, 160, (2, 6))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))
    with pytest.raises(SystemExit, match="already exists"):
        main(["convert", str(src), str(tmp_path / "ckpt")])
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        lsw_jax.load_model(tmp_path / "nothing")

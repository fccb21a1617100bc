"""Checkpoints attacked as a careless or hostile user would: edited configs, corrupted or
swapped weight files, relative paths, ``--overwrite`` on user files, bad adapter configs,
and training checkpoints corrupted mid-run. Each must be refused with a message naming
the file and array, or handled (resume from the newest step that verifies)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file
from test_cli import subcommands
from test_serve_fixtures import WORDS, make_tokenizer
from test_train import _trainer

import lsw_jax
from lsw_jax.adapters.lora import attach_adapter
from lsw_jax.adapters.store import load_adapter, save_adapter
from lsw_jax.checkpoint import CheckpointError, array_checksum
from lsw_jax.cli import build_parser, main
from lsw_jax.config import AdapterConfig, ModelConfig
from lsw_jax.convert.hf import hf_key_table
from lsw_jax.convert.peft import export_peft_adapter
from lsw_jax.linears import iter_checkpoint_tensors

CFG = ModelConfig.tiny(vocab_size=len(WORDS), max_position_embeddings=128)
IDS = np.array([[1, 5, 9, 3, 7]], np.int32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, checkpoint dir) of a tiny random model; tests copy the folder to attack it."""
    root = tmp_path_factory.mktemp("ckpt")
    model = lsw_jax.init_model(CFG, dtype="float32", seed=1)
    lsw_jax.save_model(model, root / "ckpt")
    make_tokenizer().save(root / "ckpt")
    return model, root / "ckpt"


def _copy(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved[1], dst)
    return dst


def _edit_config(ckpt, **fields):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["lsw_jax_config"].update(fields)
    (ckpt / "config.json").write_text(json.dumps(raw))


def _logits(model):
    return np.asarray(model(IDS))


# ---------------------------------------------------------------------- model checkpoints


def test_checkpoint_round_trip_records_every_array(saved):
    model, ckpt = saved
    manifest = json.loads((ckpt / "params" / "manifest.json").read_text())["arrays"]
    assert len(manifest) == len(hf_key_table(CFG))
    q = manifest["layer_00001/self_attn.q_proj.weight"]
    w = dict(iter_checkpoint_tensors(model))[("layers", 1, "self_attn", "q_proj", "weight")]
    assert q == {"shape": list(w.shape), "dtype": "float32", "crc32": array_checksum(w)}
    np.testing.assert_array_equal(
        _logits(lsw_jax.load_model(ckpt, dtype="float32")), _logits(model)
    )


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"num_layers": 1}, r"holds parameter groups \['layer_00001'\] that config.json does not"),
        ({"num_layers": 3}, r"missing parameter groups \['layer_00002'\]"),
        ({"hidden_size": 80}, r"array 'embed_tokens' has shape \(128, 64\), config.json implies"),
        ({"intermediate_size": 128}, r"layer_00000: array 'mlp\.\w+_proj\.weight' has shape"),
        ({"tie_word_embeddings": True}, r"top: arrays do not match config.json: .*lm_head"),
        ({"num_layers": "2"}, r"lsw_jax_config.num_layers = '2', expected an integer"),
        ({"rope_scaling": {"rope_type": "yarn"}}, r"invalid lsw_jax_config: .*yarn"),
    ],
)
def test_edited_config_is_refused(saved, tmp_path, fields, match):
    ckpt = _copy(saved, tmp_path)
    _edit_config(ckpt, **fields)
    with pytest.raises(CheckpointError, match=match):
        lsw_jax.load_model(ckpt, dtype="float32")


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": 3, "lsw_jax_config": {}}', r"format 3 is not one this lsw-jax reads.*convert"),
        ("{}", r"not an lsw-jax checkpoint config"),
        ("", r"config.json: cannot read"),
        ("[1, 2]", r"not an lsw-jax checkpoint config"),
        ('{"format": 2, "lsw_jax_config": []}', r"not an lsw-jax checkpoint config"),
    ],
)
def test_unknown_format_or_empty_config_is_refused(saved, tmp_path, text, match):
    ckpt = _copy(saved, tmp_path)
    (ckpt / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        lsw_jax.load_model(ckpt, dtype="float32")
    with pytest.raises(SystemExit, match=match):
        main(["generate", "--ckpt", str(ckpt), "--prompt", "w1"])


def test_garbage_in_a_weight_file_is_refused(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    group = ckpt / "params" / "layer_00000"
    biggest = max((p for p in group.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[64 : 64 + 4096] = np.random.default_rng(0).bytes(min(4096, len(data) - 64))
    biggest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="layer_00000"):
        lsw_jax.load_model(ckpt, dtype="float32")


def test_swapped_weights_fail_their_checksum(saved, tmp_path):
    """A group rewritten with valid arrays of the right shapes (another model's layer):
    Orbax reads it happily; only the checksum can tell."""
    model, _ = saved
    ckpt = _copy(saved, tmp_path)
    group = ckpt / "params" / "layer_00001"
    with ocp.StandardCheckpointer() as ck:
        arrays = ck.restore(group)
        arrays["self_attn.v_proj.weight"] = arrays["self_attn.v_proj.weight"] * 1.01
        shutil.rmtree(group)
        ck.save(group, arrays)
    with pytest.raises(
        CheckpointError, match=r"layer_00001: array 'self_attn.v_proj.weight' fails"
    ):
        lsw_jax.load_model(ckpt, dtype="float32")
    # The escape hatch loads it (shape checks still on), and the swap is visible.
    loaded = lsw_jax.load_model(ckpt, dtype="float32", verify_checksums=False)
    assert not np.array_equal(_logits(loaded), _logits(model))


def test_manifest_that_disagrees_with_the_arrays_is_refused(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    path = ckpt / "params" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["arrays"]["top/norm.weight"]["dtype"] = "bfloat16"
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"array 'norm.weight' is float32\[64\] on disk"):
        lsw_jax.load_model(ckpt, dtype="float32")
    path.unlink()
    with pytest.raises(CheckpointError, match=r"manifest.json: missing"):
        lsw_jax.load_model(ckpt, dtype="float32")


def test_format_1_checkpoint_still_loads_with_shape_checks(saved, tmp_path):
    model, _ = saved
    ckpt = _copy(saved, tmp_path)
    (ckpt / "params" / "manifest.json").unlink()
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "format": 1}))
    np.testing.assert_array_equal(
        _logits(lsw_jax.load_model(ckpt, dtype="float32")), _logits(model)
    )
    _edit_config(ckpt, hidden_size=80)
    with pytest.raises(CheckpointError, match="has shape"):
        lsw_jax.load_model(ckpt, dtype="float32")


def test_stored_adapter_tampering_is_refused(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    model = lsw_jax.load_model(ckpt, dtype="float32")
    attach_adapter(model, AdapterConfig(kind="lora", rank=4), seed=2)
    save_adapter(model, ckpt, "a")
    layout_path = ckpt / "adapters" / "a" / "adapter.json"
    layout = json.loads(layout_path.read_text())

    fresh = lsw_jax.load_model(ckpt, dtype="float32")
    key = next(iter(layout["checksums"]))
    bad = {**layout, "checksums": {**layout["checksums"], key: layout["checksums"][key] ^ 1}}
    layout_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=f"array {key} fails its checksum"):
        load_adapter(fresh, ckpt, "a")

    bad = json.loads(json.dumps(layout))
    bad["modules"]["0.q_proj"]["rank"] = 8  # Orbax alone would pad the stored rank-4 bank
    layout_path.write_text(json.dumps(bad))
    with pytest.raises(
        CheckpointError,
        match=r"array layers/0/\S*q_proj\S*/a is float32\[1, 4, 64\] on disk, expected float32\[1, 8, 64\]",
    ):
        load_adapter(lsw_jax.load_model(ckpt, dtype="float32"), ckpt, "a")


# ---------------------------------------------------------------------- paths and overwrite


def _hf_folder(model, dst):
    """An HF-style folder (config.json + model.safetensors) of ``model``, without torch."""
    dst.mkdir()
    cfg = model.cfg
    hf_cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    (dst / "config.json").write_text(json.dumps(hf_cfg))
    parts = dict(iter_checkpoint_tensors(model))
    tensors = {name: parts[path] for name, (path, _) in hf_key_table(cfg).items()}
    save_file(tensors, str(dst / "model.safetensors"))
    make_tokenizer().save(dst)
    return dst


def test_relative_paths_through_the_cli_and_the_api(saved, tmp_path, monkeypatch, capsys):
    model, _ = saved
    monkeypatch.chdir(tmp_path)
    _hf_folder(model, tmp_path / "hf")
    main(["convert", "hf", "ckpt/"])
    loaded = lsw_jax.load_model("ckpt/", dtype="float32")
    np.testing.assert_array_equal(_logits(loaded), _logits(model))
    main(["generate", "--ckpt", "ckpt", "--prompt", "w1 w2", "--max-new-tokens", "2"])

    attach_adapter(loaded, AdapterConfig(kind="lora", rank=2), seed=0)
    export_peft_adapter(loaded, "peft/")
    main(["adapters", "import-peft", "--ckpt", "ckpt/", "--name", "p", "peft/"])
    main(["adapters", "list", "--ckpt", "ckpt"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("p\tlora")
    lsw_jax.load_model("ckpt", dtype="float32", adapter="p")
    lsw_jax.load_model("ckpt", dtype="float32", adapter="peft")

    text = " ".join(WORDS[i % 100] for i in range(3000))
    (tmp_path / "text.txt").write_text(text)
    train = ["train", "--ckpt", "ckpt/", "--data", "text.txt", "--out", "run/", "--kind", "lora"]
    small = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--adapter-name", "t"]
    main(train + small)
    assert (tmp_path / "run" / "adapters" / "final" / "adapter.json").exists()
    lsw_jax.load_model("ckpt", dtype="float32", adapter="t")
    main(["eval", "--ckpt", "ckpt", "--adapter", "t", "--text", "text.txt", "--max-len", "16"])


def test_overwrite_replaces_only_a_checkpoint(saved, tmp_path):
    model, ckpt = saved
    src = _hf_folder(model, tmp_path / "hf")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    for dst in (user, src):  # a folder of user files; an HF model folder (has config.json)
        with pytest.raises(SystemExit, match="is not an lsw-jax checkpoint: refusing"):
            main(["convert", str(src), str(dst), "--overwrite"])
    assert (user / "thesis.tex").read_text() == "years of work"
    assert (src / "model.safetensors").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match="refusing"):
        main(["convert", str(src), str(a_file), "--overwrite"])
    (tmp_path / "empty").mkdir()
    main(["convert", str(src), str(tmp_path / "empty"), "--overwrite"])
    main(["convert", str(src), str(tmp_path / "empty"), "--overwrite"])  # a checkpoint now
    assert lsw_jax.load_model(tmp_path / "empty", dtype="float32").cfg == model.cfg


def test_existing_destination_names_the_cli_flag(saved, peft_dir, tmp_path):
    model, _ = saved
    src, dst = _hf_folder(model, tmp_path / "hf"), tmp_path / "ckpt"
    main(["convert", str(src), str(dst)])
    with pytest.raises(FileExistsError, match=r"ckpt already exists \(pass overwrite=True"):
        lsw_jax.convert_checkpoint(src, dst, show_progress=False)  # the API's own switch
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), str(dst)])
    assert (
        str(e.value)
        == f"lsw-jax convert: error: {dst} already exists (pass --overwrite to replace it)"
    )
    main(["adapters", "import-peft", "--ckpt", str(dst), "--name", "p", str(peft_dir)])
    with pytest.raises(SystemExit, match=r"adapters/p already exists \(pass --overwrite to"):
        main(["adapters", "import-peft", "--ckpt", str(dst), "--name", "p", str(peft_dir)])


# Every sub-command taking --ckpt, with its other required arguments.
CKPT_COMMANDS = {
    ("generate",): ["--prompt", "w1"],
    ("eval",): ["--text", "t.txt"],
    ("train",): ["--data", "t.txt", "--out", "run"],
    ("adapters", "import-peft"): ["--name", "p", "peft"],
    ("adapters", "export-peft"): ["--name", "p", "--out", "exported"],
    ("adapters", "list"): [],
    ("serve",): [],
}


def test_every_ckpt_command_is_covered():
    taking = {
        path
        for path, parser in subcommands(build_parser())
        if any("--ckpt" in a.option_strings for a in parser._actions)
    }
    assert taking == set(CKPT_COMMANDS)


@pytest.mark.parametrize("bad", ["missing", "empty", "a_file"])
def test_every_ckpt_command_refuses_a_non_checkpoint_alike(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "t.txt").write_text("text")  # the other paths exist: parsed (checked) first
    (tmp_path / "peft").mkdir()
    why = {
        "missing": "no such file or directory",
        "empty": "no config.json",
        "a_file": "a file, not a directory",
    }[bad]
    want = f"{bad}: not a checkpoint ({why})"
    for path, rest in CKPT_COMMANDS.items():
        with pytest.raises(SystemExit) as e:
            main([*path, "--ckpt", bad, *rest])
        assert str(e.value) == f"lsw-jax {path[0]}: error: {want}", path
    with pytest.raises(OSError) as e:
        lsw_jax.load_model(bad)  # the library gives the same message
    assert str(e.value) == want
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["a_file", "empty", "peft", "t.txt"]  # nothing written


# ---------------------------------------------------------------------- PEFT adapter configs


@pytest.fixture(scope="module")
def peft_dir(saved, tmp_path_factory):
    model = lsw_jax.load_model(saved[1], dtype="float32")
    attach_adapter(model, AdapterConfig(kind="lora", rank=2), seed=0)
    return export_peft_adapter(model, tmp_path_factory.mktemp("peft") / "p")


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"r": None}, r"field 'r' = None, expected a positive integer"),
        ({"r": "8"}, r"field 'r' = '8', expected a positive integer"),
        ({"r": 0}, r"field 'r' = 0"),
        ({"lora_alpha": float("nan")}, r"field 'lora_alpha' = nan, expected a finite number"),
        ({"lora_alpha": [16]}, r"field 'lora_alpha' = \[16\]"),
        ({"rank_pattern": [4]}, r"field 'rank_pattern' must be an object"),
        ({"rank_pattern": {"q_proj": None}}, r"rank_pattern\['q_proj'\] = None"),
        ({"alpha_pattern": {"(": 2}}, r"alpha_pattern pattern '\(' is not a regex"),
        ({"target_modules": {"q": 1}}, r"field 'target_modules'"),
        ({"use_rslora": "yes"}, r"field 'use_rslora' = 'yes'"),
    ],
)
def test_bad_peft_config_fields_are_named(saved, peft_dir, tmp_path, patch, match):
    bad = tmp_path / "bad"
    shutil.copytree(peft_dir, bad)
    raw = json.loads((peft_dir / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**raw, **patch}))
    with pytest.raises(ValueError, match=r"bad/adapter_config.json: " + match):
        lsw_jax.load_model(saved[1], dtype="float32", adapter=bad)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", ""])
def test_unreadable_peft_config_is_named(saved, peft_dir, tmp_path, text):
    bad = tmp_path / "bad"
    shutil.copytree(peft_dir, bad)
    (bad / "adapter_config.json").write_text(text)
    with pytest.raises(
        ValueError, match=r"bad/adapter_config.json: (expected a JSON object|cannot)"
    ):
        lsw_jax.load_model(saved[1], dtype="float32", adapter=bad)


def test_folder_without_adapter_config_is_named(saved, peft_dir, tmp_path):
    bad = tmp_path / "weights_only"
    shutil.copytree(peft_dir, bad)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"weights_only: not a PEFT adapter folder"):
        lsw_jax.load_model(saved[1], dtype="float32", adapter=bad)
    with pytest.raises(SystemExit, match=r"not a PEFT adapter folder"):
        main(["generate", "--ckpt", str(saved[1]), "--prompt", "w1", "--adapter", str(bad)])


# ---------------------------------------------------------------------- training checkpoints


def test_train_to_a_multiple_of_save_every_finishes_and_reruns(tmp_path):
    for _ in range(2):  # the rerun resumes at the last step and finishes again
        tr = _trainer(tmp_path, "run", steps=4)  # save_every=2
        tr.run(progress=False)
        tr.finish()
        assert tr.step == 4 and tr.manager.all_steps() == [2, 4]
    assert (tmp_path / "run" / "adapters" / "final" / "adapter.json").exists()


def _largest_data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def test_corrupt_latest_step_resumes_from_the_previous_one(tmp_path):
    full = _trainer(tmp_path, "full", steps=7).run(progress=False)
    first = _trainer(tmp_path, "run", steps=7)
    first.run(stop_after=6, progress=False)  # saves at 2, 4, 6 (keeps 4 and 6)
    first.manager.wait_until_finished()
    del first
    root = tmp_path / "run" / "checkpoints"
    victim = _largest_data_file(root / "6")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    with pytest.warns(UserWarning, match=r"resumed from step 4, skipping newer steps .*step 6: "):
        second = _trainer(tmp_path, "run", steps=7)
    assert second.step == 4 and (root / "6.corrupt-0").is_dir()
    rest = second.run(progress=False)  # re-makes step 6, then 7
    np.testing.assert_array_equal([h["loss"] for h in rest], [h["loss"] for h in full[4:]])


def test_tampered_training_arrays_fail_their_checksum(tmp_path):
    first = _trainer(tmp_path, "run", steps=4)
    first.run(progress=False)
    del first
    meta = tmp_path / "run" / "checkpoints" / "4" / "meta" / "metadata"
    raw = json.loads(meta.read_text())
    key = sorted(raw["checksums"])[0]
    raw["checksums"][key] ^= 1
    meta.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match=f"step 4: .*array {key} fails its checksum"):
        assert _trainer(tmp_path, "run", steps=4).step == 2


def test_every_step_corrupt_is_a_short_error(tmp_path):
    first = _trainer(tmp_path, "run", steps=4)
    first.run(progress=False)
    del first
    for step in (2, 4):
        _largest_data_file(tmp_path / "run" / "checkpoints" / str(step)).write_bytes(b"")
    with warnings.catch_warnings(), pytest.raises(ValueError) as err:
        warnings.simplefilter("ignore")
        _trainer(tmp_path, "run", steps=4)
    lines = str(err.value).splitlines()
    assert "no checkpoint step restores" in lines[0] and len(lines) == 4, lines
    assert lines[1].startswith("  step 4: ") and lines[2].startswith("  step 2: ")
    assert all(len(line) < 500 for line in lines)
    # Nothing is moved aside when no step verifies.
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]

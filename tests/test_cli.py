"""The ``lsw-jax`` command line itself: every flag documented, every ``--help`` runs, and
the report ``generate`` and ``demo`` print after an answer (tokens/s, time to first token,
the token limit), on the tiny checkpoint of the serving tests."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from test_serve_fixtures import EOS_ID, tiny_checkpoint

import lsw_jax
from lsw_jax.cli import build_parser, main, run_prompt, time_to_first_token, whole_sentences_of
from lsw_jax.decode import generate
from lsw_jax.loading import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_startup import REPORT  # noqa: E402  (the demo's report, as the benchmark reads it)

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # recorded whenever jit traces


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(words that select it, parser) of ``parser`` and every sub-command, nested ones too."""
    yield path, parser
    for action in parser._actions:  # argparse lists its actions nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*path, name))


def test_the_walk_finds_every_subcommand():
    paths = {path for path, _ in subcommands(build_parser())}
    assert {("adapters", "list"), ("adapters", "import-peft"), ("serve",), ("demo",)} <= paths
    assert len(paths) == 11  # lsw-jax, 7 commands, 3 adapters commands


def test_every_flag_and_argument_has_help():
    missing = [
        f"lsw-jax {' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
        for path, parser in subcommands(build_parser())
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert not missing, missing


def test_help_of_every_subcommand_runs(capsys):
    for path, _ in subcommands(build_parser()):
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: {' '.join(('lsw-jax', *path))}")
    main_help = build_parser().format_help()
    assert "--num-processes" in main_help and "multi-host" in main_help


def test_defaults_show_in_help():
    help_of = dict(subcommands(build_parser()))
    assert "most tokens to generate (default 256)" in help_of[("demo",)].format_help()
    assert "(default 96)" in help_of[("generate",)].format_help()
    assert "optimizer steps (default 100)" in help_of[("train",)].format_help()


@pytest.mark.parametrize(
    "text, want",
    [
        ("One. Two is cut off mid-wo", "One."),
        ('He said "stop!" and the', 'He said "stop!"'),
        ("First line\nsecond li", "First line"),
        ("Ends well. Really? Yes.", "Ends well. Really? Yes."),
        ("Version 3.5 of the libr", "Version 3.5 of the"),
        ("no sentence end in thi", "no sentence end in"),
        ("word", "word"),
        ("", ""),
    ],
)
def test_whole_sentences_of(text, want):
    assert whole_sentences_of(text) == want


def _answer(max_new_tokens: int) -> tuple[str, bool]:
    """The tiny model's greedy answer to "w1 w2" decoded by hand, and whether it hit the
    limit (no EOS among its tokens)."""
    ckpt = tiny_checkpoint()
    model = lsw_jax.load_model(ckpt, dtype="float32")
    tok = load_tokenizer(ckpt)
    new = generate(model, np.asarray([tok.encode("w1 w2")], np.int32), max_new_tokens)[0]
    n = next((i + 1 for i, t in enumerate(new) if t == EOS_ID), len(new))
    return tok.decode([int(t) for t in new[:n]]).strip(), EOS_ID not in new


def _report(err: str) -> tuple[int, float, float, float]:
    m = REPORT.search(err)
    assert m is not None, err
    return int(m[1]), float(m[2]), float(m[3]), float(m[4])


def test_generate_reports_first_token_and_the_token_limit(capsys):
    main(["generate", "--ckpt", str(tiny_checkpoint()), "--prompt", "w1 w2"])
    answer, at_limit = _answer(96)
    out, err = capsys.readouterr()
    assert out.strip() == answer  # generate prints the whole answer, never cut
    n, tok_s, loaded, first_call = _report(err)
    assert (n == 96) == at_limit and tok_s > 0 and loaded > 0 and first_call > 0
    ms = float(err.split("first token in ")[1].split(" ms")[0])
    # A separate run that stops at its first token: its fixed costs (dispatch, the host
    # sync) may exceed a whole answer of this tiny model, so bound it by the first call.
    assert 0 < ms <= 1000 * first_call
    assert ("(stopped at the token limit, 96 tokens" in err) == at_limit


def test_demo_answer_at_the_token_limit_ends_on_a_full_word(capsys):
    answer, at_limit = _answer(5)
    assert at_limit and " " in answer  # words, no EOS: the case to cut
    kw = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0, dtype="float32")
    run_prompt(tiny_checkpoint(), "w1 w2", chat=False, max_new_tokens=5, whole_sentences=True, **kw)
    out, err = capsys.readouterr()
    assert out.strip() == answer.rpartition(" ")[0]  # no sentence end: the last word goes
    assert "(stopped at the token limit, 5 tokens, before the answer ended; cut to its last" in err
    assert _report(err)[0] == 5


def test_time_to_first_token_stops_after_one_token_without_compiling():
    ckpt = tiny_checkpoint()
    model = lsw_jax.load_model(ckpt, dtype="float32")
    ids = np.asarray([load_tokenizer(ckpt).encode("w1 w2")], np.int32)
    first = int(generate(model, ids, 8)[0, 0])
    assert first != EOS_ID
    traced = []
    listener = lambda event, _secs, **_: traced.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        secs = time_to_first_token(model, ids, 8, first, (EOS_ID,), wall=99.0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert TRACE_EVENT not in traced  # the program of the first call, reused
    assert 0 < secs < 99.0
    # What it timed: generate stops at the first token, the rest filled with it.
    np.testing.assert_array_equal(generate(model, ids, 8, eos_token_id=[first])[0], [first] * 8)
    assert time_to_first_token(model, ids, 8, EOS_ID, (EOS_ID,), wall=0.5) == 0.5
    assert time_to_first_token(model, ids, 8, first, (), wall=0.5) is None  # nothing to swap


# ---------------------------------------------------------------- bad input, when parsed

BAD_FLAGS = [
    (["eval", "--ckpt", "ck", "--text", "t.txt", "--max-len", "0"], "--max-len", ">= 1", "'0'"),
    (["eval", "--ckpt", "ck", "--text", "t.txt", "--max-len", "-5"], "--max-len", ">= 1", "'-5'"),
    (["serve", "--ckpt", "ck", "--slots", "0"], "--slots", ">= 1", "'0'"),
    (["serve", "--ckpt", "ck", "--port", "70000"], "--port", "[0, 65535]", "'70000'"),
    (["serve", "--ckpt", "ck", "--body-timeout", "nan"], "--body-timeout", "> 0", "'nan'"),
    (["serve", "--ckpt", "ck", "--dtype", "int8"], "--dtype", "float32, bfloat16, float16", "'int8'"),
    (["convert", "a.gguf", "out", "--dtype", "int8"], "--dtype", "float32, bfloat16", "'int8'"),
    (["generate", "--ckpt", "ck", "--prompt", "x", "--top-p", "0"], "--top-p", "(0, 1]", "'0'"),
    (["generate", "--ckpt", "ck", "--prompt", "x", "--temperature", "-1"], "--temperature", "[0, 100]", "'-1'"),
    (["generate", "--ckpt", "ck", "--prompt", "x", "--max-new-tokens", "zero"], "--max-new-tokens", ">= 1", "'zero'"),
    (["train", "--ckpt", "ck", "--steps", "0"], "--steps", ">= 1", "'0'"),
    (["train", "--ckpt", "ck", "--lr", "0"], "--lr", "> 0", "'0'"),
    (["adapters", "import-peft", "--ckpt", "ck", "--name", "n", "p", "--top-k", "0"], "--top-k", ">= 1", "'0'"),
    (["--num-processes", "0", "adapters", "list", "--ckpt", "ck"], "--num-processes", ">= 1", "'0'"),
]  # fmt: skip


@pytest.mark.parametrize("argv, flag, allowed, value", BAD_FLAGS, ids=lambda a: str(a)[:40])
def test_a_bad_flag_value_is_refused_when_parsed_naming_flag_value_and_range(
    argv, flag, allowed, value, capsys, tmp_path, monkeypatch
):
    """Before anything runs: exit 2 with argparse's usage and one line naming the flag,
    what is allowed and the value given; nothing written."""
    monkeypatch.chdir(tmp_path)
    inputs = _make_inputs(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: must be " in err, err
    assert allowed in err and f"got {value}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == inputs


def _make_inputs(folder) -> list[str]:
    """The input paths BAD_FLAGS and BAD_PATHS name (paths are checked when parsed too)."""
    (folder / "t.txt").write_text("text")
    (folder / "a.gguf").write_bytes(b"GGUF")
    (folder / "p").mkdir()
    return ["a.gguf", "p", "t.txt"]


BAD_PATHS = [
    (["eval", "--ckpt", "ck", "--text", "t.txt", "gone.txt"], "--text", "no such file: 'gone.txt'"),
    (["eval", "--ckpt", "ck", "--choices", "p"], "--choices", "'p' is a directory, expected a file"),
    (["train", "--ckpt", "ck", "--data", "gone.jsonl"], "--data", "no such file: 'gone.jsonl'"),
    (["train", "--config", "gone.json"], "--config", "no such file: 'gone.json'"),
    (["adapters", "import-peft", "--ckpt", "ck", "--name", "n", "t.txt"], "peft",
     "'t.txt' is a file, expected a directory"),
    (["adapters", "import-peft", "--ckpt", "ck", "--name", "n", "p", "q"], "peft",
     "no such directory: 'q'"),
    (["convert", "gone.gguf", "out"], "src", "no such file or directory: 'gone.gguf'"),
]  # fmt: skip


@pytest.mark.parametrize("argv, arg, message", BAD_PATHS, ids=lambda a: str(a)[:40])
def test_a_missing_input_path_is_refused_when_parsed(argv, arg, message, capsys, tmp_path,
                                                     monkeypatch):  # fmt: skip
    """A path to read that is missing (or a file where a folder is meant) ends at parsing:
    exit 2, the argument and the path named; nothing written."""
    monkeypatch.chdir(tmp_path)
    inputs = _make_inputs(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {arg}: {message}" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == inputs


def test_the_library_refuses_the_same_values():
    from lsw_jax.evaluate import rolling_windows
    from lsw_jax.serve.engine import Engine

    with pytest.raises(ValueError, match="max_len=0 must be >= 1"):
        rolling_windows([1, 2, 3], 0, 0)
    model = lsw_jax.load_model(tiny_checkpoint(), dtype="float32")
    with pytest.raises(ValueError, match="slots=0"):
        Engine(model, slots=0)
    with pytest.raises(ValueError, match="dtype='int8' is not supported: use one of float32"):
        lsw_jax.load_model(tiny_checkpoint(), dtype="int8")


def test_convert_refuses_a_cast_that_is_no_float_before_writing(tmp_path):
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        lsw_jax.convert_checkpoint(tmp_path / "missing.gguf", tmp_path / "out", dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_train_flags_beside_a_config_file_override_it(tmp_path, monkeypatch):
    """``--kind`` beside ``--config`` replaces the file's adapter kind (the help says
    flags override); without it the file's kind applies."""
    import json

    from lsw_jax import cli

    seen = []

    class Recorder:  # stands in for the Trainer: only the config is under test
        def __init__(self, cfg, **_):
            seen.append(cfg)

        def run(self):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(cli, "Trainer", Recorder)
    conf = tmp_path / "c.json"
    adapter = {"kind": "switch", "num_experts": 4, "top_k": 2, "rank": 4}
    conf.write_text(json.dumps({"ckpt": str(tiny_checkpoint()), "data": ["d.txt"],
                                "out_dir": str(tmp_path / "run"), "adapter": adapter}))  # fmt: skip
    main(["train", "--config", str(conf), "--kind", "lora", "--steps", "3"])
    main(["train", "--config", str(conf)])
    assert [c.adapter.kind for c in seen] == ["lora", "switch"]
    assert seen[0].steps == 3 and seen[0].adapter.rank == 4


def test_a_training_runs_adapter_is_usable_by_its_folder(tmp_path):
    """What ``train --out RUN`` leaves (RUN/adapters/final) attaches by the run folder and
    by the adapter's own folder, as the stored name does; the server's pool reads it too."""
    from lsw_jax.adapters.store import save_adapter
    from lsw_jax.serve.adapter_pool import read_adapter

    ckpt = tiny_checkpoint()
    trained = lsw_jax.load_model(ckpt, dtype="float32", adapter="a1")
    save_adapter(trained, tmp_path / "run", "final")
    ids = np.asarray([[5, 9, 13, 2]], np.int32)
    want = np.asarray(trained(ids))
    for source in (tmp_path / "run", tmp_path / "run" / "adapters" / "final"):
        got = lsw_jax.load_model(ckpt, dtype="float32", adapter=str(source))
        np.testing.assert_array_equal(np.asarray(got(ids)), want)
        host = read_adapter(trained.cfg, "r", source, ckpt)
        assert host.kind == trained.adapter_config.kind
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder .* a training run"):
        lsw_jax.load_model(ckpt, dtype="float32", adapter=str(tmp_path))

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
    assert 0 <= ms <= 1000 * n / tok_s  # the first token comes before the whole answer
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

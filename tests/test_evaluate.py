"""Perplexity and multiple-choice scoring against HF transformers' log-likelihoods."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hf_helpers import hf_logits, make_hf_model, save_hf_model

import lsw_jax
from lsw_jax import evaluate
from lsw_jax.data import MultipleChoice, read_multiple_choice
from lsw_jax.evaluate import encode_pair, multiple_choice, perplexity, rolling_windows


class SmallTokenizer:
    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return [3 + b % 150 for b in text.encode()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    hf = make_hf_model("llama", seed=4)
    save_hf_model(hf, root / "hf")
    lsw_jax.convert_checkpoint(root / "hf", root / "ckpt", show_progress=False)
    return hf, lsw_jax.load_model(root / "ckpt", dtype="float32")


def _hf_logprob(hf, ids, start):
    logits = hf_logits(hf, np.asarray([ids]))[0].astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))


def test_perplexity_matches_hf(models):
    hf, ours = models
    tok = SmallTokenizer()
    texts = [
        "the quick brown fox jumps over the lazy dog",
        "lorem ipsum dolor sit amet, consectetur",
    ]
    got = perplexity(ours, tok, texts, max_len=64)
    nll, n = 0.0, 0
    for t in texts:
        ids = [1] + tok.encode(t)
        nll -= _hf_logprob(hf, ids, 1)
        n += len(ids) - 1
    assert got["tokens"] == n
    np.testing.assert_allclose(got["perplexity"], math.exp(nll / n), rtol=1e-4)


def test_multiple_choice_matches_hf_argmax(models, tmp_path):
    hf, ours = models
    tok = SmallTokenizer()
    items = [
        MultipleChoice("Q: colour of the sky?", ("blue", "green", "a long wrong answer"), 0),
        MultipleChoice("Q: two plus two?", ("four", "five"), 1),
        MultipleChoice("Q: pick", ("x", "yy", "zzz", "w"), 2),
    ]
    got = multiple_choice(ours, tok, items)
    correct = correct_norm = 0
    for it in items:  # lm-eval's scoring: no BOS, " " + choice, acc_norm by len(choice)
        ctx = tok.encode(it.question)
        scores = [_hf_logprob(hf, ctx + tok.encode(" " + c), len(ctx)) for c in it.choices]
        correct += int(np.argmax(scores) == it.answer)
        norm = [s / len(c) for s, c in zip(scores, it.choices, strict=True)]
        correct_norm += int(np.argmax(norm) == it.answer)
    assert got == {"acc": correct / 3, "acc_norm": correct_norm / 3, "n": 3}

    path = tmp_path / "mc.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"question": i.question, "choices": list(i.choices), "answer": i.answer})
            for i in items
        )
    )
    assert read_multiple_choice(path) == items


def test_rolling_windows_cover_every_token_once():
    ids = list(range(10, 33))  # 23 tokens, windows of 8
    windows = rolling_windows(ids, 1, 8)
    scored = [t for w, start in windows for t in w[start:]]
    assert scored == ids
    assert windows[0] == ([1] + ids[:8], 1)
    assert all(len(w) <= 9 for w, _ in windows)  # max_len inputs + the last target
    assert windows[1] == (ids[7:16], 1)  # lm-eval's disjoint windows: one token of context


def test_encode_pair_moves_trailing_space_and_uses_the_prefix_for_no_context():
    tok = SmallTokenizer()
    assert encode_pair(tok, "Q: a ", "b") == (tok.encode("Q: a"), tok.encode(" b"))
    assert encode_pair(tok, "", "b") == ([1], tok.encode("b"))


def test_batches_hold_only_real_rows(models, monkeypatch):
    _, ours = models
    seen = []
    real = evaluate._token_logprobs
    monkeypatch.setattr(
        evaluate,
        "_token_logprobs",
        lambda g, s, ids, m: seen.append(ids.shape) or real(g, s, ids, m),
    )
    rows = [[1, 2, 3], [1, 2], [4, 5, 6, 7], [8, 9]]
    one = evaluate.sequence_logprobs(ours, rows, [1, 1, 2, 1], batch_size=3)
    assert [b for b, _ in seen] == [3, 1]
    alone = [
        evaluate.sequence_logprobs(ours, [r], [s])[0]
        for r, s in zip(rows, [1, 1, 2, 1], strict=True)
    ]
    np.testing.assert_allclose([x for x, _ in one], [x for x, _ in alone], rtol=1e-5)


def test_context_overflow_is_refused(models):
    _, ours = models
    with pytest.raises(ValueError, match="exceeds the context"):
        perplexity(ours, SmallTokenizer(), ["x" * 400], max_len=400)

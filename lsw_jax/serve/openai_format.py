"""OpenAI's response layouts for what the engine produced: log-probabilities (the legacy
completions layout and the chat layout), usage, and the error body.

Log-probabilities are those of the raw model (``lsw_jax.sampling.token_logprobs``).
A token's string is its own decoded text (special tokens included); where one token is
only part of a UTF-8 character that string holds U+FFFD, while ``bytes`` (chat) are the
token's exact bytes when the tokenizer can say (byte-level BPE), else the string's UTF-8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lsw_jax.serve.steps import TokenLogprob


class TokenText:
    """Token id -> its text and bytes, cached (the vocabulary is fixed)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, t: int) -> str:
        s = self._cache.get(t)
        if s is None:
            if self.tok is None:
                s = f"token_id:{t}"
            else:
                s = self.tok.decode([t], skip_special_tokens=False)
            self._cache[t] = s
        return s

    def bytes(self, t: int) -> list[int]:
        return list(self(t).encode("utf-8", "surrogatepass"))


def legacy_logprobs(
    entries: Sequence[TokenLogprob | None], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """The completions layout: ``tokens``, ``token_logprobs``, ``top_logprobs`` (per token a
    {token: logprob} of the top N plus the chosen token, as vLLM gives) and ``text_offset``
    (each token's character offset in the returned text, from ``offset``). An entry with logprob
    None is a prompt's first token (nothing predicts it): logprob and top_logprobs null."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        text = token_text(e.token)
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        if e.logprob is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(e.logprob)
        top = {token_text(t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """The chat layout: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    return {
        "content": [
            {
                "token": token_text(e.token),
                "logprob": e.logprob,
                "bytes": token_text.bytes(e.token),
                "top_logprobs": [
                    {"token": token_text(t), "logprob": lp, "bytes": token_text.bytes(t)}
                    for t, lp in e.top
                ],
            }
            for e in entries
        ]
    }


def prompt_entries(prompt: list[int], scored: list[TokenLogprob] | None) -> list[TokenLogprob]:
    """The prompt's tokens as entries: the first with logprob None (nothing predicts it)."""
    first = TokenLogprob(prompt[0], None, ())  # type: ignore[arg-type]
    return [first, *(scored or [])]


def usage(prompt_lens: Sequence[int], completion_lens: Sequence[int]) -> dict[str, int]:
    p, c = sum(prompt_lens), sum(completion_lens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    types = {
        401: "authentication_error",
        404: "not_found_error",
        408: "timeout_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "server_error",
    }
    kind = types.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

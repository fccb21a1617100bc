"""A request's text as its tokens arrive: incremental detokenization and stop strings.

The engine keeps one ``StreamText`` per request that has a tokenizer (and stop strings),
so a stop string ends the request at the step whose token completes it, and streamed
text equals non-streamed text: text is held back while it could still be the start of a
stop string or an unfinished UTF-8 character, and is never taken back once sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string:
    those characters may still become a stop and cannot be sent yet."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class StreamText:
    """The text of a growing token list, emitted as deltas that never need taking back.

    ``push(ids, final=...) -> (delta, stopped)``: ``delta`` is the newly settled text;
    ``stopped`` is True when a stop string completed, the text then ends just before it
    (the stop string itself is not part of the output, as in OpenAI's API). ``final``
    flushes what was held back (an unfinished UTF-8 sequence becomes U+FFFD). Stop strings
    are only looked for once ``min_tokens`` tokens exist (before that, text flows freely).

    Decoding is incremental (vLLM's scheme): each push decodes only a short window, the
    tokens since the previous settled point, with and without the new ones; the window's
    first tokens give tokenizers that drop a leading space (SentencePiece) their context.
    So a step costs the same at token 10 and at token 10,000.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stops: Sequence[str] = (),
        *,
        min_tokens: int = 0,
    ):
        self.decode, self.stops, self.min_tokens = decode, tuple(stops), min_tokens
        self.ids: list[int] = []
        self.full = ""  # the decoded text of ids[:self._read]
        self.text = ""  # what has been emitted: a prefix of ``full``
        self._prefix = self._read = 0  # ids[_prefix:_read]: the window's context

    def _decode_new(self, final: bool) -> None:
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        if after.endswith("\ufffd") and not final:  # an unfinished UTF-8 character: wait
            return
        self.full += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)

    def push(self, ids: list[int], *, final: bool = False) -> tuple[str, bool]:
        self.ids += ids
        self._decode_new(final)
        new = self.full[len(self.text) :]
        if self.stops and len(self.ids) >= self.min_tokens:
            hits = [i for i in (new.find(s) for s in self.stops) if i >= 0]
            if hits:
                delta = new[: min(hits)]
                self.text += delta
                return delta, True
            if not final:
                new = new[: len(new) - held_back(new, self.stops)]
        self.text += new
        return new, False

"""Request bodies of the OpenAI-compatible API: parsed and validated before the engine
sees them. Every malformed field is an ``ApiError`` (a 4xx naming the field), never a 500:
NaN/Infinity and floats where integers belong, lone surrogates, JSON nested too deep,
token ids outside the vocabulary, strings where booleans belong."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from typing import Any

from lsw_jax.sampling import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The request's JSON object: no NaN/Infinity, nesting at most ``max_depth``, every
    string valid Unicode; an ApiError(400) saying which otherwise."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object")
    _check_json(body, max_depth)
    return body


def _check_json(body: dict[str, Any], max_depth: int) -> None:
    """Depth, finite numbers (1e999 parses as inf) and text without lone surrogates
    ("\\ud800" is valid JSON, yet no UTF-8 string), walked without recursion."""
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            _check_text(value, field)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"'{field}': {value} is not a finite number", field)
        elif isinstance(value, (dict, list)):
            if depth > max_depth:
                raise ApiError(400, f"JSON nested deeper than {max_depth} levels", field)
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, field or key)
                    stack.append((item, depth + 1, field or key))
            else:
                stack.extend((item, depth + 1, field) for item in value)


def _check_text(text: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode()
        name = None if field is None else field.encode("utf-8", "backslashreplace").decode()
        raise ApiError(
            400, f"'{name}' is not valid Unicode (lone surrogate {bad} at {e.start})", name
        ) from None


def _num(body: dict, name: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if kind is int and not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer, got {v!r}", name)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}'={v} must be between {lo} and {hi}", name)
    return kind(v)


def flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {v!r}", name)
    return v


def required_text(body: dict, name: str) -> str:
    """``body[name]`` as a non-empty string; a 400 naming the field when it is missing
    (or null) or is something else."""
    v = body.get(name)
    if v is None:
        raise ApiError(400, f"'{name}' is required", name)
    if not isinstance(v, str) or not v:
        raise ApiError(400, f"'{name}' must be a non-empty string", name)
    return v


def token_ids(value: Any, name: str, vocab_size: int) -> list[int]:
    """``value`` as token ids of this vocabulary; an ApiError naming ``name`` otherwise."""
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise ApiError(400, f"'{name}' must be a list of integers", name)
    bad = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(
            400, f"'{name}': token id {bad} is outside the vocabulary [0, {vocab_size})", name
        )
    return list(value)


# Fields each route accepts; a field outside these (and not null) is a 400 naming it, so
# a client never gets something other than what it asked for without a sign of it.
_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
    "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user",
    "top_k", "min_tokens", "repetition_penalty", "stop_token_ids", "ignore_eos", "best_of",
}  # fmt: skip
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix"}
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "functions", "function_call", "store", "metadata",
    "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
    "web_search_options",
}  # fmt: skip
# Known fields that would change the output, with why they are refused (None/defaults pass).
_UNSUPPORTED = {
    "suffix": "insertion (suffix) is not implemented",
    "tools": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "parallel_tool_calls": "tool calling is not implemented",
    "audio": "audio output is not implemented",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "web search is not implemented",
    "reasoning_effort": "this model has no reasoning mode",
}
MAX_N = 16
MAX_STOPS, MAX_STOP_CHARS = 64, 256


def check_fields(body: dict, chat: bool) -> None:
    """400 for a field this route does not know, or knows but does not implement."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for key, value in body.items():
        if key not in known:
            route = "chat completions" if chat else "completions"
            raise ApiError(400, f"unknown field '{key}' for {route}", key)
        if value is None or key not in _UNSUPPORTED and key not in (
            "response_format", "tool_choice", "modalities"
        ):  # fmt: skip
            continue
        if key == "response_format" and value == {"type": "text"}:
            continue
        if key == "tool_choice" and value == "none":
            continue
        if key == "modalities" and value == ["text"]:
            continue
        if key in ("tools", "functions") and value == []:
            continue
        reason = (
            _UNSUPPORTED.get(key)
            or {
                "response_format": "only {'type': 'text'}: constrained (JSON / schema) decoding "
                "is not implemented",
                "tool_choice": "only 'none': tool calling is not implemented",
                "modalities": "only ['text']",
            }[key]
        )
        raise ApiError(400, f"'{key}' is not supported: {reason}", key)


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    raw = body.get("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ApiError(400, "'logit_bias' must be an object of token id -> bias", "logit_bias")
    out = []
    for key, bias in raw.items():
        try:
            tok = int(key)
        except ValueError:
            raise ApiError(
                400, f"'logit_bias': key {key!r} is not a token id", "logit_bias"
            ) from None
        if not 0 <= tok < vocab_size:
            raise ApiError(
                400, f"'logit_bias': token id {tok} is outside the vocabulary [0, {vocab_size})",
                "logit_bias",
            )  # fmt: skip
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(
                400,
                f"'logit_bias': the bias of {key} must be a number in [-100, 100]",
                "logit_bias",
            )
        out.append((tok, float(bias)))
    return tuple(out)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Top-N alternatives asked for per token (None: no log-probabilities)."""
    if chat:
        if not flag(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return _num(body, "top_logprobs", 0, int, 0, MAX_LOGPROBS)
    return _num(body, "logprobs", None, int, 0, MAX_LOGPROBS)


def choices_per_prompt(body: dict) -> int:
    n = _num(body, "n", 1, int, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise ApiError(400, "'best_of' is not supported (only best_of == n)", "best_of")
    return n


@dataclasses.dataclass(frozen=True)
class StreamUsage:
    """What usage a stream carries (``stream_options``, vLLM's meaning). ``final``: a last
    chunk with empty ``choices`` and the whole request's usage, the others ``"usage":
    null``. ``continuous`` (only with ``final``): every chunk carries its choice's usage so
    far (that prompt's tokens, the choice's completion tokens up to and including it)."""

    final: bool = False
    continuous: bool = False


def stream_usage(body: dict) -> StreamUsage:
    """``stream_options`` as vLLM reads them: ``continuous_usage_stats`` without
    ``include_usage`` asks for nothing (no usage anywhere in the stream)."""
    opts = body.get("stream_options")
    if opts is None:
        return StreamUsage()
    if not flag(body, "stream"):
        raise ApiError(
            400, "'stream_options' is only allowed with 'stream': true", "stream_options"
        )
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError(
            400,
            "'stream_options' must be {'include_usage': bool, 'continuous_usage_stats': bool}",
            "stream_options",
        )
    final, continuous = flag(opts, "include_usage"), flag(opts, "continuous_usage_stats")
    return StreamUsage(final, final and continuous)


def sampling_params(
    body: dict, limit: int, vocab_size: int, *, chat: bool
) -> tuple[SamplingParams, bool]:
    """The request's SamplingParams and whether the client gave ``max_tokens``; when it did
    not, ``max_tokens`` holds ``limit`` and the server sets its default per prompt (it
    depends on the prompt's length: ``with_default_max_tokens``)."""
    echo = not chat and flag(body, "echo")
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    mt = _num(body, name, None, int, 0 if echo else 1, 1 << 30)
    if mt is not None and mt > limit:
        raise ApiError(400, f"'{name}'={mt} is too large: this server's context is {limit}", name)
    stop_ids = token_ids(body.get("stop_token_ids") or [], "stop_token_ids", vocab_size)
    logprobs = _logprobs(body, chat)
    seed = _num(body, "seed", None, int, -(1 << 63), (1 << 63) - 1)  # vLLM: any int64
    min_tokens = _num(body, "min_tokens", 0, int, 0, 1 << 30)
    if min_tokens > (limit if mt is None else mt):
        raise ApiError(400, f"'min_tokens'={min_tokens} must be <= '{name}'", "min_tokens")
    fields = dict(
        max_tokens=limit if mt is None else mt,
        temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, float, 1e-9, 1.0),
        top_k=max(_num(body, "top_k", 0, int, -1, 1 << 20), 0),  # vLLM's -1: off, as 0
        seed=secrets.randbits(63) if seed is None else seed,  # no seed: a fresh draw
        stop_token_ids=tuple(stop_ids),
        ignore_eos=flag(body, "ignore_eos"),
        stop=tuple(stop_strings(body)),
        min_tokens=min_tokens,
        presence_penalty=_num(body, "presence_penalty", 0.0, float, -2.0, 2.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, float, -2.0, 2.0),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, float, 1e-6, 2.0),
        logit_bias=_logit_bias(body, vocab_size),
        logprobs=logprobs,
        prompt_logprobs=echo and logprobs is not None,
    )
    try:
        return SamplingParams(**fields), mt is not None
    except ValueError as e:  # SamplingParams' own limits: still the client's input
        raise ApiError(400, str(e)) from None


def with_default_max_tokens(
    params: SamplingParams, prompt_len: int, limit: int, default: int | None
) -> SamplingParams:
    """``params`` with the server's max_tokens for a prompt of ``prompt_len`` tokens: the
    rest of the context, at most ``default`` (None: no cap; chat, as vLLM)."""
    rest = limit - prompt_len
    mt = rest if default is None else min(default, rest)
    if rest < 1 or params.min_tokens > mt:
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens; this server's context is {limit} tokens",
            "prompt",
        )
    return dataclasses.replace(params, max_tokens=mt)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
        or len(stop) > MAX_STOPS
    ):
        raise ApiError(
            400,
            f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them, "
            f"each of 1 to {MAX_STOP_CHARS} characters",
            "stop",
        )
    return stop


def message_text(m: Any, i: int) -> dict[str, str]:
    """One chat message as {role, content: str}: content a string, a list of text parts
    (joined with newlines, as vLLM does), or null on an assistant message."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"{where} must be an object with a string 'role'", "messages")
    content = m.get("content")
    if m.get("tool_calls") or m["role"] in ("tool", "function"):
        raise ApiError(400, f"{where}: tool calls are not implemented", "messages")
    if content is None and m["role"] == "assistant":
        content = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400,
                    f"{where}: content part of type {kind!r} is not supported (only 'text' "
                    "parts with a string 'text')",
                    "messages",
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise ApiError(
            400, f"{where}: 'content' must be a string, a list of text parts, or null "
            "(assistant)", "messages",
        )  # fmt: skip
    out = {"role": m["role"], "content": content}
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out

"""Request bodies of the OpenAI-compatible API: parsed and validated before the engine
sees them. Every malformed field is an ``ApiError`` (a 4xx naming the field), never a 500:
NaN/Infinity and floats where integers belong, lone surrogates, JSON nested too deep,
token ids outside the vocabulary, strings where booleans belong."""

from __future__ import annotations

import json
import math
from typing import Any

from lsw_jax.sampling import SamplingParams


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


def sampling_params(
    body: dict, max_tokens_default: int, limit: int, vocab_size: int
) -> SamplingParams:
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    if body.get("best_of", 1) not in (1, None):
        raise ApiError(400, "best_of is not supported", "best_of")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", "logprobs")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    mt = _num(body, name, max_tokens_default, int, 1, 1 << 30)
    if mt > limit:
        raise ApiError(400, f"'{name}'={mt} is too large: this server's context is {limit}", name)
    stop_ids = token_ids(body.get("stop_token_ids") or [], "stop_token_ids", vocab_size)
    fields = dict(
        max_tokens=mt,
        temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, float, 1e-9, 1.0),
        top_k=_num(body, "top_k", 0, int, 0, 1 << 20),
        seed=_num(body, "seed", 0, int, 0, (1 << 63) - 1),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=flag(body, "ignore_eos"),
    )
    try:
        return SamplingParams(**fields)
    except ValueError as e:  # SamplingParams' own limits: still the client's input
        raise ApiError(400, str(e)) from None


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > 4
    ):
        raise ApiError(
            400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop"
        )
    return stop

"""The server as real clients use it, through the ``openai`` SDK (and httpx where the SDK
has no method): log-probabilities in both layouts, echo, batched prompts, n, penalties,
stop strings, usage in streams, chat content parts, tokenize, model cards, dynamic adapters.
Oracles: ``generate`` on a model with the adapter attached, a full forward's log-softmax."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_serve_fixtures import (
    EOS_ID,
    MAX_LEN,
    full_logprobs,
    make_tokenizer,
    prompts,
    reference_greedy,
    reference_model,
)
from test_serve_sampling import reference_adjusted_greedy
from test_serve_server import serving

from lsw_jax.convert.peft import export_peft_adapter
from lsw_jax.sampling import SamplingParams

openai = pytest.importorskip("openai")

TOK = make_tokenizer()
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_http.py"


@pytest.fixture(scope="module")
def live():
    with serving(api_key="k3y", adapters=("a1", "a2")) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        yield url, server, client


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_completion_logprobs_legacy_layout_equal_a_full_forward(live):
    _, _, client = live
    p = prompts(1, 70)[0]
    out = client.completions.create(model="a1", prompt=p, max_tokens=5, logprobs=3, **GREEDY)
    ch = out.choices[0]
    ids = reference_greedy(p, "a1", 5)
    assert ch.model_extra["token_ids"] == ids
    lp = ch.logprobs
    assert lp.tokens == [TOK.decode([t], skip_special_tokens=False) for t in ids]
    ref = full_logprobs("a1", p + ids)
    for j, t in enumerate(ids):
        assert abs(lp.token_logprobs[j] - ref[len(p) - 1 + j, t]) < 1e-4
        top = lp.top_logprobs[j]
        want = {
            TOK.decode([int(i)]): ref[len(p) - 1 + j, i]
            for i in np.argsort(-ref[len(p) - 1 + j])[:3]
        }
        assert set(want) <= set(top) and all(abs(top[k] - v) < 1e-4 for k, v in want.items())
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:j]) for j in range(5)]
    assert " ".join(lp.tokens) == ch.text  # this word-level tokenizer joins with spaces


def test_echo_with_max_tokens_0_is_lm_evals_loglikelihood(live):
    """What lm-eval sends for every log-likelihood request; the prompt's logprobs equal a
    full forward, the first token's is null."""
    _, _, client = live
    p = prompts(1, 71)[0]
    for mt in (0, 1):
        out = client.completions.create(
            model="tiny", prompt=p, max_tokens=mt, logprobs=1, echo=True, temperature=0
        )
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(p) + mt and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        ref = full_logprobs(None, p + out.choices[0].model_extra["token_ids"])
        got = lp.token_logprobs[1 : len(p)]
        np.testing.assert_allclose(got, [ref[j, p[j + 1]] for j in range(len(p) - 1)], atol=1e-4)
        assert out.choices[0].text.startswith(TOK.decode(p))
        assert out.usage.prompt_tokens == len(p) and out.usage.completion_tokens == mt


def test_streamed_echo_carries_the_prompts_logprobs_as_unstreamed(live):
    """A streamed ``echo`` with ``logprobs``: its first chunk per choice is the prompt with
    the log-probabilities the unstreamed reply gives (not one null token), then the
    completion; all of it equals the unstreamed reply's logprobs."""
    _, _, client = live
    p = prompts(1, 73)[0]
    kw = dict(model="tiny", prompt=p, max_tokens=3, logprobs=2, echo=True, **GREEDY)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
    first = chunks[0].choices[0]
    assert first.text == TOK.decode(p) and len(first.logprobs.tokens) == len(p)
    assert first.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(
        first.logprobs.token_logprobs[1:], whole.logprobs.token_logprobs[1 : len(p)], atol=1e-6
    )
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.tokens]
    assert streamed == whole.logprobs.tokens
    assert "".join(c.choices[0].text for c in chunks) == whole.text


def test_vllm_values_top_k_minus_one_and_int64_seeds(live):
    """``top_k: -1`` is vLLM's "off" (LangChain's VLLMOpenAI sends it): the same tokens as
    0 for one seed; any int64 seed is taken and repeats; out of range is a 400."""
    _, _, client = live
    kw = dict(model="tiny", prompt=prompts(1, 74)[0], max_tokens=6, temperature=1.0)

    def ids(**extra):
        out = client.completions.create(**kw, extra_body={"ignore_eos": True, **extra})
        return out.choices[0].model_extra["token_ids"]

    assert ids(top_k=-1, seed=11) == ids(top_k=0, seed=11)
    for seed in (-1, -(2**63), 2**63 - 1):
        assert ids(seed=seed) == ids(seed=seed)
    for field, value in (("seed", 2**63), ("seed", -(2**63) - 1), ("top_k", -2)):
        with pytest.raises(openai.BadRequestError, match=f"'{field}'"):
            ids(**{field: value})


def test_unknown_routes_and_methods_are_json_errors(live):
    url, _, _ = live
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "not_found_error" and "/v1/nothing-here" in r.text
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    err = r.json()["error"]
    assert err["message"] == "GET /v1/completions: method not allowed", err


def test_batched_prompts_and_n(live):
    """Prompts as a list of strings and of token-id lists, n choices each: indexed i*n+j,
    greedy choices equal generate, sampled ones differ per choice and repeat per seed."""
    _, _, client = live
    ps = prompts(2, 72)
    batch = [ps[0], TOK.decode(ps[1])]
    out = client.completions.create(model="a2", prompt=batch, max_tokens=4, n=2, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        want = reference_greedy(ps[c.index // 2], "a2", 4)
        assert c.model_extra["token_ids"] == want
    assert out.usage.prompt_tokens == len(ps[0]) + len(ps[1])
    assert out.usage.completion_tokens == 16
    kw = dict(model="a2", prompt=ps[0], max_tokens=8, n=3, temperature=1.0, seed=11)
    a = client.completions.create(**kw, extra_body={"ignore_eos": True})
    b = client.completions.create(**kw, extra_body={"ignore_eos": True})
    ids = [c.model_extra["token_ids"] for c in a.choices]
    assert ids == [c.model_extra["token_ids"] for c in b.choices]
    assert len({tuple(x) for x in ids}) == 3


def test_chat_logprobs_layout_and_content_parts(live):
    _, _, client = live
    parts = [{"type": "text", "text": "w5 w6"}, {"type": "text", "text": "w7"}]
    msgs = [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "w8"},
    ]
    out = client.chat.completions.create(
        model="a1", messages=msgs, max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY
    )
    text_msgs = [
        {"role": "user", "content": "w5 w6\nw7"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "w8"},
    ]
    ids = TOK.encode(TOK.apply_chat_template(text_msgs), add_special_tokens=False)
    want = reference_greedy(ids, "a1", 4)
    ch = out.choices[0]
    assert ch.model_extra["token_ids"] == want
    ref = full_logprobs("a1", ids + want)
    for j, item in enumerate(ch.logprobs.content):
        assert item.token == TOK.decode([want[j]])
        assert item.bytes == list(item.token.encode())
        assert abs(item.logprob - ref[len(ids) - 1 + j, want[j]]) < 1e-4
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(openai.BadRequestError, match="type 'image_url' is not supported"):
        client.chat.completions.create(model="a1", messages=bad, max_tokens=2)


def test_chat_default_max_tokens_is_the_rest_of_the_context(live):
    _, _, client = live
    msgs = [{"role": "user", "content": "w1 w2"}]
    out = client.chat.completions.create(model="tiny", messages=msgs, **GREEDY)
    n = len(TOK.encode(TOK.apply_chat_template(msgs), add_special_tokens=False))
    assert out.usage.completion_tokens == MAX_LEN - n
    assert out.choices[0].finish_reason == "length"


def test_stop_strings_any_number_streamed_equals_whole_and_usage_is_exact(live):
    _, _, client = live
    p = prompts(1, 73)[0]
    ids = reference_greedy(p, "a1", 12)
    words = TOK.decode(ids).split()
    k = next(i for i in range(3, 10) if words[i] not in words[:i])
    stop = [f"x{i}" for i in range(5)] + [f"{words[k][:-1]}"]  # part of a word: mid-token
    kw = dict(model="a1", prompt=p, max_tokens=12, stop=stop, **GREEDY)
    whole = client.completions.create(**kw)
    text = " ".join(words)
    assert whole.choices[0].text == text[: text.index(stop[-1])]
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == k + 1  # stopped at the token completing it
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == k + 1
    assert all(c.usage is None for c in chunks[:-1])


def _usage_per_choice(chunks):
    """Per choice index: (text streamed so far, usage) at each of its chunks."""
    seen: dict[int, list] = {}
    text: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            text[ch.index] = text.get(ch.index, "") + piece
            seen.setdefault(ch.index, []).append((text[ch.index], c.usage))
    return seen


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_on_every_chunk_as_vllm(live, chat):
    """``stream_options: {include_usage, continuous_usage_stats}`` (what guidellm sends):
    every chunk carries its choice's usage so far (that prompt's tokens, the choice's
    tokens up to it), the last one the whole request's; without ``include_usage`` no
    chunk carries usage (vLLM's ``should_include_usage``). Oracle: ``generate``'s tokens."""
    _, _, client = live
    p = prompts(1, 79)[0]
    if chat:
        msgs = [{"role": "user", "content": TOK.decode(p)}]
        ids = TOK.encode(TOK.apply_chat_template(msgs), add_special_tokens=False)
        create = functools.partial(client.chat.completions.create, messages=msgs)
    else:
        ids = p
        create = functools.partial(client.completions.create, prompt=p)
    kw = dict(model="a1", max_tokens=5, n=2, stream=True, **GREEDY)
    both = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(create(**kw, stream_options=both))
    want = reference_greedy(ids, "a1", 5)
    final = chunks[-1]
    assert final.choices == [] and final.usage.prompt_tokens == len(ids)
    assert final.usage.completion_tokens == 10 and final.usage.total_tokens == len(ids) + 10
    per_choice = _usage_per_choice(chunks[:-1])
    assert sorted(per_choice) == [0, 1]
    for seen in per_choice.values():
        counts = [u.completion_tokens for _, u in seen]
        assert all(u.prompt_tokens == len(ids) for _, u in seen)
        assert all(u.total_tokens == len(ids) + u.completion_tokens for _, u in seen)
        assert counts == sorted(counts) and counts[-1] == 5  # the finish chunk: all 5
        for text, u in seen:  # the count covers every token whose text was sent
            assert TOK.decode(want[: u.completion_tokens]).startswith(text.strip())
        assert seen[-1][0].strip() == TOK.decode(want)
    if chat:  # each choice's role chunk comes before any token
        assert all(s[0][0] == "" and s[0][1].completion_tokens == 0 for s in per_choice.values())
    only = {"include_usage": False, "continuous_usage_stats": True}
    plain = list(create(**kw, stream_options=only))
    assert all(c.usage is None and c.choices for c in plain)
    with pytest.raises(openai.BadRequestError, match="'continuous_usage_stats' must be true"):
        list(create(**kw, stream_options={"include_usage": True, "continuous_usage_stats": 1}))


def test_streamed_logprobs_and_n_chunks(live):
    url, _, _ = live
    body = {
        "model": "a2", "prompt": prompts(1, 74)[0], "max_tokens": 3, "n": 2, "logprobs": 1,
        "stream": True, "temperature": 0, "ignore_eos": True,
    }  # fmt: skip
    headers = {"Authorization": "Bearer k3y"}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    by_index = {0: [], 1: []}
    for e in events:
        (c,) = e["choices"]
        if c["finish_reason"] is None:
            by_index[c["index"]] += c["logprobs"]["token_logprobs"]
    want = reference_greedy(body["prompt"], "a2", 3)
    ref = full_logprobs("a2", body["prompt"] + want)
    n = len(body["prompt"])
    for got in by_index.values():
        np.testing.assert_allclose(got, [ref[n - 1 + j, t] for j, t in enumerate(want)], atol=1e-4)


def test_logit_bias_presence_and_min_tokens_act(live):
    _, _, client = live
    p = prompts(1, 75)[0]
    out = client.completions.create(
        model="tiny", prompt=p, max_tokens=4, temperature=0, logit_bias={"9": 100}
    )
    assert out.choices[0].model_extra["token_ids"] == [9, 9, 9, 9]
    sp = SamplingParams(
        max_tokens=6, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.5,
        logit_bias=((9, 1.0),), ignore_eos=True,
    )  # fmt: skip
    out = client.completions.create(
        model="a2", prompt=p, max_tokens=6, temperature=0, logit_bias={"9": 1.0},
        presence_penalty=1.5, frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.5, "ignore_eos": True},
    )  # fmt: skip
    assert out.choices[0].model_extra["token_ids"] == reference_adjusted_greedy(p, "a2", sp)
    eos = {str(EOS_ID): 100}
    out = client.completions.create(
        model="tiny", prompt=p, max_tokens=6, temperature=0, logit_bias=eos,
        extra_body={"min_tokens": 3},
    )  # fmt: skip
    ids = out.choices[0].model_extra["token_ids"]
    assert len(ids) == 4 and ids[-1] == EOS_ID and EOS_ID not in ids[:3]
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "'response_format'"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools' is not supported"),
        ({"tool_choice": "auto"}, "'tool_choice' is not supported"),
        ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
        ({"frobnicate": True}, "unknown field 'frobnicate'"),
    ],
)
def test_unimplemented_chat_fields_are_400_naming_the_field(live, extra, needle):
    _, _, client = live
    msgs = [{"role": "user", "content": "w1"}]
    with pytest.raises(openai.BadRequestError, match=needle):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body=extra)
    ok = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=2, response_format={"type": "text"}
    )
    assert ok.usage.completion_tokens >= 1


def test_model_card_tokenize_detokenize_tokenizer_info(live):
    url, _, client = live
    assert client.models.retrieve("a1").id == "a1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("zz")
    h = {"Authorization": "Bearer k3y"}
    r = httpx.post(url + "/tokenize", json={"prompt": "w3 w4"}, headers=h).json()
    assert r["tokens"] == TOK.encode("w3 w4") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_LEN
    msgs = [{"role": "user", "content": "w1"}]
    r = httpx.post(url + "/tokenize", json={"messages": msgs}, headers=h).json()
    assert r["tokens"] == TOK.encode(TOK.apply_chat_template(msgs), add_special_tokens=False)
    r = httpx.post(url + "/detokenize", json={"tokens": [3, 4]}, headers=h).json()
    assert r == {"prompt": TOK.decode([3, 4])}
    info = httpx.get(url + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == TOK.chat_template
    assert httpx.post(url + "/tokenize", json={"prompt": "w1"}).status_code == 401
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**6]}, headers=h)
    assert bad.status_code == 400 and "outside the vocabulary" in bad.text


def test_dynamic_adapters_load_serve_and_unload(live):
    """Every kind the pool holds loads at run time (stored LoRA-Switch bank and plain
    LoRA), serves the tokens of generate with it attached, and unloads; names that would
    leave the checkpoint's folder are refused; the routes need the key."""
    url, server, client = live
    h = {"Authorization": "Bearer k3y"}

    def load(name, path, headers=h):
        body = {"lora_name": name, "lora_path": path}
        return httpx.post(url + "/v1/load_lora_adapter", json=body, headers=headers, timeout=60)

    assert load("x", "a3", headers={}).status_code == 401
    for bad in ("../a3", "/etc", "a3/../../x"):
        r = load("evil", bad)
        assert r.status_code == 400 and "cannot load adapter" in r.text, r.text
    assert load("a1", "a3").status_code == 400  # the name is taken
    r = load("lora3", "a3")
    assert r.status_code == 200 and "Success" in r.text
    p = prompts(1, 76)[0]
    out = client.completions.create(model="lora3", prompt=p, max_tokens=5, **GREEDY)
    assert out.choices[0].model_extra["token_ids"] == reference_greedy(p, "a3", 5)
    assert "lora3" in [m.id for m in client.models.list()]
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "lora3"}, headers=h)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="lora3", prompt=p, max_tokens=2)
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "lora3"}, headers=h)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "route, body, param, needle",
    [
        ("load", {"lora_name": "x"}, "lora_path", "'lora_path' is required"),
        ("load", {"lora_name": "x", "lora_path": None}, "lora_path", "'lora_path' is required"),
        ("load", {"lora_path": "a3"}, "lora_name", "'lora_name' is required"),
        ("load", {}, "lora_name", "'lora_name' is required"),
        ("load", {"lora_name": "x", "lora_path": ""}, "lora_path", "must be a non-empty string"),
        ("load", {"lora_name": "x", "lora_path": ["a3"]}, "lora_path", "must be a non-empty"),
        ("load", {"lora_name": 3, "lora_path": "a3"}, "lora_name", "must be a non-empty string"),
        ("load", {"lora_name": "x", "lora_path": "a3", "load_inplace": "no"}, "load_inplace",
         "'load_inplace' must be true or false"),
        ("load", {"lora_name": "a1", "lora_path": "a3", "load_inplace": True}, "lora_name",
         "'load_inplace' is not supported"),
        ("unload", {}, "lora_name", "'lora_name' is required"),
        ("unload", {"lora_int_id": 1}, "lora_name", "'lora_name' is required"),
        ("unload", {"lora_name": ""}, "lora_name", "must be a non-empty string"),
        ("unload", {"lora_name": "a1", "lora_int_id": "1"}, "lora_int_id",
         "'lora_int_id' must be an integer"),
    ],
)  # fmt: skip
def test_adapter_routes_name_the_missing_or_bad_field(live, route, body, param, needle):
    """vLLM's bodies (``lora_name`` and ``lora_path`` required to load, ``lora_name`` to
    unload): a 400 whose message and ``param`` name the field at fault, and nothing
    loaded or unloaded."""
    url, server, _ = live
    before = server.engine.pool.names()
    r = httpx.post(
        f"{url}/v1/{route}_lora_adapter", json=body, headers={"Authorization": "Bearer k3y"}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == param, err
    assert server.engine.pool.names() == before


def test_dynamic_adapter_from_a_peft_folder(live, tmp_path):
    url, _, client = live
    export_peft_adapter(reference_model("a3"), tmp_path / "peft_a3")
    body = {"lora_name": "peft3", "lora_path": str(tmp_path / "peft_a3")}
    h = {"Authorization": "Bearer k3y"}
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, headers=h).status_code == 200
    p = prompts(1, 78)[0]
    out = client.completions.create(model="peft3", prompt=p, max_tokens=5, **GREEDY)
    assert out.choices[0].model_extra["token_ids"] == reference_greedy(p, "a3", 5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"r": null}')
    body = {"lora_name": "bad", "lora_path": str(tmp_path / "bad")}
    r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=h)
    assert r.status_code == 400 and "adapter_config.json" in r.text, r.text
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "peft3"}, headers=h)
    assert r.status_code == 200


def test_dynamic_adapters_of_every_kind():
    with serving(adapters=("a1",), pool_slots=10, max_experts=4, policy="unmerged") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for name in ("sw", "mo"):
            body = {"lora_name": name, "lora_path": name}
            assert (
                httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
            )
            p = prompts(1, 77)[0]
            out = client.completions.create(model=name, prompt=p, max_tokens=5, **GREEDY)
            assert out.choices[0].model_extra["token_ids"] == reference_greedy(p, name, 5)


def test_health_says_starting_until_warm_and_requests_wait():
    release = threading.Event()
    with serving(warmup=True, before_start=lambda eng: _gate_warm_up(eng, release)) as (url, _):
        assert httpx.get(url + "/health").json() == {"status": "starting"}
        assert httpx.get(url + "/health").status_code == 503
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(
            httpx.post, url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2},
            timeout=60,
        )  # fmt: skip
        release.set()
        assert pending.result().status_code == 200
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def _gate_warm_up(eng, release):
    real = eng.warm_up
    eng.warm_up = lambda **kw: (release.wait(30), real(**kw))[1]


def test_the_load_script_drives_the_server(live):
    """scripts/load_http.py (the documented load tool): concurrent streamed requests over
    the base model and an adapter, all answered, usage counted from the stream."""
    url, _, _ = live
    spec = importlib.util.spec_from_file_location("load_http", SCRIPT)
    load_http = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_http)
    args = load_http.argparse.Namespace(
        url=url + "/v1", api_key="k3y", models=["tiny", "a1"], requests=6, rate=0.0,
        concurrency=4, prompt_words=5, max_tokens=4, seed=0,
    )  # fmt: skip
    res = asyncio.run(load_http.run(args))
    assert res["errors"] == [] and res["ok"] == 6 and res["mean_tokens"] == 4
    assert res["ttft_s"]["p50"] > 0 and res["output_tokens_per_s"] > 0

"""OpenAI-compatible HTTP server over loopback with real HTTP clients (httpx, openai)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time

import httpx
import pytest
from test_serve_fixtures import (
    ADAPTERS,
    MAX_LEN,
    make_engine,
    make_tokenizer,
    prompts,
    reference_greedy,
    tiny_checkpoint,
)

from lsw_jax.cli import build_parser, parse_adapters
from lsw_jax.serve.server import Server, build_server


@contextlib.contextmanager
def serving(*, api_key=None, step_delay=0.0, before_start=None, model_id="tiny", **engine_kw):
    import uvicorn

    eng = make_engine(**engine_kw)
    if before_start is not None:
        before_start(eng)
    if step_delay:
        step = eng.step
        eng.step = lambda: (time.sleep(step_delay), step())[1]
    server = Server(eng, tokenizer=make_tokenizer(), model_id=model_id, api_key=api_key)
    srv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        srv.should_exit = True
        th.join(10)


@pytest.fixture(scope="module")
def live():
    with serving() as s:
        yield s


def _post(url, path, body, timeout=60, **kw):
    return httpx.post(url + path, json=body, timeout=timeout, **kw)


def test_completions_match_generate_per_adapter(live):
    url, _ = live
    for p, model, adapter in zip(
        prompts(3, 21), ["tiny", "a1", "a2"], [None, "a1", "a2"], strict=True
    ):
        r = _post(
            url,
            "/v1/completions",
            {"model": model, "prompt": p, "max_tokens": 7, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        ch = body["choices"][0]
        assert ch["token_ids"] == reference_greedy(p, adapter, 7)
        assert ch["finish_reason"] == "length" and body["model"] == model
        assert body["usage"] == {
            "prompt_tokens": len(p),
            "completion_tokens": 7,
            "total_tokens": len(p) + 7,
        }
        words = make_tokenizer().decode(ch["token_ids"])
        assert ch["text"] == words


def test_streaming_completion_equals_non_streamed(live):
    url, _ = live
    body = {
        "model": "a3",
        "prompt": "w1 w2 w3 w4",
        "max_tokens": 9,
        "temperature": 0,
        "ignore_eos": True,
    }
    full = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    chunks, done = [], False
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[6:]))
    assert done
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completions_with_template(live):
    url, _ = live
    msgs = [{"role": "user", "content": "w5 w6 w7"}]
    body = {"model": "a1", "messages": msgs, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = _post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    tok = make_tokenizer()
    ids = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert r.json()["choices"][0]["token_ids"] == reference_greedy(ids, "a1", 6)
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert lines[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in lines) == msg["content"]


def test_models_health_metrics(live):
    url, _ = live
    ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert ids == ["tiny", *ADAPTERS]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    assert "lsw_requests_total" in text and "lsw_generation_tokens_total" in text
    assert "lsw_engine_steps" in text


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"model": "nope", "prompt": [1]}, 404, "model 'nope' does not exist"),
        ({"prompt": [1, 2], "max_tokens": 63}, 400, "max_tokens=63 is too large"),
        ({"prompt": [1, 2], "max_tokens": 10_000}, 400, "'max_tokens'=10000 is too large"),
        ({"prompt": list(range(5)) * 14, "max_tokens": 1}, 400, "prompt has 70 tokens"),
        ({"prompt": [1], "temperature": 3}, 400, "'temperature'=3 must be between"),
        ({"prompt": [1], "top_p": 0}, 400, "'top_p'=0 must be between"),
        ({"prompt": [1], "n": 17}, 400, "'n'=17 must be between 1 and 16"),
        ({"prompt": [1], "best_of": 3}, 400, "'best_of' is not supported"),
        ({"prompt": [1], "suffix": "x"}, 400, "'suffix' is not supported"),
        ({"prompt": [1], "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
        ({"prompt": [1], "logprobs": 21}, 400, "'logprobs'=21 must be between 0 and 20"),
        ({"prompt": [1], "max_tokens": 0}, 400, "'max_tokens'=0 must be between 1"),
        ({"prompt": [1], "stop": ["x"] * 65}, 400, "up to 64 of them"),
        ({"prompt": [1], "logit_bias": {"x": 1}}, 400, "'logit_bias': key 'x' is not a token"),
        ({"prompt": [1], "logit_bias": {"5": 101}}, 400, "must be a number in [-100, 100]"),
        ({"prompt": [1], "presence_penalty": 3}, 400, "'presence_penalty'=3 must be between"),
        ({"prompt": [1], "stream_options": {"include_usage": True}}, 400, "only allowed with"),
        ({"prompt": [1], "max_tokens": 2, "min_tokens": 3}, 400, "'min_tokens'=3 must be <="),
        ({"prompt": []}, 400, "'prompt' must be a string, a list of token ids, or a non-empty"),
        ({"prompt": [1], "max_tokens": "x"}, 400, "'max_tokens' must be an integer"),
        ({"prompt": {"a": 1}}, 400, "'prompt' must be a string, a list of token ids"),
        ({"prompt": [[1], "w1", {}]}, 400, "each prompt must be a string or a list of token"),
        ({}, 400, "'prompt' is required"),
    ],
)
def test_invalid_requests_get_clear_4xx(live, body, status, needle):
    url, _ = live
    r = _post(url, "/v1/completions", body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_malformed_json_and_chat_errors(live):
    url, _ = live
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = _post(url, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert r.status_code == 400 and "'content'" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing").status_code == 404


def test_api_key():
    with serving(api_key="sekrit") as (url, _):
        assert _post(url, "/v1/completions", {"prompt": [1], "max_tokens": 1}).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert httpx.get(url + "/v1/models", headers=bad).status_code == 401
        ok = {"Authorization": "Bearer sekrit"}
        r = _post(url, "/v1/completions", {"prompt": [1], "max_tokens": 1}, headers=ok)
        assert r.status_code == 200


def _wait_idle(eng, timeout=10.0):
    deadline = time.time() + timeout
    while eng.num_running or eng.num_waiting:
        assert time.time() < deadline, (eng.num_running, eng.num_waiting)
        time.sleep(0.01)


def test_client_disconnect_frees_the_slot():
    with serving(step_delay=0.02) as (url, server):
        eng = server.engine
        body = {
            "prompt": [1, 2, 3],
            "max_tokens": 60,
            "stream": True,
            "ignore_eos": True,
            "model": "a1",
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: {")
                if got == 3:
                    break
        assert eng.num_running == 1  # still generating while we hang up
        _wait_idle(eng, 5)
        assert eng.stats["finished_cancelled"] == 1 and eng.pool.pins() == 0
        # A non-streamed request whose client gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            _post(url, "/v1/completions", {**body, "stream": False}, timeout=0.3)
        _wait_idle(eng, 5)
        assert eng.stats["finished_cancelled"] == 2


def test_overload_with_random_disconnects_loses_nothing():
    """40 concurrent requests on 4 rows, a quarter abandoned at random moments: every
    request the server accepted finishes exactly once, every kept one gets its full and
    correct greedy output, and the engine drains in bounded time."""
    with serving(step_delay=0.002) as (url, server):
        eng = server.engine
        accepted = []
        submit = eng.submit
        eng.submit = lambda req: accepted.append(submit(req)) or req
        rng = random.Random(0)
        jobs = [(p, rng.choice([None, *ADAPTERS]), rng.random() < 0.25) for p in prompts(40, 31)]

        async def one(client, p, adapter, abandon):
            body = {
                "prompt": p,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "model": adapter or "tiny",
            }
            call = client.post(url + "/v1/completions", json=body)
            if abandon:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(call, rng.uniform(0.0, 0.3))
                return None
            return (await call).json()

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(one(client, *j) for j in jobs))

        t0 = time.time()
        results = asyncio.run(main())
        _wait_idle(eng, 20)
        assert time.time() - t0 < 60
        for (p, adapter, abandon), res in zip(jobs, results, strict=True):
            if not abandon:
                assert res["choices"][0]["token_ids"] == reference_greedy(p, adapter, 8)
        finished = sum(v for k, v in eng.stats.items() if k.startswith("finished_"))
        assert finished == len(accepted) == len({r.id for r in accepted})
        assert all(r.finished for r in accepted)
        assert sum(not a for *_, a in jobs) <= len(accepted) <= len(jobs)
        assert eng.pool.pins() == 0


def test_fuzzed_requests_never_crash_the_server(live):
    url, _ = live
    rng = random.Random(1)
    values = [None, 0, -1, 1.5, 1e300, "x", "", [], [1, "a"], {}, True, [[1, 2]], list(range(200))]
    fields = [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "stop",
        "seed",
        "messages",
        "n",
    ]
    with httpx.Client(timeout=30) as c:
        for i in range(80):
            if i % 8 == 0:
                content = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                r = c.post(url + "/v1/completions", content=content)
            else:
                body = {f: rng.choice(values) for f in rng.sample(fields, rng.randrange(1, 6))}
                path = rng.choice(["/v1/completions", "/v1/chat/completions"])
                r = c.post(url + path, json=body)
            assert r.status_code < 500, (r.status_code, r.text)
            if r.status_code >= 400:
                assert r.json()["error"]["message"]
        assert c.get(url + "/health").status_code == 200
        ok = c.post(url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        assert ok.status_code == 200


def test_openai_client(live):
    openai = pytest.importorskip("openai")
    url, _ = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()][:2] == ["tiny", "a1"]
    out = client.completions.create(
        model="a2", prompt="w9 w10", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model="a1",
        messages=[{"role": "user", "content": "w3"}],
        max_tokens=4,
        stream=True,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    full = client.chat.completions.create(
        model="a1",
        messages=[{"role": "user", "content": "w3"}],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == full.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="zzz", prompt="w1", max_tokens=2)
    assert MAX_LEN == 64


def test_cli_builds_a_server_from_a_checkpoint():
    from starlette.testclient import TestClient  # uses httpx, a test-only dependency

    args = build_parser().parse_args(
        ["serve", "--ckpt", str(tiny_checkpoint()), "--adapters", "x=a1", "y=a3", "--slots", "2"]
    )
    assert args.host == "127.0.0.1" and args.adapters == ["x=a1", "y=a3"]
    server = build_server(
        args.ckpt, adapters={"x": "a1", "y": "a3"}, slots=2, max_len=32, pool_slots=2, pool_rank=4
    )
    with TestClient(server.app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "x", "y"]
        r = client.post("/v1/completions", json={"model": "x", "prompt": "w1 w2", "max_tokens": 40})
        assert r.status_code == 400 and "context is 32" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="NAME=PEFT_DIR_OR_STORED_NAME"):
        parse_adapters(["oops"])

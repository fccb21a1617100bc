"""The HTTP layer attacked as a careless or hostile client would: bad numbers and text,
deep JSON, oversized and slow bodies, slow headers, slow tokenization, an exposed host
without a key. Every attack gets a 4xx or a closed connection, never a 500 or a hang,
and the server keeps answering everyone else."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import httpx
import pytest
from test_serve_fixtures import make_engine, make_tokenizer, reference_greedy, tiny_checkpoint

from lsw_jax.cli import main
from lsw_jax.serve.server import HttpLimits, Server, check_exposure, uvicorn_server
from lsw_jax.serve.text import StreamText

FAST = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=1 << 20)


@contextlib.contextmanager
def serving(*, limits=FAST, api_key=None, tokenizer=None):
    server = Server(
        make_engine(),
        tokenizer=tokenizer or make_tokenizer(),
        model_id="tiny",
        api_key=api_key,
        limits=limits,
    )
    srv = uvicorn_server(server, host="127.0.0.1", port=0, log_level="warning")
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", port, server
    finally:
        srv.should_exit = True
        th.join(10)


@pytest.fixture(scope="module")
def live():
    with serving() as s:
        yield s


def _raw(url, body: bytes, path="/v1/completions", **kw):
    headers = {"content-type": "application/json"}
    return httpx.post(url + path, content=body, headers=headers, timeout=30, **kw)


def _ok(url):
    r = httpx.post(url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"prompt": [1], "max_tokens": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": [1], "top_k": Infinity}', "Infinity is not a JSON number"),
        (b'{"prompt": [1], "seed": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"prompt": [1], "max_tokens": 1e999}', "'max_tokens': inf is not a finite number"),
        (b'{"prompt": [1], "temperature": 1e999}', "'temperature': inf is not a finite"),
        (b'{"prompt": [1], "max_tokens": 4.0}', "'max_tokens' must be an integer, got 4.0"),
        (b'{"prompt": [1], "seed": 1.5}', "'seed' must be an integer, got 1.5"),
        (b'{"prompt": [1], "top_k": 1e300}', "'top_k' must be an integer"),
        (b'{"prompt": "w1 \\ud800 w2"}', "'prompt' is not valid Unicode (lone surrogate \\ud800"),
        (b'{"prompt": ["\\udfff"]}', "'prompt' is not valid Unicode"),
        (b'{"prompt": [1], "\\ud800": 1}', "is not valid Unicode"),
        (b'{"prompt": [1], "ignore_eos": "false"}', "'ignore_eos' must be true or false"),
        (b'{"prompt": [1], "stream": 1}', "'stream' must be true or false"),
        (b'{"prompt": [1, 1000000]}', "'prompt': token id 1000000 is outside the vocabulary"),
        (b'{"prompt": [-1]}', "'prompt': token id -1 is outside the vocabulary"),
        (b'{"prompt": [1], "stop_token_ids": [1e30]}', "'stop_token_ids' must be a list of int"),
        (b'{"prompt": [1], "stop_token_ids": [10000000000000000000000]}', "outside the vocab"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than 32"),
        (b'{"prompt": [1], "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32"),
        (b'{"prompt": [1], "x": ' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}", "nested deeper"),
    ],
)
def test_bad_numbers_text_and_nesting_are_400(live, body, needle):
    url, _, _ = live
    r = _raw(url, body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_chat_fields_are_checked_too(live):
    url, _, _ = live
    body = b'{"messages": [{"role": "user", "content": "w1 \\ud83d"}], "max_tokens": 2}'
    r = _raw(url, body, path="/v1/chat/completions")
    assert r.status_code == 400 and "'messages' is not valid Unicode" in r.text
    _ok(url)


def test_bearer_scheme_is_case_insensitive():
    with serving(api_key="sekrit") as (url, _, _):
        body = {"prompt": [1], "max_tokens": 1}
        for auth, status in [
            ("Bearer sekrit", 200),
            ("bearer sekrit", 200),
            ("BEARER  sekrit", 200),
            ("Bearer sekri", 401),
            ("Basic sekrit", 401),
            ("sekrit", 401),
        ]:
            r = httpx.post(
                url + "/v1/completions", json=body, headers={"Authorization": auth}, timeout=30
            )
            assert r.status_code == status, (auth, r.text)


def _connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    return s


def _read_response(s) -> bytes:
    """Everything the server sends until it closes the connection (a server that keeps
    it open past the socket timeout fails the test)."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_oversized_body_is_refused_before_it_is_read(live):
    url, port, _ = live
    # Declared too large: answered from the headers alone, no body sent at all.
    s = _connect(port)
    t0 = time.time()
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 314572800\r\n\r\n"
    )
    reply = _read_response(s)  # the server closes after answering
    assert reply.startswith(b"HTTP/1.1 413") and time.time() - t0 < 5, reply[:200]
    s.close()
    # Chunked (no length): refused while it streams in; the upload is cut off long before
    # its 300 MiB are sent.
    s = _connect(port)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    chunk, sent = b"%x\r\n" % (1 << 16) + b" " * (1 << 16) + b"\r\n", 0
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        while sent < 300 << 20:
            s.sendall(chunk)
            sent += 1 << 16
    assert sent < 64 << 20, sent
    reply = _read_response(s)
    assert reply.startswith(b"HTTP/1.1 413") or reply == b"", reply[:200]
    s.close()
    _ok(url)


def test_slow_headers_and_slow_bodies_are_cut_off(live):
    url, port, _ = live
    slow_headers = [_connect(port) for _ in range(20)]
    for s in slow_headers:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    slow_body = _connect(port)
    slow_body.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"prompt": '
    )
    t0 = time.time()
    closed = 0
    for s in slow_headers:  # trickle one byte at a time: each byte is data, not idleness
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(30):
                s.sendall(b"x")
                time.sleep(0.05)
        closed += _read_response(s) == b""
        s.close()
    assert closed == 20 and time.time() - t0 < 10
    reply = _read_response(slow_body)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"not received within 0.5 s" in reply
    slow_body.close()
    _ok(url)  # everyone else is still served


def test_keep_alive_connection_must_send_its_next_headers_in_time(live):
    url, port, _ = live
    s = _connect(port)
    body = b'{"prompt": [1], "max_tokens": 1}'
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body) + body
    )
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    s.sendall(b"POST /v1/completions HTTP/1.1\r\n")  # then nothing more
    t0 = time.time()
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        for _ in range(40):  # trickling bytes resets uvicorn's keep-alive timer, not ours
            s.sendall(b"x")
            time.sleep(0.05)
    assert _read_response(s) == b"" and time.time() - t0 < 5
    s.close()


class SlowTokenizer:
    """The test tokenizer, with an encode that takes a second (a huge prompt)."""

    def __init__(self):
        self._tok = make_tokenizer()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, **kw):
        if "slow" in text:
            time.sleep(1.0)
        return self._tok.encode(text.replace("slow", "w1"), **kw)


def test_tokenization_does_not_block_the_event_loop():
    with serving(tokenizer=SlowTokenizer()) as (url, _, _):
        _ok(url)
        body = {"prompt": "slow w2", "max_tokens": 2}
        slow = threading.Thread(
            target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=30)
        )
        slow.start()
        time.sleep(0.1)
        latencies = []
        while slow.is_alive():
            t0 = time.time()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            latencies.append(time.time() - t0)
            time.sleep(0.05)
        slow.join()
        assert len(latencies) >= 5 and max(latencies) < 0.5, latencies


def test_non_loopback_host_without_a_key_is_refused(live, caplog):
    _, _, server = live
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(server, host)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(ValueError, match="without an API key.*--allow-unauthenticated"):
            check_exposure(server, host)
    with caplog.at_level(logging.WARNING, logger="lsw_jax.serve"):
        check_exposure(server, "0.0.0.0", allow_unauthenticated=True)
    assert "WARNING: serving on 0.0.0.0 without an API key" in caplog.text
    ckpt = str(tiny_checkpoint())
    with pytest.raises(SystemExit, match="without an API key"):
        main(["serve", "--ckpt", ckpt, "--host", "0.0.0.0", "--slots", "1", "--max-len", "32"])


def _finished_count(url: str, reason: str) -> float:
    key = f'lsw_requests_total{{reason="{reason}"}} '
    text = httpx.get(url + "/metrics").text
    line = next((x for x in text.splitlines() if x.startswith(key)), key + "0")
    return float(line.split()[-1])


def test_stop_string_counts_as_stop_in_metrics(live):
    url, _, _ = live
    prompt = [5, 6, 7]
    words = make_tokenizer().decode(reference_greedy(prompt, "a1", 8)).split()
    i = next(i for i in range(1, len(words)) if words[i] not in words[:i])
    body = {"model": "a1", "prompt": prompt, "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    stop, cancelled = _finished_count(url, "stop"), _finished_count(url, "cancelled")
    r = httpx.post(url + "/v1/completions", json={**body, "stop": words[i]}, timeout=60)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == " ".join(words[:i]) + " "
    deadline = time.time() + 60  # the engine reports the cancellation at its next step
    while _finished_count(url, "stop") == stop and time.time() < deadline:
        time.sleep(0.1)
    assert _finished_count(url, "stop") == stop + 1
    assert _finished_count(url, "cancelled") == cancelled


class ByteTokenizer:
    """Token i = byte i: a multi-byte UTF-8 character spans tokens."""

    def decode(self, ids, **kw):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_token_cut_mid_character_is_not_lost():
    detok = StreamText(ByteTokenizer().decode)
    euro = list("€".encode())  # 3 bytes
    assert detok.push([ord("a")] + euro[:2]) == ("", False)  # waits for the rest
    assert detok.push(euro[2:]) == ("a€", False)
    assert detok.push(euro[:1]) == ("", False)
    assert detok.push([], final=True) == ("\ufffd", False)  # ended inside a character

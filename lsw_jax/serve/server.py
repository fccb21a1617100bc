"""OpenAI-compatible HTTP API over the engine (Starlette + uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
as server-sent events ``data: {...}`` ending ``data: [DONE]``), ``GET /v1/models`` (the
base model and every adapter; a request's ``model`` field picks the adapter), ``GET
/health``, ``GET /metrics`` (Prometheus text).

The engine runs in its own thread; handlers read the body, hand parsing, validation
(``api_schema``) and tokenization to a small thread pool, submit, and await an asyncio
queue the engine fills through ``loop.call_soon_threadsafe``: the event loop never blocks
on JAX or on a large prompt. A client that disconnects cancels its request, which frees
the request's row at the engine's next step. Errors are JSON ``{"error": {"message",
"type", "param", "code"}}`` with a 4xx status.

What one client may cost is bounded by ``HttpLimits``: body size (413, from Content-Length
or while streaming in), body and header read deadlines (408 / disconnect), keep-alive idle
time, open connections (503); ``run_server`` refuses a non-loopback host without an API key
unless told otherwise.

Extensions beyond OpenAI's fields: ``top_k``, ``stop_token_ids``, ``ignore_eos``, and
``token_ids`` (the generated ids) in each non-streamed choice; a prompt may be token ids.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lsw_jax.checkpoint import absolute
from lsw_jax.loading import load_model, load_tokenizer
from lsw_jax.serve.adapter_pool import AdapterPool, read_adapter
from lsw_jax.serve.api_schema import (
    ApiError,
    flag,
    parse_body,
    sampling_params,
    stop_strings,
    token_ids,
)
from lsw_jax.serve.engine import Engine, Request

try:  # the HTTP stack is optional: hosts that only generate (the GPU machines) lack it
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:  # Server() says what to install
    Starlette = None

log = logging.getLogger("lsw_jax.serve")


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the server before it is refused or disconnected."""

    max_body_bytes: int = 4 << 20  # 413, checked against Content-Length and while reading
    body_timeout_s: float = 30.0  # 408 when the whole body has not arrived by then
    header_timeout_s: float = 10.0  # a connection whose request headers are not complete
    # by then (from connecting, or from the end of its previous response) is closed
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1024  # 503 for requests past this many open connections/tasks
    max_json_depth: int = 32  # 400 for JSON nested deeper than this
    tokenizer_threads: int = 4  # parsing and tokenization run here, off the event loop

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name}={getattr(self, f.name)} must be > 0")


_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def _error_response(e: ApiError) -> Response:
    body = {
        "error": {
            "message": e.message,
            "type": _ERROR_TYPES.get(e.status, "invalid_request_error"),
            "param": e.param,
            "code": e.code,
        }
    }
    # The client may still be sending a body we will not read: close, do not reuse.
    headers = {"connection": "close"} if e.status in (408, 413) else None
    # ASCII JSON: the message may quote the client's text, even invalid Unicode.
    return Response(
        json.dumps(body), status_code=e.status, headers=headers, media_type="application/json"
    )


# ---------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lsw_requests", "Finished requests", ["reason"], registry=r)
        self.rejected = Counter(
            "lsw_requests_rejected", "Rejected requests", ["status"], registry=r
        )
        self.prompt_tokens = Counter("lsw_prompt_tokens", "Prompt tokens", registry=r)
        self.gen_tokens = Counter("lsw_generation_tokens", "Generated tokens", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "lsw_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r
        )
        self.latency = Histogram(
            "lsw_request_seconds", "Request latency", buckets=buckets, registry=r
        )
        self.running = Gauge("lsw_requests_running", "Requests in engine rows", registry=r)
        self.waiting = Gauge("lsw_requests_waiting", "Requests queued", registry=r)
        self.steps = Gauge("lsw_engine_steps", "Decode steps by mode", ["mode"], registry=r)
        self.engine_stat = Gauge("lsw_engine_events", "Engine event counts", ["event"], registry=r)
        self.pool_stat = Gauge(
            "lsw_adapter_pool_events", "Adapter pool events", ["event"], registry=r
        )
        self.threshold = Gauge(
            "lsw_merge_threshold_rows",
            "Rows of one adapter (of a full batch) above which merged mode wins (-1: unknown)",
            registry=r,
        )

    def finished(self, req: Request, reason: str) -> None:
        """Count a finished request; ``reason`` is what the client was told ("stop" for a
        stop string, which the engine sees as a cancellation)."""
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(len(req.prompt))
        self.gen_tokens.inc(len(req.output))
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.arrival)
        if req.finished_at is not None:
            self.latency.observe(req.finished_at - req.arrival)

    def render(self) -> bytes:
        eng = self.engine
        self.running.set(eng.num_running)
        self.waiting.set(eng.num_waiting)
        for mode in ("merged", "unmerged"):
            self.steps.labels(mode).set(eng.stats[f"steps_{mode}"])
        for ev in ("prefills", "preemptions", "merges", "errors"):
            self.engine_stat.labels(ev).set(eng.stats[ev])
        if eng.pool is not None:
            for ev in ("loads", "evictions", "hits"):
                self.pool_stat.labels(ev).set(eng.pool.stats[ev])
        thr = eng.scheduler.merge_threshold(eng.slots)
        self.threshold.set(-1 if thr is None else thr)
        return generate_latest(self.registry)


class _Detok:
    """Incremental detokenizer: the text of all tokens so far, emitted as deltas."""

    def __init__(self, tokenizer: Any):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, ids: list[int], *, final: bool = False) -> str:
        """The new text; ``final``: the last call, which emits an unfinished UTF-8
        sequence as U+FFFD rather than dropping it."""
        self.ids += ids
        if self.tok is None:
            return ""
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") and not final:  # incomplete UTF-8: wait for more bytes
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


# ---------------------------------------------------------------------- the app


class Server:
    """The HTTP app (``self.app``) over one engine; ``limits`` bound what a client may cost."""

    def __init__(
        self,
        engine: Engine,
        *,
        tokenizer: Any = None,
        model_id: str = "base",
        api_key: str | None = None,
        max_tokens_default: int = 16,
        limits: HttpLimits = HttpLimits(),
        vocab_size: int | None = None,
    ):
        if Starlette is None:
            raise ImportError("serving needs starlette and uvicorn: pip install starlette uvicorn")
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self.api_key, self.max_tokens_default = api_key, max_tokens_default
        self.limits = limits
        self.vocab_size = vocab_size or engine.cfg.vocab_size
        self.metrics = Metrics(engine)
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self.app = self._build()

    def _build(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self._workers = concurrent.futures.ThreadPoolExecutor(
                self.limits.tokenizer_threads, thread_name_prefix="lsw-http"
            )
            self.engine.start()
            yield
            self.engine.stop()
            self._workers.shutdown(wait=False, cancel_futures=True)

        return Starlette(routes=routes, lifespan=lifespan)

    # ------------------------------------------------------------------ helpers
    def _check_auth(self, request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 9110); compare the key in constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")

    async def _read_body(self, request) -> bytes:
        """The body, refused (413) as soon as it is known to exceed the limit — from its
        Content-Length before reading, else while it streams in — or when it has not
        fully arrived within the body timeout (408)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"invalid Content-Length {declared[:40]!r}")
            if int(declared) > limit:
                raise ApiError(413, f"request body of {declared} bytes exceeds {limit} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), deadline - loop.time())
            except StopAsyncIteration:
                return b"".join(chunks)
            except asyncio.TimeoutError:
                raise ApiError(
                    408, f"request body not received within {self.limits.body_timeout_s} s"
                ) from None
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes")
            chunks.append(chunk)

    def _adapter(self, body: dict) -> tuple[str, str | None]:
        model = body.get("model", self.model_id)
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model")
        if model == self.model_id:
            return model, None
        pool = self.engine.pool
        if pool is None or model not in pool.names():
            known = [self.model_id] + ([] if pool is None else pool.names())
            raise ApiError(
                404,
                f"the model {model!r} does not exist (available: {', '.join(known)})",
                "model",
                "model_not_found",
            )
        return model, model

    def _encode(self, text: str, *, special: bool) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(
                400, "this server has no tokenizer: send the prompt as token ids", "prompt"
            )
        return self.tokenizer.encode(text, add_special_tokens=special)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self._encode(prompt, special=True)
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return token_ids(prompt, "prompt", self.vocab_size)
        raise ApiError(
            400, "'prompt' must be a string or a list of token ids (one prompt)", "prompt"
        )

    def _prepare(
        self, raw: bytes, chat: bool
    ) -> tuple[str, str | None, list[int], Any, list, bool]:
        """Parse, validate and tokenize a request body (on a worker thread: a 4 MB prompt
        takes seconds to tokenize). Returns (model, adapter, ids, params, stops, stream)."""
        body = parse_body(raw, self.limits.max_json_depth)
        model, adapter = self._adapter(body)
        if chat:
            ids = self._chat_ids(body.get("messages"))
        else:
            if "prompt" not in body:
                raise ApiError(400, "'prompt' is required", "prompt")
            ids = self._prompt_ids(body["prompt"])
        params = sampling_params(
            body, self.max_tokens_default, self.engine.max_len, self.vocab_size
        )
        return model, adapter, ids, params, stop_strings(body), flag(body, "stream")

    # ------------------------------------------------------------------ routes
    async def health(self, request):
        ok = self.engine._thread is not None and self.engine._thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    async def metrics_route(self, request):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request):
        try:
            self._check_auth(request)
        except ApiError as e:
            return _error_response(e)
        now = int(time.time())
        data = [{"id": self.model_id, "object": "model", "created": now, "owned_by": "lsw-jax"}]
        for name, info in self.engine.pool.describe().items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "lsw-jax",
                    "parent": self.model_id,
                    "kind": info["kind"],  # lora | switch | mola
                    "num_experts": info["num_experts"],
                    "top_k": info["top_k"],
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request):
        return await self._handle(request, chat=False)

    async def chat(self, request):
        return await self._handle(request, chat=True)

    async def _handle(self, request, *, chat: bool):
        try:
            self._check_auth(request)
            raw = await self._read_body(request)
            work = functools.partial(self._prepare, raw, chat)
            loop = asyncio.get_running_loop()
            model, adapter, ids, params, stops, stream = await loop.run_in_executor(
                self._workers, work
            )
            call = _Call(self, request, chat, model, stops)
            req = Request(ids, params, adapter=adapter, sink=call.sink)
            call.req = req
            try:
                self.engine.submit(req)
            except OverflowError as e:
                raise ApiError(429, str(e)) from None
            except ValueError as e:
                raise ApiError(400, str(e), "prompt" if "prompt" in str(e) else None) from None
        except ApiError as e:
            self.metrics.rejected.labels(str(e.status)).inc()
            return _error_response(e)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=499)
        if stream:
            return StreamingResponse(call.sse(), media_type="text/event-stream")
        return await call.complete()

    def _chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        for m in messages:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ApiError(
                    400,
                    "each message must be an object with string 'role' and 'content'",
                    "messages",
                )
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # template errors (raise_exception) are the client's input
            raise ApiError(400, f"cannot apply the chat template: {e}", "messages") from None
        return self._encode(text, special=False)


class _Call:
    """One HTTP request's view of its engine request: an asyncio queue fed by the engine."""

    def __init__(self, server: Server, request: Any, chat: bool, model: str, stops: list[str]):
        self.server, self.request, self.chat, self.model, self.stops = (
            server,
            request,
            chat,
            model,
            stops,
        )
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.req: Request | None = None
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.detok = _Detok(server.tokenizer)
        self.text = ""
        self.stopped_by_string = False

    def sink(self, req: Request, tokens: list[int], finished: bool) -> None:  # engine thread
        if finished:
            reason = "stop" if self.stopped_by_string else req.finish_reason
            self.server.metrics.finished(req, reason)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (list(tokens), finished))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    async def deltas(self):
        """Yield text deltas; returns when the request finished or hit a stop string."""
        while True:
            tokens, finished = await self.queue.get()
            delta = self.detok.push(tokens, final=finished) if tokens or finished else ""
            if delta and self.stops:
                full = self.text + delta
                cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    delta = full[len(self.text) : cut] if cut > len(self.text) else ""
                    self.text = full[:cut]
                    self.stopped_by_string = True
                    self.server.engine.cancel(self.req)
                    if delta:
                        yield delta
                    return
            self.text += delta
            if delta:
                yield delta
            if finished:
                return

    @property
    def finish_reason(self) -> str:
        if self.stopped_by_string:
            return "stop"
        reason = self.req.finish_reason
        return "stop" if reason == "cancelled" else (reason or "stop")

    def _usage(self) -> dict:
        n_out = len(self.req.output)
        return {
            "prompt_tokens": len(self.req.prompt),
            "completion_tokens": n_out,
            "total_tokens": len(self.req.prompt) + n_out,
        }

    def _chunk(self, delta: str | None, finish: str | None, first: bool = False) -> str:
        if self.chat:
            d = {} if delta is None else {"content": delta}
            if first:
                d = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        payload = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        return f"data: {json.dumps(payload)}\n\n"

    async def sse(self):
        finished = False
        try:
            if self.chat:
                yield self._chunk(None, None, first=True)
            async for delta in self.deltas():
                yield self._chunk(delta, None)
            finished = True
            yield self._chunk(None, self.finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            if not finished and not self.req.finished:
                self.server.engine.cancel(self.req)  # the client went away

    async def complete(self):
        async def collect():
            async for _ in self.deltas():
                pass

        async def disconnected():
            while True:
                msg = await self.request.receive()
                if msg["type"] == "http.disconnect":
                    return

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(disconnected())
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            self.server.engine.cancel(self.req)
            return Response(status_code=499)
        watch.cancel()
        ids = list(self.req.output)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": self.text},
                "finish_reason": self.finish_reason,
                "logprobs": None,
                "token_ids": ids,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": self.text,
                "finish_reason": self.finish_reason,
                "logprobs": None,
                "token_ids": ids,
            }
            obj = "text_completion"
        return JSONResponse(
            {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "usage": self._usage(),
            }
        )


# ---------------------------------------------------------------------- building and running


def build_server(
    ckpt: str | Path,
    *,
    adapters: dict[str, str] | None = None,
    slots: int = 8,
    max_len: int | None = None,
    pool_slots: int = 8,
    pool_rank: int = 16,
    pool_max_experts: int = 8,
    pool_top_k: int = 2,
    policy: str = "adaptive",
    api_key: str | None = None,
    dtype: str | None = None,
    model_id: str | None = None,
    max_waiting: int = 256,
    verify_checksums: bool = True,
    limits: HttpLimits = HttpLimits(),
) -> Server:
    """Load a checkpoint (and its tokenizer), attach an adapter pool, wrap it in a Server.

    adapters: name -> PEFT directory or stored adapter of any kind (plain LoRA, LoRA-Switch,
    MoLA). The pool holds ``pool_slots`` expert slots (an adapter of E experts takes E),
    grown to the largest registered adapter; ``pool_max_experts`` / ``pool_top_k`` bound
    what it accepts (adapters given here raise them as needed).
    """
    ckpt = absolute(ckpt)
    model = load_model(ckpt, dtype=dtype, verify_checksums=verify_checksums)
    tok = load_tokenizer(ckpt)
    pool = None
    if adapters:
        hosts = [read_adapter(model.cfg, name, src, ckpt) for name, src in adapters.items()]
        experts = max([pool_max_experts] + [h.num_experts for h in hosts])
        pool = AdapterPool(
            model,
            capacity=max(pool_slots, experts),
            rank=pool_rank,
            max_experts=experts,
            max_top_k=max([pool_top_k] + [h.top_k for h in hosts]),
            ckpt=ckpt,
        )
        for host in hosts:
            pool.add(host)
    eos = tuple(model.cfg.eos_token_ids)
    if not eos and tok is not None and tok.eos_token_id is not None:
        eos = (tok.eos_token_id,)
    engine = Engine(
        model,
        pool=pool,
        slots=slots,
        max_len=max_len,
        policy=policy,
        max_waiting=max_waiting,
        eos_token_ids=eos,
    )
    return Server(
        engine,
        tokenizer=tok,
        model_id=model_id or ckpt.name,
        api_key=api_key,
        limits=limits,
        vocab_size=model.cfg.vocab_size,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(server: Server, host: str, *, allow_unauthenticated: bool = False) -> None:
    """Refuse to listen beyond loopback without an API key unless asked to, and then say
    so loudly: anyone who can reach the port could use (and load) the server."""
    if is_loopback(host) or server.api_key is not None:
        return
    message = (
        f"serving on {host} without an API key: anyone who can reach this port can run "
        "requests on it"
    )
    if not allow_unauthenticated:
        raise ValueError(
            f"{message}; pass --api-key KEY (or set LSW_JAX_API_KEY), or "
            "--allow-unauthenticated to accept that"
        )
    log.warning("WARNING: %s (--allow-unauthenticated)", message)


def uvicorn_server(
    server: Server, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
):
    """A ``uvicorn.Server`` for ``server.app`` with its HttpLimits applied: header deadline,
    keep-alive timeout and connection limit (the body limits live in the app)."""
    import uvicorn  # optional at import time: hosts that only generate need not have it
    from uvicorn.protocols.http.h11_impl import H11Protocol

    header_timeout = server.limits.header_timeout_s

    class Protocol(H11Protocol):
        """uvicorn's h11 protocol with a deadline on request headers: a client that
        connects (or finishes a response) and does not complete its next request's
        headers in time is disconnected, so slow-header clients cannot pile up."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._header_deadline = self.loop.call_later(header_timeout, self._header_expired)

        def _header_expired(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._header_deadline.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._header_deadline.cancel()
                self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

    config = uvicorn.Config(
        server.app,
        host=host,
        port=port,
        http=Protocol,
        log_level=log_level,
        timeout_keep_alive=server.limits.keep_alive_s,
        limit_concurrency=server.limits.max_connections,
        h11_max_incomplete_event_size=64 << 10,  # headers larger than this: 400
    )
    return uvicorn.Server(config)


def run_server(
    server: Server,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_unauthenticated: bool = False,
) -> None:
    """Serve until interrupted (see ``check_exposure`` and ``uvicorn_server``)."""
    check_exposure(server, host, allow_unauthenticated=allow_unauthenticated)
    uvicorn_server(server, host=host, port=port).run()

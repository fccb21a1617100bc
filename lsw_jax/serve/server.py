"""OpenAI-compatible HTTP API over the engine (Starlette + uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
as server-sent events ``data: {...}`` ending ``data: [DONE]``), ``GET /v1/models`` (the
base model and every adapter; a request's ``model`` field picks the adapter), ``GET
/health``, ``GET /metrics`` (Prometheus text).

The engine runs in its own thread; handlers only validate, tokenize, submit and await
an asyncio queue the engine fills through ``loop.call_soon_threadsafe``, so the event
loop never blocks on JAX. A client that disconnects cancels its request, which frees the
request's row at the engine's next step. Errors are JSON ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx status.

Extensions beyond OpenAI's fields: ``top_k``, ``stop_token_ids``, ``ignore_eos``, and
``token_ids`` (the generated ids) in each non-streamed choice; a prompt may be token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lsw_jax.loading import load_model, load_tokenizer
from lsw_jax.serve.adapter_pool import AdapterPool, read_adapter
from lsw_jax.serve.engine import Engine, Request, SamplingParams

MAX_BODY_BYTES = 4 << 20


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(e: ApiError):
    from starlette.responses import JSONResponse

    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
    body = {
        "error": {
            "message": e.message,
            "type": kind.get(e.status, "invalid_request_error"),
            "param": e.param,
            "code": e.code,
        }
    }
    return JSONResponse(body, status_code=e.status)


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

    def finished(self, req: Request) -> None:
        self.requests.labels(req.finish_reason).inc()
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


# ---------------------------------------------------------------------- request parsing


def _num(body: dict, name: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}'={v} must be between {lo} and {hi}", name)
    return kind(v)


def _sampling(body: dict, max_tokens_default: int, limit: int) -> SamplingParams:
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
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise ApiError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    return SamplingParams(
        max_tokens=mt,
        temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, float, 1e-9, 1.0),
        top_k=_num(body, "top_k", 0, int, 0, 1 << 20),
        seed=_num(body, "seed", 0, int, -(1 << 63), (1 << 64) - 1),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def _stops(body: dict) -> list[str]:
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


class _Detok:
    """Incremental detokenizer: the text of all tokens so far, emitted as deltas."""

    def __init__(self, tokenizer: Any):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        if self.tok is None:
            return ""
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


# ---------------------------------------------------------------------- the app


class Server:
    def __init__(
        self,
        engine: Engine,
        *,
        tokenizer: Any = None,
        model_id: str = "base",
        api_key: str | None = None,
        max_tokens_default: int = 16,
    ):
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self.api_key, self.max_tokens_default = api_key, max_tokens_default
        self.metrics = Metrics(engine)
        self.app = self._build()

    def _build(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.engine.start()
            yield
            self.engine.stop()

        return Starlette(routes=routes, lifespan=lifespan)

    # ------------------------------------------------------------------ helpers
    def _check_auth(self, request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")

    async def _body(self, request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        return body

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
            return list(prompt)
        raise ApiError(
            400, "'prompt' must be a string or a list of token ids (one prompt)", "prompt"
        )

    # ------------------------------------------------------------------ routes
    async def health(self, request):
        from starlette.responses import JSONResponse

        ok = self.engine._thread is not None and self.engine._thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    async def metrics_route(self, request):
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request):
        from starlette.responses import JSONResponse

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
            body = await self._body(request)
            model, adapter = self._adapter(body)
            if chat:
                ids = self._chat_ids(body.get("messages"))
            else:
                if "prompt" not in body:
                    raise ApiError(400, "'prompt' is required", "prompt")
                ids = self._prompt_ids(body["prompt"])
            params = _sampling(body, self.max_tokens_default, self.engine.max_len)
            stops = _stops(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ApiError(400, "'stream' must be true or false", "stream")
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
        if stream:
            from starlette.responses import StreamingResponse

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
            self.server.metrics.finished(req)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (list(tokens), finished))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    async def deltas(self):
        """Yield text deltas; returns when the request finished or hit a stop string."""
        while True:
            tokens, finished = await self.queue.get()
            delta = self.detok.push(tokens) if tokens else ""
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
        from starlette.responses import JSONResponse, Response

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
) -> Server:
    """Load a checkpoint (and its tokenizer), attach an adapter pool, wrap it in a Server.

    adapters: name -> PEFT directory or stored adapter of any kind (plain LoRA, LoRA-Switch,
    MoLA). The pool holds ``pool_slots`` expert slots (an adapter of E experts takes E),
    grown to the largest registered adapter; ``pool_max_experts`` / ``pool_top_k`` bound
    what it accepts (adapters given here raise them as needed).
    """
    ckpt = Path(ckpt)
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
    return Server(engine, tokenizer=tok, model_id=model_id or ckpt.name, api_key=api_key)


def run_server(server: Server, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``server.app`` with uvicorn until interrupted."""
    import uvicorn  # optional at import time: hosts that only generate need not have it

    uvicorn.run(server.app, host=host, port=port, log_level="info")

"""OpenAI-compatible HTTP API over the engine (Starlette + uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
as server-sent events ``data: {...}`` ending ``data: [DONE]``), ``GET /v1/models`` and
``GET /v1/models/{id}`` (the base model and every adapter; a request's ``model`` field
picks the adapter), ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``
(vLLM's bodies; lm-eval's remote tokenizer uses them), ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (vLLM's), ``GET /health`` (503 while warming up),
``GET /metrics`` (Prometheus text).

The engine runs in its own thread; handlers read the body, hand parsing, validation
(``api_schema``) and tokenization to a small thread pool, submit one engine request per
choice (``n`` per prompt, prompts may be a batch), and await an asyncio queue the engine
fills through ``loop.call_soon_threadsafe``: the event loop never blocks on JAX or on a
large prompt. Stop strings, text and log-probabilities come from the engine (so usage is
exact and streamed text equals non-streamed text); this module only lays them out
(``openai_format``). A client that disconnects cancels its requests. Errors are JSON
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (500 only when an
engine step failed for the request). Every field a route does not implement is a 400
naming it (``api_schema.check_fields``).

What one client may cost is bounded by ``HttpLimits``: body size (413, from Content-Length
or while streaming in), body and header read deadlines (408 / disconnect), keep-alive idle
time, open connections (503); ``run_server`` refuses a non-loopback host without an API key
unless told otherwise.

Extensions beyond OpenAI's fields (vLLM's names): ``top_k``, ``min_tokens``,
``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, and ``token_ids`` (the generated
ids) in each non-streamed choice; a prompt may be token ids.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lsw_jax.checkpoint import absolute
from lsw_jax.loading import load_model, load_tokenizer
from lsw_jax.serve.adapter_pool import AdapterPool, read_adapter
from lsw_jax.serve.api_schema import (
    ApiError,
    check_fields,
    choices_per_prompt,
    flag,
    message_text,
    parse_body,
    required_text,
    sampling_params,
    stream_usage,
    token_ids,
    with_default_max_tokens,
)
from lsw_jax.serve.call import Call, Job, error_response
from lsw_jax.serve.engine import Engine, Request
from lsw_jax.serve.openai_format import (
    TokenText,
)

try:  # the HTTP stack is optional: hosts that only generate (the GPU machines) lack it
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
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
        """Count a finished request by its finish reason (a stop string is "stop")."""
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
        if tokenizer is not None and engine.detokenize is None:
            engine.detokenize = tokenizer.decode  # stop strings and text live in the engine
        self.api_key, self.max_tokens_default = api_key, max_tokens_default
        self.limits = limits
        self.vocab_size = vocab_size or engine.cfg.vocab_size
        self.metrics = Metrics(engine)
        self.token_text = TokenText(tokenizer)
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self.app = self._build()

    def _build(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
            Route("/v1/load_lora_adapter", self.load_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_adapter, methods=["POST"]),
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

        async def http_error(request, exc: HTTPException) -> Response:
            """Starlette's own answers (404 no such route, 405 wrong method) as JSON errors."""
            what = f"{request.method} {request.url.path}"
            message = {404: f"no route {request.url.path}", 405: f"{what}: method not allowed"}
            response = error_response(
                ApiError(exc.status_code, message.get(exc.status_code, exc.detail))
            )
            response.headers.update(exc.headers or {})  # 405: Allow
            return response

        return Starlette(
            routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
        )

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

    async def _json_route(self, request, work, *, auth: bool = True) -> Response:
        """Auth, read and parse the body, run ``work(body)`` on a worker thread (it may
        tokenize megabytes or read adapter files), answer its result or its ApiError."""
        try:
            if auth:
                self._check_auth(request)
            raw = await self._read_body(request)
            body = await self._off_loop(parse_body, raw, self.limits.max_json_depth)
            result = await self._off_loop(work, body)
        except ApiError as e:
            self.metrics.rejected.labels(str(e.status)).inc()
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=499)
        return result if isinstance(result, Response) else JSONResponse(result)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(
            self._workers, functools.partial(fn, *args)
        )

    def _adapter(self, body: dict) -> tuple[str, str | None]:
        model = body.get("model", self.model_id)
        if model is None:
            model = self.model_id
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

    def _encode(self, text: str, *, special: bool, field: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: send the prompt as token ids", field)
        return self.tokenizer.encode(text, add_special_tokens=special)

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """``prompt``: a string, token ids, or a non-empty list of strings / token-id lists."""
        if isinstance(prompt, str) or _is_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(
                400,
                "'prompt' must be a string, a list of token ids, or a non-empty list of "
                "strings or of token-id lists",
                "prompt",
            )
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(self._encode(p, special=True))
            elif _is_ids(p):
                out.append(token_ids(p, "prompt", self.vocab_size))
            else:
                raise ApiError(400, "each prompt must be a string or a list of token ids", "prompt")
        return out

    def _chat_ids(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        msgs = [message_text(m, i) for i, m in enumerate(messages)]
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # template errors (raise_exception) are the client's input
            raise ApiError(400, f"cannot apply the chat template: {e}", "messages") from None
        return self._encode(text, special=False, field="messages")

    def _prepare(self, raw: bytes, chat: bool) -> Job:
        """Parse, validate and tokenize a request body (on a worker thread: a 4 MB prompt
        takes seconds to tokenize)."""
        body = parse_body(raw, self.limits.max_json_depth)
        check_fields(body, chat)
        model, adapter = self._adapter(body)
        texts: list[str | None] = [None]
        if chat:
            prompts = [self._chat_ids(body.get("messages"))]
        else:
            if "prompt" not in body:
                raise ApiError(400, "'prompt' is required", "prompt")
            prompts = self._prompts(body["prompt"])
            given = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            texts = [p if isinstance(p, str) else None for p in given]
            if len(texts) != len(prompts):  # one prompt given as token ids
                texts = [None]
        limit = self.engine.max_len
        params, given = sampling_params(body, limit, self.vocab_size, chat=chat)
        default = None if chat else self.max_tokens_default
        per_prompt = [
            params if given else with_default_max_tokens(params, len(p), limit, default)
            for p in prompts
        ]
        return Job(
            chat=chat,
            model=model,
            adapter=adapter,
            prompts=prompts,
            prompt_texts=texts,
            params=per_prompt,
            n=choices_per_prompt(body),
            stream=flag(body, "stream"),
            usage=stream_usage(body),
            echo=not chat and flag(body, "echo"),
        )

    # ------------------------------------------------------------------ routes
    async def health(self, request):
        if self.engine.is_serving():
            return JSONResponse({"status": "ok"})
        status = "starting" if self.engine.is_starting() else "stopped"
        return JSONResponse({"status": status}, status_code=503)

    async def metrics_route(self, request):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    def _model_cards(self) -> list[dict]:
        now = int(time.time())
        base = {"object": "model", "created": now, "owned_by": "lsw-jax"}
        data = [{"id": self.model_id, **base, "max_model_len": self.engine.max_len}]
        pool = self.engine.pool
        for name, info in ({} if pool is None else pool.describe()).items():
            data.append(
                {
                    "id": name,
                    **base,
                    "parent": self.model_id,
                    "root": info["source"],
                    "max_model_len": self.engine.max_len,
                    "kind": info["kind"],  # lora | switch | mola
                    "num_experts": info["num_experts"],
                    "top_k": info["top_k"],
                }
            )
        return data

    async def models(self, request):
        try:
            self._check_auth(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": self._model_cards()})

    async def model(self, request):
        try:
            self._check_auth(request)
            model_id = request.path_params["model_id"]
            card = next((c for c in self._model_cards() if c["id"] == model_id), None)
            if card is None:
                raise ApiError(
                    404, f"the model {model_id!r} does not exist", "model", "model_not_found"
                )
        except ApiError as e:
            return error_response(e)
        return JSONResponse(card)

    async def tokenize(self, request):
        """vLLM's body: ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages":
        [...], "add_generation_prompt": true}`` -> ``{count, max_model_len, tokens}``."""

        def work(body: dict) -> dict:
            _check_known(body, {"model", "prompt", "messages", "add_special_tokens",
                                "add_generation_prompt", "return_token_strs"})  # fmt: skip
            self._adapter(body)
            if body.get("messages") is not None:
                ids = self._chat_ids(body["messages"], flag_default(body, "add_generation_prompt"))
            elif isinstance(body.get("prompt"), str):
                special = flag_default(body, "add_special_tokens")
                ids = self._encode(body["prompt"], special=special)
            else:
                raise ApiError(400, "give 'prompt' (a string) or 'messages'", "prompt")
            strs = [self.token_text(t) for t in ids] if flag(body, "return_token_strs") else None
            return {
                "count": len(ids),
                "max_model_len": self.engine.max_len,
                "tokens": ids,
                "token_strs": strs,
            }

        return await self._json_route(request, work)

    async def detokenize(self, request):
        """vLLM's body: ``{"tokens": [ids]}`` -> ``{"prompt": text}``."""

        def work(body: dict) -> dict:
            _check_known(body, {"model", "tokens"})
            self._adapter(body)
            ids = token_ids(body.get("tokens"), "tokens", self.vocab_size)
            if self.tokenizer is None:
                raise ApiError(400, "this server has no tokenizer", "tokens")
            return {"prompt": self.tokenizer.decode(ids)}

        return await self._json_route(request, work)

    async def tokenizer_info(self, request):
        """The tokenizer's special tokens and chat template (lm-eval's remote tokenizer)."""
        try:
            self._check_auth(request)
            tok = self.tokenizer
            if tok is None:
                raise ApiError(404, "this server has no tokenizer")
        except ApiError as e:
            return error_response(e)
        return JSONResponse(
            {
                "tokenizer_class": type(tok).__name__,
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": tok.pad_token,
                "unk_token": tok.unk_token,
                "chat_template": tok.chat_template,
                "model_max_length": self.engine.max_len,
                "vocab_size": self.vocab_size,
            }
        )

    async def load_adapter(self, request):
        """vLLM's ``{"lora_name", "lora_path"}``: a PEFT folder or a stored adapter of the
        checkpoint (any kind), checked against the model before it can serve."""

        def work(body: dict) -> Response:
            _check_known(body, {"lora_name", "lora_path", "load_inplace"})
            name, path = required_text(body, "lora_name"), required_text(body, "lora_path")
            inplace = flag(body, "load_inplace")
            pool = self._pool_for_adapters()
            if name == self.model_id or name in pool.names():
                why = "; 'load_inplace' is not supported: unload it first" if inplace else ""
                raise ApiError(400, f"the adapter {name!r} is already loaded{why}", "lora_name")
            try:
                pool.register(name, path)
            except (ValueError, KeyError, OSError) as e:
                raise ApiError(400, f"cannot load adapter {name!r}: {e}", "lora_path") from None
            log.info("loaded adapter %r from %s", name, path)
            return Response(f"Success: LoRA adapter '{name}' added successfully.")

        return await self._json_route(request, work)

    async def unload_adapter(self, request):
        def work(body: dict) -> Response:
            _check_known(body, {"lora_name", "lora_int_id"})
            name = required_text(body, "lora_name")
            lora_id = body.get("lora_int_id")  # vLLM's; the name alone picks the adapter
            if lora_id is not None and (isinstance(lora_id, bool) or not isinstance(lora_id, int)):
                raise ApiError(400, "'lora_int_id' must be an integer", "lora_int_id")
            pool = self._pool_for_adapters()
            if name not in pool.names():
                raise ApiError(404, f"the adapter {name!r} is not loaded", "lora_name")
            try:
                pool.remove(name)
            except ValueError as e:  # still pinned by running requests
                raise ApiError(400, str(e), "lora_name") from None
            log.info("unloaded adapter %r", name)
            return Response(f"Success: LoRA adapter '{name}' removed successfully.")

        return await self._json_route(request, work)

    def _pool_for_adapters(self) -> Any:
        if self.engine.pool is None:
            raise ApiError(
                400,
                "this server has no adapter pool: start it with --enable-lora (or --adapters)",
                "lora_name",
            )
        return self.engine.pool

    async def completions(self, request):
        return await self._handle(request, chat=False)

    async def chat(self, request):
        return await self._handle(request, chat=True)

    async def _handle(self, request, *, chat: bool):
        try:
            self._check_auth(request)
            raw = await self._read_body(request)
            job = await self._off_loop(self._prepare, raw, chat)
            call = Call(self, request, job)
            call.submit()
        except ApiError as e:
            self.metrics.rejected.labels(str(e.status)).inc()
            return error_response(e)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=499)
        if job.stream:
            return StreamingResponse(call.sse(), media_type="text/event-stream")
        return await call.complete()


def _is_ids(x: Any) -> bool:
    return (
        isinstance(x, list)
        and bool(x)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    )


def _check_known(body: dict, fields: set[str]) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0]}'", unknown[0])


def flag_default(body: dict, name: str, default: bool = True) -> bool:
    return default if body.get(name) is None else flag(body, name)


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
    enable_lora: bool = False,
    warmup: bool = True,
) -> Server:
    """Load a checkpoint (and its tokenizer), attach an adapter pool, wrap it in a Server.

    adapters: name -> PEFT directory or stored adapter of any kind (plain LoRA, LoRA-Switch,
    MoLA). The pool holds ``pool_slots`` expert slots (an adapter of E experts takes E),
    grown to the largest registered adapter; ``pool_max_experts`` / ``pool_top_k`` bound
    what it accepts (adapters given here raise them as needed). ``enable_lora``: a pool
    even without ``adapters``, for ``/v1/load_lora_adapter``. ``max_len``: the served
    context (default: the model's). ``warmup``: compile the step shapes before /health
    says ready.
    """
    ckpt = absolute(ckpt)
    model = load_model(ckpt, dtype=dtype, verify_checksums=verify_checksums)
    tok = load_tokenizer(ckpt)
    pool = None
    if adapters or enable_lora:
        hosts = [read_adapter(model.cfg, name, src, ckpt) for name, src in (adapters or {}).items()]
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
        detokenize=None if tok is None else tok.decode,
        warmup=warmup,
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


def show_server_log() -> None:
    """The server's own INFO lines (warm-up, background compilation, adapters loaded) on
    stderr beside uvicorn's (not through the root logger: absl, which orbax imports, puts
    its own handler there), unless the program gave the ``lsw_jax`` logger one itself."""
    logger = logging.getLogger("lsw_jax")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_server(
    server: Server,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_unauthenticated: bool = False,
) -> None:
    """Serve until interrupted (see ``check_exposure`` and ``uvicorn_server``)."""
    check_exposure(server, host, allow_unauthenticated=allow_unauthenticated)
    show_server_log()
    uvicorn_server(server, host=host, port=port).run()

"""One completions / chat request on its way through the engine: the parsed ``Job``
(``n`` choices for each prompt) and the ``Call`` that submits one engine request per
choice, receives the engine's updates on an asyncio queue, and answers as a whole JSON
response or as server-sent events (``openai_format`` lays out the pieces)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid
from typing import Any

import numpy as np

from lsw_jax.sampling import SamplingParams
from lsw_jax.serve.api_schema import ApiError, StreamUsage
from lsw_jax.serve.engine import Request, Update
from lsw_jax.serve.openai_format import (
    chat_logprobs,
    error_body,
    legacy_logprobs,
    prompt_entries,
    usage,
)

try:  # the HTTP stack is optional: hosts that only generate (the GPU machines) lack it
    from starlette.responses import JSONResponse, Response
except ImportError:  # Server() says what to install
    JSONResponse = Response = None


def error_response(e: ApiError) -> Response:
    body = error_body(e.status, e.message, e.param, e.code)
    # The client may still be sending a body we will not read: close, do not reuse.
    headers = {"connection": "close"} if e.status in (408, 413) else None
    # ASCII JSON: the message may quote the client's text, even invalid Unicode.
    return Response(
        json.dumps(body), status_code=e.status, headers=headers, media_type="application/json"
    )


@dataclasses.dataclass
class Job:
    """A parsed completions / chat request: ``n`` choices for each prompt."""

    chat: bool
    model: str
    adapter: str | None
    prompts: list[list[int]]
    prompt_texts: list[str | None]  # the prompts given as text (echo returns them as given)
    params: list[SamplingParams]  # per prompt
    n: int
    stream: bool
    usage: StreamUsage  # what usage the stream carries
    echo: bool


class Call:
    """One HTTP request's engine requests (``n`` per prompt; choice ``i * n + j`` is prompt
    i's j-th) and an asyncio queue the engine thread fills with their updates."""

    def __init__(self, server: Any, request: Any, job: Job):  # server: a server.Server
        self.server, self.request, self.job = server, request, job
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.reqs: list[Request] = []
        for i, (ids, params) in enumerate(zip(job.prompts, job.params, strict=True)):
            for j in range(job.n):
                sp = (
                    params
                    if j == 0
                    else dataclasses.replace(params, seed=_choice_seed(params.seed, j))
                )
                sink = functools.partial(self.sink, i * job.n + j)
                self.reqs.append(Request(ids, sp, adapter=job.adapter, sink=sink))

    def submit(self) -> None:
        """Submit every choice's request; on a refusal cancel the ones already in."""
        try:
            for req in self.reqs:
                self.server.engine.submit(req)
        except (OverflowError, ValueError) as e:
            self.cancel()
            if isinstance(e, OverflowError):
                raise ApiError(429, str(e)) from None
            raise ApiError(400, str(e), "prompt" if "prompt" in str(e) else None) from None

    def cancel(self) -> None:
        for req in self.reqs:
            if not req.finished:
                self.server.engine.cancel(req)

    def sink(self, index: int, req: Request, update: Update) -> None:  # engine thread
        if update.finished:
            self.server.metrics.finished(req)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, update))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    async def updates(self):
        """(choice index, Update) until every choice finished."""
        left = len(self.reqs)
        while left:
            index, update = await self.queue.get()
            left -= update.finished
            yield index, update

    def _prompt_text(self, i: int) -> str:
        if self.job.prompt_texts[i] is not None:
            return self.job.prompt_texts[i]
        tok = self.server.tokenizer
        return "" if tok is None else tok.decode(self.job.prompts[i], skip_special_tokens=False)

    def _finish_reason(self, req: Request) -> str:
        return "stop" if req.finish_reason == "cancelled" else req.finish_reason

    def _usage(self) -> dict:
        return usage([len(p) for p in self.job.prompts], [len(r.output) for r in self.reqs])

    def _logprobs(self, req: Request, entries: list, *, prompt: int | None, offset: int):
        """The choice's logprobs object for ``entries`` (plus the echoed prompt's)."""
        if req.params.logprobs is None:
            return None
        tt = self.server.token_text
        if self.job.chat:
            return chat_logprobs(entries, tt)
        if prompt is not None:
            entries = prompt_entries(self.job.prompts[prompt], req.prompt_logprobs) + entries
        return legacy_logprobs(entries, tt, offset)

    def _failed(self) -> Request | None:
        return next((r for r in self.reqs if r.finish_reason == "error"), None)

    # ---------------------------------------------------------------- streamed
    def _chunk(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        logprobs=None,
        role=False,
        *,
        tokens: int = 0,
    ):
        """Choice ``index``'s chunk; ``tokens``: its completion tokens so far (the usage of a
        continuous-usage stream)."""
        if self.job.chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            obj = "text_completion"
        so_far = None
        if self.job.usage.continuous:  # vLLM's: this choice's prompt and tokens so far
            so_far = usage([len(self.job.prompts[index // self.job.n])], [tokens])
        return self._event(obj, [choice], so_far)

    def _event(self, obj: str, choices: list, usage_: dict | None = None) -> str:
        payload = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.job.model,
            "choices": choices,
        }
        if self.job.usage.final:
            payload["usage"] = usage_
        return f"data: {json.dumps(payload)}\n\n"

    async def sse(self):
        done = False
        n = self.job.n
        sent = [0] * len(self.reqs)  # characters sent per choice (text_offset)
        tokens = [0] * len(self.reqs)  # completion tokens received per choice
        echoed = [not self.job.echo] * len(self.reqs)
        try:
            if self.job.chat:
                for k in range(len(self.reqs)):
                    yield self._chunk(k, None, None, role=True)
            async for k, update in self.updates():
                req = self.reqs[k]
                if not echoed[k]:  # the prompt first, once prefill has scored it
                    echoed[k] = True
                    if req.finish_reason != "error":
                        text = self._prompt_text(k // n)
                        lp = self._logprobs(req, [], prompt=k // n, offset=0)
                        sent[k] = len(text)
                        yield self._chunk(k, text, None, lp)
                tokens[k] += len(update.tokens)
                if update.finished:
                    if req.finish_reason == "error":
                        yield f"data: {json.dumps(error_body(500, req.error, None, None))}\n\n"
                    else:
                        yield self._chunk(k, None, self._finish_reason(req), tokens=tokens[k])
                    continue
                want_lp = req.params.logprobs is not None
                if not update.text and not want_lp:
                    continue
                lp = self._logprobs(req, update.logprobs, prompt=None, offset=sent[k])
                sent[k] += len(update.text)
                yield self._chunk(k, update.text, None, lp, tokens=tokens[k])
            if self.job.usage.final:
                obj = "chat.completion.chunk" if self.job.chat else "text_completion"
                yield self._event(obj, [], self._usage())
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.cancel()  # the client went away

    # ---------------------------------------------------------------- whole
    async def complete(self):
        async def collect():
            async for _ in self.updates():
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
            self.cancel()
            return Response(status_code=499)
        watch.cancel()
        failed = self._failed()
        if failed is not None:  # the engine step failed for it: the server's fault
            return error_response(ApiError(500, f"generation failed: {failed.error}"))
        return JSONResponse(
            {
                "id": self.id,
                "object": "chat.completion" if self.job.chat else "text_completion",
                "created": self.created,
                "model": self.job.model,
                "choices": [self._choice(k, req) for k, req in enumerate(self.reqs)],
                "usage": self._usage(),
            }
        )

    def _choice(self, k: int, req: Request) -> dict:
        choice: dict[str, Any] = {"index": k}
        if self.job.chat:
            choice["message"] = {"role": "assistant", "content": req.text}
            choice["logprobs"] = self._logprobs(req, req.logprobs, prompt=None, offset=0)
        else:
            prompt = self._prompt_text(k // self.job.n) if self.job.echo else ""
            choice["text"] = prompt + req.text
            echo = k // self.job.n if self.job.echo else None
            choice["logprobs"] = self._logprobs(req, req.logprobs, prompt=echo, offset=0)
        choice["finish_reason"] = self._finish_reason(req)
        choice["token_ids"] = list(req.output)
        return choice


def _choice_seed(seed: int, j: int) -> int:
    """Choice j's seed (j >= 1), derived from the request's: choices sample apart, and the
    same request gives the same choices."""
    a, b = np.random.SeedSequence([seed % (1 << 64), j]).generate_state(2, np.uint32).tolist()
    return (a << 31 | b >> 1) % (1 << 63)

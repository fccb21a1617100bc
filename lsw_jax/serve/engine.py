"""Continuous-batching engine: request slots over one KV cache, many LoRA adapters per batch.

Layout. ``slots`` rows share one ``KVCache`` of ``max_len`` slots per row with a per-row
``index [B]``; row b's token at position p lives in cache slot p (prompts are right-padded
at prefill, so position == slot). A step:

1. drains submitted / cancelled requests;
2. asks the ``Scheduler`` (dLoRA policy) for the mode, admissions and preemptions;
3. prefills admitted requests (prompt, or prompt + generated tokens when resuming after a
   preemption) into a fresh ``[R, P]`` cache, samples their first token and scatters the
   rows into the shared cache (one jitted call per (R, P) bucket, the cache donated);
4. runs one decode step over ALL rows (one jitted function over ``(graphdef, state)``,
   cache donated); rows not scheduled this step (free, or parked while another adapter
   runs merged) are masked: they write nothing valid and their cache is kept;
5. appends the tokens (with their log-probabilities when asked), advances each request's
   text (``StreamText``: stop strings are matched here, so a request stops at the step
   that completes one), streams an ``Update`` to each request's sink and retires finished
   requests (EOS / stop token / stop string / max_tokens / cancel) so their rows are free
   for the next step.

Faults. A step that raises fails exactly the requests it touched (an admission: that
request; a prefill: its chunk; a decode: the rows it ran), logs the error and keeps
serving: when the failed call had consumed the donated cache, the other rows are
preempted (they keep their tokens and are prefilled again). Cancelling a request that is
still waiting finishes it at once; a running one leaves at the next step.

Log-probabilities and logit adjustments are computed inside the same jitted steps that
sample (``lsw_jax.sampling``): a step compiles with them only when a row asks for them, so
they cost nothing otherwise.

Adapters. The model's linears carry the ``AdapterPool``'s banks (E = pool slots) and every
row is routed by ``RowRouter`` with its own adapter: a plain LoRA to its slot with gate 1, a
LoRA-Switch row by its adapter's router to its top-k experts (the same in every layer), a
MoLA row by its adapter's router of each layer; a row without an adapter gets gate 0.
Prefill and decode both run ``lsw_jax.decode.decode_step`` (the step ``generate`` runs):
``unmerged`` steps through the fused op over the pool's ``FusedBank``s (the Pallas kernel on a
GPU, its jnp reference elsewhere), rebuilt only when the pool changes. ``merged`` steps
serve the rows of ONE plain-LoRA adapter with ``lsw_jax.plans.MergedWeights`` switched to
that adapter's slot (the switch kernel; a no-op while the adapter stays), the linears
then plain products. Merged weights are a second copy of every adapted linear (plus the
stacked base they are re-merged from): 2 x 4 x 106 M bytes for SmolLM2-135M in fp32.

Shapes are fixed by ``slots``, ``max_len`` and the prefill buckets (prompt length: powers
of two from 16 to ``max_len``; rows: powers of two up to ``max_prefill_rows``), so after
``warm_up`` no step compiles (``steps.TRACE_COUNTS`` counts traces per jitted function);
the server's start compiles the common ones before it says ready and the rest while it
serves (``lsw_jax.serve.warmup``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsw_jax.adapters.lora import RouterTables
from lsw_jax.model.llama import KVCache
from lsw_jax.plans import MergedWeights, Plan, check_impl
from lsw_jax.sampling import (
    LogitAdjust,
    RowSampling,
    SamplingParams,
    logprob_bucket,
)
from lsw_jax.serve import steps, warmup
from lsw_jax.serve.scheduler import Scheduler, StepPlan
from lsw_jax.serve.steps import TokenLogprob
from lsw_jax.serve.text import StreamText

Array = jax.Array
log = logging.getLogger("lsw_jax.serve")


# ---------------------------------------------------------------------- requests


_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Update:
    """What one step gave a request: new token ids, the text they settle (may be "" while
    held back), their log-probabilities (when asked for), and whether it finished."""

    tokens: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finished: bool = False


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress.

    sink(req, update) is called from the engine thread after every step that gives the
    request tokens, and once with ``update.finished`` when it finishes (finish_reason set).
    """

    prompt: list[int]
    params: SamplingParams = SamplingParams()
    adapter: str | None = None
    sink: Callable[[Request, Update], None] | None = None
    id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # per output token
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (params.prompt_logprobs)
    text: str = ""  # the settled output text (with a tokenizer)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    arrival_step: int = -1
    first_token_at: float | None = None
    first_token_step: int | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finished_at: float | None = None
    preemptions: int = 0
    row: int | None = None
    adapter_slot: int | None = None
    stream: StreamText | None = None
    done_event: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def num_tokens_total(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_tokens_left(self) -> int:
        return self.params.max_tokens - len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return (*out, hi)


# ---------------------------------------------------------------------- engine


class Engine:
    """Serve ``model`` (optionally with an ``AdapterPool`` attached) to many requests.

    Use ``submit``/``cancel`` from any thread; drive with ``step()`` (tests, benchmarks)
    or ``start()`` a background thread (``warmup=True``: it first compiles the step shapes,
    and ``is_serving()`` turns true after that). ``policy``: "adaptive" | "merged" |
    "unmerged". ``detokenize``: ids -> text (the tokenizer's decode); needed for stop
    strings and gives each request its text. ``max_len`` defaults to the model's context.
    """

    def __init__(
        self,
        model: Any,
        *,
        pool: Any = None,
        slots: int = 4,
        max_len: int | None = None,
        max_prefill_rows: int = 4,
        policy: str = "adaptive",
        credit_limit: int = 32,
        max_waiting: int | None = None,
        eos_token_ids: tuple[int, ...] | None = None,
        impl: str = "auto",
        detokenize: Callable[[list[int]], str] | None = None,
        warmup: bool = False,
    ):
        cfg = model.cfg
        if slots < 1 or max_prefill_rows < 1:  # no row to run: /health ok, nothing answered
            raise ValueError(f"slots={slots} and max_prefill_rows={max_prefill_rows} must be >= 1")
        self.model, self.cfg, self.pool, self.slots = model, cfg, pool, slots
        self.max_len = int(max_len or cfg.max_position_embeddings)
        if self.max_len < 2:
            raise ValueError(f"max_len={self.max_len} must be >= 2 (a prompt token and one more)")
        if self.max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={self.max_len} exceeds the model's context {cfg.max_position_embeddings}"
            )
        self.prefill_lens = _pow2_buckets(min(16, self.max_len), self.max_len)
        self.prefill_rows = _pow2_buckets(1, max(1, min(max_prefill_rows, slots)))
        self.eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.impl = check_impl(impl)
        self.detokenize, self.warmup = detokenize, warmup
        self.scheduler = Scheduler(
            slots, policy=policy, credit_limit=credit_limit, mergeable=self._mergeable
        )
        self.max_waiting = max_waiting
        self._pool_version = -1
        self._unmerged: Any = None  # the pool's FusedBanks, per layer
        self._merged: MergedWeights | None = None
        self.cache = self._empty_cache()
        # Every row's logit adjustments (penalties, logit_bias, min_tokens) on the device,
        # written at admission, counted in each step: nothing [slots, V] per step from here.
        self.logit_state = LogitAdjust.identity(slots, cfg.vocab_size)
        self._no_adjust: dict[int, LogitAdjust] = {}  # prefill rows -> an identity chunk
        # (prompt bucket, rows) shapes a background thread is still compiling: multi-row
        # chunks of them run as single rows meanwhile (``warmup``).
        self.prefill_pending: set[tuple[int, int]] = set()
        self.rows: list[Request | None] = [None] * slots
        self._inbox: collections.deque = collections.deque()
        # Guards the inbox, the scheduler's queues and finishing: submit/cancel come from
        # other threads. Re-entrant (a Condition over an RLock).
        self._cond = threading.Condition()
        self.steps = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = False
        self.last_error: BaseException | None = None

    def _empty_cache(self) -> KVCache:
        # Every row carries a router state: pooled adapters may route on the prefix.
        cache = KVCache.create(
            self.cfg, self.slots, self.max_len, self.model.dtype, router_state=True
        )
        cache.index = jnp.zeros((self.slots,), jnp.int32)
        return cache

    # ------------------------------------------------------------------ public API
    def validate(self, req: Request) -> None:
        """Raise ValueError with a clear message if ``req`` can never be served."""
        n, mt = len(req.prompt), req.params.max_tokens
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_len:
            raise ValueError(
                f"the prompt has {n} tokens; this server's context is {self.max_len} tokens"
            )
        if n + mt > self.max_len:
            raise ValueError(
                f"max_tokens={mt} is too large: prompt ({n} tokens) + max_tokens must be "
                f"<= {self.max_len} (at most {self.max_len - n} here)"
            )
        vocab = self.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t, _ in req.params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if req.adapter and (self.pool is None or req.adapter not in self.pool.names()):
            raise ValueError(f"unknown adapter {req.adapter!r}")
        if req.params.stop and self.detokenize is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")

    def submit(self, req: Request) -> Request:
        self.validate(req)
        if self.detokenize is not None and req.stream is None:
            sp = req.params
            req.stream = StreamText(self.detokenize, sp.stop, min_tokens=sp.min_tokens)
        with self._cond:
            if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
                raise OverflowError(
                    f"the server is at capacity ({self.max_waiting} requests waiting)"
                )
            self._inbox.append(("add", req))
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Cancel ``req``: at once while it waits, at the next step when it runs."""
        with self._cond:
            if req.finished:
                return
            queued = next((i for i, (op, r) in enumerate(self._inbox) if r is req), None)
            if queued is not None and self._inbox[queued][0] == "add":
                del self._inbox[queued]
                self._finish(req, "cancelled")
            elif req.row is None and self.scheduler.remove(req):
                self._finish(req, "cancelled")
            else:  # in a row (or being admitted): the engine thread frees it
                self._inbox.append(("cancel", req))
                self._cond.notify_all()

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + sum(op == "add" for op, _ in self._inbox)

    def has_work(self) -> bool:
        return bool(self._inbox) or self.num_running > 0 or self.scheduler.num_waiting > 0

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"still busy after {max_steps} steps")

    # ------------------------------------------------------------------ background thread
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lsw-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def is_serving(self) -> bool:
        """Whether the background thread runs and has finished its warm-up (/health)."""
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def is_starting(self) -> bool:
        """Whether the background thread is still warming up."""
        return self._thread is not None and self._thread.is_alive() and not self._ready.is_set()

    def _loop(self) -> None:
        if self.warmup:
            t0 = time.perf_counter()
            try:
                self.warm_up(background=True)
                log.info("warm-up: common step shapes compiled in %.1f s", time.perf_counter() - t0)
            except Exception:  # serve anyway: the steps compile on first use instead
                log.exception("engine warm-up failed; shapes will compile on first use")
        self._ready.set()
        while True:
            with self._cond:
                while not self._stop and not self.has_work():
                    self._cond.wait(0.5)
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a fault outside any request's part of the step
                self._fail([r for r in self.rows if r is not None], e)

    # ------------------------------------------------------------------ warm-up
    def warm_up(self, background: bool = False) -> None:
        """Compile the steps requests will use, so that no new prompt length (or a first
        merged step) stalls running streams later: the decode step of every mode the
        policy may choose and the prefill of each (prompt, rows) bucket (``warmup``).
        ``background``: only the common shapes now, the rest on a thread after this
        returns (the server's start); otherwise all of them now."""
        if not background:
            warmup.warm_up(self, warmup.all_shapes(self))
            return
        warmup.warm_up(self, warmup.ready_shapes(self))
        rest = warmup.background_shapes(self)
        self.prefill_pending = set(rest)
        threading.Thread(
            target=warmup.compile_in_background, args=(self, rest), name="lsw-compile", daemon=True
        ).start()

    @property
    def stopping(self) -> bool:
        return self._stop

    # ------------------------------------------------------------------ one step
    def step(self) -> StepPlan:
        self._drain_inbox()
        with self._cond:
            running = [r for r in self.rows if r is not None]
            plan = self.scheduler.schedule(running, self.slots - len(running))
            for req in plan.preempt:
                self._preempt(req)
        admitted = self._admit(plan.admit)
        plan.run = [r for r in plan.run if r.row is not None and not r.finished]
        plan.run += [r for r in admitted if r not in plan.run and not r.finished]
        seconds = None
        if plan.run:
            t0 = time.perf_counter()
            try:
                self._decode(plan)
            except Exception as e:
                self._fail(plan.run, e)
            seconds = time.perf_counter() - t0
        self.scheduler.observe(plan, seconds, [r for r in self.rows if r is not None])
        self.steps += 1
        return plan

    def _drain_inbox(self) -> None:
        with self._cond:
            ops = list(self._inbox)
            self._inbox.clear()
            for op, req in ops:
                if op == "add":
                    req.arrival_step = self.steps
                    self.scheduler.add(req)
                elif not req.finished:
                    if req.row is None:
                        self.scheduler.remove(req)
                    self._finish(req, "cancelled")

    def _fail(self, reqs: list[Request], error: BaseException) -> None:
        """Fail ``reqs`` (the requests a faulty call touched), log it, keep serving."""
        self.last_error = error
        self.stats["errors"] += 1
        log.error("engine step failed for %d request(s): %r", len(reqs), error, exc_info=error)
        for req in reqs:
            if not req.finished:
                req.error = f"{type(error).__name__}: {error}"
                self._finish(req, "error")
        if any(x.is_deleted() for x in jax.tree.leaves((self.cache, self.logit_state))):
            # The failed call consumed the donated cache: the other rows lost their KV.
            # They return to their queues with their tokens and are prefilled again.
            with self._cond:
                for req in [r for r in self.rows if r is not None]:
                    self._preempt(req)
            self.cache = self._empty_cache()
            self.logit_state = LogitAdjust.identity(self.slots, self.cfg.vocab_size)

    def preempt(self, req: Request) -> None:
        """Return a running request to the front of its queue (it keeps its tokens)."""
        with self._cond:
            self._preempt(req)

    def _preempt(self, req: Request) -> None:
        self._free_row(req)
        req.preemptions += 1
        self.stats["preemptions"] += 1
        self.scheduler.add(req, front=True)

    def _free_row(self, req: Request) -> None:
        if req.row is not None:
            self.rows[req.row] = None
            req.row = None
        if req.adapter_slot is not None:
            self.pool.release(req.adapter)
            req.adapter_slot = None

    def _send(self, req: Request, update: Update) -> None:
        if req.sink is None:
            return
        try:
            req.sink(req, update)
        except Exception:  # a broken consumer must not take the step (or others) down
            log.exception("the sink of %s failed", req.id)

    def _finish(self, req: Request, reason: str) -> None:
        with self._cond:
            if req.finished:
                return
            self._free_row(req)
            req.finish_reason = reason
            req.finished_at = time.perf_counter()
            self.stats[f"finished_{reason}"] += 1
        self._send(req, Update([], finished=True))
        req.done_event.set()

    def _sync_state(self) -> None:
        """Re-split the model and rebuild the plans' weights after the pool changed."""
        version = 0 if self.pool is None else self.pool.version
        if version == self._pool_version:
            return
        self.graphdef, self.state = nnx.split(self.model)
        if self.pool is not None:
            self._unmerged = steps.prepare_banks(self.graphdef, self.state, self.impl)
        if self._merged is not None:  # re-stacked from the new banks on the next merged step
            self._merged = None
            self.scheduler.merged_adapter = None
        self._pool_version = version

    @property
    def _tables(self) -> RouterTables | None:
        return None if self.pool is None else self.pool.tables

    @property
    def _k_max(self) -> int:
        return 1 if self.pool is None else self.pool.max_top_k

    def _mergeable(self, adapter: str) -> bool:
        """Merged mode serves one shared selection: the base model or a plain LoRA."""
        return not adapter or self.pool.kind_of(adapter) == "lora"

    # ------------------------------------------------------------------ prefill
    def _admit(self, reqs: list[Request]) -> list[Request]:
        placed = []
        for req in reqs:
            if req.finished:  # cancelled between scheduling and admission
                continue
            try:
                if req.adapter:
                    slot = self.pool.acquire(req.adapter)
                    if slot is None:  # every pool slot pinned: wait for one to free up
                        with self._cond:
                            self.scheduler.add(req, front=True)
                        continue
                    req.adapter_slot = slot
            except Exception as e:  # e.g. the adapter was unloaded while it waited
                self._fail([req], e)
                continue
            req.row = self.rows.index(None)
            self.rows[req.row] = req
            placed.append(req)
        self._sync_state()
        by_len: dict[int, list[Request]] = collections.defaultdict(list)
        for req in placed:
            n = req.num_tokens_total
            by_len[next(b for b in self.prefill_lens if b >= n)].append(req)
        for p, group in sorted(by_len.items()):
            while group:
                r = self._chunk_rows(p, len(group))
                chunk, group = group[:r], group[r:]
                try:
                    self._prefill(chunk, p, r)
                except Exception as e:
                    self._fail(chunk, e)
        return placed

    def _chunk_rows(self, p: int, n: int) -> int:
        """Rows of the next prefill chunk of ``n`` requests in bucket ``p``: the smallest
        row bucket that holds them (else the largest), skipping multi-row shapes that are
        still compiling in the background."""
        usable = [r for r in self.prefill_rows if r == 1 or (p, r) not in self.prefill_pending]
        return next((r for r in usable if r >= n), usable[-1])

    def _prefill_args(self, chunk: list[Request], p: int, r: int) -> tuple:
        ids = np.zeros((r, p), np.int32)
        lens = np.ones((r,), np.int32)
        rows = np.full((r,), self.slots, np.int32)  # padding rows: out of range, dropped
        for i, req in enumerate(chunk):
            seq = req.prompt + req.output
            ids[i, : len(seq)], lens[i], rows[i] = seq, len(seq), req.row
        return (
            self.graphdef,
            self.state,
            self._unmerged,
            self._tables,
            self.cache,
            self.logit_state,
            jnp.asarray(ids),
            jnp.asarray(lens),
            jnp.asarray(rows),
            self._adapter_slots(chunk, r),
            self._sampling(chunk, r, self._chunk_adjust(chunk, r)),
        )

    def _prefill(self, chunk: list[Request], p: int, r: int) -> None:
        n_lp = logprob_bucket(self._max_logprobs(chunk))
        # Prompt log-probabilities once per request (not again when resumed).
        want_prompt = [req.params.prompt_logprobs and req.prompt_logprobs is None for req in chunk]
        tok, lp, prompt_lp, self.logit_state, self.cache = steps.prefill_insert(
            *self._prefill_args(chunk, p, r),
            k_max=self._k_max,
            num_logprobs=n_lp,
            prompt_logprobs=any(want_prompt),
        )
        self.stats["prefills"] += 1
        lp, prompt_lp = steps.host_logprobs(lp), steps.host_logprobs(prompt_lp)
        for i, req in enumerate(chunk):
            if want_prompt[i]:
                n = req.params.logprobs or 0
                req.prompt_logprobs = steps.logprob_entries(prompt_lp, i, req.prompt[1:], n)
        self._emit(chunk, np.asarray(tok)[: len(chunk)], lp)

    def _max_logprobs(self, reqs: list[Request | None]) -> int | None:
        wanted = [
            r.params.logprobs for r in reqs if r is not None and r.params.logprobs is not None
        ]
        return max(wanted) if wanted else None

    def _adapter_slots(self, reqs: list[Request | None], n: int) -> Array:
        """[n] base slot of each row's adapter (-1: no adapter, or no request)."""
        slots = np.full((n,), -1, np.int32)
        for i, req in enumerate(reqs):
            if req is not None and req.adapter_slot is not None:
                slots[i] = req.adapter_slot
        return jnp.asarray(slots)

    def _chunk_adjust(self, chunk: list[Request], r: int) -> LogitAdjust:
        """The logit adjustments of a prefill chunk's ``r`` rows (built on the host once
        per admission; a shared identity when no row asks)."""
        if any(req.params.adjusts_logits for req in chunk):
            rows = [(req.params, req.prompt, req.output) for req in chunk]
            return LogitAdjust.build(
                rows + [None] * (r - len(chunk)), self.cfg.vocab_size, self.eos
            )
        if r not in self._no_adjust:
            self._no_adjust[r] = LogitAdjust.identity(r, self.cfg.vocab_size)
        return self._no_adjust[r]

    def _sampling(
        self, reqs: list[Request | None], n: int, adjust: LogitAdjust | None = None
    ) -> RowSampling:
        reqs = list(reqs) + [None] * (n - len(reqs))
        return RowSampling.from_params(
            [None if r is None else r.params for r in reqs],
            [0 if r is None else len(r.output) for r in reqs],
            adjust,
        )

    # ------------------------------------------------------------------ decode
    def _switch_merged(self, adapter: str) -> MergedWeights | None:
        """Merged weights switched to ``adapter`` (its slot, gate 1); None for the base
        model ("": the plain weights, nothing merged)."""
        if not adapter:
            return None
        if self._merged is None:
            self._merged = steps.create_merged(self.graphdef, self.state, self._unmerged)
        if adapter != self.scheduler.merged_adapter:
            slot = self.pool.slot_of(adapter)
            selection = (jnp.asarray([slot], jnp.int32), jnp.ones((1,), jnp.float32))
            t0 = time.perf_counter()
            self._merged = jax.block_until_ready(steps.switch_merged(self._merged, selection))
            self.scheduler.timing.observe_merge(time.perf_counter() - t0)
            self.stats["merges"] += 1
        self.scheduler.merged_adapter = adapter
        return self._merged

    def _plan_weights(self, mode: str, adapter: str | None) -> tuple[Plan, Any]:
        """The decode plan and its weights for a step the scheduler gave ``mode`` (merged:
        ``adapter``'s weights, "" or None the base's): the one choice that decode and
        warm-up share, so warm-up compiles exactly what serving runs."""
        if self.pool is None:
            return Plan.DENSE, None  # no adapters: merged or not, plain products
        if mode == "merged":
            return Plan.MERGED, self._switch_merged(adapter or "")
        return Plan.UNMERGED, self._unmerged

    def _decode(self, plan: StepPlan) -> None:
        self._sync_state()
        run = set(id(r) for r in plan.run)
        reqs: list[Request | None] = [
            r if r is not None and id(r) in run else None for r in self.rows
        ]
        positions = np.zeros((self.slots,), np.int32)
        for i, req in enumerate(self.rows):
            if req is not None:
                positions[i] = req.num_tokens_total - 1  # slot of the last (not yet fed) token
        nxt, lp = self._run_decode(reqs, positions, *self._plan_weights(plan.mode, plan.adapter))
        self.stats[f"steps_{plan.mode}"] += 1
        live = [r for r in reqs if r is not None]
        self._emit(live, nxt[[r.row for r in live]], lp, [r.row for r in live])

    def _run_decode(
        self, reqs: list[Request | None], positions: np.ndarray, mode: Plan, weights: Any
    ) -> tuple[np.ndarray, Any]:
        """One decode step over all rows (``reqs[b]``: the request row b runs, or None)."""
        active = np.asarray([r is not None for r in reqs])
        tokens = np.asarray([0 if r is None else r.output[-1] for r in reqs], np.int32)
        nxt, lp, self.logit_state, self.cache = steps.decode_rows(
            self.graphdef,
            self.state,
            weights,
            self._tables,
            self.cache,
            self.logit_state,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            jnp.asarray(active),
            self._adapter_slots(reqs, self.slots),
            self._sampling(reqs, self.slots),
            plan=mode,
            k_max=self._k_max,
            num_logprobs=logprob_bucket(self._max_logprobs(reqs)),
        )
        return np.asarray(nxt), steps.host_logprobs(lp)

    def _emit(
        self, reqs: list[Request], toks: np.ndarray, lp: Any, lp_rows: list[int] | None = None
    ) -> None:
        """Append each request's new token, advance its text, send the update and retire
        it when finished. ``lp``: the step's TokenLogprobs (row ``lp_rows[i]`` for reqs[i];
        default i) or None."""
        now = time.perf_counter()
        for i, (req, t) in enumerate(zip(reqs, toks, strict=True)):
            sp, t = req.params, int(t)
            if req.finished:
                continue
            if sp.max_tokens == 0:  # scoring the prompt only (echo): the sample is dropped
                self._finish(req, "length")
                continue
            req.output.append(t)
            req.token_times.append(now)
            if req.first_token_at is None:
                req.first_token_at, req.first_token_step = now, self.steps
            self.stats["tokens"] += 1
            entries = []
            if lp is not None and sp.logprobs is not None:
                row = i if lp_rows is None else lp_rows[i]
                entries = steps.logprob_entries(lp, row, [t], sp.logprobs)
                req.logprobs += entries
            reason = None
            if t in sp.stop_token_ids or (not sp.ignore_eos and t in self.eos):
                reason = "stop"
            elif len(req.output) >= sp.max_tokens or req.num_tokens_total >= self.max_len:
                reason = "length"
            delta = ""
            if req.stream is not None:
                delta, hit = req.stream.push([t], final=reason is not None)
                req.text += delta
                reason = "stop" if hit else reason
            self._send(req, Update([t], delta, entries))
            if reason is not None:
                self._finish(req, reason)

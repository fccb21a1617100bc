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
5. appends the tokens, streams them to each request's sink and retires finished requests
   (EOS / stop token / max_tokens / cancel) so their rows are free for the next step.

Adapters. The model's linears carry the ``AdapterPool``'s bank (E = pool slots); a row is
routed to its adapter's slot with gate 1 (gate 0 without an adapter). ``unmerged`` steps and
every prefill use ``plan="unmerged"`` (the fused Pallas kernel on a GPU, its jnp reference
on a CPU). ``merged`` steps run ``plan="merged"`` (linears skip LoRA) with weights
``W + b[s] @ a[s]`` for the one adapter s of the batch, computed by
``pallas_kernels.switch_merge.merge_from_base`` per linear (``L = 1``, all linears in one
jitted call) and kept as a SECOND copy of every adapted linear's weight (memory: the size of
those linears, e.g. 4 * 106 M bytes = 425 MB for SmolLM2-135M with all 7 linears in fp32),
recomputed only when the merged adapter changes or the pool reloads that slot.

Shapes are fixed by ``slots``, ``max_len`` and the prefill buckets (prompt length: powers
of two from 16 to ``max_len``; rows: powers of two up to ``max_prefill_rows``), so after
warm-up no step compiles; ``trace_counts`` counts traces per jitted function.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsw_jax.adapters.lora import Routing
from lsw_jax.model.llama import KVCache
from lsw_jax.serve.scheduler import Scheduler, StepPlan

Array = jax.Array
TRACE_COUNTS: collections.Counter[str] = collections.Counter()  # jitted functions' traces


# ---------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature} must be in [0, 100]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress.

    sink(req, new_tokens, finished) is called from the engine thread after every step
    that gives the request tokens, and once when it finishes (finish_reason set).
    """

    prompt: list[int]
    params: SamplingParams = SamplingParams()
    adapter: str | None = None
    sink: Callable[[Request, list[int], bool], None] | None = None
    id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    arrival_step: int = -1
    first_token_at: float | None = None
    first_token_step: int | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finished_at: float | None = None
    preemptions: int = 0
    row: int | None = None
    adapter_slot: int | None = None
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


# ---------------------------------------------------------------------- jitted pieces


def sample_rows(
    logits: Array,  # [B, V] float32
    seeds: Array,  # [B] uint32
    counters: Array,  # [B] int32: tokens generated so far by the row's request
    temperature: Array,  # [B]
    top_k: Array,  # [B] int32, 0 = off
    top_p: Array,  # [B]
) -> Array:
    """Next token per row: argmax where ``temperature == 0``, else temperature, top-k and
    top-p sampling with the key ``fold_in(key(seed), counter)`` (independent of the batch
    a request shares, so its samples are reproducible)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        v = logits.shape[-1]
        x = logits / jnp.maximum(temperature, 1e-6)[:, None]
        desc = -jnp.sort(-x, axis=-1)
        kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
        x = jnp.where((top_k[:, None] > 0) & (x < kth), -jnp.inf, x)
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cut_idx = jnp.sum(before < top_p[:, None], axis=-1, keepdims=True) - 1
        x = jnp.where(x < jnp.take_along_axis(desc, cut_idx, axis=-1), -jnp.inf, x)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)


def _with_weights(model: Any, weights: dict[str, Array] | None) -> Any:
    """Point the model's adapted linears at ``weights`` ("layer.module" -> [out, in])."""
    if weights:
        for key, w in weights.items():
            i, name = key.split(".")
            layer = model.layers[int(i)]
            lin = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            lin.weight.set_value(w)
    return model


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("cache",))
def _decode_step(
    graphdef, state, weights, cache, tokens, positions, active, expert, gate, samp, *, plan
):
    """One token for every row: tokens/positions/active/expert/gate [B]; samp = (seeds,
    counters, temperature, top_k, top_p), each [B]. Returns (next tokens [B], cache)."""
    TRACE_COUNTS[f"decode_{plan}"] += 1
    model = _with_weights(nnx.merge(graphdef, state), weights)
    cache = dataclasses.replace(cache, index=positions)  # row b writes its slot positions[b]
    routing = Routing(expert[:, None, None], gate[:, None, None])
    out = model.forward(
        tokens[:, None],
        attention_mask=active[:, None],
        positions=positions[:, None],
        cache=cache,
        routing=routing,
        plan=plan,
    )
    return sample_rows(out.logits[:, 0], *samp), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("cache",))
def _prefill_insert(graphdef, state, cache, ids, lens, rows, expert, gate, samp, *, plan):
    """Prefill ``ids [R, P]`` (right-padded, ``lens [R]``) into a fresh cache, sample each
    row's next token and copy the rows into ``cache`` rows ``rows [R]`` (rows >= B: padding
    rows, dropped). Returns (tokens [R], cache)."""
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    r, p = ids.shape
    mask = jnp.arange(p)[None, :] < lens[:, None]
    small = KVCache.create(model.cfg, r, p, cache.k[0].dtype)
    routing = Routing(
        jnp.broadcast_to(expert[:, None, None], (r, p, 1)),
        jnp.broadcast_to(gate[:, None, None], (r, p, 1)),
    )
    out = model.forward(
        ids,
        attention_mask=mask,
        positions=jnp.broadcast_to(jnp.arange(p)[None], (r, p)),
        cache=small,
        routing=routing,
        plan=plan,
    )
    last = jnp.take_along_axis(out.logits, (lens - 1)[:, None, None], axis=1)[:, 0]
    tok = sample_rows(last, *samp)
    s = cache.length
    k = [
        c.at[rows, :p].set(x.astype(c.dtype), mode="drop")
        for c, x in zip(cache.k, out.cache.k, strict=True)
    ]
    v = [
        c.at[rows, :p].set(x.astype(c.dtype), mode="drop")
        for c, x in zip(cache.v, out.cache.v, strict=True)
    ]
    valid = cache.valid.at[rows].set(jnp.pad(mask, ((0, 0), (0, s - p))), mode="drop")
    return tok, KVCache(k=k, v=v, valid=valid, index=cache.index)


@jax.jit
def _merge_weights(base: dict, a: dict, b: dict, slot: Array) -> dict:
    """W_eff = W + b[slot] @ a[slot] for every adapted linear (bank scale is 1)."""
    from pallas_kernels.switch_merge import merge_from_base

    TRACE_COUNTS["merge"] += 1
    e, g = slot[None], jnp.ones((1,), jnp.float32)
    return {k: merge_from_base(w[None], a[k][None], b[k][None], e, g)[0] for k, w in base.items()}


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
    or ``start()`` a background thread. ``policy``: "adaptive" | "merged" | "unmerged".
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
        unmerged_plan: str = "unmerged",
    ):
        cfg = model.cfg
        self.model, self.cfg, self.pool, self.slots = model, cfg, pool, slots
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 2048))
        if self.max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={self.max_len} exceeds the model's context {cfg.max_position_embeddings}"
            )
        self.prefill_lens = _pow2_buckets(min(16, self.max_len), self.max_len)
        self.prefill_rows = _pow2_buckets(1, max(1, min(max_prefill_rows, slots)))
        self.eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.unmerged_plan = unmerged_plan
        self.scheduler = Scheduler(slots, policy=policy, credit_limit=credit_limit)
        self.max_waiting = max_waiting
        self.graphdef, self.state = nnx.split(model)
        self._pool_version = -1 if pool is None else pool.version
        self.cache = KVCache.create(cfg, slots, self.max_len, model.dtype)
        self.cache.index = jnp.zeros((slots,), jnp.int32)
        self.rows: list[Request | None] = [None] * slots
        self._inbox: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._merged: tuple[tuple, dict] | None = None  # ((adapter, slot, generation), weights)
        self.steps = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.last_error: BaseException | None = None

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
        if any(not 0 <= t < self.cfg.vocab_size for t in req.prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if req.adapter:
            if self.pool is None or req.adapter not in self.pool.names():
                raise ValueError(f"unknown adapter {req.adapter!r}")

    def submit(self, req: Request) -> Request:
        self.validate(req)
        with self._cond:
            if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
                raise OverflowError(
                    f"the server is at capacity ({self.max_waiting} requests waiting)"
                )
            self._inbox.append(("add", req))
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        with self._cond:
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

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.has_work():
                    self._cond.wait(0.5)
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # keep serving: fail the requests in flight, not the server
                self.last_error = e
                self.stats["errors"] += 1
                for r in [r for r in self.rows if r is not None]:
                    self._finish(r, "error")
                self.cache = KVCache.create(self.cfg, self.slots, self.max_len, self.model.dtype)
                self.cache.index = jnp.zeros((self.slots,), jnp.int32)

    # ------------------------------------------------------------------ one step
    def step(self) -> StepPlan:
        self._drain_inbox()
        running = [r for r in self.rows if r is not None]
        free = self.slots - len(running)
        plan = self.scheduler.schedule(running, free)
        for req in plan.preempt:
            self._preempt(req)
        admitted = self._admit(plan.admit)
        plan.run = [r for r in plan.run if r.row is not None and not r.finished]
        plan.run += [r for r in admitted if r not in plan.run and not r.finished]
        seconds = None
        if plan.run:
            t0 = time.perf_counter()
            self._decode(plan)
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

    def _finish(self, req: Request, reason: str) -> None:
        self._free_row(req)
        req.finish_reason = reason
        req.finished_at = time.perf_counter()
        self.stats[f"finished_{reason}"] += 1
        if req.sink is not None:
            req.sink(req, [], True)
        req.done_event.set()

    def _sync_state(self) -> None:
        if self.pool is not None and self.pool.version != self._pool_version:
            self.graphdef, self.state = nnx.split(self.model)
            self._pool_version = self.pool.version

    # ------------------------------------------------------------------ prefill
    def _admit(self, reqs: list[Request]) -> list[Request]:
        placed = []
        for req in reqs:
            if req.adapter:
                slot = self.pool.acquire(req.adapter)
                if slot is None:  # every pool slot pinned: wait for one to free up
                    self.scheduler.add(req, front=True)
                    continue
                req.adapter_slot = slot
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
                r = next((b for b in self.prefill_rows if b >= len(group)), self.prefill_rows[-1])
                chunk, group = group[:r], group[r:]
                self._prefill(chunk, p, r)
        return placed

    def _prefill(self, chunk: list[Request], p: int, r: int) -> None:
        ids = np.zeros((r, p), np.int32)
        lens = np.ones((r,), np.int32)
        rows = np.full((r,), self.slots, np.int32)  # padding rows: out of range, dropped
        for i, req in enumerate(chunk):
            seq = req.prompt + req.output
            ids[i, : len(seq)], lens[i], rows[i] = seq, len(seq), req.row
        expert, gate = self._routing(chunk, r)
        tok, self.cache = _prefill_insert(
            self.graphdef,
            self.state,
            self.cache,
            jnp.asarray(ids),
            jnp.asarray(lens),
            jnp.asarray(rows),
            expert,
            gate,
            self._sampling(chunk, r),
            plan=self.unmerged_plan,
        )
        self.stats["prefills"] += 1
        self._emit(chunk, np.asarray(tok)[: len(chunk)])

    def _routing(self, reqs: list[Request | None], n: int) -> tuple[Array, Array]:
        expert = np.zeros((n,), np.int32)
        gate = np.zeros((n,), np.float32)
        for i, req in enumerate(reqs):
            if req is not None and req.adapter_slot is not None:
                expert[i], gate[i] = req.adapter_slot, 1.0
        return jnp.asarray(expert), jnp.asarray(gate)

    def _sampling(self, reqs: list[Request | None], n: int) -> tuple[Array, ...]:
        seeds = np.zeros((n,), np.uint32)
        counters = np.zeros((n,), np.int32)
        temp = np.zeros((n,), np.float32)
        top_k = np.zeros((n,), np.int32)
        top_p = np.ones((n,), np.float32)
        for i, req in enumerate(reqs):
            if req is None:
                continue
            sp = req.params
            seeds[i], counters[i] = sp.seed % 2**32, len(req.output)
            temp[i], top_k[i], top_p[i] = sp.temperature, sp.top_k, sp.top_p
        return tuple(jnp.asarray(x) for x in (seeds, counters, temp, top_k, top_p))

    # ------------------------------------------------------------------ decode
    def _merged_weights(self, adapter: str) -> dict[str, Array] | None:
        """The merged copy of the adapted linears for ``adapter`` ("" = base: no copy)."""
        if not adapter or self.pool is None:
            return None
        slot = self.pool.slot_of(adapter)
        ident = (adapter, slot, self.pool.generation[slot])
        if self._merged is not None and self._merged[0] == ident:
            return self._merged[1]
        self._merged = None  # free the old copy before making the new one
        t0 = time.perf_counter()
        lins = self.pool._linears
        weights = _merge_weights(
            {k: lin.weight[...] for k, lin in lins.items()},
            {k: lin.lora.a[...] for k, lin in lins.items()},
            {k: lin.lora.b[...] for k, lin in lins.items()},
            jnp.int32(slot),
        )
        jax.block_until_ready(weights)
        self.scheduler.timing.observe_merge(time.perf_counter() - t0)
        self.stats["merges"] += 1
        self._merged = (ident, weights)
        return weights

    def _decode(self, plan: StepPlan) -> None:
        self._sync_state()
        b = self.slots
        run = set(id(r) for r in plan.run)
        active = np.zeros((b,), bool)
        tokens = np.zeros((b,), np.int32)
        positions = np.zeros((b,), np.int32)
        reqs: list[Request | None] = [None] * b
        for i, req in enumerate(self.rows):
            if req is None:
                continue
            positions[i] = req.num_tokens_total - 1  # slot of the last (not yet fed) token
            if id(req) in run:
                active[i], tokens[i], reqs[i] = True, req.output[-1], req
        if plan.mode == "merged":
            weights, mode = self._merged_weights(plan.adapter), "merged"
            self.scheduler.merged_adapter = plan.adapter
        else:
            weights, mode = None, self.unmerged_plan
        expert, gate = self._routing(reqs, b)
        nxt, self.cache = _decode_step(
            self.graphdef,
            self.state,
            weights,
            self.cache,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            jnp.asarray(active),
            expert,
            gate,
            self._sampling(reqs, b),
            plan=mode,
        )
        nxt = np.asarray(nxt)
        self.stats[f"steps_{plan.mode}"] += 1
        live = [r for r in reqs if r is not None]
        self._emit(live, nxt[[r.row for r in live]])

    def _emit(self, reqs: list[Request], toks: np.ndarray) -> None:
        now = time.perf_counter()
        for req, t in zip(reqs, toks, strict=True):
            t = int(t)
            req.output.append(t)
            req.token_times.append(now)
            if req.first_token_at is None:
                req.first_token_at, req.first_token_step = now, self.steps
            self.stats["tokens"] += 1
            if req.sink is not None:
                req.sink(req, [t], False)
            sp = req.params
            if t in sp.stop_token_ids or (not sp.ignore_eos and t in self.eos):
                self._finish(req, "stop")
            elif len(req.output) >= sp.max_tokens or req.num_tokens_total >= self.max_len:
                self._finish(req, "length")

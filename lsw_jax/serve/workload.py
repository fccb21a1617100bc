"""Synthetic multi-adapter workloads and an in-process replay that measures serving latency.

A trace: Poisson arrivals at ``rate`` requests/s; each request names adapter ``k`` of
``num_adapters`` with Zipf popularity ``p(k) ~ 1 / (k + 1) ** zipf_s`` (``base_fraction`` of
requests use no adapter); prompt and output lengths uniform in their ranges. ``replay``
submits each request at its arrival time (wall clock) to an ``Engine`` it steps in the
calling thread, and ``summarize`` reports throughput, time to first token (TTFT), time per
output token after the first (TPOT) and end-to-end latency percentiles.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from lsw_jax.serve.engine import Engine, Request, SamplingParams


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    rate: float = 4.0  # mean arrivals per second (Poisson)
    num_adapters: int = 8
    zipf_s: float = 1.5  # popularity exponent; larger = more skewed
    base_fraction: float = 0.0  # requests without an adapter
    prompt_len: tuple[int, int] = (8, 48)  # inclusive range
    output_len: tuple[int, int] = (16, 48)
    seed: int = 0

    def adapter_probs(self) -> np.ndarray:
        w = 1.0 / np.arange(1, self.num_adapters + 1) ** self.zipf_s
        return w / w.sum()


@dataclasses.dataclass(frozen=True)
class TraceItem:
    arrival: float  # seconds after the start
    adapter: str | None
    prompt: tuple[int, ...]
    max_tokens: int


def make_trace(spec: WorkloadSpec, vocab_size: int, adapters: list[str]) -> list[TraceItem]:
    if len(adapters) < spec.num_adapters:
        raise ValueError(f"{spec.num_adapters=} but only {len(adapters)} adapter names given")
    rng = np.random.default_rng(spec.seed)
    gaps = rng.exponential(1.0 / spec.rate, spec.num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    picks = rng.choice(spec.num_adapters, spec.num_requests, p=spec.adapter_probs())
    base = rng.random(spec.num_requests) < spec.base_fraction
    out = []
    for i in range(spec.num_requests):
        n = int(rng.integers(spec.prompt_len[0], spec.prompt_len[1] + 1))
        prompt = tuple(int(t) for t in rng.integers(0, vocab_size, n))
        m = int(rng.integers(spec.output_len[0], spec.output_len[1] + 1))
        adapter = None if base[i] else adapters[int(picks[i])]
        out.append(TraceItem(float(arrivals[i]), adapter, prompt, m))
    return out


def replay(
    engine: Engine, trace: list[TraceItem], *, timeout: float = 3600.0
) -> tuple[list[Request], float]:
    """Submit each trace item at its arrival time and step the engine until all finish.

    Returns (requests, wall seconds). Greedy decoding, EOS ignored: every request makes
    exactly ``max_tokens`` tokens, so policies are compared on identical work.
    """
    reqs: list[Request] = []
    start = time.perf_counter()
    i = 0
    while i < len(trace) or engine.has_work():
        now = time.perf_counter() - start
        if now > timeout:
            raise TimeoutError(f"replay still busy after {timeout} s")
        while i < len(trace) and trace[i].arrival <= now:
            it = trace[i]
            req = Request(
                list(it.prompt),
                SamplingParams(max_tokens=it.max_tokens, ignore_eos=True),
                adapter=it.adapter,
            )
            req.arrival = start + it.arrival  # latency counts from the scheduled arrival
            reqs.append(engine.submit(req))
            i += 1
        if engine.has_work():
            engine.step()
        elif i < len(trace):
            time.sleep(max(0.0, min(0.05, trace[i].arrival - now)))
    return reqs, time.perf_counter() - start


def _pct(x: list[float]) -> dict[str, float]:
    if not x:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    a = np.asarray(x)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def summarize(reqs: list[Request], wall: float, engine: Engine | None = None) -> dict[str, Any]:
    tokens = sum(len(r.output) for r in reqs)
    ttft = [r.first_token_at - r.arrival for r in reqs if r.first_token_at is not None]
    tpot = [
        (r.finished_at - r.first_token_at) / (len(r.output) - 1)
        for r in reqs
        if r.finished_at is not None and r.first_token_at is not None and len(r.output) > 1
    ]
    e2e = [r.finished_at - r.arrival for r in reqs if r.finished_at is not None]
    out: dict[str, Any] = {
        "requests": len(reqs),
        "output_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "throughput_req_s": len(reqs) / wall,
        "ttft_s": _pct(ttft),
        "tpot_s": _pct(tpot),
        "e2e_s": _pct(e2e),
    }
    if engine is not None:
        st = engine.stats
        out["steps"] = {"merged": st["steps_merged"], "unmerged": st["steps_unmerged"]}
        out["merges"] = st["merges"]
        out["preemptions"] = st["preemptions"]
        out["merge_threshold_rows"] = engine.scheduler.merge_threshold(engine.slots)
    return out

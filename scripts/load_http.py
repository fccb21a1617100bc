"""A small HTTP load generator for an OpenAI-compatible server (``lsw-jax serve`` or any
other), through the ``openai`` SDK's async client: what guidellm / locust measure, without
their dependencies.

Requests arrive as a Poisson process at ``--rate`` per second (or all at once with
``--rate 0``), at most ``--concurrency`` in flight; each streams ``--max-tokens`` tokens
(EOS ignored) from a prompt of ``--prompt-words`` random words, round-robin over
``--models`` (the base model id and/or adapter names). Reports throughput, TTFT and
time-per-output-token percentiles and every error, as JSON on stdout.

    lsw-jax serve --ckpt CKPT --adapters a=... &
    python scripts/load_http.py --url http://127.0.0.1:8000/v1 --models CKPT_NAME a \
        --requests 64 --rate 4 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

WORDS = "the of and to in is was for on that with as by at from it an be this are".split()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n = None, 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (first or end) - t0
    return {"ttft": ttft, "tpot": (end - t0 - ttft) / max(n - 1, 1), "tokens": n, "end": end}


async def run(args: argparse.Namespace) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key, max_retries=0)
    rng = random.Random(args.seed)
    gate = asyncio.Semaphore(args.concurrency)
    results, errors = [], []

    async def job(i: int) -> None:
        prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
        async with gate:
            try:
                results.append(
                    await one(client, args.models[i % len(args.models)], prompt, args.max_tokens)
                )
            except Exception as e:  # counted and reported, the run goes on
                errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    tasks = []
    for i in range(args.requests):
        tasks.append(asyncio.create_task(job(i)))
        if args.rate > 0:
            await asyncio.sleep(rng.expovariate(args.rate))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results]
    return {
        "requests": args.requests,
        "ok": len(results),
        "errors": errors,
        "wall_s": wall,
        "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_s": {"p50": _pct(ttft, 0.5), "p90": _pct(ttft, 0.9), "p99": _pct(ttft, 0.99)},
        "tpot_s": {"p50": _pct(tpot, 0.5), "p90": _pct(tpot, 0.9), "p99": _pct(tpot, 0.99)},
        "mean_tokens": statistics.mean(r["tokens"] for r in results) if results else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s (0: all at once)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    print(json.dumps(asyncio.run(run(ap.parse_args())), indent=2))


if __name__ == "__main__":
    main()

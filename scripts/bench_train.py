"""Adapter-training throughput: lsw-jax's Trainer against PEFT LoRA training, in one run.

Both sides train adapters on the same frozen SmolLM2-135M (fp32 weights and compute) with
the same rows of random token ids, batch and sequence length; a step is forward, backward
(adapter gradients only), global-norm clipping at 1.0 and AdamW. Ours is the public path
``lsw-jax train`` runs: ``Trainer.run`` over prepared batches (switch, mola, lora rows).
The peer is transformers + PEFT: ``LlamaForCausalLM`` holding our weights, a
``peft.LoraConfig`` of the same rank/alpha on the same seven linears, ``loss.backward()``,
``clip_grad_norm_`` and ``torch.optim.AdamW``. Tokens/s = batch * seq_len / seconds per
step; each number is the median over ``--repeats`` of ``--steps`` steps, after one warm-up
step (ours compiles there); the implementations take turns within every repeat so that
load from other jobs hits them alike. Process CPU seconds per step are recorded too.

    python scripts/bench_train.py --shapes 4x128,8x128

Writes ``docs/figures/bench_train_smollm2.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
from bench_decode import THREADS, environment, load_ours  # noqa: E402  (sets XLA flags first)
import jax  # noqa: E402

# isort: on
from lsw_jax.config import AdapterConfig  # noqa: E402
from lsw_jax.data import BATCH_KEYS, Batches, PackedDataset  # noqa: E402
from lsw_jax.train import TrainConfig, Trainer  # noqa: E402

LR = 1e-4


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def random_rows(vocab: int, rows: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """[rows, seq_len + 1] token ids: each row is one document filling the whole row."""
    return np.random.default_rng(seed).integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)


def packed(tokens: np.ndarray) -> PackedDataset:
    n, length = tokens.shape
    t = length - 1
    return PackedDataset(
        input_ids=tokens[:, :-1],
        targets=tokens[:, 1:],
        loss_mask=np.ones((n, t), np.float32),
        segment_ids=np.ones((n, t), np.int32),
        positions=np.tile(np.arange(t, dtype=np.int32), (n, 1)),
        domain_id=np.zeros((n,), np.int32),
    )


# ----------------------------------------------------------------------------- steppers


def adapter_config(kind: str, bank_rank: int, experts: int, top_k: int) -> AdapterConfig:
    """Equal trainable banks: LoRA rank = bank_rank, experts of rank bank_rank / E."""
    rank = bank_rank if kind == "lora" else bank_rank // experts
    return AdapterConfig(kind=kind, num_experts=experts, top_k=top_k, rank=rank, alpha=2.0 * rank)


def ours_stepper(model, adapter: AdapterConfig, tokens, batch: int, work: str):
    """``run(n)`` trains n steps through ``Trainer.run``; the first call compiles."""
    seq_len = tokens.shape[1] - 1
    cfg = TrainConfig(
        ckpt="unused",
        data=(),
        out_dir=str(Path(work) / f"{adapter.kind}-{batch}x{seq_len}"),
        adapter=adapter,
        seq_len=seq_len,
        batch_size=batch,
        steps=10**6,
        lr=LR,
        warmup_steps=1,
        dtype="float32",
        save_every=10**9,
    )
    data = packed(tokens)
    trainer = Trainer(cfg, model=model, batches=Batches(data, batch, seed=0))
    first = data.rows(np.arange(batch))
    sample = {k: jax.numpy.asarray(first[k][None]) for k in BATCH_KEYS}  # [1, B, T]
    compiled = trainer.step_fn.lower(
        trainer.trainable, trainer.rng_state, trainer.frozen, trainer.opt_state, sample
    ).compile()
    mem = compiled.memory_analysis()
    info = {"temp_bytes": getattr(mem, "temp_size_in_bytes", None)}

    def run(n: int) -> None:
        trainer.run(stop_after=n, progress=False)

    run(1)
    return run, info


def peft_stepper(model, adapter: AdapterConfig, tokens, batch: int):
    """transformers + PEFT LoRA training step (train mode, no dropout), after one warm-up."""
    import peft
    import torch
    from peers import hf_llama_from_ours

    hf = hf_llama_from_ours(model)
    cfg = peft.LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=list(adapter.targets),
        lora_dropout=0.0,
    )
    pm = peft.get_peft_model(hf, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    x = torch.as_tensor(tokens[:, :-1], dtype=torch.long)
    pos = [0]

    def step() -> None:
        i = pos[0] % (len(x) // batch)
        pos[0] += 1
        ids = x[i * batch : (i + 1) * batch]
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(n: int) -> None:
        for _ in range(n):
            step()

    run(1)
    info = {
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "trainable_params": sum(p.numel() for p in params),
        "torch_threads": torch.get_num_threads(),
    }
    return run, info


def time_rows(runners: list[tuple[str, Callable[[int], None]]], steps: int, repeats: int):
    """Seconds and CPU seconds per step for each runner: medians over ``repeats`` of
    ``steps`` steps, the runners taking turns within every repeat."""
    wall = {name: [] for name, _ in runners}
    cpu = {name: [] for name, _ in runners}
    for _ in range(repeats):
        for name, run in runners:
            t0, c0 = time.perf_counter(), cpu_seconds()
            run(steps)
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((cpu_seconds() - c0) / steps)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in wall}


# ----------------------------------------------------------------------------- roofline


def step_flops(cfg, batch: int, seq_len: int) -> float:
    """FLOPs of one training step on a frozen backbone, the same work for every row here:
    the forward (every linear and the vocabulary head: 2 FLOPs per weight per token;
    attention scores and values: 4 * T^2 * q_dim per layer and row, causal halves
    ignored) and the backward's input gradients (the same products again, attention
    twice). No weight gradients: the backbone is frozen; LoRA's rank-32 products add < 1%.
    """
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    d, f = cfg.hidden_size, cfg.intermediate_size
    layer_weights = d * (q + 2 * kv) + q * d + 3 * d * f
    tokens = batch * seq_len
    linear = 2 * tokens * (cfg.num_layers * layer_weights + cfg.vocab_size * d)
    attention = cfg.num_layers * batch * 4 * seq_len * seq_len * q
    return 2 * linear + 3 * attention


def gemm_rate(tokens: int, d: int, f: int, repeats: int = 5) -> float:
    """FLOP/s of one fp32 ``[tokens, d] @ [d, f]`` product through XLA on this CPU (the
    backbone's MLP shape): the practical ceiling of a GEMM-bound training step."""
    x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(tokens, d)), np.float32)
    w = jax.numpy.asarray(np.random.default_rng(1).normal(size=(d, f)), np.float32)
    dot = jax.jit(lambda x, w: x @ w)
    dot(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            out = dot(x, w)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * tokens * d * f / best


# ----------------------------------------------------------------------------- output


def write_outputs(rows: list[dict], env: dict, extra: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / "bench_train_smollm2"
    Path(f"{stem}.json").write_text(json.dumps({"env": env, **extra, "rows": rows}, indent=2))
    load0 = ", ".join(f"{x:.1f}" for x in env["load_average_at_start"])
    load1 = ", ".join(f"{x:.1f}" for x in env["load_average_at_end"])
    lines = [
        f"Device: {env['cpu']} ({env['cpu_cores']} cores), jax device {env['jax_device']}",
        f"jax {env['jax']}, flax {env['flax']}, torch {env['torch']}, "
        f"transformers {env['transformers']}" + (f", peft {env['peft']}" if "peft" in env else ""),
        f"Date: {env['date']}. Command: `{env['command']}`",
        f"Threads: {env['threads']}; load average (1/5/15 min) at start {load0}, at end {load1}",
        "",
        "| implementation | batch x seq | s/step | tokens/s | vs PEFT LoRA | CPU s/step "
        "| GFLOP/s | of GEMM rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['vs_peft']:.2f}x" if "vs_peft" in r else ""
        lines.append(
            f"| {r['impl']} | {r['batch']}x{r['seq_len']} | {r['s_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {ratio} | {r['cpu_s_per_step']:.2f} | "
            f"{r['gflop_per_s']:.0f} | {r['of_gemm_rate']:.2f} |"
        )
    lines.append("")
    lines.append(
        "GFLOP/s: the step's FLOPs (`step_flops`: forward plus input gradients of a frozen "
        "backbone) per second; GEMM rate: one fp32 XLA product of the step's MLP shape "
        "measured in the same run, "
        + ", ".join(f"{k}: {v / 1e9:.0f} GFLOP/s" for k, v in extra["gemm_rate"].items())
        + "."
    )
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, f"{stem}.png", env)


def _plot(rows: list[dict], path: str, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(f"{r['batch']}x{r['seq_len']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cell = {(r["impl"], f"{r['batch']}x{r['seq_len']}"): r["tokens_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(shapes))]
        ax.bar(xs, [cell.get((impl, s), 0.0) for s in shapes], width, label=impl)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"batch x seq {s}" for s in shapes])
    ax.set_ylabel("training tokens / s")
    ax.set_title(f"adapter training, SmolLM2-135M fp32, {env['cpu']} ({env['date']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4x128,8x128", help="batch x seq_len, comma-separated")
    ap.add_argument("--kinds", default="lora,switch,mola", help="our adapter kinds")
    ap.add_argument("--bank-rank", type=int, default=32, help="LoRA rank = experts * rank")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="1: one thread for XLA and torch")
    ap.add_argument("--out-dir", default="docs/figures")
    args = ap.parse_args()
    env = environment()
    print(json.dumps(env, indent=2), flush=True)
    if THREADS:
        import torch

        torch.set_num_threads(THREADS)
    model = load_ours("smollm2", "float32")
    kinds = args.kinds.split(",")
    rows, gemm = [], {}
    with tempfile.TemporaryDirectory() as work:
        for shape in args.shapes.split(","):
            batch, seq_len = (int(x) for x in shape.split("x"))
            tokens = random_rows(model.cfg.vocab_size, 4 * batch, seq_len)
            runners, infos = [], {}
            if not args.no_peft:
                run, infos["PEFT LoRA"] = peft_stepper(
                    model, adapter_config("lora", args.bank_rank, 1, 1), tokens, batch
                )
                runners.append(("PEFT LoRA", run))
            for kind in kinds:
                ad = adapter_config(kind, args.bank_rank, args.experts, args.top_k)
                name = f"ours {kind}" + (
                    f" E{ad.num_experts} k{ad.top_k}" if kind != "lora" else ""
                )
                run, infos[name] = ours_stepper(model, ad, tokens, batch, work)
                runners.append((name, run))
            print(f"{shape}: warm; timing {[n for n, _ in runners]}", flush=True)
            cfg = model.cfg
            gemm[shape] = gemm_rate(batch * seq_len, cfg.hidden_size, cfg.intermediate_size)
            times = time_rows(runners, args.steps, args.repeats)
            peft_s = times.get("PEFT LoRA", (None,))[0]
            flops = step_flops(cfg, batch, seq_len)
            for name, (sec, cpu) in times.items():
                row = {
                    "impl": name,
                    "batch": batch,
                    "seq_len": seq_len,
                    "s_per_step": sec,
                    "cpu_s_per_step": cpu,
                    "tokens_per_s": batch * seq_len / sec,
                    "step_flops": flops,
                    "gflop_per_s": flops / sec / 1e9,
                    "of_gemm_rate": flops / sec / gemm[shape],
                    **infos[name],
                }
                if peft_s is not None:
                    row["vs_peft"] = peft_s / sec
                rows.append(row)
                print(json.dumps(row), flush=True)
    env["load_average_at_end"] = os.getloadavg()
    extra = {
        "steps": args.steps,
        "repeats": args.repeats,
        "bank_rank": args.bank_rank,
        "experts": args.experts,
        "top_k": args.top_k,
        "lr": LR,
        "jax_backend": jax.default_backend(),
        "gemm_rate": gemm,
    }
    write_outputs(rows, env, extra, Path(args.out_dir))


if __name__ == "__main__":
    main()

"""Reproduce LoRA-Switch's comparison on a 7B model: plain LoRA vs MoLA vs LoRA-Switch.

The paper's setting: a Llama-2-7B or Mistral-7B backbone, frozen; LoRA experts on every
linear of every layer; LoRA-Switch routes once per token with one pre-gated router on layer
0's normalised input and applies the same top-k experts in all layers, MoLA routes per
layer, plain LoRA is the static baseline. Each method is fine-tuned on the same data and
then measured for accuracy (multiple-choice log-likelihood, e.g. ARC / HellaSwag / BoolQ
converted to JSONL, plus held-out loss) and decode latency per token (batch 1, each plan).
All three banks have the same trainable parameter count (an expert bank of E experts has
rank ``bank_rank / E``; LoRA has rank ``bank_rank``). Hyper-parameters are flags: set them to
the values of the run you reproduce.

The user brings the weights and the data (nothing is downloaded):

    python scripts/reproduce_lora_switch.py --model-dir /data/Llama-2-7b-hf \\
        --ckpt /data/lsw/llama2-7b --train /data/train.jsonl --eval-text /data/heldout.jsonl \\
        --choices arc_e=/data/arc_e.jsonl,hellaswag=/data/hellaswag.jsonl \\
        --steps 2000 --batch-size 8 --seq-len 512 --lr 2e-4 --dtype bfloat16 --out runs/7b

``--model-dir``: a Hugging Face folder (config.json, *.safetensors, tokenizer.json), converted
once into ``--ckpt`` (streamed tensor by tensor). ``--train``: .jsonl ({"text"} or
{"prompt", "response"} records) or .txt files. ``--choices``: name=file pairs of JSONL
``{"question", "choices", "answer"}``. Writes ``<out>/reproduce_results.{json,md}`` and
each method's trained adapter under ``<out>/<method>/adapters/final`` (LoRA also in PEFT
format, ``<out>/lora/peft``).
A test runs the whole script on a tiny random Llama (tests/test_reproduce_lora_switch.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lsw_jax import convert_checkpoint, generate, load_model
from lsw_jax.adapters.lora import detach_adapter
from lsw_jax.config import AdapterConfig
from lsw_jax.data import load_documents, read_multiple_choice
from lsw_jax.evaluate import multiple_choice, perplexity
from lsw_jax.tokenizer import Tokenizer
from lsw_jax.train import TrainConfig, Trainer

METHODS = ("lora", "mola", "switch")
# Decode plans measured per method (DESIGN.md "Execution plans"); MoLA routes per layer,
# so it has no merged plan.
PLANS = {"base": ("dense",), "lora": ("unmerged", "merged"), "mola": ("unmerged",)}
PLANS["switch"] = ("unmerged", "merged")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="HF folder to convert (skipped when --ckpt exists)")
    p.add_argument("--ckpt", required=True, help="converted lsw-jax checkpoint directory")
    p.add_argument("--train", nargs="+", required=True, help=".jsonl / .txt training files")
    p.add_argument("--eval-text", nargs="*", default=[], help="held-out .jsonl / .txt files")
    p.add_argument("--choices", default="", help="name=file.jsonl,... multiple-choice sets")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--bank-rank", type=int, default=64, help="E * r (plain LoRA's rank)")
    p.add_argument("--alpha-over-rank", type=float, default=2.0)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--z-loss-coef", type=float, default=0.0)
    p.add_argument("--router-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="compute dtype (default: bf16 GPU, fp32 CPU)")
    p.add_argument("--remat", action="store_true", help="recompute each layer in backward")
    p.add_argument("--max-len", type=int, default=1024, help="perplexity window")
    p.add_argument("--decode-tokens", type=int, default=64, help="0: skip the latency rows")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def adapter_for(method: str, args: argparse.Namespace) -> AdapterConfig:
    experts = 1 if method == "lora" else args.num_experts
    if args.bank_rank % experts:
        raise ValueError(f"--bank-rank {args.bank_rank} is not a multiple of {experts} experts")
    rank = args.bank_rank // experts
    return AdapterConfig(
        kind=method,
        num_experts=experts,
        top_k=1 if method == "lora" else args.top_k,
        rank=rank,
        alpha=args.alpha_over_rank * rank,
        aux_loss_coef=args.aux_loss_coef,
        router_z_loss_coef=args.z_loss_coef,
    )


def choice_sets(spec: str) -> dict[str, Path]:
    out = {}
    for part in filter(None, spec.split(",")):
        name, sep, path = part.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--choices: expected name=file.jsonl, got {part!r}")
        out[name] = Path(path)
    return out


def decode_ms_per_token(model: Any, args: argparse.Namespace, plan: str) -> float:
    """Batch-1 greedy decode: (time of N new tokens - time of 1) / (N - 1), median."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.cfg.vocab_size, (1, args.prompt_len)).astype(np.int32)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        generate(model, ids, n, plan=plan)  # returns host numpy: the work is done
        return time.perf_counter() - t0

    run(args.decode_tokens), run(1)  # compile both lengths
    n = args.decode_tokens
    return 1e3 * statistics.median((run(n) - run(1)) / (n - 1) for _ in range(args.repeats))


def evaluate_model(model: Any, tok: Tokenizer, args, texts, sets, plans) -> dict:
    res: dict[str, Any] = {}
    if texts:
        res["held_out"] = perplexity(model, tok, texts, max_len=args.max_len)
    for name, items in sets.items():
        res[name] = multiple_choice(model, tok, items)
    if args.decode_tokens > 1:
        res["decode_ms_per_token"] = {p: decode_ms_per_token(model, args, p) for p in plans}
    return res


def train_method(model, tok, method: str, args) -> tuple[dict, Trainer]:
    cfg = TrainConfig(
        ckpt=args.ckpt,
        data=tuple(args.train),
        out_dir=str(Path(args.out) / method),
        adapter=adapter_for(method, args),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        steps=args.steps,
        lr=args.lr,
        router_lr=args.router_lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        dtype=args.dtype,
        remat=args.remat,
        save_every=max(args.steps // 4, 1),
    )
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    t0 = time.perf_counter()
    history = trainer.run(progress=True)
    seconds = time.perf_counter() - t0
    trainer.finish()  # adapter into the live model; saved under <out>/<method>/
    tok_s = [h["tokens_per_s"] for h in history[1:]] or [history[0]["tokens_per_s"]]
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.trainable))
    info = {
        "adapter": cfg.adapter.to_dict(),
        "trainable_params": trainable,
        "train_seconds": seconds,
        "tokens_per_s_median": float(np.median(tok_s)),
        "final_train_ce": history[-1]["ce"] if history else None,
    }
    return info, trainer


def markdown(res: dict) -> str:
    rows = res["results"]
    evals = [k for k in next(iter(rows.values())) if k not in ("train", "decode_ms_per_token")]
    plans = sorted({p for r in rows.values() for p in r.get("decode_ms_per_token", {})})
    head = ["method", "trainable params"] + evals + [f"decode ms/token ({p})" for p in plans]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, r in rows.items():
        cells = [method, f"{r['train']['trainable_params']:,}" if "train" in r else "0"]
        for e in evals:
            v = r.get(e, {})
            cells.append(
                f"ppl {v['perplexity']:.3f}" if "perplexity" in v else f"acc {v['acc']:.3f}"
            )
        decode = r.get("decode_ms_per_token", {})
        cells += [f"{decode[p]:.1f}" if p in decode else "" for p in plans]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}")
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").is_file():
        if not args.model_dir:
            raise SystemExit(f"{ckpt} is not a converted checkpoint; give --model-dir to convert")
        convert_checkpoint(args.model_dir, ckpt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_hf_dir(ckpt)
    texts = [d if isinstance(d, str) else d.get("text", "") for d in load_documents(args.eval_text)]
    texts = [t for t in texts if t]
    sets = {name: read_multiple_choice(path) for name, path in choice_sets(args.choices).items()}
    model = load_model(ckpt, dtype=args.dtype)
    results = {"base": evaluate_model(model, tok, args, texts, sets, PLANS["base"])}
    print(json.dumps({"base": results["base"]}), flush=True)
    for method in methods:
        info, trainer = train_method(model, tok, method, args)
        results[method] = {"train": info}
        results[method].update(evaluate_model(model, tok, args, texts, sets, PLANS[method]))
        print(json.dumps({method: results[method]}), flush=True)
        del trainer
        detach_adapter(model)
    res = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "platform": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
        },
        "model": read_model_name(ckpt),
        "config": vars(args),
        "results": results,
    }
    (out / "reproduce_results.json").write_text(json.dumps(res, indent=1))
    (out / "reproduce_results.md").write_text(markdown(res))
    print(markdown(res))
    return res


def read_model_name(ckpt: Path) -> dict:
    from lsw_jax.checkpoint import read_config

    cfg = read_config(ckpt)
    return {"ckpt": str(ckpt), "architecture": cfg.architecture, "layers": cfg.num_layers}


if __name__ == "__main__":
    main()

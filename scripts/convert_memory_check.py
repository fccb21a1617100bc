"""Peak host memory of converting a Llama-2-7B-shaped HF checkpoint (bf16, ~13.5 GB).

Writes a synthetic HF folder (config.json + sharded safetensors of bf16 weights, filled with
a cheap non-zero pattern tensor by tensor, so this script itself stays small in memory),
runs ``lsw_jax.convert_checkpoint`` in a child process, and reports the child's peak RSS
(``ru_maxrss`` of the child, plus a psutil-free /proc poll of RSS split into anonymous and
file-backed pages), wall time, and whether the peak stayed under the budget (24 GB by
default, DESIGN.md). Everything it wrote is removed at the end.

    python scripts/convert_memory_check.py [--workdir /tmp] [--budget-gb 24] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json, transformers 5 spelling).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}

_PATTERN_LEN = 1 << 20  # bf16 values in the repeating fill block (2 MiB)


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a Llama config, in checkpoint order."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (d,)),
            (f"{p}.self_attn.q_proj.weight", (q, d)),
            (f"{p}.self_attn.k_proj.weight", (kv, d)),
            (f"{p}.self_attn.v_proj.weight", (kv, d)),
            (f"{p}.self_attn.o_proj.weight", (d, q)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
            (f"{p}.mlp.gate_proj.weight", (f, d)),
            (f"{p}.mlp.up_proj.weight", (f, d)),
            (f"{p}.mlp.down_proj.weight", (d, f)),
        ]
    specs += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return specs


def _fill_block() -> bytes:
    """2 MiB of bf16 values ~N(0, 0.02) (the top halves of fp32 draws)."""
    x = np.random.default_rng(0).normal(0, 0.02, _PATTERN_LEN).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_synthetic_checkpoint(folder: Path, cfg: dict, shard_gb: float) -> int:
    """Write ``config.json``, ``model-0000k-of-0000n.safetensors`` and the index; returns
    the bytes of tensor data written. Each tensor is streamed from one 2 MiB block."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_specs(cfg):
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    block = _fill_block()
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            nbytes = int(np.prod(shape)) * 2
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i, (_, shape) in enumerate(shard):
                left = int(np.prod(shape)) * 2
                rot = (i * 4099 * 2) % len(block)  # a different phase per tensor
                chunk = block[rot:] + block[:rot]
                while left > 0:
                    n = min(left, len(chunk))
                    f.write(chunk[:n])
                    left -= n
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _rss_kb(pid: int) -> tuple[int, int, int]:
    """(RSS, anonymous, file-backed) in kB from /proc/<pid>/status."""
    vals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in vals:
                vals[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return vals["VmRSS"], vals["RssAnon"], vals["RssFile"]


_CHILD = """
import sys
from lsw_jax import convert_checkpoint
convert_checkpoint(sys.argv[1], sys.argv[2], show_progress=False)
"""


def run_conversion(src: Path, dst: Path) -> dict:
    """Convert in a child process; peak RSS from ru_maxrss and a 50 ms /proc poll."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(dst)])
    peak = {"rss": 0, "anon": 0, "file": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            rss, anon, fil = _rss_kb(proc.pid)
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            peak["file"] = max(peak["file"], fil)
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    rc = proc.wait()
    stop.set()
    thread.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"conversion failed with exit code {rc}")
    maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
    return {
        "wall_s": wall,
        "peak_rss_gb_ru_maxrss": maxrss_kb / 1e6,
        "peak_rss_gb_polled": peak["rss"] / 1e6,
        "peak_anon_gb_polled": peak["anon"] / 1e6,
        "peak_file_backed_gb_polled": peak["file"] / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--json", default="docs/figures/bench_convert_memory.json")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = ap.parse_args()

    need = sum(int(np.prod(s)) * 2 for _, s in tensor_specs(LLAMA2_7B))
    free = shutil.disk_usage(args.workdir).free
    if free < 2.1 * need:
        print(
            f"SKIP: {args.workdir} has {free / 1e9:.1f} GB free; the check needs "
            f"~{2.1 * need / 1e9:.1f} GB (source {need / 1e9:.1f} GB + converted copy)"
        )
        return
    root = Path(tempfile.mkdtemp(prefix="lsw-convert-check-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        src_bytes = write_synthetic_checkpoint(root / "hf", LLAMA2_7B, args.shard_gb)
        write_s = time.perf_counter() - t0
        print(f"wrote {src_bytes / 1e9:.2f} GB of bf16 safetensors in {write_s:.0f} s")
        res = run_conversion(root / "hf", root / "orbax")
        out_bytes = sum(p.stat().st_size for p in (root / "orbax").rglob("*") if p.is_file())
        peak = max(res["peak_rss_gb_ru_maxrss"], res["peak_rss_gb_polled"])
        report = {
            "model": "Llama-2-7B shape, synthetic bf16",
            "source_gb": src_bytes / 1e9,
            "converted_gb": out_bytes / 1e9,
            **res,
            "budget_gb": args.budget_gb,
            "within_budget": peak < args.budget_gb,
            "host_ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv),
        }
        print(json.dumps(report, indent=2))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        verdict = "OK" if report["within_budget"] else "OVER BUDGET"
        print(
            f"{verdict}: peak RSS {peak:.2f} GB (budget {args.budget_gb} GB), {res['wall_s']:.0f} s"
        )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

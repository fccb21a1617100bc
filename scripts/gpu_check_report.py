"""The report of the GPU check: results.jsonl -> gpu_check.json, the GPU section of
docs/benchmarks.md, an updated pallas_kernels/tuning.py and a summary.

Called as `python3 scripts/gpu_check.py report ...` (see there). gpu_check.json:
  {"device", "jax", "date", "copy_gbs",
   "rows": [{"name": base|switch_unmerged|switch_merged, "shape", "batch", "ms_per_token",
             "roofline_frac", "impl"}],
   "kernels": [{"name", "shape", "batch", "gbs", "frac_of_copy", "impl"}],
   "tests": {"passed", "failed", "skipped"}}
ms_per_token is the time of one decode step (every row of the batch advances one token);
roofline_frac = (weight bytes read per step / copy bandwidth) / ms_per_token.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from pallas_kernels import bench, dispatch, tuning

REPO = Path(__file__).resolve().parents[1]
LORA_IMPLS = ("pallas", "mosaic", "reference")  # the ones that apply the experts (tuning)
PLAN_NAMES = {"base": "base", "unmerged": "switch_unmerged", "merged": "switch_merged"}
BEGIN = "<!-- gpu_check:begin -->"
END = "<!-- gpu_check:end -->"
RUN1_SHAPES = {  # the first run's unfused 7B linears
    "qkvo": "q/k/v/o 4096x4096 R16 (unfused)",
    "gate_up": "gate/up 11008x4096 R16 (unfused)",
    "down": "down 4096x11008 R16",
}
RUN1_IMPLS = {"pallas_unmerged": "pallas", "xla_unmerged_ref": "reference", "xla_base_gemm": "base"}
RUN1_NOTES = [
    "Run 1 (2026-11-26) ran the previous kernels through the first shared GPU script: "
    "q/k/v/o and gate/up unfused, the switch kernel with 64 x 64 tiles (one tile per program), "
    "the unmerged kernel before the split-K / no-`jnp.unique` rewrite.",
    "Its unmerged kernel rows time ONE weight matrix in a `fori_loop`: at 4096 x 4096 (34 MB) "
    "W stays in the H200's 50 MB L2, and each call carries ~20 us of loop overhead, so those "
    "GB/s are neither HBM bandwidth nor the kernel alone (gross: bytes / time per call). "
    "`scripts/gpu_check.sh` now times 8 layers of distinct weights back to back.",
    "merged - base at batch 1 = 20.2 ms/step, of which the switch kernels (7 groups x 32 "
    "layers, measured alone) take 15.2 ms; the other ~5 ms lie outside the kernels (not "
    "profiled; the merged plan then sliced each layer's W_eff out of the stacked group).",
    "Missed targets and why: unmerged b1 is 3.72x base (target <= 1.10x): the previous "
    "unmerged kernel ran 4-5 launches per linear (gather, shrink, scale, pad, `jnp.unique`, "
    "kernel) and, at 64 programs for 4096 outputs on 132 SMs, reached 24% of copy bandwidth "
    "at in = 11008; XLA's reference path was 1.4-2.9x faster per call. The switch kernel "
    "reached 61-64% of copy (target 70%): 64 x 64 tiles re-read B once per `in` block; the "
    "best swept tile (32 x 256) reached 76%.",
]


def load(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return rows


def legacy_run1(rows: list[dict]) -> list[dict]:
    """The first run's rows (../shared/gpu scripts) in this script's row format."""
    out = []
    for r in rows:
        part = r.get("part")
        if part == "env" and r.get("bench") == "kernel":
            out.append({"part": "env", "device": r["device"], "versions": {"jax": r["jax"]}})
        elif part == "copy" and "gbs" in r and r.get("bench") == "kernel":
            out.append({"part": "copy", "gbs": r["gbs"]})
        elif part == "correct":
            shape = RUN1_SHAPES[r["shape"]]
            out.append({**r, "shape": shape, "impl": "pallas"})
        elif part == "switch":
            out.append(
                {
                    "part": "switch",
                    "shape": RUN1_SHAPES[r["shape"]],
                    "impl": "pallas",
                    "ms": r["ms"],
                    "gbs": r["gbs"],
                    "frac_of_copy": r["pct_copy"] / 100,
                    "layers": r["layers"],
                    "blocks": "64 x 64 tiles",
                }
            )
        elif part == "unmerged" and r.get("op") in RUN1_IMPLS:
            gbs = r["bytes"] / (r["us"] * 1e-6) / 1e9
            out.append(
                {
                    "part": "unmerged",
                    "shape": RUN1_SHAPES[r["shape"]],
                    "n": r["n"],
                    "impl": RUN1_IMPLS[r["op"]],
                    "us": r["us"],
                    "gbs": round(gbs, 1),
                    "frac_of_copy": None,
                    "note": "run1 loop harness (gross)",
                }
            )
        elif part == "tune_unmerged" and "us" in r:
            out.append({**r, "shape": RUN1_SHAPES[r["shape"]]})
        elif part == "tune_switch" and "ms" in r:
            out.append({**r, "shape": RUN1_SHAPES[r["shape"]]})
        elif part == "row" and "ms_step" in r:
            impl = {"base": "-", "unmerged": "pallas", "merged": "pallas"}[r["plan"]]
            out.append(
                {
                    "part": "row",
                    "plan": r["plan"],
                    "batch": r["batch"],
                    "impl": impl,
                    "ms_step": r["ms_step"],
                    "roofline_frac": r["pct_of_floor"] / 100,
                    "compile_s": r["compile_s"],
                    "layers": 32,
                }
            )
    copy = next(r["gbs"] for r in out if r["part"] == "copy")
    for r in out:
        if r["part"] == "unmerged":
            r["frac_of_copy"] = round(r["gbs"] / copy, 3)
    return out


def build(rows: list[dict], tests: str | None, date: str | None) -> dict:
    env = next((r for r in rows if r.get("part") == "env"), {})
    # the run's ceiling: the faster of the copy (read + write) and the read-only pass
    rates = [r["gbs"] for r in rows if r.get("part") in ("copy", "read") and "gbs" in r]
    copy = max(rates) if rates else None
    smoke = bool(env.get("smoke"))
    t = next((r for r in reversed(rows) if r.get("part") == "tests"), None)
    if tests:
        passed, failed, skipped = (int(v) for v in tests.split(","))
        t = {"passed": passed, "failed": failed, "skipped": skipped}
    return {
        "device": env.get("device", "unknown"),
        "jax": env.get("versions", {}).get("jax", "unknown"),
        "date": date or env.get("date") or datetime.date.today().isoformat(),
        "copy_gbs": copy,
        "rows": [
            {
                "name": PLAN_NAMES[r["plan"]],
                "shape": "tiny (smoke)" if smoke else "llama7b",
                "batch": r["batch"],
                "ms_per_token": round(r["ms_step"], 3),
                "roofline_frac": r["roofline_frac"],
                "impl": r.get("impl", "auto"),
                # spread of the repeats (rows of runs that recorded it)
                **(
                    {"ms_min_max": [r["ms_min"], r["ms_max"]], "noisy": r.get("noisy")}
                    if "ms_min" in r
                    else {}
                ),
            }
            for r in rows
            if r.get("part") == "row" and "ms_step" in r
        ],
        "kernels": [
            {
                "name": "switch_merge"
                if r["part"] == "switch"
                else {"base": "xla_gemm_base", "base_kernel": "fused_kernel_base"}.get(
                    r["impl"], "lora_unmerged"
                ),
                "shape": r["shape"],
                "batch": r.get("n"),
                "gbs": r["gbs"],
                "frac_of_copy": r["frac_of_copy"],
                "impl": r["impl"],
            }
            for r in rows
            if r.get("part") in ("unmerged", "switch") and "gbs" in r
        ],
        "tests": {k: (t or {}).get(k, 0) for k in ("passed", "failed", "skipped")},
    }


def _table(head: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def render_md(data: dict, rows: list[dict], *, command: str, notes: list[str]) -> str:
    base = {r["batch"]: r["ms_per_token"] for r in data["rows"] if r["name"] == "base"}
    t = data["tests"]
    lines = [
        BEGIN,
        f"## GPU: {data['device']}",
        "",
        f"Date {data['date']}, jax {data['jax']}, generated from `docs/figures/gpu_check.json` "
        f"by `python3 scripts/gpu_check.py report`. Command: `{command}`.",
        "Rerun on a GPU: `OUT=/tmp/gpu BUDGET=480 bash scripts/gpu_check.sh`, then here "
        "`python3 scripts/gpu_check.py report --results /tmp/gpu/results.jsonl --out "
        "/tmp/gpu_report --docs` (and, after review, copy its `tuning.py` to "
        "`pallas_kernels/tuning.py`). The PyTorch peers "
        "on a GPU are not part of this check: `scripts/bench_decode.py --model llama7b`.",
        f"Bandwidth ceiling {data['copy_gbs']} GB/s: the faster of a device copy (`x + 1` "
        "over 4 GiB, read + write counted) and a read-only sum over 4 GiB. Compiled GPU kernel tests (`pytest -m gpu`, fp32 at HIGHEST precision): "
        + (
            f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped."
            if any(t.values())
            else "not run in this check (the `tests` stage was skipped or not chosen)."
        ),
        "",
        "### Decode, Llama-2-7B shape (32 layers, bf16, random weights)",
        "LoRA-Switch: 8 experts of rank 16 on all 7 linears, top-2. ms/token = one decode step "
        "(every row advances one token); roofline frac = (weight bytes / copy bandwidth) / "
        "ms/token (XLA's GEMV reads faster than a copy writes, so base can pass 1.0).",
        "",
    ]
    body = [
        [
            r["name"],
            r["batch"],
            r["impl"],
            f"{r['ms_per_token']:.2f}",
            f"{r['ms_per_token'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-",
            f"{r['roofline_frac']:.2f}",
        ]
        for r in data["rows"]
    ]
    lines += _table(["plan", "batch", "impl", "ms/token", "vs base", "roofline frac"], body)
    lines += ["", "### Kernels at 7B shapes (bf16; E = 8, r = 16, k = 2)", ""]
    body = [
        [k["name"], k["shape"], k["batch"], k["impl"], k["gbs"], f"{k['frac_of_copy']:.2f}"]
        for k in data["kernels"]
    ]
    lines += _table(["kernel", "shape", "N", "impl", "GB/s", "of copy"], body)
    tuned = [
        r
        for r in rows
        if r.get("part") in ("tune_unmerged", "tune_switch") and ("us" in r or "ms" in r)
    ]
    if tuned:
        lines += ["", "### Block sweeps (best per shape)", ""]
        best = {}
        for r in tuned:
            key = (r["part"], r["shape"])
            v = r.get("us", r.get("ms", 0) * 1e3)
            if key not in best or v < best[key][0]:
                best[key] = (
                    v,
                    r["blocks"],
                    sum(1 for q in tuned if (q["part"], q["shape"]) == key),
                )
        lines += _table(
            ["kernel", "shape", "best blocks", "us/call", "candidates"],
            [[p.replace("tune_", ""), s, b, f"{v:.1f}", c] for (p, s), (v, b, c) in best.items()],
        )
    lines += ["", "### Targets", ""] + [f"- {t}" for t in targets(data)]
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines + [END, ""])


# The project's GPU goals (ratios from one run; fractions of the copy ceiling measured in it).
BASE_OF_COPY, KERNEL_OF_COPY = 0.80, 0.85
SWITCH_OVER_BASE = {1: 1.05, 16: 1.10}


def targets(data: dict) -> list[str]:
    out = []
    rows = {(r["name"], r["batch"]): r for r in data["rows"]}
    for (name, batch), r in rows.items():
        if name == "base":
            ok = r["roofline_frac"] >= BASE_OF_COPY
            out.append(
                f"base b{batch} >= {BASE_OF_COPY:.2f} of the copy ceiling: "
                f"{r['roofline_frac']:.2f} ({'met' if ok else 'missed'})"
            )
    for batch, goal in SWITCH_OVER_BASE.items():
        unm = [r for r in data["rows"] if r["name"] == "switch_unmerged" and r["batch"] == batch]
        if unm and ("base", batch) in rows:
            best = min(unm, key=lambda r: r["ms_per_token"])
            ratio = best["ms_per_token"] / rows[("base", batch)]["ms_per_token"]
            verdict = "met" if ratio <= goal else f"missed by {ratio / goal:.2f}x"
            noisy = " (noisy)" if best.get("noisy") or rows[("base", batch)].get("noisy") else ""
            out.append(
                f"unmerged b{batch} <= {goal:.2f}x base: {ratio:.2f}x with impl="
                f"{best['impl']} ({verdict}){noisy}"
            )
    for k in data["kernels"]:
        if (
            k["name"] in ("lora_unmerged", "switch_merge")
            and k["batch"] in (1, 16, None)
            and k["impl"] != "reference"
        ):
            verdict = "met" if k["frac_of_copy"] >= KERNEL_OF_COPY else "missed"
            at = "" if k["batch"] is None else f" N={k['batch']}"
            out.append(
                f"{k['name']} [{k['impl']}] {k['shape']}{at} >= {KERNEL_OF_COPY:.2f} of copy: "
                f"{k['frac_of_copy']:.2f} ({verdict})"
            )
    return out


def update_benchmarks(path: Path, section: str) -> None:
    """Replace the generated GPU section (or the hand-written `## GPU` tail) of benchmarks.md."""
    text = path.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
    elif "\n## GPU" in text:
        head, tail = text[: text.index("\n## GPU") + 1], ""
    else:
        head, tail = text.rstrip("\n") + "\n\n", ""
    path.write_text(head + section + tail)


def updated_tuning(rows: list[dict], data: dict) -> str:
    """pallas_kernels/tuning.py with this run's measured winners and best blocks merged in."""
    unmerged, switch = tuning.UNMERGED, dict(tuning.SWITCH)
    run = f"{data['device']} jax {data['jax']} {data['date']}"
    best_blocks = {}
    for r in rows:
        if r.get("part") == "tune_unmerged" and "us" in r:
            key = (r["out"], r["d_in"])
            if key not in best_blocks or r["us"] < best_blocks[key][0]:
                best_blocks[key] = (r["us"], r["blocks"])
    timed = {}
    for r in rows:
        if r.get("part") == "unmerged" and "us" in r and "out" in r and r["impl"] in LORA_IMPLS:
            timed.setdefault((r["out"], r["d_in"], r["n"]), {})[r["impl"]] = (r["us"], r["blocks"])
    for (out, d_in, n), by_impl in timed.items():
        swept = best_blocks.get((out, d_in))
        if "pallas" in by_impl and swept and n == 1 and swept[0] < by_impl["pallas"][0]:
            by_impl["pallas"] = swept
        winner = min(by_impl, key=lambda i: by_impl[i][0])
        pallas_blocks = (swept or by_impl.get("pallas", (0, None)))[1]
        # decode sizes time the one-launch kernel (the dispatch runs it there whatever won)
        key = "fused_blocks" if n <= dispatch.FUSED_MAX_ROWS else "blocks"
        entry = {
            "n_max": n,
            "impl": winner,
            key: pallas_blocks or tuning_blocks(unmerged, out, d_in, n, key),
            "source": f"{run}: "
            + ", ".join(f"{i} {v[0]:.1f} us" for i, v in by_impl.items())
            + (" (pallas blocks: best of the N=1 sweep)" if swept else ""),
        }
        if entry[key] is None:
            entry.pop(key)
        unmerged = bench.merge_unmerged_entry(unmerged, out, d_in, entry)
    for r in rows:
        if r.get("part") == "tune_switch" and "ms" in r:
            key = (r["out"], r["d_in"])
            old = switch.get(key, {}).get("_ms")
            if old is None or r["ms"] < old:
                switch[key] = {
                    "blocks": r["blocks"],
                    "_ms": r["ms"],
                    "source": f"{run}: best of the sweep, {r['ms']:.3f} ms for "
                    f"{r['layers']} layers ({r['frac_of_copy']:.2f} of copy)",
                }
    switch = {k: {kk: vv for kk, vv in v.items() if kk != "_ms"} for k, v in switch.items()}
    return bench.render_tuning(
        unmerged, switch, device=data["device"], jax_version=data["jax"], date=data["date"]
    )


def tuning_blocks(table: dict, out: int, d_in: int, n: int, key: str = "blocks"):
    for e in table.get((out, d_in), []):
        if n <= e["n_max"] and key in e:
            return e[key]
    return None


def summary(rows: list[dict], data: dict) -> str:
    lines = [
        f"# GPU check: {data['device']}, jax {data['jax']}, {data['date']}",
        f"copy {data['copy_gbs']} GB/s; tests {data['tests']}",
    ]
    read = next((r["gbs"] for r in rows if r.get("part") == "read" and "gbs" in r), None)
    if read:
        lines.append(f"read {read} GB/s")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "## Errors"] + [
            f"- {r.get('stage')}/{r.get('part')} {r.get('shape', r.get('plan', ''))}: "
            f"{r['error'][:200]}"
            for r in errors
        ]
    correct = [r for r in rows if r.get("part") == "correct"]
    if correct:
        lines += ["", "## Correctness (bf16; ok: rel err vs fp32 < 1e-2)"]
        lines += [
            f"- {r['kernel']} {r.get('impl')} {r['shape']} n={r.get('n', r.get('layers'))}: "
            f"vs ref {r['rel_vs_ref']:.2e}, ok={r['ok']}"
            for r in correct
        ]
    lines += ["", "## Kernels"] + [
        f"- {k['name']} [{k['impl']}] {k['shape']} N={k['batch']}: "
        f"{k['gbs']} GB/s ({k['frac_of_copy']:.2f} of copy)"
        for k in data["kernels"]
    ]
    us = {}
    for r in rows:
        if r.get("part") == "unmerged" and "us" in r:
            us.setdefault((r["shape"], r["n"]), {})[r["impl"]] = r["us"]
    lines += ["", "## Unmerged us per call (winner first)"]
    for (shape, n), d in us.items():
        lines.append(
            f"- {shape} N={n}: "
            + ", ".join(f"{i} {v}" for i, v in sorted(d.items(), key=lambda x: x[1]))
        )
    lines += ["", "## Decode"] + [
        f"- {r['name']} b{r['batch']} [{r['impl']}]: {r['ms_per_token']:.2f} "
        f"ms/token, roofline {r['roofline_frac']:.2f}"
        for r in data["rows"]
    ]
    skipped = [r for r in rows if isinstance(r.get("skipped"), str)]
    if skipped:
        lines += ["", "## Skipped"] + [
            f"- {r.get('stage')} {r.get('plan', r.get('shape', ''))} "
            f"{r.get('batch', r.get('n', ''))}: {r['skipped']}"
            for r in skipped
        ]
    lines += ["", "## Targets"] + [f"- {t}" for t in targets(data)]
    return "\n".join(lines) + "\n"


def main(args) -> None:
    results = args.results or args.out / "results.jsonl"
    rows = load(results)
    if args.legacy_run1:
        rows = legacy_run1(rows)
    data = build(rows, args.tests, args.date)
    command = args.command or (
        "bash ../shared/gpu/gpu_check.sh (the first, shared GPU script)"
        if args.legacy_run1
        else "OUT=<dir> BUDGET=<s> bash scripts/gpu_check.sh"
    )
    notes = RUN1_NOTES if args.legacy_run1 else list(args.note or [])
    section = render_md(data, rows, command=command, notes=notes)
    (args.out / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "benchmarks_gpu.md").write_text(section)
    if not args.legacy_run1:
        (args.out / "tuning.py").write_text(updated_tuning(rows, data))
    text = summary(rows, data)
    (args.out / "summary.md").write_text(text)
    print(text)
    if args.docs:
        (REPO / "docs/figures/gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
        update_benchmarks(REPO / "docs/benchmarks.md", section)

"""Cluster-scale co-migration simulation: p99 latency vs load, with and without co-migration.

Writes ``cluster_sim.json``, ``cluster_sim.md`` (a markdown table) and ``cluster_sim_p99.png``
into ``--out-dir`` and prints the command that reproduces them. Example:

    python scripts/simulate_cluster.py --replicas 200 --adapters 2000 --loads 0.3,0.5,0.7,0.9
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import shlex
import sys

import numpy as np
import scipy

from lsw_jax.cluster.simulator import (
    ClusterConfig,
    MigrationPolicy,
    StepCostTable,
    generate_workload,
    simulate,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=200)
    p.add_argument("--adapters", type=int, default=2000)
    p.add_argument("--slots", type=int, default=32, help="adapter slots per replica")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="simulated seconds")
    p.add_argument("--loads", default="0.3,0.5,0.7,0.9", help="fractions of nominal capacity")
    p.add_argument("--policies", default="none,greedy", help="none, greedy, exact")
    p.add_argument("--home", default="hash", choices=("hash", "round_robin"))
    p.add_argument("--period", type=float, default=1.0, help="seconds between co-migrations")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--drift-fraction", type=float, default=0.1)
    p.add_argument("--burst-rate", type=float, default=0.05)
    p.add_argument("--step-costs", type=pathlib.Path, help="JSON from the serving benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("docs/figures"))
    return p.parse_args(argv)


def markdown_table(rows) -> str:
    head = (
        "| load | policy | p50 s | p90 s | p99 s | throughput req/s | unfinished "
        "| requests moved | adapter loads | planner s | wall s |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['load']:.2f} | {r['policy']} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} "
        f"| {r['throughput_rps']:.0f} | {r['unfinished']} | {r['requests_moved']} "
        f"| {r['adapter_loads']} | {r['planner_s']:.2f} | {r['wall_s']:.1f} |\n"
        for r in rows
    )
    return head + body


def plot(rows, path: pathlib.Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"none": "no migration (static)", "greedy": "co-migration (greedy)",
              "exact": "co-migration (exact MILP)"}  # fmt: skip
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [(r["load"], r["p99"]) for r in rows if r["policy"] == policy]
        ax.plot(*zip(*pts, strict=True), marker="o", label=labels.get(policy, policy))
    ax.set_xlabel("offered load (fraction of nominal capacity)")
    ax.set_ylabel("p99 latency (s)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    steps = StepCostTable()
    if args.step_costs:
        steps = StepCostTable.from_dict(json.loads(args.step_costs.read_text()))
    base = ClusterConfig(
        num_replicas=args.replicas,
        num_adapters=args.adapters,
        replica_slots=args.slots,
        max_batch=args.max_batch,
        duration=args.duration,
        zipf_alpha=args.zipf,
        drift_fraction=args.drift_fraction,
        burst_rate=args.burst_rate,
        step_costs=steps,
        seed=args.seed,
    )
    rows = []
    for load in (float(x) for x in args.loads.split(",")):
        cfg = dataclasses.replace(base, load=load)
        workload = generate_workload(cfg)  # the same requests for every policy
        for name in args.policies.split(","):
            policy = MigrationPolicy(name=name, home=args.home, period=args.period)
            result = simulate(cfg, policy, workload).to_dict()
            rows.append(result)
            print(
                f"load {load:.2f} {name:>6}: p50 {result['p50']:.2f} s, p99 {result['p99']:.2f} s, "
                f"{result['throughput_rps']:.0f} req/s, wall {result['wall_s']:.1f} s",
                flush=True,
            )
    command = "python " + " ".join(
        shlex.quote(a) for a in ["scripts/simulate_cluster.py", *sys.argv[1:]]
    )
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()})",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "command": command,
        "config": {**dataclasses.asdict(base), "load": None},
        "step_costs_measured": steps.measured,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "cluster_sim.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    note = "" if steps.measured else " (step costs: placeholders)"
    table = markdown_table(rows)
    (args.out_dir / "cluster_sim.md").write_text(
        f"{args.replicas} replicas, {args.adapters} adapters, Zipf {args.zipf}, "
        f"{args.duration:g} s simulated{note}; {meta['date']}, {meta['device']}.\n\n"
        f"`{command}`\n\n{table}"
    )
    title = f"{args.replicas} replicas, {args.adapters} adapters, Zipf {args.zipf}{note}"
    plot(rows, args.out_dir / "cluster_sim_p99.png", title)
    print(table)
    print(f"wrote {args.out_dir}/cluster_sim.{{json,md}} and cluster_sim_p99.png")
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()

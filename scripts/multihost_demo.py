"""Two JAX processes on one machine, 4 fake CPU devices each, one sharded forward.

    python scripts/multihost_demo.py            # launches both processes, then checks
    python scripts/multihost_demo.py --worker --process-id 0 --port 12355 --out DIR

Each worker calls ``jax.distributed.initialize(coordinator_address="127.0.0.1:PORT",
num_processes=2, process_id=i)``, builds the same tiny model (same seed), lays it out on a
``data=2,fsdp=2,tensor=2`` mesh spanning all 8 devices of both processes
(``lsw_jax.sharding``), runs the forward under jit (XLA's collectives cross the process
boundary over gloo), gathers the logits and writes them. The launcher compares both
processes' logits with a single-process, single-device forward. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=2,tensor=2"


def _model_and_ids():
    import numpy as np

    from lsw_jax.config import ModelConfig
    from lsw_jax.model.llama import init_model

    cfg = ModelConfig.tiny(num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=128)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 12)).astype(np.int32)
    return init_model(cfg, seed=0, dtype="float32"), ids


def worker(process_id: int, port: int, out: Path) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from lsw_jax import sharding as sh

    mesh = sh.MeshConfig.parse(MESH).make()
    model, ids = _model_and_ids()
    sh.shard_model(model, mesh)
    ids = sh.place(ids, sh.named_sharding(("batch", "length"), ids.shape, mesh))
    logits = nnx.jit(lambda m, x: m(x))(model, ids)
    full = multihost_utils.process_allgather(logits, tiled=True)
    np.save(out / f"logits_{process_id}.npy", np.asarray(full))
    info = {
        "process": jax.process_index(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "logits_sharding": str(logits.sharding.spec),
    }
    (out / f"info_{process_id}.json").write_text(json.dumps(info))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(timeout: float) -> dict:
    """Run both workers, then the single-process reference; returns the report."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    port = _free_port()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--process-id",
                    str(i),
                    "--port",
                    str(port),
                    "--out",
                    tmp,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        logs, codes = [], []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[0] + "\n[timed out]")
            codes.append(p.returncode)
        report: dict = {"returncodes": codes, "seconds": round(time.perf_counter() - t0, 1)}
        if any(codes):
            report["error"] = [log[-3000:] for log in logs]
            return report
        import numpy as np
        from flax import nnx

        model, ids = _model_and_ids()
        ref = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
        errs = []
        for i in range(2):
            got = np.load(Path(tmp) / f"logits_{i}.npy")
            errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
            report[f"process_{i}"] = json.loads((Path(tmp) / f"info_{i}.json").read_text())
        report["rel_err"] = errs
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per worker")
    args = ap.parse_args()
    if args.worker:
        worker(args.process_id, args.port, args.out)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report = launch(args.timeout)
    print(json.dumps(report))
    ok = not report.get("error") and max(report["rel_err"]) < 1e-5
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""scripts/gpu_check.sh cannot rot: SMOKE=1 runs every stage on the CPU at tiny shapes, and the
report turns the first GPU run's raw results into the committed docs data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = {"device", "jax", "date", "copy_gbs", "rows", "kernels", "tests"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_smoke_runs_every_stage_and_reports(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PY": sys.executable}
    subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, check=True, timeout=900)
    rows = _rows(tmp_path / "results.jsonl")
    assert [r for r in rows if "error" in r] == []
    stages = {r["stage"]: r["status"] for r in rows if r.get("part") == "stage"}
    assert stages == dict.fromkeys(
        ["env", "kernels", "decode1", "sweep", "tests", "decode16"], "ok"
    )
    assert all(r["ok"] for r in rows if r.get("part") == "correct")
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data) == KEYS and data["copy_gbs"] > 0
    got = {(r["name"], r["batch"], r["impl"]) for r in data["rows"]}
    assert got >= {
        ("base", 1, "auto"),
        ("switch_unmerged", 1, "pallas"),
        ("switch_unmerged", 1, "reference"),
        ("switch_merged", 1, "auto"),
        ("switch_unmerged", 3, "pallas"),
    }
    assert {k["name"] for k in data["kernels"]} >= {
        "lora_unmerged",
        "switch_merge",
        "xla_gemm_base",
    }
    assert data["tests"]["skipped"] > 0 and data["tests"]["failed"] == 0  # GPU classes, on CPU
    section = (tmp_path / "benchmarks_gpu.md").read_text()
    assert section.startswith("<!-- gpu_check:begin -->") and "### Decode" in section
    scope: dict = {}  # the proposed tuning table is valid Python with both tables
    exec(compile((tmp_path / "tuning.py").read_text(), "tuning.py", "exec"), scope)
    assert scope["UNMERGED"] and scope["SWITCH"]


def test_first_run_report_matches_its_archived_json(tmp_path):
    """The first run's raw results give the archived gpu_check.json (docs/figures/gpu_check.json
    was that file until a later run replaced it), with the raw numbers unchanged."""
    cmd = [
        sys.executable, "scripts/gpu_check.py", "report", "--out", str(tmp_path),
        "--results", "docs/figures/gpu_runs/2026-11-26_h200_run1_results.jsonl",
        "--legacy-run1", "--tests", "26,0,0", "--date", "2026-11-26",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    got = json.loads((tmp_path / "gpu_check.json").read_text())
    archived = REPO / "docs/figures/gpu_runs/2026-11-26_h200_run1_gpu_check.json"
    assert got == json.loads(archived.read_text())
    assert set(got) == KEYS and got["device"] == "NVIDIA H200" and got["jax"] == "0.11.2"
    base = next(r for r in got["rows"] if r["name"] == "base" and r["batch"] == 1)
    assert base["ms_per_token"] == pytest.approx(4.361, abs=1e-3)
    raw = [
        json.loads(line)
        for line in open(REPO / "docs/figures/gpu_runs/2026-11-26_h200_run1_results.jsonl")
    ]
    copy = next(r["gbs"] for r in raw if r.get("part") == "copy")
    assert got["copy_gbs"] == copy == 2782.3
    unm = next(
        r for r in raw if r.get("part") == "row" and r["plan"] == "unmerged" and r["batch"] == 1
    )
    row = next(r for r in got["rows"] if r["name"] == "switch_unmerged" and r["batch"] == 1)
    assert row["ms_per_token"] == pytest.approx(unm["ms_step"], abs=1e-3)
    assert row["roofline_frac"] == pytest.approx(unm["pct_of_floor"] / 100)

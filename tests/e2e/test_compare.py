"""``fedpeft compare`` on real runs of ``fedpeft simulate --multirun`` (each on Flower's simulation
engine with Ray), with a killed and a failed run beside them."""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import PNG, read_csv

FEDPEFT = str(Path(sys.executable).with_name("fedpeft"))


SMALL = ["data=rotten_tomatoes", "clients=2", "rounds=2", "train.local_steps=2", "data.eval_samples=64", "model.max_length=32",
         "tracking.save_adapters=false", "tracking.mode=disabled"]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """Four real runs (FedAvg and FFA-LoRA × seeds 0, 1) in one process, then a copy of one without
    summary.json (a killed run) and one whose summary says failed."""
    sweep = tmp_path_factory.mktemp("compare") / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "FLWR_TELEMETRY_ENABLED": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    proc = subprocess.run([FEDPEFT, "simulate", "--multirun", "seed=0,1", "strategy=fedavg,ffa_lora", *SMALL, f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, env=env, cwd=sweep.parent, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "summary.json").exists())
    assert len(jobs) == 4, [p.name for p in sweep.iterdir()]
    shutil.copytree(jobs[0], sweep / "killed")
    (sweep / "killed" / "summary.json").unlink()
    shutil.copytree(jobs[1], sweep / "failed")
    summary = json.loads((sweep / "failed" / "summary.json").read_text())
    summary.update(status="failed", error="every client failed in round 2")
    (sweep / "failed" / "summary.json").write_text(json.dumps(summary))
    return sweep, jobs


@pytest.mark.slow
def test_compare_on_real_runs(real_sweep, tmp_path):
    sweep, jobs = real_sweep
    proc = subprocess.run([FEDPEFT, "compare", str(sweep), "--title", "FedAvg vs FFA-LoRA"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sweep / "compare"
    for name in ("compare.md", "compare.csv", "runs.csv", "accuracy_vs_round.png", "accuracy_vs_mb_up.png"):
        assert str(out / name) in proc.stdout
    for name in ("accuracy_vs_round.png", "accuracy_vs_mb_up.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000

    # the expected numbers, straight from the runs' own summary.json and metrics.jsonl
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    want: dict[str, list] = {}
    for j, s in zip(jobs, summaries):
        want.setdefault(s["strategy"], []).append((j, s))
    rows = {r["group"]: r for r in read_csv(out / "compare.csv")}
    assert sorted(rows) == ["strategy=fedavg", "strategy=ffa_lora"]
    for strategy, members in want.items():
        row = rows[f"strategy={strategy}"]
        finals = [s["final"]["accuracy"] for _, s in members]
        assert row["n"] == "2" and row["seeds"] == "0 1"
        assert float(row["accuracy_final_mean"]) == pytest.approx(statistics.mean(finals), abs=1e-12)
        assert float(row["accuracy_final_std"]) == pytest.approx(statistics.stdev(finals), abs=1e-12)
        ups = [sum(json.loads(l).get("bytes_up", 0) for l in (j / "metrics.jsonl").read_text().splitlines()) / 1e6 for j, _ in members]
        assert float(row["mb_up"]) == pytest.approx(statistics.mean(ups), rel=1e-12) and float(row["mb_up"]) > 0
        assert float(row["seconds"]) == pytest.approx(statistics.mean(s["seconds"] for _, s in members))
    assert float(rows["strategy=ffa_lora"]["mb_up"]) < float(rows["strategy=fedavg"]["mb_up"])  # FFA-LoRA sends B only

    md = (out / "compare.md").read_text()
    assert md.startswith("# FedAvg vs FFA-LoRA") and "`strategy.name`" in md
    assert "- missing: `killed` — no summary.json (crashed, still running or killed); metrics.jsonl holds rounds 0–2 of 2" in md
    assert "- partial: `failed` — status failed: every client failed in round 2; rounds 0–2 of 2 logged" in md
    assert "| strategy=fedavg | 2 | 0, 1 |" in proc.stdout and "incomplete runs (not in the aggregates): 2" in proc.stdout
    assert len(read_csv(out / "runs.csv")) == 6

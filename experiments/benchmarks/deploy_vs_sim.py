"""Seconds per round, framework overhead and bytes: the simulation engine vs a real local deployment
(a SuperLink and 3 SuperNodes with TLS and node authentication), same config and seed.

    .venv/bin/python experiments/benchmarks/deploy_vs_sim.py [overrides...]

Overhead = a round's wall time (sampling, messages, waiting, aggregation) minus its slowest
client's training time. The first round includes every worker's cold start (loading torch, the
model and the data), so it is reported apart from the later rounds' mean.
"""

import json
import sys
import tempfile
from pathlib import Path

from fedpeft.composing import compose
from fedpeft.deploy import Deployment, make_pki, node_configs
from fedpeft.launch import project_dir, setup_env
from fedpeft.runconfig import to_run_config
from fedpeft.simulation import run

DEFAULT = ["clients=3", "rounds=4", "train.local_steps=5", "model.rank=8", "data.eval_samples=200", "tracking.mode=disabled"]


def figures(run_dir: Path) -> dict:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    per = [(r["round_seconds"], r["round_seconds"] - r.get("train_seconds_max", 0.0), r["bytes_down"], r["bytes_up"]) for r in rows]
    later = per[1:] or per
    mean = lambda i: sum(p[i] for p in later) / len(later)  # noqa: E731
    return {"round1_s": per[0][0], "round1_overhead_s": per[0][1], "later_round_s": mean(0), "later_overhead_s": mean(1),
            "bytes_down_per_round": mean(2), "bytes_up_per_round": mean(3), "final": rows[-1].get("accuracy", rows[-1].get("perplexity"))}


def main(overrides: list[str]) -> None:
    setup_env()
    cfg = compose([*DEFAULT, *overrides])
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-bench-"))
    run(cfg, tmp / "sim")
    with Deployment(tmp / "deploy", cfg.clients, node_configs(cfg, tmp), pki=make_pki(tmp / "pki", cfg.clients)) as dep:
        dep.run(project_dir(), to_run_config(cfg, tmp / "dep"), timeout=cfg.engine.round_timeout * (cfg.rounds + 1))
    print(f"\n{' '.join([*DEFAULT, *overrides])}")
    print(f"{'engine':<12}{'round 1 s':>10}{'overhead':>10}{'later s':>10}{'overhead':>10}{'down B/rnd':>12}{'up B/rnd':>12}{'final':>9}")
    for name, d in (("simulation", tmp / "sim"), ("deployment", tmp / "dep")):
        f = figures(d)
        print(f"{name:<12}{f['round1_s']:>10.1f}{f['round1_overhead_s']:>10.1f}{f['later_round_s']:>10.1f}{f['later_overhead_s']:>10.1f}"
              f"{f['bytes_down_per_round']:>12.0f}{f['bytes_up_per_round']:>12.0f}{f['final']:>9.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Benchmark: one 100-client round, (a) the FlowerTune way — the model built inside every client
call — against (b) the fedpeft way — the base model loaded once per worker process and reused.

Both runs are real `fedpeft simulate` federations (Flower simulation engine, Ray backend) that
differ only in `engine.reuse_model`; the round time is measured by the server from sending the
first train message to the end of aggregation. Prints both round times and their ratio.

    .venv/bin/python experiments/benchmarks/model_reuse.py [--clients 100] [--steps 1] [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def round_seconds(reuse: bool, clients: int, steps: int, extra: list[str], out: Path) -> float:
    run_dir = out / ("reuse" if reuse else "rebuild")
    cmd = [
        str(Path(sys.executable).with_name("fedpeft")), "simulate",
        f"clients={clients}", "rounds=1", "fraction=1.0", f"train.local_steps={steps}", "train.batch_size=8",
        f"engine.reuse_model={str(reuse).lower()}", "tracking.mode=disabled", "tracking.save_adapters=false",
        "data.eval_samples=64", f"hydra.run.dir={run_dir}", *extra,
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((run_dir / "summary.json").read_text())
    return float(summary["history"][-1]["round_seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1, help="local steps per client")
    ap.add_argument("overrides", nargs="*", help="extra fedpeft simulate overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a = round_seconds(False, args.clients, args.steps, args.overrides, Path(tmp))
        b = round_seconds(True, args.clients, args.steps, args.overrides, Path(tmp))
    print(f"\n{args.clients}-client round, {args.steps} local step(s) each:")
    print(f"  (a) model built in every client call (FlowerTune way): {a:8.1f} s")
    print(f"  (b) model loaded once per worker (fedpeft):           {b:8.1f} s")
    print(f"  ratio a/b: {a / b:.1f}x")


if __name__ == "__main__":
    main()

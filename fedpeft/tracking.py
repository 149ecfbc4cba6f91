"""Run directory, metrics.jsonl, per-round peft checkpoints, W&B (server side only), progress lines."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("fedpeft.tracking")


def wandb_mode(mode: str) -> str:
    """``auto`` is online with an API key and offline without one."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], *, mode: str, project: str, group: str, tags: list[str], resume: bool = False):
        """``resume``: continue the run in ``run_dir`` (its W&B run too: same id, logging from the next step)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.mode = wandb_mode(mode)
        self.wandb = None
        if self.mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb-id"
            run_id = id_file.read_text().strip() if resume and id_file.exists() else None
            self.wandb = wandb.init(
                id=run_id,
                resume="allow" if run_id else None,
                project=project,
                group=group,
                name=self.run_dir.name,
                tags=tags,
                config=dict(config),
                dir=str(self.run_dir),
                mode=self.mode,
                settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
            )
            id_file.write_text(self.wandb.id + "\n")

    def log_round(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        row = {"round": server_round, "elapsed_s": round(time.perf_counter() - self.t0, 3), **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=server_round)

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.run_dir / "adapters" / f"round_{server_round:03d}"

    def finish(self, summary: Mapping[str, Any], exit_code: int = 0) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.wandb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.wandb.summary[k] = v
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None


def progress_line(server_round: int, rounds: int, m: Mapping[str, Any], elapsed: float) -> str:
    parts = [f"round {server_round}/{rounds}"]
    for key, fmt in (("accuracy", "acc {:.4f}"), ("perplexity", "ppl {:.2f}"), ("loss", "loss {:.4f}"), ("train_loss", "train_loss {:.4f}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    if "clients_sampled" in m:
        notes = [f"{int(m[k])} {word}" for k, word in (("clients_failed", "failed"), ("clients_rejected", "rejected")) if m.get(k)]
        parts.append(f"clients {int(m['clients_replied'])}/{int(m['clients_sampled'])}" + (f" ({', '.join(notes)})" if notes else ""))
        if "round_applied" in m and not m["round_applied"]:
            parts.append("not applied (too few good updates)")
    if "epsilon" in m:
        parts.append(f"ε {m['epsilon']:.3f}")
    if "bytes_down" in m:
        parts.append(f"down {m['bytes_down'] / 1e6:.2f} MB up {m['bytes_up'] / 1e6:.2f} MB")
    parts.append(f"{elapsed:.0f}s")
    return " | ".join(parts)


def say(line: str) -> None:
    print(f"[fedpeft] {line}", file=sys.stdout, flush=True)

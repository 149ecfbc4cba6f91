"""``engine.ray_address``: a Ray cluster of several machines, which need not share a disk.

What a client needs across rounds travels with Flower's node state or the messages (FLoRA's
merges, FedSA-LoRA's own B, a top-k residual, a cohort member's state): a fresh run needs nothing
of the run directory on the other machines. What does not travel yet is what a *resumed* run reads
back: each client's own state is checkpointed as files under ``<run>/state/client_<id>`` on the
machine that trained it (the node state of a new Flower run is empty), so a run that keeps such
state (FedSA-LoRA's personal B, top-k with error feedback) is refused in one line when resumed on
a cluster whose machines do not all see its run directory (:func:`check`).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError


def client_files(cfg: Any) -> str | None:
    """What of ``cfg``'s clients' state a resumed run reads back from each client's files, or None."""
    import strategies  # lazy: the strategy registry (its classes, not torch)

    kept = []
    if strategies.personalized(cfg.strategy.name):
        kept.append(f"strategy={cfg.strategy.name}'s personal B")
    if cfg.compression.uplink == "topk" and cfg.compression.error_feedback:
        kept.append("the top-k error-feedback residuals")
    return " and ".join(kept) or None


def refusal(cfg: Any, run_dir: Path, resume: bool, blind: list[str], machines: int) -> str | None:
    """The one-line refusal of a run on a cluster of ``machines`` whose nodes ``blind`` (their
    addresses) cannot see ``run_dir``, or None when it can run there."""
    what = client_files(cfg)
    if not blind or not resume or what is None:
        return None
    return (f"resume={run_dir} on a Ray cluster of {machines} machines, {len(blind)} of which ({', '.join(blind)}) cannot see the run "
            f"directory: {what} are checkpointed in {Path(run_dir) / 'state'}/client_<id> on the machine that trained each client; "
            f"resume on one machine, or with the run directory on a disk every machine mounts")


def blind_nodes(run_dir: Path) -> tuple[list[str], int]:
    """(the addresses of the alive Ray nodes that cannot see ``run_dir``, the number of alive
    nodes), asked of each node by a zero-CPU task pinned to it. Ray must be initialised."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return [], len(nodes)
    marker = Path(run_dir) / f".fedpeft-cluster-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        sees = ray.remote(num_cpus=0)(lambda path: Path(path).exists())
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker)) for n in nodes]
        return [n.get("NodeManagerAddress", n["NodeID"]) for n, ok in zip(nodes, ray.get(refs, timeout=120)) if not ok], len(nodes)
    finally:
        marker.unlink(missing_ok=True)


def check(cfg: Any, run_dir: Path, resume: bool) -> None:
    """Refuse (:class:`ConfigError`, one line) a run that a cluster without a shared run directory
    would silently get wrong (:func:`refusal`); nothing to check without ``engine.ray_address``, or
    when nothing of the run is read back from client files."""
    if not cfg.engine.ray_address or not resume or client_files(cfg) is None:
        return
    blind, machines = blind_nodes(run_dir)
    line = refusal(cfg, run_dir, resume, blind, machines)
    if line is not None:
        raise ConfigError(line)

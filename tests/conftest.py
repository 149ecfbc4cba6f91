import os
import sys

import absl.logging
import pytest
import torch
from torch.overrides import TorchFunctionMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# dp-accounting (the independent accountant in test_privacy) imports absl, whose log handler binds
# the sys.stderr of import time — a pytest capture. Hydra's logging setup closes every handler, and
# absl's would close that capture with it: point absl at the real stderr, which it never closes.
absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the run's identity; run_simulation sets it, so do we here."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class FakeGrid:
    """A Flower grid for in-process tests of the server adapter: ``nodes`` maps node id → partition
    id, and query messages are answered the way ``clients.app.query_handler`` answers them."""

    def __init__(self, nodes):
        self.nodes = dict(nodes)
        self.queries = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, msgs, *, timeout=None):
        from types import SimpleNamespace

        from flwr.app import ConfigRecord, RecordDict

        out = []
        for m in msgs:
            self.queries += 1
            node = m.metadata.dst_node_id
            content = RecordDict({"config": ConfigRecord({"partition-id": self.nodes[node]})})
            out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=m.metadata.message_id), has_error=lambda: False, content=content))
        return out


@pytest.fixture
def fake_grid():
    return FakeGrid


def listeners():
    """(address, port, pids) of every listening TCP socket, from ``ss -ltnp``."""
    import re
    import subprocess

    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        addr, _, port = fields[3].rpartition(":")
        rows.append((addr.strip("[]"), int(port), {int(p) for p in re.findall(r"pid=(\d+)", line)}))
    return rows


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns (no monkeypatching), and fails at once
    when one exceeds ``limit`` elements (so a dense implementation fails fast instead of going on to
    decompose a 20000 × 20000 matrix)."""

    def __init__(self, limit=float("inf")):
        super().__init__()
        self.limit = limit
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                if t.numel() > self.limit:
                    raise AssertionError(f"{func} made a {tuple(t.shape)} tensor")
        return out


def pruning_plan(gamma: float, lam: float, r_min: int, **plan):
    """A client plan with HetLoRA's self-pruning (its loss term and its finalisation), as HetLoRA's
    payload builds it; ``plan``: the plan's other fields."""
    from fedpeft.plan import ClientPlan, SelfPruning

    prune = SelfPruning(gamma=gamma, lam=lam, r_min=r_min)
    return ClientPlan(loss_term=prune, finalise=prune, **plan)

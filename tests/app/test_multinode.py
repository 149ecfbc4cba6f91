"""A Ray cluster whose machines share no disk, in-process: :class:`tests.harness.Machines` sends each
message to the next machine in turn, whose worker has its own cached base model and sees an empty
directory where the driver keeps the run (as a tmpfs over the run's path on another machine); the
node's Flower state travels with the message, as Flower's simulation carries it. Whatever a client
needs across rounds (FLoRA's merges, FedSA-LoRA's own B, a cohort member's top-k residual) must
travel with it: each run equals the same run on one machine, round by round (the real thing, two
Ray nodes on loopback: tests/e2e/test_multinode.py)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from clients import app as client_app
from fedpeft.composing import compose
from fedpeft.runconfig import RunSpec, to_run_config
from fedpeft.serverapp import Federation
from tests.harness import AppGrid, Machines

pytestmark = pytest.mark.usefixtures("task_identity", "one_torch_thread")

BASE = [
    "clients=4", "rounds=3", "model.rank=4", "model.alpha=8", "model.max_length=16", "train.local_steps=2", "train.batch_size=4",
    "data.eval_samples=16", "model.eval_batch_size=16", "tracking.mode=disabled", "engine.num_cpus=1", "engine.device=cpu",
]
KEYS = ("loss", "accuracy", "clients_sampled", "clients_replied", "clients_failed", "clients_rejected", "round_applied", "bytes_down", "bytes_up")


def federate(run_dir, overrides, run_id, machines=1, resume=False):
    """The real server over the real ClientApp on one machine (:class:`AppGrid`) or on ``machines``
    that share no disk (:class:`Machines`); (the federation, the grid). ``resume``: a new Flower run
    (new, empty node states) continuing the run in ``run_dir``."""
    cfg = compose([*BASE, *overrides])
    shared = run_dir / "state"
    rc = to_run_config(cfg, run_dir, shared_dir=str(shared), resume=resume)
    contexts = {100 + i: Context(run_id=run_id, node_id=100 + i, node_config={"partition-id": i, "num-partitions": cfg.clients},
                                 state=RecordDict(), run_config=rc) for i in range(cfg.clients)}
    others = [run_dir.parent / f"{run_dir.name}_machine_{k}" / "state" for k in range(1, machines)]
    grid = Machines(contexts, [shared, *others]) if machines > 1 else AppGrid(contexts)
    client_app._MODELS.clear()
    fed = Federation(cfg, RunSpec(run_dir, resume=resume, shared_dir=str(shared)))
    fed.run(grid)
    return fed, grid


def rows(fed):
    return [{k: r.get(k) for k in KEYS + tuple(k for k in r if k.startswith("personal"))} for r in fed.history]


def assert_same_run(one, many, grid):
    assert all(n > 0 for n in grid.served), grid.served  # every machine served clients
    assert rows(many) == rows(one)
    a, b = one.adapter.state_dict()["model"], many.adapter.state_dict()["model"]
    for (ka, ta), (kb, tb) in zip(sorted(_tensors(a)), sorted(_tensors(b))):
        assert ka == kb and torch.equal(ta, tb), ka


def _tensors(state, path=""):
    if isinstance(state, torch.Tensor):
        yield path, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{path}[{i}]")


CASES = {
    # a worker behind its node gets the merges it lacks from the node's state, not from state/merges
    "flora_fraction_half_with_failures": (["strategy=flora", "fraction=0.5", "min_clients=1", "profile.failure_rate=0.3", "rounds=4"], 1),
    # each client's own B follows its node state; a missing file is no longer B = 0
    "fedsa_lora": (["strategy=fedsa_lora", "fraction=0.5", "min_clients=1"], 2),
    # each cohort member's state (top-k residual, FLoRA's merges) travels with its cohort
    "cohort_topk_flora": (["strategy=flora", "engine.kind=cohort", "engine.cohort_size=2", "fraction=0.75", "compression=topk",
                           "compression.topk_fraction=0.2"], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_on_machines_that_share_no_disk_equals_the_run_on_one(case, tmp_path):
    overrides, seed = CASES[case]
    one, _ = federate(tmp_path / "one", overrides, run_id=40 + 2 * seed)
    many, grid = federate(tmp_path / "many", overrides, run_id=41 + 2 * seed, machines=2)
    assert_same_run(one, many, grid)
    assert not any((tmp_path / "many_machine_1").rglob("*merge_*"))  # no worker read or wrote a merge store on the other machine


def test_flora_resumed_on_machines_that_share_no_disk_equals_the_uninterrupted_run(tmp_path):
    """A resumed run is a new Flower run: every node state starts empty, on every machine, so each
    node is sent the merges from version 1 (the server no longer trusts what the nodes had)."""
    over = ["strategy=flora", "fraction=0.5", "min_clients=1"]
    one, _ = federate(tmp_path / "one", over, run_id=51)
    federate(tmp_path / "many", [*over, "rounds=2"], run_id=52, machines=2)
    many, grid = federate(tmp_path / "many", over, run_id=53, machines=2, resume=True)
    last, want = rows(many)[-1], rows(one)[-1]
    assert last["bytes_down"] > want["bytes_down"]  # the resumed round resends every merge from version 1
    assert {**last, "bytes_down": None} == {**want, "bytes_down": None}
    a, b = one.adapter.state_dict()["model"], many.adapter.state_dict()["model"]
    for (ka, ta), (kb, tb) in zip(sorted(_tensors(a)), sorted(_tensors(b))):
        assert ka == kb and torch.equal(ta, tb), ka

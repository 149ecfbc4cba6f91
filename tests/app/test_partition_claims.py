"""The first node to claim a partition keeps it after a resume (issue 24, part 5), with the real
server (fedpeft.serverapp.Federation) and ClientApp in-process (tests/harness.py's AppGrid).

A run of 2 clients on nodes 100 and 101 completes round 1; it is resumed on the same nodes (a
SuperLink that kept its node ids) with a third node, 7, that also claims partition 1 and answers
first. Before, the claims were not saved: on resume node 7, the lower id, took partition 1 and
trained it. Now node 101 keeps it and node 7 is left out, named with its holder.
"""

import logging

import pytest
from flwr.app import Context, RecordDict

from tests.harness import AppGrid, federate

pytestmark = pytest.mark.usefixtures("task_identity", "one_torch_thread")


def test_a_resumed_run_keeps_who_holds_each_partition(tmp_path, caplog):
    from fedpeft.composing import compose
    from fedpeft.runconfig import RunSpec, to_run_config
    from fedpeft.serverapp import Federation

    overrides = ["clients=2", "rounds=1", "train.local_steps=1", "fraction=1.0", "min_clients=1"]
    cfg, summary = federate(tmp_path, *overrides, run_id=41)
    assert summary["status"] == "finished"

    run_dir = tmp_path / "run"
    cfg = compose(["tracking.mode=disabled", "model.rank=4", "model.alpha=8", "model.max_length=48", "data.eval_samples=256",
                   "engine.device=cpu", "engine.num_cpus=1", *overrides[:1], "rounds=2", *overrides[2:]])
    rc = to_run_config(cfg, run_dir, resume=True, shared_dir=str(run_dir / "state"))
    # node 7 claims partition 1 too, and is asked (and answers) first: its id sorts first
    claims = {7: 1, 100: 0, 101: 1}
    contexts = {n: Context(run_id=41, node_id=n, node_config={"partition-id": p, "num-partitions": 2}, state=RecordDict(), run_config=rc)
                for n, p in claims.items()}
    fed = Federation(cfg, RunSpec(run_dir, resume=True, shared_dir=str(run_dir / "state")))
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        summary = fed.run(AppGrid(contexts))
    assert summary["status"] == "finished"
    assert fed.adapter.partition_of == {100: 0, 101: 1}
    assert "node 7 left out: it did not identify its partition (partition-id 1 is held by node 101, the first node to claim it)" in caplog.text
    last = summary["history"][-1]
    assert (last["round"], last["clients_replied"], last["clients_missing"]) == (2, 2, 0), last

"""A Ray cluster whose machines do not all see the run directory (fedpeft/cluster.py): what does not
travel yet (a resumed run's client checkpoints) is refused in one line; everything else runs
(the runs themselves: tests/app/test_multinode.py; two real Ray nodes: tests/e2e/test_multinode.py)."""

from pathlib import Path

import pytest

from fedpeft import cluster
from fedpeft.composing import compose
from fedpeft.config import ConfigError


def test_a_resume_that_reads_client_checkpoints_is_refused_on_machines_that_cannot_see_them():
    run = Path("/runs/x")
    fedsa, topk = compose(["strategy=fedsa_lora"]), compose(["compression=topk"])
    assert cluster.client_files(compose([])) is None and cluster.client_files(compose(["strategy=flora"])) is None
    assert cluster.client_files(compose(["compression=topk", "compression.error_feedback=false"])) is None
    line = cluster.refusal(fedsa, run, True, ["10.0.0.2"], 2)
    assert line == ("resume=/runs/x on a Ray cluster of 2 machines, 1 of which (10.0.0.2) cannot see the run directory: "
                    "strategy=fedsa_lora's personal B are checkpointed in /runs/x/state/client_<id> on the machine that trained each client; "
                    "resume on one machine, or with the run directory on a disk every machine mounts")
    assert "the top-k error-feedback residuals are checkpointed" in cluster.refusal(topk, run, True, ["a", "b"], 3)
    assert cluster.refusal(fedsa, run, False, ["10.0.0.2"], 2) is None  # a fresh run: its clients' state travels
    assert cluster.refusal(fedsa, run, True, [], 2) is None  # every machine sees the run directory
    assert cluster.refusal(compose(["strategy=flora"]), run, True, ["10.0.0.2"], 2) is None  # merges are resent from version 1


def test_the_check_asks_no_cluster_when_nothing_is_read_back(monkeypatch):
    monkeypatch.setattr(cluster, "blind_nodes", lambda run_dir: (_ for _ in ()).throw(AssertionError("asked the cluster")))
    cluster.check(compose(["strategy=fedsa_lora"]), Path("/r"), True)  # no engine.ray_address
    cluster.check(compose(["strategy=fedsa_lora", "engine.ray_address=auto"]), Path("/r"), False)
    cluster.check(compose(["engine.ray_address=auto"]), Path("/r"), True)
    monkeypatch.setattr(cluster, "blind_nodes", lambda run_dir: (["127.0.0.2"], 2))
    with pytest.raises(ConfigError, match=r"^resume=/r on a Ray cluster of 2 machines, 1 of which \(127\.0\.0\.2\) cannot see"):
        cluster.check(compose(["strategy=fedsa_lora", "engine.ray_address=auto"]), Path("/r"), True)

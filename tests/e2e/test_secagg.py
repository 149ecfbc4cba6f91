"""Secure aggregation (``secagg.enabled=true``, Flower's SecAgg+) end to end: a tiny run on Flower's
simulation engine (Ray), and the same on a real local deployment (a SuperLink and three SuperNodes
with TLS and node authentication, on loopback), where each of the protocol's four messages per round
reaches its node through gRPC and the node's state carries the keys between them."""

import json
from pathlib import Path

import pytest

from fedpeft.composing import compose
from fedpeft.deploy import Deployment, make_pki, node_configs
from fedpeft.launch import project_dir
from fedpeft.runconfig import to_run_config
from tests.harness import simulate

pytestmark = pytest.mark.slow

SMALL = ["clients=3", "rounds=2", "train.local_steps=2", "model.rank=4", "model.alpha=8", "model.max_length=32",
         "data.eval_samples=64", "tracking.save_adapters=false", "secagg.enabled=true"]


def check(rows):
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert (r["clients_replied"], r["clients_failed"], r["round_applied"]) == (3, 0, 1)
        assert r["secagg_bytes_down"] > 0 and r["secagg_bytes_up"] > 0 and r["bytes_up"] > r["secagg_bytes_up"]


def test_a_tiny_simulation_aggregates_securely(tmp_path):
    _, summary = simulate(tmp_path, *SMALL, "engine.num_cpus=1")
    assert summary["status"] == "finished"
    check(summary["history"])


def test_a_tiny_deployment_aggregates_securely(tmp_path):
    cfg = compose([*SMALL, "tracking.mode=disabled"])
    with Deployment(tmp_path / "deploy", 3, node_configs(cfg, tmp_path), pki=make_pki(tmp_path / "pki", 3)) as dep:
        status = dep.run(project_dir(), to_run_config(cfg, tmp_path / "dep"), timeout=1800)
    assert status == "finished:completed"
    check([json.loads(l) for l in (Path(tmp_path) / "dep" / "metrics.jsonl").read_text().splitlines()])

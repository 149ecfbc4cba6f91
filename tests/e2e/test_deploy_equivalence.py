"""The same config and seed give the same federation in simulation and in a real deployment (a
SuperLink and three SuperNodes with TLS and node authentication, on loopback): the same metrics
every round (to 1e-6), the same bytes each way, the same final adapter."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.composing import compose
from fedpeft.deploy import Deployment, make_pki, node_configs
from fedpeft.launch import project_dir
from fedpeft.runconfig import to_run_config
from fedpeft.simulation import run

pytestmark = pytest.mark.slow

BASE = ["clients=3", "rounds=2", "train.local_steps=2", "model.rank=4", "model.alpha=8", "model.max_length=32",
        "data.eval_samples=64", "tracking.mode=disabled", "seed=5"]
# (FedAvg's plain path is part of both: each case sends full adapters down and replies up through
# the same deployed ClientApp; FedAvg alone adds nothing a deployment could get wrong.)
CASES = {
    # two of three clients per round for three rounds: a node sampled in round 2 but not in round 1
    # gets merge 1 in its message (a device has no shared merge store), and in round 3 only merge 2:
    # its new ClientApp process rebuilds the base from the merges its node state kept
    "flora": ["strategy=flora", "ranks=flora", "ranks.levels=[4,2]", "fraction=0.67", "rounds=3"],
    "flexlora_int8": ["strategy=flexlora", "ranks=flora", "ranks.levels=[4,2]", "compression=int8"],
}
TIMING = ("elapsed_s", "round_seconds", "train_seconds")


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING and "seconds" not in k} for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    cfg = compose(BASE)
    with Deployment(work / "deploy", 3, node_configs(cfg, work), pki=make_pki(work / "pki", 3)) as dep:
        yield dep


@pytest.mark.parametrize("case", list(CASES))
def test_deployment_and_simulation_give_the_same_run(case, deployment, tmp_path):
    cfg = compose([*BASE, *CASES[case]])
    run(cfg, tmp_path / "sim")
    status = deployment.run(project_dir(), to_run_config(cfg, tmp_path / "dep"), timeout=1800)
    assert status == "finished:completed"
    sim, dep = rows(tmp_path / "sim"), rows(tmp_path / "dep")
    assert [r["round"] for r in dep] == list(range(cfg.rounds + 1))
    for s, d in zip(sim, dep):
        assert s.keys() == d.keys()
        for k in s:
            if k.startswith("bytes_") or k.startswith("clients_") or k == "round_applied":
                assert d[k] == s[k], (case, s["round"], k)
            else:
                assert d[k] == pytest.approx(s[k], rel=1e-6, abs=1e-9), (case, s["round"], k)
    assert dep[-1]["clients_replied"] == dep[-1]["clients_sampled"] and dep[-1]["round_applied"] == 1
    assert dep[-1]["loss"] != dep[0]["loss"]
    final = f"adapters/round_{cfg.rounds:03d}/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "sim" / final)), load_file(str(tmp_path / "dep" / final))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "dep" / "summary.json").read_text())["status"] == "finished"

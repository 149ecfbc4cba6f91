"""A server optimizer in a real run (in-process: the real server and ClientApp with MiniLM): FedAdam
steps every round, its state is saved with the server's, and a resumed run continues it
(the math and the bit-for-bit continuation: tests/unit/test_serveropt.py)."""

import pytest
import torch

from tests.harness import AppGrid, federate

SMALL = ["clients=2", "train.local_steps=2", "data.eval_samples=64"]


@pytest.mark.usefixtures("task_identity")
def test_fedadam_runs_saves_its_state_and_resumes(tmp_path, capsys):
    from flwr.app import Context, RecordDict

    from fedpeft.composing import compose
    from fedpeft.runconfig import RunSpec, to_run_config
    from fedpeft.serverapp import STATE, Federation

    _, summary = federate(tmp_path, "server.optimizer=fedadam", "rounds=1", *SMALL)
    assert summary["rounds_applied"] == 1
    assert "server optimizer: fedadam, lr 0.1, β₁ 0.9, β₂ 0.99, τ 0.001" in capsys.readouterr().out  # the banner
    run_dir = tmp_path / "run"
    state = torch.load(run_dir / STATE, weights_only=False)["adapter"]
    opt = state["server_optimizer"]
    modules = set(state["model"]["adapter"])
    heads = set(state["model"]["head"])
    assert opt["kind"] == "fedadam" and opt["steps"] == 1 and modules and heads
    assert set(opt["m"]) == set(opt["v"]) == {f"{f}/{m}" for f in "AB" for m in modules} | {f"head/{h}" for h in heads}
    assert all(bool((v > 0).all()) for v in opt["v"].values())  # v ≥ τ² everywhere
    # the resumed run (rounds 1 → 2) reads the optimizer's state and steps it once more
    cfg2 = compose(["tracking.mode=disabled", "model.rank=4", "model.alpha=8", "model.max_length=48", "engine.device=cpu", "engine.num_cpus=1",
                    "server.optimizer=fedadam", "rounds=2", *SMALL])  # federate's config, 2 rounds
    rc = to_run_config(cfg2, run_dir, resume=True, shared_dir=str(run_dir / "state"))
    contexts = {100 + i: Context(run_id=2001, node_id=100 + i, node_config={"partition-id": i, "num-partitions": 2}, state=RecordDict(), run_config=rc)
                for i in range(2)}
    again = Federation(cfg2, RunSpec(run_dir, resume=True, shared_dir=str(run_dir / "state"))).run(AppGrid(contexts))
    assert again["rounds_applied"] == 2
    opt2 = torch.load(run_dir / STATE, weights_only=False)["adapter"]["server_optimizer"]
    assert opt2["steps"] == 2
    assert all(not torch.equal(opt2["m"][k], opt["m"][k]) for k in opt["m"])  # moved on from the saved moments

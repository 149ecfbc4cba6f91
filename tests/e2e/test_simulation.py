"""End-to-end federations on Flower's simulation engine with Ray (a few, small)."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from fedpeft.composing import compose
from fedpeft.simulation import run
from tests.harness import simulate

pytestmark = pytest.mark.slow

LORA_BYTES_PER_CLIENT = 12 * 2 * (4 * 384) * 4  # 6 layers × {query, value} × (A + B) at r=4, float32
HEAD_BYTES = (2 * 384 + 2) * 4


@pytest.fixture(scope="module")
def four_clients(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    return tmp, *simulate(tmp, "clients=4", "rounds=2", "train.local_steps=12", "train.batch_size=16", "train.lr=2e-3")


def test_loss_falls_and_everything_is_tracked(four_clients):
    tmp, cfg, summary = four_clients
    assert summary["status"] == "finished"
    h = summary["history"]
    assert [r["round"] for r in h] == [0, 1, 2]
    assert h[2]["loss"] < h[0]["loss"] - 0.05, h
    assert h[2]["accuracy"] > summary["majority_rate"] + 0.1
    rows = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["accuracy"] == h[2]["accuracy"]
    assert rows[1]["clients_sampled"] == 4 and rows[1]["clients_replied"] == 4 and rows[1]["clients_failed"] == 0
    assert (tmp / "run" / "config.yaml").exists() and (tmp / "run" / "wandb").is_dir()
    from tests.harness import check_run  # the offline W&B run holds metrics.jsonl, the config and the finals

    check_run(tmp / "run", OmegaConf.to_container(cfg, resolve=True), group="default", job_type="fedavg")


def test_bytes_are_counted_from_the_sent_records(four_clients):
    _, _, summary = four_clients
    r1 = summary["history"][1]
    per_client_down = r1["bytes_down"] / 4
    per_client_up = r1["bytes_up"] / 4
    tensors = LORA_BYTES_PER_CLIENT + HEAD_BYTES
    # Arrays plus their keys and the config record (settings, scalings): a few percent of overhead.
    assert tensors < per_client_down < tensors * 1.15, per_client_down
    assert tensors < per_client_up < tensors * 1.1, per_client_up


def test_saved_adapter_reloads_with_peft_and_reproduces_the_server_evaluation(four_clients):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clients.train import evaluate
    from fedpeft import data as fdata
    from fedpeft.models import LoadedModel, model_path

    tmp, cfg, summary = four_clients
    ckpt = tmp / "run" / "adapters" / "round_002"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "adapter_config.json").exists()
    base = AutoModelForSequenceClassification.from_pretrained(model_path("minilm"), num_labels=2)
    model = PeftModel.from_pretrained(base, ckpt).eval()
    ds = fdata.load("election_tweets", seed=0)
    test = ds["test"].shuffle(seed=0).select(range(256))
    lm = LoadedModel(model, AutoTokenizer.from_pretrained(model_path("minilm")), "classification", torch.device("cpu"), 48, (), ())
    m = evaluate(lm, test, 128)
    final = summary["history"][-1]
    assert m["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    assert m["loss"] == pytest.approx(final["loss"], rel=1e-4)


def test_failing_clients_are_counted_and_the_rounds_go_on(tmp_path, caplog):
    import logging

    flower_errors = []  # what reaches Flower's log handlers at ERROR (its engine's tracebacks of client errors)
    catcher = logging.Handler(logging.ERROR)
    catcher.emit = flower_errors.append
    logging.getLogger("flwr").addHandler(catcher)
    try:
        cfg, summary = simulate(
            tmp_path, "clients=6", "rounds=2", "train.local_steps=2", "profile.failure_rate=0.5", "tracking.mode=disabled", "tracking.save_adapters=false"
        )
    finally:
        logging.getLogger("flwr").removeHandler(catcher)
    from clients.app import should_fail

    assert summary["status"] == "finished"
    lines = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    for r in summary["history"][1:]:
        failing = [c for c in range(6) if should_fail(0, r["round"], c, 0.5)]
        assert r["clients_failed"] == len(failing)
        assert r["clients_replied"] + r["clients_failed"] == r["clients_sampled"] == 6
        for c in failing:  # one line each, with the client's own message
            assert sum(l.startswith(f"round {r['round']}: client {c} on node ") and l.endswith(
                f"failed: client {c}: injected failure in round {r['round']} (profile.failure_rate=0.5)") for l in lines) == 1
    assert sum(r["clients_failed"] for r in summary["history"][1:]) > 0
    assert [r.getMessage()[:200] for r in flower_errors] == []  # no traceback from Flower's engine for a client's error


@pytest.mark.parametrize("strategy", ["ffa_lora", "hetlora", "flora", "flexlora", "raflora"])
def test_heterogeneous_rank_strategies_run_with_partial_participation(strategy, tmp_path):
    """ranks [64, 32, 16, 16], half the clients each round; the saved global adapter has the
    shape each method's math says it must."""
    from safetensors.torch import load_file

    from fedpeft.lora import seeded_lora_A

    cfg, summary = simulate(tmp_path, f"strategy={strategy}", "ranks=flora", "clients=4", "fraction=0.5", "rounds=2",
                            "train.local_steps=2", "data.eval_samples=64", "tracking.mode=disabled")
    assert summary["status"] == "finished"
    assert [r["clients_replied"] for r in summary["history"][1:]] == [2, 2]
    # what a client trains, at its own rank, averaged over the clients: 12 modules × r × 384 per factor
    ranks = json.loads((tmp_path / "run" / "ranks.json").read_text())["ranks"]
    per_factor = 12 * 384 * sum(ranks) / len(ranks)
    by_group = summary["trainable_by_group"]
    assert by_group["lora_B"] == per_factor and ranks == [64, 32, 16, 16]
    if strategy == "ffa_lora":  # its A is frozen: not counted as trained
        assert "lora_A" not in by_group and summary["trainable_params"] == per_factor + by_group["head"]
    else:
        assert by_group["lora_A"] == per_factor and summary["trainable_params"] == 2 * per_factor + by_group["head"]
    saved = load_file(str(tmp_path / "run" / "adapters" / "round_002" / "adapter_model.safetensors"))
    a_keys = sorted(k for k in saved if k.endswith("lora_A.weight"))
    assert len(a_keys) == 12
    rank = saved[a_keys[0]].shape[0]
    if strategy == "ffa_lora":  # A is the shared seeded A at r_max, never trained
        module = a_keys[0][len("base_model.model."):-len(".lora_A.weight")]
        assert torch.equal(saved[a_keys[0]], seeded_lora_A(module, 64, 384, seed=0))
    elif strategy == "hetlora":
        assert rank == 64
    elif strategy == "flora":  # the two rounds' stacked merges, rebuilt into one adapter
        from fedpeft.merges import load_merge

        merges = [load_merge(tmp_path / "run" / "state" / "merges", v) for v in (1, 2)]  # the server state's merge store
        assert rank == sum(next(iter(m.values())).rank for m in merges)
        r1 = summary["history"][1]
        assert r1["bytes_down"] < 0.05 * r1["bytes_up"]  # round 1: fresh inits travel as a seed, not tensors
    else:  # flexlora, raflora: the last round's stacked updates of the two clients that replied
        assert 8 <= rank <= 128


def test_a_run_that_would_exceed_its_budget_stops_with_its_checkpoint(tmp_path):
    from fedpeft.privacy import Accountant

    ledger = Accountant(1e-5)
    one = ledger.epsilon_after(2.0, 1.0, 1)
    ledger.step(2.0, 1.0, 1)
    two = ledger.epsilon_after(2.0, 1.0, 1)
    cfg, summary = simulate(tmp_path, "privacy=local", "privacy.noise_multiplier=2.0", f"privacy.target_epsilon={(one + two) / 2}",
                            "clients=2", "rounds=3", "train.local_steps=2", "data.eval_samples=64", "tracking.mode=disabled")
    assert summary["status"] == "stopped" and "round 2 would reach" in summary["stopped"]
    assert [r["round"] for r in summary["history"]] == [0, 1]
    assert summary["privacy"]["epsilon"] == pytest.approx(one)
    assert (tmp_path / "run" / "adapters" / "round_001" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "run" / "adapters" / "round_002").exists()


def _without_timings(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k and k != "elapsed_s"} for r in rows]


def test_the_same_config_and_seed_give_the_same_run(tmp_path):
    """Heterogeneous ranks, non-IID data and partial participation: which partition gets which
    rank and which partitions are sampled follow the partition id, not Flower's random node ids."""
    overrides = ("strategy=hetlora", "ranks=flora", "ranks.levels=[16,8,4,2]", "partition=dirichlet", "clients=4",
                 "rounds=2", "fraction=0.5", "train.local_steps=3", "seed=3", "data.eval_samples=128", "tracking.mode=disabled")
    runs = []
    for name in ("a", "b"):
        cfg = compose(["model.rank=4", "model.alpha=8", "model.max_length=48", *overrides])
        run(cfg, tmp_path / name)
        runs.append(tmp_path / name)
    a, b = (_without_timings(r / "metrics.jsonl") for r in runs)
    assert len(a) == 3 and a == b
    assert a[1]["clients_replied"] == 2 and a[1]["loss"] != a[0]["loss"]
    assert (runs[0] / "ranks.json").read_text() == (runs[1] / "ranks.json").read_text()
    final = "adapters/round_002/adapter_model.safetensors"
    assert (runs[0] / final).read_bytes() == (runs[1] / final).read_bytes()


def _ray_processes():
    import subprocess

    # "pid args": a process left over from an earlier run is told apart from a new one of the same name
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if "Z" not in l.split()[1] and any(k in l for k in ("raylet", "gcs_server", "ray::", "default_worker.py"))]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_within_seconds_keeps_the_last_round_and_leaves_no_ray(sig, tmp_path):
    """Ctrl-C, or a SIGTERM (``kill``, a job scheduler's time limit), after round 1."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    before = _ray_processes()
    fedpeft = Path(sys.executable).with_name("fedpeft")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(fedpeft), "simulate", "clients=2", "rounds=50", "train.local_steps=2", "model.rank=4", "model.alpha=8",
         "model.max_length=32", "data.eval_samples=64", "tracking.mode=offline", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    for line in proc.stdout:  # wait until round 1 is complete
        lines.append(line)
        if line.startswith("[fedpeft] round 1/50"):
            break
    assert any(l.startswith("[fedpeft] round 1/50") for l in lines), "".join(lines[-20:])
    proc.send_signal(getattr(signal, sig))
    t0 = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], rest[-2000:]
    assert seconds < 30, f"Ctrl-C took {seconds:.0f}s"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "interrupted" and len(summary["history"]) == len(rows) >= 2
    saved = sorted(p.name for p in (run_dir / "adapters").iterdir())
    assert saved == [f"round_{r['round']:03d}" for r in rows]  # every logged round has its whole checkpoint, no partial one
    assert "interrupted: the run is stopped; the last complete round is round" in rest
    deadline = time.monotonic() + 20
    while set(_ray_processes()) - set(before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(_ray_processes()) - set(before)


def test_a_run_whose_every_update_is_rejected_does_not_finish(tmp_path, monkeypatch):
    from fedpeft import messages
    from fedpeft.server import FlowerAdapter
    from fedpeft.serverapp import RunFailed

    def forged(self, node, msg):
        raise messages.UpdateError("forged for the test")

    monkeypatch.setattr(FlowerAdapter, "check_reply", forged)  # the server runs in this process
    with pytest.raises(RunFailed, match="no round applied an update"):
        simulate(tmp_path, "clients=2", "rounds=2", "train.local_steps=1", "data.eval_samples=32", "tracking.mode=disabled")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_applied"] == 0
    assert [(r["clients_rejected"], r["round_applied"]) for r in summary["history"][1:]] == [(2, 0), (2, 0)]


def test_most_clients_failing_alike_stops_the_run_with_that_error(tmp_path, monkeypatch):
    from fedpeft.server import FederationFailed, FlowerAdapter
    from fedpeft.serverapp import RunFailed

    original = FlowerAdapter.aggregate_train

    def failing(self, server_round, replies):
        if server_round == 2:
            raise FederationFailed("KeyError: 'text' (2 of 2 sampled clients)")
        return original(self, server_round, replies)

    monkeypatch.setattr(FlowerAdapter, "aggregate_train", failing)
    with pytest.raises(RunFailed, match=r"KeyError: 'text' \(2 of 2 sampled clients\); stopped after round 1"):
        simulate(tmp_path, "clients=2", "rounds=3", "train.local_steps=1", "data.eval_samples=32", "tracking.mode=disabled")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "KeyError: 'text' (2 of 2 sampled clients)"
    assert [r["round"] for r in summary["history"]] == [0, 1]
    assert (tmp_path / "run" / "adapters" / "round_001" / "adapter_model.safetensors").exists()

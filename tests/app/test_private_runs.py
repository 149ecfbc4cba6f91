"""Every strategy with a DP mechanism and a codec: a small federation each, through the real server
and ClientApp in-process (``tests.harness.federate``); the ledger's ε after every round, a derived σ
spending the budget, and the codecs' byte counts. (They ran on Ray in the e2e tier before; what Ray
adds is shown there by the other simulations.)"""

from __future__ import annotations

import json

import pytest

from tests.harness import federate

pytestmark = pytest.mark.usefixtures("task_identity", "one_torch_thread")

HEAD_BYTES = (2 * 384 + 2) * 4


# Every strategy with a DP mechanism and a codec, each a small federation through the real server and ClientApp, in-process.
PRIVATE_RUNS = {
    "fedavg": ["strategy.weighting=uniform", "privacy=central", "privacy.noise_multiplier=0.5", "compression.downlink=int8"],
    "dp_lora": ["compression=fp16"],  # as typed: sample-level DP at its default target ε = 8
    "ffa_lora": ["ranks=flora", "privacy=sample", "privacy.target_epsilon=8", "compression=int4"],
    "hetlora": ["ranks=flora", "privacy=local", "privacy.noise_multiplier=0.5", "compression=topk"],
    "flora": ["ranks=flora", "privacy=sample", "privacy.noise_multiplier=1.0", "compression=int8"],
    "flexlora": ["ranks=flora", "privacy=local", "privacy.noise_multiplier=0.5", "compression=bf16"],
    "fedsa_lora": ["privacy=local", "privacy.noise_multiplier=0.5", "compression=topk"],  # A and the head only, both ways
}


@pytest.mark.parametrize("strategy", list(PRIVATE_RUNS))
def test_every_strategy_runs_with_dp_and_compression(strategy, tmp_path):

    from fedpeft.privacy import Accountant

    cfg, summary = federate(tmp_path, f"strategy={strategy}", *PRIVATE_RUNS[strategy], "clients=4", "rounds=2", "train.local_steps=2",
                            "data.eval_samples=64", "tracking.save_adapters=false")
    assert summary["status"] == "finished"
    rows = summary["history"][1:]
    assert all(r["clients_replied"] == 4 for r in rows)
    plan = json.loads((tmp_path / "run" / "privacy.json").read_text())
    ledger = Accountant(plan["delta"])
    for r in rows:  # ε after every round is the ledger's: what the plan composes, round by round
        ledger.step(plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"])
        assert r["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)
    if strategy == "dp_lora" or "target_epsilon=8" in " ".join(PRIVATE_RUNS[strategy]):
        assert 7.8 < rows[-1]["epsilon"] <= 8.0 + 1e-6  # σ derived so that the last round spends the budget
    if strategy == "fedavg":  # float32 uplink, int8 downlink: ~1/4 of the bytes
        assert rows[0]["bytes_down"] < 0.35 * rows[0]["bytes_up"]  # (the rest: .npy headers, keys, config)
    if strategy == "flexlora":  # bf16 uplink: 2 bytes per value (plus .npy headers, keys and config)
        ranks = json.loads((tmp_path / "run" / "ranks.json").read_text())["ranks"]
        data = sum(12 * 2 * r * 384 * 2 + HEAD_BYTES // 2 for r in ranks)
        assert data < rows[0]["bytes_up"] < data + 4 * 10_000



"""FedSA-LoRA in one small real simulation (Flower's simulation engine with Ray): every client's own
accuracy is logged and the clients keep distinct Bs (in-process: tests/unit/test_fedsa.py,
tests/app/test_fedsa.py)."""

import json

import pytest

# ------------------------------------------------------------------ one real simulation


@pytest.mark.slow
def test_a_fedsa_simulation_logs_every_clients_accuracy_and_keeps_distinct_Bs(tmp_path):
    from safetensors.torch import load_file

    from fedpeft.composing import compose
    from fedpeft.simulation import run

    cfg = compose(["strategy=fedsa_lora", "clients=3", "rounds=2", "partition=dirichlet", "partition.alpha=0.3", "train.local_steps=4",
                   "train.batch_size=16", "model.rank=4", "model.alpha=8", "model.max_length=32", "tracking.mode=offline",
                   "tracking.save_adapters=false"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "finished"
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        accs = [r[f"personal_accuracy/client_{c}"] for c in range(3)]
        assert all(0 <= a <= 1 for a in accs) and r["personal/clients"] == 3 and r["personal/failed"] == 0
        assert r["accuracy"] == r["personal/accuracy_mean"] == pytest.approx(sum(accs) / 3, abs=1e-12)
        assert r["personal/accuracy_p10"] <= r["personal/accuracy_p50"] <= r["personal/accuracy_p90"]
        assert r["personal/accuracy_p50"] == pytest.approx(sorted(accs)[1])
    assert rows[2]["clients_replied"] == 3 and rows[2]["bytes_up"] > 0
    Bs = [load_file(str(tmp_path / "run" / "state" / f"client_{c}" / "personal_B_00002.safetensors")) for c in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            diff = max(float((Bs[i][n] - Bs[j][n]).abs().max()) for n in Bs[i])
            assert diff > 1e-4, (i, j, diff)
    history = json.loads((tmp_path / "run" / "summary.json").read_text())["history"]
    assert history[-1]["accuracy"] == rows[-1]["accuracy"]

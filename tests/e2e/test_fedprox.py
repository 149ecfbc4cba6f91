"""FedProx end to end on Flower's simulation engine: ``strategy.prox_mu`` travels in the train
messages and changes what the clients send back (HetLoRA: beside its own pruning term)."""

import pytest
from safetensors.torch import load_file

from tests.harness import simulate

pytestmark = pytest.mark.slow


def test_prox_mu_reaches_the_clients_and_pulls_their_updates_towards_the_global_adapter(tmp_path):
    words = ("strategy=hetlora", "ranks=flora", "ranks.levels=[8,4]", "clients=2", "rounds=1", "train.local_steps=6",
             "train.lr=5e-3", "data.eval_samples=64", "tracking.mode=disabled")
    _, plain = simulate(tmp_path / "plain", *words)
    _, prox = simulate(tmp_path / "prox", *words, "strategy.prox_mu=20.0")
    assert plain["status"] == prox["status"] == "finished"
    assert [r["clients_replied"] for r in prox["history"][1:]] == [2]
    path = "run/adapters/round_001/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "plain" / path)), load_file(str(tmp_path / "prox" / path))
    # the round's update: B starts at 0 (peft's init), so ‖B‖ after one round is how far the clients moved it
    moved = lambda s: sum(float(s[k].norm() ** 2) for k in s if k.endswith("lora_B.weight")) ** 0.5  # noqa: E731
    assert 0 < moved(b) < 0.9 * moved(a), (moved(b), moved(a))

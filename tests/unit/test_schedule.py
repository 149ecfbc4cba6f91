"""train.lr_schedule: the learning rate per round (fedpeft/schedule.py), sent by the server with each
train message and recorded in the round's metrics."""

import math

import pytest
import torch
from flwr.app import ConfigRecord

from fedpeft import messages
from fedpeft.lora import LoraFactors
from fedpeft.schedule import lr_at, scheduled
from fedpeft.server import FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from strategies.fedavg import FedAvg
from tests.harness import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def flowertune_cosine(current_round, total_round, lrate_max, lrate_min):
    """FlowerTune's template (examples/flowertune-llm): cosine annealing per round, rounds from 1."""
    cos_inner = math.pi * current_round / total_round
    return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))


def test_cosine_is_flowertunes_and_linear_and_warmup():
    assert [lr_at(r, 10, 1e-3, 1e-5, "cosine") for r in range(1, 11)] == pytest.approx([flowertune_cosine(r, 10, 1e-3, 1e-5) for r in range(1, 11)])
    assert lr_at(10, 10, 1e-3, 1e-5, "cosine") == pytest.approx(1e-5)
    assert [lr_at(r, 4, 1.0, 0.2, "linear") for r in range(1, 5)] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert [lr_at(r, 5, 1.0, 0.0, "cosine", warmup_rounds=2) for r in (1, 2)] == [0.5, 1.0]  # linear warmup, round W at lr
    assert [lr_at(r, 5, 1.0, 0.0, "cosine", warmup_rounds=2) for r in (3, 4, 5)] == pytest.approx([flowertune_cosine(t, 3, 1.0, 0.0) for t in (1, 2, 3)])
    assert lr_at(7, 5, 1.0, 0.0, "constant") == 1.0 and not scheduled("constant", 0) and scheduled("constant", 1) and scheduled("linear", 0)


def test_the_server_sends_the_rounds_lr_and_records_it_and_a_constant_run_sends_nothing_new():
    shapes = {"l.q": (8, 8)}
    g = GlobalModel(adapter={"l.q": LoraFactors(torch.zeros(2, 8), torch.zeros(8, 2), 1.0)}, head={})

    def adapter(lr):
        return FlowerAdapter(FedAvg(), g, fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, 2, 2.0), shapes=shapes, seed=0, lr_at=lr)

    fa = adapter(lambda r: lr_at(r, 3, 0.01, 0.0, "cosine"))
    plain = adapter(None)
    for r in (1, 2, 3):
        sent = [messages.decode(m.content).config for m in fa.configure_train(r, fa.arrays(), ConfigRecord(), FakeGrid({7: 0}))]
        assert sent[0]["lr"] == pytest.approx(flowertune_cosine(r, 3, 0.01, 0.0))
        fa.aggregate_train(r, [])
        assert fa.stats[r].train_metrics["lr"] == pytest.approx(flowertune_cosine(r, 3, 0.01, 0.0))
    msg = list(plain.configure_train(1, plain.arrays(), ConfigRecord(), FakeGrid({7: 0})))[0]
    assert "lr" not in messages.decode(msg.content).config
    plain.aggregate_train(1, [])
    assert "lr" not in plain.stats[1].train_metrics

"""Differential privacy in the client, in-process with MiniLM: DP-SGD (Opacus) is seeded, leaves the
cached model as it was, and keeps FFA-LoRA's frozen A and HetLoRA's pruning term (local and central
DP and the ledger, on random tensors: tests/unit/test_dp_clients.py)."""


import pytest
import torch

from clients.train import DPSettings, TrainSettings, train
from fedpeft.lora import LoraFactors
from fedpeft.plan import ClientPlan
from strategies.base import GlobalModel, Payload
from tests.harness import pruning_plan, rotten_minilm

STEPS = TrainSettings(local_steps=3, batch_size=8, lr=3e-3)


@pytest.fixture(scope="module")
def setup():
    return rotten_minilm(64)


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run(lm, start, part, dp=None, freeze=False, seed=1):
    u, _ = train(lm, Payload(adapter=start.adapter, head=start.head, plan=ClientPlan(train_A=not freeze)), part, STEPS, seed=seed, client_id=0, dp=dp)
    return u


def max_diff(u, v) -> float:
    return max(max((u.adapter[m].A - v.adapter[m].A).abs().max().item(), (u.adapter[m].B - v.adapter[m].B).abs().max().item()) for m in u.adapter)


def test_dp_sgd_is_seeded_and_leaves_the_cached_model_as_it_was(setup):
    lm, part, start = setup
    plain_before = run(lm, start, part)
    n_hooks = hooks(lm.model)
    a = run(lm, start, part, DPSettings(1.0, 0.5))
    assert hooks(lm.model) == n_hooks  # Opacus's hooks are gone
    assert not any(hasattr(p, "grad_sample") for p in lm.model.parameters())
    b = run(lm, start, part, DPSettings(1.0, 0.5))  # wrapped a second time: fine, and reproducible
    assert max_diff(a, b) == 0.0
    c = run(lm, start, part, DPSettings(1.0, 0.5), seed=2)
    assert max_diff(a, c) > 0  # another seed: other batches and noise
    assert max_diff(a, plain_before) > 1e-4  # DP-SGD's noise and clipping change the update
    plain_after = run(lm, start, part)
    assert max_diff(plain_before, plain_after) == 0.0  # the unwrapped model trains exactly as before


def test_dp_sgd_with_ffa_trains_B_alone(setup):
    lm, part, start = setup
    u = run(lm, start, part, DPSettings(1.0, 1.0), freeze=True)
    for m, f in start.adapter.items():
        assert torch.equal(u.adapter[m].A, f.A)
        assert not torch.equal(u.adapter[m].B, f.B)


def test_dp_sgd_keeps_hetloras_pruning_term(setup):
    """The pruning regulariser depends on no example: under DP-SGD its gradient is added after
    Opacus's clipping and noise, so a strong λ still drives the tail down and shrinks the rank."""
    lm, part, start = setup
    g = torch.Generator().manual_seed(0)
    start = GlobalModel({m: LoraFactors(f.A, 0.05 * torch.randn(f.B.shape, generator=g), f.scaling) for m, f in start.adapter.items()}, start.head)
    u, m = train(
        lm, Payload(adapter=start.adapter, head=start.head, plan=pruning_plan(0.5, 50.0, 1)), part, STEPS, seed=1, client_id=0, dp=DPSettings(1.0, 1.0)
    )
    assert m["rank_after_pruning"] == 2 and all(f.rank == 2 for f in u.adapter.values())
    _, m0 = train(
        lm, Payload(adapter=start.adapter, head=start.head, plan=pruning_plan(0.5, 0.0, 1)), part, STEPS, seed=1, client_id=0, dp=DPSettings(1.0, 1.0)
    )
    assert m0["rank_after_pruning"] == 4  # without the term the tail does not shrink: the rank stays

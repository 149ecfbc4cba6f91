"""Differential privacy around the strategies, in-process, on random tensors: local client-level DP,
central DP with Flower's wrapper around the Flower adapter, and the ledger (DP-SGD in the client
with Opacus: tests/app/test_dp_clients.py)."""

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.exception import PrivacyBudgetExhausted

from clients.app import noised_update
from fedpeft import messages
from fedpeft.lora import LoraFactors
from fedpeft.privacy import Accountant, PrivacyPlan, update_norm
from fedpeft.server import FlowerAdapter, wrap_central_dp
from strategies.base import ClientSpec, GlobalModel
from strategies.fedavg import FedAvg
from tests.harness import FakeGrid


def _adapters(r=4, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ad = {m: LoraFactors(torch.randn(r, 300, generator=g) * scale, torch.randn(200, r, generator=g) * scale, 2.0) for m in ("l0.q", "l0.v")}
    return ad, {"classifier.weight": torch.randn(2, 300, generator=g) * scale}


def test_local_dp_clips_the_update_and_adds_noise_of_std_sigma_C():
    start, head0 = _adapters()
    moved, head1 = _adapters(seed=1)
    end = {m: LoraFactors(start[m].A + moved[m].A, start[m].B + moved[m].B, 2.0) for m in start}
    head = {k: head0[k] + head1[k] for k in head0}
    ref = messages.tensors_of(start, head0)
    C = 0.5
    out, h, norm = noised_update(end, head, ref, C, 0.0, torch.Generator().manual_seed(0))
    delta = {k: v - ref[k] for k, v in messages.tensors_of(out, h).items()}
    true = {k: v - ref[k] for k, v in messages.tensors_of(end, head).items()}
    assert norm == pytest.approx(update_norm(true), rel=1e-6) and norm > 10 * C
    assert update_norm(delta) == pytest.approx(C, rel=1e-5)
    cos = sum((delta[k] * true[k]).sum() for k in delta) / (update_norm(delta) * update_norm(true))
    assert float(cos) == pytest.approx(1.0, abs=1e-5)
    sigma = 2.0
    out, h, _ = noised_update(end, head, ref, C, sigma, torch.Generator().manual_seed(1))
    noisy = {k: v - ref[k] for k, v in messages.tensors_of(out, h).items()}
    noise = torch.cat([(noisy[k] - delta[k]).flatten() for k in noisy])
    n = noise.numel()
    tol = 4 / (2 * n) ** 0.5  # 4 standard errors of a sample std
    ratio = float(noise.std()) / (sigma * C)
    assert abs(ratio - 1) < tol and tol < 0.1  # a scale 10% off would fail
    # FFA-LoRA (A not sent): A is untouched, the noise goes to B and the head only.
    ffa, _, _ = noised_update(end, head, messages.tensors_of(start, head0, send_A=False), C, sigma, torch.Generator().manual_seed(2), send_A=False)
    assert all(torch.equal(ffa[m].A, end[m].A) for m in end)


def test_central_dp_with_flowers_wrapper_clips_averages_and_noises(task_identity):
    g0 = GlobalModel(*_adapters(r=8, scale=0.0))
    sigma, C, K = 1.5, 0.2, 4
    plan = PrivacyPlan("central", sigma, C, sample_rate=0.5, steps_per_round=1, delta=1e-5)
    fa = FlowerAdapter(FedAvg(weighting="uniform"), g0, fraction=0.5, min_clients=K, client_spec=lambda i: ClientSpec(i, 8, 16.0),
                       shapes={"l0.q": (200, 300), "l0.v": (200, 300)}, seed=0, privacy=plan)
    dp = wrap_central_dp(fa, K)
    grid = FakeGrid({n: i for i, n in enumerate(range(101, 109))})
    sent = list(dp.configure_train(1, fa.arrays(), ConfigRecord(), grid))
    assert len(sent) == K
    replies, clipped = [], []
    for i, m in enumerate(sent):
        ad, head = _adapters(r=8, scale=1.0, seed=10 + i)  # norms far above C
        content = messages.encode(ad, head, {"num-examples": 10 + i})
        metadata = SimpleNamespace(src_node_id=m.metadata.dst_node_id, reply_to_message_id="")
        replies.append(SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content))
        t = messages.tensors_of(ad, head)
        scale = C / update_norm(t)
        clipped.append({k: v * scale for k, v in t.items()})
    arrays, metrics = dp.aggregate_train(1, replies)
    fa.adopt(arrays)
    got = messages.tensors_of(fa.model.adapter, fa.model.head)
    mean = {k: sum(c[k] for c in clipped) / K for k in got}
    noise = torch.cat([(got[k] - mean[k]).flatten() for k in got])
    ratio = float(noise.std()) / (sigma * C / K)
    assert abs(ratio - 1) < 4 / (2 * noise.numel()) ** 0.5 < 0.1
    assert metrics["epsilon"] == pytest.approx(Accountant(1e-5).epsilon_after(sigma, 0.5, 1), rel=1e-9)


def test_a_round_that_would_exceed_the_budget_is_not_started(task_identity):
    ref = Accountant(1e-5)
    eps1, eps2 = ref.epsilon_after(1.0, 1.0, 1), None
    ref.step(1.0, 1.0, 1)
    eps2 = ref.epsilon_after(1.0, 1.0, 1)
    plan = PrivacyPlan("local", 1.0, 0.1, sample_rate=1.0, steps_per_round=1, delta=1e-5, budget=(eps1 + eps2) / 2)
    g0 = GlobalModel(*_adapters(scale=0.0))
    fa = FlowerAdapter(FedAvg(), g0, fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, 4, 8.0),
                       shapes={"l0.q": (200, 300), "l0.v": (200, 300)}, seed=0, privacy=plan)
    grid = FakeGrid({1: 0, 2: 1})
    assert len(list(fa.configure_train(1, fa.arrays(), ConfigRecord(), grid))) == 2
    assert fa.stats[1].epsilon == pytest.approx(eps1)
    with pytest.raises(PrivacyBudgetExhausted):
        fa.configure_train(2, fa.arrays(), ConfigRecord(), grid)
    assert "round 2 would reach" in fa.stopped and plan.accountant.epsilon() == pytest.approx(eps1)

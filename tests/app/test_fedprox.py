"""FedProx's proximal term in a client's local training (clients/train.py), on MiniLM in-process:
μ = 0 is plain training bit for bit; a proximal SGD step is the plain one minus ``lr·μ·(θ − θ_g)``,
with and without DP-SGD (whose clipping never touches the term's gradient); μ > 0 shrinks the
update; the term reads exactly the tensors the client trains and sends back."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import strategies
from clients.train import DPSettings, TrainSettings, train
from fedpeft.plan import ClientPlan, Proximal
from strategies.base import ClientSpec, GlobalModel, Payload
from tests.harness import rotten_minilm


@pytest.fixture(scope="module")
def setup():
    return rotten_minilm(64)


def tensors(u) -> dict[str, torch.Tensor]:
    """Every tensor of an update (or a global model): A, B of each module, and the head."""
    out = {f"{m}.A": f.A for m, f in u.adapter.items()} | {f"{m}.B": f.B for m, f in u.adapter.items()}
    return out | {k: v for k, v in u.head.items()}


def run(lm, start, part, settings, plan=None, dp=None):
    plan = ClientPlan() if plan is None else plan
    u, _ = train(lm, Payload(adapter=start.adapter, head=start.head, plan=plan), part, settings, seed=1, client_id=0, dp=dp)
    return tensors(u)


def test_mu_0_is_plain_training_bit_for_bit(setup):
    lm, part, start = setup
    s = TrainSettings(local_steps=2, batch_size=8, lr=3e-3)
    spec = ClientSpec(0, 4, 8.0)
    for name in ("fedavg", "ffa_lora"):
        g = GlobalModel(start.adapter, start.head)
        p0, plain = strategies.build(name, prox_mu=0.0).payload(g, spec), strategies.build(name).payload(g, spec)
        assert p0.plan.proximal is None
        a, b = run(lm, start, part, s, p0.plan), run(lm, start, part, s, plain.plan)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, max_grad_norm=0.5)], ids=["plain", "dp_sgd"])
def test_a_proximal_sgd_step_is_the_plain_step_minus_lr_mu_times_the_drift(setup, dp):
    """With SGD at rate η, step 1 starts at θ_g (the term's gradient is 0), so θ_1 is the plain one;
    step 2 is θ_2 = θ_1 − η(g(θ_1) + μ(θ_1 − θ_g)), the plain step minus η μ (θ_1 − θ_g). Under
    DP-SGD the same holds with g the clipped, noised mean: the term's gradient is added whole after
    Opacus, never clipped or divided by the batch size."""
    lm, part, start = setup
    lr, mu = 0.2, 2.0
    one = TrainSettings(local_steps=1, batch_size=8, lr=lr, optimizer="sgd")
    two = replace(one, local_steps=2)
    theta_g = tensors(start)
    theta_1 = run(lm, start, part, one, dp=dp)
    plain_2 = run(lm, start, part, two, dp=dp)
    prox_2 = run(lm, start, part, two, ClientPlan(proximal=Proximal(mu)), dp=dp)
    drift = sum(float((theta_1[k] - theta_g[k]).norm() ** 2) for k in theta_g) ** 0.5
    assert drift > 1e-3  # step 1 moved: the check below is not 0 = 0
    for k in theta_g:
        want = plain_2[k] - lr * mu * (theta_1[k] - theta_g[k])
        torch.testing.assert_close(prox_2[k], want, rtol=0, atol=2e-6, msg=k)
    diff = sum(float((prox_2[k] - plain_2[k]).norm() ** 2) for k in theta_g) ** 0.5
    assert diff == pytest.approx(lr * mu * drift, rel=1e-3)


def test_mu_above_0_shrinks_the_update(setup):
    lm, part, start = setup
    s = TrainSettings(local_steps=8, batch_size=8, lr=3e-3)
    theta_g = tensors(start)

    def update_norm(plan):
        u = run(lm, start, part, s, plan)
        return sum(float((u[k] - theta_g[k]).norm() ** 2) for k in theta_g) ** 0.5

    plain, prox = update_norm(ClientPlan()), update_norm(ClientPlan(proximal=Proximal(50.0)))
    assert prox < 0.9 * plain, (prox, plain)


@pytest.mark.parametrize("plan, want", [
    (ClientPlan(), {"A", "B", "head"}),
    (ClientPlan(train_A=False), {"B", "head"}),  # FFA-LoRA / RoLoRA's B rounds: A is frozen
    (ClientPlan(train_B=False), {"A", "head"}),  # RoLoRA's A rounds
    (ClientPlan(keep=frozenset({"B"})), {"A", "head"}),  # FedSA-LoRA: B is the client's own, not the server's
])
def test_the_term_reads_the_tensors_the_client_trains_and_sends_back(setup, monkeypatch, plan, want):
    lm, part, start = setup
    seen: list[tuple[tuple[int, ...], ...]] = []
    real = Proximal.penalty

    def spy(self, params, anchors):
        seen.append(tuple(tuple(p.shape) for p in params))
        return real(self, params, anchors)

    monkeypatch.setattr(Proximal, "penalty", spy)
    run(lm, start, part, TrainSettings(local_steps=1, batch_size=8, lr=1e-3), replace(plan, proximal=Proximal(1.0)))
    shapes = set(seen[0])
    kinds = {"A" if s == (4, 384) else "B" if s == (384, 4) else "head" for s in shapes}
    assert kinds == want
    n_modules = len(start.adapter)
    assert len(seen[0]) == n_modules * (("A" in want) + ("B" in want)) + len(start.head)

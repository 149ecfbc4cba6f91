"""FedProx's proximal term (``strategy.prox_mu``, :class:`fedpeft.plan.Proximal`): its value and
gradient against a hand computation, its wire encoding, which strategies send it, and the one-line
refusals (a strategy whose clients start from no global adapter, the cohort engine, a bad μ)."""

from __future__ import annotations

import pytest
import torch

import strategies
from fedpeft.plan import KEYS, ClientPlan, Proximal, SelfPruning
from strategies.base import ClientSpec, GlobalModel
from tests.harness import config_error
from tests.unit.test_plan import payloads

TAKERS = ["dp_lora", "fed_sb", "fedavg", "federa", "fedex_lora", "fedsa_lora", "ffa_lora", "flasc", "flexlora", "hetlora", "raflora", "rolora"]


def test_the_term_and_its_gradient_equal_a_hand_computation():
    theta = [torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True), torch.tensor([4.0, -1.0, 2.0], requires_grad=True)]
    anchor = [torch.tensor([[0.0, -1.0], [0.5, 1.0]]), torch.tensor([1.0, 1.0, 1.0])]
    mu = 0.3
    value = Proximal(mu).penalty(theta, anchor)
    # by hand: ‖θ₁ − a₁‖² = 1 + 1 + 0 + 4 = 6, ‖θ₂ − a₂‖² = 9 + 4 + 1 = 14; μ/2 · 20 = 3
    assert float(value) == pytest.approx(0.5 * mu * 20.0, abs=1e-6)
    grads = torch.autograd.grad(value, theta)
    # by hand: ∂/∂θ = μ (θ − a)
    assert torch.allclose(grads[0], torch.tensor([[0.3, -0.3], [0.0, 0.6]]))
    assert torch.allclose(grads[1], torch.tensor([0.9, -0.6, 0.3]))
    assert float(Proximal(mu).penalty([a.clone() for a in anchor], anchor)) == 0.0  # at the anchor: nothing
    with pytest.raises(ValueError, match="2 trained tensors but 1 anchors"):
        Proximal(mu).penalty(theta, anchor[:1])


@pytest.mark.parametrize("name", TAKERS)
def test_every_strategy_that_takes_it_sends_it_in_its_plans_and_mu_0_sends_nothing(name):
    assert strategies.REGISTRY[name].takes_proximal()
    for label, p in payloads(name, prox_mu=0.25):
        cfg = p.plan.to_config()
        assert cfg["prox_mu"] == 0.25 and p.plan.proximal == Proximal(0.25), label
        assert ClientPlan.from_config(cfg) == p.plan and set(cfg) <= KEYS, label
    plain = payloads(name)
    for (label, p), (_, q) in zip(plain, payloads(name, prox_mu=0.0)):
        assert q.plan == p.plan and "prox_mu" not in q.plan.to_config(), label  # μ = 0: exactly the plain plan


def test_hetlora_sends_both_its_pruning_term_and_the_proximal_term():
    (_, p), *_ = payloads("hetlora", prox_mu=0.5)
    back = ClientPlan.from_config(p.plan.to_config())
    assert isinstance(back.loss_term, SelfPruning) and back.proximal == Proximal(0.5) and back == p.plan


def test_flexloras_first_round_anchors_at_the_fresh_adapter():
    """FlexLoRA's first payload is empty (a fresh LoRA, ΔW = 0, the global model's update): the term
    travels with its init_seed, and the client's anchor is that init."""
    s = strategies.build("flexlora", prox_mu=0.1)
    p = s.payload(GlobalModel({}), ClientSpec(2, 4, 8.0))
    assert p.adapter == {} and p.plan.init_seed is not None and p.plan.proximal == Proximal(0.1)


@pytest.mark.parametrize("cfg, key", [
    ({"prox_mu": 0.0}, "prox_mu is 0.0"),
    ({"prox_mu": -1.0}, "prox_mu is -1.0"),
    ({"prox_mu": float("inf")}, "prox_mu is inf"),
    ({"prox_mu": True}, "prox_mu is True"),
    ({"prox_mu": "0.1"}, "prox_mu is '0.1'"),
])
def test_a_malformed_prox_mu_on_the_wire_is_one_line_naming_it(cfg, key):
    with pytest.raises(ValueError) as e:
        ClientPlan.from_config(cfg)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_resume_needs_no_proximal_state():
    """The anchor is the round's payload and μ the config: a strategy's server state is the same
    object, saving the same keys, with and without the term. A run saved before ``prox_mu`` existed
    resumes (μ = 0 is its default); resuming with another μ is refused like any changed key."""
    from omegaconf import OmegaConf

    from fedpeft.composing import compose
    from fedpeft.config import schema
    from fedpeft.serverapp import changed_keys

    for name in TAKERS:
        with_mu, without = strategies.build(name, prox_mu=0.5), strategies.build(name)
        assert type(with_mu.server_state()) is type(without.server_state())
        assert with_mu.server_state().state_dict() == without.server_state().state_dict()
    defaults = OmegaConf.to_container(OmegaConf.structured(schema()))
    new = OmegaConf.to_container(compose([]), resolve=True)
    old = OmegaConf.to_container(compose([]), resolve=True)
    del old["strategy"]["prox_mu"]  # saved by a fedpeft without FedProx
    assert changed_keys(old, new, defaults=defaults) == []
    assert changed_keys(new, OmegaConf.to_container(compose(["strategy.prox_mu=0.1"]), resolve=True), defaults=defaults) == ["strategy.prox_mu"]


@pytest.mark.parametrize("override, expected", [
    ("strategy=flora strategy.prox_mu=0.1",
     "strategy.prox_mu: FedProx's proximal term does not work with strategy=flora (its clients start every round from a fresh "
     "adapter (random A, zero B), not from a global one: the proximal point would be that init, so μ would only shrink the update "
     "towards it); use strategy=" + " | ".join(TAKERS) + ", or strategy.prox_mu=0"),
    ("strategy.prox_mu=0.1 engine.kind=cohort",
     "strategy.prox_mu: FedProx's proximal term (prox_mu=0.1) is not batched by engine.kind=cohort: use engine.kind=per_client, "
     "or strategy.prox_mu=0"),
    ("strategy.prox_mu=-0.5", "strategy.prox_mu: must be a finite number >= 0 (0: no proximal term), got -0.5"),
    ("strategy=flora strategy.prox_mu=-0.5", "strategy.prox_mu: must be a finite number >= 0 (0: no proximal term), got -0.5"),
])
def test_refusals_are_one_line_naming_both_sides(override, expected, tmp_path, monkeypatch, capsys):
    line = config_error(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert expected in line, line


def test_the_cohort_trainer_refuses_a_plan_with_the_term_in_one_line():
    from clients.cohort import CohortError, CohortJob, _check_jobs
    from strategies.base import Payload

    class LM:  # what _check_jobs reads of the model
        base_version, head = 0, {}

    job = CohortJob(client_id=1, payload=Payload({}, plan=ClientPlan(proximal=Proximal(0.1))), data=[0], seed=0)
    with pytest.raises(CohortError) as e:
        _check_jobs(LM(), [job])
    assert str(e.value) == ("strategy.prox_mu (FedProx's proximal term): the cohort engine does not batch it; "
                            "use engine.kind=per_client, or strategy.prox_mu=0")

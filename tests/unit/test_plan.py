"""The client plan: one typed ``ClientPlan`` per payload, one wire encoding, and no client module
importing a strategy."""

import ast
import math
from pathlib import Path

import pytest
import torch

import strategies
from fedpeft.lora import LoraFactors, tail_norm
from fedpeft.plan import KEYS, ClientPlan, LossTerm, SelfPruning
from strategies.base import ClientSpec, GlobalModel
from strategies.flora import flora_init_seed

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"q": (10, 9), "v": (10, 9)}
PRUNE = {"prune": True, "prune_gamma": 0.99, "prune_lambda": 1e-3, "prune_r_min": 1}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "clients").glob("*.py")) + [ROOT / "fedpeft" / "plan.py"], ids=lambda p: p.name)
def test_no_client_module_and_not_the_plan_imports_a_strategy(path):
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in ("strategies", *(("clients",) if path.name == "plan.py" else ())))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\n\ndef f():\n    from strategies.hetlora import pruned_rank\n    import strategies\n")
    assert imported_modules(p) == {"os", "strategies.hetlora", "strategies"}


def model(rank: int = 8) -> GlobalModel:
    g = torch.Generator().manual_seed(rank)
    return GlobalModel({m: LoraFactors(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), 2.0) for m, (o, i) in SHAPES.items()})


def payloads(name: str, **kwargs):
    """(label, payload) of strategy ``name``: clients 0 and 3 at rank 4 on a rank-8 server, and where
    the strategy has one, its other kind of round (a fresh start, RoLoRA's other factor)."""
    s = strategies.build(name, **kwargs)
    g = s.init(model(), base_weights={m: torch.randn(o, i) for m, (o, i) in SHAPES.items()}) if s.needs_base_weights else s.init(model())
    out = [(f"client {c}", s.payload(g, ClientSpec(c, 4, 8.0))) for c in (0, 3)]
    if name in ("ffa_lora", "hetlora"):
        out.append(("fresh", s.payload(s.init(GlobalModel({})), ClientSpec(3, 4, 8.0))))
    if name == "rolora":
        out.append(("round 2", s.payload(GlobalModel(g.adapter, aggregations=1), ClientSpec(3, 4, 8.0))))
    if name == "slora":  # stage 2: plain FedAvg
        out.append(("stage 2", s.payload(GlobalModel(g.adapter, aggregations=1), ClientSpec(3, 4, 8.0))))
    return out


SLORA = {"freeze_A": True, "freeze_B": True}  # stage 1: the LoRA factors stay frozen; masked base entries train


# What each strategy's payloads put on the wire, key order and value types included (the bytes of
# every train message, a logged metric, depend on it).
WIRE = {
    "fedavg": [{}, {}],
    "dp_lora": [{}, {}],
    "fedex_lora": [{}, {}],
    "federa": [{}, {}],
    "fed_sb": [{}, {}],
    "ffa_lora": [{"freeze_A": True, "A_seed": 0}, {"freeze_A": True, "A_seed": 0}, {"freeze_A": True, "A_seed": 0, "init_seed": 3}],
    "hetlora": [PRUNE, PRUNE, {**PRUNE, "init_seed": 3}],
    "flora": [{"init_seed": flora_init_seed(0, 0, 0)}, {"init_seed": flora_init_seed(0, 3, 0)}],
    "flexlora": [{"init_seed": 0}, {"init_seed": 3}],
    "raflora": [{"init_seed": 0}, {"init_seed": 3}],
    "rolora": [{"freeze_A": True}, {"freeze_A": True}, {"freeze_B": True}],
    "fedsa_lora": [{"personal_B": True}, {"personal_B": True}],
    "flasc": [{"upload_density": 0.25}, {"upload_density": 0.25}],
    "slora": [{**SLORA, "init_seed": 0, "sparse_density": 0.01, "sparse_seed": 0}] * 2 + [{}],
}


def typed(cfg):
    return [(k, type(v), v) for k, v in cfg.items()]


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_every_strategys_plan_round_trips_through_its_wire_config_unchanged(name):
    got = payloads(name)
    assert [typed(p.plan.to_config()) for _, p in got] == [typed(c) for c in WIRE[name]]
    for label, p in got:
        cfg = p.plan.to_config()
        back = ClientPlan.from_config(cfg)
        assert back == p.plan, label
        assert typed(back.to_config()) == typed(cfg), label
        assert set(cfg) <= KEYS


def test_hetlora_without_pruning_still_sends_its_settings_and_its_clients_do_not_prune():
    (_, p), *_ = payloads("hetlora", prune=False, gamma=0.5, lam=0.25, r_min=2)
    assert typed(p.plan.to_config()) == typed({"prune": False, "prune_gamma": 0.5, "prune_lambda": 0.25, "prune_r_min": 2})
    assert ClientPlan.from_config(p.plan.to_config()) == p.plan
    f = [LoraFactors(torch.ones(4, 3), torch.ones(2, 4), 1.0)]
    assert p.plan.loss_term.penalty(f) is None and p.plan.finalise.measure(f) is None and p.plan.finalise.rank_after(4, 1.0, 0.0) is None


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_what_travels_down_and_up(name):
    """``(send_A, send_B)`` down and up, per payload."""
    want = {
        "ffa_lora": ((False, True), (False, True)),  # A regenerated from A_seed both ways
        "rolora": ((True, True), (False, True)),  # round 1 trains B: the frozen A is not sent back
        "fedsa_lora": ((True, False), (True, False)),  # B is the client's own
        "slora": ((True, True), (False, False)),  # stage 1: an empty payload adapter (a seeded fresh LoRA); no factor goes back
    }.get(name, ((True, True), (True, True)))
    _, p = payloads(name)[0]
    assert (p.plan.downlink, p.plan.uplink) == want
    if name == "rolora":
        _, p2 = payloads(name)[2]  # round 2 trains A
        assert (p2.plan.downlink, p2.plan.uplink) == ((True, True), (True, False))


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_a_personalised_plan_is_exactly_a_personalized_strategys(name):
    """The client decides on the 80/20 split from its plan; the server from the strategy's class:
    they must agree."""
    assert all(p.plan.personalised == strategies.personalized(name) for _, p in payloads(name))


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"freeze_a": True}, "unknown key 'freeze_a'"),
        ({"rank": 4}, "unknown key 'rank'"),
        ({"freeze_A": 1}, "freeze_A is 1"),
        ({"personal_B": "yes"}, "personal_B is 'yes'"),
        ({"A_seed": 3}, "A_seed regenerates a frozen A"),
        ({"freeze_A": True, "A_seed": "7"}, "A_seed is '7'"),
        ({"init_seed": True}, "init_seed is True"),
        ({"init_seed": 1.5}, "init_seed is 1.5"),
        ({"freeze_A": True, "freeze_B": True}, "freeze_A and freeze_B together"),
        ({k: v for k, v in PRUNE.items() if k != "prune_r_min"}, "prune_r_min is missing"),
        ({"prune_gamma": 0.5}, "prune is missing"),
        ({**PRUNE, "prune": 1}, "prune is 1"),
        ({**PRUNE, "prune_gamma": 1.5}, "prune_gamma is 1.5"),
        ({**PRUNE, "prune_gamma": "0.5"}, "prune_gamma is '0.5'"),
        ({**PRUNE, "prune_lambda": -1.0}, "prune_lambda is -1.0"),
        ({**PRUNE, "prune_r_min": 0}, "prune_r_min is 0"),
        ({**PRUNE, "prune_r_min": 2.0}, "prune_r_min is 2.0"),
    ],
)
def test_a_malformed_plan_config_is_one_line_naming_the_key(cfg, key):
    with pytest.raises(ValueError) as e:
        ClientPlan.from_config(cfg)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_a_plan_whose_term_has_no_wire_encoding_is_refused():
    class Other(LossTerm):  # a loss term the wire does not know
        pass

    with pytest.raises(ValueError, match="Other has no wire encoding"):
        ClientPlan(loss_term=Other())
    p = SelfPruning(0.5, 0.1, 1)
    with pytest.raises(ValueError, match="travel as one setting"):
        ClientPlan(loss_term=p, finalise=SelfPruning(0.5, 0.1, 2))
    assert ClientPlan(loss_term=p, finalise=p).to_config() == {"prune": True, "prune_gamma": 0.5, "prune_lambda": 0.1, "prune_r_min": 1}


def test_self_pruning_penalty_and_rank_rule():
    A = torch.arange(12.0).reshape(4, 3)
    B = torch.arange(8.0).reshape(2, 4)
    f = LoraFactors(A, B, 2.0)
    p = SelfPruning(gamma=0.5, lam=0.25, r_min=1)
    tail = math.sqrt(2**2 + 3**2 + 6**2 + 7**2) * math.sqrt(sum(x * x for x in range(6, 12)))  # components 2, 3
    assert float(p.tail([f, f])) == pytest.approx(2 * tail, rel=1e-6)
    assert float(p.penalty([f, f])) == pytest.approx(0.25 * 2 * tail, rel=1e-6)
    assert torch.equal(p.penalty([f]), 0.25 * (0.0 + tail_norm(f, 0.5)))  # the exact expression train() always used
    assert p.measure([f]) == pytest.approx(tail, rel=1e-6)
    assert p.rank_after(4, 2.0, 1.0) == 2  # the term decreased: max(⌊γr⌋, r_min)
    assert p.rank_after(4, 1.0, 1.0) == 4  # it did not
    assert SelfPruning(0.5, 0.25, r_min=3).rank_after(4, 2.0, 1.0) == 3
    assert SelfPruning(0.99, 0.25, r_min=1).rank_after(1, 2.0, 1.0) == 1  # never below 1, never more than r


def test_reply_config_echoes_only_a_regenerated_A_seed():
    assert ClientPlan(train_A=False, A_seed=5).reply_config() == {"A_seed": 5}
    assert ClientPlan(train_A=False).reply_config() == {}
    assert ClientPlan().reply_config() == {}

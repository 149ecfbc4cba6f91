"""One registration per strategy and per PEFT method (strategies/base.py, fedpeft/methods/__init__.py):
a new one is one file, and the config group, its schema, validation and the server follow from it.

The toy strategy here lives in a module written to ``tmp_path`` and imported, as a new file in
``strategies/`` would be; it goes through ``fedpeft.config.validate`` (a composed ``strategy=toy_shrink``)
and one in-process round of the Flower adapter, and is unregistered afterwards.
"""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord
from hydra.core.config_store import ConfigStore

import strategies
from fedpeft import messages, methods
from fedpeft.composing import compose
from fedpeft.config import ConfigError, register
from fedpeft.lora import LoraFactors, scaling_for
from fedpeft.server import FlowerAdapter
from fedpeft.serverapp import strategy_kwargs
from tests.harness import FakeGrid

SMALL = ["clients=3", "min_clients=2", "model.rank=4", "model.alpha=8", "tracking.mode=disabled", "engine.device=cpu"]

TOY = '''
"""A toy: FedAvg of A and the head, B averaged and shrunk by ``shrink``; the server counts each
client's applied updates (its own server state)."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedpeft.lora import LoraFactors
from strategies import GlobalModel, Payload, ServerState, Strategy


class Rounds(ServerState):
    def __init__(self):
        self.rounds = {}

    def applied(self, sent):
        for spec, update in sent:
            self.rounds[spec.client_id] = self.rounds.get(spec.client_id, 0) + 1

    def state_dict(self):
        return {"toy_rounds": dict(self.rounds)}

    def load_state_dict(self, state):
        self.rounds = dict(state.get("toy_rounds", {}))


@dataclass(frozen=True)
class ToyShrink(Strategy):
    weighting: str = "uniform"
    shrink: float = 0.5
    name: str = "toy_shrink"
    lora_update_only: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.shrink <= 1:
            raise ValueError(f"strategy.shrink: must be in (0, 1], got {self.shrink}")

    def payload(self, model, client):
        return Payload(adapter=model.adapter, head=model.head)

    def aggregate(self, model, updates):
        k = len(updates)
        adapter = {n: LoraFactors(sum(u.adapter[n].A for u in updates) / k, self.shrink * sum(u.adapter[n].B for u in updates) / k,
                                  g.scaling) for n, g in model.adapter.items()}
        head = {n: sum(u.head[n] for u in updates) / k for n in model.head}
        return GlobalModel(adapter=adapter, head=head)

    def round_metrics(self, model, updates):
        return {"toy_updates": float(len(updates))}

    def server_state(self):
        return Rounds()
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy strategy's module imported from ``tmp_path``; unregistered (and the config groups
    rebuilt without it) afterwards."""
    (tmp_path / "toy_shrink_strategy.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("toy_shrink_strategy").ToyShrink
    finally:
        strategies.REGISTRY.pop("toy_shrink", None)
        sys.modules.pop("toy_shrink_strategy", None)
        register()


def test_every_strategy_module_registers_its_class_and_the_group_is_generated_from_them():
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(strategies.__path__)} - {"base"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in strategies.REGISTRY.values()} == modules
    assert list(strategies.REGISTRY) == sorted(strategies.REGISTRY)
    register()
    group = ConfigStore.instance().repo["strategy"]
    assert sorted(n.removesuffix(".yaml") for n in group) == sorted(strategies.REGISTRY)
    het = group["hetlora.yaml"].node
    assert (het.name, het.weighting, het.gamma, het.lam, het.r_min, het.prune) == ("hetlora", "sparsity", 0.99, 1e-3, 1, True)
    assert group["dp_lora.yaml"].node.weighting == "uniform" and group["flexlora.yaml"].node.svd == "auto"


def test_optional_members_have_their_defaults_on_the_base_class():
    fedavg = strategies.build("fedavg")
    assert (fedavg.engines, fedavg.needs_base_weights, fedavg.trained_share, fedavg.privacy_default, fedavg.peft_default,
            fedavg.personalized, fedavg.peft_methods, fedavg.reply_ranks(5)) == (None, False, {}, None, None, False, None, (5,))
    assert strategies.build("flora").round_metrics(None, []) == {}
    assert strategies.REGISTRY["rolora"].engines == ("per_client",) and strategies.REGISTRY["federa"].needs_base_weights
    assert strategies.REGISTRY["fedsa_lora"].personalized and strategies.REGISTRY["dp_lora"].privacy_default == ("sample", 8.0)


def test_a_name_taken_twice_or_a_strategy_without_aggregate_is_refused_and_a_helper_subclass_is_not_registered():
    from dataclasses import dataclass

    from strategies.base import Strategy
    from strategies.fedavg import FedAvg

    with pytest.raises(TypeError, match="strategy name 'fedavg' is taken twice: strategies.fedavg.FedAvg and"):
        type("Other", (Strategy,), {"name": "fedavg", "payload": FedAvg.payload, "aggregate": FedAvg.aggregate})
    with pytest.raises(TypeError, match="strategy=half: Half must implement aggregate"):
        type("Half", (Strategy,), {"name": "half", "payload": FedAvg.payload})
    assert "half" not in strategies.REGISTRY and strategies.REGISTRY["fedavg"] is FedAvg

    @dataclass(frozen=True)
    class Helper(FedAvg):  # inherits fedavg's name: not a strategy of its own
        pass

    assert strategies.REGISTRY["fedavg"] is FedAvg and Helper not in strategies.REGISTRY.values()


@pytest.mark.usefixtures("task_identity")
def test_a_toy_strategy_from_one_new_module_validates_and_runs_a_round(toy):
    assert strategies.REGISTRY["toy_shrink"] is toy
    cfg = compose(["strategy=toy_shrink", "strategy.shrink=0.25", *SMALL])
    assert (cfg.strategy.name, cfg.strategy.weighting, cfg.strategy.shrink) == ("toy_shrink", "uniform", 0.25)
    assert cfg.strategy.gamma == 0.99  # the other strategies' keys stay in the schema, at their defaults
    # its check, its weightings and its declarations, reached through validate
    for words, line in [
        (["strategy=toy_shrink", "strategy.shrink=2"], "strategy.shrink: must be in (0, 1], got 2.0"),
        (["strategy=fedavg", "strategy.shrink=0"], "strategy.shrink: must be in (0, 1], got 0.0"),
        (["strategy=toy_shrink", "strategy.weighting=sparsity"],
         "strategy.weighting: strategy=toy_shrink does not take 'sparsity'; expected one of num_examples, uniform"),
        (["strategy=toy_shrink", "peft=ia3"], "peft.name: strategy=toy_shrink aggregates LoRA factors"),
        (["strategy=toy_shrink", "strategy.shrinks=1"], "unknown key 'strategy.shrinks'"),
    ]:
        with pytest.raises(ConfigError) as e:
            compose([*words, *SMALL])
        assert str(e.value).startswith(line), str(e.value)
    with pytest.raises(ConfigError) as e:  # a right value of a key fedavg does not read is refused, not ignored
        compose(["strategy=fedavg", "strategy.shrink=0.75", *SMALL])
    assert str(e.value).startswith("strategy.shrink=0.75: strategy=fedavg does not read it (only strategy=toy_shrink does)"), str(e.value)
    assert compose(["strategy=fedavg", f"strategy.shrink={toy.shrink}", *SMALL]).strategy.shrink == toy.shrink  # at its default: fine

    # one round of the Flower adapter with the strategy the server builds from that config
    strategy = strategies.build(cfg.strategy.name, **strategy_kwargs(cfg))
    assert strategy == toy(weighting="uniform", shrink=0.25)
    rank, alpha, shapes = 2, 4.0, {"l0.q": (3, 4)}
    s = scaling_for(rank, alpha)
    start = strategies.GlobalModel({"l0.q": LoraFactors(torch.zeros(rank, 4), torch.zeros(3, rank), s)}, {"cls.bias": torch.zeros(2)})
    fa = FlowerAdapter(strategy, start, fraction=1.0, min_clients=1, client_spec=lambda i: strategies.ClientSpec(i, rank, alpha),
                       shapes=shapes, seed=0)
    nodes = {11: 0, 12: 1}
    fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid(nodes))
    sent = {node: torch.full((rank, 4), float(node)) for node in nodes}
    replies = [
        SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""), has_error=lambda: False,
                        content=messages.encode({"l0.q": LoraFactors(sent[node], torch.full((3, rank), float(node - 10)), s)},
                                                {"cls.bias": torch.tensor([float(node), 1.0])}, {"num-examples": 10 * node}))
        for node in nodes
    ]
    _, metrics = fa.aggregate_train(1, replies)
    assert metrics["toy_updates"] == 2.0 and fa.stats[1].replied == 2
    got = fa.model.adapter["l0.q"]
    assert torch.equal(got.A, torch.full((rank, 4), 11.5))  # uniform mean of 11 and 12
    assert torch.equal(got.B, torch.full((3, rank), 0.25 * 1.5))  # shrink · mean of 1 and 2
    assert torch.equal(fa.model.head["cls.bias"], torch.tensor([11.5, 1.0]))
    # its server state: told of the applied round, saved with the server's state and resumed from it
    state = fa.state_dict()
    assert state["toy_rounds"] == {0: 1, 1: 1}
    again = FlowerAdapter(strategy, start, fraction=1.0, min_clients=1, client_spec=lambda i: strategies.ClientSpec(i, rank, alpha),
                          shapes=shapes, seed=0)
    again.load_state_dict(state)
    assert again.strategy_state.rounds == {0: 1, 1: 1} and again.state_dict()["toy_rounds"] == {0: 1, 1: 1}


def test_the_toy_is_gone_after_its_test():
    register()
    assert "toy_shrink" not in strategies.REGISTRY and "toy_shrink.yaml" not in ConfigStore.instance().repo["strategy"]
    with pytest.raises(ConfigError, match="strategy: no option 'toy_shrink'"):
        compose(["strategy=toy_shrink", *SMALL])


def test_a_peft_method_from_one_new_module_is_discovered_with_its_config_group(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(
        "from fedpeft.methods import PeftMethod\n"
        "from fedpeft.methods.ia3 import METHODS as IA3\n"
        "METHODS = [PeftMethod('toy_ia3', IA3[0].config, IA3[0].groups, options=IA3[0].options, about='IA3 again')]\n"
    )
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    try:
        found = methods._registry()
        assert list(found)[-1] == "toy_ia3" and set(found) - {"toy_ia3"} == set(methods.METHODS)
        monkeypatch.setattr(methods, "METHODS", found)
        cfg = compose(["peft=toy_ia3", "peft.feedforward_modules=[output.dense]", *SMALL])
        assert (cfg.peft.name, list(cfg.peft.feedforward_modules)) == ("toy_ia3", ["output.dense"])
        with pytest.raises(ConfigError, match=r"^peft.vera_rank: applies to peft=vera only, not peft=toy_ia3$"):
            compose(["peft=toy_ia3", "peft.vera_rank=8", *SMALL])
        (tmp_path / "toy_method.py").write_text("X = 1\n")
        sys.modules.pop("fedpeft.methods.toy_method", None)
        with pytest.raises(TypeError, match=r"^fedpeft.methods.toy_method: a PEFT method module ends with METHODS = "):
            methods._registry()
    finally:
        sys.modules.pop("fedpeft.methods.toy_method", None)
        monkeypatch.undo()
        register()
    assert "toy_ia3" not in methods.METHODS and "toy_ia3.yaml" not in ConfigStore.instance().repo["peft"]


# ------------------------------------------------------------------ a strategy's own server state and start


def lora_update(client: int, rank: int) -> strategies.ClientUpdate:
    g = torch.Generator().manual_seed(client)
    return strategies.ClientUpdate(client, {"l0.q": LoraFactors(torch.randn(rank, 4, generator=g), torch.randn(3, rank, generator=g), 2.0)}, {}, 10)


def test_the_default_server_state_keeps_nothing_and_hetloras_keeps_each_clients_pruned_rank():
    from strategies.base import ServerState
    from strategies.hetlora import PrunedRanks

    spec = strategies.ClientSpec(3, 8, 16.0)
    plain = strategies.build("fedavg").server_state()
    assert type(plain) is ServerState and plain.spec(spec) is spec and plain.state_dict() == {}
    plain.applied([(spec, lora_update(3, 4))])
    plain.load_state_dict({"rank_now": {3: 4}})
    assert plain.spec(spec) is spec and plain.state_dict() == {}

    het = strategies.build("hetlora", gamma=0.5).server_state()
    assert type(het) is PrunedRanks and het.rank_now == {}
    assert strategies.build("hetlora").server_state() is not het  # a fresh one per run
    specs = [strategies.ClientSpec(0, 8, 16.0), strategies.ClientSpec(1, 4, 8.0), strategies.ClientSpec(2, 8, 16.0)]
    headless = strategies.ClientUpdate(2, {}, {}, 10)  # no LoRA factors: nothing pruned
    het.applied([(specs[0], lora_update(0, 4)), (specs[1], lora_update(1, 4)), (specs[2], headless)])
    assert het.rank_now == {0: 4}
    assert het.spec(specs[0]) == strategies.ClientSpec(0, 4, 16.0)  # the pruned rank, its alpha kept
    assert het.spec(specs[1]) is specs[1] and het.spec(specs[2]) is specs[2]
    assert het.spec(strategies.ClientSpec(0, 2, 4.0)).rank == 2  # never above the client's configured rank
    het.applied([(strategies.ClientSpec(0, 4, 16.0), lora_update(0, 2))])  # pruned again, from the rank it was sent
    assert het.rank_now == {0: 2} and het.state_dict() == {"rank_now": {0: 2}}
    again = PrunedRanks()
    again.load_state_dict({"rng": None, "rank_now": {"1": 2.0}})  # the saved key; its values read as ints
    assert again.rank_now == {1: 2}
    fresh = PrunedRanks()
    fresh.load_state_dict({})
    assert fresh.rank_now == {}


def test_start_hands_the_pretrained_weights_only_to_a_strategy_that_declares_them():
    from strategies.federa import FeDeRA

    shapes = {"l0.q": (6, 5), "l0.v": (6, 5)}
    g = torch.Generator().manual_seed(0)
    model = strategies.GlobalModel({m: LoraFactors(torch.randn(2, i, generator=g), torch.zeros(o, 2), 2.0) for m, (o, i) in shapes.items()})
    W = {m: torch.randn(o, i, generator=g) for m, (o, i) in shapes.items()}
    fedavg = strategies.build("fedavg")
    assert fedavg.start(model) is model and fedavg.start(model, W) is model  # FedAvg's init, without the weights
    want = FeDeRA().init(model, base_weights=W)
    got = FeDeRA().start(model, W)
    assert got.version == want.version == 1
    for m in shapes:
        assert torch.equal(got.adapter[m].A, want.adapter[m].A) and torch.equal(got.adapter[m].B, want.adapter[m].B)
        assert torch.equal(got.merges[0][m].A, want.merges[0][m].A)
    with pytest.raises(ValueError, match=r"^strategy=federa initialises from the pre-trained weights: pass base_weights$"):
        FeDeRA().start(model)


OLD_STATE_KEYS = {"model", "merge_forms", "seen", "merges_published", "rng", "rank_now", "rounds_applied", "ledger"}  # before ServerState
CLAIM_KEYS = {"partition_of", "local_data"}  # which node holds which partition (issue 24): a state without them resumes
STATE_KEYS = (OLD_STATE_KEYS - {"seen"}) | CLAIM_KEYS  # a resumed run sends each node every merge again: what each node had is not kept


def test_the_servers_saved_state_keeps_its_keys_and_a_state_saved_before_resumes():
    shapes = {"l0.q": (3, 4)}
    g = torch.Generator().manual_seed(1)
    start = strategies.GlobalModel({"l0.q": LoraFactors(torch.randn(8, 4, generator=g), torch.zeros(3, 8), 1.0)})

    def adapter(name, **kw):
        return FlowerAdapter(strategies.build(name, **kw), start, fraction=1.0, min_clients=1,
                             client_spec=lambda i: strategies.ClientSpec(i, 8, 8.0), shapes=shapes, seed=0)

    het = adapter("hetlora", gamma=0.5)
    het.strategy_state.applied([(strategies.ClientSpec(0, 8, 8.0), lora_update(0, 4))])
    state = het.state_dict()
    assert set(state) == STATE_KEYS and state["rank_now"] == {0: 4}
    again = adapter("hetlora", gamma=0.5)
    again.load_state_dict({**state, "seen": {0: 1}})  # a state saved with the nodes' base versions still resumes
    assert again.strategy_state.rank_now == {0: 4}
    spec, payload = again.payload_of(0)
    assert spec.rank == 4 and {f.rank for f in payload.adapter.values()} == {4}
    assert again.payload_of(1)[0].rank == 8
    # other strategies keep no rank_now now; a state saved with the old empty one still resumes
    fedavg = adapter("fedavg")
    assert set(fedavg.state_dict()) == STATE_KEYS - {"rank_now"}
    adapter("fedavg").load_state_dict({**fedavg.state_dict(), "rank_now": {}})
    old = adapter("fedavg")
    old.load_state_dict({k: v for k, v in fedavg.state_dict().items() if k not in CLAIM_KEYS})
    assert old.partition_of == {} and not old.restored
    # a strategy state key that is the server's own is refused in one line, not silently overwritten
    het.strategy_state.state_dict = lambda: {"rng": 0}
    with pytest.raises(ValueError, match=r"^strategy=hetlora: its server state's keys \['rng'\] are the server's own"):
        het.state_dict()


@pytest.mark.usefixtures("task_identity")
def test_personalised_evaluation_belongs_to_a_personalized_strategy_only():
    from fedpeft.server import PersonalEvaluation

    shapes = {"l0.q": (3, 4)}
    start = strategies.GlobalModel({"l0.q": LoraFactors(torch.zeros(2, 4), torch.zeros(3, 2), 2.0)})
    for name, personalized in [("fedsa_lora", True), ("fedavg", False), ("hetlora", False)]:
        fa = FlowerAdapter(strategies.build(name), start, fraction=1.0, min_clients=1, client_spec=lambda i: strategies.ClientSpec(i, 2, 4.0),
                           shapes=shapes, seed=0)
        assert isinstance(fa.evaluation, PersonalEvaluation) is personalized
        msgs = list(fa.configure_evaluate(1, fa.arrays(), ConfigRecord(), FakeGrid({11: 0, 12: 1})))
        assert len(msgs) == (2 if personalized else 0) and fa.personal == {}
        if not personalized:
            assert fa.aggregate_evaluate(1, []) is None

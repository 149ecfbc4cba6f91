"""Regression tests for behaviours that nothing else would notice if they went missing (issue 8,
part 5), on the server side alone: ``fedpeft.server.FlowerAdapter`` over a ``FakeGrid``, without a
model (those that run the ClientApp with MiniLM: tests/app/test_regressions.py). Each test fails
when its behaviour is removed; how that was checked is noted in each.
"""

import pytest
import torch
from flwr.app import ConfigRecord

import strategies
from fedpeft import messages
from fedpeft.lora import LoraFactors, scaling_for, seeded_lora_A, truncate
from fedpeft.server import FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from strategies.ffa_lora import FFALoRA
from strategies.hetlora import HetLoRA
from tests.harness import FakeGrid, random_B, reply_to

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"l0.q": (48, 64), "l0.v": (48, 64)}
ALPHA = 8.0
RANK = 4


# ------------------------------------------------------------------ 1. HetLoRA: the pruned rank is remembered


def test_hetlora_server_sends_a_pruned_client_its_pruned_rank_in_later_rounds():
    """Mutation check: with ``self.rank_now[...] = rank`` (strategies/hetlora.py PrunedRanks.applied) or the
    ``rank_now`` lookup in PrunedRanks.spec removed, round 2 goes out at the config rank 8: fails."""
    ranks = {0: 8, 1: 4}
    g = torch.Generator().manual_seed(0)
    start = {m: LoraFactors(torch.randn(8, i, generator=g), torch.zeros(o, 8), scaling_for(8, ALPHA)) for m, (o, i) in SHAPES.items()}
    fa = FlowerAdapter(HetLoRA(gamma=0.5, r_min=1), GlobalModel(start, {}), fraction=1.0, min_clients=1,
                       client_spec=lambda i: ClientSpec(i, ranks[i], ALPHA), shapes=SHAPES, seed=0)
    grid = FakeGrid({101: 0, 102: 1})

    def sent_ranks(msgs):
        out = {}
        for m in msgs:
            dec = messages.decode(m.content)
            r = {f.rank for f in dec.adapter.values()}
            assert len(r) == 1 and dec.config["rank"] in r  # the factors and the config agree
            (rk,) = r
            assert all(f.scaling == scaling_for(rk, ALPHA) for f in dec.adapter.values())
            out[grid.nodes[m.metadata.dst_node_id]] = rk
        return out

    def replies(msgs, prune_to):
        out = []
        for i, m in enumerate(msgs):
            pid = grid.nodes[m.metadata.dst_node_id]
            dec = messages.decode(m.content)
            trained = random_B(dec.adapter, seed=10 * pid + i)
            r = prune_to.get(pid)
            if r is not None:
                trained = {k: truncate(f, r) for k, f in trained.items()}
            out.append(reply_to(m, trained, dec.head))
        return out

    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), grid))
    assert sent_ranks(msgs) == {0: 8, 1: 4}
    fa.aggregate_train(1, replies(msgs, {0: 4}))  # client 0 self-pruned 8 → 4
    assert fa.stats[1].replied == 2 and fa.stats[1].rejected == 0

    msgs = list(fa.configure_train(2, fa.arrays(), ConfigRecord(), grid))
    assert sent_ranks(msgs) == {0: 4, 1: 4}  # not the config rank 8
    fa.aggregate_train(2, replies(msgs, {0: 2}))  # and again 4 → 2
    assert fa.stats[2].replied == 2 and fa.stats[2].rejected == 0

    msgs = list(fa.configure_train(3, fa.arrays(), ConfigRecord(), grid))
    assert sent_ranks(msgs) == {0: 2, 1: 4}
    # the payload at the pruned rank is the global adapter's leading components
    dec = messages.decode(next(m for m in msgs if grid.nodes[m.metadata.dst_node_id] == 0).content)
    for m, f in dec.adapter.items():
        torch.testing.assert_close(f.A, fa.model.adapter[m].A[:2])


# ------------------------------------------------------------------ 4. the run seed reaches FFA-LoRA's shared A


def test_run_seed_reaches_ffa_loras_shared_A_on_server_and_client():
    """Mutation checks: ``strategy_kwargs`` without ``"seed": cfg.seed`` (fedpeft/serverapp.py) →
    seeds 0 and 1 give the same A; ``FFALoRA.init`` drawing A with a fixed seed → the client's A
    (regenerated from ``A_seed``) differs from the server's for seed 1. Both fail."""
    from fedpeft.composing import compose
    from fedpeft.serverapp import strategy_kwargs

    zeros = GlobalModel({m: LoraFactors(torch.zeros(8, i), torch.zeros(o, 8), 1.0) for m, (o, i) in SHAPES.items()}, {})
    A_server, A_client = {}, {}
    for seed in (0, 1):
        kw = strategy_kwargs(compose([f"seed={seed}", "strategy=ffa_lora"]))
        assert kw["seed"] == seed
        for run in range(2):  # two runs of the same config
            s = strategies.build("ffa_lora", **kw)
            assert isinstance(s, FFALoRA) and s.seed == seed
            fa = FlowerAdapter(s, zeros, fraction=1.0, min_clients=1,
                               client_spec=lambda i: ClientSpec(i, RANK, ALPHA), shapes=SHAPES, seed=seed)
            (msg,) = fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid({401: 0}))
            assert not any(k.startswith("A/") for k in msg.content.array_records[messages.ARRAYS])  # A is not sent
            dec = messages.decode(msg.content)  # the client regenerates A from A_seed
            assert dec.config["A_seed"] == seed
            A_server[seed, run] = {m: f.A for m, f in fa.model.adapter.items()}
            A_client[seed, run] = {m: f.A for m, f in dec.adapter.items()}
            for m, (_o, i) in SHAPES.items():
                assert torch.equal(A_client[seed, run][m], A_server[seed, run][m][:RANK])
                assert torch.equal(A_server[seed, run][m], seeded_lora_A(m, 8, i, seed))
    for m in SHAPES:
        assert torch.equal(A_server[0, 0][m], A_server[0, 1][m]) and torch.equal(A_server[1, 0][m], A_server[1, 1][m])
        assert torch.equal(A_client[0, 0][m], A_client[0, 1][m]) and torch.equal(A_client[1, 0][m], A_client[1, 1][m])
        assert not torch.allclose(A_server[0, 0][m], A_server[1, 0][m])
        assert not torch.allclose(A_client[0, 0][m], A_client[1, 0][m])
    assert strategy_kwargs(compose(["seed=5", "strategy=ffa_lora"]))["seed"] == 5

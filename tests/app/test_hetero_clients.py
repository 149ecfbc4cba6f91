"""Client and server plumbing of the heterogeneous-rank strategies, in-process (no Ray)."""

from types import SimpleNamespace

import pytest
import torch

from clients.app import sync_base
from clients.train import TrainSettings, evaluate, train
from fedpeft import data as fdata
from fedpeft.lora import LoraFactors, scaling_for, seeded_lora_A
from fedpeft.merges import load_merge, save_merge
from fedpeft.models import build, layer, module_shapes, read_adapter, use_adapter
from fedpeft.plan import ClientPlan
from fedpeft.server import global_adapter, load_global
from strategies.base import GlobalModel, Payload
from tests.harness import pruning_plan

MODEL = SimpleNamespace(name="minilm", task="classification", target_modules=["query", "value"], rank=4, alpha=8.0, dropout=0.0, max_length=32)


@pytest.fixture(scope="module")
def tweets():
    return fdata.load("election_tweets", seed=0)["train"].shuffle(seed=3).select(range(96))


def new_model():
    torch.set_num_threads(2)
    return build(MODEL, num_labels=2, device="cpu", seed=0)


@pytest.fixture(scope="module")
def lm():
    return new_model()


def random_merge(lm, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {m: LoraFactors(torch.randn(rank, i, generator=g) * 0.01, torch.randn(o, rank, generator=g) * 0.01, 1.0) for m, (o, i) in module_shapes(lm).items()}


def test_workers_with_different_histories_reach_the_same_base_bit_for_bit(tmp_path):
    w1, w2 = new_model(), new_model()
    merges = {v: random_merge(w1, 3 + v, v) for v in (1, 2, 3)}
    for v, m in merges.items():
        save_merge(tmp_path, v, m)
    sync_base(w1, 1, {1: merges[1]})
    sync_base(w1, 2, {2: merges[2]})
    sync_base(w1, 3, {3: merges[3]})
    # w2 was idle for two rounds; its node's message only carries merge 3: merges 1-2 come from the
    # node's state (here as the store, the checkpoint beside server.pt, has them).
    sync_base(w2, 3, {1: load_merge(tmp_path, 1), 2: load_merge(tmp_path, 2), 3: merges[3]})
    assert w1.base_version == w2.base_version == 3
    for m in w1.modules:
        assert torch.equal(layer(w1, m).base_layer.weight, layer(w2, m).base_layer.weight)
    with pytest.raises(RuntimeError, match=r"base merge 1 is neither in the message nor in this node's state \(this worker's base is at version 0\)"):
        sync_base(new_model(), 1, {})
    back = load_merge(tmp_path, 2)
    assert all(torch.equal(back[m].A, merges[2][m].A) for m in back)


def test_a_device_rebuilds_its_base_in_a_new_process_from_the_merges_its_node_kept():
    """Flower 1.41 runs each message in a new ClientApp process; the node state (Context.state)
    survives. A device sent merge 1 in round 2 and only merge 2 in round 3 rebuilds W0 + both.
    Mutation check: ``keep_merges`` doing nothing (clients/app.py) → round 3's sync raises."""
    from flwr.app import Context, RecordDict

    from clients.app import keep_merges, kept_merges

    ref = new_model()
    merges = {v: random_merge(ref, 2 + v, 20 + v) for v in (1, 2)}
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    keep_merges(ctx, {1: merges[1]})  # round 2's message
    fresh = new_model()  # round 3: a new process, base at version 0; the message carries merge 2 only
    sync_base(fresh, 2, {**kept_merges(ctx), 2: merges[2]})
    for v in (1, 2):
        sync_base(ref, v, {v: merges[v]})
    for m in ref.modules:
        assert torch.equal(layer(fresh, m).base_layer.weight, layer(ref, m).base_layer.weight)
    keep_merges(ctx, {2: merges[2]})
    back = kept_merges(ctx)
    assert sorted(back) == [1, 2] and all(torch.equal(back[2][m].B, merges[2][m].B) for m in back[2])


def test_flora_checkpoint_adapter_rebuilds_the_merged_model(tmp_path, tweets):
    base, merged = new_model(), new_model()
    merges = tuple(random_merge(base, r, 10 + r) for r in (5, 7))
    for v, m in enumerate(merges, start=1):
        sync_base(merged, v, {v: m})
    g0 = read_adapter(base)
    model = GlobalModel(adapter={}, head=g0.head, merges=merges)
    cumulative = global_adapter(model)
    assert next(iter(cumulative.values())).rank == 12
    load_global(base, model)  # W0 + the cumulative adapter, as the server evaluates and saves it
    use_adapter(merged, 4, 8.0)
    zero = {m: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling) for m, f in read_adapter(merged).adapter.items()}
    from fedpeft.models import write_adapter

    write_adapter(merged, zero, g0.head)
    a, b = evaluate(base, tweets, 48), evaluate(merged, tweets, 48)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_ffa_client_trains_B_only_and_keeps_the_shared_A(lm, tweets):
    use_adapter(lm, 4, 8.0)
    shapes = module_shapes(lm)
    A = {m: seeded_lora_A(m, 4, i, seed=7) for m, (o, i) in shapes.items()}
    payload = Payload(
        adapter={m: LoraFactors(A[m], torch.zeros(o, 4), scaling_for(4, 8.0)) for m, (o, i) in shapes.items()},
        head=read_adapter(lm).head,
        plan=ClientPlan(train_A=False, A_seed=7),
    )
    update, _ = train(lm, payload, tweets, TrainSettings(3, 16, 1e-2), seed=0, client_id=0)
    for m in shapes:
        assert torch.equal(update.adapter[m].A, A[m])
        assert update.adapter[m].B.abs().sum() > 0
    assert all(layer(lm, m).lora_A["default"].weight.requires_grad for m in shapes)  # restored


def test_fresh_init_is_seeded_and_starts_at_zero_update(lm, tweets):
    use_adapter(lm, 6, 8.0)
    head = read_adapter(lm).head
    runs = [
        train(lm, Payload(adapter={}, head=head, plan=ClientPlan(init_seed=s)), tweets, TrainSettings(1, 8, 1e-9), seed=0, client_id=0)[0]
        for s in (5, 5, 6)
    ]
    m = lm.modules[0]
    assert runs[0].adapter[m].rank == 6
    torch.testing.assert_close(runs[0].adapter[m].A, runs[1].adapter[m].A)
    assert not torch.allclose(runs[0].adapter[m].A, runs[2].adapter[m].A)
    assert runs[0].adapter[m].B.abs().max() < 1e-6  # peft's init: B = 0 (one tiny step at lr 1e-9)


def test_hetlora_pruning_shrinks_the_rank_when_the_tail_is_driven_to_zero(lm, tweets):
    use_adapter(lm, 8, 8.0)
    g = read_adapter(lm)
    gen = torch.Generator().manual_seed(0)
    start = {m: LoraFactors(f.A, torch.randn(f.B.shape, generator=gen) * 0.05, f.scaling) for m, f in g.adapter.items()}
    update, metrics = train(lm, Payload(start, g.head, pruning_plan(0.5, 5.0, 2)), tweets, TrainSettings(6, 16, 1e-2), seed=0, client_id=0)
    assert metrics["rank_after_pruning"] == 4
    assert all(f.rank == 4 for f in update.adapter.values())
    # Without the regulariser pushing it down, the tail grows with training and the rank stays.
    update0, metrics0 = train(lm, Payload(start, g.head, pruning_plan(0.5, 0.0, 2)), tweets, TrainSettings(6, 16, 1e-2), seed=0, client_id=0)
    assert metrics0["rank_after_pruning"] == 8 and all(f.rank == 8 for f in update0.adapter.values())

"""SLoRA (``strategy=slora``) through the real client and server: a stage-1 client step moves the
masked base entries by exactly the base weight's gradient there (SGD, against autograd on the
weight itself) and nothing else; over the real ClientApp, stage 1's replies carry the masked values
only (4 bytes each, the mask regenerated from the seed), and the switch's LoRA is the best rank-r
approximation of the averaged sparse update (the math against numpy: tests/unit/test_slora.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import strategies
from clients.train import TrainSettings, batch_order, encode, train
from fedpeft import messages
from fedpeft.lora import sparse_mask, sparse_mask_size
from fedpeft.models import SparseDelta, layer, module_shapes, write_adapter
from fedpeft.plan import SPARSE
from fedpeft.server import FlowerAdapter, load_global
from strategies.base import ClientSpec, GlobalModel
from strategies.slora import SLoRA, scatter_values
from tests.app.test_multinode import _tensors, rows
from tests.app.test_multinode import federate as federate_on
from tests.harness import federate, rotten_minilm


def test_a_stage_one_step_is_the_base_weights_gradient_on_the_mask():
    lm, part, start = rotten_minilm(32)
    shapes = module_shapes(lm)
    s = strategies.build("slora", sparse_density=0.05, seed=3)
    g = s.start(GlobalModel(start.adapter, start.head), {m: torch.zeros(sh) for m, sh in shapes.items()})
    v0 = {m: torch.randn(sparse_mask_size(sh, 0.05)) * 1e-2 for m, sh in shapes.items()}  # a stage-1 state that is not 0
    g = GlobalModel(g.adapter, {**g.head, **{SPARSE + m: v for m, v in v0.items()}})
    payload = s.payload(g, ClientSpec(0, 4, 8.0))
    base = {m: layer(lm, m).base_layer.weight.detach().clone() for m in shapes}
    lr, batch = 0.5, 8
    u, _ = train(lm, payload, part, TrainSettings(local_steps=1, batch_size=batch, lr=lr, optimizer="sgd"), seed=5, client_id=0)
    assert set(u.head) == set(g.head)
    for m in shapes:  # the frozen base is never written; the LoRA stays the seeded fresh one (B = 0)
        assert torch.equal(layer(lm, m).base_layer.weight, base[m])
        assert torch.count_nonzero(u.adapter[m].B) == 0
    # independently: W = W_0 + scatter(v0) written into the weights, autograd on W, the same batch
    idx = next(batch_order(len(part), 1, batch, 5))
    try:
        with torch.no_grad():
            for m in shapes:
                layer(lm, m).lora_B[next(iter(layer(lm, m).lora_B))].weight.zero_()
                w = layer(lm, m).base_layer.weight
                w += scatter_values(sparse_mask(m, shapes[m], 0.05, 3), v0[m], shapes[m])
                w.requires_grad_(True)
        write_adapter(lm, {m: f for m, f in u.adapter.items()}, {h: t for h, t in g.head.items() if not h.startswith(SPARSE)})
        lm.model.train()
        lm.model.zero_grad(set_to_none=True)
        with torch.random.fork_rng():  # BERT's dropout draws as train() seeds it: torch.manual_seed(seed)
            torch.manual_seed(5)
            lm.model(**encode(lm, part[idx])).loss.backward()
        for m in shapes:
            grad = layer(lm, m).base_layer.weight.grad.reshape(-1)[sparse_mask(m, shapes[m], 0.05, 3)]
            torch.testing.assert_close(u.head[SPARSE + m], v0[m] - lr * grad, rtol=1e-4, atol=1e-6)
            assert not torch.equal(u.head[SPARSE + m], v0[m])
    finally:
        lm.model.eval()
        with torch.no_grad():
            for m in shapes:
                w = layer(lm, m).base_layer.weight
                w.requires_grad_(False)
                w.copy_(base[m])
                w.grad = None


def arrays(content) -> dict[str, tuple[int, ...]]:
    record = content.array_records[messages.ARRAYS]
    return {k: np.load(io.BytesIO(a.data)).shape for k, a in record.items()}


@pytest.mark.usefixtures("task_identity")
def test_stage_one_sends_masked_values_and_the_switch_is_the_svd(tmp_path, monkeypatch):
    replies, rounds = [], []
    check, aggregate = FlowerAdapter.check_reply, SLoRA.aggregate

    def spy_check(self, node, msg):
        replies.append(arrays(msg.content))
        return check(self, node, msg)

    def spy_aggregate(self, model, updates):
        out = aggregate(self, model, updates)
        rounds.append((model, updates, out))
        return out

    monkeypatch.setattr(FlowerAdapter, "check_reply", spy_check)
    monkeypatch.setattr(SLoRA, "aggregate", spy_aggregate)
    cfg, summary = federate(tmp_path, "strategy=slora", "strategy.sparse_rounds=1", "strategy.sparse_density=0.02", "clients=2",
                            "rounds=2", "train.local_steps=2", "data.eval_samples=64")
    assert summary["rounds_applied"] == 2 and len(rounds) == 2 and len(replies) == 4
    (m0, ups, m1), (_, ups2, m2) = rounds
    shapes = {m: f.shape for m, f in m0.adapter.items()}
    # stage 1's replies: the head and k = ⌈0.02 · out · in⌉ values per module, no LoRA factor
    for r in replies[:2]:
        assert not any(k.startswith(("A/", "B/")) for k in r)
        assert {k: s for k, s in r.items() if k.startswith("head/" + SPARSE)} == {
            f"head/{SPARSE}{m}": (sparse_mask_size(sh, 0.02),) for m, sh in shapes.items()}
    assert all(any(k.startswith("A/") for k in r) for r in replies[2:])  # stage 2: FedAvg of LoRA
    # the switch, independently: the weighted mean of the values, scattered, and numpy's SVD
    n = np.array([u.num_examples for u in ups], dtype=np.float64)
    for m, (o, i) in shapes.items():
        v = sum(w * u.head[SPARSE + m].double().numpy() for w, u in zip(n / n.sum(), ups))
        dense = np.zeros(o * i)
        dense[sparse_mask(m, (o, i), 0.02, cfg.seed).numpy()] = v
        U, S, Vt = np.linalg.svd(dense.reshape(o, i))
        f = m1.adapter[m]
        assert f.rank == cfg.model.rank
        np.testing.assert_allclose((f.scaling * f.B.double() @ f.A.double()).numpy(), (U[:, :4] * S[:4]) @ Vt[:4], atol=1e-6)
    assert not any(h.startswith(SPARSE) for h in m1.head) and m2.aggregations == 2


@pytest.mark.usefixtures("task_identity", "one_torch_thread")
def test_a_run_resumed_in_stage_one_continues_bit_for_bit_through_the_switch(tmp_path):
    """The accumulated sparse update and the stage live in the saved global model (its head and
    ``aggregations``): a run stopped after round 1 of stage 1 and resumed equals the uninterrupted one."""
    over = ["strategy=slora", "strategy.sparse_rounds=2", "strategy.sparse_density=0.02", "fraction=0.5", "min_clients=1"]
    one, _ = federate_on(tmp_path / "one", over, run_id=71)
    stopped, _ = federate_on(tmp_path / "resumed", [*over, "rounds=1"], run_id=72)
    saved = stopped.adapter.state_dict()["model"]
    assert saved["aggregations"] == 1 and any(h.startswith(SPARSE) for h in saved["head"])  # mid stage 1: ΔW's values saved
    resumed, _ = federate_on(tmp_path / "resumed", over, run_id=73, resume=True)
    assert rows(resumed)[-2:] == rows(one)[-2:], (rows(resumed), rows(one))
    a, b = one.adapter.state_dict()["model"], resumed.adapter.state_dict()["model"]
    assert a["aggregations"] == 3 and not any(h.startswith(SPARSE) for h in a["head"])  # past the switch
    for (ka, ta), (kb, tb) in zip(sorted(_tensors(a)), sorted(_tensors(b))):
        assert ka == kb and torch.equal(ta, tb), ka


def test_the_server_evaluates_stage_one_as_the_clients_model():
    """:meth:`SLoRA.evaluated` loaded as the server loads its global model (an exact adapter of ΔW)
    gives the logits of the client's model with the masked values beside the frozen base."""
    lm, part, start = rotten_minilm(8)
    shapes = module_shapes(lm)
    s = strategies.build("slora", sparse_density=0.1, seed=4)
    g = s.start(GlobalModel(start.adapter, start.head), {m: torch.zeros(sh) for m, sh in shapes.items()})
    vals = {m: torch.randn(sparse_mask_size(sh, 0.1)) * 0.05 for m, sh in shapes.items()}
    g = GlobalModel(g.adapter, {**g.head, **{SPARSE + m: v for m, v in vals.items()}})
    batch = encode(lm, part[list(range(8))])
    lm.model.eval()
    write_adapter(lm, g.adapter, start.head)  # the clients' frozen LoRA: B = 0
    deltas = SparseDelta.attach(lm, vals, 0.1, 4)
    try:
        with torch.no_grad():
            want = lm.model(**batch).logits
    finally:
        for d in deltas.values():
            d.remove()
    with torch.no_grad():
        plain = lm.model(**batch).logits
    load_global(lm, s.evaluated(g))
    with torch.no_grad():
        got = lm.model(**batch).logits
    assert (want - plain).abs().max() > 1e-3  # the sparse update moves the logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

"""FedSA-LoRA (strategies/fedsa_lora.py): only A and the head are shared; each client keeps its own
B across rounds (on disk, ``<shared-dir>/client_<id>``) and evaluates its own model on a held-out
split of its partition (evaluate messages). In-process, on random tensors (the ClientApp with MiniLM:
tests/app/test_fedsa.py; one small real simulation: tests/e2e/test_fedsa.py)."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

import strategies
from fedpeft import messages
from fedpeft.lora import LoraFactors, scaling_for
from fedpeft.plan import ClientPlan
from fedpeft.server import FlowerAdapter, personal_metrics
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.fedsa_lora import FedSALoRA
from tests.harness import FakeGrid

SHAPES = {"l0.q": (6, 8), "l0.v": (6, 8)}
RANK, ALPHA = 4, 8.0
S = scaling_for(RANK, ALPHA)


def rand_adapter(g, scale=1.0):
    return {m: LoraFactors(torch.randn(RANK, i, generator=g, dtype=torch.float64), scale * torch.randn(o, RANK, generator=g, dtype=torch.float64), S)
            for m, (o, i) in SHAPES.items()}


def rand_head(g):
    return {"w": torch.randn(2, 8, generator=g, dtype=torch.float64), "b": torch.randn(2, generator=g, dtype=torch.float64)}


# ------------------------------------------------------------------ the strategy's math


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_aggregate_is_the_weighted_average_of_A_and_never_reads_B(seed, weighting):
    g = torch.Generator().manual_seed(seed)
    st = FedSALoRA(weighting=weighting)
    model = st.init(GlobalModel(rand_adapter(g), rand_head(g)))
    assert all(torch.count_nonzero(f.B) == 0 for f in model.adapter.values())  # the server holds no B
    K = 2 + seed
    sizes = [int(n) for n in torch.randint(1, 100, (K,), generator=g)]
    updates = [ClientUpdate(k, rand_adapter(g), rand_head(g), n) for k, n in enumerate(sizes)]
    new = st.aggregate(model, updates)
    p = np.array(sizes, dtype=np.float64) / sum(sizes) if weighting == "num_examples" else np.full(K, 1.0 / K)
    for m in SHAPES:
        want = sum(pk * u.adapter[m].A for pk, u in zip(p, updates))
        torch.testing.assert_close(new.adapter[m].A, want, rtol=0, atol=1e-12)
        assert torch.equal(new.adapter[m].B, model.adapter[m].B) and new.adapter[m].scaling == S
    for h in model.head:
        torch.testing.assert_close(new.head[h], sum(pk * u.head[h] for pk, u in zip(p, updates)), rtol=0, atol=1e-12)
    # The clients' B are neither read nor changed: other B, the same aggregate; their tensors untouched.
    before = [{m: f.B.clone() for m, f in u.adapter.items()} for u in updates]
    other = [ClientUpdate(u.client_id, {m: LoraFactors(f.A, 1e3 * torch.randn_like(f.B), f.scaling) for m, f in u.adapter.items()}, u.head, u.num_examples)
             for u in updates]
    again = st.aggregate(model, other)
    assert all(torch.equal(again.adapter[m].A, new.adapter[m].A) for m in SHAPES)
    assert all(torch.equal(u.adapter[m].B, b[m]) for u, b in zip(updates, before) for m in SHAPES)
    pay = st.payload(new, ClientSpec(0, RANK, ALPHA))
    assert pay.plan.to_config() == {"personal_B": True} and pay.plan.personal_B and pay.adapter is new.adapter


def test_declarations_and_a_wrong_scaling_are_refused():
    assert FedSALoRA.lora_update_only and FedSALoRA.personalized and not FedSALoRA.heterogeneous_ranks
    assert strategies.REGISTRY["fedsa_lora"] is FedSALoRA and strategies.personalized("fedsa_lora") and not strategies.personalized("fedavg")
    assert "central" not in FedSALoRA.privacy_modes
    g = torch.Generator().manual_seed(0)
    st = FedSALoRA()
    model = st.init(GlobalModel(rand_adapter(g), {}))
    bad = {m: LoraFactors(f.A, f.B, 2 * S) for m, f in rand_adapter(g).items()}
    with pytest.raises(ValueError, match=r"^client 3: LoRA A of module 'l0\.q' .* needs one rank and scaling"):
        st.aggregate(model, [ClientUpdate(3, bad, {}, 1)])


# ------------------------------------------------------------------ the wire: B never travels


@pytest.mark.usefixtures("task_identity")
def test_no_B_travels_either_way_and_the_server_aggregates_A_and_the_head(caplog):
    g = torch.Generator().manual_seed(1)
    adapter = {m: LoraFactors(f.A.float(), f.B.float(), f.scaling) for m, f in rand_adapter(g).items()}
    head = {k: t.float() for k, t in rand_head(g).items()}
    st = FedSALoRA()
    fa = FlowerAdapter(st, GlobalModel(adapter, head), fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, RANK, ALPHA),
                       shapes=SHAPES, seed=0)
    nodes = {11: 0, 12: 1, 13: 2}
    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid(nodes)))
    for m in msgs:
        keys = set(m.content.array_records[messages.ARRAYS])
        assert keys == {f"A/{n}" for n in SHAPES} | {f"head/{h}" for h in head}
        dec = messages.decode(m.content)
        assert dec.config["personal_B"] is True
        assert all(torch.count_nonzero(f.B) == 0 and f.B.shape == (SHAPES[n][0], RANK) for n, f in dec.adapter.items())
    # Replies carry A and the head; one that sends its B is rejected, naming the array.
    trained = {node: {n: LoraFactors(f.A + node, f.B + node, f.scaling) for n, f in adapter.items()} for node in nodes}
    out = []
    for node in nodes:
        send_B = node == 13  # client 2 sends its B anyway
        content = messages.encode(trained[node], head, {"num-examples": 10 * node}, send_B=send_B)
        out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""), has_error=lambda: False, content=content))
    fa.aggregate_train(1, out)
    assert fa.stats[1].replied == 2 and fa.stats[1].rejected == 1
    assert any("client 2 (node 13) rejected: unexpected array 'B/" in r.getMessage() for r in caplog.records)
    p = [110 / 230, 120 / 230]
    for n in SHAPES:
        torch.testing.assert_close(fa.model.adapter[n].A, p[0] * trained[11][n].A + p[1] * trained[12][n].A)
        assert torch.count_nonzero(fa.model.adapter[n].B) == 0
    with_B = sum(messages.num_bytes(messages.encode(trained[n], head, {"num-examples": 10 * n})) for n in (11, 12))
    assert fa.stats[1].bytes_up == sum(messages.num_bytes(r.content) for r in out[:2]) < with_B


# ------------------------------------------------------------------ the clients' B store


def store_step(pid, rnd):
    return SimpleNamespace(partition_id=pid, server_round=rnd, plan=ClientPlan(keep=frozenset({"B"})))


def store_context(shared):
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"shared-dir": str(shared)})


def test_each_client_keeps_its_own_B_on_disk_by_round(tmp_path, monkeypatch):
    from clients import app as client_app

    monkeypatch.setattr(client_app.runconfig, "load", lambda rc: (None, SimpleNamespace(shared_dir=rc["shared-dir"])))
    ctx = {pid: store_context(tmp_path) for pid in (0, 1)}  # each client's node state
    g = torch.Generator().manual_seed(0)
    Bs = {(pid, r): {n: torch.randn(o, RANK, generator=g) for n, (o, _) in SHAPES.items()} for pid in (0, 1) for r in (1, 2, 3)}
    A = {n: LoraFactors(torch.randn(RANK, i, generator=g), torch.zeros(o, RANK), S) for n, (o, i) in SHAPES.items()}
    assert client_app.load_personal_B(store_step(0, 1), ctx[0], through=0) == {}  # round 1: peft's B = 0
    assert client_app.with_personal_B(A, {}, 0) == A
    for r in (1, 2):
        for pid in (0, 1):
            client_app.save_personal_B(store_step(pid, r), store_context(tmp_path), {n: LoraFactors(A[n].A, B, S) for n, B in Bs[pid, r].items()})
    assert sorted(p.name for p in (tmp_path / "client_0").iterdir()) == ["personal_B_00001.safetensors", "personal_B_00002.safetensors"]
    for pid in (0, 1):  # round 2 trains from its own round-1 B; round 2's evaluation (through 2) sees its round-2 B
        got = client_app.load_personal_B(store_step(pid, 2), store_context(tmp_path), through=1)
        assert all(torch.equal(got[n], Bs[pid, 1][n]) for n in SHAPES)
        got = client_app.load_personal_B(store_step(pid, 2), store_context(tmp_path), through=2)
        assert all(torch.equal(got[n], Bs[pid, 2][n]) for n in SHAPES)
    # A client not sampled in round 3 keeps its round-2 B; the one that trains writes round 3 and the two latest stay.
    client_app.save_personal_B(store_step(0, 3), ctx[0], {n: LoraFactors(A[n].A, B, S) for n, B in Bs[0, 3].items()})
    assert sorted(p.name for p in (tmp_path / "client_0").iterdir()) == ["personal_B_00002.safetensors", "personal_B_00003.safetensors"]
    assert all(torch.equal(client_app.load_personal_B(store_step(1, 4), ctx[1], through=3)[n], Bs[1, 2][n]) for n in SHAPES)
    # A run killed after client 0 wrote round 3 resumes round 3 from its round-2 B (a new process: a new context).
    assert all(torch.equal(client_app.load_personal_B(store_step(0, 3), store_context(tmp_path), through=2)[n], Bs[0, 2][n]) for n in SHAPES)
    mixed = client_app.with_personal_B(A, client_app.load_personal_B(store_step(1, 3), ctx[1], through=2), 1)
    assert all(torch.equal(mixed[n].A, A[n].A) and torch.equal(mixed[n].B, Bs[1, 2][n]) for n in SHAPES)
    with pytest.raises(ValueError, match=r"^client 1: its stored B of module 'l0\.q' is \(6, 3\), expected \(6, 4\)"):
        client_app.with_personal_B(A, {n: torch.zeros(6, 3) for n in SHAPES}, 1)
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically


def test_a_clients_own_B_follows_its_node_state_to_a_machine_that_cannot_see_its_files(tmp_path, monkeypatch):
    """On a Ray cluster whose nodes share no disk, the worker that serves a client next may be on a
    machine where its state dir is empty: its B comes from its Flower node state (which Flower
    carries with every message), not B = 0; the files are a checkpoint for a resumed run (a new,
    empty node state), read only where the node state has nothing from a round that early."""
    from clients import app as client_app

    monkeypatch.setattr(client_app.runconfig, "load", lambda rc: (None, SimpleNamespace(shared_dir=rc["shared-dir"])))
    g = torch.Generator().manual_seed(1)
    Bs = {r: {n: torch.randn(o, RANK, generator=g) for n, (o, _) in SHAPES.items()} for r in (1, 2)}
    A = {n: LoraFactors(torch.randn(RANK, i, generator=g), torch.zeros(o, RANK), S) for n, (o, i) in SHAPES.items()}
    here = store_context(tmp_path / "machine_1")
    for r in (1, 2):
        client_app.save_personal_B(store_step(0, r), here, {n: LoraFactors(A[n].A, B, S) for n, B in Bs[r].items()})
    there = Context(run_id=1, node_id=1, node_config={}, state=here.state, run_config={"shared-dir": str(tmp_path / "machine_2")})
    got = client_app.load_personal_B(store_step(0, 3), there, through=2)
    assert set(got) == set(SHAPES) and all(torch.equal(got[n], Bs[2][n]) for n in SHAPES)
    # the node state holds round 2's B; round 2 re-asked through round 1 (a re-run round) reads the checkpoint before it
    assert all(torch.equal(client_app.load_personal_B(store_step(0, 2), here, through=1)[n], Bs[1][n]) for n in SHAPES)
    assert not (tmp_path / "machine_2").exists()


# ------------------------------------------------------------------ personalised metrics


def test_personal_metrics_are_the_clients_own_with_their_mean_and_percentiles():
    rows = {0: {"accuracy": 0.5, "loss": 0.7}, 3: {"accuracy": 0.9, "loss": 0.2}, 1: {"accuracy": 0.6, "loss": 0.6}, 2: {"accuracy": 1.0, "loss": 0.1}}
    m = personal_metrics(rows)
    assert {k: v for k, v in m.items() if k.startswith("personal_accuracy/")} == {f"personal_accuracy/client_{i}": rows[i]["accuracy"] for i in range(4)}
    acc = [0.5, 0.6, 1.0, 0.9]
    assert m["personal/accuracy_mean"] == pytest.approx(np.mean(acc)) and m["personal/loss_mean"] == pytest.approx(0.4)
    for q in (10, 50, 90):
        assert m[f"personal/accuracy_p{q}"] == pytest.approx(np.percentile(acc, q))
    assert m["personal/accuracy_p10"] <= m["personal/accuracy_p50"] <= m["personal/accuracy_p90"]
    assert personal_metrics({}) == {}
    assert "personal_perplexity/client_0" in personal_metrics({0: {"loss": 2.0, "perplexity": 7.4}})


@pytest.mark.usefixtures("task_identity")
def test_a_client_failing_evaluation_is_reported_and_the_others_count(caplog):
    g = torch.Generator().manual_seed(2)
    adapter = {m: LoraFactors(f.A.float(), f.B.float(), f.scaling) for m, f in rand_adapter(g).items()}
    fa = FlowerAdapter(FedSALoRA(), GlobalModel(adapter, {}), fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, RANK, ALPHA),
                       shapes=SHAPES, seed=0)
    nodes = {11: 0, 12: 1, 13: 2, 14: 3}
    msgs = list(fa.configure_evaluate(2, fa.arrays(), ConfigRecord(), FakeGrid(nodes)))
    assert [m.metadata.message_type for m in msgs] == [MessageType.EVALUATE] * 4
    assert all(not any(k.startswith("B/") for k in m.content.array_records[messages.ARRAYS]) for m in msgs)

    def reply(node, acc=None, error=None, pid=None):
        content = RecordDict({messages.CONFIG: ConfigRecord({"partition-id": nodes[node] if pid is None else pid, "num-examples": 5}),
                              messages.METRICS: messages.metric_record({"accuracy": acc, "loss": 1 - acc} if acc is not None else {})})
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""), has_error=lambda: error is not None,
                               error=SimpleNamespace(reason=error, code=0), content=content)

    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):  # node 14 sends nothing
        fa.aggregate_evaluate(2, [reply(11, 0.8), reply(12, error="ValueError: client 1: boom"), reply(13, 0.6)])
    m = fa.personal[2]
    assert m["personal/clients"] == 2 and m["personal/failed"] == 2
    assert m["personal_accuracy/client_0"] == 0.8 and m["personal_accuracy/client_2"] == 0.6 and "personal_accuracy/client_1" not in m
    assert m["personal/accuracy_mean"] == pytest.approx(0.7)
    lines = [r.getMessage() for r in caplog.records]
    assert "round 2: client 1 on node 12 failed evaluation: ValueError: client 1: boom" in lines
    assert "round 2: client 3 on node 14 failed evaluation: no reply within the round timeout (engine.round_timeout)" in lines
    fa.aggregate_evaluate(3, [reply(11, 0.8, pid=2)])  # a reply claiming another client's partition
    assert fa.personal[3]["personal/failed"] == 4 and fa.personal[3]["personal/clients"] == 0

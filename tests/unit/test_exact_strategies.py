"""FedEx-LoRA, RoLoRA and FeDeRA: each one's defining property on random tensors, their client and
server plumbing in-process (no Ray), and their config checks (on the real MiniLM:
tests/app/test_exact_strategies.py)."""

import pytest
import torch
from flwr.app import ConfigRecord, Message

from fedpeft import merges as merge_forms
from fedpeft import messages
from fedpeft.lora import LoraFactors, delta, normalized_weights, scaling_for
from fedpeft.plan import KEYS, ClientPlan
from fedpeft.server import FlowerAdapter, _model_from_state, _model_state
from strategies import REGISTRY, build
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.federa import FeDeRA
from strategies.fedex_lora import FedExLoRA
from strategies.rolora import RoLoRA
from tests.harness import FakeGrid

OUT, IN, R, ALPHA = 40, 24, 4, 16.0
S = scaling_for(R, ALPHA)
MODULES = ("l0.q", "l0.v")
F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def start_adapter(seed=99, zero_B=True):
    """The server's fresh peft adapter: random A, zero B (or a random B)."""
    return {m: LoraFactors(randn(R, IN, seed=seed + i), randn(OUT, R, seed=seed + 50 + i) * (0 if zero_B else 1), S) for i, m in enumerate(MODULES)}


def head_of(v):
    return {"classifier.weight": torch.full((2, 3), float(v), dtype=F64)}


def effective(W: dict, adapter: dict) -> dict:
    """``W + s B A`` per module (dense, float64)."""
    return {m: W[m] + delta(f) for m, f in adapter.items()}


def base_after(W0: dict, model: GlobalModel) -> dict:
    """``W0 + Σ merges`` per module (dense, float64)."""
    return {m: W0[m] + sum((delta(merge[m]) for merge in model.merges), torch.zeros_like(W0[m])) for m in W0}


# ---------------------------------------------------------------- FedEx-LoRA


def trained(adapter, seed, train_A=True, train_B=True):
    """A client's local training, simulated: both (or one) factors moved at random."""
    return {m: LoraFactors(f.A + 0.3 * randn(*f.A.shape, seed=seed * 7 + i) * train_A, f.B + 0.3 * randn(*f.B.shape, seed=seed * 7 + 3 + i) * train_B,
                           f.scaling)
            for i, (m, f) in enumerate(adapter.items())}


def test_fedex_global_model_is_exactly_the_average_of_the_client_models_every_round():
    """W0 + Σ merges + s B̄ Ā == Σ_k p_k (W_{t-1} + s B_k A_k) to float64 precision, over three
    rounds of three clients (the merges accumulate one per round); the factors are FedAvg's."""
    s = build("fedex_lora")
    W0 = {m: randn(OUT, IN, seed=500 + i) for i, m in enumerate(MODULES)}
    g = s.init(GlobalModel(adapter=start_adapter(), head=head_of(0)))
    for t in range(1, 4):
        W_prev = base_after(W0, g)
        pls = [s.payload(g, ClientSpec(k, R, ALPHA)) for k in range(3)]
        assert all(pl.base_version == t - 1 and pl.adapter is g.adapter for pl in pls)
        ups = [ClientUpdate(k, trained(pl.adapter, seed=10 * t + k), head_of(k + t), [5, 30, 12][k]) for k, pl in enumerate(pls)]
        p = normalized_weights([u.num_examples for u in ups])
        g = s.aggregate(g, ups)
        assert g.version == t
        got = effective(base_after(W0, g), g.adapter)
        for m in MODULES:
            want = sum(pk * (W_prev[m] + delta(u.adapter[m])) for u, pk in zip(ups, p))
            torch.testing.assert_close(got[m], want, rtol=0, atol=1e-12)
            torch.testing.assert_close(g.adapter[m].A, sum(pk * u.adapter[m].A for u, pk in zip(ups, p)), rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(g.adapter[m].B, sum(pk * u.adapter[m].B for u, pk in zip(ups, p)), rtol=1e-14, atol=1e-14)
            assert g.adapter[m].scaling == S
        torch.testing.assert_close(g.head["classifier.weight"], sum(pk * u.head["classifier.weight"] for u, pk in zip(ups, p)))


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_fedex_residual_is_the_literal_stack_at_K_minus_1_times_r_components(K):
    """The literal residual stack B = [B_1 … B_K | B̄], A = [p_1 s A_1; …; p_K s A_K; −s Ā] has
    (K+1)·r components; its rank is (K−1)·r for generic clients (0 for one), and the merge shipped
    is that same matrix in (K−1)·r components (one zero component for K = 1), scaling 1."""
    from fedpeft.lora import average_factors, stack

    out, inn = 96, 80  # (K−1)·r ≤ 16 < min(out, in): the ranks are visible
    s = FedExLoRA()
    g = GlobalModel({"m": LoraFactors(randn(R, inn, seed=1), torch.zeros(out, R, dtype=F64), S)})
    ups = [ClientUpdate(k, {"m": LoraFactors(randn(R, inn, seed=10 + k), randn(out, R, seed=20 + k), S)}, {}, 3 + 5 * k) for k in range(K)]
    p = normalized_weights([u.num_examples for u in ups])
    merge = s.aggregate(g, ups).merges[-1]["m"]
    fs = [u.adapter["m"] for u in ups]
    literal = stack([*fs, average_factors(fs, p)], [*p, -1.0])
    assert literal.rank == (K + 1) * R and merge.rank == max(K - 1, 1 / R) * R and merge.scaling == 1.0
    D = literal.B @ literal.A
    torch.testing.assert_close(merge.B @ merge.A, D, rtol=0, atol=1e-12)
    tol = 1e-10 * max(torch.linalg.matrix_norm(D).item(), 1.0)
    assert torch.linalg.matrix_rank(D, atol=tol).item() == (K - 1) * R
    assert merge_forms.kind(merge_forms.cheapest_form(merge)) == "factors"  # (K−1)·r·(out+in) ≤ out·in here


def test_fedex_needs_one_rank_and_keeps_an_empty_round():
    s = FedExLoRA()
    g = s.init(GlobalModel(adapter=start_adapter()))
    assert s.aggregate(g, []) is g
    odd = {m: LoraFactors(randn(2, IN, seed=1), randn(OUT, 2, seed=2), scaling_for(2, ALPHA)) for m in MODULES}
    with pytest.raises(ValueError, match="one rank and scaling"):
        s.aggregate(g, [ClientUpdate(0, start_adapter(zero_B=False), {}, 1), ClientUpdate(1, odd, {}, 1)])
    assert s.round_metrics(g, [ClientUpdate(0, start_adapter(zero_B=False), {}, 1)]) == {"factor_avg_error": 0.0}


# ---------------------------------------------------------------- RoLoRA


@pytest.mark.parametrize("first", ["B", "A"])
def test_rolora_alternates_and_the_average_of_the_trained_factor_is_exact(first):
    """Odd rounds train ``first``, even rounds the other; with the other factor frozen at the
    global one on every client, s B̄ Ā == Σ_k p_k s B_k A_k to float64 precision."""
    s = RoLoRA(first=first)
    g = s.init(GlobalModel(adapter=start_adapter(zero_B=False), head=head_of(0)))
    assert g.aggregations == 0
    for t in range(1, 5):
        train = first if t % 2 else ("A" if first == "B" else "B")
        frozen = "B" if train == "A" else "A"
        pls = [s.payload(g, ClientSpec(k, R, ALPHA)) for k in range(3)]
        assert all(pl.plan.to_config() == {f"freeze_{frozen}": True} for pl in pls)
        ups = [
            ClientUpdate(k, trained(pl.adapter, seed=10 * t + k, train_A=train == "A", train_B=train == "B"), head_of(k), [5, 30, 12][k])
            for k, pl in enumerate(pls)
        ]
        p = normalized_weights([u.num_examples for u in ups])
        before = g
        g = s.aggregate(g, ups)
        assert g.aggregations == t and g.version == 0
        for m in MODULES:
            want = sum(pk * delta(u.adapter[m]) for u, pk in zip(ups, p))
            torch.testing.assert_close(delta(g.adapter[m]), want, rtol=0, atol=1e-12)
            assert getattr(g.adapter[m], frozen) is getattr(before.adapter[m], frozen)  # the frozen factor: unchanged
            assert not torch.equal(getattr(g.adapter[m], train), getattr(before.adapter[m], train))


def test_rolora_rejects_a_changed_frozen_factor_and_other_shapes():
    s = RoLoRA()  # round 1 trains B: A is frozen
    g = s.init(GlobalModel(adapter=start_adapter(zero_B=False)))
    good = ClientUpdate(0, trained(g.adapter, 1, train_A=False), {}, 5)
    with pytest.raises(ValueError, match="LoRA A of module 'l0.q' differs from the global one; RoLoRA trains only B"):
        s.aggregate(g, [good, ClientUpdate(1, trained(g.adapter, 2), {}, 5)])
    small = {m: LoraFactors(f.A[:2], f.B[:, :2], f.scaling) for m, f in g.adapter.items()}
    with pytest.raises(ValueError, match="client 1: module 'l0.q' has A"):
        s.aggregate(g, [good, ClientUpdate(1, small, {}, 5)])
    with pytest.raises(ValueError, match="strategy.first"):
        RoLoRA(first="C")


def test_rolora_round_count_survives_the_saved_state():
    g = GlobalModel(adapter=start_adapter(zero_B=False), aggregations=3)
    back = _model_from_state(_model_state(g))
    assert back.aggregations == 3
    assert RoLoRA().payload(back, ClientSpec(0, R, ALPHA)).plan == ClientPlan(train_B=False)  # round 4: A
    legacy = _model_state(g)
    del legacy["aggregations"]  # a state written before the count existed
    assert _model_from_state(legacy).aggregations == 0


# ---------------------------------------------------------------- FeDeRA


def test_federa_init_is_the_best_rank_r_approximation_and_leaves_the_function_unchanged():
    W = {m: randn(OUT, IN, seed=300 + i) for i, m in enumerate(MODULES)}
    g0 = GlobalModel(adapter=start_adapter(), head=head_of(1))
    g = FeDeRA().init(g0, base_weights=W)
    assert g.version == 1 and g.head is g0.head
    for m in MODULES:
        f = g.adapter[m]
        assert f.rank == R and f.scaling == S
        U, Sv, Vh = torch.linalg.svd(W[m], full_matrices=False)
        best = U[:, :R] @ torch.diag(Sv[:R]) @ Vh[:R]
        torch.testing.assert_close(delta(f), best, rtol=0, atol=1e-12)
        assert abs(torch.linalg.matrix_norm(W[m] - delta(f)).item() - Sv[R:].square().sum().sqrt().item()) < 1e-12  # Eckart–Young
        torch.testing.assert_close(f.B.T @ f.B, f.A @ f.A.T, rtol=1e-12, atol=1e-12)  # √S split evenly: both Grams are S_r / s
        merge = g.merges[0][m]
        assert merge.scaling == 1.0 and merge.rank == R
        torch.testing.assert_close(W[m] + delta(merge) + delta(f), W[m], rtol=0, atol=1e-12)  # round 0: the same function
    with pytest.raises(ValueError, match="needs base_weights"):
        FeDeRA().init(g0)
    with pytest.raises(ValueError, match="does not fit"):
        FeDeRA().init(g0, base_weights={m: w.T for m, w in W.items()})


def test_federa_aggregates_like_fedavg_and_keeps_its_merge():
    W = {m: randn(OUT, IN, seed=300 + i) for i, m in enumerate(MODULES)}
    s = FeDeRA()
    g = s.init(GlobalModel(adapter=start_adapter(), head=head_of(0)), base_weights=W)
    pl = s.payload(g, ClientSpec(0, R, ALPHA))
    assert pl.base_version == 1 and pl.adapter is g.adapter
    ups = [ClientUpdate(k, trained(g.adapter, k), head_of(k), 10 + k) for k in range(3)]
    out = s.aggregate(g, ups)
    ref = build("fedavg").aggregate(g, ups)
    assert out.merges == g.merges and s.aggregate(g, []) is g
    for m in MODULES:
        assert torch.equal(out.adapter[m].A, ref.adapter[m].A) and torch.equal(out.adapter[m].B, ref.adapter[m].B)


# ---------------------------------------------------------------- the server adapter: uplink, merges, resume

SHAPES = {m: (OUT, IN) for m in MODULES}
NODES = {11: 0, 12: 1, 13: 2}


def adapter_for(strategy, model, **kw):
    return FlowerAdapter(strategy, model, fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, R, ALPHA), shapes=SHAPES, seed=0, **kw)


def client_replies(msgs, seed):
    """Each node trains as a client would (the factor not frozen moves) and replies as
    ``clients.app.plain_reply`` encodes it: without its frozen factor."""
    out = []
    for msg in msgs:
        dec = messages.decode(msg.content)
        up_A, up_B = ClientPlan.from_config({k: v for k, v in dec.config.items() if k in KEYS}).uplink
        pid = NODES[msg.metadata.dst_node_id]
        adapter = trained({m: LoraFactors(f.A.double(), f.B.double(), f.scaling) for m, f in dec.adapter.items()}, seed * 10 + pid, train_A=up_A, train_B=up_B)
        adapter = {m: LoraFactors(f.A.float(), f.B.float(), f.scaling) for m, f in adapter.items()}
        content = messages.encode(adapter, dec.head, {"num-examples": 10 + pid}, send_A=up_A, send_B=up_B)
        out.append(Message(content=content, reply_to=msg))
    return out


def test_rolora_uplink_leaves_the_frozen_factor_out_and_a_resumed_server_keeps_alternating(task_identity):
    g0 = GlobalModel({m: LoraFactors(f.A.float(), f.B.float(), f.scaling) for m, f in start_adapter(zero_B=False).items()}, {})
    fa = adapter_for(RoLoRA(), g0)
    grid = FakeGrid(NODES)
    seen = []
    for rnd in (1, 2):
        msgs = list(fa.configure_train(rnd, fa.arrays(), ConfigRecord(), grid))
        keys = {k.split("/")[0] for k in msgs[0].content.array_records[messages.ARRAYS]}
        assert keys == {"A", "B"}  # the downlink carries both: the frozen one is the global one
        before = fa.model
        replies = client_replies(msgs, rnd)
        trains = "B" if rnd == 1 else "A"
        assert all({k.split("/")[0] for k in r.content.array_records[messages.ARRAYS]} == {trains} for r in replies)
        fa.aggregate_train(rnd, replies)
        assert fa.stats[rnd].replied == 3 and fa.stats[rnd].rejected == 0
        assert fa.stats[rnd].bytes_up == sum(messages.num_bytes(r.content) for r in replies)
        seen.append({f: any(not torch.equal(getattr(fa.model.adapter[m], f), getattr(before.adapter[m], f)) for m in MODULES) for f in "AB"})
        if rnd == 1:
            state = fa.state_dict()
    assert seen == [{"A": False, "B": True}, {"A": True, "B": False}]  # round 1 trained B, round 2 A
    # A server resumed after round 1 sends round 2's clients freeze_B, as the uninterrupted one did.
    again = adapter_for(RoLoRA(), g0)
    again.load_state_dict(state)
    assert again.model.aggregations == 1
    msgs = list(again.configure_train(2, again.arrays(), ConfigRecord(), grid))
    assert all(messages.decode(m.content).config.get("freeze_B") is True for m in msgs)
    # A reply that sends the frozen factor anyway is rejected: it is not what this client may send.
    bad = messages.encode({m: LoraFactors(f.A, f.B, f.scaling) for m, f in again.model.adapter.items()}, {}, {"num-examples": 10})
    again.aggregate_train(2, [Message(content=bad, reply_to=msgs[0])])
    assert again.stats[2].rejected == 1


def test_federa_init_merge_is_published_before_round_1_and_sent_to_every_client(task_identity, tmp_path):
    W = {m: randn(OUT, IN, seed=300 + i).float() for i, m in enumerate(MODULES)}
    g0 = GlobalModel({m: LoraFactors(f.A.float(), f.B.float(), f.scaling) for m, f in start_adapter().items()}, {})
    stored = {}
    fa = adapter_for(FeDeRA(), g0, base_weights=W, on_merge=lambda v, forms: (stored.__setitem__(v, forms), merge_forms.save_merge(tmp_path, v, forms)))
    assert fa.model.version == 1 and stored == {}  # published with round 1, not at construction (a resumed server re-runs init)
    state0 = fa.state_dict()
    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid(NODES)))
    assert sorted(stored) == [1] and fa.merges.published == 1
    for msg in msgs:
        dec = messages.decode(msg.content)
        assert dec.config["base-version"] == 1 and sorted(dec.merges) == [1]
    back = merge_forms.load_merge(tmp_path, 1)
    for m in MODULES:
        torch.testing.assert_close(W[m].double() + delta(back[m]).double() + delta(fa.model.adapter[m]).double(), W[m].double(), rtol=0, atol=1e-5)
    # resumed from the round-0 state: the merge is published (from the saved form) at round 1
    stored.clear()
    again = adapter_for(FeDeRA(), g0, base_weights=W, on_merge=lambda v, forms: stored.__setitem__(v, forms))
    again.load_state_dict(state0)
    list(again.configure_train(1, again.arrays(), ConfigRecord(), FakeGrid(NODES)))
    assert sorted(stored) == [1]
    with pytest.raises(ValueError, match="pass base_weights"):
        adapter_for(FeDeRA(), g0)


# ---------------------------------------------------------------- registry and config


def test_registered_with_their_declarations():
    assert REGISTRY["fedex_lora"] is FedExLoRA and REGISTRY["rolora"] is RoLoRA and REGISTRY["federa"] is FeDeRA
    for name in ("fedex_lora", "rolora", "federa"):
        cls = REGISTRY[name]
        assert build(name).name == name and cls.lora_update_only is True and cls.heterogeneous_ranks is False
        with pytest.raises(ValueError, match="strategy.weighting"):
            build(name, weighting="sparsity")
    assert FeDeRA.needs_base_weights and not getattr(FedExLoRA, "needs_base_weights", False)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("strategy=rolora engine.kind=cohort", "engine.kind: strategy=rolora does not run on engine.kind=cohort; use engine.kind=per_client"),
        ("strategy=rolora strategy.first=C", "strategy.first: unknown value 'C'; expected one of A, B"),
        ("strategy=rolora ranks=flora", "ranks.kind: strategy=rolora needs one rank for all clients"),
        ("strategy=fedex_lora ranks=heavy_tail", "ranks.kind: strategy=fedex_lora needs one rank for all clients"),
        ("strategy=fedex_lora privacy=central privacy.noise_multiplier=1 strategy.weighting=uniform",
         "privacy.mode: strategy=fedex_lora does not work with privacy.mode=central"),
        ("strategy=rolora privacy=central privacy.noise_multiplier=1 strategy.weighting=uniform",
         "privacy.mode: strategy=rolora does not work with privacy.mode=central"),
        ("strategy=federa strategy.weighting=sparsity", "strategy.weighting: strategy=federa does not take 'sparsity'"),
        ("strategy=federa strategy.bogus=1", "unknown key 'strategy.bogus'"),
    ],
)
def test_config_errors_name_the_key(override, expected, tmp_path, monkeypatch, capsys):
    from tests.harness import run_cli

    code, out, err = run_cli(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("words, expected", [([], "B"), (["strategy.first=A"], "A")])
def test_rolora_first_reaches_the_strategy(words, expected, tmp_path):
    from fedpeft.composing import compose
    from fedpeft.serverapp import strategy_kwargs

    cfg = compose(["strategy=rolora", *words, f"hydra.run.dir={tmp_path / 'run'}"])
    assert build(cfg.strategy.name, **strategy_kwargs(cfg)).first == expected


@pytest.mark.parametrize("codec", ["none", "int8", "topk"])
def test_a_reply_without_B_passes_local_dp_and_the_uplink_codec(codec):
    """RoLoRA's A rounds: local DP noises A and the head only (B is the one sent), and a
    delta-coded reply without B decodes against the start with the kept B filled in."""
    from clients.app import noised_update

    start = {m: LoraFactors(f.A.float(), f.B.float(), f.scaling) for m, f in start_adapter(zero_B=False).items()}
    head = {"classifier.weight": torch.zeros(2, 3)}
    ref = messages.tensors_of(start, head, send_B=False)
    assert not any(k.startswith("B/") for k in ref)
    moved = {m: LoraFactors(f.A + 0.1, f.B, f.scaling) for m, f in start.items()}
    noisy, noisy_head, norm = noised_update(moved, head, ref, clip=1.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(0), send_B=False)
    assert all(noisy[m].B is moved[m].B and not torch.equal(noisy[m].A, moved[m].A) for m in MODULES) and norm > 0
    kw = dict(codec=codec, fraction=1.0, reference=ref, generator=torch.Generator().manual_seed(1)) if codec != "none" else {}
    content = messages.encode(noisy, noisy_head, {"num-examples": 7}, send_B=False, **kw)
    messages.check_reply_layout(content, SHAPES, {"classifier.weight": (2, 3)}, (R,), scaling=S, send_B=False, codec=codec)
    dec = messages.decode(content, ref if codec != "none" else None, kept=start)
    for m in MODULES:
        assert torch.equal(dec.adapter[m].B, start[m].B)
        torch.testing.assert_close(dec.adapter[m].A, noisy[m].A, rtol=0, atol=0.05 if codec != "none" else 0)

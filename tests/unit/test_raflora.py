"""raFLoRA (Wu et al. 2026): rank-partitioned aggregation against an independent dense computation,
a partition held by one client kept undiluted, and the rank collapse it prevents (FlexLoRA's
components past the smallest rank shrinking every round when clients return what they were sent)."""

import pytest
import torch

from fedpeft.lora import LoraFactors, delta, normalized_weights, scaling_for
from strategies.base import REGISTRY, ClientSpec, ClientUpdate, GlobalModel
from strategies.flexlora import FlexLoRA
from strategies.raflora import RaFLoRA, partition_weights, partitioned_update, rank_partitions

F64 = torch.float64
ALPHA = 16.0


def clients(ranks, out=40, inp=30, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [LoraFactors(torch.randn(r, inp, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype), scaling_for(r, ALPHA)) for r in ranks]


def dense_reference(factors, sizes):
    """Σ over rank indices i of the clients holding i, each weighted by its data size over the total
    size of those clients — one rank-1 term at a time, from the data sizes directly."""
    W = torch.zeros(factors[0].B.shape[0], factors[0].A.shape[1], dtype=F64)
    for i in range(max(f.rank for f in factors)):
        holders = [(f, n) for f, n in zip(factors, sizes) if f.rank > i]
        total = float(sum(n for _, n in holders))
        for f, n in holders:
            W += (n / total) * f.scaling * torch.outer(f.B[:, i].to(F64), f.A[i].to(F64))
    return W


def updates(factors, sizes):
    return [ClientUpdate(k, {"m": f}, {}, n) for k, (f, n) in enumerate(zip(factors, sizes))]


def test_rank_partitions_split_at_the_distinct_ranks():
    assert rank_partitions([64, 32, 16, 16, 8, 8, 4, 4, 4, 4]) == [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64)]
    assert rank_partitions([8]) == [(0, 8)]
    w = partition_weights([8, 4, 2], [0.5, 0.3, 0.2])
    assert w[2].tolist() == [0.2, 0.2]  # [0, 2): every client
    assert w[1].tolist() == pytest.approx([0.3, 0.3, 0.3 / 0.8, 0.3 / 0.8])  # [2, 4): clients 0 and 1
    assert w[0][4:].tolist() == [1.0] * 4  # [4, 8): client 0 alone
    with pytest.raises(ValueError, match="positive ranks"):
        rank_partitions([4, 0])


@pytest.mark.parametrize("ranks", [[64, 32, 16, 16, 8, 8, 4, 4, 4, 4], [8, 3, 3, 5], [6]])
def test_aggregate_equals_an_independent_dense_partition_average(ranks):
    factors = clients(ranks, out=80, inp=70)
    sizes = [50 + 37 * k for k in range(len(ranks))]
    want = dense_reference(factors, sizes)
    got = delta(partitioned_update(factors, normalized_weights(sizes)))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    # the strategy's global adapter (the exact SVD form here) is the same update
    g = RaFLoRA(svd="exact").aggregate(GlobalModel(adapter={}), updates(factors, sizes))
    assert torch.allclose(delta(g.adapter["m"]), want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    # uniform weighting: each partition the plain mean over its clients
    uni = RaFLoRA(svd="exact", weighting="uniform").aggregate(GlobalModel(adapter={}), updates(factors, sizes))
    assert torch.allclose(delta(uni.adapter["m"]), dense_reference(factors, [1] * len(ranks)), atol=1e-10 * float(want.abs().max()))


def test_a_partition_held_by_one_client_keeps_its_values_exactly():
    factors = clients([8, 4, 4], dtype=torch.float32)
    p = normalized_weights([100, 300, 600])
    st = partitioned_update(factors, p)
    s0 = factors[0].scaling
    # client 0's rows [4, 8) of the stack: its A rows times s_0 and weight exactly 1, its B columns as they are
    assert torch.equal(st.A[4:8], factors[0].A[4:8] * s0)
    assert torch.equal(st.B[:, 4:8], factors[0].B[:, 4:8])
    # so the update is the shared partition's average plus client 0's own tail, undiluted ...
    shared = sum(pk / sum(p) * delta(LoraFactors(f.A[:4], f.B[:, :4], f.scaling)) for f, pk in zip(factors, p))
    tail = delta(LoraFactors(factors[0].A[4:], factors[0].B[:, 4:], s0))
    assert torch.allclose(delta(st), shared + tail, atol=1e-5)
    # ... where FlexLoRA's Σ p_k s_k B_k A_k (and HetLoRA's zero padding) scales that tail by p_0 = 0.1
    flex = FlexLoRA(svd="exact").aggregate(GlobalModel(adapter={}), updates(factors, [100, 300, 600])).adapter["m"]
    assert torch.allclose(delta(flex), shared + p[0] * tail, atol=1e-5)


def test_raflora_prevents_the_rank_collapse_of_svd_allocation():
    """Clients that return exactly what they were sent: FlexLoRA's singular values past the smallest
    rank shrink by P_i = Σ_{r_k > i} p_k every round (geometrically: the paper's rank collapse);
    raFLoRA's stay, the global update a fixed point."""
    ranks, sizes = [8, 4, 2, 2], [100, 100, 100, 100]  # P = 1 on [0, 2), 1/2 on [2, 4), 1/4 on [4, 8)
    specs = [ClientSpec(k, r, ALPHA) for k, r in enumerate(ranks)]
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(50, 8, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(40, 8, generator=g, dtype=F64)).Q
    S = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1], dtype=F64)
    start = GlobalModel(adapter={"m": LoraFactors(V.mT.contiguous(), U * S, 1.0)})
    expected = {"flexlora": S * torch.tensor([1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25], dtype=F64) ** 3, "raflora": S}
    for strategy in (FlexLoRA(svd="exact"), RaFLoRA(svd="exact")):
        model = start
        for _ in range(3):
            sent = [strategy.payload(model, c).adapter["m"] for c in specs]
            model = strategy.aggregate(model, updates(sent, sizes))
        got = torch.linalg.svdvals(delta(model.adapter["m"]))[:8]
        assert torch.allclose(got, expected[strategy.name], rtol=1e-9), strategy.name


def test_raflora_is_registered_with_flexloras_keys_and_checks():
    assert REGISTRY["raflora"] is RaFLoRA
    assert RaFLoRA.config_fields() == FlexLoRA.config_fields()
    assert RaFLoRA.heterogeneous_ranks and RaFLoRA.lora_update_only
    with pytest.raises(ValueError, match="strategy.svd: unknown value"):
        RaFLoRA(svd="fast")


@pytest.mark.parametrize(
    "args,line",
    [
        ("strategy=raflora ranks=flora strategy.svd=fast", "strategy.svd: unknown value 'fast'"),
        ("strategy=raflora ranks=flora server.optimizer=fedadam", "server.optimizer: fedadam does not work with strategy=raflora (it re-factorises"),
    ],
)
def test_bad_raflora_configs_stop_before_training_with_one_line(args, line, tmp_path, monkeypatch, capsys):
    from tests.harness import config_error

    assert line in config_error(["simulate", *args.split()], tmp_path, monkeypatch, capsys)

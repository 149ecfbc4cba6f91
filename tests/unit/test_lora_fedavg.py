"""The LoRA algebra and FedAvg (FedIT) on random tensors."""

import pytest
import torch

from fedpeft.lora import (
    LoraFactors,
    average_factors,
    delta,
    normalized_weights,
    pad,
    scaling_for,
    stack,
    truncate,
    weighted_sum_delta,
)
from fedpeft.plan import ClientPlan
from strategies import build
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.fedavg import FedAvg

OUT, IN = 48, 32


def rand_factors(r: int, alpha: float = 16.0, seed: int = 0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, IN, generator=g, dtype=torch.float64), torch.randn(OUT, r, generator=g, dtype=torch.float64), scaling_for(r, alpha))


def test_scaling_lora_and_rslora():
    assert scaling_for(8, 16) == 2.0
    assert scaling_for(16, 16, rslora=True) == 4.0
    with pytest.raises(ValueError, match="rank"):
        scaling_for(0, 16)


def test_pad_keeps_delta_and_truncate_inverts_pad():
    f = rand_factors(4)
    p = pad(f, 10)
    assert p.rank == 10 and p.A.shape == (10, IN) and p.B.shape == (OUT, 10)
    assert torch.equal(delta(p), delta(f))
    t = truncate(p, 4)
    assert torch.equal(t.A, f.A) and torch.equal(t.B, f.B)
    with pytest.raises(ValueError):
        pad(f, 2)
    with pytest.raises(ValueError):
        truncate(f, 5)


def test_truncate_drops_exactly_the_tail_components():
    f = rand_factors(6)
    t = truncate(f, 2)
    tail = f.scaling * f.B[:, 2:] @ f.A[2:]
    torch.testing.assert_close(delta(f) - delta(t), tail)


def test_stack_is_exact_weighted_sum_for_heterogeneous_ranks_and_scalings():
    fs = [rand_factors(r, alpha, seed=i) for i, (r, alpha) in enumerate([(64, 16), (8, 16), (4, 8), (16, 64)])]
    w = normalized_weights([100, 30, 7, 55])
    s = stack(fs, w)
    assert s.rank == 64 + 8 + 4 + 16 and s.scaling == 1.0
    expected = sum(wk * fk.scaling * fk.B @ fk.A for fk, wk in zip(fs, w))
    torch.testing.assert_close(delta(s), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weighted_sum_delta(fs, w), expected, rtol=1e-12, atol=1e-12)


def test_factor_validation_names_the_problem():
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraFactors(torch.zeros(4, IN), torch.zeros(OUT, 5), 1.0)
    with pytest.raises(ValueError, match="different weight shapes"):
        stack([rand_factors(4), LoraFactors(torch.zeros(4, IN + 1), torch.zeros(OUT, 4), 1.0)], [0.5, 0.5])
    with pytest.raises(ValueError, match="one rank and scaling"):
        average_factors([rand_factors(4), rand_factors(8)], [0.5, 0.5])


def test_averaging_factors_separately_differs_from_averaging_products_by_the_cross_terms():
    K = 5
    fs = [rand_factors(8, seed=10 + k) for k in range(K)]
    p = normalized_weights([3, 1, 4, 1, 5])
    avg = average_factors(fs, p)
    of_products = weighted_sum_delta(fs, p)
    cross = sum(p[j] * p[k] * fs[j].scaling * fs[j].B @ fs[k].A for j in range(K) for k in range(K) if j != k)
    squares = sum((p[k] ** 2 - p[k]) * fs[k].scaling * fs[k].B @ fs[k].A for k in range(K))
    # (Σ p B)(Σ p A) = Σ_j Σ_k p_j p_k B_j A_k: the exact difference is the cross terms plus (p_k² − p_k) B_k A_k.
    torch.testing.assert_close(delta(avg) - of_products, cross + squares, rtol=1e-10, atol=1e-10)
    rel = (delta(avg) - of_products).norm() / of_products.norm()
    # Independent random factors: the product of averages is far from the average of products
    # (measured 0.82 here; it shrinks towards 0 only when the clients' factors agree).
    assert rel > 0.5, rel
    same = average_factors([fs[0]] * K, p)
    torch.testing.assert_close(delta(same), delta(fs[0]))


def make_update(cid: int, n: int, seed: int, head_value: float) -> ClientUpdate:
    adapter = {"q": rand_factors(4, seed=seed), "v": rand_factors(4, seed=seed + 100)}
    return ClientUpdate(client_id=cid, adapter=adapter, head={"classifier.weight": torch.full((2, 3), head_value, dtype=torch.float64)}, num_examples=n)


def test_fedavg_weights_by_data_size():
    ups = [make_update(0, 10, 1, 1.0), make_update(1, 30, 2, 5.0)]
    g0 = GlobalModel(adapter=ups[0].adapter, head=ups[0].head)
    out = FedAvg().aggregate(g0, ups)
    torch.testing.assert_close(out.adapter["q"].A, 0.25 * ups[0].adapter["q"].A + 0.75 * ups[1].adapter["q"].A)
    torch.testing.assert_close(out.adapter["v"].B, 0.25 * ups[0].adapter["v"].B + 0.75 * ups[1].adapter["v"].B)
    assert torch.allclose(out.head["classifier.weight"], torch.tensor(4.0, dtype=torch.float64))
    uni = FedAvg(weighting="uniform").aggregate(g0, ups)
    assert torch.allclose(uni.head["classifier.weight"], torch.tensor(3.0, dtype=torch.float64))
    assert out.adapter["q"].scaling == ups[0].adapter["q"].scaling


def test_fedavg_payload_is_the_global_model_for_every_client_and_no_updates_keeps_it():
    up = make_update(0, 10, 1, 1.0)
    g = GlobalModel(adapter=up.adapter, head=up.head)
    s = build("fedavg")
    p1, p2 = s.payload(g, ClientSpec(0, 4, 16.0)), s.payload(g, ClientSpec(7, 4, 16.0))
    assert p1.adapter is g.adapter and p2.adapter is g.adapter and p1.plan == ClientPlan() and p1.plan.to_config() == {}
    assert s.aggregate(g, []) is g
    with pytest.raises(ValueError, match="unknown strategy"):
        build("nope")


def test_factor_average_error_equals_the_dense_relative_error_over_modules():
    from strategies.fedavg import factor_average_error

    K = 4
    p = normalized_weights([2, 1, 3, 2])
    modules = [[rand_factors(4, seed=20 + k) for k in range(K)], [rand_factors(4, alpha=8.0, seed=40 + k) for k in range(K)]]
    err = ref = 0.0
    for fs in modules:  # dense: the product of the averages minus the average of the products
        gap = delta(average_factors(fs, p)) - weighted_sum_delta(fs, p)
        err += float(gap.norm() ** 2)
        ref += float(weighted_sum_delta(fs, p).norm() ** 2)
    dense = (err / ref) ** 0.5
    assert dense > 0.3  # independent factors: a large gap
    assert factor_average_error(modules, p) == pytest.approx(dense, rel=1e-9)
    # Clients that agree on A (FFA-LoRA's frozen A) or on everything: FedAvg of factors is exact.
    shared_A = [[LoraFactors(fs[0].A, f.B, f.scaling) for f in fs] for fs in modules]
    assert factor_average_error(shared_A, p) < 1e-7
    assert factor_average_error([[fs[0]] * K for fs in modules], p) < 1e-7
    zero = LoraFactors(torch.zeros(4, IN, dtype=torch.float64), torch.zeros(OUT, 4, dtype=torch.float64), 2.0)
    assert factor_average_error([[zero] * K], p) == 0.0


def test_fedavg_logs_the_factor_average_error_of_its_round():
    ups = [make_update(0, 10, 1, 1.0), make_update(1, 30, 2, 5.0)]
    g0 = GlobalModel(adapter=ups[0].adapter, head=ups[0].head)
    m = FedAvg().round_metrics(g0, ups)
    from strategies.fedavg import factor_average_error

    expected = factor_average_error([[u.adapter[n] for u in ups] for n in ("q", "v")], [0.25, 0.75])
    assert m == {"factor_avg_error": pytest.approx(expected)} and expected > 0.1
    assert FedAvg().round_metrics(g0, []) == {}

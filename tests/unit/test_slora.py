"""SLoRA (``strategy=slora``, Babakniya et al. 2023): the random mask (size, determinism, no data),
stage 1's FedAvg of the masked values against a hand computation, the switch's SVD initialisation
against numpy's best rank-r approximation, stage 2's FedAvg, the plan's wire keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import strategies
from fedpeft.lora import LoraFactors, fresh_adapter, sparse_mask, sparse_mask_size
from fedpeft.plan import SPARSE, ClientPlan, SparseBase
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.slora import dense_factors, scatter_values, svd_init
from tests.harness import config_error

T = torch.tensor


def test_mask_size_determinism_and_spread():
    m = sparse_mask("layer.0.q", (40, 25), 0.1, seed=3)
    assert m.numel() == sparse_mask_size((40, 25), 0.1) == 100  # ⌈0.1 · 1000⌉
    assert m.dtype == torch.int64 and torch.equal(m, m.sort().values) and m.unique().numel() == 100
    assert 0 <= int(m.min()) and int(m.max()) < 1000
    assert torch.equal(m, sparse_mask("layer.0.q", (40, 25), 0.1, seed=3))  # every client regenerates it
    assert not torch.equal(m, sparse_mask("layer.0.q", (40, 25), 0.1, seed=4))
    assert not torch.equal(m, sparse_mask("layer.0.k", (40, 25), 0.1, seed=3))
    assert sparse_mask_size((3, 3), 0.01) == 1 and sparse_mask_size((3, 3), 1.0) == 9
    assert torch.equal(sparse_mask("m", (3, 3), 1.0, 0), torch.arange(9))
    # uniform over entries: over many seeds every one of 20 entries is drawn about k/N = 1/4 of the time
    counts = torch.zeros(20)
    for s in range(2000):
        counts[sparse_mask("m", (4, 5), 0.25, s)] += 1
    assert counts.sum() == 2000 * 5 and (counts / 2000 - 0.25).abs().max() < 0.04
    with pytest.raises(ValueError, match="density"):
        sparse_mask("m", (2, 2), 0.0, 0)


def test_svd_init_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 5, generator=g, dtype=torch.float64).float()
    for r, s in ((2, 0.5), (3, 4.0), (5, 1.0)):
        f = svd_init(delta, r, s)
        assert f.A.shape == (r, 5) and f.B.shape == (7, r) and f.scaling == s
        U, S, Vt = np.linalg.svd(delta.double().numpy(), full_matrices=False)
        best = (U[:, :r] * S[:r]) @ Vt[:r]  # Eckart–Young
        np.testing.assert_allclose((s * f.B.double() @ f.A.double()).numpy(), best, atol=1e-5)
        # balanced: B and A carry √S each (up to the scaling): BᵀB = AAᵀ
        np.testing.assert_allclose((f.B.T @ f.B).numpy(), (f.A @ f.A.T).numpy(), atol=1e-5)
    f = svd_init(delta, 8, 2.0)  # above min(out, in): zero components
    assert f.rank == 8 and torch.count_nonzero(f.A[5:]) == 0
    np.testing.assert_allclose((2.0 * f.B @ f.A).numpy(), delta.numpy(), atol=1e-5)


def test_dense_factors_are_exact():
    for shape in ((3, 5), (5, 3)):
        d = torch.randn(*shape)
        f = dense_factors(d)
        assert f.scaling == 1.0 and f.rank == min(shape)
        assert torch.equal(f.B @ f.A, d)  # an identity factor: no rounding


def _model(strategy, shapes, rank=2, scaling=2.0, head=None):
    fresh = {m: LoraFactors(torch.randn(rank, i), torch.zeros(o, rank), scaling) for m, (o, i) in shapes.items()}
    base = {m: torch.randn(o, i) for m, (o, i) in shapes.items()}
    return strategy.start(GlobalModel(adapter=fresh, head=dict(head or {})), base)


def test_stage_one_averages_the_masked_values_and_switches_to_the_svd():
    shapes = {"m1": (6, 4), "m2": (3, 8)}
    s = strategies.build("slora", sparse_rounds=2, sparse_density=0.25, seed=7)
    model = _model(s, shapes, head={"h": T([1.0, 2.0])})
    k = {m: sparse_mask_size(sh, 0.25) for m, sh in shapes.items()}
    assert k == {"m1": 6, "m2": 6}
    assert set(model.head) == {"h", SPARSE + "m1", SPARSE + "m2"} and all(model.head[SPARSE + m].abs().sum() == 0 for m in shapes)
    assert model.aggregations == 0
    # the adapter is the fresh LoRA clients regenerate from the seed (B = 0)
    for m, f in fresh_adapter(shapes, 2, 2.0, 7).items():
        assert torch.equal(model.adapter[m].A, f.A) and torch.equal(model.adapter[m].B, f.B)
    p = s.payload(model, ClientSpec(client_id=0, rank=2, alpha=4.0))
    assert p.adapter == {} and p.plan.sparse == SparseBase(0.25, 7) and p.plan.uplink == (False, False) and p.plan.init_seed == 7
    assert p.head is model.head
    g = torch.Generator().manual_seed(1)
    ups = [ClientUpdate(c, {}, {h: torch.randn(t.shape, generator=g) for h, t in model.head.items()}, n) for c, n in ((0, 1), (1, 3))]
    m1 = s.aggregate(model, ups)
    assert m1.aggregations == 1 and m1.adapter is model.adapter  # still stage 1
    for h in model.head:  # ¼ v_1 + ¾ v_2 by hand
        torch.testing.assert_close(m1.head[h], 0.25 * ups[0].head[h] + 0.75 * ups[1].head[h])
    ups2 = [ClientUpdate(c, {}, {h: torch.randn(t.shape, generator=g) for h, t in model.head.items()}, 1) for c in (0, 1)]
    m2 = s.aggregate(m1, ups2)  # the switch
    assert m2.aggregations == 2 and set(m2.head) == {"h"}
    torch.testing.assert_close(m2.head["h"], 0.5 * (ups2[0].head["h"] + ups2[1].head["h"]))
    for m, (o, i) in shapes.items():
        v = 0.5 * (ups2[0].head[SPARSE + m] + ups2[1].head[SPARSE + m])
        dense = np.zeros(o * i)
        dense[sparse_mask(m, (o, i), 0.25, 7).numpy()] = v.numpy()
        U, S, Vt = np.linalg.svd(dense.reshape(o, i))
        best = (U[:, :2] * S[:2]) @ Vt[:2]
        f = m2.adapter[m]
        assert f.rank == 2 and f.scaling == 2.0
        np.testing.assert_allclose((2.0 * f.B.double() @ f.A.double()).numpy(), best, atol=1e-5)
    # stage 2: the plain FedAvg payload and aggregate
    p2 = s.payload(m2, ClientSpec(client_id=0, rank=2, alpha=4.0))
    assert p2.adapter is m2.adapter and p2.plan == ClientPlan()
    fs = [{m: LoraFactors(torch.randn(2, i), torch.randn(o, 2), 2.0) for m, (o, i) in shapes.items()} for _ in range(2)]
    m3 = s.aggregate(m2, [ClientUpdate(0, fs[0], {"h": T([0.0, 0.0])}, 1), ClientUpdate(1, fs[1], {"h": T([2.0, 2.0])}, 3)])
    assert m3.aggregations == 3
    for m in shapes:
        torch.testing.assert_close(m3.adapter[m].A, 0.25 * fs[0][m].A + 0.75 * fs[1][m].A)
        torch.testing.assert_close(m3.adapter[m].B, 0.25 * fs[0][m].B + 0.75 * fs[1][m].B)
    torch.testing.assert_close(m3.head["h"], T([1.5, 1.5]))


def test_evaluated_model_is_base_plus_the_sparse_update():
    shapes = {"m1": (6, 4)}
    s = strategies.build("slora", sparse_rounds=3, sparse_density=0.5, seed=2)
    model = _model(s, shapes)
    v = torch.arange(1.0, 13.0)
    model = GlobalModel(adapter=model.adapter, head={SPARSE + "m1": v}, aggregations=1)
    ev = s.evaluated(model)
    assert ev.head == {}
    f = ev.adapter["m1"]
    want = torch.zeros(24)
    want[sparse_mask("m1", (6, 4), 0.5, 2)] = v
    assert torch.equal(f.scaling * f.B @ f.A, want.reshape(6, 4))
    assert torch.equal(scatter_values(sparse_mask("m1", (6, 4), 0.5, 2), v, (6, 4)), want.reshape(6, 4))
    stage2 = GlobalModel(adapter=model.adapter, head={}, aggregations=3)
    assert s.evaluated(stage2) is stage2


def test_plan_wire_round_trip_and_checks():
    plan = ClientPlan(train_A=False, train_B=False, init_seed=5, sparse=SparseBase(0.01, 5))
    cfg = plan.to_config()
    assert cfg["sparse_density"] == 0.01 and cfg["sparse_seed"] == 5
    assert ClientPlan.from_config(cfg) == plan
    with pytest.raises(ValueError, match="sparse_seed is missing"):
        ClientPlan.from_config({"freeze_A": True, "freeze_B": True, "sparse_density": 0.1})
    with pytest.raises(ValueError, match="needs freeze_A and freeze_B"):
        ClientPlan(train_A=False, sparse=SparseBase(0.1, 0))
    with pytest.raises(ValueError, match="sparse_density is 0.0"):
        SparseBase(0.0, 1)
    with pytest.raises(ValueError, match="no LoRA factor to train"):
        ClientPlan(train_A=False, train_B=False)


@pytest.mark.parametrize("key,value,match", [
    ("sparse_rounds", 0, "strategy.sparse_rounds: must be an integer >= 1"),
    ("sparse_rounds", 1.5, "strategy.sparse_rounds"),
    ("sparse_density", 0.0, r"strategy.sparse_density: must be a number in \(0, 1\]"),
    ("sparse_density", 1.5, "strategy.sparse_density"),
])
def test_bad_settings_are_one_line(key, value, match):
    with pytest.raises(ValueError, match=match):
        strategies.build("slora", **{key: value})


@pytest.mark.parametrize("override,expected", [
    ("strategy=slora model.quantization=4bit", "model.quantization: 4bit does not work with strategy=slora (its stage 1 trains masked entries"),
    ("strategy=slora ranks=hetlora", "ranks.kind: strategy=slora needs one rank for all clients"),
    ("strategy=slora secagg.enabled=true", "secagg.enabled: secure aggregation does not work with strategy=slora (its stage-1 replies are the head alone"),
    ("strategy=slora strategy.scaffold=true", "strategy.scaffold"),
    ("strategy=slora compression=int8", "compression.uplink: int8 does not work with strategy=slora (its stage 1 already sends only the masked"),
    ("strategy=slora compression.downlink=int8", "compression.downlink: int8 does not work with strategy=slora"),
    ("strategy=slora engine.kind=cohort", "engine.kind: strategy=slora does not run on engine.kind=cohort; use engine.kind=per_client"),
    ("strategy=slora peft=ia3", "peft.name: strategy=slora trains peft=lora | rslora only, not peft=ia3"),
    ("strategy=slora peft=dora", "peft.name: strategy=slora trains peft=lora | rslora only, not peft=dora"),
    ("strategy=slora privacy=local", "privacy.mode: strategy=slora does not work with privacy.mode=local"),
    ("strategy=slora server.optimizer=fedadam", "server.optimizer: fedadam does not work with strategy=slora (its switch replaces"),
    ("strategy=slora strategy.prox_mu=0.1", "strategy.prox_mu"),
    ("strategy=slora strategy.sparse_density=0", "strategy.sparse_density: must be a number in (0, 1], got 0"),
    ("strategy=slora strategy.sparse_rounds=0", "strategy.sparse_rounds: must be an integer >= 1"),
])
def test_refusals_are_one_line_naming_both_sides(override, expected, tmp_path, monkeypatch, capsys):
    line = config_error(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert expected in line, line


def test_robust_median_takes_stage_one_values_coordinate_wise():
    from fedpeft.robust import RobustRule
    from fedpeft.server import robust_aggregate

    s = strategies.build("slora", sparse_rounds=2, sparse_density=0.5, seed=1)
    model = _model(s, {"m": (2, 3)}, head={"h": T([0.0])})
    vals = [T([1.0, 5.0, -2.0]), T([2.0, -1.0, 0.0]), T([9.0, 0.0, 4.0])]
    ups = [ClientUpdate(c, {}, {"h": T([float(c)]), SPARSE + "m": v}, 1) for c, v in enumerate(vals)]
    out, kept = robust_aggregate(RobustRule("median"), s, model, ups)
    assert kept is None and out.aggregations == 1
    assert torch.equal(out.head[SPARSE + "m"], T([2.0, 0.0, 0.0])) and torch.equal(out.head["h"], T([1.0]))

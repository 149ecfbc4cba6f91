"""The heterogeneous-rank strategies (FFA-LoRA, HetLoRA, FLoRA, FlexLoRA) on random tensors."""

import math

import pytest
import torch

from fedpeft.lora import (
    LoraFactors,
    SvdFactors,
    best_rank,
    delta,
    frobenius_of_product,
    normalized_weights,
    scaling_for,
    seeded_lora_A,
    stack,
    svd_factors,
)
from strategies import REGISTRY, build
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA, merged_delta
from strategies.hetlora import HetLoRA, pruned_rank, sparsity_weight, tail_norm
from tests.harness import LargestTensor

OUT, IN = 96, 80
RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
ALPHA = 16.0  # fixed alpha: every rank has its own scaling alpha / r
MODULES = ("layers.0.q_proj", "layers.0.v_proj")
F64 = torch.float64


def rand_factors(r, seed, alpha=ALPHA, out=OUT, inp=IN, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        torch.randn(r, inp, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype), scaling_for(r, alpha)
    )


def specs():
    return [ClientSpec(client_id=k, rank=r, alpha=ALPHA) for k, r in enumerate(RANKS)]


def head_of(value):
    return {"classifier.weight": torch.full((2, 3), float(value), dtype=F64)}


def random_update(spec, seed, n=None):
    adapter = {m: rand_factors(spec.rank, seed * 10 + i) for i, m in enumerate(MODULES)}
    return ClientUpdate(spec.client_id, adapter, head_of(spec.client_id), n if n is not None else 10 + 7 * spec.client_id)


def dense_weighted_sum(updates, p, module):
    """Σ_k p_k s_k B_k A_k, densely and by hand."""
    return sum(pk * u.adapter[module].scaling * (u.adapter[module].B @ u.adapter[module].A) for u, pk in zip(updates, p))


def server_adapter(r, seed=99, alpha=ALPHA):
    """What the server's freshly initialized peft adapter looks like: random A, zero B."""
    out = {}
    for i, m in enumerate(MODULES):
        f = rand_factors(r, seed + i, alpha)
        out[m] = LoraFactors(f.A, torch.zeros_like(f.B), f.scaling)
    return out


# ---------------------------------------------------------------- FLoRA


def test_flora_merge_equals_the_weighted_sum_of_client_updates():
    s = build("flora")
    g = s.init(GlobalModel(adapter=server_adapter(8), head=head_of(0)))
    assert g.adapter == {} and g.version == 0 and torch.equal(g.head["classifier.weight"], head_of(0)["classifier.weight"])
    ups = [random_update(c, seed=c.client_id) for c in specs()]
    out = s.aggregate(g, ups)
    p = normalized_weights([u.num_examples for u in ups])
    assert out.adapter == {} and out.version == 1
    merged = merged_delta(out)
    for m in MODULES:
        assert out.merges[0][m].rank == sum(RANKS) and out.merges[0][m].scaling == 1.0
        expected = dense_weighted_sum(ups, p, m)
        torch.testing.assert_close(merged[m], expected, rtol=0, atol=1e-10)
        # and it is not the uniform average (the weights matter)
        assert (merged[m] - dense_weighted_sum(ups, [0.1] * 10, m)).abs().max() > 1e-3
    expected_head = sum(pk * u.head["classifier.weight"] for u, pk in zip(ups, p))
    torch.testing.assert_close(out.head["classifier.weight"], expected_head, rtol=0, atol=1e-12)


def test_flora_partial_participation_over_three_rounds():
    s = FLoRA(seed=3)
    g = s.init(GlobalModel(adapter=server_adapter(8)))
    subsets = [[0, 2, 5, 9], [1, 2, 3, 4, 6, 7], [0, 8, 9]]
    all_specs = specs()
    expected = {m: torch.zeros(OUT, IN, dtype=F64) for m in MODULES}
    seeds = set()
    for t, subset in enumerate(subsets):
        payloads = [s.payload(g, all_specs[k]) for k in subset]
        for k, pl in zip(subset, payloads):
            assert pl.adapter == {} and pl.base_version == t == g.version
            assert pl.plan.to_config() == {"init_seed": pl.plan.init_seed} and isinstance(pl.plan.init_seed, int)
            assert pl.plan == s.payload(g, all_specs[k]).plan  # deterministic
            seeds.add(pl.plan.init_seed)
        ups = [random_update(all_specs[k], seed=100 * t + k, n=5 + 3 * k + t) for k in subset]
        p = normalized_weights([u.num_examples for u in ups])
        g = s.aggregate(g, ups)
        for m in MODULES:
            round_sum = dense_weighted_sum(ups, p, m)
            torch.testing.assert_close(delta(g.merges[t][m]), round_sum, rtol=0, atol=1e-10)
            assert g.merges[t][m].rank == sum(RANKS[k] for k in subset)
            expected[m] += round_sum
    assert g.version == 3
    assert len(seeds) == sum(len(x) for x in subsets)  # a different init seed per client and per round
    merged = merged_delta(g)
    for m in MODULES:
        torch.testing.assert_close(merged[m], expected[m], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- FFA-LoRA


def test_seeded_lora_A_is_peft_like_deterministic_and_prefix_consistent():
    A = seeded_lora_A("model.layers.3.self_attn.q_proj", 64, 4096, seed=7)
    assert A.dtype == torch.float32 and A.shape == (64, 4096)
    bound = 1 / math.sqrt(4096)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(A.var().item() / (bound**2 / 3) - 1) < 0.02 and abs(A.mean().item()) < 0.01 * bound
    assert torch.equal(A, seeded_lora_A("model.layers.3.self_attn.q_proj", 64, 4096, seed=7))
    assert torch.equal(seeded_lora_A("model.layers.3.self_attn.q_proj", 5, 4096, seed=7), A[:5])
    assert not torch.equal(seeded_lora_A("model.layers.3.self_attn.v_proj", 64, 4096, seed=7), A)
    assert not torch.equal(seeded_lora_A("model.layers.3.self_attn.q_proj", 64, 4096, seed=8), A)


def test_ffa_lora_A_is_bit_identical_everywhere_and_B_averaging_is_exact():
    seed = 5
    s = build("ffa_lora", seed=seed)
    g = s.init(GlobalModel(adapter=server_adapter(64), head=head_of(0)))
    for m in MODULES:
        assert g.adapter[m].rank == 64 and g.adapter[m].scaling == 1.0 and not g.adapter[m].B.any()
        assert torch.equal(g.adapter[m].A, seeded_lora_A(m, 64, IN, seed).to(F64))
    A0 = {m: g.adapter[m].A.clone() for m in MODULES}
    all_specs = specs()
    for t, subset in enumerate([[0, 1, 4, 6, 9], [2, 3, 5, 7, 8], list(range(10))]):
        ups = []
        for k in subset:
            c = all_specs[k]
            pl = s.payload(g, c)
            assert pl.plan.to_config() == {"freeze_A": True, "A_seed": seed}
            sk = scaling_for(c.rank, c.alpha)
            adapter = {}
            for i, m in enumerate(MODULES):
                f = pl.adapter[m]
                assert f.rank == c.rank and f.scaling == sk
                assert torch.equal(f.A, seeded_lora_A(m, c.rank, IN, seed).to(F64))  # what the client regenerates
                assert torch.equal(f.A, A0[m][: c.rank])
                # what the client starts from is the global update truncated to its rank
                torch.testing.assert_close(delta(f), g.adapter[m].B[:, : c.rank] @ A0[m][: c.rank], rtol=0, atol=1e-12)
                gen = torch.Generator().manual_seed(1000 * t + 10 * k + i)
                trained_B = f.B + torch.randn(OUT, c.rank, generator=gen, dtype=F64)
                adapter[m] = LoraFactors(f.A.clone(), trained_B, f.scaling)
            ups.append(ClientUpdate(k, adapter, head_of(k), 3 + k))
        p = normalized_weights([u.num_examples for u in ups])
        g = s.aggregate(g, ups)
        for m in MODULES:
            assert torch.equal(g.adapter[m].A, A0[m])  # A never changes
            torch.testing.assert_close(delta(g.adapter[m]), dense_weighted_sum(ups, p, m), rtol=0, atol=1e-10)


def test_ffa_lora_rejects_a_changed_A_and_a_rank_above_r_max():
    s = FFALoRA(seed=1, r_max=16)
    g = s.init(GlobalModel(adapter=server_adapter(8)))
    assert all(g.adapter[m].rank == 16 for m in MODULES)
    c = ClientSpec(3, 8, ALPHA)
    pl = s.payload(g, c)
    good = {m: LoraFactors(f.A.clone(), f.B + 1.0, f.scaling) for m, f in pl.adapter.items()}
    s.aggregate(g, [ClientUpdate(3, good, {}, 10)])  # accepted
    A_bad = good[MODULES[1]].A.clone()
    A_bad[2, 5] += 1e-7
    bad = dict(good)
    bad[MODULES[1]] = LoraFactors(A_bad, good[MODULES[1]].B, good[MODULES[1]].scaling)
    with pytest.raises(ValueError, match=r"client 3: .*differs from FFA-LoRA's shared frozen A"):
        s.aggregate(g, [ClientUpdate(0, good, {}, 10), ClientUpdate(3, bad, {}, 10)])
    with pytest.raises(ValueError, match="exceeds FFA-LoRA's shared rank 16"):
        s.payload(g, ClientSpec(4, 32, ALPHA))


# ---------------------------------------------------------------- FlexLoRA


@pytest.mark.parametrize("out,inp,r", [(96, 80, 12), (30, 50, 7), (20, 12, 25), (64, 64, 64)])
def test_svd_factors_matches_the_dense_svd(out, inp, r):
    f = rand_factors(r, seed=out + inp + r, alpha=3.0, out=out, inp=inp)
    U, S, V = svd_factors(f)
    k = min(r, out, inp)
    assert U.shape == (out, k) and S.shape == (k,) and V.shape == (inp, k)
    dense = delta(f)
    S_dense = torch.linalg.svdvals(dense)[:k]
    torch.testing.assert_close(S, S_dense, rtol=1e-10, atol=0)
    assert torch.all(S[:-1] >= S[1:])
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, dense, rtol=0, atol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    # float32 works too (single-precision tolerances)
    f32 = LoraFactors(f.A.float(), f.B.float(), f.scaling)
    U32, S32, V32 = svd_factors(f32)
    assert S32.dtype == torch.float32
    torch.testing.assert_close(S32.double(), S_dense, rtol=1e-4, atol=1e-4 * S_dense[0].item())
    torch.testing.assert_close((U32 * S32 @ V32.T).double(), dense, rtol=0, atol=1e-5 * S_dense[0].item())


def test_flexlora_gives_every_client_the_best_rank_r_approximation():
    s = build("flexlora", seed=2)
    g = s.init(GlobalModel(adapter=server_adapter(8), head=head_of(0)))
    assert g.adapter == {}
    first = s.payload(g, specs()[4])
    assert first.adapter == {} and first.plan.to_config() == {"init_seed": 2 * 1_000_003 + 4}
    ups = [random_update(c, seed=c.client_id) for c in specs()]
    p = normalized_weights([u.num_examples for u in ups])
    g = s.aggregate(g, ups)
    plain = GlobalModel(adapter={m: stack([u.adapter[m] for u in ups], p) for m in MODULES})  # rank Σ r_k
    for m in MODULES:
        W = dense_weighted_sum(ups, p, m)
        torch.testing.assert_close(delta(g.adapter[m]), W, rtol=0, atol=1e-10)
        assert g.adapter[m].rank == min(sum(RANKS), OUT, IN) and g.adapter[m].scaling == 1.0
        U, S, Vh = torch.linalg.svd(W)
        for c in specs():
            sk = scaling_for(c.rank, c.alpha)
            fk = s.payload(g, c).adapter[m]
            assert fk.rank == c.rank and fk.scaling == sk and type(fk) is LoraFactors
            approx = sk * fk.B @ fk.A
            err = torch.linalg.matrix_norm(W - approx)
            eckart_young = S[c.rank :].square().sum().sqrt()
            dense_trunc = U[:, : c.rank] @ torch.diag(S[: c.rank]) @ Vh[: c.rank]
            assert abs(err - eckart_young) < 1e-9 * S[0]
            assert abs(err - torch.linalg.matrix_norm(W - dense_trunc)) < 1e-9 * S[0]
            torch.testing.assert_close(approx, dense_trunc, rtol=0, atol=1e-9)
            assert err > 1e-3  # really lossy: the test can tell a truncation from the exact ΔW
            # the same from a global kept as plain stacked factors (decomposed in payload)
            torch.testing.assert_close(delta(s.payload(plain, c).adapter[m]), approx, rtol=0, atol=1e-9)
    assert torch.equal(g.head["classifier.weight"], sum(pk * u.head["classifier.weight"] for u, pk in zip(ups, p)))


def test_flexlora_client_rank_above_the_global_rank_gets_trainable_extra_components():
    s = FlexLoRA(seed=4)
    small = [ClientSpec(8, 4, ALPHA), ClientSpec(9, 4, ALPHA)]
    ups = [random_update(c, seed=c.client_id) for c in small]
    g = s.aggregate(s.init(GlobalModel(adapter={})), ups)
    big = ClientSpec(0, 16, ALPHA)
    pl = s.payload(g, big)
    for m in MODULES:
        assert g.adapter[m].rank == 8
        f = pl.adapter[m]
        assert f.rank == 16 and not f.B[:, 8:].any()
        assert torch.equal(f.A[8:], seeded_lora_A(m, 16, IN, 4 * 1_000_003 + 0)[8:].to(F64))
        torch.testing.assert_close(delta(f), delta(g.adapter[m]), rtol=0, atol=1e-12)
    # best_rank itself zero-pads (exact ΔW)
    bf = best_rank(g.adapter[MODULES[0]], 12, 2.0)
    assert isinstance(bf, SvdFactors) and bf.rank == 12 and not bf.A[8:].any() and not bf.B[:, 8:].any()


def test_flexlora_never_forms_the_out_by_in_matrix():
    out = inp = 20_000  # ΔW would be 1.6 GB in float32
    ranks = [16, 8, 8, 8]
    gen = torch.Generator().manual_seed(0)
    ups = []
    for k, r in enumerate(ranks):
        f = LoraFactors(torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen), scaling_for(r, ALPHA))
        ups.append(ClientUpdate(k, {"big": f}, {}, 10))
    s = FlexLoRA()
    # Time and peak memory are measured by experiments/benchmarks/flexlora_scale.py, not asserted here.
    with LargestTensor(limit=out * sum(ranks)) as probe:
        g = s.aggregate(GlobalModel(adapter={}), ups)
        pls = [s.payload(g, ClientSpec(k, r, ALPHA)) for k, r in enumerate(ranks)]
    assert probe.numel <= out * sum(ranks), probe.numel  # nothing bigger than the stacked factors
    assert g.adapter["big"].rank == 40 and pls[0].adapter["big"].rank == 16
    # spot check exactness on a few entries of ΔW without forming it
    rows, cols = torch.tensor([0, 123, 19_999]), torch.tensor([7, 4_000, 19_998])
    ref = sum(0.25 * u.adapter["big"].scaling * (u.adapter["big"].B[rows] @ u.adapter["big"].A[:, cols]) for u in ups)
    torch.testing.assert_close(g.adapter["big"].B[rows] @ g.adapter["big"].A[:, cols], ref, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- HetLoRA


def test_hetlora_truncate_then_pad_round_trips():
    s = HetLoRA(weighting="uniform")
    g = s.init(GlobalModel(adapter=server_adapter(16, alpha=32.0)))
    g = GlobalModel(adapter={m: LoraFactors(f.A, torch.randn(OUT, 16, dtype=F64), 1.0) for m, f in g.adapter.items()})
    c = ClientSpec(0, 4, ALPHA)
    pl = s.payload(g, c)
    back = s.aggregate(g, [ClientUpdate(0, pl.adapter, {}, 1)])  # the client returns it untouched
    for m in MODULES:
        f, h = g.adapter[m], back.adapter[m]
        assert pl.adapter[m].rank == 4 and pl.adapter[m].scaling == scaling_for(4, ALPHA)
        assert h.rank == 16 and h.scaling == 1.0
        assert torch.equal(h.A[:4], f.A[:4])
        torch.testing.assert_close(h.B[:, :4], f.B[:, :4], rtol=1e-15, atol=0)
        assert not h.A[4:].any() and not h.B[:, 4:].any()  # the padded tail is zero


def test_hetlora_init_is_in_effective_units_and_payload_truncates():
    s = build("hetlora", gamma=0.9, lam=0.01, r_min=2)
    base = server_adapter(32, alpha=64.0)
    base = {m: LoraFactors(f.A, torch.randn(OUT, 32, dtype=F64), f.scaling) for m, f in base.items()}
    g = s.init(GlobalModel(adapter=base))
    for m in MODULES:
        assert g.adapter[m].scaling == 1.0 and g.adapter[m].rank == 32
        torch.testing.assert_close(delta(g.adapter[m]), delta(base[m]), rtol=1e-14, atol=0)
    pl = s.payload(g, ClientSpec(3, 8, ALPHA))
    assert pl.plan.to_config() == {"prune": True, "prune_gamma": 0.9, "prune_lambda": 0.01, "prune_r_min": 2}
    for m in MODULES:
        sk = scaling_for(8, ALPHA)
        torch.testing.assert_close(delta(pl.adapter[m]), g.adapter[m].B[:, :8] @ g.adapter[m].A[:8], rtol=1e-13, atol=1e-13)
        assert pl.adapter[m].scaling == sk
    with pytest.raises(ValueError, match="exceeds HetLoRA's server rank 32"):
        s.payload(g, ClientSpec(0, 64, ALPHA))


def test_sparsity_weights_are_frobenius_norms_of_the_products():
    fs = [rand_factors(r, seed=i) for i, r in enumerate(RANKS)]
    dense = torch.stack([torch.linalg.matrix_norm(delta(f)) for f in fs])
    for f, d in zip(fs, dense):
        torch.testing.assert_close(frobenius_of_product(f), d, rtol=1e-12, atol=0)
        assert abs(sparsity_weight(f) - d.item()) < 1e-9 * d.item()
    ups = [ClientUpdate(k, {MODULES[0]: f}, {}, 1) for k, f in enumerate(fs)]
    p = HetLoRA().module_weights(fs, ups)
    torch.testing.assert_close(torch.tensor(p, dtype=F64), dense / dense.sum(), rtol=1e-12, atol=0)
    # scaling 1/r: the rank-64 client's update is not simply the biggest because its rank is
    assert len(set(round(x, 6) for x in p)) == len(p)


@pytest.mark.parametrize("weighting", ["sparsity", "num_examples"])
def test_hetlora_aggregate_equals_hand_computed_padded_weighted_averages(weighting):
    s = HetLoRA(weighting=weighting)
    g = s.init(GlobalModel(adapter=server_adapter(8, alpha=16.0), head=head_of(0)))
    sent = [ClientSpec(0, 8, 16.0), ClientSpec(1, 4, 8.0), ClientSpec(2, 4, 16.0), ClientSpec(3, 2, 16.0)]
    returned_ranks = [8, 3, 4, 2]  # client 1 self-pruned 4 → 3
    ups = []
    for c, r in zip(sent, returned_ranks):
        adapter = {m: rand_factors(r, seed=10 * c.client_id + i, alpha=c.alpha) for i, m in enumerate(MODULES)}
        adapter = {m: LoraFactors(f.A, f.B, scaling_for(c.rank, c.alpha)) for m, f in adapter.items()}  # scaling of the sent rank
        ups.append(ClientUpdate(c.client_id, adapter, head_of(c.client_id), [5, 50, 20, 25][c.client_id]))
    out = s.aggregate(g, ups)
    n = torch.tensor([5.0, 50, 20, 25], dtype=F64)
    for m in MODULES:
        fs = [u.adapter[m] for u in ups]
        if weighting == "sparsity":
            S = torch.stack([torch.linalg.matrix_norm(f.scaling * f.B @ f.A) for f in fs])
            p = S / S.sum()
        else:
            p = n / n.sum()
        A = torch.zeros(8, IN, dtype=F64)
        B = torch.zeros(OUT, 8, dtype=F64)
        for f, pk in zip(fs, p):
            A[: f.rank] += pk * f.A
            B[:, : f.rank] += pk * f.scaling * f.B
        torch.testing.assert_close(out.adapter[m].A, A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.adapter[m].B, B, rtol=1e-12, atol=1e-14)
        assert out.adapter[m].scaling == 1.0 and out.adapter[m].rank == 8
    expected_head = sum((nk / n.sum()) * u.head["classifier.weight"] for u, nk in zip(ups, n))
    torch.testing.assert_close(out.head["classifier.weight"], expected_head, rtol=1e-12, atol=0)


def test_tail_norm_value_and_gradients():
    f0 = rand_factors(10, seed=1)
    A = f0.A.clone().requires_grad_(True)
    B = f0.B.clone().requires_grad_(True)
    gamma = 0.75  # ⌊0.75 · 10⌋ = 7: the last 3 components are the tail
    val = tail_norm(LoraFactors(A, B, f0.scaling), gamma)
    nB, nA = f0.B[:, 7:].norm(), f0.A[7:].norm()
    torch.testing.assert_close(val.detach(), nB * nA, rtol=1e-12, atol=0)
    val.backward()
    torch.testing.assert_close(A.grad[7:], nB * f0.A[7:] / nA, rtol=1e-12, atol=0)
    torch.testing.assert_close(B.grad[:, 7:], nA * f0.B[:, 7:] / nB, rtol=1e-12, atol=0)
    assert A.grad[7:].abs().min() > 0 and B.grad[:, 7:].abs().min() > 0
    assert not A.grad[:7].any() and not B.grad[:, :7].any()
    # at peft's init (B = 0) the value and the gradients are 0, not NaN
    Bz = torch.zeros(OUT, 10, dtype=F64, requires_grad=True)
    z = tail_norm(LoraFactors(A.detach(), Bz, 1.0), gamma)
    z.backward()
    assert z.item() == 0 and torch.isfinite(Bz.grad).all() and not Bz.grad.any()


def test_pruned_rank():
    assert pruned_rank(64, 0.99, 1) == 63
    assert pruned_rank(100, 0.99, 1) == 99
    assert pruned_rank(4, 0.99, 1) == 3
    assert pruned_rank(1, 0.99, 1) == 1
    assert pruned_rank(10, 0.5, 8) == 8
    assert pruned_rank(16, 0.5, 2) == 8
    assert pruned_rank(2, 0.5, 4) == 2  # never grows
    assert pruned_rank(8, 1.0, 1) == 8
    with pytest.raises(ValueError, match="gamma"):
        pruned_rank(8, 1.5, 1)


# ---------------------------------------------------------------- all four


def test_registry_builds_the_four_strategies_and_validates_weighting():
    assert isinstance(build("ffa_lora", r_max=32), FFALoRA)
    assert isinstance(build("hetlora", gamma=0.9), HetLoRA)
    assert isinstance(build("flora", seed=1), FLoRA)
    assert isinstance(build("flexlora", weighting="uniform"), FlexLoRA)
    assert {"fedavg", "ffa_lora", "hetlora", "flora", "flexlora"} <= set(REGISTRY)
    for name in ("ffa_lora", "hetlora", "flora", "flexlora"):
        assert build(name).name == name
        with pytest.raises(ValueError, match="strategy.weighting"):
            build(name, weighting="bogus")


def _snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, LoraFactors):
        return (obj.A.clone(), obj.B.clone(), obj.scaling)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_snapshot(v) for v in obj]
    if isinstance(obj, GlobalModel):
        return (_snapshot(obj.adapter), _snapshot(obj.head), _snapshot(list(obj.merges)))
    if isinstance(obj, ClientUpdate):
        return (_snapshot(obj.adapter), _snapshot(obj.head))
    return obj


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ["ffa_lora", "hetlora", "flora", "flexlora"])
def test_strategies_are_pure_and_empty_rounds_keep_the_model(name):
    s = build(name)
    g = s.init(GlobalModel(adapter=server_adapter(64), head=head_of(0)))
    for _ in range(2):  # two rounds, so that the second payload starts from an aggregated state
        cs = specs()[:4]
        pls = [s.payload(g, c) for c in cs]
        ups = []
        for c, pl in zip(cs, pls):
            if pl.adapter:
                adapter = {m: LoraFactors(f.A.clone(), f.B + 0.1, f.scaling) for m, f in pl.adapter.items()}
            else:
                adapter = random_update(c, seed=c.client_id).adapter
            ups.append(ClientUpdate(c.client_id, adapter, head_of(c.client_id + 1), 10 + c.client_id))
        before_g, before_u = _snapshot(g), _snapshot(ups)
        new = s.aggregate(g, ups)
        assert _same(_snapshot(g), before_g) and _same(_snapshot(ups), before_u)
        assert s.aggregate(new, []) is new
        p = normalized_weights([u.num_examples for u in ups])
        torch.testing.assert_close(new.head["classifier.weight"], sum(pk * u.head["classifier.weight"] for u, pk in zip(ups, p)))
        g = new

"""FlexLoRA's leading components at many clients: the certified randomised SVD from the factors
(:func:`fedpeft.lora.leading_svd`) against the exact SVD, its fallback on a flat spectrum, and
what the strategy stores (the exact update for evaluation, a truncated SVD for payloads)."""

import itertools
import math

import pytest
import torch

import fedpeft.lora as lora
from fedpeft.lora import (
    FactorsWithLeading,
    LoraFactors,
    SvdFactors,
    delta,
    leading_svd,
    normalized_weights,
    randomized_pays,
    scaling_for,
    stack,
    svd_factors,
)
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.flexlora import FlexLoRA
from tests.harness import LargestTensor

F64 = torch.float64
ALPHA = 16.0
CYCLE = [16, 8, 4, 4]  # Σ r = 320 at 40 clients: enough for the sketch (k + 8 = 24) to pay


def decaying(out, inp, ranks, *, noise=0.1, seed=0, dtype=torch.float32, decay=0.15, floor=False):
    """Client factors that share a signal with a decaying spectrum (σ_i = e^{-decay·i}; ``floor``:
    σ_i ∝ 1/√i, i = 1, 2, …, a slow decay over which the noise is a floor) plus their own noise
    (relative Frobenius size ``noise``), like trained updates: client k's ``s_k B_k A_k`` is the
    signal's top ``r_k`` components, perturbed. Returns ``(factors, weights)``."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    U = torch.linalg.qr(torch.randn(out, r_max, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(inp, r_max, generator=g, dtype=F64)).Q
    sig = 1 / torch.arange(1, r_max + 1, dtype=F64).sqrt() if floor else torch.exp(-decay * torch.arange(r_max, dtype=F64))
    factors = []
    for r in ranks:
        s = scaling_for(r, ALPHA)
        sn = float(sig[:r].norm())
        B = U[:, :r] * sig[:r] + torch.randn(out, r, generator=g, dtype=F64) * (noise * sn / math.sqrt(2 * out * r))
        A = V[:, :r].mT + torch.randn(r, inp, generator=g, dtype=F64) * (noise / math.sqrt(2 * inp))
        factors.append(LoraFactors(A.to(dtype), (B / s).to(dtype), s))
    sizes = torch.randint(50, 500, (len(ranks),), generator=g).tolist()
    return factors, normalized_weights(sizes)


def flat(out, inp, ranks, *, seed=0, dtype=torch.float32):
    """Random factors (no shared signal): the stacked update's spectrum is flat-ish."""
    g = torch.Generator().manual_seed(seed)
    factors = [
        LoraFactors(torch.randn(r, inp, generator=g, dtype=dtype) / inp**0.5, torch.randn(out, r, generator=g, dtype=dtype) * 0.01, scaling_for(r, ALPHA))
        for r in ranks
    ]
    return factors, normalized_weights([1.0] * len(ranks))


def cycle(clients, ranks=CYCLE):
    return [r for _, r in zip(range(clients), itertools.cycle(ranks))]


def excess(W, S, U, s, V, r):
    """``(‖W − U_r diag(s_r) V_rᵀ‖_F − opt_r) / ‖W‖_F`` in float64, ``opt_r = √Σ_{i>r} S_i²``."""
    P = (U[:, :r].to(F64) * s[:r].to(F64)) @ V[:, :r].to(F64).mT
    return float(((W - P).norm() - S[r:].norm()) / S.norm())


# ------------------------------------------------------------------ leading_svd itself


@pytest.mark.parametrize(
    "out,inp,clients,ranks,dtype",
    [
        (480, 400, 40, CYCLE, torch.float32),  # out ≠ in, heterogeneous ranks
        (400, 560, 40, CYCLE, torch.float32),  # out < in
        (640, 600, 48, [32, 16, 8, 4, 4, 4], F64),  # k = 32, float64 inputs
    ],
)
def test_leading_svd_is_within_the_tolerance_of_eckart_young_on_a_decaying_spectrum(out, inp, clients, ranks, dtype):
    factors, p = decaying(out, inp, cycle(clients, ranks), dtype=dtype, seed=out + inp)
    f = stack(factors, p)
    k = max(ranks)
    assert randomized_pays(f.rank, out, inp, k)
    W = delta(LoraFactors(f.A.to(F64), f.B.to(F64), 1.0))
    S = torch.linalg.svdvals(W)
    lead = leading_svd(f, k, seed=3)
    assert lead.method == "randomized" and lead.bound <= 1e-5, (lead.method, lead.bound, lead.note)
    assert lead.U.shape == (out, k) and lead.S.shape == (k,) and lead.V.shape == (inp, k) and lead.U.dtype == dtype
    worst = max(excess(W, S, lead.U, lead.S, lead.V, r) for r in range(1, k + 1))
    assert -1e-6 <= worst <= 1e-5, worst
    # the optimum is not trivially reached: truncations are really lossy
    assert float(S[k:].norm() / S.norm()) > 1e-4  # ≫ the tolerance
    if dtype == F64:  # no float32 rounding on top: the certificate itself bounds the excess
        assert worst <= lead.bound + 1e-12
    else:  # float32 iterations tilt the subspace by ~1e-7, which the certificate sees only squared
        assert lead.bound < 1e-6, lead.bound
        assert worst <= lead.bound + 1e-6  # + the cast of the float64 triplets to float32


def test_the_ritz_value_bound_is_tight_on_a_two_by_two_block():
    """Li & Li's bound is attained by ``[[θ, c], [c, μ]]``: with ``ΔWᵀΔW = [[a, b], [b, d]]`` and the
    Ritz vector ``e₁``, the certified deficit ``D₁`` is exactly ``λ₁ − a``."""
    from fedpeft.lora import _certify

    W = torch.tensor([[1.0, 0.3], [0.2, 0.4], [0.1, -0.2]], dtype=F64)  # ΔW: 3 × 2
    G = W.mT @ W
    a, b, d = G[0, 0], G[0, 1], G[1, 1]
    V = torch.tensor([[1.0], [0.0]], dtype=F64)
    R = G @ V - V * a  # G V − V Θ with V = e₁, Θ = a
    torch.testing.assert_close(R[:, 0], torch.stack([torch.zeros((), dtype=F64), b]), rtol=0, atol=1e-15)  # c = |b|
    bound, gap, D = _certify(a.reshape(1), R.mT @ R, float(d), 1)  # e² = ‖ΔW e₂‖² exactly
    lam1 = torch.linalg.eigvalsh(G)[-1]
    assert gap and float(a) > float(d)
    torch.testing.assert_close(D[0], lam1 - a, rtol=1e-12, atol=0)
    assert float(lam1 - a) > 1e-3  # a deficit the test can see
    # the Schur-complement bound alone, b²/(a − d), is valid but not tight here (Li & Li's is)
    schur = float(b * b / (a - d))
    assert schur > float(lam1 - a) * 1.01
    # more unexplored energy than the Ritz value: no gap, no certificate
    assert _certify(a.reshape(1), R.mT @ R, float(a) * 1.01, 1)[:2] == (float("inf"), False)


def test_the_schur_complement_bound_sees_a_tilted_subspace_only_squared():
    """A subspace tilted by ``ε`` from the leading one (float32 rounding is ``ε ≈ 1e-7``) leaves
    residuals ``~ε θ₁``; the Schur-complement bound charges each Ritz value ``~ε² θ₁`` — far below
    Li & Li's ``c²/η_t``, whose gap is between neighbouring Ritz values."""
    from fedpeft.lora import _certify

    g = torch.Generator().manual_seed(0)
    n, l, k, eps = 300, 12, 8, 1e-6
    Qf = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    lam = torch.cat([torch.exp(-0.3 * torch.arange(l, dtype=F64)), 1e-6 * torch.rand(n - l, generator=g, dtype=F64)])
    G = (Qf * lam) @ Qf.mT
    V0 = torch.linalg.qr(Qf[:, :l] + eps / n**0.5 * torch.randn(n, l, generator=g, dtype=F64)).Q  # tilted by ~ε
    theta, Wr = torch.linalg.eigh(V0.mT @ G @ V0)
    theta, Wr = theta.flip(0), Wr.flip(1)
    V = V0 @ Wr
    R = G @ V - V * theta
    P = torch.eye(n, dtype=F64) - V @ V.mT
    e2 = float(torch.linalg.eigvalsh(P @ G @ P)[-1]) * 1.0001
    bound, gap, D = _certify(theta, R.mT @ R, e2, k)
    true = torch.cumsum(lam[:k] - theta[:k], 0)
    assert gap and bool((D >= true - 1e-15).all())  # valid
    assert float(D[-1]) < 10 * k * eps**2  # second order in the tilt
    assert float((R.norm(dim=0)[:k]).max()) > 0.1 * eps  # while the residuals are first order
    K = R.mT @ R  # Li & Li's bound for i ≤ k alone (the split after t = k) would be ~c²/η_k:
    c2, eta = float(torch.linalg.eigvalsh(K[:k, :k])[-1]), float(theta[k - 1] - theta[k]) - e2
    assert float(D[-1]) < 0.05 * k * c2 / eta  # here ~70x below


def test_the_certificate_bounds_the_true_excess_of_an_unconverged_sketch():
    """No power iteration, no refinement, tolerance 1: whatever has a gap is returned with its
    bound, and the bound must hold where the excess is large enough to measure."""
    factors, p = decaying(480, 400, cycle(40), noise=0.5, dtype=F64, seed=7)
    f = stack(factors, p)
    W, k = delta(f), 16
    S = torch.linalg.svdvals(W)
    lead = leading_svd(f, k, seed=1, power=0, refine=0, tol=1.0)
    assert lead.method == "randomized"
    true = [excess(W, S, lead.U, lead.S, lead.V, r) for r in range(1, k + 1)]
    assert max(true) > 1e-8  # an excess the test can see
    assert max(true) <= lead.bound, (max(true), lead.bound)
    # the same sketch at the default tolerance is refused and falls back to the exact SVD ...
    strict = leading_svd(f, k, seed=1, power=0, refine=0)
    assert strict.method == "exact" and strict.bound > 1e-5 and ("gap" in strict.note or "bound" in strict.note)
    # ... unless one refinement (a power step in float64) is allowed: then it is certified
    ref = leading_svd(f, k, seed=1, power=0, refine=1)
    assert ref.method == "randomized" and ref.bound <= 1e-5, (ref.bound, ref.note)
    assert max(excess(W, S, ref.U, ref.S, ref.V, r) for r in range(1, k + 1)) <= ref.bound


def test_a_flat_spectrum_falls_back_to_the_exact_svd():
    factors, p = flat(480, 400, cycle(40))
    f = stack(factors, p)
    lead = leading_svd(f, 16, seed=0)
    assert lead.method == "exact" and lead.bound == float("inf") and "gap" in lead.note
    assert "early check" in lead.note  # seen before the float64 work
    late = leading_svd(f, 16, seed=0, power=0, flat=float("inf"))  # no early look: the certificate itself finds no gap
    assert late.method == "exact" and late.bound == float("inf") and "gap" in late.note and "early" not in late.note
    U, S, V = svd_factors(f)  # the same exact SVD, all components
    assert torch.equal(lead.S, S) and torch.equal(lead.U, U) and torch.equal(lead.V, V)
    # and it is the optimum
    W = delta(LoraFactors(f.A.to(F64), f.B.to(F64), 1.0))
    Sd = torch.linalg.svdvals(W)
    assert max(excess(W, Sd, lead.U, lead.S, lead.V, r) for r in (4, 8, 16)) < 1e-6


def test_small_problems_and_ranks_past_the_update_go_to_the_exact_svd():
    factors, p = decaying(96, 80, [16, 8, 4, 4], dtype=F64)
    f = stack(factors, p)  # Σ r = 32: the sketch would not be cheaper
    lead = leading_svd(f, 8, seed=0)
    assert lead.method == "exact" and "small" in lead.note and lead.S.shape == (32,)
    big = lead.factors(40, 2.0)  # past the update's rank: zero-padded, ΔW exact
    assert isinstance(big, SvdFactors) and big.rank == 40 and not big.A[32:].any() and not big.B[:, 32:].any()
    torch.testing.assert_close(delta(big), delta(f), rtol=0, atol=1e-12)


def test_leading_svd_is_deterministic_given_the_seed():
    factors, p = decaying(480, 400, cycle(40), seed=5)
    f = stack(factors, p)
    a, b, c = leading_svd(f, 16, seed=11), leading_svd(f, 16, seed=11), leading_svd(f, 16, seed=12)
    assert a.method == b.method == c.method == "randomized"
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)
    assert not torch.equal(a.V, c.V)  # the seed matters ...
    torch.testing.assert_close(a.S, c.S, rtol=1e-5, atol=1e-7)  # ... not the result


# ------------------------------------------------------------------ through the strategy


def updates_of(factors, ranks, module="m"):
    sizes = [50 + 13 * k for k in range(len(ranks))]
    return [ClientUpdate(k, {module: f}, {}, n) for k, (f, n) in enumerate(zip(factors, sizes))], normalized_weights(sizes)


def test_flexlora_stores_the_exact_update_and_gives_every_client_its_near_optimal_truncation():
    ranks = cycle(40)
    factors, _ = decaying(480, 400, ranks, seed=2)
    ups, p = updates_of(factors, ranks)
    s = FlexLoRA(seed=4)
    g = s.aggregate(GlobalModel(adapter={}), ups).adapter["m"]
    assert type(g) is FactorsWithLeading and g.rank == sum(ranks) and g.scaling == 1.0 and g.leading.rank == 16
    W = sum(pk * delta(LoraFactors(f.A.to(F64), f.B.to(F64), f.scaling)) for f, pk in zip(factors, p))
    torch.testing.assert_close(delta(LoraFactors(g.A.to(F64), g.B.to(F64), 1.0)), W, rtol=0, atol=1e-6 * float(W.norm()))
    S = torch.linalg.svdvals(W)
    for r in (4, 8, 16, 24):  # 24 > the 16 computed: decomposed for that client
        spec = ClientSpec(100 + r, r, ALPHA)
        f = s.payload(GlobalModel(adapter={"m": g}), spec).adapter["m"]
        sk = scaling_for(r, ALPHA)
        assert type(f) is LoraFactors and f.rank == r and f.scaling == sk
        P = sk * (f.B.to(F64) @ f.A.to(F64))
        gap = float(((W - P).norm() - S[r:].norm()) / S.norm())
        assert -1e-6 <= gap <= 1e-5, (r, gap)
    # the server evaluates (and checkpoints) the exact update: what global_adapter hands load_global
    from fedpeft.server import _model_from_state, _model_state, global_adapter

    model = GlobalModel(adapter={"m": g})
    assert global_adapter(model)["m"] is g
    back = _model_from_state(_model_state(model))  # a checkpoint: plain factors, no leading part
    assert type(back.adapter["m"]) is LoraFactors and torch.equal(back.adapter["m"].A, g.A)
    f = s.payload(back, ClientSpec(1, 8, ALPHA)).adapter["m"]
    P = scaling_for(8, ALPHA) * (f.B.to(F64) @ f.A.to(F64))
    assert float(((W - P).norm() - S[8:].norm()) / S.norm()) <= 1e-5


def test_flexlora_on_a_noise_floor_is_certified_against_an_independent_dense_svd():
    """The benchmark's noise-floor case (σ_i ∝ 1/√i, 5% noise on every client's A and B) at 512²:
    40 clients of ranks [16, 8, 4, 4] (stacked rank 320, enough for the randomised path to pay;
    20 clients would take the exact SVD). Every payload within 1e-5·‖ΔW‖_F of the optimum of a dense
    float64 SVD of ΔW formed from the clients' factors."""
    ranks = cycle(40)
    factors, p = decaying(512, 512, ranks, noise=0.05, floor=True, seed=11)
    ups = [ClientUpdate(k, {"m": f}, {}, 1) for k, f in enumerate(factors)]
    p = normalized_weights([1] * len(ranks))
    g = FlexLoRA(seed=5).aggregate(GlobalModel(adapter={}), ups).adapter["m"]
    assert type(g) is FactorsWithLeading and g.leading.rank == 16  # the certified randomised path
    W = torch.zeros(512, 512, dtype=F64)
    for f, pk in zip(factors, p):  # the dense update, client by client (not the stack)
        W += pk * f.scaling * (f.B.to(F64) @ f.A.to(F64))
    S = torch.linalg.svdvals(W)
    assert float(S[16:].norm() / S.norm()) > 1e-4  # the floor: every truncation loses ≫ the tolerance
    for r in sorted(set(ranks)):
        f = FlexLoRA(seed=5).payload(GlobalModel(adapter={"m": g}), ClientSpec(r, r, ALPHA)).adapter["m"]
        P = f.scaling * (f.B.to(F64) @ f.A.to(F64))
        gap = float(((W - P).norm() - S[r:].norm()) / S.norm())
        assert -1e-6 <= gap <= 1e-5, (r, gap)


def mixed(out, inp, ranks, signal, *, seed=0):
    """Clients of rank r_k that each carry a random r_k-dimensional part of a shared rank-``signal``
    update (so the average has ``signal`` > max r_k components above the noise)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, signal, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(inp, signal, generator=g, dtype=F64)).Q
    root = torch.exp(-0.075 * torch.arange(signal, dtype=F64))  # σ_i = e^{-0.15 i}
    factors = []
    for r in ranks:
        P = torch.linalg.qr(torch.randn(signal, r, generator=g, dtype=F64)).Q
        B = (U * root) @ P + 1e-4 * torch.randn(out, r, generator=g, dtype=F64)
        A = P.mT @ (root[:, None] * V.mT)
        factors.append(LoraFactors(A.float(), (B / scaling_for(r, ALPHA)).float(), scaling_for(r, ALPHA)))
    return factors


def test_flexlora_r_max_and_svd_exact():
    ranks = cycle(44)  # Σ r = 352 ≥ 12 · (20 + 8)
    ups, _ = updates_of(mixed(480, 400, ranks, signal=24, seed=3), ranks)
    g = FlexLoRA(r_max=20).aggregate(GlobalModel(adapter={}), ups).adapter["m"]
    assert type(g) is FactorsWithLeading and g.leading.rank == 20  # > the largest client rank, 16
    assert FlexLoRA().aggregate(GlobalModel(adapter={}), ups).adapter["m"].leading.rank == 16
    exact = FlexLoRA(svd="exact").aggregate(GlobalModel(adapter={}), ups).adapter["m"]
    assert type(exact) is SvdFactors and exact.rank == sum(ranks)
    with pytest.raises(ValueError, match="strategy.svd"):
        FlexLoRA(svd="fast")


def test_flexlora_on_a_flat_spectrum_stores_the_exact_svd():
    ranks = cycle(40)
    factors, _ = flat(480, 400, ranks, seed=1)
    ups, p = updates_of(factors, ranks)
    g = FlexLoRA().aggregate(GlobalModel(adapter={}), ups).adapter["m"]
    assert type(g) is SvdFactors and g.rank == sum(ranks)  # the old exact path: payloads are slices of it
    W = sum(pk * delta(LoraFactors(f.A.to(F64), f.B.to(F64), f.scaling)) for f, pk in zip(factors, p))
    S = torch.linalg.svdvals(W)
    f = FlexLoRA().payload(GlobalModel(adapter={"m": g}), ClientSpec(0, 16, ALPHA)).adapter["m"]
    P = scaling_for(16, ALPHA) * (f.B.to(F64) @ f.A.to(F64))
    assert abs(float(((W - P).norm() - S[16:].norm()) / S.norm())) < 1e-6


def test_flexlora_aggregate_is_deterministic_given_seed_and_clients():
    ranks = cycle(40)
    factors, _ = decaying(480, 400, ranks, seed=6)
    ups, _ = updates_of(factors, ranks)
    a, b = (FlexLoRA(seed=1).aggregate(GlobalModel(adapter={}), ups).adapter["m"].leading for _ in range(2))
    c = FlexLoRA(seed=2).aggregate(GlobalModel(adapter={}), ups).adapter["m"].leading
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and not torch.equal(a.A, c.A)


def test_the_randomized_path_never_forms_the_out_by_in_matrix():
    out, inp, ranks = 3000, 2500, cycle(40, [4])  # Σ r = 160, k = 4: ΔW would be 7.5 M entries
    factors, _ = decaying(out, inp, ranks, seed=8)
    ups, _ = updates_of(factors, ranks)
    with LargestTensor() as probe:
        g = FlexLoRA().aggregate(GlobalModel(adapter={}), ups).adapter["m"]
        FlexLoRA().payload(GlobalModel(adapter={"m": g}), ClientSpec(0, 4, ALPHA))
    assert type(g) is FactorsWithLeading
    assert probe.numel <= max(out, inp) * sum(ranks), probe.numel


def test_stack_is_unchanged_by_the_one_buffer_path():
    factors, p = decaying(64, 48, [8, 4, 4, 2], seed=9)
    ref_A = torch.cat([w * f.scaling * f.A for f, w in zip(factors, p)], dim=0)
    assert torch.equal(stack(factors, p).A, ref_A)
    mixed = [LoraFactors(f.A.to(F64), f.B.to(F64), f.scaling) if i == 0 else f for i, f in enumerate(factors)]
    assert stack(mixed, p).A.dtype == F64  # mixed dtypes: promoted as torch.cat does


@pytest.mark.parametrize("mkl", [True, False])
def test_the_certificates_float64_products_equal_those_of_float64_copies_of_the_stacks(monkeypatch, mkl):
    """Chunked through one float64 buffer (MKL on Intel) or from float64 copies (elsewhere): the
    same float64 products, chunks of 64 over a stacked rank of 150 (two full and one partial)."""
    monkeypatch.setattr(lora, "_intel_mkl", lambda: mkl)
    g = torch.Generator().manual_seed(11)
    A, B = torch.randn(150, 90, generator=g), torch.randn(70, 150, generator=g)
    X, Z = torch.randn(90, 7, generator=g, dtype=F64), torch.randn(70, 5, generator=g, dtype=F64)
    dW, dWt = lora._float64_products(A, B, 0.3, chunk=64)
    ref, ref_t = 0.3 * (B.to(F64) @ (A.to(F64) @ X)), 0.3 * (A.to(F64).mT @ (B.to(F64).mT @ Z))
    assert dW(X).dtype == F64 and torch.allclose(dW(X), ref, rtol=1e-13, atol=1e-13 * float(ref.abs().max()))
    assert torch.allclose(dWt(Z), ref_t, rtol=1e-13, atol=1e-13 * float(ref_t.abs().max()))
    for Xl, Yr in ((A, X.float()), (B.mT, Z.float()), (X.mT, X)):  # _mm, transposed stacks included
        assert torch.allclose(lora._mm(Xl, Yr), Xl @ Yr, rtol=1e-5, atol=1e-5 * float((Xl @ Yr).abs().max()))


def test_leading_svd_is_certified_alike_on_either_blas(monkeypatch):
    ranks = cycle(40)
    factors, p = decaying(480, 400, ranks, seed=12, floor=True)
    st = stack(factors, p)
    W = st.B.to(F64) @ st.A.to(F64)
    S = torch.linalg.svdvals(W)
    runs = []
    for mkl in (True, False):
        monkeypatch.setattr(lora, "_intel_mkl", lambda mkl=mkl: mkl)
        runs.append(leading_svd(st, 16, seed=3))
    for r in runs:
        assert r.method == "randomized" and r.bound <= 1e-5
        assert max(excess(W, S, r.U, r.S, r.V, j) for j in (1, 4, 16)) <= 1e-5 + 1e-6  # + the float32 cast
    assert torch.allclose(runs[0].S, runs[1].S, rtol=1e-5)


@pytest.mark.parametrize("mkl", [False, True])
def test_torch_runs_on_one_thread_inside_the_openblas_route_and_gets_its_threads_back(monkeypatch, mkl):
    """Where NumPy's OpenBLAS runs the large products (not Intel + MKL), torch's own ops inside
    ``leading_svd`` run on one thread (its spinning OpenMP threads took the cores from OpenBLAS), and
    torch's thread count is restored afterwards — also when the randomised path raises."""
    monkeypatch.setattr(lora, "_intel_mkl", lambda: mkl)
    seen = []
    real_mm = lora._mm
    monkeypatch.setattr(lora, "_mm", lambda X, Y: (seen.append(torch.get_num_threads()), real_mm(X, Y))[1])
    factors, p = decaying(480, 400, cycle(40), seed=12, floor=True)
    st = stack(factors, p)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = leading_svd(st, 16, seed=3)
        assert r.method == "randomized" and r.bound <= 1e-5
        assert seen and set(seen) == ({2} if mkl else {1})
        assert torch.get_num_threads() == 2

        def boom(*a, **k):
            raise RuntimeError("inside")

        monkeypatch.setattr(lora, "_randomized_leading", boom)
        with pytest.raises(RuntimeError, match="inside"):
            leading_svd(st, 16, seed=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

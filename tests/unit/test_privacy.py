"""The DP math in fedpeft.privacy: noise scale, clipping, and the accountant checked against Google's dp-accounting."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from fedpeft.privacy import MODES, Accountant, clip, gaussian_noise, noise_multiplier_for, update_norm

DELTA = 1e-5


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in d.values()])


def _random_update(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.lora_A": scale * torch.randn(4, 16, generator=g),
        "layer.0.lora_B": scale * torch.randn(16, 4, generator=g),
        "head.bias": scale * torch.randn(7, generator=g),
    }


def test_modes():
    assert MODES == ("none", "sample", "central", "local")


# --- Gaussian noise ------------------------------------------------------------------------------


def test_noise_has_configured_std_and_zero_mean():
    sigma, n = 0.7, 200_000
    out = gaussian_noise({"w": torch.zeros(n)}, sigma, torch.Generator().manual_seed(0))["w"]
    assert out.dtype == torch.float32 and out.shape == (n,)
    out = out.double()
    # The sample std s of n normals has sd ≈ σ / sqrt(2n) (0.16% of σ here); accept ±6 of those.
    tol = 6 / math.sqrt(2 * n)
    assert tol < 0.02
    # A 10% error in the noise scale falls far outside the acceptance band, so this test catches it.
    assert abs(0.9 - 1) > tol and abs(1.1 - 1) > tol
    s = out.std().item()
    assert abs(s / sigma - 1) < tol, s
    # The sample mean has sd σ / sqrt(n).
    assert abs(out.mean().item()) < 6 * sigma / math.sqrt(n)


def test_noise_is_added_reproducible_and_seeded():
    delta = _random_update(1, 1.0)
    before = {k: t.clone() for k, t in delta.items()}
    a = gaussian_noise(delta, 0.5, torch.Generator().manual_seed(7))
    b = gaussian_noise(delta, 0.5, torch.Generator().manual_seed(7))
    c = gaussian_noise(delta, 0.5, torch.Generator().manual_seed(8))
    zero = gaussian_noise({k: torch.zeros_like(t) for k, t in delta.items()}, 0.5, torch.Generator().manual_seed(7))
    for k in delta:
        assert torch.equal(delta[k], before[k])  # input not mutated
        assert a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k])  # same seed, same noise
        assert not torch.allclose(a[k], c[k])  # another seed, other noise
        torch.testing.assert_close(a[k], delta[k] + zero[k], rtol=0, atol=1e-6)  # Δ + noise
    # Same noise whatever the dict's insertion order.
    rev = gaussian_noise(dict(reversed(list(delta.items()))), 0.5, torch.Generator().manual_seed(7))
    assert all(torch.equal(rev[k], a[k]) for k in delta)


def test_zero_std_returns_copies():
    delta = {"w": torch.randn(3, 3, dtype=torch.float64)}
    out = gaussian_noise(delta, 0.0, torch.Generator().manual_seed(0))
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], delta["w"].float())
    out["w"].add_(1.0)
    assert not torch.equal(out["w"], delta["w"].float())  # a copy, not a view
    with pytest.raises(ValueError):
        gaussian_noise(delta, -1.0, torch.Generator())


# --- clipping ------------------------------------------------------------------------------------


def test_update_norm_is_global_l2():
    delta = _random_update(0, 1.0)
    assert update_norm(delta) == pytest.approx(_flat(delta).norm().item(), rel=1e-12)
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)
    assert update_norm({}) == 0.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 10.0])
def test_clip_bounds_norm_and_keeps_direction(seed, max_norm):
    unit = _random_update(seed, 1.0)
    base = update_norm(unit)
    # Norms from far below to far above C, including just below / just above it.
    for ratio in (0.01, 0.5, 0.9, 0.999, 1.001, 1.1, 2.0, 100.0):
        delta = {k: t * (ratio * max_norm / base) for k, t in unit.items()}
        assert (update_norm(delta) > max_norm) == (ratio > 1)
        before = {k: t.clone() for k, t in delta.items()}
        clipped, norm = clip(delta, max_norm)
        assert norm == pytest.approx(_flat(delta).norm().item(), rel=1e-12)
        assert all(torch.equal(delta[k], before[k]) for k in delta)  # input not mutated
        new_norm = update_norm(clipped)
        assert new_norm <= max_norm * (1 + 1e-6)
        if norm > max_norm:
            assert new_norm == pytest.approx(max_norm, rel=1e-6)
            x, y = _flat(delta), _flat(clipped)
            assert torch.dot(x, y).item() / (x.norm() * y.norm()).item() == pytest.approx(1.0, abs=1e-9)
            for k in delta:  # every tensor is scaled by the same factor C / ‖Δ‖
                torch.testing.assert_close(clipped[k], delta[k] * (max_norm / norm))
        else:
            assert all(torch.equal(clipped[k], delta[k]) for k in delta)  # bitwise unchanged
            assert all(clipped[k].data_ptr() != delta[k].data_ptr() for k in delta)
    with pytest.raises(ValueError):
        clip(delta, 0.0)


# --- accountant vs Google's dp-accounting --------------------------------------------------------

# Same orders on both sides (Opacus's DEFAULT_ALPHAS, 1.1..10.9 and 12..63): identical math,
# independent code. (dp-accounting's own default orders give the same ε here.)
ORDERS = RDPAccountant.DEFAULT_ALPHAS

# Measured (ours vs dp-accounting RDP vs dp-accounting PLD, δ = 1e-5):
#   σ=1.1, q=0.01, 1000 steps:  1.71177  1.71177  1.5154  (RDP/PLD = 1.13)
#   σ=0.8, q=0.02,  100 steps:  3.27601  3.27620  2.6202  (1.25)
#   σ=2.0, q=0.1,    50 steps:  1.84395  1.84395  1.6525  (1.12)
#   σ=1.0, q=1.0,    10 steps: 19.05360 19.05360 17.8566  (1.07)
#   500×(1.1, 0.01) + 100×(0.8, 0.02): 3.43121 3.43140 2.7793 (1.23)
# i.e. RDP agrees to < 1e-4 relative; it is an upper bound 7-25% above the (tighter) PLD ε.
SETTINGS = {
    "sigma1.1_q0.01_T1000": [(1.1, 0.01, 1000)],
    "sigma0.8_q0.02_T100": [(0.8, 0.02, 100)],
    "sigma2_q0.1_T50": [(2.0, 0.1, 50)],
    "sigma1_q1_T10_no_subsampling": [(1.0, 1.0, 10)],
    "heterogeneous": [(1.1, 0.01, 500), (0.8, 0.02, 100)],
}


def _event(z: float, q: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)


@pytest.mark.parametrize("phases", list(SETTINGS.values()), ids=list(SETTINGS))
def test_accountant_matches_dp_accounting(phases):
    ours = Accountant(DELTA)
    rdp = RdpAccountant(orders=ORDERS)
    pld = PLDAccountant(value_discretization_interval=1e-3)
    for z, q, n in phases:
        ours.step(z, q, n)
        rdp.compose(_event(z, q, n))
        pld.compose(_event(z, q, n))
    eps, eps_rdp, eps_pld = ours.epsilon(), rdp.get_epsilon(DELTA), pld.get_epsilon(DELTA)
    assert 0 < eps < math.inf
    assert eps == pytest.approx(eps_rdp, rel=0.01)
    # RDP is an upper bound; PLD is tighter but not by more than ~30% in these regimes.
    assert eps_pld * 0.99 <= eps <= eps_pld * 1.3


def test_accountant_step_composes_like_single_steps():
    merged, single = Accountant(DELTA), Accountant(DELTA)
    merged.step(1.1, 0.01, 30)
    for _ in range(30):
        single.step(1.1, 0.01)
    assert merged.history == single.history == [(1.1, 0.01, 30)]
    merged.step(0.9, 0.01, 5)
    merged.step(0.9, 0.01, 5)
    assert merged.history == [(1.1, 0.01, 30), (0.9, 0.01, 10)]
    assert merged.epsilon() > single.epsilon()


def test_epsilon_after_leaves_ledger_unchanged():
    acc = Accountant(DELTA)
    assert acc.epsilon() == 0.0
    acc.step(1.1, 0.02, 50)
    eps, hist = acc.epsilon(), acc.history
    after = acc.epsilon_after(1.1, 0.02, 50)
    assert after > eps
    assert acc.epsilon() == eps and acc.history == hist
    acc.step(1.1, 0.02, 50)
    assert acc.epsilon() == pytest.approx(after, rel=1e-12)


def test_state_dict_round_trips():
    acc = Accountant(DELTA)
    acc.step(1.1, 0.01, 200)
    acc.step(0.8, 0.05, 20)
    state = json.loads(json.dumps(acc.state_dict()))
    resumed = Accountant(DELTA)
    resumed.load_state_dict(state)
    assert resumed.history == acc.history
    assert resumed.epsilon() == acc.epsilon()
    resumed.step(1.0, 0.02, 10)
    acc.step(1.0, 0.02, 10)
    assert resumed.epsilon() == acc.epsilon()


def test_zero_noise_is_infinite_epsilon():
    acc = Accountant(DELTA)
    acc.step(1.0, 0.1, 10)
    assert math.isfinite(acc.epsilon())
    assert acc.epsilon_after(0.0, 0.1, 1) == math.inf
    acc.step(0.0, 0.1, 1)
    assert acc.epsilon() == math.inf
    # Sampling nobody costs nothing, even without noise.
    empty = Accountant(DELTA)
    empty.step(0.0, 0.0, 5)
    assert empty.epsilon() == 0.0


# --- calibration ---------------------------------------------------------------------------------


def test_noise_multiplier_for_round_trips():
    q, steps = 0.02, 100
    sigmas = []
    for target in (8.0, 3.0, 1.0):
        z = noise_multiplier_for(target, DELTA, q, steps)
        acc = Accountant(DELTA)
        acc.step(z, q, steps)
        eps = acc.epsilon()
        assert target * 0.98 <= eps <= target, (target, z, eps)
        sigmas.append(z)
    assert sigmas[0] < sigmas[1] < sigmas[2]  # a larger ε needs less noise
    assert noise_multiplier_for(math.inf, DELTA, q, steps) == 0.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="privacy.target_epsilon"):
            noise_multiplier_for(bad, DELTA, q, steps)

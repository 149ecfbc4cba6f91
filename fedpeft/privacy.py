"""Differential-privacy math for federated LoRA: clipping, Gaussian noise, accounting.

Pure functions over ``{name: Tensor}`` updates; no Flower, Ray or I/O.

* **Clipping** bounds one contributor's L2 sensitivity: ``Δ ← Δ · min(1, C / ‖Δ‖₂)`` with the norm
  taken globally over all tensors of the update (Abadi et al., "Deep Learning with Differential
  Privacy", CCS 2016; McMahan et al., "Learning Differentially Private Recurrent Language Models",
  ICLR 2018, for the per-client version used by DP-FedAvg).
* **Gaussian mechanism**: adding ``N(0, (z·C)²)`` to a sum of contributions each clipped to ``C``
  gives noise multiplier ``z``. Subsampling each contributor with probability ``q`` per step
  amplifies privacy (the sampled Gaussian mechanism).
* **Accounting** composes steps in Rényi DP (Mironov, "Rényi Differential Privacy", CSF 2017;
  Mironov, Talwar & Zhang 2019 for the sampled Gaussian mechanism): RDP at order ``α`` adds up over
  steps, and ``ε(δ) = min_α [ RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1) ]``
  (Balle et al. 2020, Thm. 21). This is done by Opacus's ``RDPAccountant``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

# Opacus is imported where the accounting runs (the server, the config checks), not at import: a
# deployed node starts a new ClientApp process for every message, and the client path (clipping and
# noise) needs none of it (it cost about 1.7 s of each cold start on the loaded 2-core machine).

MODES = (
    "none",  # no differential privacy
    "sample",  # example-level DP-SGD in each client: per-example clipping + noise (Opacus)
    "central",  # client-level DP-FedAvg: the server clips each client's update and noises the aggregate
    "local",  # local DP: each client clips its own update and adds noise before sending it
)


def update_norm(delta: Mapping[str, Tensor]) -> float:
    """Global L2 norm ``‖Δ‖₂ = sqrt(Σ_tensors Σ_i Δ_i²)`` over every tensor of the update (in float64)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in delta.values()))


def clip(delta: Mapping[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], float]:
    """Scale the whole update by ``min(1, C / ‖Δ‖₂)`` so that its global norm is at most ``C``.

    Returns ``(clipped, norm_before)``; inputs are not mutated. An update already within the bound
    is returned as exact copies.
    """
    if not max_norm > 0:
        raise ValueError(f"clipping norm must be positive, got {max_norm}")
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(f"update norm is not finite ({norm}); cannot clip")
    if norm <= max_norm:
        return {k: t.detach().clone() for k, t in delta.items()}, norm
    factor = max_norm / norm
    return {k: t.detach() * factor for k, t in delta.items()}, norm


def gaussian_noise(delta: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Return ``Δ + N(0, std²)`` elementwise, in float32; inputs are not mutated.

    Noise is drawn from ``generator`` tensor by tensor in sorted key order, so the same seed gives
    the same noise whatever the dict's insertion order. ``std == 0`` returns float32 copies.
    """
    if not std >= 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be finite and non-negative, got {std}")
    out = {k: t.detach().to(torch.float32, copy=True) for k, t in delta.items()}
    if std == 0:
        return out
    for k in sorted(out):
        t = out[k]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32, device=generator.device)
        t.add_(noise.to(t.device), alpha=std)
    return out


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε(δ) of the composition of ``(noise_multiplier, sample_rate, steps)`` phases."""
    if not any(n > 0 and q > 0 for _, q, n in history):
        return 0.0
    if any(z == 0 and q > 0 and n > 0 for z, q, n in history):
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> tuple[float, float, int]:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier must be finite and non-negative, got {noise_multiplier}")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample rate must be in [0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    return float(noise_multiplier), float(sample_rate), int(steps)


class Accountant:
    """The run's privacy ledger: RDP composition of sampled-Gaussian steps, reported as ε at ``delta``.

    The ledger is Opacus's ``RDPAccountant.history``: a list of ``(noise_multiplier, sample_rate,
    num_steps)`` phases, consecutive identical phases merged (as ``RDPAccountant.step`` does).
    """

    def __init__(self, delta: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"privacy delta must be in (0, 1), got {delta}")
        from opacus.accountants import RDPAccountant

        self.delta = float(delta)
        self._rdp = RDPAccountant()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._rdp.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Compose ``steps`` sampled-Gaussian steps of noise multiplier ``z`` and sampling rate ``q``."""
        z, q, n = _check_step(noise_multiplier, sample_rate, steps)
        if n == 0:
            return
        h = self._rdp.history
        if h and h[-1][0] == z and h[-1][1] == q:
            h[-1] = (z, q, h[-1][2] + n)
        else:
            h.append((z, q, n))

    def epsilon(self) -> float:
        """ε spent so far at ``delta``: 0.0 for an empty ledger, ``inf`` if any step had ``z = 0, q > 0``."""
        return _epsilon(self._rdp.history, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε if ``steps`` more steps of ``(z, q)`` were composed; the ledger is left unchanged."""
        z, q, n = _check_step(noise_multiplier, sample_rate, steps)
        return _epsilon([*self._rdp.history, (z, q, n)], self.delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable ledger: ``{"history": [[z, q, steps], ...]}`` (δ comes from the config)."""
        return {"history": [[z, q, n] for z, q, n in self._rdp.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger with a saved one, so a resumed run keeps composing on top of it."""
        self._rdp.history = [_check_step(*entry) for entry in state["history"]]


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier ``z`` (to Opacus's 0.01 ε tolerance) whose ``steps`` sampled-Gaussian
    steps at rate ``q`` stay within ``(target_epsilon, delta)``; ``inf`` → 0.0 (no noise)."""
    if not target_epsilon > 0:
        raise ValueError(f"privacy.target_epsilon must be positive, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"privacy delta must be in (0, 1), got {delta}")
    _, q, n = _check_step(0.0, sample_rate, steps)
    if math.isinf(target_epsilon) or q == 0 or n == 0:
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # the search's probes at large z hit the largest RDP order
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=n,
                    accountant="rdp",
                    epsilon_tolerance=0.01,
                )
            )
    except ValueError as e:
        raise ValueError(f"privacy.target_epsilon={target_epsilon} is unreachable at delta={delta}, "
                         f"sample_rate={q}, steps={n}: {e}") from e


class BudgetExhausted(RuntimeError):
    """A round whose releases would take the run past its privacy budget; the message says how far."""


@dataclass
class PrivacyPlan:
    """The run's privacy layer on the server: what the ledger composes each round,
    ``steps_per_round`` sampled Gaussian steps of ``noise_multiplier`` at ``sample_rate``
    (sample-level: a client's local DP-SGD steps at its Poisson batch rate; client-level: one
    release at the client sampling rate), the ledger itself (:class:`Accountant`) and the budget no
    round may exceed. The Flower adapter asks it to :meth:`spend` each round before the round's
    messages go out; resume restores the ledger (:meth:`state_dict`, :meth:`load_state_dict`)."""

    mode: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps_per_round: int
    delta: float
    budget: float | None = None  # ε at delta that no round may exceed
    accountant: Accountant = field(init=False)
    stopped: str | None = field(init=False, default=None)  # why the run stopped: the round that would exceed the budget

    def __post_init__(self) -> None:
        self.accountant = Accountant(self.delta)

    def spend(self, server_round: int) -> float:
        """Compose round ``server_round``'s releases into the ledger and return ε after it; a round
        that would exceed the budget (``privacy.target_epsilon``, with 1e-6 relative slack) is not
        composed: :class:`BudgetExhausted`, and :attr:`stopped` says why."""
        after = self.accountant.epsilon_after(self.noise_multiplier, self.sample_rate, self.steps_per_round)
        if self.budget is not None and after > self.budget * (1 + 1e-6):
            spent = self.accountant.epsilon()
            self.stopped = (f"privacy budget: round {server_round} would reach ε={after:.3f} > privacy.target_epsilon={self.budget} "
                            f"(spent ε={spent:.3f} at δ={self.delta})")
            raise BudgetExhausted(self.stopped)
        self.accountant.step(self.noise_multiplier, self.sample_rate, self.steps_per_round)
        return after

    def state_dict(self) -> dict[str, Any]:
        """The ledger (:meth:`Accountant.state_dict`); the plan itself comes from the config."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Compose a saved ledger's phases into this (fresh) one."""
        for z, q, n in (state or {"history": []})["history"]:
            self.accountant.step(z, q, n)

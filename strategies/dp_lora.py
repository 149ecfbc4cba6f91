"""DP-LoRA — Liu, Xiao-Yang et al., "Differentially Private Low-Rank Adaptation of Large Language
Model Using Federated Learning", ACM TMIS 2025.

Every client trains both LoRA factors with DP-SGD (Abadi et al., 2016): each example's gradient
of ``(A, B)`` (and the head) is clipped to norm ``C`` and Gaussian noise ``N(0, σ²C²)`` is added to
the batch's sum before the step (Opacus, in ``clients/train.py``; ``privacy=sample`` is required).
The server averages the noisy factors:

    A ← Σ_k p_k A_k,   B ← Σ_k p_k B_k,   head ← Σ_k p_k head_k,
    p_k = 1/K (``weighting="uniform"``, the default) or n_k / Σ_j n_j.

Choosing it selects sample-level DP (``privacy=sample``) with a target of ε = 8 at the configured δ
when neither ``privacy.target_epsilon`` nor ``privacy.noise_multiplier`` is given
(:attr:`DPLoRA.privacy_default`; any ``privacy`` / ``privacy.*`` override the user types wins).

Post-processing keeps each client's (ε, δ) sample-level guarantee. As with FedIT, the product of
the averages carries cross terms — here of independent noises, ``ξ_B ξ_A`` — which is what
FFA-LoRA avoids by freezing ``A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from strategies.fedavg import FedAvg


@dataclass(frozen=True)
class DPLoRA(FedAvg):
    weighting: str = "uniform"
    name: str = "dp_lora"
    privacy_modes: ClassVar[tuple[str, ...]] = ("sample",)  # every client trains with DP-SGD
    privacy_default: ClassVar[tuple[str, float]] = ("sample", 8.0)  # (privacy group, target ε) when none is given

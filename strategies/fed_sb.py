"""Fed-SB — Singhal, Ponkshe, Vartak, Varshney & Vepakomma, "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning", 2025.

Every client trains only the ``r × r`` core ``R`` of ``ΔW = B₀ R A₀`` (LoRA-SB / LoRA-XS), with
``A₀`` and ``B₀`` frozen and the same on every party (``peft=lora_xs``: from each pre-trained
weight's truncated SVD, so nothing but ``R`` ever travels). The server averages the cores:

    R ← Σ_k p_k R_k,   head ← Σ_k p_k head_k,   p_k = n_k / Σ_j n_j  (or 1/K)
    ⇒ ΔW_glob = B₀ (Σ_k p_k R_k) A₀ = Σ_k p_k B₀ R_k A₀      (exactly: ΔW is linear in R)

so, unlike FedAvg of LoRA factors, the aggregate is the average of the clients' updates, at
``r²`` numbers per module instead of LoRA's ``r·(in + out)``. peft holds ``R`` in coordinates
``v`` (``R = Σ_i v_i P_i``, fixed ``P_i``), linear in ``v``: averaging ``v`` is averaging ``R``.
The strategy is FedAvg over the method's tensors; what makes it Fed-SB is the method it takes
(``peft_methods``), which choosing it selects when the user names none (``peft_default``).

Initialisation differs from the paper's: Fed-SB (after LoRA-SB, Ponkshe et al. 2024) builds
``A₀``, ``B₀`` and the starting ``R`` from the truncated SVD of a first full-gradient step's update
approximation; here ``A₀ = √S_r V_rᵀ``, ``B₀ = U_r √S_r`` come from the SVD of the pre-trained weight
itself (LoRA-XS's initialisation, as peft builds it: :mod:`fedpeft.methods.lora_xs`) and ``R``
starts at zero. The aggregation rule above is the paper's either way; only the subspace differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from strategies.fedavg import FedAvg


@dataclass(frozen=True)
class FedSB(FedAvg):
    name: str = "fed_sb"
    lora_update_only: ClassVar[bool] = False
    peft_methods: ClassVar[tuple[str, ...]] = ("lora_xs",)  # the PEFT methods it takes
    peft_default: ClassVar[str] = "lora_xs"  # selected when no peft=… is given

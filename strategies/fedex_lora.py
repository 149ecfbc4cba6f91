"""FedEx-LoRA — Singhal, Ponkshe & Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", ACL 2025.

FedAvg of the factors, plus the error that averaging makes, folded into the frozen base weights so
that the global model's update is exactly the average of the clients' updates. Every client of a
round starts from the global ``(Ā, B̄)`` on the same base ``W_{t-1}`` (one rank and scaling ``s``):

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k,   head ← Σ_k p_k head_k,     p_k = n_k / Σ_j n_j (or 1/K)
    residual  R_t = Σ_k p_k s B_k A_k − s B̄ Ā                       (merged: W_t = W_{t-1} + R_t)
    ⇒ W_t + s B̄ Ā = W_{t-1} + Σ_k p_k s B_k A_k                      (exactly)

The residual travels as a base merge (``GlobalModel.merges``, FLoRA's mechanism), stacked at
scaling 1. The literal stack ``B = [B_1 | … | B_K | B̄]``, ``A = [p_1 s A_1; …; p_K s A_K; −s Ā]``
(:func:`fedpeft.lora.stack` with weights ``p_1 … p_K, −1``) has ``(K + 1)·r`` components; but
``R_t = Σ_k p_k s (B_k − B̄)(A_k − Ā)`` (a weighted covariance), and since ``Σ_k p_k (B_k − B̄) = 0``
the ``A`` factor may be shifted by ``A_K`` instead of ``Ā``, which removes client K's block:

    B_res = [B_1 − B̄ | … | B_{K−1} − B̄],   A_res = [p_1 s (A_1 − A_K); …; p_{K−1} s (A_{K−1} − A_K)]

— ``(K − 1)·r`` components (the residual's rank is at most that; one zero component for one client), equal to the
literal stack in exact arithmetic and to the rounding of the stored ``B̄, Ā`` in floating point
(differences formed in float64, rounded once to the factors' dtype). The server then ships each
merge in its cheapest exact form (:func:`fedpeft.merges.cheapest`: the stack itself while
``(K−1)·r·(out + in) ≤ out·in``, else dense), so a round costs the clients at most one dense
``out × in`` matrix per module; the merges accumulate, one per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedpeft.lora import LoraFactors, average_factors
from strategies.base import ClientPlan, ClientSpec, ClientUpdate, GlobalModel, Payload
from strategies.fedavg import FedAvg, client_weights
from strategies.ffa_lora import HETERO_PRIVACY_MODES, average_head, module_factors


def residual(factors: list[LoraFactors], p: list[float]) -> tuple[LoraFactors, LoraFactors]:
    """``(average, residual)`` of one module: the FedAvg factors ``(Ā, B̄, s)`` and
    ``Σ_k p_k s B_k A_k − s B̄ Ā`` stacked at rank ``(K − 1)·r``, scaling 1 (the module docstring)."""
    avg = average_factors(factors, p)
    s, last = avg.scaling, factors[-1].A.double()
    if len(factors) == 1:  # nothing to correct: one zero component (a merge of rank 0 would be an empty array)
        return avg, LoraFactors(torch.zeros_like(avg.A[:1]), torch.zeros_like(avg.B[:, :1]), 1.0)
    B = torch.cat([f.B.double() - avg.B.double() for f in factors[:-1]], dim=1)
    A = torch.cat([pk * s * (f.A.double() - last) for f, pk in zip(factors[:-1], p)], dim=0)
    return avg, LoraFactors(A.to(avg.A.dtype), B.to(avg.B.dtype), 1.0)


@dataclass(frozen=True)
class FedExLoRA(FedAvg):
    """FedAvg's rounds and ``factor_avg_error`` (here: the residual folded into the base, relative to
    the average update); the payload carries the base version, the aggregate the residual merge."""

    name: str = "fedex_lora"
    # Central DP would noise the averaged factors but not the residual merged into the base.
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES
    lora_update_only: ClassVar[bool] = True
    no_secure_aggregation: ClassVar[str | None] = "its residual Σ p_k s B_k A_k needs each client's product of factors"
    no_server_optimizer: ClassVar[str] = ("it folds each round's residual (the mean update minus the product of mean factors) into the base: "
                                          "the change of its factors is not the update")
    effective_updates: ClassVar[str] = "it folds the residual of the exact mean of s_k·B_k·A_k into the base: a factor-wise median has no such mean"

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        return Payload(adapter=model.adapter, head=model.head, plan=ClientPlan(proximal=self.proximal(), scaffold=self.scaffold), base_version=model.version)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        adapter, merge = {}, {}
        for name in model.adapter:
            adapter[name], merge[name] = residual(module_factors(updates, name), p)
        return GlobalModel(adapter=adapter, head=average_head(model, updates, p), merges=model.merges + (merge,))

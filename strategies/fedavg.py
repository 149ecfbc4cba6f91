"""FedAvg of LoRA factors — FedIT (Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP 2024).

Every client receives the global ``(A, B)`` and the head; the server averages each separately:

    A ← Σ_k p_k A_k,   B ← Σ_k p_k B_k,   head ← Σ_k p_k head_k,
    p_k = n_k / Σ_j n_j  (or 1/K with ``weighting="uniform"``).

With a PEFT method other than LoRA (``peft=ia3``, ``prompt_tuning``, …; ``fedpeft/methods``) the
adapter is empty and every trained tensor is averaged like the head: ``T ← Σ_k p_k T_k``.

This is *not* the average of the clients' updates: ``(Σ p B)(Σ p A) = Σ p B A`` only up to the
cross terms ``p_j p_k B_j A_k`` (j ≠ k). It needs every client at one rank and scaling; the
heterogeneous-rank methods aggregate in effective-update units instead. :func:`factor_average_error`
measures the gap each round (logged as ``factor_avg_error``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedpeft.lora import LoraFactors, average_factors, average_tensors, normalized_weights
from strategies.base import ClientPlan, ClientSpec, ClientUpdate, GlobalModel, Payload, Strategy


def client_weights(updates: list[ClientUpdate], weighting: str) -> list[float]:
    if weighting == "num_examples":
        return normalized_weights([u.num_examples for u in updates])
    if weighting == "uniform":
        return normalized_weights([1.0] * len(updates))
    raise ValueError(f"strategy.weighting: unknown value {weighting!r}; expected num_examples or uniform")


def factor_average_error(modules: list[list[LoraFactors]], p: list[float]) -> float:
    """FedAvg-of-factors' relative error over all modules (one list of client factors per module):

        ‖(Σ_k p_k B_k)(Σ_k p_k A_k) − Σ_k p_k B_k A_k‖_F / ‖Σ_k p_k B_k A_k‖_F,

    norms squared and summed over modules, each term at its scaling. Computed in factored form,
    never forming ``out × in`` matrices: a difference ``U V`` with ``U = [p_1 B_1 … p_K B_K, −B̄]``,
    ``V = [A_1; …; A_K; Ā]`` has ``‖U V‖²_F = Σ (UᵀU) ⊙ (V Vᵀ)``. 0.0 when every update is zero.
    """
    err = ref = 0.0
    for factors in modules:
        s = factors[0].scaling
        A = torch.cat([f.A.double() for f in factors])
        B = torch.cat([w * f.B.double() for f, w in zip(factors, p)], dim=1)
        A_bar = sum(w * f.A.double() for f, w in zip(factors, p))
        B_bar = sum(w * f.B.double() for f, w in zip(factors, p))
        U, V = torch.cat([B, -B_bar], dim=1), torch.cat([A, A_bar])
        err += s * s * float(((U.T @ U) * (V @ V.T)).sum().clamp_min(0))
        ref += s * s * float(((B.T @ B) * (A @ A.T)).sum())
    return math.sqrt(err / ref) if ref > 0 else 0.0


@dataclass(frozen=True)
class FedAvg(Strategy):
    # Each client's weight in the average: num_examples (n_k / Σ n_j) | uniform (1/K).
    weighting: str = "num_examples"
    # FedProx's μ: clients add μ/2·‖θ − θ_global‖² over the tensors they train (0: plain local training).
    prox_mu: float = 0.0
    # SCAFFOLD: control variates c, c_i correct each client's gradient by c − c_i (option II; false: off).
    scaffold: bool = False
    name: str = "fedavg"
    heterogeneous_ranks: ClassVar[bool] = False  # A and B are averaged separately: one rank and scaling
    lora_update_only: ClassVar[bool] = False  # averages any PEFT method's tensors elementwise
    no_secure_aggregation: ClassVar[str | None] = None  # a weighted mean of each tensor: SecAgg+ reveals just that

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        return Payload(adapter=model.adapter, head=model.head, plan=ClientPlan(proximal=self.proximal(), scaffold=self.scaffold))

    def round_metrics(self, model: GlobalModel, updates: list[ClientUpdate]) -> dict[str, float]:
        """``factor_avg_error``: :func:`factor_average_error` of this round's updates."""
        if not updates or not model.adapter:  # no LoRA factors (IA3, prompt tuning, ...): no cross terms
            return {}
        p = client_weights(updates, self.weighting)
        return {"factor_avg_error": factor_average_error([[u.adapter[n] for u in updates] for n in model.adapter], p)}

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        adapter = {
            name: average_factors([u.adapter[name] for u in updates], p) for name in model.adapter
        }
        head = {name: average_tensors([u.head[name] for u in updates], p) for name in model.head}
        return GlobalModel(adapter=adapter, head=head)

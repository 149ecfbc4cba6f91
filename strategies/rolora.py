"""RoLoRA — Chen, Guo, Ju, Dalal, Zhu & Khisti, "Robust Federated Finetuning of LLMs via Alternating
Optimization of LoRA", NeurIPS 2025.

Alternating optimisation: each round every client trains one factor while the other stays frozen
at the global one, and the server averages the trained factor only. The frozen factor is identical
on every client, so the average of the factors is the average of the updates (no FedIT cross terms):

    rounds training A (B frozen at B_g):  A ← Σ_k p_k A_k   ⇒ s B_g A = Σ_k p_k s B_g A_k   (exactly)
    rounds training B (A frozen at A_g):  B ← Σ_k p_k B_k   ⇒ s B A_g = Σ_k p_k s B_k A_g   (exactly)
    head ← Σ_k p_k head_k,   p_k = n_k / Σ_j n_j (or 1/K)

``first`` is the factor of the odd rounds (1, 3, …); the other factor trains in the even rounds.
The default is ``"B"``: from peft's init (``B = 0``) a round that trains A alone cannot move it,
since ``∂L/∂A = s Bᵀ (∂L/∂h) xᵀ = 0``; ``first="A"`` suits a start with a non-zero B.

The round is counted in the state itself (``GlobalModel.aggregations``, one per aggregated round,
saved and resumed with the model), so a round that is not applied (too few replies) is trained
again on the same factor, and a resumed run keeps alternating. Clients' plans train
only A or only B; the frozen factor is not sent back (the server fills it in from what it sent), so the
uplink is half of FedAvg's. An update whose frozen factor differs from the global one is rejected
(``ValueError``). One rank and scaling for every client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedpeft.lora import LoraFactors, average_tensors
from fedpeft.plan import ClientPlan
from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Payload, Strategy
from strategies.fedavg import client_weights
from strategies.ffa_lora import HETERO_PRIVACY_MODES, average_head, module_factors

FACTORS = ("A", "B")


@dataclass(frozen=True)
class RoLoRA(Strategy):
    weighting: str = "num_examples"
    # The factor trained (and sent) in odd rounds, A or B; the other in even rounds.
    first: str = "B"
    # FedProx's μ: clients add μ/2·‖θ − θ_global‖² over the factor and head they train (0: off).
    prox_mu: float = 0.0
    # SCAFFOLD's control variates on the factor trained this round and the head (false: off).
    scaffold: bool = False
    name: str = "rolora"
    heterogeneous_ranks: ClassVar[bool] = False
    # Central DP (Flower's wrapper) clips and noises whole replies, which here lack the frozen factor.
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES
    engines: ClassVar[tuple[str, ...]] = ("per_client",)  # the cohort engine does not batch freeze_B
    lora_update_only: ClassVar[bool] = True
    trained_share: ClassVar[dict[str, float]] = {"lora_A": 0.5, "lora_B": 0.5}  # one factor a round
    no_secure_aggregation: ClassVar[str | None] = None  # the round's factor ← Σ p_k (factor)_k: a weighted mean

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.first not in FACTORS:
            raise ValueError(f"strategy.first: unknown value {self.first!r}; expected one of {', '.join(FACTORS)}")

    def trained(self, model: GlobalModel) -> str:
        """The factor the next round trains: ``first`` in odd rounds, the other in even ones."""
        other = "A" if self.first == "B" else "B"
        return self.first if model.aggregations % 2 == 0 else other

    def init(self, model: GlobalModel) -> GlobalModel:
        return GlobalModel(adapter=model.adapter, head=model.head, merges=model.merges)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        trained = self.trained(model)
        plan = ClientPlan(train_A=trained == "A", train_B=trained == "B", proximal=self.proximal(), scaffold=self.scaffold)
        return Payload(adapter=model.adapter, head=model.head, plan=plan, base_version=model.version)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        train = self.trained(model)
        adapter = {}
        for name, g in model.adapter.items():
            factors = module_factors(updates, name)
            for u, f in zip(updates, factors):
                frozen = f.B if train == "A" else f.A
                want = g.B if train == "A" else g.A
                if f.A.shape != g.A.shape or f.B.shape != g.B.shape or f.scaling != g.scaling:
                    raise ValueError(f"client {u.client_id}: module {name!r} has A {tuple(f.A.shape)}, B {tuple(f.B.shape)}, "
                                     f"scaling {f.scaling}; the global adapter's are {tuple(g.A.shape)}, {tuple(g.B.shape)}, {g.scaling}")
                if not torch.equal(frozen.to(dtype=want.dtype, device=want.device), want):
                    raise ValueError(f"client {u.client_id}: LoRA {'B' if train == 'A' else 'A'} of module {name!r} differs from the "
                                     f"global one; RoLoRA trains only {train} this round")
            avg = average_tensors([f.A if train == "A" else f.B for f in factors], p).to(dtype=(g.A if train == "A" else g.B).dtype)
            adapter[name] = LoraFactors(avg, g.B, g.scaling) if train == "A" else LoraFactors(g.A, avg, g.scaling)
        return GlobalModel(adapter=adapter, head=average_head(model, updates, p), merges=model.merges, aggregations=model.aggregations + 1)

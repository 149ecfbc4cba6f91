"""FedSA-LoRA — Guo, Zeng, Wang, Fan, Wang & Qu, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025.

Only ``A`` is shared: ``A`` learns what all clients have in common, ``B`` what is client-specific.
Each client keeps its own ``B_k`` across rounds; the server never sends or receives a ``B``:

    client k, round t:  start from (Ā_t, B_k^(t−1)) with B_k^(0) = 0 (peft's init), train both
    server:             Ā_{t+1} = Σ_k p_k A_k,     head ← Σ_k p_k head_k,     p_k = n_k / Σ_j n_j (or 1/K)
    client k's model:   W_0 + s · B_k Ā  (+ the shared head)

The classification head is shared and averaged like FedAvg's. This differs from the authors'
code, which keeps the head local with ``B`` (only ``A`` is shared); sharing it here keeps one head
across methods and lets every client start from the same classifier. ``model.adapter``'s ``B`` is a
zero placeholder: the payload's plan keeps B as the client's own (``keep={"B"}``): off the wire both
ways (like FFA-LoRA's frozen A), the client uses its own stored ``B_k``. A round's aggregate never
reads a ``B_k``. One rank and scaling for every client (``Ā`` is a plain average).

The global ``Ā`` alone is not a model, so ``personalized``: every client evaluates its own model
on a held-out 20% of its partition, and the run's ``accuracy`` is the mean over clients
(``fedpeft.server.PersonalEvaluation``).
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


@dataclass(frozen=True)
class FedSALoRA(Strategy):
    weighting: str = "num_examples"
    # FedProx's μ: clients add μ/2·‖θ − θ_global‖² over the shared A and head (B is their own; 0: off).
    prox_mu: float = 0.0
    # SCAFFOLD's control variates on the shared A and head (B is each client's own; false: off).
    scaffold: bool = False
    name: str = "fedsa_lora"
    heterogeneous_ranks: ClassVar[bool] = False  # Ā is a plain average of the A_k
    # central DP clips and noises the whole reply against one global model; B_k is no part of either
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES
    lora_update_only: ClassVar[bool] = True  # needs a PEFT method whose update is s·B·A
    personalized: ClassVar[bool] = True  # clients keep state; evaluate each client's own model
    no_secure_aggregation: ClassVar[str | None] = None  # A ← Σ p_k A_k: a weighted mean; B never leaves the client

    def init(self, model: GlobalModel) -> GlobalModel:
        """A ← the server's peft init (every client starts from it), B ← 0 (a placeholder: never sent)."""
        adapter = {m: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling) for m, f in model.adapter.items()}
        return GlobalModel(adapter=adapter, head=model.head, merges=model.merges)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        plan = ClientPlan(keep=frozenset({"B"}), proximal=self.proximal(), scaffold=self.scaffold)
        return Payload(adapter=model.adapter, head=model.head, plan=plan, base_version=model.version)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        adapter = {}
        for name, g in model.adapter.items():
            factors = module_factors(updates, name)
            for u, f in zip(updates, factors):
                if f.A.shape != g.A.shape or f.scaling != g.scaling:
                    raise ValueError(f"client {u.client_id}: LoRA A of module {name!r} is {tuple(f.A.shape)} at scaling {f.scaling}, "
                                     f"expected {tuple(g.A.shape)} at {g.scaling} (FedSA-LoRA needs one rank and scaling)")
            A = average_tensors([f.A.to(dtype=g.A.dtype, device=g.A.device) for f in factors], p)
            adapter[name] = LoraFactors(A, g.B, g.scaling)
        return GlobalModel(adapter=adapter, head=average_head(model, updates, p), merges=model.merges)

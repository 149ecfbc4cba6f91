"""FFA-LoRA — Sun, Qin, Li & Ding, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024 — with heterogeneous client ranks.

``A`` is frozen at a random init shared by every client and never trained; only ``B`` is trained
and averaged. With ``A`` fixed the average of ``B`` *is* the average of the updates, so there are
no FedIT cross terms (and, under DP, no noise product ``ξ_B ξ_A``):

    A_shared = seeded_lora_A(module, r_max, in, seed)       (peft's kaiming-uniform init, seeded)
    client k:  A_k = A_shared[:r_k],  B_k = B_glob[:, :r_k] / s_k,  scaling s_k = α_k/r_k (α_k/√r_k with rsLoRA: ClientSpec.scaling)
    server:    B_glob = Σ_k p_k s_k pad(B_k, r_max),         p_k = n_k / Σ_j n_j (or 1/K)
    ⇒ ΔW_glob = B_glob A_shared = Σ_k p_k s_k B_k A_k        (exactly)

The global adapter is kept in effective-update units (scaling 1.0) because the clients' scalings
differ. ``seeded_lora_A`` draws rows in order, so ``A_shared[:r_k]`` is what the client regenerates
itself from the plan's ``A_seed`` at its own rank: the codec need not send ``A`` (half the bytes).
An update whose ``A`` is not bit-identical to the shared one is rejected (``ValueError``).

This module also holds two small helpers the other heterogeneous-rank strategies share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedpeft.lora import LoraFactors, at_scaling, average_tensors, seeded_lora_A, truncate
from fedpeft.plan import ClientPlan
from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Payload, Strategy
from strategies.fedavg import client_weights

HETERO_PRIVACY_MODES = ("none", "sample", "local")  # central DP needs one global model that every client receives


def module_factors(updates: list[ClientUpdate], name: str) -> list[LoraFactors]:
    """Every update's factors for module ``name``; a missing module is a ``ValueError`` naming the client."""
    out = []
    for u in updates:
        try:
            out.append(u.adapter[name])
        except KeyError:
            raise ValueError(f"client {u.client_id}: update has no LoRA factors for module {name!r}") from None
    return out


def average_head(model: GlobalModel, updates: list[ClientUpdate], p: list[float]) -> dict[str, Tensor]:
    """``head ← Σ_k p_k head_k`` over the head tensors the global model has (FedAvg's rule)."""
    head = {}
    for name in model.head:
        missing = [u.client_id for u in updates if name not in u.head]
        if missing:
            raise ValueError(f"clients {missing}: update has no head tensor {name!r}")
        head[name] = average_tensors([u.head[name] for u in updates], p)
    return head


@dataclass(frozen=True)
class FFALoRA(Strategy):
    """``r_max``: the shared A's rank (default: the rank of the adapter :meth:`init` receives);
    every client's rank must be ``≤ r_max``. ``seed``: the shared A's seed (the plan's ``A_seed``).
    With an empty global adapter the payload is a fresh LoRA (``init_seed = seed · 1_000_003 + client_id``)
    whose A the client takes from ``seeded_lora_A`` all the same."""

    weighting: str = "num_examples"
    seed: int = 0
    # The shared frozen A's rank, at least every client's (null: the global adapter's rank).
    r_max: int | None = None
    # FedProx's μ: clients add μ/2·‖θ − θ_global‖² over B and the head (A is frozen; 0: off).
    prox_mu: float = 0.0
    # SCAFFOLD's control variates on B and the head (A is frozen; one rank for all clients; false: off).
    scaffold: bool = False
    name: str = "ffa_lora"
    heterogeneous_ranks: ClassVar[bool] = True
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES
    lora_update_only: ClassVar[bool] = True  # aggregates ΔW = s·B·A: peft=lora, rslora or dora
    trained_share: ClassVar[dict[str, float]] = {"lora_A": 0.0}  # A stays at its shared init
    no_secure_aggregation: ClassVar[str | None] = None  # B ← Σ p_k s_k B_k: a weighted mean (at one rank)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r_max is not None and self.r_max < 1:
            raise ValueError(f"strategy.r_max: must be at least 1 (or null), got {self.r_max}")

    def init(self, model: GlobalModel) -> GlobalModel:
        """Every module's A ← the shared seeded A at ``r_max``, B ← 0, scaling 1.0 (effective units)."""
        adapter = {}
        for name, f in model.adapter.items():
            r = self.r_max if self.r_max is not None else f.rank
            A = seeded_lora_A(name, r, f.A.shape[1], self.seed).to(dtype=f.A.dtype, device=f.A.device)
            adapter[name] = LoraFactors(A, f.B.new_zeros(f.B.shape[0], r), 1.0)
        return GlobalModel(adapter=adapter, head=model.head, merges=model.merges)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        s = client.scaling
        adapter = {}
        for name, f in model.adapter.items():
            if client.rank > f.rank:
                raise ValueError(
                    f"client {client.client_id}: rank {client.rank} exceeds FFA-LoRA's shared rank {f.rank} "
                    f"for module {name!r}; set strategy.r_max to at least the largest client rank"
                )
            adapter[name] = at_scaling(truncate(f, client.rank), s)
        # nothing to start from: a fresh LoRA whose A is the seeded one anyway
        init_seed = None if adapter else self.seed * 1_000_003 + client.client_id
        plan = ClientPlan(train_A=False, A_seed=self.seed, init_seed=init_seed, proximal=self.proximal(), scaffold=self.scaffold)
        return Payload(adapter=adapter, head=model.head, plan=plan, base_version=model.version)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        adapter = {}
        for name, g in model.adapter.items():
            factors = module_factors(updates, name)
            for u, f in zip(updates, factors):
                if f.rank > g.rank:
                    raise ValueError(f"client {u.client_id}: rank {f.rank} exceeds the shared rank {g.rank} of {name!r}")
                shared = g.A[: f.rank].to(dtype=f.A.dtype, device=f.A.device)
                if f.A.shape != shared.shape or not torch.equal(f.A, shared):
                    raise ValueError(
                        f"client {u.client_id}: LoRA A of module {name!r} differs from FFA-LoRA's shared frozen A; "
                        "A must never change (train with freeze_A)"
                    )
            B = torch.zeros_like(g.B)
            for f, pk in zip(factors, p):  # B[:, :r_k] += p_k s_k B_k  ==  Σ p_k s_k pad(B_k, r_max)
                B[:, : f.rank].add_(f.B.to(dtype=B.dtype, device=B.device), alpha=pk * f.scaling)
            adapter[name] = LoraFactors(g.A, B, 1.0)
        return GlobalModel(adapter=adapter, head=average_head(model, updates, p), merges=model.merges)

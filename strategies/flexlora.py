"""FlexLoRA — Bai, Chen, Qian, Yao & Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024.

The server averages the clients' full updates and hands each client the best approximation of the
average that fits its rank:

    ΔW_glob = Σ_k p_k s_k B_k A_k                       (stacked factors, rank Σ r_k; not accumulated:
                                                          clients warm-start from it and return their
                                                          whole adapter)
    ΔW_glob = U diag(S) Vᵀ                               (thin SVD from the factors: QR + small SVD,
                                                          :func:`fedpeft.lora.svd_factors`)
    client k:  B_k = U_{r_k} diag(S_{r_k}) / s_k,  A_k = V_{r_k}ᵀ,  scaling s_k = scaling_for(r_k, α_k)
    ⇒ s_k B_k A_k is the best rank-r_k approximation of ΔW_glob (Eckart–Young)

The ``out × in`` matrix is never formed. Since every client's truncation shares one SVD, ``aggregate``
computes it once per module and stores the global adapter in SVD order
(:class:`fedpeft.lora.SvdFactors`: ``B = U diag(S)``, ``A = Vᵀ``, scaling 1, rank
``min(Σ r_k, out, in)``; ``B A`` equals the stacked ``Σ_k p_k s_k B_k A_k`` to float rounding), so
``payload`` is a slice — K times cheaper than one SVD per client. A global adapter in any other form
(e.g. reloaded as plain :class:`~fedpeft.lora.LoraFactors`) is decomposed in ``payload``
(:func:`fedpeft.lora.best_rank`), with the same result.

When a client's rank exceeds the global rank (few, small clients last round), its factors are the
exact global update plus extra components with ``B = 0`` and ``A`` rows from
:func:`fedpeft.lora.seeded_lora_A` (seed ``init_seed``), like a fresh LoRA, so that they can train
(all-zero components get no gradient). Before the first aggregation the adapter is empty and every
client starts a fresh LoRA with ``instructions["init_seed"] = seed · 1_000_003 + client_id``. The head
is averaged with ``p_k`` like FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedpeft.lora import LoraFactors, SvdFactors, best_rank, scaling_for, seeded_lora_A, stack, svd_form
from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Payload
from strategies.fedavg import WEIGHTINGS, check_weighting, client_weights
from strategies.ffa_lora import HETERO_PRIVACY_MODES, average_head, module_factors


def client_factors(g: LoraFactors, rank: int, scaling: float) -> LoraFactors:
    """The best rank-``rank`` approximation of ``g``'s ``ΔW`` at ``scaling`` (zero-padded past ``g``'s
    rank): a slice when ``g`` is already in SVD order, else a factored SVD."""
    if not isinstance(g, SvdFactors):
        return best_rank(g, rank, scaling)
    k = min(rank, g.rank)
    A = g.A[:k]
    B = g.B[:, :k] * g.scaling / scaling
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return SvdFactors(A.clone(), B.contiguous(), scaling)


@dataclass(frozen=True)
class FlexLoRA:
    weighting: str = "num_examples"
    seed: int = 0
    name: str = "flexlora"
    weightings: ClassVar[tuple[str, ...]] = WEIGHTINGS
    heterogeneous_ranks: ClassVar[bool] = True
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES

    def __post_init__(self) -> None:
        check_weighting(self)

    def reply_ranks(self, rank: int) -> tuple[int, ...]:
        return (rank,)

    def init_seed(self, client_id: int) -> int:
        return self.seed * 1_000_003 + client_id

    def init(self, model: GlobalModel) -> GlobalModel:
        """No global update yet: the first round's clients start fresh LoRAs. Keeps the head."""
        return GlobalModel(adapter={}, head=model.head, merges=model.merges)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        seed = self.init_seed(client.client_id)
        if not model.adapter:
            return Payload(adapter={}, head=model.head, instructions={"init_seed": seed}, base_version=model.version)
        s = scaling_for(client.rank, client.alpha)
        adapter = {}
        for name, g in model.adapter.items():
            f = client_factors(g, client.rank, s)
            k = min(client.rank, g.rank, *g.shape)
            if k < client.rank:  # revive the zero-padded components: fresh A rows, B stays 0 (ΔW unchanged)
                fresh = seeded_lora_A(name, client.rank, f.A.shape[1], seed)[k:].to(dtype=f.A.dtype, device=f.A.device)
                f = LoraFactors(torch.cat([f.A[:k], fresh], dim=0), f.B, s)
            adapter[name] = LoraFactors(f.A, f.B, s)  # clients get plain factors; SvdFactors is server state
        return Payload(adapter=adapter, head=model.head, instructions={}, base_version=model.version)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        names = list(model.adapter) or list(updates[0].adapter)
        adapter = {name: svd_form(stack(module_factors(updates, name), p)) for name in names}
        return GlobalModel(adapter=adapter, head=average_head(model, updates, p), merges=model.merges)

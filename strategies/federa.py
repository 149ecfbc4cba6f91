"""FeDeRA — Yan et al., "FeDeRA: Efficient Fine-tuning of Language Models in Federated Learning
Leveraging Weight Decomposition", arXiv 2024.

FedAvg of the LoRA factors (FedIT) from a different start: every module's A and B are initialised
from the truncated SVD of its frozen pre-trained weight ``W = U S Vᵀ`` (top-r singular triplets),
split evenly between the factors:

    B₀ = U_r √S_r / √s,   A₀ = √S_r V_rᵀ / √s        ⇒  s B₀ A₀ = U_r S_r V_rᵀ  (best rank-r approximation of W)

So that the model computes the same function at round 0, the base becomes the residual
``W − s B₀ A₀`` (as in PiSSA): the init ships as base merge 1, ``−s B₀ A₀`` (stacked factors
``B = B₀``, ``A = −s A₀``, scaling 1), through the merge mechanism every party applies (server
evaluation and checkpoints via ``global_adapter``, clients via ``sync_base``, resume via the state).
Then plain FedAvg:

    A ← Σ_k p_k A_k,   B ← Σ_k p_k B_k,   head ← Σ_k p_k head_k,    p_k = n_k / Σ_j n_j (or 1/K)

with the FedIT cross terms (logged as ``factor_avg_error``). One rank and scaling for every client.
:meth:`FeDeRA.init` needs the pre-trained weights (``needs_base_weights``): a full SVD of each
``out × in`` weight, in float64, once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from fedpeft.lora import LoraFactors
from strategies.base import ClientPlan, ClientSpec, GlobalModel, Payload
from strategies.fedavg import FedAvg


def svd_init(W: Tensor, rank: int, scaling: float) -> LoraFactors:
    """``(A₀, B₀, s)`` with ``s B₀ A₀ = U_r S_r V_rᵀ``, the rank-``rank`` truncated SVD of ``W``
    (computed in float64; returned in ``W``'s dtype)."""
    if not 0 < rank <= min(W.shape):
        raise ValueError(f"FeDeRA needs 0 < rank <= min(out, in) = {min(W.shape)}, got rank {rank}")
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    root = S[:rank].sqrt() / math.sqrt(scaling)
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    return LoraFactors(A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous(), scaling)


@dataclass(frozen=True)
class FeDeRA(FedAvg):
    name: str = "federa"
    needs_base_weights: ClassVar[bool] = True
    lora_update_only: ClassVar[bool] = True

    def init(self, model: GlobalModel, base_weights: Mapping[str, Tensor] | None = None) -> GlobalModel:
        """Every module's factors ← :func:`svd_init` of its pre-trained weight, at the adapter's rank
        and scaling; one merge ``−s B₀ A₀`` more (the residual base); the head is kept."""
        if base_weights is None:
            raise ValueError("strategy=federa initialises from the pre-trained weights: init needs base_weights")
        adapter, merge = {}, {}
        for name, f in model.adapter.items():
            if name not in base_weights:
                raise ValueError(f"strategy=federa: no pre-trained weight for module {name!r}")
            W = base_weights[name]
            if tuple(W.shape) != f.shape:
                raise ValueError(f"strategy=federa: module {name!r}: weight {tuple(W.shape)} does not fit the adapter's {f.shape}")
            g = svd_init(W.to(dtype=f.A.dtype, device=f.A.device), f.rank, f.scaling)
            adapter[name] = g
            merge[name] = LoraFactors(-g.scaling * g.A, g.B.clone(), 1.0)
        return GlobalModel(adapter=adapter, head=model.head, merges=model.merges + (merge,))

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        return Payload(adapter=model.adapter, head=model.head, plan=ClientPlan(proximal=self.proximal(), scaffold=self.scaffold), base_version=model.version)

    def aggregate(self, model: GlobalModel, updates) -> GlobalModel:
        out = super().aggregate(model, updates)
        return out if out is model else GlobalModel(adapter=out.adapter, head=out.head, merges=model.merges)

"""FlexLoRA — Bai, Chen, Qian, Yao & Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024.

The server averages the clients' full updates and hands each client the best approximation of the
average that fits its rank:

    ΔW_glob = Σ_k p_k s_k B_k A_k                       (stacked factors, rank Σ r_k; not accumulated:
                                                          clients warm-start from it and return their
                                                          whole adapter)
    ΔW_glob = U diag(S) Vᵀ                               (thin SVD from the factors: QR + small SVD,
                                                          :func:`fedpeft.lora.svd_factors`)
    client k:  B_k = U_{r_k} diag(S_{r_k}) / s_k,  A_k = V_{r_k}ᵀ,  scaling s_k = α_k/r_k (α_k/√r_k with rsLoRA: ClientSpec.scaling)
    ⇒ s_k B_k A_k is the best rank-r_k approximation of ΔW_glob (Eckart–Young)

The ``out × in`` matrix is never formed. Since every client's truncation shares one SVD, ``aggregate``
computes it once per module, so ``payload`` is a slice — K times cheaper than one SVD per client:

* ``svd="auto"`` (default), many clients: clients never need more than the largest client rank
  ``k = max(r_max, max_k r_k)``, so only those components are computed, by a randomised subspace
  iteration from the factors in their dtype (:func:`fedpeft.lora.leading_svd`: Halko, Martinsson &
  Tropp 2011) and one float64 Rayleigh–Ritz step whose residual certifies each client's
  ``‖ΔW − s_k B_k A_k‖_F`` within ``svd_tol · ‖ΔW‖_F`` of Eckart–Young's optimum (a Schur-complement
  bound on the Ritz values; else the exact SVD below). The global adapter is then
  :class:`fedpeft.lora.FactorsWithLeading`: the stacked factors themselves (rank ``Σ r_k``, scaling 1:
  exactly ``Σ_k p_k s_k B_k A_k``, what the server evaluates and checkpoints) plus the rank-``k``
  truncated SVD that payloads slice. Seeded by ``seed``, the module and the round's clients, so
  runs are reproducible.
* otherwise (few clients, where the sketch is not cheaper; ``Σ r_k > min(out, in)``; no certificate;
  or ``svd="exact"``): the exact thin SVD (QR of the stacks + SVD of the small core,
  :func:`fedpeft.lora.svd_form`), stored in SVD order (:class:`fedpeft.lora.SvdFactors`:
  ``B = U diag(S)``, ``A = Vᵀ``, scaling 1, rank ``min(Σ r_k, out, in)``; ``B A`` equals the stacked
  factors to float rounding).

A global adapter in any other form (e.g. reloaded as plain :class:`~fedpeft.lora.LoraFactors` from a
checkpoint), or a client whose rank exceeds the ``k`` computed, is decomposed in ``payload`` the
same way (:func:`fedpeft.lora.leading_svd`, else exact), with the same guarantee.

When a client's rank exceeds the global rank (few, small clients last round), its factors are the
exact global update plus extra components with ``B = 0`` and ``A`` rows from
:func:`fedpeft.lora.seeded_lora_A` (seed ``init_seed``), like a fresh LoRA, so that they can train
(all-zero components get no gradient). Before the first aggregation the adapter is empty and every
client starts a fresh LoRA with the plan's ``init_seed = seed · 1_000_003 + client_id``. The head
is averaged with ``p_k`` like FedAvg.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedpeft.lora import (
    FactorsWithLeading,
    LoraFactors,
    SvdFactors,
    leading_svd,
    seeded_lora_A,
    stack,
    svd_form,
)
from fedpeft.plan import ClientPlan
from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Payload, Strategy
from strategies.fedavg import client_weights
from strategies.ffa_lora import HETERO_PRIVACY_MODES, average_head, module_factors

SVD_MODES = ("auto", "exact")


def svd_seed(seed: int, name: str, clients: tuple[int, ...] = ()) -> int:
    """The sketch's seed for module ``name``: the strategy seed, the module and (in ``aggregate``) the
    round's client ids — reproducible, resumable (nothing but the inputs), different across rounds
    with different clients and across modules."""
    return zlib.crc32(f"{name}|{','.join(map(str, clients))}".encode("utf-8"), int(seed) % 2**32)


def client_factors(g: LoraFactors, rank: int, scaling: float, *, seed: int = 0, tol: float = 1e-5) -> LoraFactors:
    """The best rank-``rank`` approximation of ``g``'s ``ΔW`` at ``scaling`` (zero-padded past ``g``'s
    rank): a slice when ``g`` is in SVD order or carries enough leading components, else computed
    (:func:`fedpeft.lora.leading_svd` with ``seed`` and ``tol``: certified randomised where that pays,
    else the exact factored SVD)."""
    if isinstance(g, FactorsWithLeading):
        if rank <= g.leading.rank or g.leading.rank >= min(g.rank, *g.shape):
            return client_factors(g.leading, rank, scaling)
        g = LoraFactors(g.A, g.B, g.scaling)
    if not isinstance(g, SvdFactors):
        return leading_svd(g, rank, seed=seed, tol=tol).factors(rank, scaling)
    k = min(rank, g.rank)
    A = g.A[:k]
    B = g.B[:, :k] * (g.scaling / scaling)
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return SvdFactors(A.clone(), B.contiguous(), scaling)


@dataclass(frozen=True)
class FlexLoRA(Strategy):
    weighting: str = "num_examples"
    seed: int = 0
    # "auto": certified randomised leading components where that pays (many clients), else exact;
    # "exact": always the full factored SVD.
    svd: str = "auto"
    # components computed per module in aggregate: at least this many (None: the round's largest rank)
    r_max: int | None = None
    # each payload's ‖ΔW − s_k B_k A_k‖_F within svd_tol · ‖ΔW‖_F of the optimum (randomised path)
    svd_tol: float = 1e-5
    # FedProx's μ: clients add μ/2·‖θ − θ_global‖² over their factors (at their rank) and head (0: off).
    prox_mu: float = 0.0
    name: str = "flexlora"
    heterogeneous_ranks: ClassVar[bool] = True
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES
    lora_update_only: ClassVar[bool] = True  # aggregates ΔW = s·B·A: peft=lora, rslora or dora
    no_secure_aggregation: ClassVar[str | None] = "it sums each client's product s_k B_k A_k (from stacked factors), not a mean of factors"
    no_server_optimizer: ClassVar[str] = ("it re-factorises each round's aggregate update by SVD: "
                                          "the change of its factors is not the update")
    effective_updates: ClassVar[str] = "it re-factorises the average of the effective updates s_k·B_k·A_k of clients at different ranks"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.svd not in SVD_MODES:
            raise ValueError(f"strategy.svd: unknown value {self.svd!r}; expected one of {', '.join(SVD_MODES)}")
        if self.r_max is not None and self.r_max < 1:
            raise ValueError(f"strategy.r_max: must be at least 1 (or null), got {self.r_max}")
        if not 0 < self.svd_tol < 1:
            raise ValueError(f"strategy.svd_tol: must be in (0, 1), got {self.svd_tol}")

    def init_seed(self, client_id: int) -> int:
        return self.seed * 1_000_003 + client_id

    def init(self, model: GlobalModel) -> GlobalModel:
        """No global update yet: the first round's clients start fresh LoRAs. Keeps the head."""
        return GlobalModel(adapter={}, head=model.head, merges=model.merges)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        seed = self.init_seed(client.client_id)
        if not model.adapter:
            return Payload(adapter={}, head=model.head, plan=ClientPlan(init_seed=seed, proximal=self.proximal()), base_version=model.version)
        s = client.scaling
        adapter = {}
        for name, g in model.adapter.items():
            f = client_factors(g, client.rank, s, seed=svd_seed(self.seed, name, (client.rank,)), tol=self.svd_tol)
            k = min(client.rank, g.rank, *g.shape)
            if k < client.rank:  # revive the zero-padded components: fresh A rows, B stays 0 (ΔW unchanged)
                fresh = seeded_lora_A(name, client.rank, f.A.shape[1], seed)[k:].to(dtype=f.A.dtype, device=f.A.device)
                f = LoraFactors(torch.cat([f.A[:k], fresh], dim=0), f.B, s)
            adapter[name] = LoraFactors(f.A, f.B, s)  # clients get plain factors; SvdFactors is server state
        return Payload(adapter=adapter, head=model.head, plan=ClientPlan(proximal=self.proximal()), base_version=model.version)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        names = list(model.adapter) or list(updates[0].adapter)
        clients = tuple(u.client_id for u in updates)
        adapter = {name: self.global_factors(name, module_factors(updates, name), p, clients) for name in names}
        return GlobalModel(adapter=adapter, head=average_head(model, updates, p), merges=model.merges)

    def stack_update(self, factors: list[LoraFactors], p: list[float]) -> LoraFactors:
        """The round's aggregate ``Σ_k p_k s_k B_k A_k`` as stacked factors (:func:`fedpeft.lora.stack`);
        raFLoRA weights each rank partition instead."""
        return stack(factors, p)

    def global_factors(self, name: str, factors: list[LoraFactors], p: list[float], clients: tuple[int, ...] = ()) -> LoraFactors:
        """One module's global adapter: the exact ``Σ_k p_k s_k B_k A_k`` with its leading ``k``
        components (:class:`~fedpeft.lora.FactorsWithLeading`), or its exact SVD form (see the module
        docstring)."""
        stacked = self.stack_update(factors, p)
        if self.svd == "exact" or stacked.rank > min(stacked.shape):
            return svd_form(stacked)
        k = max(self.r_max or 1, *(f.rank for f in factors))
        lead = leading_svd(stacked, k, seed=svd_seed(self.seed, name, clients), tol=self.svd_tol)
        if lead.method == "exact":  # all components: the same SVD form as svd_form
            return lead.factors(lead.S.shape[0], 1.0)
        return FactorsWithLeading(stacked.A, stacked.B, stacked.scaling, lead.factors(k, 1.0))

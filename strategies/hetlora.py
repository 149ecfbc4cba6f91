"""HetLoRA — Cho, Manoel, Joshi, Sim & Dimitriadis, "Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models", EMNLP 2024.

The server keeps one adapter at the largest rank ``r_max`` (in effective-update units: scaling 1.0,
``B`` carries the scaling). Each round

    distribute (truncate):  A_k = A_g[:r_k],  B_k = B_g[:, :r_k] / s_k,   scaling s_k = α_k/r_k (α_k/√r_k with rsLoRA: ClientSpec.scaling)
    local training + rank self-pruning: the client adds ``λ · ‖B[:, ⌊γr⌋:]‖_F ‖A[⌊γr⌋:, :]‖_F`` to its
        loss (:func:`tail_norm`) and may return a smaller rank ``r'_k = max(⌊γ r_k⌋, r_min)``
        (:func:`pruned_rank`); the server sends its later payloads at that rank (:class:`PrunedRanks`)
    aggregate (zero-pad):   A_g = Σ_k p_k pad(A_k, r_max),  B_g = Σ_k p_k pad(s_k B_k, r_max)

with sparsity-weighted aggregation ``p_k = S_k / Σ_j S_j``, ``S_k = ‖s_k B_k A_k‖_F`` (computed per
module from the factors, :func:`fedpeft.lora.frobenius_of_product`; if every ``S_k`` of a module is 0
the data-size weights are used). ``weighting="num_examples"`` / ``"uniform"`` replace ``p_k`` for
ablations. The head is averaged with data-size weights (uniform under ``"uniform"``): sparsity is a
property of LoRA modules, not of the head. Like FedIT, averaging ``A`` and ``B`` separately is not the
average of the products; zero padding means the tail components are averaged only over the clients
that hold them (and shrunk by the others' zeros), which is HetLoRA's design.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

from fedpeft.lora import LoraFactors, at_scaling, frobenius_of_product, normalized_weights, pruned_rank, tail_norm, truncate  # noqa: F401  (the clients' pruning math, in the neutral LoRA algebra)
from fedpeft.plan import ClientPlan, SelfPruning
from strategies.base import WEIGHTINGS, ClientSpec, ClientUpdate, GlobalModel, Payload, ServerState, Strategy
from strategies.fedavg import client_weights
from strategies.ffa_lora import HETERO_PRIVACY_MODES, average_head, module_factors


def sparsity_weight(f: LoraFactors) -> float:
    """HetLoRA's ``S_k = ‖s_k B_k A_k‖_F``, without forming ``B_k A_k``."""
    return float(frobenius_of_product(f))


class PrunedRanks(ServerState):
    """HetLoRA's server state: the rank each client pruned to (``rank_now``: client → rank). A
    client that answered an applied round at a smaller rank than it was sent gets its later
    payloads at that rank (never above its configured one). Saved as ``rank_now``."""

    def __init__(self) -> None:
        self.rank_now: dict[int, int] = {}

    def spec(self, spec: ClientSpec) -> ClientSpec:
        rank = self.rank_now.get(spec.client_id)
        return spec if rank is None else replace(spec, rank=min(spec.rank, rank))

    def applied(self, sent: list[tuple[ClientSpec, ClientUpdate]]) -> None:
        for spec, update in sent:
            rank = max((f.rank for f in update.adapter.values()), default=spec.rank)
            if rank < spec.rank:
                self.rank_now[spec.client_id] = rank

    def state_dict(self) -> dict[str, Any]:
        return {"rank_now": dict(self.rank_now)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rank_now = {int(k): int(v) for k, v in state.get("rank_now", {}).items()}


@dataclass(frozen=True)
class HetLoRA(Strategy):
    """``gamma``, ``lam``, ``r_min``, ``prune``: the clients' self-pruning settings, sent as the
    plan's :class:`fedpeft.plan.SelfPruning` (its loss term and finalisation)."""

    # sparsity (HetLoRA's ‖s_k B_k A_k‖_F weights) | num_examples | uniform.
    weighting: str = "sparsity"
    seed: int = 0
    # γ: the rank tail starts at ⌊γ r⌋; a pruning client returns rank max(⌊γ r⌋, r_min).
    gamma: float = 0.99
    # λ: the clients' loss adds λ·‖B[:, ⌊γr⌋:]‖_F ‖A[⌊γr⌋:, :]‖_F (the rank tail's norm).
    lam: float = 1e-3
    # The smallest rank self-pruning may reach.
    r_min: int = 1
    # Let clients return a pruned rank (false: the penalty only).
    prune: bool = True
    # FedProx's μ: clients add μ/2·‖θ − θ_global‖² over their factors, at their truncated rank, and head (0: off).
    prox_mu: float = 0.0
    name: str = "hetlora"
    weightings: ClassVar[tuple[str, ...]] = ("sparsity", *WEIGHTINGS)
    no_secure_aggregation: ClassVar[str | None] = "it weights each client by its own ‖s_k B_k A_k‖_F and zero-pads factors of different ranks"
    heterogeneous_ranks: ClassVar[bool] = True
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES
    lora_update_only: ClassVar[bool] = True  # aggregates ΔW = s·B·A: peft=lora, rslora or dora
    no_server_optimizer: ClassVar[str] = ("its clients' ranks differ and shrink, and it averages zero-padded factors by their norms: "
                                          "the change of its factors is not the update")
    effective_updates: ClassVar[str] = "its clients' ranks differ and shrink: their factors are not same-shaped"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1:
            raise ValueError(f"strategy.gamma: must be in (0, 1], got {self.gamma}")
        if self.lam < 0:
            raise ValueError(f"strategy.lam: must be non-negative, got {self.lam}")
        if self.r_min < 1:
            raise ValueError(f"strategy.r_min: must be at least 1, got {self.r_min}")

    def reply_ranks(self, rank: int) -> tuple[int, ...]:
        """The given rank, or (with pruning) the one self-pruning step :func:`pruned_rank` allows."""
        return tuple(sorted({rank, pruned_rank(rank, self.gamma, self.r_min)})) if self.prune else (rank,)

    def server_state(self) -> PrunedRanks:
        return PrunedRanks()

    def init(self, model: GlobalModel) -> GlobalModel:
        """The server adapter at its own rank (``r_max``), converted to effective units: ``B ← s·B``, scaling 1."""
        adapter = {name: LoraFactors(f.A, f.scaling * f.B, 1.0) for name, f in model.adapter.items()}
        return GlobalModel(adapter=adapter, head=model.head, merges=model.merges)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        """Truncate to the client's rank; a rank above the server's ``r_max`` is a ``ValueError``
        (its extra components would be zero in both A and B, which gradient descent never revives)."""
        s = client.scaling
        adapter = {}
        for name, g in model.adapter.items():
            if client.rank > g.rank:
                raise ValueError(
                    f"client {client.client_id}: rank {client.rank} exceeds HetLoRA's server rank {g.rank} for "
                    f"module {name!r}; initialise the server adapter at the largest client rank"
                )
            adapter[name] = at_scaling(truncate(g, client.rank), s)
        pruning = SelfPruning(gamma=self.gamma, lam=self.lam, r_min=self.r_min, on=self.prune)
        init_seed = None if adapter else self.seed * 1_000_003 + client.client_id
        plan = ClientPlan(init_seed=init_seed, loss_term=pruning, finalise=pruning, proximal=self.proximal())
        return Payload(adapter=adapter, head=model.head, plan=plan, base_version=model.version)

    def module_weights(self, factors: list[LoraFactors], updates: list[ClientUpdate]) -> list[float]:
        if self.weighting != "sparsity":
            return client_weights(updates, self.weighting)
        S = [sparsity_weight(f) for f in factors]
        if sum(S) <= 0:
            return client_weights(updates, "num_examples")
        return normalized_weights(S)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        adapter = {}
        for name, g in model.adapter.items():
            factors = module_factors(updates, name)
            p = self.module_weights(factors, updates)
            r = max(g.rank, *(f.rank for f in factors))
            A = g.A.new_zeros(r, g.A.shape[1])
            B = g.B.new_zeros(g.B.shape[0], r)
            for f, pk in zip(factors, p):  # the zero-padded weighted sums, without materialising the pads
                A[: f.rank].add_(f.A.to(dtype=A.dtype, device=A.device), alpha=pk)
                B[:, : f.rank].add_(f.B.to(dtype=B.dtype, device=B.device), alpha=pk * f.scaling)
            adapter[name] = LoraFactors(A, B, 1.0)
        head_p = client_weights(updates, "uniform" if self.weighting == "uniform" else "num_examples")
        return GlobalModel(adapter=adapter, head=average_head(model, updates, head_p), merges=model.merges)

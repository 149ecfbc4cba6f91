"""SLoRA — Babakniya, Elkordy, Ezzeldin, Liu, Song, El-Khamy & Avestimehr, "SLoRA: Federated
Parameter Efficient Fine-Tuning of Language Models", 2023 (arXiv:2308.06522; FL@FM-NeurIPS'23).

Two stages. No code of the authors was found; this follows the paper's description.

**Stage 1** (the first ``sparse_rounds`` aggregated rounds): clients fine-tune a sparse subset of the
base weights of the LoRA target modules, a fixed random mask ``M_m`` of ``k_m = max(1, ⌈d · N_m⌉)``
entries per module (``d = sparse_density``; :func:`fedpeft.lora.sparse_mask`). The mask is
data-independent (the paper's random mask) and derived from the run's ``seed`` and the module's name
and shape, so it is the same on every node and never travels: only the ``k_m`` values do (4 bytes
each, as the head tensor ``sparse_base/<module>``; :data:`fedpeft.plan.SPARSE`). The LoRA factors
exist but are frozen at ``B = 0`` and neither sent nor trained; the head (a classifier) is trained
and averaged as in FedAvg. With ``v`` the values of ``ΔW`` on the mask:

    client k:  W_0 + scatter(v, M) trained on the masked entries only → v_k
    server:    v ← Σ_k p_k v_k,   p_k = n_k / Σ_j n_j  (or 1/K)          (FedAvg on the masked entries)

so the server's ``v`` is the accumulated sparse update ``ΔW = scatter(v, M)``.

**The switch** (when stage 1's last round is aggregated): per module, with ``ΔW = U S Vᵀ`` and ``r``
the module's LoRA rank and ``s`` its scaling (α/r, or α/√r with rsLoRA),

    B = U_r √S_r / √s,   A = √S_r V_rᵀ / √s   ⇒   s · B · A = U_r S_r V_rᵀ,

the best rank-r approximation of ``ΔW`` (Eckart–Young) (:func:`svd_init`). The base stays ``W_0``:
the paper initialises the LoRA blocks from the decomposition of the stage-1 update and fine-tunes
them over the original pre-trained model, so what stage 1 learnt beyond rank ``r`` is dropped (the
global model's effective weights change at the switch by ``ΔW − U_r S_r V_rᵀ``).

**Stage 2** (every later round): FedAvg of the LoRA factors (:class:`strategies.fedavg.FedAvg`).

The stage is ``GlobalModel.aggregations`` and the accumulated update is in the global head, so a
resumed run resumes both. :meth:`SLoRA.evaluated` gives the server the stage-1 model to evaluate
and save: ``ΔW`` as an exact adapter (:func:`dense_factors`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from fedpeft.lora import LoraFactors, fresh_adapter, sparse_mask, sparse_mask_size
from fedpeft.plan import SPARSE, ClientPlan, SparseBase
from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Payload, Strategy
from strategies.fedavg import FedAvg


def scatter_values(mask: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """``ΔW [out × in]`` (float32): ``values`` at the flat indices ``mask``, 0 elsewhere."""
    out = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
    out[mask] = values.reshape(-1).float()
    return out.reshape(shape)


def svd_init(delta: Tensor, rank: int, scaling: float) -> LoraFactors:
    """LoRA factors at ``rank`` whose ``scaling · B · A`` is the best rank-``rank`` approximation of
    ``delta``: ``B = U_r √S_r / √s``, ``A = √S_r V_rᵀ / √s`` (the SVD in float64, factors float32).
    A rank above ``min(out, in)`` is padded with zero components."""
    if rank <= 0 or scaling <= 0:
        raise ValueError(f"svd_init needs a positive rank and scaling, got {rank} and {scaling}")
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.numel())
    root = (S[:k] / scaling).sqrt()
    A = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    B = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    A[:k] = root[:, None] * Vh[:k]
    B[:, :k] = U[:, :k] * root[None, :]
    return LoraFactors(A.float(), B.float(), float(scaling))


def dense_factors(delta: Tensor) -> LoraFactors:
    """``delta [out × in]`` exactly as factors at scaling 1 and rank ``min(out, in)``: ``B = I, A = ΔW``
    (out ≤ in) or ``B = ΔW, A = I``; no decomposition, no rounding."""
    out, inn = delta.shape
    if out <= inn:
        return LoraFactors(delta.float().clone(), torch.eye(out), 1.0)
    return LoraFactors(torch.eye(inn), delta.float().clone(), 1.0)


def sparse_values(head: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The stage-1 values ``v_m`` held in a head, by module."""
    return {k[len(SPARSE):]: t for k, t in head.items() if k.startswith(SPARSE)}


def plain_head(head: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A head without its stage-1 values."""
    return {k: t for k, t in head.items() if not k.startswith(SPARSE)}


@dataclass(frozen=True)
class SLoRA(Strategy):
    # Each client's weight in the average: num_examples (n_k / Σ n_j) | uniform (1/K).
    weighting: str = "num_examples"
    # Stage 1's length: the aggregated rounds that fine-tune sparse base entries before LoRA starts from their SVD (>= 1).
    sparse_rounds: int = 1
    # Stage 1's random mask: the share of each target module's base weight entries clients train, in (0, 1].
    sparse_density: float = 0.01
    seed: int = 0
    name: str = "slora"
    lora_update_only: ClassVar[bool] = True
    peft_methods: ClassVar[tuple[str, ...]] = ("lora", "rslora")
    needs_base_weights: ClassVar[bool] = True  # the target modules' shapes, for the masks
    # Stage 1's replies carry no LoRA factors (only the masked values), which Flower's central-DP
    # wrapper, Opacus's per-example hooks and the local-DP layer have not been shown to handle.
    privacy_modes: ClassVar[tuple[str, ...]] = ("none",)
    engines: ClassVar[tuple[str, ...]] = ("per_client",)  # the cohort engine batches LoRA factors, not masked base entries
    no_server_optimizer: ClassVar[str] = "its switch replaces the LoRA factors by the SVD of stage 1's update, which is not a step to follow"
    # the coordinate-wise robust rules take stage 1's masked values and stage 2's factors tensor by tensor, as the mean does
    effective_updates: ClassVar[str | None] = None
    no_secure_aggregation: ClassVar[str] = "its stage-1 replies are the head alone, without LoRA factors, a layout the SecAgg+ path does not take"
    sparse_messages: ClassVar[str] = "its stage 1 already sends only the masked base entries, the mask regenerated from the seed; no codec on top"
    no_proximal: ClassVar[str] = "its stage-1 clients train masked base entries, not an adapter FedProx could anchor"
    no_quantized_base: ClassVar[str] = "its stage 1 trains masked entries of the base weights, shown on float bases only"

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.sparse_rounds
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"strategy.sparse_rounds: must be an integer >= 1 (the rounds of stage 1), got {r!r}")
        d = self.sparse_density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"strategy.sparse_density: must be a number in (0, 1], got {d!r}")

    def sparse_stage(self, model: GlobalModel) -> bool:
        """Whether the next round is one of stage 1."""
        return model.aggregations < self.sparse_rounds

    def mask(self, module: str, shape: tuple[int, int]) -> Tensor:
        return sparse_mask(module, shape, float(self.sparse_density), int(self.seed))

    def init(self, model: GlobalModel, base_weights: Mapping[str, Tensor] | None = None) -> GlobalModel:
        """Stage 1's start: ``v_m = 0`` (``k_m`` entries) per module in the head; the adapter is the
        fresh LoRA the clients regenerate from ``seed`` (``B = 0``: it adds nothing), kept for its
        rank and scaling."""
        if base_weights is None:
            raise ValueError("strategy=slora builds its masks from the target modules' shapes: init needs base_weights")
        shapes = {m: tuple(base_weights[m].shape) for m in model.adapter}
        f0 = next(iter(model.adapter.values()))
        adapter = fresh_adapter(shapes, f0.rank, f0.scaling, int(self.seed))
        head = {**model.head, **{SPARSE + m: torch.zeros(sparse_mask_size(s, self.sparse_density)) for m, s in shapes.items()}}
        return GlobalModel(adapter=adapter, head=head)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        if not self.sparse_stage(model):
            return Payload(adapter=model.adapter, head=model.head)
        plan = ClientPlan(train_A=False, train_B=False, init_seed=int(self.seed),
                          sparse=SparseBase(density=float(self.sparse_density), seed=int(self.seed)))
        return Payload(adapter={}, head=model.head, plan=plan)

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        fedavg = FedAvg(weighting=self.weighting)
        if not self.sparse_stage(model):
            return replace(fedavg.aggregate(model, updates), aggregations=model.aggregations + 1)
        head = fedavg.aggregate(GlobalModel(adapter={}, head=model.head), updates).head  # v ← Σ p_k v_k, head ← Σ p_k head_k
        if model.aggregations + 1 < self.sparse_rounds:
            return GlobalModel(adapter=model.adapter, head=head, aggregations=model.aggregations + 1)
        return GlobalModel(adapter=self.switch(model.adapter, sparse_values(head)), head=plain_head(head), aggregations=model.aggregations + 1)

    def switch(self, template: Mapping[str, LoraFactors], values: Mapping[str, Tensor]) -> dict[str, LoraFactors]:
        """Stage 2's LoRA: per module, :func:`svd_init` of ``ΔW = scatter(v, M)`` at the template's rank and scaling."""
        out = {}
        for m, f in template.items():
            delta = scatter_values(self.mask(m, f.shape), values[m], f.shape)
            out[m] = svd_init(delta, f.rank, f.scaling)
        return out

    def evaluated(self, model: GlobalModel) -> GlobalModel:
        """The global model as the server evaluates and saves it: in stage 1, ``W_0 + ΔW`` as the
        exact adapter :func:`dense_factors` of each module's ``ΔW`` (the head without the values);
        in stage 2 the model itself."""
        values = sparse_values(model.head)
        if not values:
            return model
        adapter = {m: dense_factors(scatter_values(self.mask(m, f.shape), values[m], f.shape)) for m, f in model.adapter.items()}
        return GlobalModel(adapter=adapter, head=plain_head(model.head), aggregations=model.aggregations)

    def round_metrics(self, model: GlobalModel, updates: list[ClientUpdate]) -> dict[str, float]:
        """FedAvg's ``factor_avg_error`` in stage 2; none in stage 1 (no factors travel)."""
        return {} if self.sparse_stage(model) else FedAvg(weighting=self.weighting).round_metrics(model, updates)

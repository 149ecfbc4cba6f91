"""raFLoRA — Wu, Hu, Min & Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with
Client Heterogeneity", arXiv:2602.13486, 2026.

The paper's diagnosis (its abstract): with heterogeneous ranks and SVD-based allocation (FlexLoRA),
the aggregate ``Σ_k p_k s_k B_k A_k`` weights every rank component with the rank-agnostic ``p_k``,
although only the clients whose rank reaches that component contribute to it. Component ``i`` of
the global update is therefore scaled by ``P_i = Σ_{k: r_k > i} p_k < 1`` each round, and re-split by
SVD it comes back to the same clients only to be shrunk again: the components past the smallest
shared rank decay geometrically over rounds ("rank collapse"; HetLoRA's zero-padding average
dilutes them the same way, every client without a component adding zeros to its average). raFLoRA
splits each local update into rank partitions and aggregates each partition over the clients that
have it, weighted by their contributions.

**What is implemented here** — reconstructed from the paper's abstract and the issue's
description, not from the paper's equations (its method section and code were not available):
with ``ρ_1 < … < ρ_M`` the distinct ranks of the round's clients (per module), partition
``m`` is the rank indices ``[ρ_{m-1}, ρ_m)`` (``ρ_0 = 0``; e.g. ranks {4, 8, 16, 32, 64} give
[0,4), [4,8), [8,16), [16,32), [32,64)), held by the clients ``C_m = {k : r_k ≥ ρ_m}``, and

    ΔW = Σ_m Σ_{k ∈ C_m} (p_k / P_m) · s_k B_k[:, ρ_{m-1}:ρ_m] A_k[ρ_{m-1}:ρ_m, :],   P_m = Σ_{k ∈ C_m} p_k

(``p_k`` the ``weighting``'s client weights, renormalised within each partition; a partition whose
clients all have ``p_k = 0`` adds nothing). The first partition, held by every client, is FlexLoRA's
average; a partition held by one client is that client's components, undiluted. The products of each
partition are averaged (exactly, as stacked factors with the weight folded into ``A``'s rows), not
``B`` and ``A`` separately. Distribution is FlexLoRA's SVD-based allocation, unchanged: client ``k``
gets the best rank-``r_k`` approximation of ``ΔW`` (:class:`strategies.flexlora.FlexLoRA`: the
certified leading components or the exact factored SVD, ``svd``, ``r_max``, ``svd_tol``), so that a
client's component ``i`` is the global update's ``i``-th singular direction when it starts training
and the partitions of different clients line up. If every client returns what it was sent, the
global update is a fixed point (after its first truncation to the largest rank), where FlexLoRA
scales component ``i`` by ``P_i`` every round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpeft.lora import LoraFactors, stack
from strategies.flexlora import FlexLoRA


def rank_partitions(ranks: list[int]) -> list[tuple[int, int]]:
    """``[(ρ_{m-1}, ρ_m)]`` for the sorted distinct ``ranks`` (``ρ_0 = 0``): the rank partitions."""
    if not ranks or min(ranks) < 1:
        raise ValueError(f"rank partitions need positive ranks, got {ranks}")
    bounds = sorted(set(ranks))
    return list(zip([0] + bounds[:-1], bounds))


def partition_weights(ranks: list[int], p: list[float]) -> list[torch.Tensor]:
    """Per client ``k``, its components' weights (float64, length ``r_k``): ``p_k / P_m`` for the
    components in partition ``m``, ``P_m`` the weight of the clients whose rank covers it (0 where
    ``P_m = 0``)."""
    if len(ranks) != len(p):
        raise ValueError(f"need one weight per client, got {len(ranks)} ranks and {len(p)} weights")
    out = [torch.empty(r, dtype=torch.float64) for r in ranks]
    for lo, hi in rank_partitions(ranks):
        holders = [k for k, r in enumerate(ranks) if r >= hi]
        total = sum(p[k] for k in holders)
        for k in holders:
            out[k][lo:hi] = p[k] / total if total > 0 else 0.0
    return out


def partitioned_update(factors: list[LoraFactors], p: list[float]) -> LoraFactors:
    """raFLoRA's aggregate as stacked factors (scaling 1): client ``k``'s ``A`` rows times its
    components' :func:`partition_weights` and ``s_k``, its ``B`` as is, so that ``B @ A`` is the
    partition-weighted sum of the module docstring exactly."""
    w = partition_weights([f.rank for f in factors], p)
    weighted = [LoraFactors(f.A * wk.to(dtype=f.A.dtype, device=f.A.device)[:, None], f.B, f.scaling) for f, wk in zip(factors, w)]
    return stack(weighted, [1.0] * len(factors))


@dataclass(frozen=True)
class RaFLoRA(FlexLoRA):
    name: str = "raflora"

    def stack_update(self, factors: list[LoraFactors], p: list[float]) -> LoraFactors:
        return partitioned_update(factors, p)

"""The LoRA algebra, over plain torch tensors.

A LoRA module adds ``ΔW = s · B @ A`` to a frozen weight ``W [out × in]``, with ``A [r × in]``,
``B [out × r]`` and scaling ``s = alpha / r`` (Hu et al., ICLR 2022; ``alpha / sqrt(r)`` for rsLoRA).
Everything here is a pure function: tensors in, tensors out, no Flower, Ray or I/O.

Whenever clients' ranks or scalings differ, strategies must combine updates in effective-update
units ``s_k · B_k · A_k``; :func:`stack` does that exactly by folding each client's weight and scaling
into its ``A`` block, so the stacked factors carry scaling 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA module: ``ΔW = scaling · B @ A``."""

    A: Tensor  # [r × in]
    B: Tensor  # [out × r]
    scaling: float

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError(f"LoRA factors must be 2-D, got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"rank mismatch: A is {tuple(self.A.shape)} but B is {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(out, in)`` of the weight this module updates."""
        return self.B.shape[0], self.A.shape[1]


Adapter = dict[str, LoraFactors]
"""Per-module factors of a whole adapter, keyed by the module's name in the model."""


def scaling_for(rank: int, alpha: float, rslora: bool = False) -> float:
    """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / (rank**0.5 if rslora else rank)


def delta(f: LoraFactors) -> Tensor:
    """The effective update ``s · B @ A`` (``out × in``)."""
    return f.scaling * (f.B @ f.A)


def pad(f: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad to ``rank`` components: rows of ``A`` and columns of ``B``; ``ΔW`` is unchanged
    when the scaling is kept."""
    r = f.rank
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}; use truncate")
    A = torch.cat([f.A, f.A.new_zeros(rank - r, f.A.shape[1])], dim=0)
    B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], rank - r)], dim=1)
    return LoraFactors(A, B, f.scaling)


def truncate(f: LoraFactors, rank: int) -> LoraFactors:
    """Keep the first ``rank`` components (rows of ``A``, columns of ``B``)."""
    if not 0 < rank <= f.rank:
        raise ValueError(f"cannot truncate rank {f.rank} to {rank}")
    return LoraFactors(f.A[:rank].clone(), f.B[:, :rank].clone(), f.scaling)


def at_scaling(f: LoraFactors, scaling: float) -> LoraFactors:
    """The same ``ΔW`` expressed with another scaling: ``B ← B · f.scaling / scaling``."""
    return LoraFactors(f.A, f.B * (f.scaling / scaling), scaling)


def stack(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Stack clients' factors so that the result's ``B @ A == Σ_k w_k s_k B_k A_k`` exactly.

    ``B = [B_1 | … | B_K]`` and ``A = [w_1 s_1 A_1; …; w_K s_K A_K]``; the stacked rank is
    ``Σ r_k`` and the scaling is 1 (FLoRA's stacking, Wang et al., NeurIPS 2024, with the
    weights and scalings folded into ``A`` rather than left to peft's alpha/r bookkeeping).
    """
    _check_same_module(factors, weights)
    A = torch.cat([w * f.scaling * f.A for f, w in zip(factors, weights)], dim=0)
    B = torch.cat([f.B for f in factors], dim=1)
    return LoraFactors(A, B, 1.0)


def weighted_sum_delta(factors: Sequence[LoraFactors], weights: Sequence[float]) -> Tensor:
    """Dense ``Σ_k w_k s_k B_k A_k`` — the reference the factor-space methods are tested against."""
    _check_same_module(factors, weights)
    return sum(w * delta(f) for f, w in zip(factors, weights))


def average_factors(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """FedIT-style average of the factors separately: ``A = Σ w_k A_k``, ``B = Σ w_k B_k``.

    Needs equal ranks and scalings. Note ``(Σ w B)(Σ w A) ≠ Σ w B A`` in general: the average
    of products carries cross terms ``w_j w_k B_j A_k`` (measured in the tests).
    """
    _check_same_module(factors, weights)
    ranks = {f.rank for f in factors}
    scalings = {f.scaling for f in factors}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError(
            f"averaging A and B separately needs one rank and scaling, got ranks {sorted(ranks)} "
            f"and scalings {sorted(scalings)}; aggregate in effective-update units instead"
        )
    A = sum(w * f.A for f, w in zip(factors, weights))
    B = sum(w * f.B for f, w in zip(factors, weights))
    return LoraFactors(A, B, factors[0].scaling)


def average_tensors(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ w_k T_k`` for same-shaped tensors (a trained head, for example)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor, got {len(tensors)} tensors and {len(weights)} weights")
    return sum(w * t for t, w in zip(tensors, weights))


def normalized_weights(sizes: Sequence[float]) -> list[float]:
    """``p_k = n_k / Σ n_j``."""
    total = float(sum(sizes))
    if total <= 0 or any(s < 0 for s in sizes):
        raise ValueError(f"weights need non-negative sizes with a positive sum, got {list(sizes)}")
    return [float(s) / total for s in sizes]


def adapter_delta(adapter: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    return {name: delta(f) for name, f in adapter.items()}


def _check_same_module(factors: Sequence[LoraFactors], weights: Sequence[float]) -> None:
    if not factors:
        raise ValueError("no factors to combine")
    if len(factors) != len(weights):
        raise ValueError(f"need one weight per client, got {len(factors)} factors and {len(weights)} weights")
    shapes = {f.shape for f in factors}
    if len(shapes) != 1:
        raise ValueError(f"factors update different weight shapes: {sorted(shapes)}")


# --- Heterogeneous-rank algebra: seeded A (FFA-LoRA), ‖s·B·A‖_F (HetLoRA), factored SVD (FlexLoRA) ---

import math as _math  # noqa: E402  (kept with the functions below that use them)
import zlib as _zlib  # noqa: E402


def seeded_lora_A(name: str, rank: int, in_features: int, seed: int) -> Tensor:
    """A deterministic ``A [rank × in_features]`` (float32, CPU) for module ``name``.

    Same distribution as peft's default LoRA A init, ``nn.init.kaiming_uniform_(A, a=sqrt(5))``
    (i.e. ``U(-1/sqrt(in), 1/sqrt(in))``), drawn from a ``torch.Generator`` seeded with
    ``zlib.crc32(name, seed mod 2³²)`` — the CRC of the name started from the seed, distinct for
    distinct seeds (the CPU generator only keeps 32 bits of its seed, so the two are mixed into 32
    bits rather than concatenated). Rows are drawn in order, so a smaller rank gives the
    leading rows of a larger one: ``seeded_lora_A(n, r, d, s) == seeded_lora_A(n, R, d, s)[:r]`` for
    ``r ≤ R`` (FFA-LoRA's shared A at every client rank).
    """
    if rank <= 0 or in_features <= 0:
        raise ValueError(f"seeded_lora_A needs a positive rank and in_features, got {rank} and {in_features}")
    g = torch.Generator().manual_seed(_zlib.crc32(name.encode("utf-8"), int(seed) % 2**32))
    A = torch.empty(rank, in_features, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(A, a=_math.sqrt(5), generator=g)
    return A


def fresh_adapter(shapes: Mapping[str, tuple[int, int]], rank: int, scaling: float, seed: int) -> dict[str, LoraFactors]:
    """A fresh LoRA (peft's init: random ``A``, zero ``B``) that depends on ``seed`` alone, so the
    server can compute the start of a client told to begin fresh (FLoRA, FlexLoRA's first round)
    — the reference its compressed or DP update is measured against."""
    return {
        m: LoraFactors(seeded_lora_A(m, rank, in_f, seed), torch.zeros(out, rank), scaling)
        for m, (out, in_f) in shapes.items()
    }


def frobenius_of_product(f: LoraFactors) -> Tensor:
    """``‖s · B @ A‖_F`` without forming the ``out × in`` product (0-dim tensor).

    ``‖BA‖_F² = trace(BᵀB · AAᵀ) = Σ_ij (BᵀB)_ij (AAᵀ)_ij`` (both Gram matrices are symmetric):
    ``O(r² (out + in))`` work. Cancellation limits the relative accuracy when ``‖BA‖_F`` is tiny
    compared with ``‖B‖_F ‖A‖_F``.
    """
    sq = ((f.B.mT @ f.B) * (f.A @ f.A.mT)).sum()
    return abs(f.scaling) * sq.clamp_min(0).sqrt()


def svd_factors(f: LoraFactors) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``ΔW = s · B @ A`` from the factors alone: ``ΔW = U diag(S) Vᵀ``.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), so ``ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ``; the SVD of
    the small core ``s R_B R_Aᵀ = U_c diag(S) V_cᵀ`` gives ``U = Q_B U_c`` (``out × k``),
    ``V = Q_A V_c`` (``in × k``), ``k = min(r, out, in)``, with ``S`` descending. Cost
    ``O(r² (out + in) + r³)``; the ``out × in`` matrix is never formed. Works in any float dtype
    and on any device.
    """
    Q_B, R_B = torch.linalg.qr(f.B, mode="reduced")  # [out × k1], [k1 × r]
    Q_A, R_A = torch.linalg.qr(f.A.mT, mode="reduced")  # [in × k2], [k2 × r]
    core = f.scaling * (R_B @ R_A.mT)  # [k1 × k2]
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    return Q_B @ U_c, S, Q_A @ Vh_c.mT


@dataclass(frozen=True)
class SvdFactors(LoraFactors):
    """:class:`LoraFactors` in SVD order: ``B = U diag(S) / scaling``, ``A = Vᵀ`` with orthonormal
    rows, components sorted by descending singular value — so ``truncate(f, r)`` *is* the best
    rank-``r`` approximation of ``ΔW`` (Eckart–Young) and costs a slice. Made by :func:`best_rank`;
    anything that rebuilds it as a plain :class:`LoraFactors` only loses the shortcut."""


def best_rank(f: LoraFactors, r: int, scaling: float) -> SvdFactors:
    """The best rank-``r`` approximation of ``ΔW = f.scaling · f.B @ f.A`` as factors with the given
    ``scaling``: ``B = U_r diag(S_r) / scaling``, ``A = V_rᵀ``, so ``scaling · B @ A`` is the rank-``r``
    truncated SVD (Eckart–Young: the error is ``sqrt(Σ_{i>r} S_i²)``), via :func:`svd_factors`.

    When ``r`` exceeds ``k = min(f.rank, out, in)`` the ``k`` SVD components are exact and the result
    is zero-padded to rank ``r`` (zero rows of ``A``, zero columns of ``B``; ``ΔW`` unchanged).
    """
    if r <= 0:
        raise ValueError(f"best_rank needs a positive rank, got {r}")
    if scaling == 0:
        raise ValueError("best_rank needs a non-zero scaling")
    U, S, V = svd_factors(f)
    k = min(r, S.shape[0])
    B = (U[:, :k] * S[:k]) / scaling
    A = V[:, :k].mT.contiguous()
    if k < r:
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1)
    return SvdFactors(A, B.contiguous(), scaling)


def svd_form(f: LoraFactors, scaling: float = 1.0) -> SvdFactors:
    """``f`` re-expressed exactly (to float rounding) in SVD order at rank ``min(f.rank, out, in)``,
    so that any client's best rank-``r`` approximation is then a slice (:func:`truncate`)."""
    return best_rank(f, min(f.rank, *f.shape), scaling)

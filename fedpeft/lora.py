"""The LoRA algebra, over plain torch tensors.

A LoRA module adds ``ΔW = s · B @ A`` to a frozen weight ``W [out × in]``, with ``A [r × in]``,
``B [out × r]`` and scaling ``s = alpha / r`` (Hu et al., ICLR 2022; ``alpha / sqrt(r)`` for rsLoRA).
Everything here is a pure function: tensors in, tensors out, no Flower, Ray or I/O.

Whenever clients' ranks or scalings differ, strategies must combine updates in effective-update
units ``s_k · B_k · A_k``; :func:`stack` does that exactly by folding each client's weight and scaling
into its ``A`` block, so the stacked factors carry scaling 1.
"""

from __future__ import annotations

import contextlib as _contextlib
import functools as _functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as _np
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
    first, rank = factors[0], sum(f.rank for f in factors)
    if all(f.A.dtype == first.A.dtype and f.A.device == first.A.device for f in factors):
        # The same products as below, written into one buffer (no per-client temporaries).
        A = _empty_like(first.A, rank, first.A.shape[1])
        i = 0
        for f, w in zip(factors, weights):
            torch.mul(f.A, w * f.scaling, out=A[i : i + f.rank])
            i += f.rank
    else:
        A = torch.cat([w * f.scaling * f.A for f, w in zip(factors, weights)], dim=0)
    if all(f.B.dtype == first.B.dtype and f.B.device == first.B.device for f in factors):
        B = _empty_like(first.B, first.B.shape[0], rank)
        i = 0
        for f in factors:
            B[:, i : i + f.rank] = f.B
            i += f.rank
    else:
        B = torch.cat([f.B for f in factors], dim=1)
    return LoraFactors(A, B, 1.0)


def _empty_like(x: Tensor, *shape: int) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``x``'s dtype and device. Large float CPU buffers
    come from NumPy, whose allocations are huge-page backed: stacking 100 clients' 4096-wide factors
    then takes half the time (fewer page faults)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(_np.empty(shape, dtype=_np.float32 if x.dtype == torch.float32 else _np.float64))
    return x.new_empty(shape)


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


def sparse_mask_size(shape: Sequence[int], density: float) -> int:
    """How many entries :func:`sparse_mask` keeps of a weight of ``shape``: ``max(1, ⌈density · N⌉)``
    (at most N), N its number of entries."""
    n = _math.prod(int(d) for d in shape)
    return min(n, max(1, _math.ceil(float(density) * n)))


def sparse_mask(name: str, shape: Sequence[int], density: float, seed: int) -> Tensor:
    """A fixed random mask of the weight of module ``name``: the sorted flat indices (int64) of
    :func:`sparse_mask_size` entries drawn uniformly without replacement from a ``torch.Generator``
    seeded as :func:`seeded_lora_A` seeds (``zlib.crc32(name, seed mod 2³²)``). It depends on the
    name, shape, density and seed alone, never on data, so every node regenerates the same mask
    (SLoRA's data-independent random mask) and the indices never travel."""
    if not 0 < density <= 1:
        raise ValueError(f"sparse_mask needs a density in (0, 1], got {density!r}")
    n = _math.prod(int(d) for d in shape)
    g = torch.Generator().manual_seed(_zlib.crc32(name.encode("utf-8"), int(seed) % 2**32))
    return torch.randperm(n, generator=g)[: sparse_mask_size(shape, density)].sort().values


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


def tail_start(r: int, gamma: float) -> int:
    """Where HetLoRA's γ-tail of a rank-``r`` adapter starts: ``⌊γ r⌋`` (``gamma`` in (0, 1])."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"HetLoRA's gamma must be in (0, 1], got {gamma}")
    return _math.floor(gamma * r)


def tail_norm(f: LoraFactors, gamma: float) -> Tensor:
    """The rank self-pruning regulariser ``‖B[:, ⌊γr⌋:]‖_F · ‖A[⌊γr⌋:, :]‖_F`` (0-dim, differentiable:
    the client adds ``λ · tail_norm`` to its loss). Zero (with zero gradients) when the tail is empty;
    at a zero ``B`` tail its gradient w.r.t. ``B`` is 0 (PyTorch's norm subgradient at 0)."""
    t = tail_start(f.rank, gamma)
    return torch.linalg.vector_norm(f.B[:, t:]) * torch.linalg.vector_norm(f.A[t:])


def pruned_rank(r: int, gamma: float, r_min: int = 1) -> int:
    """The rank after one self-pruning step, ``max(⌊γ r⌋, r_min)``, never more than ``r``."""
    if r <= 0 or r_min <= 0:
        raise ValueError(f"pruned_rank needs positive r and r_min, got r={r}, r_min={r_min}")
    return min(r, max(tail_start(r, gamma), r_min))


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


# --- The leading components only: certified randomised SVD from the factors (FlexLoRA at many clients) ---


@dataclass(frozen=True)
class FactorsWithLeading(LoraFactors):
    """Exact factors of ``ΔW`` (``A``, ``B``, ``scaling``: e.g. the stacked ``Σ_k p_k s_k B_k A_k``)
    together with ``leading``, its best rank-``k`` approximation in SVD order (scaling 1,
    ``k = leading.rank``), computed once by :func:`leading_svd`. Whatever reads the factors (the
    server's evaluation, a checkpoint) sees the exact update; a client of rank ``r ≤ k`` gets a
    slice of ``leading``. Rebuilt as plain :class:`LoraFactors` it only loses the shortcut."""

    leading: SvdFactors


@dataclass(frozen=True)
class LeadingSvd:
    """The leading singular triplets of ``ΔW``: ``ΔW ≈ U diag(S) Vᵀ`` (``U [out × j]``, ``S [j]``
    descending, ``V [in × j]``, orthonormal columns).

    ``method``: ``"randomized"`` (exactly the ``k`` requested, certified: ``bound`` ≤ the tolerance)
    or ``"exact"`` (the full thin SVD of :func:`svd_factors`, all ``min(rank, out, in)`` components).
    ``bound``: the randomised attempt's certified upper bound on
    ``max_{r ≤ k} (‖ΔW − ΔW_r‖_F − opt_r) / ‖ΔW‖_F`` (for ``"exact"``: the bound that was too large,
    ``inf`` where no spectral gap was found, ``nan`` where no attempt was made).
    ``note``: why the exact SVD was used (empty for the randomised result)."""

    U: Tensor
    S: Tensor
    V: Tensor
    method: str
    bound: float
    note: str = ""

    def factors(self, rank: int, scaling: float) -> SvdFactors:
        """The best rank-``rank`` approximation as factors at ``scaling`` (zero-padded past the
        components held): ``B = U_r diag(S_r) / scaling``, ``A = V_rᵀ``."""
        k = min(rank, self.S.shape[0])
        B = (self.U[:, :k] * self.S[:k]) / scaling
        A = self.V[:, :k].mT.contiguous()
        if k < rank:
            A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        return SvdFactors(A, B.contiguous(), scaling)


def randomized_pays(rank: int, out_features: int, in_features: int, k: int, oversample: int = 8) -> bool:
    """Whether :func:`leading_svd`'s randomised path is cheaper than the exact factored SVD: it costs
    about ``12 (k + p) · rank · (out + in)`` flops (two applications of ``ΔW`` or ``ΔWᵀ`` in the input
    dtype, two in float64) against ``~ rank² (out + in)`` for the QRs of the exact path, so it needs
    the stacked rank well above the sketch width ``k + p`` (and a module much larger than it)."""
    width = k + oversample
    return rank >= 12 * width and min(out_features, in_features) >= 4 * width


def _mm(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y``. On the CPU through NumPy's BLAS (zero-copy views; transposed views are passed as
    such): on this project's AMD CPUs NumPy's OpenBLAS runs these tall-skinny products faster than
    torch's MKL — float64 3–5× (130–260 ms against 45–50 ms for a 1600 × 4096 by 4096 × 82 product),
    float32 ~1.2× (47 against 39 ms for ``B (A X)`` at 4096 × 1600 × 72). On an Intel CPU
    (:func:`_intel_mkl`) torch's MKL, which is the faster there (float32: 7.0–7.5 against 7.8–9.3 ms
    for ``A Ω``, ``B (A Ω)`` and ``Bᵀ Q`` at 1600 × 4096 and 72 columns), with a transposed large ``X``
    (``Bᵀ``) as ``(Yᵀ Xᵀ)ᵀ``: MKL runs that one ~1.4× faster with the thin operand on the left."""
    if X.device.type == "cpu" and Y.device.type == "cpu" and X.dtype == Y.dtype and X.dtype in (torch.float32, torch.float64):
        if not _intel_mkl():
            return torch.from_numpy(_np.matmul(X.detach().numpy(), Y.detach().numpy()))
        if X.mT.is_contiguous() and not X.is_contiguous() and Y.shape[1] < X.shape[0]:
            return (Y.mT.contiguous() @ X.mT).mT
    return X @ Y


def _mm_thin(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y`` for a large ``X`` and a thin ``Y`` (a few dozen columns), computed as ``(Yᵀ Xᵀ)ᵀ``
    with ``Yᵀ`` contiguous: the thin operand on the left. On the CPU, NumPy's OpenBLAS runs these
    float64 products 1.4–2.3× faster in that order (18–21 ms against 27–42 ms for the four
    products of :func:`leading_svd`'s certificate, 4096 × 1600 stacks and 82 columns, one thread,
    an AVX-512 Xeon); the result is a transposed view. Elsewhere the plain product."""
    if X.device.type == "cpu" and Y.device.type == "cpu" and X.dtype == Y.dtype and X.dtype in (torch.float32, torch.float64):
        Yt = _np.ascontiguousarray(Y.detach().numpy().T)
        return torch.from_numpy(_np.matmul(Yt, X.detach().numpy().T).T)
    return X @ Y


@_functools.cache
def _intel_mkl() -> bool:
    """Whether torch's CPU products run on MKL on an Intel CPU (``vendor_id`` in ``/proc/cpuinfo``).
    There MKL's float64 products of the stacks with a thin matrix beat NumPy's OpenBLAS (16–18 against
    18–20 ms for 1600 × 4096 by 4096 × 82, one thread, an AVX-512 Xeon), and MKL's ``addmm_``
    accumulates in place, which chunked products need (:func:`_float64_products`); on AMD CPUs MKL
    was 3–5× slower than OpenBLAS in float64 (:func:`_mm`). Fixed per machine, so results are
    reproducible on it."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in fh)
    except OSError:
        return False


def _float64_products(A: Tensor, B: Tensor, s: float, chunk: int = 256):
    """``(apply, adjoint)``: ``X ↦ s·B(A X)`` and ``Z ↦ s·Aᵀ(Bᵀ Z)`` in float64 for float64 ``X``, ``Z``
    — the products with ``ΔW = s·B A`` and ``ΔWᵀ`` that :func:`leading_svd`'s certificate needs. A
    float32 ``A``, ``B`` is exact in float64, so both ways below compute the same float64 products (up
    to the order of summation):

    * on an Intel CPU with MKL (:func:`_intel_mkl`), ``chunk`` rows (or columns) at a time are copied
      into one reused float64 buffer of ``min(chunk, rank) · max(out, in)`` elements and multiplied there, the
      sums over the stacked rank accumulated by ``addmm_``: no float64 copies of the stacks (at
      1600 × 4096 they take ~20 ms to write; converting a chunk that the product then reads from
      cache costs ~4 ms a pass);
    * elsewhere, float64 copies of ``A`` and ``B`` made once (:func:`_as64`) and :func:`_mm_thin`."""
    if A.device.type != "cpu" or A.dtype == torch.float64 or not _intel_mkl():
        A64, B64 = _as64(A), _as64(B)
        return (lambda X: s * _mm_thin(B64, _mm_thin(A64, X))), (lambda Z: s * _mm_thin(A64.mT, _mm_thin(B64.mT, Z)))
    rank, (out_f, in_f) = A.shape[0], (B.shape[0], A.shape[1])
    buf = torch.empty(min(chunk, rank) * max(out_f, in_f), dtype=torch.float64)  # never more than a stack

    def apply(X: Tensor) -> Tensor:
        Xt, Ut = X.mT.contiguous(), X.new_empty(X.shape[1], rank)  # Ut = (A X)ᵀ
        for i in range(0, rank, chunk):
            a = buf[: min(chunk, rank - i) * in_f].view(-1, in_f).copy_(A[i : i + chunk])
            torch.mm(Xt, a.mT, out=Ut[:, i : i + chunk])
        Ut *= s
        Y = X.new_zeros(out_f, X.shape[1])
        for i in range(0, rank, chunk):
            b = buf[: out_f * min(chunk, rank - i)].view(out_f, -1).copy_(B[:, i : i + chunk])
            Y.addmm_(b, Ut[:, i : i + chunk].mT)
        return Y

    def adjoint(Z: Tensor) -> Tensor:
        Zt, Pt = Z.mT.contiguous(), Z.new_empty(Z.shape[1], rank)  # Pt = (Bᵀ Z)ᵀ
        for i in range(0, rank, chunk):
            b = buf[: out_f * min(chunk, rank - i)].view(out_f, -1).copy_(B[:, i : i + chunk])
            torch.mm(Zt, b, out=Pt[:, i : i + chunk])
        Pt *= s
        Tt = Z.new_zeros(Z.shape[1], in_f)
        for i in range(0, rank, chunk):
            a = buf[: min(chunk, rank - i) * in_f].view(-1, in_f).copy_(A[i : i + chunk])
            Tt.addmm_(Pt[:, i : i + chunk], a)
        return Tt.mT

    return apply, adjoint


def _as64(X: Tensor) -> Tensor:
    """``X`` in float64 (a new tensor unless it already is). On the CPU through NumPy, whose large
    allocations are huge-page backed: 2–3× faster than ``Tensor.double()`` for the stacked factors."""
    if X.dtype == torch.float64:
        return X
    if X.device.type == "cpu" and X.dtype == torch.float32:
        return torch.from_numpy(X.detach().numpy().astype(_np.float64))
    return X.double()


def _orth(X: Tensor, passes: int = 2, gram: Tensor | None = None) -> Tensor:
    """An orthonormal basis of ``span X`` in ``X``'s dtype: Cholesky QR twice in float64
    ("CholeskyQR2", Fukaya et al., 2014: two ``l × l`` Gram matrices and triangular solves, ~2× cheaper
    than Householder QR here, orthonormal to float64 rounding for ``κ(X) ≲ 10⁷``), or Householder QR
    where the Gram matrix is not numerically positive definite (a rank-deficient ``X``). ``passes=1``:
    a well-conditioned basis (orthonormal to ``~1e-16 κ(X)²``), enough for an iteration step.
    ``gram``: ``XᵀX`` in float64, if already computed."""
    Q = X.to(torch.float64)
    for i in range(passes):
        L, info = torch.linalg.cholesky_ex(gram if i == 0 and gram is not None else _mm(Q.mT, Q))
        if int(info) != 0:
            return torch.linalg.qr(X.to(torch.float64), mode="reduced").Q.to(X.dtype)
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        Q = _mm(Q, torch.linalg.solve_triangular(L, eye, upper=False).mT.contiguous())  # Q L⁻ᵀ: a GEMM, faster than a TRSM here
    return Q.to(X.dtype)


REFINE_E2 = 16.0
""":func:`leading_svd` refines a subspace whose unexplored part hides ``θ_k`` (``e² ≥ θ_k``) only
while ``e² ≤ REFINE_E2 · θ_k``: what is left of the leading components there shrinks with each power
step, whereas a flat spectrum past ``k`` gives ``e² ≈ 50–200 θ_k`` (the probes overestimate the
norm of a flat tail) and goes to the exact SVD at once. Only speed depends on this."""


def _exact_leading(f: LoraFactors, note: str, bound: float = float("nan")) -> LeadingSvd:
    U, S, V = svd_factors(f)
    return LeadingSvd(U, S, V, "exact", bound, note)


def leading_svd(
    f: LoraFactors,
    k: int,
    *,
    seed: int,
    tol: float = 1e-5,
    oversample: int = 8,
    power: int = 2,
    refine: int = 1,
    probes: int = 10,
    alpha: float = 10.0,
    flat: float = 0.5,
) -> LeadingSvd:
    """The ``k`` leading singular triplets of ``ΔW = s · B @ A`` from the factors, by a randomised
    subspace iteration with an a-posteriori certificate, or else the exact factored SVD.

    **Subspace** (Halko, Martinsson & Tropp, SIAM Review 2011, Alg. 4.4; a seeded Gaussian ``Ω`` of
    ``l = k + oversample`` columns), in the factors' dtype (float32 for half precisions), applying
    ``ΔW X = s·B(A X)`` and ``ΔWᵀ Y = s·Aᵀ(Bᵀ Y)`` — ``O(l · rank · (out + in))`` each, the
    ``out × in`` matrix is never formed::

        Q = orth(ΔW Ω),  q times  Q = orth(ΔW orth(ΔWᵀ Q)),  V₀ = orth(ΔWᵀ Q)

    (``q = 0``: two products, ``span V₀ = span ΔWᵀΔW Ω``.) ``q ≤ power`` is the first with
    ``ρ^{4(q+1)} ≤ tol`` for ``ρ = σ̂_l / σ̂_k`` (the singular values of the latest ``ΔWᵀQ``, Ritz
    values of ``ΔW``): the Ritz values' relative deficit falls like that. ``ρ > flat`` stops at once
    with the exact SVD: a spectrum that flat past ``k`` leaves no gap the certificate could use
    (the early check; only speed depends on it). The input dtype's rounding leaves ``V₀`` tilted by
    ~eps towards every direction; the certificate below is second order in that tilt, so no part of
    the iteration needs float64.

    **Rayleigh–Ritz and certificate**, in float64 (two products; ``V₀`` re-orthonormalised):
    ``Y = ΔW V₀``, ``YᵀY = W Θ Wᵀ`` (``Θ = diag θ`` descending), ``V = V₀W``: ``θ_j = ‖ΔW v_j‖²`` are
    the Ritz values of ``G = ΔWᵀΔW`` on ``span V`` and ``ΔW V = Y W = U Σ``. Then ``ΔWᵀ(ΔW V) = GV``
    gives the residual ``R = GV − VΘ`` (``⊥ V``) and ``K = RᵀR``. In the basis ``[V, V_⊥]``,
    ``G = [[Θ, C], [Cᵀ, G₂₂]]`` with ``CCᵀ = K`` and ``0 ⪯ G₂₂ ⪯ e² I`` for any ``e ≥ ‖E‖₂``,
    ``E = ΔW(I − VVᵀ)`` the unexplored part. For ``λ > e²``, Haynsworth's inertia formula on the Schur
    complement of ``λ − G₂₂`` counts the eigenvalues of ``G`` above ``λ`` as those of
    ``Θ + C(λ − G₂₂)⁻¹Cᵀ ⪯ Θ + K/(λ − e²)``; with ``λ ≥ θ_i`` (interlacing: ``λ_i ≥ θ_i``)::

        0 ≤ λ_i(G) − θ_i ≤ δ_i = λ_i(Θ + K / (θ_i − e²)) − θ_i        whenever θ_i > e²

    (an ``l × l`` eigenvalue problem per ``i ≤ k``; ``≈ K_ii/(θ_i − e²)`` — the float32 tilt enters
    ``K`` squared). Each ``δ_i`` is also capped by Li & Li's bound ("A note on eigenvalues of
    perturbed Hermitian matrices", LAA 395, 2005) for the split after ``t ≥ i`` Ritz vectors,
    ``2c_t² / (η_t + √(η_t² + 4c_t²))``, ``c_t² = ‖K_{:t,:t}‖₂``, ``η_t = θ_t − θ_{t+1} − e²``
    (tight on 2 × 2 blocks). ``e`` comes from ``probes`` fresh Gaussian vectors ``ω``:
    ``e² = α √(2/π) max_i ‖EᵀE ω_i‖`` (from the two products above), else, when that is too loose,
    ``e² = (α √(2/π) max_i ‖EEᵀE ω_i‖)^{2/3}`` (one product of width ``probes``); each fails with
    probability at most ``α^{-probes}`` (Halko et al. Lemma 4.1 applied to ``EᵀE`` and ``EEᵀE``;
    ``10⁻¹⁰`` by default). As ``ΔW V_r = U_r Σ_r``, the rank-``r`` payload ``U_r Σ_r V_rᵀ`` has
    ``err_r² = ‖ΔW‖² − Σ_{i≤r} θ_i = Σ_{r<i≤l} θ_i + ‖E‖_F²`` and Eckart–Young's
    ``opt_r² = ‖ΔW‖² − Σ_{i≤r} λ_i``; with ``D_r = Σ_{i≤r} δ_i``::

        err_r − opt_r = (err_r² − opt_r²) / (err_r + opt_r) ≤ min(√D_r, D_r / √(Σ_{r<i≤l} θ_i + f²))

    where ``f² = mean_i ‖Eω_i‖² / s ≤ ‖E‖_F²`` unless the probes fail (probability ≤ ``α^{-probes}``
    for ``s`` from Chernoff's χ² bound, :func:`_chi2_factor`; ``s ≈ 7.6`` by default), and
    ``‖ΔW‖² ≥ Σ_i θ_i + f²``. If ``max_{r≤k}`` of that over ``‖ΔW‖`` is ≤ ``tol``, the ``k``
    triplets are returned (``method="randomized"``, ``bound`` that maximum). Otherwise, while
    ``θ_k > e²``, ``refine`` more times: ``V₀ = orth(GV)`` (a power step, already computed) and
    certify again. No gap (``θ_k ≤ e²``: a flat spectrum past ``k``) or no success: the exact factored
    SVD (:func:`svd_factors`, ``method="exact"``, all components). So no client's payload is more
    than ``tol · ‖ΔW‖_F`` off its optimum unless a probe fails (≤ ``3 (refine + 1) α^{-probes}``);
    the bound is for the float64 triplets, and casting them to the input dtype adds its rounding
    (≈ 1e-7 relative in float32), as the exact path's float32 SVD does. Problems where the sketch
    would not be cheaper (:func:`randomized_pays`) go straight to the exact SVD.

    Costs ``2 + 2q`` products of width ``l`` in the input dtype, then two of width
    ``l + probes`` in float64 (two more per refinement, one of width ``probes`` when the sharper
    ``e`` is needed), against the exact path's QRs of the ``out × rank`` and ``in × rank`` stacks;
    the float64 ones read the float32 stacks chunk by chunk where that is faster
    (:func:`_float64_products`: the same float64 products, no float64 copies of the stacks).
    Deterministic given ``seed`` on a given machine (a CPU generator; the sketch is moved to the
    factors' device; which BLAS runs the products is fixed per machine, :func:`_intel_mkl`).
    """
    if k <= 0 or probes <= 0:
        raise ValueError(f"leading_svd needs a positive k and probes, got {k} and {probes}")
    out_f, in_f = f.shape
    full = min(f.rank, out_f, in_f)
    l = min(k + oversample, full)
    if k >= full or not randomized_pays(f.rank, out_f, in_f, k, oversample):
        return _exact_leading(f, "small: the exact factored SVD is as cheap")
    with _torch_threads_off(f.A.device.type == "cpu" and not _intel_mkl()):
        return _randomized_leading(f, k, l, seed, tol, power, refine, probes, alpha, flat)


@_contextlib.contextmanager
def _torch_threads_off(on: bool):
    """Torch's CPU ops on one thread for the ``with`` block (``on``), restored after: there NumPy's
    OpenBLAS runs every large product with its own threads, and torch's OpenMP threads, which spin
    for a while after each of the small ops in between, took the cores from it — with 2 threads the
    randomised path was hardly faster than with 1 (0.20 against 0.19 s wall, a 4096² module at 100
    clients, AMD EPYC); with this, 0.12–0.14 s. Not used with MKL on Intel, where torch runs the
    products itself."""
    n = torch.get_num_threads()
    if not on or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _randomized_leading(
    f: LoraFactors, k: int, l: int, seed: int, tol: float, power: int, refine: int, probes: int, alpha: float, flat: float
) -> LeadingSvd:
    """:func:`leading_svd`'s randomised path (sketch, Rayleigh–Ritz, certificate)."""
    out_f, in_f = f.shape
    dev, dt = f.A.device, f.A.dtype
    work = dt if dt in (torch.float32, torch.float64) else torch.float32  # half precisions: iterate in float32
    A, B, s = f.A.to(work), f.B.to(work), float(f.scaling)
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    omega = torch.randn(in_f, l, generator=gen, dtype=work).to(device=dev)
    probe = torch.randn(in_f, probes, generator=gen, dtype=torch.float64).to(device=dev)
    # The subspace, in the input dtype (ΔW's scaling s does not change a span).
    Q = _orth(_mm(B, _mm(A, omega)), passes=1)
    for q in range(power + 1):
        T = _mm_thin(A.mT, _mm(B.mT, Q)).to(torch.float64)  # ΔWᵀ Q / s
        G = _mm(T.mT, T)  # its eigenvalues are the squared Ritz values of ΔW on span Q (over s²)
        ev = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)
        rho = float((ev[l - 1] / ev[k - 1]).sqrt()) if ev[k - 1] > 0 else 1.0  # ≈ σ_l / σ_k
        if rho > flat:
            return _exact_leading(f, f"no spectral gap above the unexplored part (early check: σ_l/σ_k ≈ {rho:.2f})", float("inf"))
        if q == power or rho ** (4 * (q + 1)) <= tol:  # the Ritz values' deficit, ~ρ^{4(q+1)} relative, is small
            break
        Q = _orth(_mm(B, _mm(A, _orth(T, passes=1, gram=G).to(work))), passes=1)
    V0 = _orth(T, gram=G)
    # Rayleigh–Ritz and the certificate, in float64.
    dW, dWt = _float64_products(A, B, s)  # X ↦ ΔW X, Z ↦ ΔWᵀ Z
    c = alpha * _math.sqrt(2 / _math.pi)
    chi = _chi2_factor(probes, alpha)
    bound, gap = float("nan"), False
    for attempt in range(refine + 1):
        Y = dW(torch.cat([V0, probe], dim=1))  # ΔW [V₀ | ω]
        Yl = Y[:, :l]
        theta, W = torch.linalg.eigh(_mm(Yl.mT, Yl))
        theta, W = theta.flip(0).clamp_min(0), W.flip(1).contiguous()  # descending
        V = _mm(V0, W)
        DV = _mm(Yl, W)  # ΔW V = U Σ
        Ew = Y[:, l:] - DV @ (V.mT @ probe)  # E ω = ΔW(I − VVᵀ) ω
        T = dWt(torch.cat([DV, Ew], dim=1))  # ΔWᵀ [ΔW V | Eω]
        GV = T[:, :l]
        R = GV - V * theta  # G V − V Θ
        K = _mm(R.mT, R)
        EtEw = T[:, l:] - V @ (V.mT @ T[:, l:])  # Eᵀ E ω
        e2 = c * float(EtEw.norm(dim=0).max())  # ≥ ‖EᵀE‖₂ = ‖E‖₂²
        f2 = float(Ew.square().sum(0).mean()) / chi  # ≤ ‖E‖_F²
        bound, gap, _ = _certify(theta, K, e2, k, tol, f2)
        if bound > tol and e2 > 0 and _certify(theta, K, 0.0, k, tol, f2)[0] <= tol:  # e matters: sharpen it
            E3w = dW(EtEw) - DV @ (V.mT @ EtEw)  # E Eᵀ E ω
            e2 = min(e2, (c * float(E3w.norm(dim=0).max())) ** (2 / 3))  # ≥ ‖EEᵀE‖₂^{2/3} = ‖E‖₂²
            bound, gap, _ = _certify(theta, K, e2, k, tol, f2)
        if bound <= tol:
            S = theta[:k].sqrt()
            return LeadingSvd((DV[:, :k] / S).to(dt), S.to(dt), V[:, :k].to(dt), "randomized", bound)
        if attempt == refine or (not gap and e2 > REFINE_E2 * float(theta[k - 1])):
            break  # out of attempts, or the unexplored part looks flat: a power step will not help
        V0 = _orth(GV)  # one power step on G, already computed
    why = "no spectral gap above the unexplored part" if not gap else f"certified bound {bound:.1e} > tol {tol:.0e}"
    return _exact_leading(f, why, bound)


def _certify(
    theta: Tensor, K: Tensor, e2: float, k: int, tol: float | None = None, f2: float = 0.0
) -> tuple[float, bool, Tensor | None]:
    """``(max_{r ≤ k} bound_r / ‖ΔW‖, whether θ_k > e², D)`` with ``D[r-1] ≥ Σ_{i≤r} (λ_i − θ_i)``
    (``None`` without a gap), from the Ritz values ``θ`` (descending) of ``G = ΔWᵀΔW`` on ``span V``,
    ``K = RᵀR`` for the residual ``R = GV − V diag(θ)``, ``e2 ≥ ‖E‖₂²`` and ``f2 ≤ ‖E‖_F²`` for
    ``E = ΔW (I − VVᵀ)`` — see
    :func:`leading_svd`. With ``tol``, Li & Li's caps are skipped when the Schur-complement bound
    alone already meets it (they can only lower the bound)."""
    theta = theta.to(torch.float64).cpu()
    K = K.to(torch.float64).cpu()
    l = theta.shape[0]
    eta = theta[:k] - e2
    if not bool((eta > 0).all()):
        return float("inf"), False, None
    # One eigenvalue problem per band of indices whose η_i lie within a factor 2 (η descends):
    # Θ + K/η_last ⪰ Θ + K/η_i for every i of the band, so its i-th eigenvalue bounds λ_i too (at most
    # ~2× looser). Without a tolerance to meet, or when the bands miss it, one problem per index.
    delta = _schur(theta, K, eta, band=2.0)
    bound, D = _excess(theta, delta, k, f2)
    if tol is None or bound > tol:
        delta = _schur(theta, K, eta, band=1.0)
        bound, D = _excess(theta, delta, k, f2)
    if tol is not None and bound <= tol:
        return bound, True, D
    # Li & Li per split t: c_t² = ‖K[:t, :t]‖₂, η_t = θ_t − θ_{t+1} − e²
    mask = (torch.arange(l)[None, :] < torch.arange(1, l + 1)[:, None]).to(K.dtype)  # row t-1: the first t
    c2 = torch.linalg.eigvalsh(K * mask[:, :, None] * mask[:, None, :])[:, -1].clamp_min(0)
    eta_t = theta - torch.cat([theta[1:], theta.new_zeros(1)]) - e2
    lili = torch.where(eta_t > 0, 2 * c2 / (eta_t + (eta_t.square() + 4 * c2).sqrt()), torch.full_like(c2, float("inf")))
    per = lili.flip(0).cummin(0).values.flip(0)[:k]  # min_{t ≥ i} of Li & Li's bound
    bound, D = _excess(theta, torch.minimum(delta, per), k, f2)
    return bound, True, D


def _schur(theta: Tensor, K: Tensor, eta: Tensor, band: float) -> Tensor:
    """``δ_i = λ_i(Θ + K/η_b) − θ_i ≥ λ_i(G) − θ_i`` for ``i < len(eta)``, with ``η_b`` the smallest
    ``η`` of ``i``'s band (indices whose ``η`` is within a factor ``band`` of the band's first)."""
    k, e = eta.shape[0], eta.tolist()
    last, start = [], 0
    while start < k:
        end = start
        while end + 1 < k and e[end + 1] * band >= e[start]:
            end += 1
        last.append(end)
        start = end + 1
    M = torch.diag(theta) + K / eta[last][:, None, None]  # one Θ + K/η_b per band
    lam = torch.linalg.eigvalsh(M).flip(-1)  # descending, per band
    band_of = torch.repeat_interleave(torch.arange(len(last)), torch.tensor(last) - torch.tensor([-1] + last[:-1]))
    return (lam[band_of, torch.arange(k)] - theta[:k]).clamp_min(0)


def _excess(theta: Tensor, delta: Tensor, k: int, f2: float = 0.0) -> tuple[float, Tensor]:
    """``(max_{r≤k} min(√D_r, D_r / √(Σ_{r<i≤l} θ_i + f2)) / √(Σθ + f2), D)`` for
    ``D = cumsum(delta)`` and ``f2 ≤ ‖E‖_F²``: ``err_r² = Σ_{r<i≤l} θ_i + ‖E‖_F²`` exactly and
    ``‖ΔW‖² = Σθ + ‖E‖_F²``."""
    D = delta.cumsum(0)
    tail = theta.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j ≥ i} θ_j
    lower = (torch.cat([tail[1:], theta.new_zeros(1)])[:k] + f2).sqrt()  # ≤ err_r, r = 1..k
    excess = torch.minimum(D.sqrt(), torch.where(lower > 0, D / lower, torch.full_like(D, float("inf"))))
    return float(excess.max() / (float(theta.sum()) + f2) ** 0.5), D


def _chi2_factor(p: int, alpha: float) -> float:
    """``s`` with ``P(mean_i ‖Eω_i‖² > s ‖E‖_F²) ≤ α^{-p}`` for ``p`` standard Gaussian ``ω_i`` and any
    ``E``: the mean is ``Σ_j w_j X_j`` (``w_j = σ_j²/‖E‖_F²``, ``X_j ~ χ²_p/p`` independent), whose
    moment generating function is at most ``X``'s (log-convexity), so Chernoff's
    ``P(χ²_p ≥ s p) ≤ (s e^{1−s})^{p/2}`` holds for it; solved for ``(s e^{1−s})^{p/2} = α^{-p}``."""
    target = alpha ** (-2.0)  # s e^{1−s} = α^{-2}
    lo, hi = 1.0, 1.0
    while hi * _math.exp(1 - hi) > target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid * _math.exp(1 - mid) > target else (lo, mid)
    return hi

"""FLoRA's base merges as they travel: each module's merge in its cheapest exact form.

A merge ``ΔW = B A`` (FLoRA's stacked factors, scaling 1, rank ``r = Σ r_k``) of a module
``[out × in]`` is sent as one of

- ``factors``: the stacked ``A [r × in]``, ``B [out × r]`` when ``r (out + in) ≤ out · in``;
- ``svd``: past ``r > min(out, in)`` the stack is redundant: its SVD, computed in float64 from
  the factors (:func:`fedpeft.lora.svd_factors`: QR of each factor and the SVD of the small core,
  never an ``out × in`` SVD), re-expresses it at its numerical rank ``k ≤ min(out, in)``: the
  fewest components whose dropped tail ``sqrt(Σ_{i>k} σ_i²)`` is at most ``ε/2 · ‖ΔW‖_F`` (ε of the
  factors' dtype: no more than rounding ``ΔW`` itself to that dtype may change), taken when
  ``k (out + in) < out · in``;
- ``dense``: ``ΔW`` itself, ``[out × in]``, otherwise (formed in float64, rounded once).

Note that a full-rank SVD form never beats dense: ``min(out, in) · (out + in) ≥ out · in``. So the
``svd`` form is taken only by a stack that is numerically rank-deficient (clients whose updates
span a common subspace); a generic stack past ``out · in / (out + in)`` components goes dense, and
a cheap sketch (``ΔW Ω`` with ``Ω`` of ``⌈out · in / (out + in)⌉`` columns) proves that before any
SVD is computed.

Exactness: ``factors`` is the stack itself, bit for bit; ``svd`` and ``dense`` equal ``B A`` to
float rounding (float64, then rounded once to the factors' dtype) — not bit for bit what a client
applying the stack would get. What keeps every party on the same base bit for bit is that the form
is chosen once per merge by the server (:class:`fedpeft.server.FlowerAdapter`) and that same form
is what every message, the run's merge store and a node's state carry, and what
:func:`fedpeft.models.apply_merge` applies.

The merge store (the server's ``state/merges``, a checkpoint beside ``server.pt``; no client reads
it: a node keeps the merges it was sent in its Flower node state) keeps one safetensors file per
merge version in that form: :func:`save_merge`, :func:`load_merge`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedpeft.lora import LoraFactors, SvdFactors, svd_factors

Form = Union[LoraFactors, Tensor]
"""One module's merge: factors (scaling 1; :class:`fedpeft.lora.SvdFactors` when re-factorised)
or the dense ``ΔW [out × in]``."""

Merge = dict[str, Form]  # one base version's merge, per module


def kind(form: Form) -> str:
    """``"dense"``, ``"svd"`` or ``"factors"``."""
    if isinstance(form, Tensor):
        return "dense"
    return "svd" if isinstance(form, SvdFactors) else "factors"


def shape(form: Form) -> tuple[int, int]:
    """``(out, in)`` of the weight the merge updates."""
    return tuple(form.shape) if isinstance(form, Tensor) else form.shape  # type: ignore[return-value]


def numel(form: Form) -> int:
    """Values a form carries (``r (out + in)`` or ``out · in``)."""
    return form.numel() if isinstance(form, Tensor) else form.A.numel() + form.B.numel()


def numerical_rank(S: Tensor, eps: float) -> int:
    """The fewest leading components of singular values ``S`` (descending) whose dropped tail
    ``sqrt(Σ_{i≥k} S_i²)`` is at most ``eps/2 · ‖S‖₂``: what rounding the matrix to a format of
    machine epsilon ``eps`` may change in Frobenius norm (``|δ_ij| ≤ eps/2 · |x_ij|``)."""
    sq = S.double() ** 2
    total = sq.sum()
    if S.numel() == 0 or total <= 0:
        return 0
    tails = sq.flip(0).cumsum(0).flip(0)  # tails[i] = Σ_{j≥i} S_j²
    return int((tails > (eps / 2) ** 2 * total).sum())


def cheapest_form(f: LoraFactors) -> Form:
    """The form of one module's merge ``f`` (stacked factors, scaling 1) that carries the fewest
    values (see the module docstring). Deterministic: the same factors give the same form."""
    if f.scaling != 1.0:
        raise ValueError(f"merges are stacked at scaling 1, got {f.scaling}")
    out, inn = f.shape
    dense_cost = out * inn
    if f.rank * (out + inn) <= dense_cost:  # (so r < min(out, in))
        return f
    dtype, eps = f.B.dtype, torch.finfo(f.B.dtype).eps
    D = f.B.double() @ f.A.double()  # ΔW in float64: the dense form, unless the SVD form is smaller
    if f.rank > min(out, inn) and not _rank_at_least(D, -(-dense_cost // (out + inn)), eps):
        U, S, V = svd_factors(LoraFactors(f.A.double(), f.B.double(), 1.0))
        k = max(numerical_rank(S, eps), 1)
        if k * (out + inn) < dense_cost:
            return SvdFactors(V[:, :k].mT.contiguous().to(dtype), (U[:, :k] * S[:k]).contiguous().to(dtype), 1.0)
    return D.to(dtype).contiguous()


def _rank_at_least(D: Tensor, p: int, eps: float) -> bool:
    """A one-sided check that ``D``'s :func:`numerical_rank` is at least ``p`` (then no form of
    ``p`` or more components is smaller than dense, and the SVD is skipped): with a seeded
    Gaussian ``Ω [in × p]``, ``σ_p(D) ≥ σ_p(D Ω) / ‖Ω‖₂``, so ``σ_p(D Ω) > eps/2 · ‖D‖_F · ‖Ω‖₂``
    proves it. ``O(out · in · p)``; False means "not proven" (a rank-deficient stack)."""
    if p > min(D.shape):
        return False
    omega = torch.randn(D.shape[1], p, generator=torch.Generator().manual_seed(0), dtype=D.dtype)
    s = torch.linalg.svdvals(D @ omega)
    return bool(s[p - 1] > eps / 2 * torch.linalg.matrix_norm(D) * torch.linalg.matrix_norm(omega, 2))


def cheapest(merge: Mapping[str, LoraFactors]) -> Merge:
    """:func:`cheapest_form` of every module of one merge."""
    return {m: cheapest_form(f) for m, f in merge.items()}


def from_parts(parts: Mapping[str, Tensor]) -> Form:
    """A form from its stored parts: ``{"A", "B"}`` (factors, scaling 1) or ``{"D"}`` (dense).
    Raises ``ValueError`` for anything else."""
    if set(parts) == {"D"}:
        if parts["D"].dim() != 2:
            raise ValueError(f"a dense merge must be 2-D, got shape {tuple(parts['D'].shape)}")
        return parts["D"]
    if set(parts) == {"A", "B"}:
        return LoraFactors(parts["A"], parts["B"], 1.0)
    raise ValueError(f"a merge needs A and B, or D alone; got {sorted(parts)}")


def parts(form: Form) -> dict[str, Tensor]:
    """The inverse of :func:`from_parts` (contiguous tensors, dtype kept)."""
    if isinstance(form, Tensor):
        return {"D": form.detach().contiguous()}
    if form.scaling != 1.0:
        raise ValueError(f"merges are stacked at scaling 1, got {form.scaling}")
    return {"A": form.A.detach().contiguous(), "B": form.B.detach().contiguous()}


# ---------------------------------------------------------------------------------------------
# The merge store: one safetensors file per merge version


def merge_path(store: Path, version: int) -> Path:
    """Where merge ``version`` lies in a merge store (the server's ``state/merges``, a node's state dir)."""
    return Path(store) / f"merge_{version:04d}.safetensors"


def save_merge(store: Path, version: int, merge: dict) -> None:
    """One FLoRA base merge as safetensors, written atomically, per module in the form the server
    sends it (:mod:`fedpeft.merges`): ``<module>.A`` and ``<module>.B`` (factors, scaling 1) or
    ``<module>.D`` (dense ``ΔW``)."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m, f in merge.items():
        for part, t in parts(f).items():
            tensors[f"{m}.{part}"] = t
    tmp = merge_path(store, version).with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, merge_path(store, version))


def load_merge(store: Path, version: int) -> dict:
    """Merge ``version`` from ``store``, each module in the form :func:`save_merge` wrote."""
    t = load_file(str(merge_path(store, version)))
    out: dict[str, dict[str, Tensor]] = {}
    for key, tensor in t.items():
        module, _, part = key.rpartition(".")
        out.setdefault(module, {})[part] = tensor
    return {m: from_parts(p) for m, p in out.items()}

"""Robust aggregation (``server.robust``): rules that bound what a few Byzantine clients can do to
a round's aggregate. Pure: tensors in, tensors out (the server applies them to a strategy's updates,
:func:`fedpeft.server.robust_aggregate`).

**Coordinate-wise median and trimmed mean** — Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018. Over the ``n`` clients' values
``x_1 … x_n`` of each coordinate, sorted ``x_(1) ≤ … ≤ x_(n)``::

    med   = x_((n+1)/2)                                  (n odd)
          = (x_(n/2) + x_(n/2+1)) / 2                    (n even)
    trmean_β = 1/(n − 2k) · Σ_{i=k+1}^{n−k} x_(i),   k = ⌊β n⌋,  0 ≤ β < ½

(``k`` as ``scipy.stats.trim_mean`` cuts it). Both are unweighted, as in the paper: a client's
example count does not buy it a larger say. ``β = 0`` is the plain mean.

**Krum and Multi-Krum** — Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. With ``f`` assumed Byzantine
clients among ``n`` and ``d_ij = ‖V_i − V_j‖²``::

    score(i) = Σ_{j ∈ N_i} d_ij,   N_i: the n − f − 2 clients closest to i (j ≠ i)
    Krum       = V_{i*},  i* = argmin_i score(i)
    Multi-Krum = the m clients of lowest score, aggregated (m = 1: Krum)

Krum's guarantee needs ``n > 2f + 2``; a score needs ``n ≥ f + 3`` (:meth:`RobustRule.min_updates`).
Ties go to the lower index (the earlier client in partition order). Multi-Krum's ``m`` defaults
to ``n − f`` and is at most that.

What ``V_i`` is, and what the coordinates are, is the strategy's aggregation space:
:func:`sq_distances` over the flattened tensors a factor-space strategy averages, or
:func:`effective_sq_distances` over the effective updates ``s_k B_k A_k`` (never formed: inner
products of ``out × in`` matrices through ``r × r`` Gram matrices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from fedpeft.lora import LoraFactors

RULES = ("none", "median", "trimmed_mean", "krum", "multi_krum")
COORDINATE_WISE = ("median", "trimmed_mean")  # a value per coordinate from the clients' values
SELECTING = ("krum", "multi_krum")  # a choice of clients, aggregated by the strategy


def coordinate_median(xs: Sequence[Tensor]) -> Tensor:
    """The coordinate-wise median of same-shaped tensors (the mean of the two middle values for an
    even count), in the first tensor's dtype. A tensor every client sent identical (a frozen
    factor) is returned as it is, bit for bit."""
    return _coordinatewise(xs, 0.0, median=True)


def trimmed_mean(xs: Sequence[Tensor], beta: float) -> Tensor:
    """The coordinate-wise β-trimmed mean of same-shaped tensors: per coordinate, the ``⌊β n⌋``
    largest and smallest values are dropped and the rest averaged. Identical tensors are returned
    as they are (a mean of equal floats need not round back to them)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"server.trim_beta: must be in [0, 0.5), got {beta}")
    return _coordinatewise(xs, beta, median=False)


def _coordinatewise(xs: Sequence[Tensor], beta: float, *, median: bool) -> Tensor:
    if not xs:
        raise ValueError("a coordinate-wise rule needs at least one tensor")
    first = xs[0]
    if any(x.shape != first.shape for x in xs):
        raise ValueError(f"a coordinate-wise rule needs same-shaped tensors, got {sorted({tuple(x.shape) for x in xs})}")
    if all(torch.equal(x, first) for x in xs[1:]):
        return first
    n = len(xs)
    s = torch.stack([x.double() for x in xs]).sort(dim=0).values
    if median:
        out = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    else:
        k = int(beta * n)
        out = s[k : n - k].mean(dim=0)
    return out.to(first.dtype)


def krum_scores(d2: Tensor, f: int) -> Tensor:
    """Krum's score of every client from the ``n × n`` squared distances ``d2``: the sum of its
    ``n − f − 2`` smallest distances to the other clients. Needs ``n ≥ f + 3``."""
    n = d2.shape[0]
    k = n - f - 2
    if k < 1:
        raise ValueError(f"server.krum_f: Krum scores need n >= f + 3 updates, got n={n} with f={f}")
    others = d2.double().masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
    return others.sort(dim=1).values[:, :k].sum(dim=1)


def krum_select(d2: Tensor, f: int, m: int = 1) -> list[int]:
    """The ``m`` clients of lowest Krum score (:func:`krum_scores`), lowest first; ties go to the
    lower index. ``m = 1``: Krum; Multi-Krum otherwise (``1 ≤ m ≤ n − f``)."""
    n = d2.shape[0]
    if not 1 <= m <= n - f:
        raise ValueError(f"server.multi_krum_m: must be in [1, n - f] = [1, {n - f}], got {m}")
    scores = krum_scores(d2, f)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return order[:m]


def sq_distances(vectors: Sequence[Sequence[Tensor]]) -> Tensor:
    """``n × n`` squared Euclidean distances between clients, each given as a list of tensors (its
    flattened concatenation is the client's vector; every client's list has the same shapes)."""
    X = torch.stack([torch.cat([t.detach().double().reshape(-1) for t in ts]) if ts else torch.zeros(0, dtype=torch.float64) for ts in vectors])
    sq = (X * X).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2 * X @ X.T).clamp_min(0).fill_diagonal_(0)


def effective_sq_distances(modules: Sequence[Sequence[LoraFactors]], extra: Sequence[Sequence[Tensor]] = ()) -> Tensor:
    """``n × n`` squared distances between the clients' effective updates ``ΔW_k = s_k B_k A_k``,
    summed over modules (one list of the ``n`` clients' factors per module; ranks may differ), plus
    those between same-shaped ``extra`` tensors (a head; one list per client). Never forms
    ``out × in``: ``⟨ΔW_i, ΔW_j⟩_F = s_i s_j Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ)`` and
    ``‖ΔW_i − ΔW_j‖² = G_ii + G_jj − 2 G_ij``."""
    n = len(modules[0]) if modules else len(extra)
    G = torch.zeros(n, n, dtype=torch.float64)
    for factors in modules:
        for i, fi in enumerate(factors):
            Ai, Bi = fi.A.detach().double(), fi.B.detach().double()
            for j in range(i, n):
                fj = factors[j]
                g = fi.scaling * fj.scaling * float(((Bi.T @ fj.B.detach().double()) * (Ai @ fj.A.detach().double().T)).sum())
                G[i, j] += g
                if j != i:
                    G[j, i] += g
    diag = G.diagonal()
    d2 = (diag[:, None] + diag[None, :] - 2 * G).clamp_min(0).fill_diagonal_(0)
    if extra and any(len(ts) for ts in extra):
        d2 = d2 + sq_distances(extra)
    return d2


@dataclass(frozen=True)
class RobustRule:
    """One of :data:`RULES` (not ``none``) with its parameters (``server.*``): ``beta`` (trimmed
    mean's β), ``f`` (Krum's assumed Byzantine count), ``m`` (Multi-Krum's kept count; None: n − f)."""

    kind: str
    beta: float = 0.1
    f: int = 1
    m: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in RULES[1:]:
            raise ValueError(f"server.robust: unknown value {self.kind!r}; expected one of {', '.join(RULES[1:])}")

    @classmethod
    def from_config(cls, server: Any) -> RobustRule | None:
        """From the ``server`` config group; None for ``server.robust=none``."""
        if server.robust == "none":
            return None
        return cls(server.robust, float(server.trim_beta), int(server.krum_f), None if server.multi_krum_m is None else int(server.multi_krum_m))

    def min_updates(self) -> int:
        """The fewest updates the rule is defined on: Krum's ``f + 3``, 1 otherwise."""
        return self.f + 3 if self.kind in SELECTING else 1

    def kept(self, n: int) -> int:
        """How many of ``n`` updates Krum (1) or Multi-Krum (``m``, at most ``n − f``; default ``n − f``) keeps."""
        if self.kind == "krum":
            return 1
        return min(self.m, n - self.f) if self.m is not None else n - self.f

    def combine(self, xs: Sequence[Tensor]) -> Tensor:
        """The coordinate-wise rule over same-shaped tensors (median or trimmed mean)."""
        if self.kind == "median":
            return coordinate_median(xs)
        if self.kind == "trimmed_mean":
            return trimmed_mean(xs, self.beta)
        raise ValueError(f"server.robust={self.kind} selects clients; it has no coordinate-wise value")

    def select(self, d2: Tensor) -> list[int]:
        """The clients Krum or Multi-Krum keeps, from their squared distances ``d2``, in index order."""
        return sorted(krum_select(d2, self.f, self.kept(d2.shape[0])))

    def describe(self) -> str:
        """One line naming the rule and what it reads (the run's banner)."""
        if self.kind == "median":
            return "robust aggregation: coordinate-wise median (Yin et al. 2018)"
        if self.kind == "trimmed_mean":
            return f"robust aggregation: coordinate-wise trimmed mean, β {self.beta} (Yin et al. 2018)"
        m = "" if self.kind == "krum" else f", keeps m={self.m if self.m is not None else 'n − f'}"
        return f"robust aggregation: {self.kind.replace('_', '-')}, f={self.f} assumed Byzantine{m} (Blanchard et al. 2017)"

"""Client LoRA ranks (the ``ranks`` config group): seeded, one per client, logged.

- ``fixed``: every client at ``model.rank``.
- ``levels``: ``levels`` cycled over clients (FLoRA's ``[64,32,16,16,8,8,4,4,4,4]``).
- ``tiers``: ``levels`` with ``proportions`` (e.g. 80% rank 8 / 20% rank 200, FlexLoRA's heavy
  tail); exact counts by largest remainder, then shuffled with the seed.
- ``uniform``: uniform integers in ``[r_min, r_max]`` (HetLoRA's ``[5, 50]``).

Alpha is either ``fixed`` (``model.alpha`` for every rank, so the scaling alpha/r differs) or
``proportional`` (``alpha = model.alpha / model.rank · r``, so every client has one scaling).
"""

from __future__ import annotations

import random
from typing import Any

RANK_KINDS = ("fixed", "list", "tiers", "uniform")
ALPHA_KINDS = ("fixed", "proportional")


def client_ranks(ranks: Any, clients: int, base_rank: int, seed: int) -> list[int]:
    kind = ranks.kind
    if kind == "fixed":
        return [base_rank] * clients
    if kind == "list":
        vals = list(ranks.levels)
        return [vals[i % len(vals)] for i in range(clients)]
    if kind == "tiers":
        vals, props = list(ranks.levels), list(ranks.proportions)
        total = sum(props)
        exact = [p / total * clients for p in props]
        counts = [int(e) for e in exact]
        for i in sorted(range(len(vals)), key=lambda i: exact[i] - counts[i], reverse=True)[: clients - sum(counts)]:
            counts[i] += 1
        out = [v for v, c in zip(vals, counts) for _ in range(c)]
        random.Random(seed).shuffle(out)
        return out
    if kind == "uniform":
        rng = random.Random(seed)
        return [rng.randint(ranks.r_min, ranks.r_max) for _ in range(clients)]
    raise ValueError(f"ranks.kind: unknown value {kind!r}; expected one of {', '.join(RANK_KINDS)}")


def client_alpha(ranks: Any, rank: int, base_rank: int, base_alpha: float) -> float:
    if ranks.alpha == "proportional":
        return base_alpha / base_rank * rank
    return float(base_alpha)


def validate(ranks: Any, need) -> None:
    """Config checks; ``need(ok, key, msg)`` raises a ConfigError naming the key."""
    need(ranks.kind in RANK_KINDS, "ranks.kind", f"unknown value {ranks.kind!r}; expected one of {', '.join(RANK_KINDS)}")
    need(ranks.alpha in ALPHA_KINDS, "ranks.alpha", f"unknown value {ranks.alpha!r}; expected one of {', '.join(ALPHA_KINDS)}")
    if ranks.kind in ("list", "tiers"):
        need(len(ranks.levels) > 0 and all(v >= 1 for v in ranks.levels), "ranks.levels", f"needs positive ranks, got {list(ranks.levels)}")
    if ranks.kind == "tiers":
        need(len(ranks.proportions) == len(ranks.levels) and all(p > 0 for p in ranks.proportions), "ranks.proportions",
             f"needs one positive proportion per rank in ranks.levels, got {list(ranks.proportions)}")
    if ranks.kind == "uniform":
        need(1 <= ranks.r_min <= ranks.r_max, "ranks.r_min", f"needs 1 <= r_min <= r_max, got [{ranks.r_min}, {ranks.r_max}]")

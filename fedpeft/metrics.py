"""What a run's metrics rows (``metrics.jsonl``, one per round) say in one number: the best round,
the traffic in total. The W&B run summary (:func:`fedpeft.tracking.run_summary`) and ``fedpeft
compare`` read them alike. Standard library only: ``fedpeft compare`` starts at once."""

from __future__ import annotations

import math
from typing import Any

LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "epsilon", "seconds", "bytes")


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The row with the best ``metric`` over the trained rounds (1..R; round 0 only if it is all
    there is): min for a loss-like metric (:func:`lower_is_better`), else max. None without it."""
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
    scored = [r for r in scored if int(r["round"]) >= 1] or scored
    if not scored:
        return None
    return (min if lower_is_better(metric) else max)(scored, key=lambda r: r[metric])


def total_mb(rows: list[dict[str, Any]], direction: str) -> float:
    """Total MB sent ``up`` or ``down`` over all rounds (bytes / 1e6)."""
    return sum(float(r.get(f"bytes_{direction}") or 0) for r in rows) / 1e6


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


DIVERGENCE_FACTOR = 10.0  # an evaluation loss this many times round 0's, or not finite: the run diverged


def divergence(rows: list[dict[str, Any]]) -> str | None:
    """The first trained round whose evaluation ``loss`` is not finite or exceeds
    :data:`DIVERGENCE_FACTOR` × round 0's (the model before training), said in one line; None if no
    round did (or there is no round 0 loss to compare with). A learning rate far too high (e.g.
    ``train.lr=1000``) ends so, its accuracy below the majority class, while every round "succeeds"."""

    start = next((r.get("loss") for r in rows if r.get("round") == 0), None)
    if not isinstance(start, (int, float)) or not math.isfinite(start) or start <= 0:
        return None
    for r in rows:
        loss = r.get("loss")
        if int(r.get("round", 0)) < 1 or not isinstance(loss, (int, float)) or isinstance(loss, bool):
            continue
        if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * start:
            return (f"diverged: round {r['round']}'s evaluation loss {loss:.4g} is "
                    + ("not finite" if not math.isfinite(loss) else f"{loss / start:.0f}x round 0's {start:.4g}")
                    + f" (the rule: above {DIVERGENCE_FACTOR:g}x round 0's, or not finite); lower train.lr")
    return None

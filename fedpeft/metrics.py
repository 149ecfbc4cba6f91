"""What a run's metrics rows (``metrics.jsonl``, one per round) say in one number: the best round,
the traffic in total. The W&B run summary (:func:`fedpeft.tracking.run_summary`) and ``fedpeft
compare`` read them alike. Standard library only: ``fedpeft compare`` starts at once."""

from __future__ import annotations

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

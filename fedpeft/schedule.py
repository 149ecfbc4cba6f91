"""The learning rate over a run's rounds (``train.lr_schedule``): one value per round, sent by the
server with each train message and recorded in the round's metrics row.

``cosine`` is FlowerTune's per-round cosine annealing (``examples/flowertune-llm``:
``lr_min + ½ (lr − lr_min)(1 + cos(π · round / rounds))``, rounds counted from 1, so the last
round trains at ``lr_min``); ``linear`` falls from ``lr`` to ``lr_min`` on the same clock. With
``warmup_rounds = W`` the first W rounds rise linearly, ``lr · round / W`` (round W trains at
``lr``), and the decay runs over the remaining ``rounds − W`` rounds.
"""

from __future__ import annotations

import math


def scheduled(schedule: str, warmup_rounds: int) -> bool:
    """Whether the learning rate changes over the rounds (otherwise every round trains at ``train.lr``
    and the messages carry no lr: a constant run is unchanged, bytes included)."""
    return schedule != "constant" or warmup_rounds > 0


def lr_at(server_round: int, rounds: int, lr: float, lr_min: float = 0.0, schedule: str = "constant", warmup_rounds: int = 0) -> float:
    """The learning rate of round ``server_round`` (1-based) of ``rounds``."""
    if not 1 <= server_round:
        raise ValueError(f"server round must be at least 1, got {server_round}")
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"train.lr_schedule: unknown value {schedule!r}; expected constant, cosine or linear")
    if server_round <= warmup_rounds:
        return lr * server_round / warmup_rounds
    if schedule == "constant":
        return lr
    t = min((server_round - warmup_rounds) / max(rounds - warmup_rounds, 1), 1.0)  # a resumed run may go past rounds
    if schedule == "cosine":
        return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * t))
    return lr - (lr - lr_min) * t

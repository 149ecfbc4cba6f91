"""Byzantine clients (``profile.byzantine``, ``profile.attack``): who attacks, and what an attacker
replies instead of its honest update. Pure: tensors in, tensors out; the client mod
:func:`clients.app.byzantine` applies it after honest training.

The attackers are a fixed set: ``round(byzantine · clients)`` partition ids drawn once from the
run's seed (:func:`attackers`), the same every round, in simulation and deployment. An attacker
trains honestly, then replaces each tensor it sends, ``θ`` (started from the global ``θ_g`` it
received; its update is ``Δ = θ − θ_g``), by

    sign_flip   θ_g − Δ  = 2 θ_g − θ                  (the reversed update)
    scale       θ_g + λ Δ                             (λ = profile.attack_scale)
    gaussian    θ_g + ε,   ε ~ N(0, σ² I)             (σ = profile.attack_std; the update replaced by noise,
                                                       Blanchard et al. 2017's Gaussian Byzantine workers)
    fixed       v · 𝟙                                 (v = profile.attack_value: every attacker sends the
                                                       same fixed model, whatever the global one)

Only the tensors the client sends move (a factor the strategy keeps frozen is not sent).
"""

from __future__ import annotations

import random
from typing import Mapping

import torch
from torch import Tensor

ATTACKS = ("sign_flip", "scale", "gaussian", "fixed")


def attacker_count(byzantine: float, clients: int) -> int:
    """``byzantine · clients`` rounded to the nearest integer (halves up)."""
    return int(byzantine * clients + 0.5)


def attackers(seed: int, clients: int, byzantine: float) -> frozenset[int]:
    """The partition ids that attack: :func:`attacker_count` of them, drawn once from ``seed``."""
    k = attacker_count(byzantine, clients)
    return frozenset(random.Random(f"byzantine/{seed}").sample(range(clients), k)) if k else frozenset()


def attack(kind: str, sent: Mapping[str, Tensor], start: Mapping[str, Tensor], *, scale: float = 10.0, std: float = 1.0,
           value: float = 0.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """What an attacker sends instead of ``sent`` (keyed tensors), given the ``start`` it trained
    from (same keys and shapes): see the module's table. ``generator`` seeds ``gaussian``."""
    if kind not in ATTACKS:
        raise ValueError(f"profile.attack: unknown value {kind!r}; expected one of {', '.join(ATTACKS)}")
    out = {}
    for key, t in sent.items():
        g = start[key].to(dtype=t.dtype, device=t.device)
        if kind == "sign_flip":
            out[key] = 2 * g - t
        elif kind == "scale":
            out[key] = g + scale * (t - g)
        elif kind == "gaussian":
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(dtype=t.dtype, device=t.device)
            out[key] = g + std * noise
        else:
            out[key] = torch.full_like(t, value)
    return out

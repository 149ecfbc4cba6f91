"""LoRA-XS (Bałazy et al., 2024), the parametrisation Fed-SB trains (Singhal et al., "Fed-SB: A
Silver Bullet for Extreme Communication Efficiency and Performance in (Private) Federated LoRA
Fine-Tuning", 2025, after LoRA-SB): ``ΔW = B₀ R A₀`` with ``A₀ = √S_r V_rᵀ`` and ``B₀ = U_r √S_r``
frozen, from the truncated SVD of each pre-trained weight (so every party computes the same ones),
and only the small ``r × r`` matrix ``R`` trained and sent.

peft builds it as TinyLoRA (Morris et al., 2026), which writes ``R = Σ_i v_i P_i`` with fixed seeded
projections ``P_i``: with ``u = r²`` (``peft.u`` null) the ``P_i`` span every ``r × r`` matrix, so
``v`` (``r²`` numbers per module, group ``core``) is ``R`` in another basis, and ``R`` is linear in
``v``: averaging ``v`` averages ``R`` exactly. Fed-SB initialises ``A₀``, ``B₀`` from a gradient step
(LoRA-SB); here they come from ``W`` (LoRA-XS), as peft does."""

from __future__ import annotations

import warnings

from fedpeft.methods.base import PeftMethod


def _lora_xs(model, peft, task_type):
    from peft import TinyLoraConfig  # here, not at import: listing the methods needs no peft
    u = peft.u if peft.u is not None else model.rank**2
    with warnings.catch_warnings():  # the projections are regenerated from projection_seed, by design
        warnings.filterwarnings("ignore", message="Specified to not save projection tensors")
        return TinyLoraConfig(task_type=task_type, r=model.rank, u=u, weight_tying=0.0, target_modules=list(model.target_modules),
                              tinylora_dropout=model.dropout, projection_seed=0, save_projection=False)


METHODS = [
    PeftMethod("lora_xs", _lora_xs, {"frozen": r"\.tinylora_[ABP]$", "core": r"tinylora_v\.\d+$"},
               about="ΔW = B₀·R·A₀ (A₀, B₀ frozen from W's SVD; R is r×r)", options=("u",)),
]

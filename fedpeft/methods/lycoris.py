"""LyCORIS-style low-rank updates in peft: LoHa (Hyeon-Woo et al., ICLR 2022: ``ΔW = (B₁A₁) ⊙ (B₂A₂)``)
and LoKr (Yeh et al., ICLR 2024: ``ΔW = W₁ ⊗ (B₂A₂)``). Their factors are not ``B·A``: FedAvg
averages them elementwise (an approximation of the average update, as FedIT's is for LoRA)."""

from __future__ import annotations

from fedpeft.methods.base import PeftMethod


def _loha(model, peft, task_type):
    from peft import LoHaConfig  # here, not at import: listing the methods needs no peft
    return LoHaConfig(task_type=task_type, r=model.rank, alpha=model.alpha, target_modules=list(model.target_modules))


def _lokr(model, peft, task_type):
    from peft import LoKrConfig  # here, not at import: listing the methods needs no peft
    return LoKrConfig(task_type=task_type, r=model.rank, alpha=model.alpha, target_modules=list(model.target_modules))


METHODS = [
    PeftMethod("loha", _loha, {"factors": r"\.hada_w[12]_[ab]$"}, about="ΔW = (B₁A₁)⊙(B₂A₂)"),
    PeftMethod("lokr", _lokr, {"factors": r"\.lokr_w(1|2)(_[ab])?$"}, about="ΔW = W₁⊗(B₂A₂)"),
]

"""(IA)³ (Liu et al., NeurIPS 2022): a learned vector rescales each target module's activations
(its output, or its input for the modules in ``peft.feedforward_modules``)."""

from __future__ import annotations

from fedpeft.methods.base import PeftMethod


def _ia3(model, peft, task_type):
    from peft import IA3Config  # here, not at import: listing the methods needs no peft
    targets = list(model.target_modules)
    ff = list(peft.feedforward_modules or [])
    return IA3Config(task_type=task_type, target_modules=targets + [m for m in ff if m not in targets], feedforward_modules=ff)


METHODS = [PeftMethod("ia3", _ia3, {"vector": r"\.ia3_l$"}, about="h ← l ⊙ h", options=("feedforward_modules",))]

"""BitFit (Ben Zaken et al., ACL 2022): only the bias terms are trained.

peft has no BitFit config; its LoRA option ``bias="all"`` marks every bias term trainable and
writes them with the adapter (``save_pretrained``, ``PeftModel.from_pretrained``). peft needs a
target module, so the config carries a rank-1 LoRA on the first target module whose ``B`` stays
at its zero init: it is frozen (``ΔW = 0`` exactly), never sent, and only the biases travel."""

from __future__ import annotations

from fedpeft.methods.base import PeftMethod


def _bitfit(model, peft, task_type):
    from peft import LoraConfig  # here, not at import: listing the methods needs no peft
    return LoraConfig(task_type=task_type, r=1, lora_alpha=1, target_modules=[model.target_modules[0]], bias="all")


METHODS = [
    # peft's bias="all" also lists the head's bias under its wrapper's two copies: the head carries it
    PeftMethod("bitfit", _bitfit, {"frozen": r"\.lora_[AB]\.weight$|\.(original_module|modules_to_save)\.bias$", "bias": r"\.bias$"},
               freeze=r"\.lora_[AB]\.", opacus=True,
               about="bias terms only"),
]

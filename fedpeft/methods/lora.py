"""LoRA (Hu et al., ICLR 2022), rsLoRA (Kalajdzievski 2023: scaling α/√r) and DoRA (Liu et al.,
ICML 2024: ``W' = m · (W + s·B·A) / ‖W + s·B·A‖_c``, a trained magnitude per output column).
All three update through ``s·B·A``; DoRA's magnitude is a vector averaged like FedAvg."""

from __future__ import annotations

from fedpeft.methods.base import PeftMethod

FACTORS = {"lora_A": r"\.lora_A\.weight$", "lora_B": r"\.lora_B\.weight$"}


def _lora(rslora: bool = False, dora: bool = False):
    def config(model, peft, task_type):
        from peft import LoraConfig  # here, not at import: listing the methods needs no peft
        return LoraConfig(
            task_type=task_type, r=model.rank, lora_alpha=model.alpha, lora_dropout=model.dropout,
            target_modules=list(model.target_modules), use_rslora=rslora, use_dora=dora,
        )

    return config


METHODS = [
    PeftMethod("lora", _lora(), FACTORS, lora_update=True, opacus=True, about="ΔW = (α/r)·B·A"),
    PeftMethod("rslora", _lora(rslora=True), FACTORS, lora_update=True, opacus=True, about="ΔW = (α/√r)·B·A"),
    PeftMethod("dora", _lora(dora=True), {**FACTORS, "vector": r"\.lora_magnitude_vector$"}, lora_update=True,
               about="W' = m·(W + s·B·A)/‖W + s·B·A‖ (magnitude m averaged)"),
]

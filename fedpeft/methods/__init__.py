"""PEFT methods: one small module per family declares, for each method, the peft config it builds,
which tensors of peft's state dict a client trains and sends, and how they group.

Every tensor travels under its state-dict name, as ``get_peft_model_state_dict`` returns it (the
``base_model.model.`` prefix dropped). The groups:

* ``lora_A`` / ``lora_B`` — LoRA factors per module (``ΔW = s·B·A``): the LoRA-structured
  strategies (FFA-LoRA, HetLoRA, FLoRA, FlexLoRA, …) work on these;
* ``vector`` — one vector per module (DoRA's magnitude, IA3's scalings, VeRA's λ's);
* ``factors`` — other per-module factors (LoHa's Hadamard factors, LoKr's Kronecker factors);
* ``core`` — LoRA-XS's ``r × r`` core between frozen factors (Fed-SB), in its peft coordinates;
* ``embeddings`` — virtual-token embeddings (prompt and prefix tuning);
* ``bias`` — bias terms (BitFit);
* ``head`` — the task head, found through peft's own ``modules_to_save``;
* ``frozen`` — in the state dict but never trained or sent (LoRA-XS's frozen factors, BitFit's placeholder).

Everything but the LoRA factors is averaged elementwise by every strategy (FedAvg's rule); a
trainable tensor that matches no group is an error naming it, never silently "head".
"""

from __future__ import annotations

import importlib
import pkgutil

from fedpeft.methods.base import GROUPS, PeftMethod

__all__ = ["GROUPS", "METHODS", "PeftMethod", "get", "lora_update_methods"]


def _registry() -> dict[str, PeftMethod]:
    """Every method of every module of this package, by name: a module registers its methods by
    ending with ``METHODS = [PeftMethod(...), ...]`` (``base`` and modules whose name starts with
    ``_`` are helpers). A new PEFT method is one file here."""
    out: dict[str, PeftMethod] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if not isinstance(getattr(mod, "METHODS", None), (list, tuple)):
            raise TypeError(f"{mod.__name__}: a PEFT method module ends with METHODS = [PeftMethod(...), ...]")
        for m in mod.METHODS:
            if m.name in out:
                raise TypeError(f"PEFT method {m.name!r} is declared twice ({mod.__name__} and another module of fedpeft.methods)")
            out[m.name] = m
    return out


METHODS: dict[str, PeftMethod] = _registry()


def get(name: str) -> PeftMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"peft.name: unknown PEFT method {name!r}; expected one of {', '.join(METHODS)}") from None


def lora_update_methods() -> list[str]:
    return [n for n, m in METHODS.items() if m.lora_update]

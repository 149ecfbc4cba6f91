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

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

GROUPS = ("lora_A", "lora_B", "vector", "factors", "core", "embeddings", "bias", "head", "frozen")


@dataclass(frozen=True)
class PeftMethod:
    """``config(model_cfg, peft_cfg, task_type)`` builds the peft config; ``groups`` maps a group to
    the regex its state-dict names match (``re.search``); ``lora_update``: the update is
    ``s·B·A`` (what the LoRA-structured strategies need); ``freeze``: regex of parameter names
    trained by peft's config but kept frozen (BitFit's placeholder LoRA)."""

    name: str
    config: Callable[[Any, Any, Any], Any]
    groups: Mapping[str, str]
    lora_update: bool = False
    freeze: str | None = None
    # Sample-level DP-SGD (privacy=sample) needs Opacus's per-example gradients of every trained
    # tensor; Opacus 1.6 has them for Linear, Embedding and LayerNorm, not for peft's own layers.
    opacus: bool = False
    tasks: tuple[str, ...] = ("classification", "causal_lm")
    about: str = ""
    options: tuple[str, ...] = field(default=())  # the peft.* keys it reads

    def group_of(self, key: str, head_modules: tuple[str, ...] = ()) -> str | None:
        """The group of state-dict name ``key``: the task head when its module is one of peft's
        ``modules_to_save``, else the first declared group whose pattern matches; None if none."""
        parts = key.split(".")
        if head_modules and len(parts) >= 2 and parts[-2] in head_modules:
            return "head"
        for group, pattern in self.groups.items():
            if re.search(pattern, key):
                return group
        return None


def _registry() -> dict[str, PeftMethod]:
    """Every method of every module of this package, by name: a module registers its methods by
    ending with ``METHODS = [PeftMethod(...), ...]`` (modules whose name starts with ``_`` are
    helpers). A new PEFT method is one file here."""
    import importlib
    import pkgutil

    out: dict[str, PeftMethod] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
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

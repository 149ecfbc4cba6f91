"""What every PEFT method module declares: :class:`PeftMethod` and the tensor :data:`GROUPS`
(described in :mod:`fedpeft.methods`). The method modules import it from here, and the package
collects their ``METHODS``."""

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

"""Prompt tuning (Lester et al., EMNLP 2021: trained virtual-token embeddings prepended to the
input) and prefix tuning (Li & Liang, ACL 2021: trained key/value prefixes in every layer, stored
by peft as one embedding of ``num_virtual_tokens × (layers · 2 · hidden)``)."""

from __future__ import annotations

from fedpeft.methods.base import PeftMethod

EMBEDDINGS = {"embeddings": r"^prompt_embeddings$"}


def _prompt(model, peft, task_type):
    from peft import PromptTuningConfig  # here, not at import: listing the methods needs no peft
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)


def _prefix(model, peft, task_type):
    from peft import PrefixTuningConfig  # here, not at import: listing the methods needs no peft
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)


METHODS = [
    PeftMethod("prompt_tuning", _prompt, EMBEDDINGS, about="virtual-token embeddings", options=("num_virtual_tokens",)),
    PeftMethod("prefix_tuning", _prefix, EMBEDDINGS, opacus=True, about="per-layer key/value prefixes", options=("num_virtual_tokens",)),
]

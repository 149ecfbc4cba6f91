"""Server strategies as pure math over torch tensors (no Flower, Ray or I/O).

Each method is one module; :func:`build` returns the strategy a config names.
"""

from __future__ import annotations

from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Payload, Strategy
from strategies.dp_lora import DPLoRA
from strategies.fed_sb import FedSB
from strategies.fedavg import FedAvg
from strategies.federa import FeDeRA
from strategies.fedex_lora import FedExLoRA
from strategies.fedsa_lora import FedSALoRA
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.rolora import RoLoRA

REGISTRY: dict[str, type] = {
    "fedavg": FedAvg,
    "ffa_lora": FFALoRA,
    "hetlora": HetLoRA,
    "flora": FLoRA,
    "flexlora": FlexLoRA,
    "dp_lora": DPLoRA,
    "fedex_lora": FedExLoRA,
    "rolora": RoLoRA,
    "federa": FeDeRA,
    "fedsa_lora": FedSALoRA,
    "fed_sb": FedSB,
}


def personalized(name: str) -> bool:
    """Whether strategy ``name`` evaluates each client's own model on a held-out split of its
    partition (``personalized``, FedSA-LoRA) instead of one global model on the server."""
    return bool(getattr(REGISTRY[name], "personalized", False))


def build(name: str, **kwargs) -> Strategy:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"strategy.name: unknown strategy {name!r}; expected one of {', '.join(REGISTRY)}") from None
    return cls(**kwargs)


__all__ = [
    "ClientSpec",
    "ClientUpdate",
    "GlobalModel",
    "Payload",
    "Strategy",
    "FedAvg",
    "FFALoRA",
    "HetLoRA",
    "FLoRA",
    "FlexLoRA",
    "DPLoRA",
    "FedExLoRA",
    "RoLoRA",
    "FeDeRA",
    "FedSALoRA",
    "FedSB",
    "build",
    "personalized",
    "REGISTRY",
]

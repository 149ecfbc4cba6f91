"""The strategy protocol: what every method implements, over plain tensors.

The server keeps a :class:`GlobalModel` (the global adapter's LoRA factors plus any trained
non-LoRA tensors such as a classification head). Each round a strategy

1. builds each sampled client's :class:`Payload` from the global model and the client's
   :class:`ClientSpec` (its rank, for example), and
2. folds the clients' :class:`ClientUpdate` s into the next :class:`GlobalModel`.

Both are pure: they return new objects and never mutate their inputs. The Flower adapter in
``fedpeft.server`` turns any strategy into a Flower ``Strategy`` with per-node messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from fedpeft.lora import Adapter


@dataclass(frozen=True)
class GlobalModel:
    adapter: Adapter
    head: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientSpec:
    """What the server knows of a client when it builds its payload."""

    client_id: int  # the client's partition id
    rank: int
    alpha: float


@dataclass(frozen=True)
class Payload:
    """What one client receives: the adapter to start from, the head, and instructions."""

    adapter: Adapter
    head: dict[str, Tensor] = field(default_factory=dict)
    # Strategy instructions to the client (e.g. {"freeze_A": True}); plain scalars only.
    instructions: dict[str, int | float | str | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after local training."""

    client_id: int
    adapter: Adapter
    head: dict[str, Tensor]
    num_examples: int


class Strategy(Protocol):
    name: str

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload: ...

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel: ...

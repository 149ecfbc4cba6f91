"""FLoRA — Wang, Shen, Xu, Xu, Feng, Wang & Zhou, "FLoRA: Federated Fine-Tuning Large Language
Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024.

Noise-free aggregation by stacking: every round each client trains a *fresh* LoRA of its own rank on
the current merged base; the server stacks the updates

    B_t = [B_1 | … | B_K],   A_t = [p_1 s_1 A_1; …; p_K s_K A_K]      (rank Σ r_k, scaling 1)
    ⇒ B_t A_t = Σ_k p_k s_k B_k A_k                                    (exactly)

(:func:`fedpeft.lora.stack`) and merges it into the base: ``W_t = W_0 + Σ_{i≤t} B_i A_i``. The
server's state is ``GlobalModel(adapter={}, merges=(stack_1, …, stack_t))``; a client of round t
trains on base version ``t = len(merges)`` (the Flower adapter ships the merges it lacks). Under
partial participation every client of a round gets the same merged base.

Fresh init: the payload's adapter is empty and the plan's ``init_seed =
seed · 1_000_003 + client_id · 7919 + version`` — deterministic, and different for every client and
every round (the version grows by one per round; two (client, round) pairs only collide after
7919 rounds). The head is averaged with ``p_k`` like FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fedpeft.lora import delta, stack
from fedpeft.plan import ClientPlan
from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Payload, Strategy
from strategies.fedavg import client_weights
from strategies.ffa_lora import HETERO_PRIVACY_MODES, average_head, module_factors


def flora_init_seed(seed: int, client_id: int, version: int) -> int:
    return seed * 1_000_003 + client_id * 7919 + version


def merged_delta(model: GlobalModel) -> dict[str, Tensor]:
    """Dense ``Σ_i B_i A_i`` per module over all merges (``out × in`` each: tests and small shapes only)."""
    out: dict[str, Tensor] = {}
    for merge in model.merges:
        for name, f in merge.items():
            out[name] = out[name] + delta(f) if name in out else delta(f)
    return out


@dataclass(frozen=True)
class FLoRA(Strategy):
    weighting: str = "num_examples"
    seed: int = 0
    name: str = "flora"
    no_proximal: ClassVar[str] = ("its clients start every round from a fresh adapter (random A, zero B), not from a global one: "
                                  "the proximal point would be that init, so μ would only shrink the update towards it")
    heterogeneous_ranks: ClassVar[bool] = True
    privacy_modes: ClassVar[tuple[str, ...]] = HETERO_PRIVACY_MODES
    lora_update_only: ClassVar[bool] = True  # aggregates ΔW = s·B·A: peft=lora, rslora or dora
    no_secure_aggregation: ClassVar[str | None] = "it stacks each client's factors, which a masked sum does not reveal"
    no_server_optimizer: ClassVar[str] = ("it merges each round's stacked client updates into the base and restarts the adapter: "
                                          "the change of its factors is not the update")
    effective_updates: ClassVar[str] = "it merges the stacked products s_k·B_k·A_k into the base: a median of each factor is not one of products"

    def init(self, model: GlobalModel) -> GlobalModel:
        """Drop the server's adapter (every round starts fresh); keep the head and any merges."""
        return GlobalModel(adapter={}, head=model.head, merges=model.merges)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        return Payload(
            adapter={},
            head=model.head,
            plan=ClientPlan(init_seed=flora_init_seed(self.seed, client.client_id, model.version)),
            base_version=model.version,
        )

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        if not updates:
            return model
        p = client_weights(updates, self.weighting)
        names = list(updates[0].adapter)
        for u in updates[1:]:
            if set(u.adapter) != set(names):
                raise ValueError(
                    f"client {u.client_id}: update's modules {sorted(u.adapter)} differ from client "
                    f"{updates[0].client_id}'s {sorted(names)}"
                )
        merged = {name: stack(module_factors(updates, name), p) for name in names}
        return GlobalModel(adapter={}, head=average_head(model, updates, p), merges=model.merges + (merged,))

"""FLASC — Kuo, Raje, Rajesh & Smith, "Federated LoRA with Sparse Communication", 2024
(arXiv:2406.05233; the authors' code: github.com/imkevinkuo/flasc).

Clients fine-tune the whole LoRA module (and the head) densely; only what travels is sparse, with
separate densities down and up. With P the global tensors (every entry of every A, B and head
tensor, N in all) and TopK_d(x) the k = max(1, ⌈d·N⌉) entries of largest magnitude among all of
them together (one mask over the whole adapter, as the authors' code chooses it; the rest 0):

    download:  P̃ = TopK_{d_down}(P)                        (the same for every client)
    client k:  trains from P̃ to P_k, densely;  uploads Δ_k = TopK_{d_up}(P_k − P̃)
    server:    P ← P + Σ_k p_k Δ_k,   p_k = n_k / Σ_j n_j  (or 1/K, the paper's mean)

The server keeps its dense P: the entries it did not send stay as they were, since
P + Σ_k p_k Δ_k = (P − P̃) + Σ_k p_k (P̃ + Δ_k), and ``P̃ + Δ_k`` is the update the server decodes
from client k's reply (:func:`fedpeft.messages.decode` against what it sent). Nothing that is not
sent is carried to a later round, on either side: the algorithm has no error feedback. The paper
steps P along Σ_k p_k Δ_k with a server optimizer (Adam by default in the authors' code): here
``server.optimizer=fedadam`` (:mod:`fedpeft.serveropt`) steps along exactly that change.

How it differs from ``compression=topk`` (:mod:`fedpeft.compression`): that codec sparsifies the
upload only (``compression.downlink`` takes no top-k: a sparse broadcast decoded as the global
model would zero every unsent entry of the aggregate each round), keeps k entries of *each*
tensor, and by default carries what it did not send into the client's next update (error
feedback). FLASC sparsifies both ways at separate densities, chooses the k entries among all of a
message's tensors together, keeps no residual anywhere, and its server keeps the unsent entries.
Both travel in the codec's wire format (``<key>#idx`` int32 + ``<key>#val`` float32: 8 bytes per
entry sent), so ``bytes_down`` / ``bytes_up`` count the sparse encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fedpeft.compression import densify, topk_sparsify_joint
from fedpeft.lora import Adapter, LoraFactors
from strategies.base import ClientPlan, ClientSpec, ClientUpdate, GlobalModel, Payload
from strategies.fedavg import FedAvg


def downloaded(model: GlobalModel, density: float) -> tuple[Adapter, dict[str, Tensor]]:
    """``P̃ = TopK_density(P)``: the global adapter and head with all but the k = max(1, ⌈density·N⌉)
    entries of largest magnitude among all their N entries set to 0 (scalings kept)."""
    tensors = {f"{part}/{m}": getattr(f, part) for m, f in model.adapter.items() for part in ("A", "B")}
    tensors.update({f"head/{h}": t for h, t in model.head.items()})
    kept = {k: densify(idx, val, tuple(tensors[k].shape)) for k, (idx, val) in topk_sparsify_joint(tensors, density).items()}
    adapter = {m: LoraFactors(kept[f"A/{m}"], kept[f"B/{m}"], f.scaling) for m, f in model.adapter.items()}
    return adapter, {h: kept[f"head/{h}"] for h in model.head}


@dataclass(frozen=True)
class FLASC(FedAvg):
    # The share of the global adapter's entries (all tensors together, largest magnitude) sent to each client, in (0, 1].
    density_down: float = 0.25
    # The share of each client's update entries (all tensors together, largest magnitude) it sends back, in (0, 1].
    density_up: float = 0.25
    name: str = "flasc"
    # the server's central-DP wrapper clips a reply's change from the dense global model, which a sparse download is not
    privacy_modes: ClassVar[tuple[str, ...]] = ("none", "sample", "local")
    sparse_messages: ClassVar[str] = "it sparsifies its messages both ways itself, at strategy.density_down and strategy.density_up"
    no_secure_aggregation: ClassVar[str] = "each client sends its own top-k entries (indices and values), and SecAgg+ sums same-shaped dense vectors"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("density_down", "density_up"):
            d = getattr(self, key)
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
                raise ValueError(f"strategy.{key}: must be a number in (0, 1] (1: dense), got {d!r}")

    def sparse_links(self) -> tuple[float, float]:
        return float(self.density_down), float(self.density_up)

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        adapter, head = downloaded(model, self.density_down)
        return Payload(adapter=adapter, head=head, plan=ClientPlan(proximal=self.proximal(), upload_density=float(self.density_up)))

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        """``P ← (P − P̃) + Σ_k p_k U_k`` with ``U_k = P̃ + Δ_k`` each client's decoded update."""
        if not updates:
            return model
        mean = super().aggregate(model, updates)  # Σ_k p_k U_k
        sent, sent_head = downloaded(model, self.density_down)
        adapter = {
            m: LoraFactors(f.A - sent[m].A + mean.adapter[m].A, f.B - sent[m].B + mean.adapter[m].B, f.scaling)
            for m, f in model.adapter.items()
        }
        head = {h: t - sent_head[h] + mean.head[h] for h, t in model.head.items()}
        return GlobalModel(adapter=adapter, head=head)

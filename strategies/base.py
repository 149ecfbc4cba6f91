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
from typing import ClassVar, Protocol

from torch import Tensor

from fedpeft.lora import Adapter
from fedpeft.plan import ClientPlan, ClientUpdate, Payload  # noqa: F401  (re-exported: the neutral types)


@dataclass(frozen=True)
class GlobalModel:
    """The server's state. ``adapter`` may be empty (FLoRA keeps everything in ``merges``).

    ``merges``: stacked factors (scaling 1) merged into the base weights, in order;
    ``W_t = W_0 + Σ_i B_i A_i``. ``len(merges)`` is the base version clients must train on.
    ``aggregations``: how many rounds this state has aggregated, for a strategy whose payload depends
    on it (RoLoRA alternates the factor it trains); saved and resumed with the rest, left 0 by the
    strategies that do not count.
    """

    adapter: Adapter
    head: dict[str, Tensor] = field(default_factory=dict)
    merges: tuple[Adapter, ...] = ()
    aggregations: int = 0

    @property
    def version(self) -> int:
        return len(self.merges)


@dataclass(frozen=True)
class ClientSpec:
    """What the server knows of a client when it builds its payload."""

    client_id: int  # the client's partition id
    rank: int
    alpha: float
    rslora: bool = False  # scaling α/√r (peft=rslora) instead of α/r

    @property
    def scaling(self) -> float:
        """The client's peft scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
        from fedpeft.lora import scaling_for

        return scaling_for(self.rank, self.alpha, self.rslora)


class Strategy(Protocol):
    """A strategy also declares what it accepts; the config validation and the server's reply
    checks read these declarations, never a list kept elsewhere."""

    name: str
    weighting: str
    weightings: ClassVar[tuple[str, ...]]  # the values ``strategy.weighting`` may take
    heterogeneous_ranks: ClassVar[bool]  # whether clients may have different ranks and scalings
    privacy_modes: ClassVar[tuple[str, ...]]  # the ``privacy.mode`` values it works with
    # True: it aggregates LoRA factors (ΔW = s·B·A) and takes only the PEFT methods whose update
    # is one (fedpeft.methods: lora, rslora, dora); False: any method's tensors (FedAvg's rule).
    lora_update_only: ClassVar[bool]
    # Optional: ``privacy_default = (group option, target ε)`` is applied when the user chooses no
    # privacy group and no noise (``fedpeft.config.strategy_defaults``); DP-LoRA has one.
    # Optional: ``engines: ClassVar[tuple[str, ...]]``, the ``engine.kind`` values it works with
    # (default: all); RoLoRA's ``freeze_B`` is not batched by the cohort engine.
    # Optional: ``needs_base_weights: ClassVar[bool]``; when true the server calls
    # ``init(model, base_weights={module: W [out × in]})`` with its frozen pre-trained weights (FeDeRA).
    # Optional: ``lora_update_only: ClassVar[bool]``, the method's update is ``s·B·A`` (LoRA's).
    # Optional: ``trained_share: ClassVar[dict[str, float]]``, the share of a group's parameters a
    # client trains in a round, averaged over rounds (default 1): FFA-LoRA's frozen A is 0, RoLoRA's
    # alternating factors ½ each. The run's "trained parameters" (banner, summary) use it.

    def reply_ranks(self, rank: int) -> tuple[int, ...]:
        """The ranks a client given ``rank`` may answer with (HetLoRA's clients may prune)."""
        ...

    def init(self, model: GlobalModel) -> GlobalModel:
        """The starting state, from the server's freshly initialized peft adapter (at ``model.rank``).
        A strategy that declares ``needs_base_weights`` takes ``base_weights`` as well."""
        ...

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload: ...

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel: ...

    # Optional: ``round_metrics(model, updates) -> {name: float}``, diagnostics of the round's
    # aggregation that the server logs with the round's metrics (FedAvg's ``factor_avg_error``).
    # Optional: ``personalized = True`` (a ClassVar; FedSA-LoRA): clients keep their own state and
    # the global model alone is not a model, so every client trains on 80% of its partition and
    # evaluates its own model on the other 20% (``fedpeft.data.held_out``); the run reports those.

"""The strategy base class and registry: what every method implements, over plain tensors.

The server keeps a :class:`GlobalModel` (the global adapter's LoRA factors plus any trained
non-LoRA tensors such as a classification head). Each round a strategy

1. builds each sampled client's :class:`Payload` from the global model and the client's
   :class:`ClientSpec` (its rank, for example), and
2. folds the clients' :class:`ClientUpdate` s into the next :class:`GlobalModel`.

Both are pure: they return new objects and never mutate their inputs. The Flower adapter in
``fedpeft.server`` turns any strategy into a Flower ``Strategy`` with per-node messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from torch import Tensor

from fedpeft.lora import Adapter
from fedpeft.plan import ClientPlan, ClientUpdate, Payload, Proximal  # noqa: F401  (re-exported: the neutral types)


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


class ServerState:
    """What a strategy keeps on the server between rounds beside its :class:`GlobalModel`; this
    base keeps nothing. The server makes one per run (:meth:`Strategy.server_state`), asks it for
    each client's spec before it builds that client's payload (:meth:`spec`), tells it the updates
    of each applied round (:meth:`applied`), and saves and resumes it with the run: the keys of
    :meth:`state_dict` join the server's saved state at its top level, and :meth:`load_state_dict`
    reads them from that state (a key it lacks, in a state saved before the key existed, leaves the
    default). HetLoRA's :class:`strategies.hetlora.PrunedRanks` is one."""

    def spec(self, spec: ClientSpec) -> ClientSpec:
        """The spec client ``spec.client_id``'s payload is built for this round (by default the run's)."""
        return spec

    def applied(self, sent: list[tuple[ClientSpec, ClientUpdate]]) -> None:
        """An applied round's accepted updates, each with the spec its payload was built for, in
        partition order. A round that is not applied (too few good replies) does not come here."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Read this state's keys from the server's saved state ``state``."""


WEIGHTINGS = ("num_examples", "uniform")  # the weightings every strategy can compute (fedavg.client_weights)
PRIVACY_MODES = ("none", "sample", "local", "central")

# The registered strategies by name, filled by :class:`Strategy`'s subclasses as they are defined;
# ``strategies/__init__.py`` imports every module of the package, so this is every strategy.
REGISTRY: dict[str, type["Strategy"]] = {}

# The dataclass fields a strategy takes from the run rather than from ``strategy.*``.
RUN_FIELDS = ("name", "seed")  # ``name`` is the config option itself; ``seed`` is the run's ``seed``


class Strategy:
    """The base of every strategy: what each one implements and declares, with the defaults a
    strategy that declares nothing gets. Config validation, the server and its reply checks read
    these declarations as attributes, never a list kept elsewhere.

    **Registration.** A subclass that sets its own ``name`` (a frozen dataclass whose field
    ``name: str = "<name>"`` is the ``strategy=<name>`` option) registers itself in
    :data:`REGISTRY` when it is defined; a subclass that inherits its parent's ``name`` is a helper
    and is not registered. Its other dataclass fields with defaults are its config keys
    (``strategy.<field>``; ``seed`` is the run's ``seed``): the ``strategy`` config group and its
    schema are generated from them (:func:`fedpeft.config.register`), and its ``__post_init__``
    checks them, raising ``ValueError("strategy.<field>: ...")``, one line naming the key.

    Must implement: :meth:`payload` and :meth:`aggregate`. Optional, with their defaults:

    - ``weightings``: the values ``strategy.weighting`` may take (checked by ``__post_init__``);
    - ``heterogeneous_ranks``: whether clients may have different ranks and scalings (default no);
    - ``privacy_modes``: the ``privacy.mode`` values it works with (default all);
    - ``lora_update_only``: True when it aggregates LoRA factors (ΔW = s·B·A) and takes only the
      PEFT methods whose update is one (``fedpeft.methods``: lora, rslora, dora); False (default):
      any method's tensors (FedAvg's rule);
    - ``peft_methods``: the only PEFT methods it takes (default None: any, within ``lora_update_only``);
    - ``peft_default``: the PEFT method selected when the user names none (Fed-SB: ``lora_xs``;
      :func:`fedpeft.config.strategy_defaults`);
    - ``privacy_default = (privacy group option, target ε)``: applied when the user chooses no
      privacy group and no noise (:func:`fedpeft.config.strategy_defaults`; DP-LoRA has one);
    - ``engines``: the ``engine.kind`` values it works with (default None: every engine; RoLoRA's
      ``freeze_B`` is not batched by the cohort engine);
    - ``needs_base_weights``: when true :meth:`start` calls ``init(model, base_weights={module: W [out × in]})``
      with the server's frozen pre-trained weights (FeDeRA);
    - ``trained_share``: the share of a group's parameters a client trains in a round, averaged
      over rounds (default 1 for every group): FFA-LoRA's frozen A is 0, RoLoRA's alternating
      factors ½ each; the run's "trained parameters" (banner, summary) use it;
    - ``personalized``: clients keep their own state and the global model alone is not a model
      (FedSA-LoRA), so every client trains on 80% of its partition and evaluates its own model on
      the other 20% (``fedpeft.data.held_out``); the run reports those;
    - ``no_server_optimizer``: why a server optimizer (``server.optimizer``, :mod:`fedpeft.serveropt`)
      cannot step its global model, where the change of its factors is not the round's update
      (FLoRA's merges, FlexLoRA's re-factorisation); None (default): it can;
    - ``effective_updates``: why its aggregate is not a per-tensor average of the clients'
      same-shaped factors (it aggregates effective updates ``s_k B_k A_k``: FLoRA, FlexLoRA, HetLoRA,
      FedEx-LoRA): the coordinate-wise robust rules (``server.robust=median | trimmed_mean``,
      :mod:`fedpeft.robust`) are refused with it, and Krum measures its clients' distances on
      effective updates; None (default): in factor space, tensor by tensor;
    - ``prox_mu`` (a config field, FedProx): a strategy whose clients start each round from the
      global adapter declares the field ``prox_mu: float = 0.0`` and puts :meth:`proximal` into its
      plans; ``no_proximal``: why a strategy without the field cannot take it (config validation
      refuses ``strategy.prox_mu`` with it in one line);
    - ``sparse_messages``: why the run's codecs (``compression.*``) cannot be combined with it,
      where it sparsifies its own messages (FLASC, both ways; SLoRA's stage 1, masked entries); FLASC's
      :meth:`sparse_links` then gives the densities. None (default): it sends what it computes and the codecs apply;
    - ``scaffold`` (a config field, SCAFFOLD, :mod:`fedpeft.scaffold`): a strategy whose clients train
      same-shaped global tensors and whose aggregate's change in factor space is the round's update
      declares the field ``scaffold: bool = False`` and puts it into its plans; one that declares
      ``no_server_optimizer`` cannot take it, for that reason (its factors' change is not the update);
    - ``no_quantized_base``: why it cannot run over a bitsandbytes-quantized base
      (``model.quantization=4bit | 8bit``; config validation refuses it in one line); None (default): it can;
    - ``no_secure_aggregation``: why Flower's SecAgg+ (``secagg.enabled``, :mod:`fedpeft.secagg`),
      which reveals only the weighted mean of the clients' tensors, cannot feed its aggregate; None:
      its :meth:`aggregate` of that mean as one update equals its aggregate of the updates;
    - :meth:`reply_ranks`, :meth:`init`, :meth:`round_metrics`, :meth:`evaluated`, and :meth:`server_state` (what it
      keeps on the server between rounds besides the global model: HetLoRA's pruned ranks).
    """

    name: ClassVar[str]  # a dataclass field in each subclass: the strategy=<name> option
    weightings: ClassVar[tuple[str, ...]] = WEIGHTINGS
    heterogeneous_ranks: ClassVar[bool] = False
    privacy_modes: ClassVar[tuple[str, ...]] = PRIVACY_MODES
    lora_update_only: ClassVar[bool] = False
    peft_methods: ClassVar[tuple[str, ...] | None] = None
    peft_default: ClassVar[str | None] = None
    privacy_default: ClassVar[tuple[str, float] | None] = None
    engines: ClassVar[tuple[str, ...] | None] = None
    needs_base_weights: ClassVar[bool] = False
    trained_share: ClassVar[dict[str, float]] = {}
    personalized: ClassVar[bool] = False
    no_server_optimizer: ClassVar[str | None] = None
    effective_updates: ClassVar[str | None] = None
    no_proximal: ClassVar[str] = "its clients do not start from the global adapter"
    sparse_messages: ClassVar[str | None] = None
    no_quantized_base: ClassVar[str | None] = None
    no_secure_aggregation: ClassVar[str | None] = "its aggregate is not a weighted mean of its clients' same-shaped tensors"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # inherits its parent's name: a helper, not a strategy of its own
            return
        name = cls.__dict__["name"]
        missing = [m for m in ("payload", "aggregate") if getattr(cls, m) is getattr(Strategy, m)]
        if missing:
            raise TypeError(f"strategy={name}: {cls.__qualname__} must implement {' and '.join(missing)}")
        old = REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"strategy name {name!r} is taken twice: {old.__module__}.{old.__qualname__} and {cls.__module__}.{cls.__qualname__}")
        REGISTRY[name] = cls  # the same class defined again (a module reloaded) replaces itself

    def __post_init__(self) -> None:
        """Checks ``weighting`` (where the strategy has one) against ``weightings``; a subclass
        with more fields to check extends this and calls ``super().__post_init__()``."""
        weighting = getattr(self, "weighting", None)  # a strategy with no weighting field has nothing to check
        if weighting is not None and weighting not in self.weightings:
            raise ValueError(f"strategy.weighting: strategy={self.name} does not take {weighting!r}; "
                             f"expected one of {', '.join(self.weightings)}")
        mu = getattr(self, "prox_mu", 0.0)  # a strategy without the field takes no proximal term
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < float("inf"):
            raise ValueError(f"strategy.prox_mu: must be a finite number >= 0 (0: no proximal term), got {mu!r}")
        if not isinstance(getattr(self, "scaffold", False), bool):
            raise ValueError(f"strategy.scaffold: must be true or false, got {self.scaffold!r}")

    @classmethod
    def takes_proximal(cls) -> bool:
        """Whether its clients take FedProx's proximal term: it declares the ``prox_mu`` field."""
        return "prox_mu" in cls.config_fields()

    @classmethod
    def takes_scaffold(cls) -> bool:
        """Whether its clients take SCAFFOLD's control variates: it declares the ``scaffold`` field and
        its aggregate's change is the round's update (no ``no_server_optimizer``), sent whole (no
        ``sparse_messages``: FLASC's update is a top-k of the client's change, not x − y_i)."""
        return "scaffold" in cls.config_fields() and cls.no_server_optimizer is None and cls.sparse_messages is None

    def proximal(self) -> Proximal | None:
        """The plan's FedProx term for ``strategy.prox_mu`` (:class:`fedpeft.plan.Proximal`); None at
        μ = 0, so a plan with μ = 0 is exactly the plain one."""
        mu = float(getattr(self, "prox_mu", 0.0))
        return Proximal(mu) if mu > 0 else None

    @classmethod
    def config_fields(cls) -> dict[str, Any]:
        """Its config keys (``strategy.<key>``) with their defaults: the dataclass's init fields
        except those the run supplies (:data:`RUN_FIELDS`). A field without a default is an error
        naming it: the default is the config key's default."""
        out = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name in RUN_FIELDS:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                raise TypeError(f"strategy={cls.name}: field {f.name!r} of {cls.__qualname__} needs a default (it is strategy.{f.name}'s default)")
        return out

    def sparse_links(self) -> tuple[float, float] | None:
        """``(download density, upload density)`` of a strategy that declares ``sparse_messages``:
        its payloads travel as the top-k (all tensors together) they are at the first, its
        clients' updates as their top-k at the second (the plan's ``upload_density``); None: not one."""
        return None

    def reply_ranks(self, rank: int) -> tuple[int, ...]:
        """The ranks a client given ``rank`` may answer with (HetLoRA's clients may prune)."""
        return (rank,)

    def init(self, model: GlobalModel) -> GlobalModel:
        """The starting state, from the server's freshly initialized peft adapter (at ``model.rank``).
        A strategy that declares ``needs_base_weights`` takes ``base_weights`` as well."""
        return model

    def start(self, model: GlobalModel, base_weights: Mapping[str, Tensor] | None = None) -> GlobalModel:
        """The run's first global model, as the server asks for it: :meth:`init` of its fresh
        adapter, given ``base_weights`` (the frozen pre-trained weights, ``{module: W [out × in]}``)
        where the strategy declares ``needs_base_weights``; without them such a strategy is refused
        in one line. A strategy overrides :meth:`init`, not this."""
        if not self.needs_base_weights:
            return self.init(model)
        if base_weights is None:
            raise ValueError(f"strategy={self.name} initialises from the pre-trained weights: pass base_weights")
        return self.init(model, base_weights=base_weights)

    def server_state(self) -> ServerState:
        """A fresh :class:`ServerState`: what the strategy keeps on the server between rounds
        besides the global model (by default nothing)."""
        return ServerState()

    def payload(self, model: GlobalModel, client: ClientSpec) -> Payload:
        """What client ``client`` receives this round."""
        raise NotImplementedError(f"strategy={self.name} implements no payload")

    def aggregate(self, model: GlobalModel, updates: list[ClientUpdate]) -> GlobalModel:
        """The next global model from this round's updates."""
        raise NotImplementedError(f"strategy={self.name} implements no aggregate")

    def evaluated(self, model: GlobalModel) -> GlobalModel:
        """The global model as the server evaluates and saves it: by default ``model`` itself; a
        strategy whose state holds more than an adapter and a head (SLoRA's stage-1 sparse update)
        gives the same effective weights as one."""
        return model

    def round_metrics(self, model: GlobalModel, updates: list[ClientUpdate]) -> dict[str, float]:
        """Diagnostics of the round's aggregation, logged with the round's metrics (FedAvg's
        ``factor_avg_error``); none by default."""
        return {}

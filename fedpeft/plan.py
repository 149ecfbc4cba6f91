"""What a client does in a round, as one typed plan, and the data both sides of the wire share.

A strategy's ``payload()`` (server side) returns a :class:`Payload`: the adapter and head a client
starts from and a :class:`ClientPlan`: which LoRA factors it trains and which travel down and up, the
seeds of a regenerated or fresh adapter, the per-client state it keeps between rounds, an extra term
of its local loss and how it finalises its update. The server puts the plan into the train message's
``ConfigRecord`` with :meth:`ClientPlan.to_config`; the client reads it back with
:meth:`ClientPlan.from_config`. That is the one encoding: no other module reads a plan's wire keys.

This module imports nothing from ``strategies`` or ``clients``; both import it, so a client never
imports a strategy.

The wire keys (plain scalars; a key is present only where it says something):

==================  ====================================================================
``freeze_A``        ``True``: A is not trained (``train_A=False``) and not sent back
``freeze_B``        ``True``: B is not trained (``train_B=False``) and not sent back
``personal_B``      ``True``: the client keeps its own B (``keep={"B"}``); B never travels
``A_seed``          the seed a frozen A is regenerated from (:func:`fedpeft.lora.seeded_lora_A`);
                    such an A is not sent down either
``prune``,          HetLoRA's rank self-pruning (:class:`SelfPruning`): on or off, ``gamma``,
``prune_gamma``,    ``lam``, ``r_min``
``prune_lambda``,
``prune_r_min``
``init_seed``       the seed of the fresh LoRA a client with an empty payload adapter starts
``prox_mu``         FedProx's proximal term (:class:`Proximal`): its μ (> 0; absent: no term)
``upload_density``  FLASC's sparse upload: the client sends the top-k of its whole update (all
                    its tensors together, no error feedback) at this density in (0, 1]
``sparse_density``, SLoRA's stage 1 (:class:`SparseBase`): the client trains the base weights of
``sparse_seed``     the LoRA modules on a fixed random mask (:func:`fedpeft.lora.sparse_mask`), not
                    the LoRA factors; the masked values travel as ``head/sparse_base/<module>``
``scaffold``        ``True``: SCAFFOLD (:mod:`fedpeft.scaffold`): the message carries the server's
                    control variate ``c`` of the tensors the client trains; it corrects each
                    step's gradient by ``c − c_i``, keeps ``c_i`` and sends back ``Δc_i``
==================  ====================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedpeft.lora import Adapter, LoraFactors, pruned_rank, tail_norm

Scalar = int | float | str | bool

FREEZE_A, FREEZE_B, PERSONAL_B, A_SEED, INIT_SEED, SCAFFOLD = "freeze_A", "freeze_B", "personal_B", "A_seed", "init_seed", "scaffold"
UPLOAD_DENSITY = "upload_density"
SPARSE = "sparse_base/"  # a head tensor named SPARSE + <module>: SLoRA's stage-1 values of that module's masked base entries
KEPT_STATE = ("B",)  # the per-client state a plan may keep: FedSA-LoRA's B


class LossTerm:
    """An extra term of a client's local loss (HetLoRA's :class:`SelfPruning`; FedProx's
    :class:`Proximal` is a term of its own, over the trained tensors rather than the factors).
    ``penalty(factors)`` — the live LoRA factors, one per module in the model's order — is added to
    every training step's loss; ``None`` adds nothing."""

    def penalty(self, factors: Sequence[LoraFactors]) -> Tensor | None:
        raise NotImplementedError


class Finaliser:
    """How a client finalises its trained update: it ``measure`` s its factors before and after
    training, and ``rank_after(rank, before, after)`` is the rank its update keeps (truncated to it;
    reported as ``rank_after_pruning``); ``None``: unchanged and not reported."""

    def measure(self, factors: Sequence[LoraFactors]) -> float | None:
        raise NotImplementedError

    def rank_after(self, rank: int, before: float | None, after: float | None) -> int | None:
        raise NotImplementedError


def _number(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"client plan: {key} is {v!r}, expected a number")


def _integer(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"client plan: {key} is {v!r}, expected an integer")


def _flag(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"client plan: {key} is {v!r}, expected true or false")


@dataclass(frozen=True)
class SelfPruning(LossTerm, Finaliser):
    """HetLoRA's rank self-pruning (Cho et al., EMNLP 2024), both a loss term and a finalisation:
    the client adds ``lam · Σ_modules tail_norm(f, gamma)`` (:func:`fedpeft.lora.tail_norm`) to its
    loss, and shrinks its rank to ``max(⌊γr⌋, r_min)`` (:func:`fedpeft.lora.pruned_rank`) when that
    sum (without ``lam``) decreased in training. ``on=False`` (``strategy.prune=false``): the settings
    travel, and neither happens. The values are kept as given (the wire carries them as they are)."""

    gamma: float
    lam: float
    r_min: int
    on: bool = True
    KEYS: ClassVar[tuple[str, ...]] = ("prune", "prune_gamma", "prune_lambda", "prune_r_min")

    def __post_init__(self) -> None:
        _flag("prune", self.on)
        _number("prune_gamma", self.gamma)
        _number("prune_lambda", self.lam)
        _integer("prune_r_min", self.r_min)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"client plan: prune_gamma is {self.gamma!r}, expected a number in (0, 1]")
        if self.lam < 0:
            raise ValueError(f"client plan: prune_lambda is {self.lam!r}, expected a number >= 0")
        if self.r_min <= 0:
            raise ValueError(f"client plan: prune_r_min is {self.r_min!r}, expected a positive integer")

    def to_config(self) -> dict[str, Scalar]:
        return dict(zip(self.KEYS, (self.on, self.gamma, self.lam, self.r_min)))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SelfPruning:
        missing = [k for k in cls.KEYS if k not in cfg]
        if missing:
            raise ValueError(f"client plan: {missing[0]} is missing (HetLoRA's pruning needs {', '.join(cls.KEYS)})")
        on, gamma, lam, r_min = (cfg[k] for k in cls.KEYS)
        return cls(gamma=gamma, lam=lam, r_min=r_min, on=on)

    def tail(self, factors: Iterable[LoraFactors]) -> Tensor:
        """``Σ_modules ‖B[:, ⌊γr⌋:]‖_F · ‖A[⌊γr⌋:, :]‖_F`` (0-dim, differentiable)."""
        total: Any = 0.0
        for f in factors:
            total = total + tail_norm(f, float(self.gamma))
        return total

    def penalty(self, factors: Sequence[LoraFactors]) -> Tensor | None:
        return float(self.lam) * self.tail(factors) if self.on else None

    def measure(self, factors: Sequence[LoraFactors]) -> float | None:
        if not self.on:
            return None
        with torch.no_grad():
            return float(self.tail(factors))

    def rank_after(self, rank: int, before: float | None, after: float | None) -> int | None:
        if not self.on:
            return None
        target = pruned_rank(rank, float(self.gamma), int(self.r_min))
        return target if (target < rank and after < before) else rank  # type: ignore[operator]


@dataclass(frozen=True)
class Proximal:
    """FedProx's proximal term (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated
    Optimization in Heterogeneous Networks", MLSys 2020): the client minimises

        F_k(θ) + μ/2 · ‖θ − θ_g‖²

    where θ are the tensors it trains and sends back and θ_g the same tensors as it received them
    this round (the server's adapter and head, at the client's rank and scaling: HetLoRA's truncated
    factors, FlexLoRA's re-factorised ones). A frozen factor (FFA-LoRA's A, RoLoRA's other factor)
    has θ = θ_g; a personal one (FedSA-LoRA's B) is the client's, not the server's: neither is in θ.
    Its gradient μ(θ − θ_g) depends on no training example. ``mu`` travels as ``prox_mu``; a plan
    without the term has no key (so μ = 0 sends, and computes, exactly what plain training does)."""

    mu: float
    KEYS: ClassVar[tuple[str, ...]] = ("prox_mu",)

    def __post_init__(self) -> None:
        _number("prox_mu", self.mu)
        if not (0.0 < self.mu < float("inf")):
            raise ValueError(f"client plan: prox_mu is {self.mu!r}, expected a finite number > 0 (0: send no term)")

    def to_config(self) -> dict[str, Scalar]:
        return {"prox_mu": self.mu}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Proximal:
        return cls(mu=cfg["prox_mu"])

    def penalty(self, params: Sequence[Tensor], anchors: Sequence[Tensor]) -> Tensor:
        """``μ/2 · Σ_i ‖params[i] − anchors[i]‖²_F`` (0-dim, differentiable in ``params``)."""
        if len(params) != len(anchors):
            raise ValueError(f"proximal term: {len(params)} trained tensors but {len(anchors)} anchors")
        total: Any = 0.0
        for p, a in zip(params, anchors):
            total = total + (p - a).pow(2).sum()
        return 0.5 * float(self.mu) * total


@dataclass(frozen=True)
class SparseBase:
    """SLoRA's stage 1 (Babakniya et al. 2023): the client trains the base weight of every LoRA
    module on the mask :func:`fedpeft.lora.sparse_mask` ``(module, shape, density, seed)`` — a delta
    ``ΔW = scatter(v, mask)`` beside the frozen base, starting from the values ``v`` the payload's
    head holds as ``sparse_base/<module>`` — and sends back the trained values ``v`` in the same
    place; its LoRA factors are frozen (``B = 0``) and not sent."""

    density: float
    seed: int
    KEYS: ClassVar[tuple[str, ...]] = ("sparse_density", "sparse_seed")

    def __post_init__(self) -> None:
        _number("sparse_density", self.density)
        _integer("sparse_seed", self.seed)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"client plan: sparse_density is {self.density!r}, expected a number in (0, 1]")

    def to_config(self) -> dict[str, Scalar]:
        return {"sparse_density": self.density, "sparse_seed": self.seed}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SparseBase:
        missing = [k for k in cls.KEYS if k not in cfg]
        if missing:
            raise ValueError(f"client plan: {missing[0]} is missing (SLoRA's stage 1 needs {', '.join(cls.KEYS)})")
        return cls(density=cfg["sparse_density"], seed=cfg["sparse_seed"])


# The loss terms and finalisations the wire knows, each with its own keys (``KEYS``, ``to_config``,
# ``from_config``); a new one is added here.
TERMS: tuple[type, ...] = (SelfPruning,)
KEYS = frozenset({FREEZE_A, FREEZE_B, PERSONAL_B, A_SEED, INIT_SEED, UPLOAD_DENSITY, SCAFFOLD, *Proximal.KEYS, *SparseBase.KEYS,
                  *(k for t in TERMS for k in t.KEYS)})  # type: ignore[attr-defined]
"""Every wire key a plan may use; the rest of a message's config is the server's header."""


@dataclass(frozen=True)
class ClientPlan:
    """What a client does in a round (see the module docstring for the wire keys).

    ``train_A``, ``train_B``: which LoRA factors it trains; a factor it does not train is not sent
    back (the server has it). ``A_seed``: a frozen A is regenerated from this seed
    (:func:`fedpeft.lora.seeded_lora_A`, FFA-LoRA) and so is not sent down. ``init_seed``: an empty
    payload adapter means "start a fresh LoRA of your rank" (peft's init: random A, zero B) seeded by
    it. ``keep``: the per-client state the client keeps between rounds and never sends (``"B"``:
    FedSA-LoRA's personal B). ``loss_term``: added to every step's loss; ``finalise``: how the
    trained update is finalised (HetLoRA's :class:`SelfPruning` is both). ``proximal``: FedProx's
    :class:`Proximal` term, added to every step's loss beside ``loss_term``. ``upload_density``:
    the client's reply is the top-k of its update ``Δ = θ − θ_start`` (every tensor it sends back,
    together: :func:`fedpeft.compression.topk_sparsify_joint`) at this density, without error
    feedback (FLASC); None: the run's ``compression.uplink``. ``scaffold``: SCAFFOLD's
    control variates on the tensors it trains and sends back (:mod:`fedpeft.scaffold`). ``sparse``:
    SLoRA's stage 1 (:class:`SparseBase`): masked base entries are trained instead of the LoRA
    factors, which it leaves frozen (``train_A`` and ``train_B`` false) and does not send.
    """

    train_A: bool = True
    train_B: bool = True
    A_seed: int | None = None
    init_seed: int | None = None
    keep: frozenset[str] = field(default_factory=frozenset)
    loss_term: LossTerm | None = None
    finalise: Finaliser | None = None
    proximal: Proximal | None = None
    upload_density: float | None = None
    scaffold: bool = False
    sparse: SparseBase | None = None

    def __post_init__(self) -> None:
        _flag(FREEZE_A, self.train_A)
        _flag(SCAFFOLD, self.scaffold)
        _flag(FREEZE_B, self.train_B)
        if self.sparse is not None and not isinstance(self.sparse, SparseBase):
            raise ValueError(f"client plan: sparse is {self.sparse!r}, expected a SparseBase")
        if self.sparse is None and not (self.train_A or self.train_B):
            raise ValueError(f"client plan: {FREEZE_A} and {FREEZE_B} together leave no LoRA factor to train")
        if self.sparse is not None and (self.train_A or self.train_B or self.scaffold or self.keep):
            raise ValueError(f"client plan: sparse_density trains masked base entries; it needs {FREEZE_A} and {FREEZE_B}, no scaffold, nothing kept")
        for key, seed in ((A_SEED, self.A_seed), (INIT_SEED, self.init_seed)):
            if seed is not None:
                _integer(key, seed)
        if self.A_seed is not None and self.train_A:
            raise ValueError(f"client plan: {A_SEED} regenerates a frozen A; it needs {FREEZE_A}")
        if not isinstance(self.keep, frozenset) or not self.keep <= set(KEPT_STATE):
            raise ValueError(f"client plan: keep is {self.keep!r}, expected a frozenset of {KEPT_STATE}")
        for part in (self.loss_term, self.finalise):
            if part is not None and not isinstance(part, TERMS):
                raise ValueError(f"client plan: {type(part).__name__} has no wire encoding (known: {', '.join(t.__name__ for t in TERMS)})")
        if self.upload_density is not None:
            _number(UPLOAD_DENSITY, self.upload_density)
            if not 0.0 < self.upload_density <= 1.0:
                raise ValueError(f"client plan: {UPLOAD_DENSITY} is {self.upload_density!r}, expected a number in (0, 1]")
        if self.proximal is not None and not isinstance(self.proximal, Proximal):
            raise ValueError(f"client plan: proximal is {self.proximal!r}, expected a Proximal")
        both = isinstance(self.loss_term, Finaliser) or isinstance(self.finalise, LossTerm)  # one object, both roles
        if both and self.loss_term != self.finalise:
            raise ValueError(f"client plan: loss_term {self.loss_term!r} and finalise {self.finalise!r} travel as one setting and must be equal")

    @property
    def personal_B(self) -> bool:
        """Whether the client keeps its own B (FedSA-LoRA): B is not sent either way."""
        return "B" in self.keep

    @property
    def personalised(self) -> bool:
        """Whether part of the client's model is its own: it trains on the 80% of its partition that
        :func:`fedpeft.data.held_out` leaves for training and evaluates its own model on the rest."""
        return self.personal_B

    @property
    def uplink(self) -> tuple[bool, bool]:
        """``(send_A, send_B)`` of the client's update: a factor it keeps frozen or personal is not
        sent back; the server has the frozen one (it sent it, or its seed ``A_seed``)."""
        return self.train_A, self.train_B and not self.personal_B

    @property
    def downlink(self) -> tuple[bool, bool]:
        """``(send_A, send_B)`` of the payload: not an A the client regenerates from ``A_seed``
        (FFA-LoRA), not a B the client keeps as its own (FedSA-LoRA)."""
        return self.train_A or self.A_seed is None, not self.personal_B

    def reply_config(self) -> dict[str, Scalar]:
        """The plan's part of the client's reply: the ``A_seed`` of an A it did not send back, from
        which the receiver regenerates it (:func:`fedpeft.messages.decode`); else nothing."""
        return {A_SEED: self.A_seed} if not self.train_A and self.A_seed is not None else {}

    def to_config(self) -> dict[str, Scalar]:
        """The plan as the scalars of the message's ``ConfigRecord``; :meth:`from_config` inverts it."""
        cfg: dict[str, Scalar] = {}
        if not self.train_A:
            cfg[FREEZE_A] = True
        if not self.train_B:
            cfg[FREEZE_B] = True
        if self.personal_B:
            cfg[PERSONAL_B] = True
        if self.A_seed is not None:
            cfg[A_SEED] = self.A_seed
        for part in dict.fromkeys(p for p in (self.loss_term, self.finalise) if p is not None):
            cfg.update(part.to_config())  # type: ignore[attr-defined]
        if self.proximal is not None:
            cfg.update(self.proximal.to_config())
        if self.init_seed is not None:
            cfg[INIT_SEED] = self.init_seed
        if self.upload_density is not None:
            cfg[UPLOAD_DENSITY] = self.upload_density
        if self.scaffold:
            cfg[SCAFFOLD] = True
        if self.sparse is not None:
            cfg.update(self.sparse.to_config())
        return cfg

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ClientPlan:
        """The plan :meth:`to_config` encoded. ``cfg`` holds the plan's keys only; an unknown key, a
        missing companion key or a value of the wrong type is a one-line ``ValueError`` naming the key."""
        for k in cfg:
            if k not in KEYS:
                raise ValueError(f"client plan: unknown key {k!r}")
        for k in (FREEZE_A, FREEZE_B, PERSONAL_B, SCAFFOLD):
            if k in cfg:
                _flag(k, cfg[k])
        terms = [t.from_config(cfg) for t in TERMS if any(k in cfg for k in t.KEYS)]  # type: ignore[attr-defined]
        term = terms[0] if terms else None
        return cls(
            train_A=not cfg.get(FREEZE_A, False),
            train_B=not cfg.get(FREEZE_B, False),
            A_seed=cfg.get(A_SEED),
            init_seed=cfg.get(INIT_SEED),
            keep=frozenset({"B"}) if cfg.get(PERSONAL_B, False) else frozenset(),
            loss_term=term if isinstance(term, LossTerm) else None,
            finalise=term if isinstance(term, Finaliser) else None,
            proximal=Proximal.from_config(cfg) if "prox_mu" in cfg else None,
            upload_density=cfg.get(UPLOAD_DENSITY),
            scaffold=cfg.get(SCAFFOLD, False),
            sparse=SparseBase.from_config(cfg) if any(k in cfg for k in SparseBase.KEYS) else None,
        )


@dataclass(frozen=True)
class Payload:
    """What one client receives.

    ``adapter``: the factors to start from, at the client's rank and scaling; empty means "start a
    fresh LoRA of your rank" seeded by ``plan.init_seed``. ``base_version``: the base (``W_0`` plus
    the first ``base_version`` merges) to train on; the Flower adapter ships the merges a client has
    not seen yet. ``plan``: what the client does with it (:class:`ClientPlan`).
    """

    adapter: Adapter
    head: dict[str, Tensor] = field(default_factory=dict)
    plan: ClientPlan = field(default_factory=ClientPlan)
    base_version: int = 0


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after local training."""

    client_id: int
    adapter: Adapter
    head: dict[str, Tensor]
    num_examples: int

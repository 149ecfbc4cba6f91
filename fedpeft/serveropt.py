"""Server optimizers: one layer over any factor-space strategy's aggregate (``server.optimizer``).

The strategy aggregates the round's updates as usual; the layer then treats the change it made as
a pseudo-gradient and steps the previous global model along it with a server optimizer. Per trained
tensor ``x`` (a LoRA factor ``A`` or ``B`` of a module, a head tensor, any PEFT method's tensors):

    Δ_t = aggregate_t − x_t                     (the round's update; the pseudo-gradient is g_t = −Δ_t)

**FedAvgM** — Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019 (server momentum, as Flower's ``FedAvgM``)::

    m_t = β m_{t−1} + Δ_t,          x_{t+1} = x_t + η m_t

With ``η = 1, β = 0`` it is the plain strategy, exactly (see below). In a steady state the step is
``η/(1−β)·Δ``: ``β = 0.9`` at ``η = 1`` takes ten times FedAvg's step; ``η = 1 − β`` keeps FedAvg's.

**FedAdagrad, FedAdam, FedYogi** — Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2, exactly::

    m_t = β₁ m_{t−1} + (1 − β₁) Δ_t                                   (m_{−1} = 0)
    v_t = v_{t−1} + Δ_t²                                 FedAdagrad
    v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)  FedYogi
    v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²                     FedAdam      (v_{−1} = τ²)
    x_{t+1} = x_t + η m_t / (√v_t + τ)

elementwise. Flower's ``FedAdam`` adds Adam's bias correction (``η·√(1−β₂ᵗ)/(1−β₁ᵗ)``) and starts
``v`` at 0; this follows the paper: no bias correction, ``v`` starts at ``τ²``.

Every update is computed as ``x_{t+1} = aggregate_t + (step_t − Δ_t)`` with ``step_t = η m_t`` or
``η m_t/(√v_t + τ)``: the same number as ``x_t + step_t`` in exact arithmetic, and exactly the
aggregate when ``step_t = Δ_t`` (FedAvgM with ``η = 1, β = 0``), bit for bit.

Only the tensors the round trained move (:meth:`ServerOptimizer.apply`'s ``trained``): a factor a
strategy keeps frozen this round (FFA-LoRA's A, RoLoRA's other factor, FedSA-LoRA's placeholder B)
is returned as it is, and its moments are kept as they are for the round it trains again.

Defined for the strategies whose global model's change in factor space *is* the round's update
(FedAvg, FFA-LoRA, FedSA-LoRA's shared A, RoLoRA, Fed-SB's cores, DP-LoRA: post-processing of the
clients' DP updates, FeDeRA after its init, FLASC: Σ_k p_k Δ_k of the sparse updates, the paper's own
use of a server optimizer); a strategy that merges or re-factorises (FLoRA,
FlexLoRA, HetLoRA, FedEx-LoRA) declares why not (``Strategy.no_server_optimizer``) and the config is
refused. Pure: tensors in, tensors out; the state is tensors (:class:`OptState`), saved with the
server's state and resumed bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from fedpeft.lora import Adapter, LoraFactors

OPTIMIZERS = ("none", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
# server.lr = null: the optimizer's default, as Flower 1.41's strategies have them
DEFAULT_LR = {"fedavgm": 1.0, "fedadagrad": 0.1, "fedadam": 0.1, "fedyogi": 0.01}
# server.beta1 = null: Flower's FedAdagrad takes no momentum (β₁ = 0); FedAdam and FedYogi 0.9
DEFAULT_BETA1 = {"fedadagrad": 0.0, "fedadam": 0.9, "fedyogi": 0.9}


@dataclass
class OptState:
    """A server optimizer's state: per tensor key its first moment ``m`` (FedAvgM: the momentum
    buffer) and second moment ``v`` (the adaptive ones), and how many rounds it stepped."""

    m: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0


@dataclass(frozen=True)
class ServerOptimizer:
    """One of :data:`OPTIMIZERS` (not ``none``) with its hyperparameters (``server.*``)."""

    kind: str
    lr: float
    momentum: float = 0.9  # FedAvgM's β
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS[1:]:
            raise ValueError(f"server.optimizer: unknown value {self.kind!r}; expected one of {', '.join(OPTIMIZERS[1:])}")

    @classmethod
    def from_config(cls, server: Any) -> ServerOptimizer | None:
        """From the ``server`` config group; None for ``server.optimizer=none``."""
        kind = server.optimizer
        if kind == "none":
            return None
        lr = DEFAULT_LR[kind] if server.lr is None else float(server.lr)
        beta1 = DEFAULT_BETA1.get(kind, 0.0) if server.beta1 is None else float(server.beta1)
        return cls(kind, lr, float(server.momentum), beta1, float(server.beta2), float(server.tau))

    def describe(self) -> str:
        """One line naming the optimizer and the hyperparameters it reads (the run's banner)."""
        if self.kind == "fedavgm":
            return f"server optimizer: fedavgm, lr {self.lr}, momentum {self.momentum}"
        rest = "" if self.kind == "fedadagrad" else f", β₂ {self.beta2}"
        return f"server optimizer: {self.kind}, lr {self.lr}, β₁ {self.beta1}{rest}, τ {self.tau} (Reddi et al. 2021, no bias correction)"

    def step(self, x: Mapping[str, Tensor], aggregate: Mapping[str, Tensor], state: OptState) -> tuple[dict[str, Tensor], OptState]:
        """The next values of the tensors ``x`` (keyed; ``aggregate`` has the same keys and
        shapes), and the new state. A key seen for the first time starts at ``m = 0`` and, for
        the adaptive ones, ``v = τ²``; the keys not in ``x`` keep their state."""
        out: dict[str, Tensor] = {}
        m, v = dict(state.m), dict(state.v)
        for key, xk in x.items():
            agg = aggregate[key]
            if agg.shape != xk.shape:
                raise ValueError(f"server.optimizer: {key} is {tuple(agg.shape)} after aggregation, {tuple(xk.shape)} before; "
                                 f"a server optimizer needs tensors that keep their shape")
            delta = agg - xk
            m_prev = m.get(key, torch.zeros_like(xk))
            if self.kind == "fedavgm":
                m[key] = self.momentum * m_prev + delta
                step = self.lr * m[key]
            else:
                d2 = delta * delta
                v_prev = v.get(key, torch.full_like(xk, self.tau**2))
                m[key] = self.beta1 * m_prev + (1 - self.beta1) * delta
                if self.kind == "fedadagrad":
                    v[key] = v_prev + d2
                elif self.kind == "fedyogi":
                    v[key] = v_prev - (1 - self.beta2) * d2 * torch.sign(v_prev - d2)
                else:  # fedadam
                    v[key] = self.beta2 * v_prev + (1 - self.beta2) * d2
                step = self.lr * m[key] / (v[key].sqrt() + self.tau)
            out[key] = agg + (step - delta)
        return out, OptState(m, v, state.steps + 1)


class ServerOptLayer:
    """A :class:`ServerOptimizer` and its state over a global adapter (``{module: LoraFactors}``)
    and head (``{name: tensor}``): what the server applies after each applied round's aggregate."""

    def __init__(self, optimizer: ServerOptimizer) -> None:
        self.optimizer = optimizer
        self.state = OptState()

    def apply(self, adapter: Adapter, head: Mapping[str, Tensor], new_adapter: Adapter, new_head: Mapping[str, Tensor],
              *, train_A: bool = True, train_B: bool = True) -> tuple[Adapter, dict[str, Tensor]]:
        """The next global adapter and head: the strategy's aggregate (``new_adapter``,
        ``new_head``) of the previous global ones (``adapter``, ``head``) stepped by the optimizer.
        ``train_A`` / ``train_B``: whether the round trained that factor; an untrained one is
        returned as the aggregate has it (the strategy kept it) and its state is kept. Every head
        tensor is trained. Raises ``ValueError`` when the modules or head tensors differ."""
        if set(adapter) != set(new_adapter) or set(head) != set(new_head):
            raise ValueError("server.optimizer: the aggregate's modules or head tensors differ from the global model's; "
                             "a server optimizer needs the same tensors every round")
        x: dict[str, Tensor] = {}
        agg: dict[str, Tensor] = {}
        for name, f in adapter.items():
            g = new_adapter[name]
            if g.scaling != f.scaling:
                raise ValueError(f"server.optimizer: module {name!r}'s scaling changed from {f.scaling} to {g.scaling}")
            for factor, trained in (("A", train_A), ("B", train_B)):
                if trained:
                    x[f"{factor}/{name}"], agg[f"{factor}/{name}"] = getattr(f, factor), getattr(g, factor)
        for name, t in head.items():
            x[f"head/{name}"], agg[f"head/{name}"] = t, new_head[name]
        stepped, self.state = self.optimizer.step(x, agg, self.state)
        out_adapter = {name: LoraFactors(stepped.get(f"A/{name}", g.A), stepped.get(f"B/{name}", g.B), g.scaling)
                       for name, g in new_adapter.items()}
        return out_adapter, {name: stepped[f"head/{name}"] for name in new_head}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.optimizer.kind, "m": dict(self.state.m), "v": dict(self.state.v), "steps": self.state.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["kind"] != self.optimizer.kind:
            raise ValueError(f"server.optimizer: the saved state is {state['kind']}'s, not {self.optimizer.kind}'s")
        self.state = OptState(dict(state["m"]), dict(state["v"]), int(state["steps"]))

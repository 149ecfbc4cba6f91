"""SCAFFOLD's control variates on the tensors each client trains (``strategy.scaffold``).

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, Algorithm 1 with option II. Per trained tensor (keyed as on the
wire: ``A/<module>``, ``B/<module>``, ``head/<name>``; :func:`fedpeft.messages.tensors_of`), the
server keeps a control variate ``c`` and each client ``i`` its own ``c_i`` (both 0 at first). In a
round client ``i`` receives ``x`` (the global tensors) and ``c``, and takes ``K`` local steps at rate
``η_l`` with the corrected gradient::

    y_i ← y_i − η_l (g_i(y_i) − c_i + c)                          (clients/train.py)
    c_i⁺ = c_i − c + (x − y_i) / (K η_l)                          option II (:func:`client_update`)

It keeps ``c_i⁺`` and sends back ``y_i`` and ``Δc_i = c_i⁺ − c_i``. The server, with ``N`` clients in
all and the set ``S`` of this round's accepted replies::

    x ← x + η_g · mean_{i∈S}(y_i − x)      (η_g = 1: the strategy's own aggregate)
    c ← c + |S|/N · mean_{i∈S}(Δc_i)       (:meth:`ControlVariates.apply`)

With ``c = c_i = 0`` (round 1) the correction is 0 and the round is plain FedAvg's. ``η_g ≠ 1`` is the
server optimizer ``server.optimizer=fedavgm server.momentum=0 server.lr=η_g`` over the aggregate
(:mod:`fedpeft.serveropt`). The model's aggregate is the strategy's (``strategy.weighting``); the
control variates' mean is unweighted, as in the paper.

With AdamW (``train.optimizer=adamw``) the correction is added to the gradient before the optimizer's
step, so Adam normalises ``g − c_i + c``; ``(x − y_i)/(K η_l)`` is then the mean step over ``η_l``,
not the mean gradient, which option II assumes: the paper's setting is ``train.optimizer=sgd``.

Pure: tensors in, tensors out. The server's ``c`` is saved with the server's state and resumed bit
for bit; a client's ``c_i`` is its own state (its Flower node state, and its state dir for a resumed
run or a restarted node: ``clients/app.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

RECORD = "scaffold"  # the ArrayRecord that carries c down and Δc_i up, beside the adapter's


def correction(c: Mapping[str, Tensor], c_i: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``c − c_i`` per key of ``c`` (a key ``c_i`` lacks is 0 there: the client's first round)."""
    return {k: t - c_i[k] if k in c_i else t.clone() for k, t in c.items()}


def client_update(c_i: Mapping[str, Tensor], c: Mapping[str, Tensor], x: Mapping[str, Tensor], y: Mapping[str, Tensor],
                  steps: int, lr: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Option II: ``c_i⁺ = c_i − c + (x − y)/(K η_l)`` with ``K = steps``, ``η_l = lr``, per key of
    ``c`` (the tensors trained this round). Returns the client's whole new state (``c_i`` with these
    keys replaced; RoLoRA's other factor keeps its variate) and ``Δc_i = c_i⁺ − c_i`` on ``c``'s keys."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"scaffold: option II needs K >= 1 local steps and a learning rate > 0, got K={steps}, lr={lr}")
    new, delta = dict(c_i), {}
    for k, ck in c.items():
        old = c_i[k] if k in c_i else torch.zeros_like(ck)
        if x[k].shape != ck.shape or y[k].shape != ck.shape:
            raise ValueError(f"scaffold: {k} is {tuple(ck.shape)} in c, {tuple(x[k].shape)} sent, {tuple(y[k].shape)} trained")
        new[k] = old - ck + (x[k] - y[k]) / (steps * lr)
        delta[k] = new[k] - old
    return new, delta


class ControlVariates:
    """The server's control variate ``c`` (per trained tensor key) over a run of ``num_clients``
    clients: what each payload carries (:meth:`for_client`) and its update from an applied round's
    ``Δc_i`` (:meth:`apply`)."""

    def __init__(self, num_clients: int) -> None:
        if num_clients < 1:
            raise ValueError(f"scaffold: the server needs the number of clients N (>= 1), got {num_clients}")
        self.num_clients = num_clients
        self.c: dict[str, Tensor] = {}

    def for_client(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
        """``c`` on the keys of ``shapes`` (the tensors a client trains and sends back), 0 where it
        has none yet (float32, on the CPU, as the wire carries them)."""
        out = {}
        for k, shape in shapes.items():
            if k in self.c and tuple(self.c[k].shape) != tuple(shape):
                raise ValueError(f"scaffold: c of {k} is {tuple(self.c[k].shape)}, the client trains {tuple(shape)}")
            out[k] = self.c[k] if k in self.c else torch.zeros(tuple(shape), dtype=torch.float32)
        return out

    def apply(self, deltas: Sequence[Mapping[str, Tensor]]) -> None:
        """``c ← c + |S|/N · mean_{i∈S} Δc_i`` per key, over the ``deltas`` of the accepted replies
        (``S``) that carry the key."""
        keys = dict.fromkeys(k for d in deltas for k in d)
        for k in keys:
            ds = [d[k] for d in deltas if k in d]
            mean = torch.stack(ds).mean(dim=0)
            base = self.c[k] if k in self.c else torch.zeros_like(mean)
            self.c[k] = base + (len(ds) / self.num_clients) * mean

    def state_dict(self) -> dict[str, object]:
        return {"c": dict(self.c), "num_clients": self.num_clients}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if int(state["num_clients"]) != self.num_clients:  # type: ignore[arg-type]
            raise ValueError(f"scaffold: the saved state is of {state['num_clients']} clients, this run has {self.num_clients}")
        self.c = dict(state["c"])  # type: ignore[arg-type]

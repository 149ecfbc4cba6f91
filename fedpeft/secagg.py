"""Secure aggregation with Flower's own SecAgg+ (``secagg.enabled=true``): the server learns the
weighted mean of the sampled clients' trained tensors, never one client's tensors.

SecAgg+ is Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020), the sparse-graph version of Bonawitz et al.'s SecAgg
("Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017). Nothing of
it is written here: both sides are Flower 1.41's.

* **Client**: Flower's ``secaggplus_mod`` is the outermost mod of the train handler
  (:func:`secure_aggregation_mod` hands it the protocol's messages). Its four stages: ``setup``
  (two key pairs, public keys up), ``share_keys`` (Shamir shares of its mask seed and of its first
  secret key, encrypted to each neighbour), ``collect_masked_vectors`` (it trains — the message
  carries our train payload — then uploads ``x_k`` masked by its private mask and the pairwise
  masks it agreed with its neighbours; the trained tensors never leave the node otherwise: the
  mod clears every ``ArrayRecord`` of the reply) and ``unmask`` (the shares the server needs).
* **Server**: the four stages of Flower's ``SecAggPlusWorkflow`` driven from our round loop by
  :class:`SecAggPlus` (``Federation.rounds``: ``configure_train`` → :meth:`SecAggPlus.exchange` →
  ``aggregate_train``). The workflow samples through a legacy ``Strategy``; here
  :class:`_RoundNodes` only hands it the nodes ``configure_train`` sampled and keeps the sum it
  unmasks. Our train messages are the ``collect_masked_vectors`` stage's content.

**Weights are applied on the client** (Flower's mod does it): with weight ``n_k`` (``num-examples``;
1 for ``strategy.weighting=uniform``) the client sends ``[q_k, Q(w_k·x_k)]`` masked, where
``q_k = round(n_k / max_weight · R)``, ``w_k = q_k / R`` (``R = secagg.quantization_range``) and
``Q`` is stochastic rounding onto ``R`` levels of ``[−c, c]`` (``c = secagg.clipping_range``).
The server unmasks ``Σ_k q_k`` and ``Σ_k Q(w_k x_k)`` and divides:

    x̄ = Σ_k w_k x_k / Σ_k w_k  =  Σ_k p_k x_k,   p_k = n_k / Σ_j n_j  (up to the rounding of q_k),

    |x̄ − Σ_k p_k x_k| ≤ K · (2c / R) / Σ_k w_k   per entry (K surviving clients; each stochastic
    rounding moves an entry by less than one level, 2c/R).

For the strategies whose aggregate is that weighted mean of same-shaped tensors
(``Strategy.no_secure_aggregation is None``: FedAvg, FFA-LoRA, FedSA-LoRA's A, RoLoRA, Fed-SB,
DP-LoRA, FeDeRA), ``aggregate(model, [x̄])`` equals ``aggregate(model, updates)``, so the server
hands its strategy the unmasked mean as one update (:meth:`fedpeft.server.FlowerAdapter.aggregate_train`).

Dropouts: a client that fails after sharing its keys is recovered from its neighbours' shares of
its first secret key (its pairwise masks are removed), as long as every sampled client keeps at
least ``reconstruction_threshold`` live neighbours; fewer, and Flower's workflow halts: the round
is not applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedpeft import messages
from fedpeft.engines import send_and_receive

log = logging.getLogger("fedpeft.secagg")

def share(value: float) -> int | float:
    """``secagg.num_shares`` / ``secagg.reconstruction_threshold`` as Flower takes them: at most 1, a
    share (a float: of the round's sampled clients / of the shares); above 1, a count (an int)."""
    return float(value) if value <= 1 else int(value)


# ------------------------------------------------------------------ client side


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """The train handler's outermost mod. A message of Flower's SecAgg+ protocol goes to Flower's
    ``secaggplus_mod``; at its ``collect_masked_vectors`` stage the inner mods and the handler
    train as usual and :func:`as_fit_result` hands the mod the trained tensors and the weight. A
    node whose run has ``secagg.enabled`` refuses a train message outside the protocol: it would
    send its update in the clear."""
    from fedpeft import runconfig  # lazy: the typed config (omegaconf, hydra) only where a node reads it

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if msg.metadata.message_type == MessageType.TRAIN and runconfig.settings(context.run_config).secagg.enabled:
            raise ValueError("secagg.enabled: this train message is not part of Flower's SecAgg+ protocol; "
                             "the node does not send its update in the clear (is the server running this run's config?)")
        return call_next(msg, context)
    weighting = getattr(runconfig.settings(context.run_config).strategy, "weighting", "num_examples")
    return secaggplus_mod(msg, context, lambda m, c: as_fit_result(call_next(m, c), c, weighting))


def as_fit_result(reply: Message, context: Context, weighting: str) -> Message:
    """Our train reply as Flower's mod reads it (a legacy ``FitRes`` in ``fitres.*`` records): the
    reply's arrays in their order, weight ``num-examples`` (1 for ``weighting=uniform``); their
    keys and dtypes go in :data:`fedpeft.messages.SECAGG_LAYOUT`. Refused (the client fails, one line) where the protocol
    would silently distort the update: a weight above ``max_weight`` or an entry whose
    ``|x|·w`` exceeds the clipping range."""
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    content = reply.content
    arrays = content.array_records[messages.ARRAYS]
    keys = list(arrays.keys())
    tensors = [arrays[k].numpy() for k in keys]
    n = int(content.config_records[messages.CONFIG]["num-examples"])
    weight = n if weighting == "num_examples" else 1
    state = context.state.config_records[RECORD_KEY_STATE]  # what the setup stage was told (Flower's mod keeps it)
    max_weight, clip = float(state["max_weight"]), float(state["clipping_range"])
    if weight > max_weight:
        raise ValueError(f"secagg.max_weight={max_weight:g} is below this client's weight {weight} (its num-examples): "
                         "SecAgg+ would overflow; raise secagg.max_weight")
    peak = max((float(np.abs(t).max()) for t in tensors if t.size), default=0.0) * weight / max_weight
    if peak > clip:
        raise ValueError(f"secagg.clipping_range={clip:g}: an entry of this client's weighted update reaches {peak:.4g}, "
                         "which SecAgg+ would clip; raise secagg.clipping_range")
    fit = compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(tensors), weight, {}), keep_input=True)
    for name, record in fit.items():
        content[name] = record
    content[messages.SECAGG_LAYOUT] = ConfigRecord({"keys": keys, "dtypes": [str(t.dtype) for t in tensors]})
    return reply


# ------------------------------------------------------------------ server side


class _RoundNodes(LegacyStrategy):
    """The legacy ``Strategy`` Flower's workflow asks for a round's nodes (``configure_fit``) and
    hands the unmasked mean (``aggregate_fit``); the nodes are those ``configure_train`` sampled."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.proxies = [GridClientProxy(node, grid, 0) for node in nodes]
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns  # the payload itself travels in our message (SecAggPlus.exchange)

        return [(proxy, FitIns(Parameters([], ""), {})) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        # every result carries the same unmasked mean (Flower's unmask stage sets it on each)
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}

    # Flower's abstract methods that the workflow's train stages never call.
    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class _Counting:
    """The grid as Flower's workflow uses it (``send_and_receive``), through fedpeft's
    :func:`fedpeft.engines.send_and_receive`, counting the protocol's bytes: every message's SecAgg+
    ConfigRecord down (the train payload in the collect stage is counted by ``configure_train``),
    every reply up except the collect stage's (``aggregate_train`` counts those: the masked
    vectors). Keeps the collect stage's replies."""

    grid: Grid
    on_poll: Callable[[int], None] | None
    bytes_down: int = 0
    bytes_up: int = 0
    stage: str = ""
    collected: list[Message] = field(default_factory=list)

    def send_and_receive(self, msgs, *, timeout: float | None = None) -> list[Message]:
        msgs = list(msgs)
        self.stage = str(msgs[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if msgs else self.stage
        for m in msgs:
            self.bytes_down += messages.num_bytes(RecordDict({RECORD_KEY_CONFIGS: m.content.config_records[RECORD_KEY_CONFIGS]}))
        collect = self.stage == Stage.COLLECT_MASKED_VECTORS
        replies = send_and_receive(self.grid, msgs, timeout, self.on_poll if collect else None)
        for r in replies if not collect else ():  # (aggregate_train reports the collect stage's failures)
            if r.has_error():
                log.warning("SecAgg+ %s stage: node %d failed: %s", self.stage, r.metadata.src_node_id, r.error.reason)
        if collect:
            self.collected = replies
        else:
            self.bytes_up += sum(messages.num_bytes(r.content) for r in replies if not r.has_error())
        return replies


@dataclass
class SecureRound:
    """One round's outcome: the unmasked weighted mean (None: the protocol halted), the stage it
    halted at, and the protocol's bytes besides the train payload and the masked vectors."""

    mean: list[np.ndarray] | None
    halted: str | None
    bytes_down: int
    bytes_up: int


class SecAggPlus:
    """Runs a round's train messages through Flower's ``SecAggPlusWorkflow`` stages (an engine's
    ``exchange``: the same replies come back for ``aggregate_train``, without their arrays)."""

    def __init__(self, settings: Any, *, max_weight: float, timeout: float | None) -> None:
        self.workflow = SecAggPlusWorkflow(
            share(settings.num_shares), share(settings.reconstruction_threshold), max_weight=float(max_weight),
            clipping_range=float(settings.clipping_range), quantization_range=int(settings.quantization_range), timeout=timeout,
        )
        self.last: SecureRound | None = None

    def exchange(self, grid: Grid, sent: list[Message], partition_of: dict[int, int],
                 on_poll: Callable[[int], None] | None = None) -> list[Message]:
        """Setup, share keys, collect masked vectors (carrying ``sent``), unmask; the collect
        stage's replies. :attr:`last` holds the round's :class:`SecureRound`."""
        server_round = int(sent[0].content.config_records[messages.CONFIG]["server-round"]) if sent else 0
        nodes = _RoundNodes(grid, [m.metadata.dst_node_id for m in sent])
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}), MAIN_PARAMS_RECORD: ArrayRecord()})
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=nodes)
        counting, ws, wf = _Counting(grid, on_poll), WorkflowState(), self.workflow
        halted = None
        for stage, step in ((Stage.SETUP, wf.setup_stage), (Stage.SHARE_KEYS, wf.share_keys_stage),
                            (Stage.COLLECT_MASKED_VECTORS, wf.collect_masked_vectors_stage), (Stage.UNMASK, wf.unmask_stage)):
            if stage == Stage.COLLECT_MASKED_VECTORS:  # our train messages, plus the stage's forwarded key shares
                ws.nid_to_fitins = {m.metadata.dst_node_id: m.content for m in sent}
            if not step(counting, context, ws):
                halted = stage
                break
        self.last = SecureRound(nodes.mean if halted is None else None, halted, counting.bytes_down, counting.bytes_up)
        return counting.collected

"""The Flower side of the server: one adapter turns any pure strategy into a Flower ``Strategy``.

``configure_train`` samples nodes and sends each its own message (the strategy's per-client
payload); ``aggregate_train`` decodes and checks the replies, counts failures, and hands the good
updates to the strategy's pure ``aggregate``. Communication is counted from the records sent.
What a strategy keeps between rounds besides the global model is its own
:class:`strategies.base.ServerState` (HetLoRA's pruned ranks), saved with the adapter's state.
For a ``personalized`` strategy (FedSA-LoRA) :class:`PersonalEvaluation` sends every client an
evaluate message and collects each client's metrics on its own held-out split.

Privacy and compression wrap every strategy here: the adapter asks the run's privacy layer
(:class:`fedpeft.privacy.PrivacyPlan`, which owns the ledger) to spend each round before its
messages go out (a round that would exceed ``privacy.target_epsilon`` is not started),
compresses payloads (downlink) and decodes compressed updates against the start it knows each
client trained from (uplink). Central DP is Flower's ``DifferentialPrivacyServerSideFixedClipping``
around this adapter (:func:`wrap_central_dp`).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedpeft import merges as merge_forms
from fedpeft import messages
from fedpeft.lora import LoraFactors, best_rank
from fedpeft.privacy import BudgetExhausted, PrivacyPlan
from fedpeft.robust import COORDINATE_WISE, RobustRule, effective_sq_distances, sq_distances
from fedpeft.scaffold import RECORD as CONTROL_RECORD
from fedpeft.scaffold import ControlVariates
from fedpeft.serveropt import ServerOptimizer, ServerOptLayer
from strategies.base import ClientSpec, ClientUpdate, GlobalModel, Strategy

log = logging.getLogger("fedpeft.server")


@dataclass
class RoundStats:
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    epsilon: float | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    applied: bool = False  # whether the round's aggregate became the global model (>= min_clients good replies)
    missing: tuple[int, ...] = ()  # the run's partitions that had no connected node this round


class FederationFailed(RuntimeError):
    """More than half of a round's sampled clients failed with the same error: a fault of the run
    (its configuration, data or code), not of single clients, so the run ends with that one line."""


@dataclass(frozen=True)
class Codecs:
    """The run's codecs (``compression.*``). ``topk_fraction`` is the share a top-k downlink keeps
    (an uplink's is the clients' to choose); ``joint``: top-k keeps its share among all of a
    message's arrays together, not of each (FLASC's sparsity, :meth:`for_strategy`)."""

    uplink: str = "none"
    downlink: str = "none"
    topk_fraction: float = 0.1
    joint: bool = False

    def for_strategy(self, strategy: Strategy) -> "Codecs":
        """These codecs, or for a strategy that sparsifies its own messages (``sparse_messages``,
        FLASC) joint top-k both ways at its download density (its clients' upload density travels
        in their plans); such a strategy with codecs of the run's own is refused in one line."""
        links = strategy.sparse_links()
        if links is None:
            return self
        if self != Codecs():
            raise ValueError(f"strategy={strategy.name} takes no compression codecs: {strategy.sparse_messages}")
        return Codecs("topk", "topk", links[0], joint=True)


def sample_size(num_nodes: int, fraction: float, min_clients: int) -> int:
    """Clients sampled per round: ``fraction`` of the nodes, at least ``min_clients`` and 1, at most all."""
    return min(max(int(num_nodes * fraction), min_clients, 1), num_nodes)


class BaseMerges:
    """The base merges of a run as every party applies them (FLoRA's stacked updates, FedEx-LoRA's
    residuals, FeDeRA's fold: ``GlobalModel.merges``): the form each merge travels in (chosen once,
    :func:`fedpeft.merges.cheapest`), the merges handed to the run's merge store (``on_merge``,
    called with the version and its forms), each round's encoded merges (shared by the round's
    messages) and the base version each client's node has. Its state is part of the server's."""

    def __init__(self, on_merge: Callable[[int, Any], None] | None = None) -> None:
        self.on_merge = on_merge
        self.forms: dict[int, merge_forms.Merge] = {}  # base version → its merge in the form it travels (chosen once)
        self.published = 0  # merges handed to on_merge (the store); init's (FeDeRA) go at round 1
        self.encoded: dict[int, messages.EncodedMerge] = {}  # this round's encoded merges, shared by its messages
        self.seen: dict[int, int] = {}  # client (partition id) → the base version its node has

    def form(self, model: GlobalModel, version: int) -> merge_forms.Merge:
        """Base version ``version``'s merge in the form every party applies: per module the
        cheapest exact form of the strategy's stacked factors (:func:`fedpeft.merges.cheapest`),
        chosen once; the messages, the merge store (``on_merge``) and the state carry this form."""
        if version not in self.forms:
            self.forms[version] = merge_forms.cheapest(model.merges[version - 1])
        return self.forms[version]

    def publish(self, model: GlobalModel) -> None:
        """Choose the form of every merge not yet handed to ``on_merge`` (the run's merge store) and
        hand it over: a round's merge when the round is applied, a strategy's initial merge (FeDeRA)
        before round 1's messages go out."""
        for v in range(self.published + 1, model.version + 1):
            forms = self.form(model, v)  # chosen once, now: the store and every later message carry it
            if self.on_merge is not None:
                self.on_merge(v, forms)
            self.published = v

    def new_round(self) -> None:
        self.encoded = {}  # last round's encoded merges go with last round's messages

    def encoded_merge(self, model: GlobalModel, version: int) -> messages.EncodedMerge:
        """Base version ``version``'s merge encoded once per round: every message of the round that
        carries it holds these same ``Array`` objects (each message's byte count includes them)."""
        if version not in self.encoded:
            self.encoded[version] = messages.encode_merge(version, self.form(model, version))
        return self.encoded[version]

    def missing(self, model: GlobalModel, pid: int, version: int) -> dict[int, messages.EncodedMerge]:
        """The base merges client ``pid``'s node has not seen, up to ``version``."""
        return {v: self.encoded_merge(model, v) for v in range(self.seen.get(pid, 0) + 1, version + 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"merge_forms": {v: {m: merge_forms.parts(f) for m, f in forms.items()} for v, forms in self.forms.items()},
                "merges_published": self.published}

    def load_state_dict(self, state: dict[str, Any], model: GlobalModel) -> None:
        if "merge_forms" in state:
            self.forms = {int(v): {m: merge_forms.from_parts(p) for m, p in forms.items()} for v, forms in state["merge_forms"].items()}
        else:  # a state written before merges had forms: its nodes were sent the stacked factors
            self.forms = {v + 1: dict(merge) for v, merge in enumerate(model.merges)}
        self.encoded = {}
        # A resumed run is a new Flower run: every node's state (the merges it kept) starts empty,
        # on whichever machine it runs, so each node is sent every merge again, from version 1.
        self.seen = {}
        self.published = int(state.get("merges_published", model.version))  # older states: every merge came from a round


class FlowerAdapter(FlowerStrategy):
    """Runs a pure :class:`strategies.base.Strategy` on Flower's Message API."""

    def __init__(
        self,
        strategy: Strategy,
        model: GlobalModel,
        *,
        fraction: float,
        min_clients: int,
        client_spec: Callable[[int], ClientSpec],
        shapes: dict[str, tuple[int, int]],
        seed: int,
        on_merge: Callable[[int, Any], None] | None = None,
        privacy: PrivacyPlan | None = None,
        codecs: Codecs = Codecs(),
        num_clients: int | None = None,
        identify_timeout: float | None = None,
        expected_examples: Callable[[int], int | None] | None = None,
        config_digest: str = "",
        base_weights: dict[str, torch.Tensor] | None = None,
        lr_at: Callable[[int], float] | None = None,
        failure_note: Callable[[str], str] | None = None,
        server_optimizer: ServerOptimizer | None = None,
        robust: RobustRule | None = None,
        known_partitions: Callable[[], dict[int, int]] | None = None,
        secure: Any = None,
    ) -> None:
        self.strategy = strategy
        # secagg.enabled: the round's exchange (fedpeft.secagg.SecAggPlus) whose ``last`` round holds the unmasked mean
        self.secure = secure
        # server.optimizer: FedAvgM / FedAdagrad / FedAdam / FedYogi over each round's aggregate, with its state (resumed)
        self.server_opt = ServerOptLayer(server_optimizer) if server_optimizer is not None else None
        # strategy.scaffold: SCAFFOLD's server control variate c over the N clients (fedpeft.scaffold), saved with the state
        self.control = ControlVariates(num_clients or 0) if getattr(strategy, "scaffold", False) else None
        self.controls: dict[int, dict[str, torch.Tensor] | None] = {}  # node id → its reply's Δc_i this round (SCAFFOLD)
        self.robust = robust  # server.robust: median / trimmed mean / Krum / Multi-Krum over the round's updates (stateless)
        # node id -> partition id where the launcher knows it (fedpeft's simulation: fedpeft.simnodes); others are asked
        self.known_partitions = known_partitions
        self.lr_at = lr_at  # round → its learning rate (train.lr_schedule), sent to the clients; None: each uses train.lr
        self.failure_note = failure_note  # a client failure's reason → what to add to its warning line (an actor killed: its memory plan)
        self.model = strategy.start(model, base_weights)  # base_weights: the frozen pre-trained weights, for a strategy that starts from them (FeDeRA)
        self.strategy_state = strategy.server_state()  # what the strategy keeps between rounds (HetLoRA's pruned ranks), saved with the rest
        self.fraction = fraction
        self.min_clients = min_clients
        self.client_spec = client_spec
        self.shapes = shapes
        self.rng = random.Random(seed)
        self.merges = BaseMerges(on_merge)  # the base merges as every party applies them, and who has which
        self.privacy = privacy
        self.codecs = codecs.for_strategy(strategy)  # FLASC: its own sparsity both ways
        self.seed = seed
        self.sent: dict[int, tuple[ClientSpec, Any, Any]] = {}  # node id → (spec, payload, uplink reference)
        self.out: dict[int, Message] = {}  # node id → the train message sent to it this round
        self.stats: dict[int, RoundStats] = {}
        self.num_clients = num_clients  # partition ids are 0 .. num_clients - 1 (when known)
        self.identify_timeout = identify_timeout
        # node id → its partition id (= client id), asked once. The first node to claim a partition
        # holds it for the run, online or not (saved with the state: a resume keeps it)
        self.partition_of: dict[int, int] = {}
        self.left_out: dict[int, str] = {}  # connected node → why it holds no partition (its last answer)
        self.restored = False  # partition_of came from a saved state and no node has been asked since
        self.local_data: set[int] = set()  # clients whose node trains on its own data (a device), not its partition
        self._missing: dict[int, str] = {}  # this round's partitions without a connected node → why (sample)
        self._t0 = 0.0
        # partition id → that client's example count where the server knows it (simulation): a
        # reply must then claim exactly that many; otherwise an int in [1, messages.MAX_EXAMPLES]
        self.expected_examples = expected_examples
        self.rounds_applied = 0  # rounds whose aggregate became the global model
        self.config_digest = config_digest  # sent with each train message: a node checks its run config against it
        self.evaluation = PersonalEvaluation() if strategy.personalized else None  # clients evaluate their own models (FedSA-LoRA)

    def state_dict(self) -> dict[str, Any]:
        """Everything this adapter needs to continue a run after its last complete round: the
        global model (with FLoRA's merges, FlexLoRA's factors), the forms FLoRA's merges travel in
        (what the nodes applied: a resumed run sends the same), the sampler's random state, the
        base version each client's node has, the strategy's own state (HetLoRA's pruned ranks,
        ``rank_now``), the privacy ledger."""
        own = {"model": _model_state(self.model), **self.merges.state_dict(), "rng": self.rng.getstate()}
        rest = {"rounds_applied": self.rounds_applied, "ledger": self.privacy.state_dict() if self.privacy is not None else None,
                "partition_of": dict(self.partition_of), "local_data": sorted(self.local_data),
                **({"server_optimizer": self.server_opt.state_dict()} if self.server_opt is not None else {}),
                **({"scaffold": self.control.state_dict()} if self.control is not None else {})}
        strategy_state = self.strategy_state.state_dict()
        taken = sorted(strategy_state.keys() & (own.keys() | rest.keys()))
        if taken:
            raise ValueError(f"strategy={self.strategy.name}: its server state's keys {taken} are the server's own; name them otherwise")
        return {**own, **strategy_state, **rest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model = _model_from_state(state["model"])
        self.merges.load_state_dict(state, self.model)
        self.rng.setstate(state["rng"])
        self.strategy_state.load_state_dict(state)
        self.rounds_applied = int(state["rounds_applied"])
        self.partition_of = {int(n): int(p) for n, p in state.get("partition_of", {}).items()}  # older states: asked afresh
        self.local_data = {int(p) for p in state.get("local_data", ())}
        self.restored = bool(self.partition_of)
        if self.privacy is not None:
            self.privacy.load_state_dict(state["ledger"])
        if self.server_opt is not None and "server_optimizer" in state:
            self.server_opt.load_state_dict(state["server_optimizer"])
        if self.control is not None:  # a state saved without SCAFFOLD is refused before: strategy.scaffold changed
            self.control.load_state_dict(state["scaffold"])

    def summary(self) -> None:
        log.info("fedpeft strategy %s, fraction %s, min clients %s", self.strategy.name, self.fraction, self.min_clients)

    def arrays(self) -> ArrayRecord:
        return messages.encode(self.model.adapter, self.model.head, {})[messages.ARRAYS]

    def identify(self, grid: Grid) -> dict[int, int]:
        """Node id → partition id of every connected node that holds a partition. Node ids are
        random (in simulation too), so the server asks each node it has not seen its
        ``partition-id`` once, with a query message (:func:`clients.app.query_handler`): ranks,
        sampling and logs then follow the partition id, and the same seed gives the same run.

        The first node to claim a partition holds it for the run, connected or not, and after a
        resume (the claims are saved with the state): a later claimant is left out with a warning
        naming both nodes. Claims made in the same exchange go in the order the nodes made their
        replies (``created_at``), then by node id. A node that does not answer or answers out of
        range (``0 .. num_clients - 1``) is left out too (:attr:`left_out` says why). After a
        resume under a new SuperLink (none of the saved holders is connected: node ids are the
        SuperLink's), the partitions are claimed afresh. Nodes that ``known_partitions`` lists (the
        simulation engine's own map, :mod:`fedpeft.simnodes`) are not asked."""
        nodes = set(grid.get_node_ids())
        if self.restored and nodes:  # the first nodes seen since the resume say whose node ids the claims are
            self.restored = False
            if not nodes & set(self.partition_of):
                log.info("none of the nodes that held the partitions (%s) is connected: a new SuperLink; partitions are claimed afresh",
                         ", ".join(f"{p}: node {n}" for n, p in sorted(self.partition_of.items(), key=lambda kv: kv[1])))
                self.partition_of, self.local_data = {}, set()
        self.left_out = {n: why for n, why in self.left_out.items() if n in nodes}
        unknown = sorted(n for n in nodes if n not in self.partition_of)
        known = self.known_partitions() if self.known_partitions is not None and unknown else {}
        if known:  # the simulation engine's own map: no query (5000 nodes took ~140 s to answer one each)
            held = set(self.partition_of.values())
            for node in [n for n in unknown if n in known and known[n] not in held]:
                self.partition_of[node] = known[node]
                held.add(known[node])
                self.local_data.discard(known[node])
            unknown = [n for n in unknown if n not in self.partition_of]
        if unknown:
            ask = [
                Message(RecordDict({messages.CONFIG: ConfigRecord({"query": "partition-id"})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in unknown
            ]
            held = {p: n for n, p in self.partition_of.items()}  # every claim, its node connected or not
            replies = list(grid.send_and_receive(ask, timeout=self.identify_timeout))
            asked = _ids({m.metadata.dst_node_id: m for m in ask})
            answered: set[int] = set()
            for reply in sorted(replies, key=lambda m: (m.metadata.created_at, _sender(m, asked))):
                node = _sender(reply, asked)
                if node not in unknown or node in answered:  # not asked, or a second answer
                    continue
                answered.add(node)
                try:
                    if reply.has_error():
                        raise ValueError(_one_line(reply.error.reason))
                    pid = reply.content.config_records[messages.CONFIG]["partition-id"]
                    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0 or (self.num_clients is not None and pid >= self.num_clients):
                        raise ValueError(f"partition-id {pid!r} is not one of 0..{(self.num_clients or 0) - 1}")
                    if pid in held:
                        raise ValueError(f"partition-id {pid} is held by node {held[pid]}, the first node to claim it")
                except (KeyError, ValueError, TypeError) as e:
                    self.left_out[node] = str(e)
                    log.warning("node %d left out: it did not identify its partition (%s)", node, e)
                    continue
                self.left_out.pop(node, None)
                self.partition_of[node], held[pid] = pid, node
                if reply.content.config_records[messages.CONFIG].get("local-data") is True:
                    self.local_data.add(pid)
                else:
                    self.local_data.discard(pid)
            for node in sorted(set(unknown) - answered):
                self.left_out[node] = "no answer to the partition-id query"
                log.warning("node %d left out: it did not answer the partition-id query", node)
        return {n: p for n, p in self.partition_of.items() if n in nodes}

    def missing(self, known: dict[int, int]) -> dict[int, str]:
        """The run's partitions (``0 .. num_clients - 1``) that no connected node serves (``known``:
        :meth:`identify`'s answer) → why, in words; empty when the number of partitions is unknown."""
        if self.num_clients is None:
            return {}
        holder = {p: n for n, p in self.partition_of.items()}
        served = set(known.values())
        return {p: (f"its node {holder[p]} is not connected" if p in holder else "no node claimed it")
                for p in range(self.num_clients) if p not in served}

    def missing_line(self, missing: dict[int, str]) -> str:
        """``missing`` (:meth:`missing`) and the connected nodes left out, in one line."""
        parts = [f"partition {p}: {why}" for p, why in sorted(missing.items())]
        parts += [f"node {n} left out: {why}" for n, why in sorted(self.left_out.items())]
        return "; ".join(parts)

    def check_partitions(self, grid: Grid) -> None:
        """Before the first round (a resumed run's too): every partition of the run has a connected
        node, or the run is refused with one line naming the partitions without one and why
        (:class:`FederationFailed`). A node serving an out-of-range partition, an intruder on a
        held partition, a device that never connected: each leaves a partition of the
        configuration untrained, which the run's results would silently hide."""
        missing = self.missing(self.identify(grid))
        if missing:
            raise FederationFailed(f"partition(s) {', '.join(map(str, sorted(missing)))} of 0..{self.num_clients - 1} have no node; "
                                   f"every partition needs one to start the run ({self.missing_line(missing)})")

    def sample(self, grid: Grid) -> dict[int, int]:
        """This round's sampled nodes → their partition ids: ``sample_size`` partitions drawn with
        the run's seeded RNG from the sorted partition ids of the connected nodes. The partitions
        without a connected node are this round's :attr:`RoundStats.missing`; fewer connected
        partitions than ``min_clients`` stop the run (:class:`FederationFailed`), naming them."""
        known = self.identify(grid)
        self._missing = self.missing(known)
        if self._missing and len(known) < max(self.min_clients, 1):
            raise FederationFailed(f"{len(known)} of {self.num_clients} partitions have a connected node, fewer than "
                                   f"min_clients={self.min_clients} ({self.missing_line(self._missing)})")
        node_of = {p: n for n, p in known.items()}
        pids = sorted(node_of)
        want = sample_size(len(pids), self.fraction, self.min_clients)
        return {node_of[p]: p for p in sorted(self.rng.sample(pids, want))}

    def adopt(self, arrays: ArrayRecord) -> None:
        """Take the adapter and head tensors from ``arrays`` (scalings kept): after a wrapper such
        as Flower's central-DP strategy changed the aggregate this adapter returned."""
        tensors = arrays.to_torch_state_dict()
        adapter = {m: LoraFactors(tensors[f"A/{m}"], tensors[f"B/{m}"], f.scaling) for m, f in self.model.adapter.items()}
        head = {h: tensors[f"head/{h}"] for h in self.model.head}
        self.model = replace(self.model, adapter=adapter, head=head)

    @property
    def stopped(self) -> str | None:
        """Why the run ended early (the privacy layer's budget), or None."""
        return self.privacy.stopped if self.privacy is not None else None

    def account(self, server_round: int) -> float | None:
        """The privacy layer spends this round's releases (:meth:`fedpeft.privacy.PrivacyPlan.spend`);
        a round past the budget stops the run as Flower's strategies do (``PrivacyBudgetExhausted``)."""
        if self.privacy is None:
            return None
        try:
            return self.privacy.spend(server_round)
        except BudgetExhausted as e:
            raise PrivacyBudgetExhausted(str(e)) from None

    def merge_form(self, version: int) -> merge_forms.Merge:
        """Base version ``version``'s merge in the form every party applies (:meth:`BaseMerges.form`)."""
        return self.merges.form(self.model, version)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._t0 = time.perf_counter()
        self.merges.new_round()
        if self.privacy is not None and self.privacy.mode == "central":
            self.adopt(arrays)
        epsilon = self.account(server_round)
        self.merges.publish(self.model)
        sampled = self.sample(grid)
        stats = self.stats[server_round] = RoundStats(sampled=len(sampled), epsilon=epsilon, missing=tuple(sorted(self._missing)))
        if self._missing:
            log.warning("round %d: partition(s) %s have no node (%s)", server_round, ", ".join(map(str, stats.missing)), self.missing_line(self._missing))
        self.sent = {}
        self.controls = {}
        out = []
        for node, pid in sampled.items():
            spec, payload = self.payload_of(pid)
            up_A, up_B = payload.plan.uplink
            down_A, down_B = payload.plan.downlink
            content = messages.encode(
                payload.adapter,
                payload.head,
                {
                    **({"noise-multiplier": self.privacy.noise_multiplier} if self.privacy is not None and self.privacy.mode in ("sample", "local") else {}),
                    **self.header(server_round, spec, payload),
                },
                send_A=down_A,
                send_B=down_B,
                merges=self.merges.missing(self.model, pid, payload.base_version),
                codec=self.codecs.downlink,
                fraction=self.codecs.topk_fraction,
                joint=self.codecs.joint,
                generator=torch.Generator().manual_seed(hash((self.seed, server_round, spec.client_id, 1)) % 2**31),
            )
            if payload.plan.scaffold:  # the server's c on the tensors the client trains travels down (counted)
                content[CONTROL_RECORD] = messages.encode_control(self.control.for_client(self.trained_shapes(spec, payload)))
            stats.bytes_down += messages.num_bytes(content)
            reference = None
            if self.codecs.uplink != "none":  # the start the client's delta-coded update is measured from
                reference = messages.start_tensors(messages.decode(content, with_merges=False), self.shapes, spec.rank, spec.alpha, send_A=up_A, send_B=up_B)
            self.sent[node] = (spec, payload, reference)
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self.out = {m.metadata.dst_node_id: m for m in out}
        return out

    def payload_of(self, pid: int):
        """Client ``pid``'s spec as the strategy's state has it (HetLoRA: its rank as it shrank) and
        the strategy's payload for it."""
        spec = self.strategy_state.spec(self.client_spec(pid))
        return spec, self.strategy.payload(self.model, spec)

    def trained_shapes(self, spec: ClientSpec, payload) -> dict[str, tuple[int, ...]]:
        """The shapes of the tensors client ``spec`` trains and sends back, keyed as on the wire (an
        empty payload adapter: a fresh LoRA at the client's rank)."""
        up_A, up_B = payload.plan.uplink
        out: dict[str, tuple[int, ...]] = {}
        for m, (o, i) in sorted(self.shapes.items()):
            f = payload.adapter.get(m)
            if up_A:
                out[f"A/{m}"] = tuple(f.A.shape) if f is not None else (spec.rank, i)
            if up_B:
                out[f"B/{m}"] = tuple(f.B.shape) if f is not None else (o, spec.rank)
        for h, t in payload.head.items():
            out[f"head/{h}"] = tuple(t.shape)
        return out

    def header(self, server_round: int, spec: ClientSpec, payload) -> dict[str, Any]:
        """A train or evaluate message's config: the strategy's plan (:meth:`fedpeft.plan.ClientPlan.to_config`) and the reserved keys."""
        return {
            **payload.plan.to_config(),
            **({"config-digest": self.config_digest} if self.config_digest else {}),
            "server-round": server_round,
            "rank": spec.rank,
            "alpha": float(spec.alpha),
            "base-version": payload.base_version,
            **({"lr": float(self.lr_at(server_round))} if self.lr_at is not None else {}),
        }

    def check_reply(self, node: int, msg: Message) -> tuple[ClientUpdate, dict[str, float]]:
        """The update in ``node``'s reply, checked against what was sent to it: its records, keys,
        declared shapes and dtypes, rank (``strategy.reply_ranks``), scalings and codec before
        anything is deserialised (:func:`messages.check_reply_layout`), its ``num-examples``
        (:func:`messages.check_num_examples`), then its values (:func:`messages.check_update`).
        Raises :class:`messages.UpdateError` naming the culprit key."""
        spec, payload, reference = self.sent[node]
        content = msg.content
        control = None
        if payload.plan.scaffold:  # SCAFFOLD's Δc_i, checked on its own; the rest is the plain reply
            control = messages.decode_control(content, self.trained_shapes(spec, payload))
            content = RecordDict({k: v for k, v in content.items() if k != CONTROL_RECORD})
        ranks = tuple(self.strategy.reply_ranks(spec.rank))
        up_A, up_B = payload.plan.uplink
        messages.check_reply_layout(
            content,
            self.shapes,
            {h: tuple(t.shape) for h, t in payload.head.items()},
            ranks,
            scaling=spec.scaling,  # the client's peft scaling; a pruned rank keeps it
            send_A=up_A,
            send_B=up_B,
            A_seed=payload.plan.A_seed,
            codec=self.codecs.uplink,
        )
        n, metrics = self.check_counts(node, content)
        # a factor the client kept frozen is not in its reply: the one it was sent (RoLoRA)
        dec = messages.decode(content, reference, kept=None if up_A and up_B else payload.adapter)
        # neither factor sent back (SLoRA's stage 1, frozen LoRA): the update is its head alone
        messages.check_update(dec.adapter, dec.head, self.shapes if up_A or up_B else {}, max(ranks), payload.head)
        self.controls[node] = control
        return ClientUpdate(client_id=spec.client_id, adapter=dec.adapter, head=dec.head, num_examples=n), metrics

    def check_counts(self, node: int, content: RecordDict) -> tuple[int, dict[str, float]]:
        """A reply's ``num-examples`` (:func:`messages.check_num_examples`), ``partition-id`` and finite metrics."""
        spec = self.sent[node][0]
        cfg = content.config_records[messages.CONFIG]
        known = self.expected_examples is not None and spec.client_id not in self.local_data
        expected = self.expected_examples(spec.client_id) if known else None
        n = messages.check_num_examples(cfg.get("num-examples"), expected)
        if "partition-id" in cfg and cfg["partition-id"] != spec.client_id:
            raise messages.UpdateError(f"partition-id is {cfg['partition-id']!r}, expected {spec.client_id}")
        metrics = dict(content.metric_records[messages.METRICS]) if messages.METRICS in content.metric_records else {}
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        return n, metrics

    def check_masked(self, node: int, msg: Message) -> tuple[int, dict[str, float], ConfigRecord]:
        """A SecAgg+ reply (its arrays cleared by Flower's mod, its masked vector in Flower's record):
        its counts (:meth:`check_counts`) and layout (:data:`messages.SECAGG_LAYOUT`)."""
        content = msg.content
        if messages.SECAGG_LAYOUT not in content.config_records or any(len(r) for r in content.array_records.values()):
            raise messages.UpdateError("not a SecAgg+ reply (no masked vector, or arrays in the clear)")
        n, metrics = self.check_counts(node, content)
        return n, metrics, content.config_records[messages.SECAGG_LAYOUT]

    def unmasked_update(self, node: int, layout: ConfigRecord, config: ConfigRecord, total: int) -> ClientUpdate:
        """The round's unmasked weighted mean as one update of weight ``total`` (Σ n_k), checked like
        a reply of ``node`` (one of the clients summed: every client's layout is the same)."""
        spec, payload, _ = self.sent[node]
        content = messages.unmasked_content(self.secure.last.mean, layout, config)
        ranks = tuple(self.strategy.reply_ranks(spec.rank))
        up_A, up_B = payload.plan.uplink
        messages.check_reply_layout(content, self.shapes, {h: tuple(t.shape) for h, t in payload.head.items()}, ranks,
                                    scaling=spec.scaling, send_A=up_A, send_B=up_B, A_seed=payload.plan.A_seed, codec="none")
        dec = messages.decode(content, kept=None if up_A and up_B else payload.adapter)
        messages.check_update(dec.adapter, dec.head, self.shapes, max(ranks), payload.head)
        return ClientUpdate(client_id=spec.client_id, adapter=dec.adapter, head=dec.head, num_examples=total)

    def secure_updates(self, server_round: int, masked: list[tuple[int, int, ConfigRecord, ConfigRecord]],
                       stats: RoundStats) -> tuple[list[ClientUpdate], list[tuple[ClientSpec, ClientUpdate]]]:
        """secagg: the round's one update, the unmasked weighted mean of the masked replies
        (:mod:`fedpeft.secagg`), or none where the protocol halted, a reply was rejected (its masked
        vector is in the sum and cannot be taken out) or the layouts differ. Adds the protocol's
        own bytes (keys, shares) to the round's counts."""
        last = self.secure.last
        stats.bytes_down += last.bytes_down
        stats.bytes_up += last.bytes_up
        why = None
        if last.halted is not None:
            why = f"Flower's SecAgg+ halted at its {last.halted} stage (too few clients left for reconstruction_threshold)"
        elif stats.rejected:
            why = f"{stats.rejected} rejected repl{'y is' if stats.rejected == 1 else 'ies are'} in the masked sum"
        elif not masked or any(dict(layout) != dict(masked[0][2]) for _, _, layout, _ in masked):
            why = "the clients' masked layouts differ" if masked else "no masked reply"
        if why is not None:
            log.warning("round %d not applied: no secure aggregate: %s; the global model is unchanged", server_round, why)
            return [], []
        node, _, layout, config = masked[0]
        try:
            update = self.unmasked_update(node, layout, config, sum(n for _, n, _, _ in masked))
        except (messages.UpdateError, KeyError, ValueError, TypeError) as e:
            log.warning("round %d: the unmasked aggregate is rejected: %s", server_round, _one_line(str(e)))
            return [], []
        return [update], [(self.sent[node][0], update)]

    def _who(self, node: int) -> str:
        pid = self.partition_of.get(node)
        return f"client {pid} (node {node})" if pid is not None else f"node {node}"

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply against what was sent to its node (:meth:`check_reply`); a bad one is
        rejected with a one-line warning (``stats.rejected``), as is a reply from a node not sampled
        this round or a second reply from a node; the good ones are aggregated. A round with fewer
        than ``min_clients`` good replies is not applied: the global model stays (``round_applied``
        0, ``stats.applied`` false). More than half of the sampled clients failing with one same
        error raises :class:`FederationFailed`; scattered failures are one warning line each."""
        stats = self.stats[server_round]
        updates: list[ClientUpdate] = []
        metric_rows: list[tuple[int, dict[str, float]]] = []
        failures: list[tuple[int, str]] = []
        answered: set[int] = set()
        accepted: list[tuple[ClientSpec, ClientUpdate]] = []  # the good updates with their specs, for the strategy's state
        deltas: list[dict[str, torch.Tensor]] = []  # SCAFFOLD's Δc_i of the good updates, in partition order
        masked: list[tuple[int, int, ConfigRecord, ConfigRecord]] = []  # secagg: (node, n_k, layout, config) of each good masked reply

        def reject(node: int, reason: object) -> None:
            stats.rejected += 1
            log.warning("round %d: update from %s rejected: %s", server_round, self._who(node), _one_line(str(reason)))

        # Replies arrive in any order; aggregate in partition order so that float sums are reproducible.
        ids = _ids(self.out)
        order = lambda m: (self.partition_of.get(_sender(m, ids), -1), _sender(m, ids))  # noqa: E731
        for msg in sorted(replies, key=order):
            node = _sender(msg, ids)
            if node not in self.sent:
                reject(node, f"node {node} was not sampled in round {server_round}")
                continue
            if node in answered:
                reject(node, f"a second reply from node {node} in round {server_round}")
                continue
            answered.add(node)
            if msg.has_error():
                stats.failed += 1
                failures.append((node, _one_line(msg.error.reason), msg.error.code))
                continue
            spec, payload, _ = self.sent[node]
            try:
                if self.secure is not None:
                    n, metrics, layout = self.check_masked(node, msg)
                    masked.append((node, n, layout, msg.content.config_records[messages.CONFIG]))
                else:
                    update, metrics = self.check_reply(node, msg)
                    n = update.num_examples
            except (messages.UpdateError, KeyError, ValueError, TypeError, OverflowError) as e:
                reject(node, e)
                continue
            stats.bytes_up += messages.num_bytes(msg.content)
            self.merges.seen[spec.client_id] = payload.base_version
            if self.secure is None:
                accepted.append((spec, update))
                updates.append(update)
                if self.controls.get(node) is not None:
                    deltas.append(self.controls[node])
            if metrics:
                metric_rows.append((n, metrics))
        if self.secure is not None:
            updates, accepted = self.secure_updates(server_round, masked, stats)
        # A sampled node that sent nothing within the round timeout (it died, or lost its connection)
        # is a failed client too; Flower returns no message for it.
        for node in sorted(set(self.sent) - answered, key=lambda n: self.partition_of.get(n, -1)):
            stats.failed += 1
            failures.append((node, "no reply within the round timeout (engine.round_timeout)", ErrorCode.REPLY_MESSAGE_UNAVAILABLE))
        # Nodes that dropped out (Flower's unavailable-node or missing-reply errors) are no client's fault.
        # Compared by cause: lines that differ only in their numbers (a client id, a pid, nan or inf) are one error.
        # The fault profile's injected failures (clients.app.InjectedFailure) are independent by design.
        causes = [(cause(line), line) for _, line, code in failures if code not in _TRANSPORT_ERRORS and _INJECTED not in line]
        same = Counter(c for c, _ in causes).most_common(1)
        if same and 2 * same[0][1] > stats.sampled:
            example = next(line for c, line in causes if c == same[0][0])
            raise FederationFailed(f"{example} ({same[0][1]} of {stats.sampled} sampled clients)")
        for node, line, _ in failures:
            pid = self.partition_of.get(node)
            note = self.failure_note(line) if self.failure_note is not None else ""
            log.warning("round %d: client %son node %d failed: %s%s", server_round, "" if pid is None else f"{pid} ", node, line, note)
        stats.replied = len(masked) if self.secure is not None else len(updates)
        fewest = max(self.min_clients, 1, self.robust.min_updates() if self.robust is not None else 1)
        stats.applied = bool(updates) and stats.replied >= fewest
        diagnostics: dict[str, float] = {}
        if stats.applied:
            # secagg: one update, the mean; a strategy's diagnostics need each client's update
            diagnostics = self.strategy.round_metrics(self.model, updates) if self.secure is None else {}
            previous = self.model
            if self.robust is not None:
                self.model, kept = robust_aggregate(self.robust, self.strategy, self.model, updates)
                if kept is not None:
                    diagnostics["robust_kept"] = len(kept)
                    log.info("round %d: %s keeps clients %s", server_round, self.robust.kind, [updates[i].client_id for i in kept])
            else:
                self.model = self.strategy.aggregate(self.model, updates)
            if self.server_opt is not None:  # step the global model along the round's update (fedpeft.serveropt)
                trained = [payload.plan.uplink for _, payload, _ in self.sent.values()]  # the factors the round trained
                adapter, head = self.server_opt.apply(previous.adapter, previous.head, self.model.adapter, self.model.head,
                                                      train_A=any(a for a, _ in trained), train_B=any(b for _, b in trained))
                self.model = replace(self.model, adapter=adapter, head=head)
            if self.control is not None:  # c ← c + |S|/N · mean Δc_i (fedpeft.scaffold)
                self.control.apply(deltas)
            self.merges.publish(self.model)
            self.strategy_state.applied(accepted)
            self.rounds_applied += 1
        elif stats.replied < fewest:  # (secagg with enough replies: secure_updates said why)
            log.warning(
                "round %d not applied: %d good update(s) of %d sampled, fewer than %s; the global model is unchanged",
                server_round, stats.replied, stats.sampled,
                f"min_clients={self.min_clients}" if fewest == max(self.min_clients, 1)
                else f"the {fewest} updates {self.robust.kind} needs (server.krum_f + 3)",
            )
        if self.secure is not None:  # the protocol's own bytes (keys, shares), also in bytes_down / bytes_up
            diagnostics.update(secagg_bytes_down=self.secure.last.bytes_down, secagg_bytes_up=self.secure.last.bytes_up)
        stats.train_metrics = {**_weighted_mean(metric_rows), **diagnostics}
        if self.lr_at is not None:  # the round's scheduled learning rate, in its metrics row
            stats.train_metrics["lr"] = float(self.lr_at(server_round))
        if any("train_seconds" in m for _, m in metric_rows):  # the slowest client: round_seconds minus it is the framework's overhead
            stats.train_metrics["train_seconds_max"] = max(m["train_seconds"] for _, m in metric_rows if "train_seconds" in m)
        stats.seconds = time.perf_counter() - self._t0
        metrics = {
            **stats.train_metrics,
            "clients_sampled": stats.sampled,
            "clients_replied": stats.replied,
            "clients_failed": stats.failed,
            "clients_rejected": stats.rejected,
            "clients_missing": len(stats.missing),
            "round_applied": int(stats.applied),
            "bytes_down": stats.bytes_down,
            "bytes_up": stats.bytes_up,
            **({"epsilon": stats.epsilon} if stats.epsilon is not None else {}),
        }
        # Not applied: no new arrays (Flower keeps the previous ones; a DP wrapper adds no noise).
        return (self.arrays() if stats.applied else None), MetricRecord({k: float(v) for k, v in metrics.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's evaluate step: a ``personalized`` strategy's clients evaluate their own models
        (:meth:`PersonalEvaluation.configure`); other strategies send nothing (the server
        evaluates the global adapter itself)."""
        return self.evaluation.configure(self, server_round, grid) if self.evaluation is not None else []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The personalised evaluation's metrics of the round (:meth:`PersonalEvaluation.aggregate`); None without one."""
        return self.evaluation.aggregate(self, server_round, replies) if self.evaluation is not None else None

    @property
    def personal(self) -> dict[int, dict[str, float]]:
        """Round → the personalised evaluation's metrics (empty without one)."""
        return self.evaluation.metrics if self.evaluation is not None else {}


def robust_aggregate(rule: RobustRule, strategy: Strategy, model: GlobalModel, updates: list[ClientUpdate]) -> tuple[GlobalModel, list[int] | None]:
    """The next global model from ``updates`` under a robust rule (:mod:`fedpeft.robust`), and the
    indices of the updates Krum / Multi-Krum kept (None for a coordinate-wise rule).

    Median and trimmed mean, for a strategy that averages same-shaped factors tensor by tensor
    (``effective_updates`` None: FedAvg, FFA-LoRA, FedSA-LoRA's A, RoLoRA, Fed-SB's cores, DP-LoRA,
    FeDeRA): the rule takes every coordinate of every tensor the clients sent (each module's A and
    B, the head) over the clients, and the strategy aggregates that one robust update as its only
    client's. So it applies where the strategy's mean would: per factor, in factor space, where
    the robust rule's guarantee (Yin et al.) is about the parameters the model is made of; the
    median of the B's times the median of the A's is not the median of the products ``B_k A_k``,
    as FedAvg's mean of each factor is not the mean of the products. A factor every client sent
    unchanged (frozen: FFA-LoRA's A, RoLoRA's other factor) stays bit for bit.

    Krum and Multi-Krum select clients, for any strategy: the squared distances between clients
    are taken over the tensors the strategy aggregates (every factor and head tensor, flattened)
    where it averages same-shaped factors, and over the clients' effective updates ``s_k B_k A_k``
    (plus the head) where it declares ``effective_updates`` (FLoRA, FlexLoRA, HetLoRA, FedEx-LoRA)
    or the clients' ranks or scalings differ (FFA-LoRA with ``ranks=…``) — the adapter each client
    sent, which is its update for FLoRA (every client starts from B = 0) and its update plus the
    truncation it started from for HetLoRA and FlexLoRA (clients at one rank share that start); the strategy then aggregates the kept clients' updates as it
    would all of them
    (its own weighting; Blanchard et al.'s Multi-Krum averages them uniformly, as
    ``strategy.weighting=uniform`` does), so a re-factorising strategy re-factorises their
    aggregate its own way (FlexLoRA: SVD of the stacked factors to each client's rank)."""
    if rule.kind in COORDINATE_WISE:
        first = updates[0]
        adapter = {name: LoraFactors(rule.combine([u.adapter[name].A for u in updates]), rule.combine([u.adapter[name].B for u in updates]), f.scaling)
                   for name, f in first.adapter.items()}
        head = {h: rule.combine([u.head[h] for u in updates]) for h in first.head}
        robust = ClientUpdate(client_id=first.client_id, adapter=adapter, head=head, num_examples=sum(u.num_examples for u in updates))
        return strategy.aggregate(model, [robust]), None
    modules, heads = sorted(updates[0].adapter), sorted(updates[0].head)
    shapes = {tuple((tuple(u.adapter[m].A.shape), tuple(u.adapter[m].B.shape), u.adapter[m].scaling) for m in modules) for u in updates}
    if strategy.effective_updates is None and len(shapes) == 1:
        d2 = sq_distances([[t for m in modules for t in (u.adapter[m].A, u.adapter[m].B)] + [u.head[h] for h in heads] for u in updates])
    else:
        d2 = effective_sq_distances([[u.adapter[m] for u in updates] for m in modules], [[u.head[h] for h in heads] for u in updates])
    kept = rule.select(d2)
    return strategy.aggregate(model, [updates[i] for i in kept]), kept


class PersonalEvaluation:
    """Personalised evaluation, for a strategy that declares ``personalized`` (FedSA-LoRA): the
    global model alone is not a model, so each round every client evaluates its own on its
    held-out split and the replies are the round's ``personal`` metrics. Nothing of it is saved
    (a round's metrics go to its metrics row)."""

    def __init__(self) -> None:
        self.out: dict[int, Message] = {}  # node id → the evaluate message sent to it this round
        self.of: dict[int, int] = {}  # node id → the client (partition id) it evaluates
        self.metrics: dict[int, dict[str, float]] = {}  # round → its metrics

    def configure(self, adapter: FlowerAdapter, server_round: int, grid: Grid) -> list[Message]:
        """Every connected client is sent the strategy's payload for it (the global A and head,
        full precision, B never) in an evaluate message, and evaluates its own model on its
        held-out split (:func:`clients.app.evaluate_handler`)."""
        self.out, self.of = {}, {}
        out = []
        for node, pid in sorted(adapter.identify(grid).items(), key=lambda kv: kv[1]):
            spec, payload = adapter.payload_of(pid)
            send_A, send_B = payload.plan.downlink
            content = messages.encode(payload.adapter, payload.head, adapter.header(server_round, spec, payload), send_A=send_A, send_B=send_B,
                                      merges=adapter.merges.missing(adapter.model, pid, payload.base_version))
            self.of[node] = pid
            out.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        self.out = {m.metadata.dst_node_id: m for m in out}
        return out

    def aggregate(self, adapter: FlowerAdapter, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' own metrics (:func:`personal_metrics`) as this round's ``personal`` metrics.
        A client whose evaluation failed (an error reply, a malformed one, or none within the
        round timeout) is left out with a one-line warning and counted (``personal/failed``); it
        never ends the run."""
        if not self.out:
            return None
        ids = _ids(self.out)
        rows: dict[int, dict[str, float]] = {}
        failures: list[tuple[int, str]] = []
        answered: set[int] = set()
        for msg in sorted(replies, key=lambda m: self.of.get(_sender(m, ids), -1)):
            node = _sender(msg, ids)
            if node not in self.of or node in answered:
                log.warning("round %d: evaluation reply from %s ignored: %s", server_round, adapter._who(node),
                            "a second reply" if node in answered else "it was not asked to evaluate")
                continue
            answered.add(node)
            pid = self.of[node]
            try:
                if msg.has_error():
                    raise ValueError(_one_line(msg.error.reason))
                rows[pid] = check_eval_reply(msg.content, pid)
            except (messages.UpdateError, KeyError, ValueError, TypeError) as e:
                failures.append((node, _one_line(str(e))))
        failures += [(node, "no reply within the round timeout (engine.round_timeout)") for node in sorted(set(self.of) - answered, key=self.of.get)]
        for node, line in failures:
            log.warning("round %d: client %d on node %d failed evaluation: %s", server_round, self.of[node], node, line)
        metrics = {**personal_metrics(rows), "personal/clients": len(rows), "personal/failed": len(failures),
                   "personal/bytes_down": sum(messages.num_bytes(m.content) for m in self.out.values())}
        self.metrics[server_round] = metrics
        return MetricRecord({k: float(v) for k, v in metrics.items()})


def check_eval_reply(content: RecordDict, pid: int) -> dict[str, float]:
    """A client's evaluation reply: its ``partition-id`` is ``pid``, ``num-examples`` a positive
    int, and its metrics finite numbers; returns the metrics (without ``num-examples``)."""
    cfg = content.config_records[messages.CONFIG]
    if cfg.get("partition-id") != pid:
        raise messages.UpdateError(f"partition-id is {cfg.get('partition-id')!r}, expected {pid}")
    messages.check_num_examples(cfg.get("num-examples"))
    metrics = dict(content.metric_records[messages.METRICS])
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise messages.UpdateError(f"metric {k!r} is {v!r}, not a finite number")
    if not metrics:
        raise messages.UpdateError("the evaluation reply holds no metrics")
    return {k: float(v) for k, v in metrics.items()}


PERCENTILES = (10, 50, 90)


def personal_metrics(rows: dict[int, dict[str, float]]) -> dict[str, float]:
    """Per-client metrics → the round's: for every metric ``m`` the clients report, its mean over
    clients (unweighted: each client's own model counts once) ``personal/<m>_mean`` and
    percentiles ``personal/<m>_p10``, ``_p50``, ``_p90`` (linear interpolation, numpy's default);
    and the main metric (accuracy, or perplexity for a language model) of each client,
    ``personal_<main>/client_<id>``."""
    if not rows:
        return {}
    keys = sorted({k for m in rows.values() for k in m})
    main = "accuracy" if "accuracy" in keys else "perplexity" if "perplexity" in keys else keys[0]
    out: dict[str, float] = {f"personal_{main}/client_{pid}": m[main] for pid, m in sorted(rows.items()) if main in m}
    for k in keys:
        values = np.array([m[k] for _, m in sorted(rows.items()) if k in m], dtype=np.float64)
        out[f"personal/{k}_mean"] = float(values.mean())
        for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
            out[f"personal/{k}_p{q}"] = float(v)
    return out


def _adapter_state(adapter: dict) -> dict:
    return {m: {"A": f.A, "B": f.B, "scaling": float(f.scaling)} for m, f in adapter.items()}


def _adapter_from(state: dict) -> dict:
    return {m: LoraFactors(f["A"], f["B"], float(f["scaling"])) for m, f in state.items()}


def _model_state(model: GlobalModel) -> dict[str, Any]:
    return {"adapter": _adapter_state(model.adapter), "head": dict(model.head), "merges": [_adapter_state(m) for m in model.merges],
            "aggregations": model.aggregations}


def _model_from_state(state: dict[str, Any]) -> GlobalModel:
    return GlobalModel(_adapter_from(state["adapter"]), dict(state["head"]), tuple(_adapter_from(m) for m in state["merges"]),
                       int(state.get("aggregations", 0)))


def wrap_central_dp(adapter: FlowerAdapter, num_sampled: int) -> DifferentialPrivacyServerSideFixedClipping:
    """Central client-level DP with Flower's own wrapper (Andrew et al. 2021; McMahan et al. 2018):
    each reply's arrays are clipped to ``clip`` in L2 distance from the global arrays, the adapter
    averages them (uniform weights), and ``N(0, (σ·clip/K)²)`` is added to every aggregated array.
    It fits strategies whose payload *is* the global arrays and whose aggregate is their mean
    (FedAvg): the adapter then adopts the noised arrays as its state (:meth:`FlowerAdapter.adopt`)."""
    plan = adapter.privacy
    assert plan is not None and plan.mode == "central"
    return DifferentialPrivacyServerSideFixedClipping(adapter, plan.noise_multiplier, plan.clip, num_sampled)


def global_adapter(model: GlobalModel) -> dict:
    """What the global model adds to the base weights, as one adapter: ``model.adapter`` plus
    every FLoRA merge, stacked (exact: the stacked ``B·A`` is the sum). Past ``min(out, in)``
    components the stack is re-factorized exactly by its SVD from the factors."""
    if not model.merges:
        return dict(model.adapter)
    out = {}
    for m in model.merges[0]:
        parts = [merge[m] for merge in model.merges] + ([model.adapter[m]] if m in model.adapter else [])
        A = torch.cat([p.scaling * p.A for p in parts], dim=0)
        B = torch.cat([p.B for p in parts], dim=1)
        f = LoraFactors(A, B, 1.0)
        if f.rank > min(f.shape):
            f = best_rank(f, min(f.shape), 1.0)
        out[m] = f
    return out


EVAL_ADAPTER = "global"  # the server's evaluation adapter (unless "default" has its ranks)


def load_global(lm, model: GlobalModel) -> None:
    """Load the global model into the server's evaluation adapter, with each module's own rank and
    alpha (``alpha = scaling · rank``: FLoRA's and FlexLoRA's global ranks are ``min(Σ r_k, out, in)``
    per module, so modules of different shapes get different ranks) as peft's ``rank_pattern`` /
    ``alpha_pattern`` (:func:`fedpeft.models.lora_config`; ``alpha = scaling · √rank`` with rsLoRA): what ``save_adapter`` writes then reloads
    with ``PeftModel.from_pretrained``. One evaluation adapter is kept, re-created when ranks change."""
    # lazy: fedpeft.models imports transformers, which reads its environment when imported, and the
    # ServerApp imports this module before its main() sets it (fedpeft.serverapp)
    from fedpeft.models import active, lora_config, module_shapes, use_config, write_adapter

    if lm.lora is None:  # a method without LoRA factors (IA3, prompt tuning, ...): its tensors only
        write_adapter(lm, {}, model.head)
        return
    adapter = global_adapter(model)
    if not adapter:  # nothing aggregated yet (FLoRA, FlexLoRA): a zero update
        adapter = {m: LoraFactors(torch.zeros(1, i), torch.zeros(o, 1), 1.0) for m, (o, i) in module_shapes(lm).items()}
    ranks = {m: f.rank for m, f in adapter.items()}
    per_rank = (lambda r: r**0.5) if getattr(lm.lora, "use_rslora", False) else (lambda r: r)  # s = α/r, or α/√r (rsLoRA)
    alphas = {m: f.scaling * per_rank(f.rank) for m, f in adapter.items()}
    previous = active(lm)
    name = use_config(lm, EVAL_ADAPTER, lora_config(lm, ranks, alphas))
    if previous not in ("default", name):  # e.g. the r_max adapter the initial state was read from: keep one
        lm.model.delete_adapter(previous)
    write_adapter(lm, adapter, model.head)


def _ids(sent: dict[int, Message]) -> dict[str, int]:
    """Message id → destination node of the messages sent (the grid gave each its id when it sent it)."""
    return {m.metadata.message_id: node for node, m in sent.items() if m.metadata.message_id}


def _sender(reply: Message, ids: dict[str, int]) -> int:
    """The node a reply answers for: the destination of the message it replies to. A SuperLink
    answers for a node that went offline itself, from its own node id, with a node-unavailable
    error; the reply still belongs to that node."""
    return ids.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def _weighted_mean(rows: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    keys = {k for _, m in rows for k in m if k not in ("num-examples",)}
    total = sum(n for n, _ in rows)
    if not rows or total <= 0:
        return {}
    return {k: sum(n * m[k] for n, m in rows if k in m) / sum(n for n, m in rows if k in m) for k in sorted(keys)}


_TRANSPORT_ERRORS = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


_INJECTED = "injected failure in round"  # clients.app's fault profile: "client 3: injected failure in round 2 (profile.failure_rate=0.5)"
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf)(?![\w.])", re.I)


def cause(line: str) -> str:
    """What a failure line says with its numbers masked: ``client 3: training loss became nan`` and
    ``client 1: training loss became inf`` have one cause."""
    return _NUMBER.sub("#", line)


def _one_line(text: str) -> str:
    """The last line of an error text; for a ClientApp's exception as Flower's simulation engine
    reports it (``<class ...>:<'...Exception ClientAppException occurred. Message: ...'>``), the
    client's own message."""
    text = str(text)
    # Flower's ``<class ...>:<'...'>`` around any exception (the class may be Ray's ``RayTaskError(ClientAppException)``)
    flower = re.fullmatch(r"\s*<class '[^']*'>:<'(.*)'>\s*", text, re.S)
    if flower:
        text = flower.group(1)
    wrapped = re.search(r"ClientAppException occurred\. Message: (.*?)\s*$", text, re.S)
    if wrapped:
        text = wrapped.group(1)
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else "unknown error"

"""The Flower side of the server: one adapter turns any pure strategy into a Flower ``Strategy``.

``configure_train`` samples nodes and sends each its own message (the strategy's per-client
payload); ``aggregate_train`` decodes and checks the replies, counts failures, and hands the good
updates to the strategy's pure ``aggregate``. Communication is counted from the records sent.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedpeft import messages
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
    train_metrics: dict[str, float] = field(default_factory=dict)


class FlowerAdapter(FlowerStrategy):
    """Runs a pure :class:`strategies.base.Strategy` on Flower's Message API."""

    def __init__(
        self,
        strategy: Strategy,
        model: GlobalModel,
        *,
        settings: dict[str, Any],
        fraction: float,
        min_clients: int,
        client_spec: Callable[[int], ClientSpec],
        seed: int,
    ) -> None:
        self.strategy = strategy
        self.model = model
        self.settings_json = json.dumps(settings, sort_keys=True)
        self.fraction = fraction
        self.min_clients = min_clients
        self.client_spec = client_spec
        self.rng = random.Random(seed)
        self.sent: dict[int, tuple[ClientSpec, Any]] = {}  # node id → (spec, payload) this round
        self.stats: dict[int, RoundStats] = {}
        self._t0 = 0.0

    def summary(self) -> None:
        log.info("fedpeft strategy %s, fraction %s, min clients %s", self.strategy.name, self.fraction, self.min_clients)

    def arrays(self) -> ArrayRecord:
        return messages.encode(self.model.adapter, self.model.head, {})[messages.ARRAYS]

    def sample(self, grid: Grid) -> tuple[list[int], list[int]]:
        all_nodes = sorted(grid.get_node_ids())
        want = max(int(len(all_nodes) * self.fraction), self.min_clients, 1)
        want = min(want, len(all_nodes))
        return sorted(self.rng.sample(all_nodes, want)), all_nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._t0 = time.perf_counter()
        nodes, all_nodes = self.sample(grid)
        index = {n: i for i, n in enumerate(all_nodes)}
        stats = self.stats[server_round] = RoundStats(sampled=len(nodes))
        self.sent = {}
        out = []
        for node in nodes:
            spec = self.client_spec(index[node])
            payload = self.strategy.payload(self.model, spec)
            content = messages.encode(
                payload.adapter,
                payload.head,
                {**payload.instructions, "settings": self.settings_json, "server-round": server_round},
            )
            stats.bytes_down += messages.num_bytes(content)
            self.sent[node] = (spec, payload)
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats[server_round]
        updates: list[ClientUpdate] = []
        metric_rows: list[tuple[int, dict[str, float]]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                stats.failed += 1
                log.warning("round %d: client on node %d failed: %s", server_round, node, _one_line(msg.error.reason))
                continue
            spec, payload = self.sent[node]
            try:
                adapter, head, cfg = messages.decode(msg.content)
                messages.check_update(adapter, head, payload.adapter, payload.head)
                n = int(cfg["num-examples"])
                if n <= 0:
                    raise messages.UpdateError(f"num-examples is {n}")
            except (messages.UpdateError, KeyError, ValueError) as e:
                stats.rejected += 1
                log.warning("round %d: update from client %d (node %d) rejected: %s", server_round, spec.client_id, node, e)
                continue
            stats.bytes_up += messages.num_bytes(msg.content)
            updates.append(ClientUpdate(client_id=spec.client_id, adapter=adapter, head=head, num_examples=n))
            if messages.METRICS in msg.content.metric_records:
                metric_rows.append((n, dict(msg.content.metric_records[messages.METRICS])))
        stats.replied = len(updates)
        if updates:
            self.model = self.strategy.aggregate(self.model, updates)
        else:
            log.warning("round %d: no usable update; the global adapter is unchanged", server_round)
        stats.train_metrics = _weighted_mean(metric_rows)
        stats.seconds = time.perf_counter() - self._t0
        metrics = {
            **stats.train_metrics,
            "clients_sampled": stats.sampled,
            "clients_replied": stats.replied,
            "clients_failed": stats.failed,
            "clients_rejected": stats.rejected,
            "bytes_down": stats.bytes_down,
            "bytes_up": stats.bytes_up,
        }
        return self.arrays(), MetricRecord({k: float(v) for k, v in metrics.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the global adapter is evaluated on the server (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _weighted_mean(rows: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    keys = {k for _, m in rows for k in m if k not in ("num-examples",)}
    total = sum(n for n, _ in rows)
    if not rows or total <= 0:
        return {}
    return {k: sum(n * m[k] for n, m in rows if k in m) / sum(n for n, m in rows if k in m) for k in sorted(keys)}


def _one_line(text: str) -> str:
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else "unknown error"

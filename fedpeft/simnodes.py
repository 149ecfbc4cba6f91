"""Which partition each simulated node serves, as Flower's simulation engine registered them.

The engine registers its nodes in this process (``vce_api._register_nodes``: the i-th node it
creates serves partition i, under a random node id) and tells only the nodes. So the server had to
ask every node its ``partition-id`` with one query message each before the first round: about
140 s of silence for ``clients=5000``. While :func:`recording` is active (``fedpeft simulate``
wraps the engine in it), the map is kept in :data:`REGISTERED` as the engine makes it, and the
server takes a node's partition from there (``FlowerAdapter(known_partitions=...)``); nodes it does
not list (a deployment, ``flwr run``) are still asked.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

REGISTERED: dict[int, int] = {}  # node id -> partition id, of the simulation running in this process


def known() -> dict[int, int]:
    """The node id → partition id map of the simulation running in this process (empty: none)."""
    return dict(REGISTERED)


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Keep the map Flower's simulation engine makes while it registers its nodes."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api._register_nodes

    def register(num_nodes, state_factory):
        mapping = original(num_nodes, state_factory)
        REGISTERED.clear()
        REGISTERED.update({int(n): int(p) for n, p in mapping.items()})
        return mapping

    vce_api._register_nodes = register
    try:
        yield
    finally:
        vce_api._register_nodes = original
        REGISTERED.clear()

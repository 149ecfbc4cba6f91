"""The server's partition bookkeeping (issue 24, part 5): which node serves which partition of the
run, on ``fedpeft.server.FlowerAdapter`` over a ``FakeGrid``, without a model or a deployment.

- The server knows the run's partitions (``num_clients``): a node claiming one out of range leaves a
  partition without a node, and the run is refused before it starts, naming the partition and the
  node; a partition whose node goes away is shown every round (``clients_missing``), and fewer
  connected partitions than ``min_clients`` stop the run, naming them.
- The first node to claim a partition holds it for the run, resume included; a later claimant is
  left out with a warning naming both node ids.

Each test fails on the code before these changes (checked: no ``check_partitions``, no ``missing``
row; the lower random node id won a contested partition; the warning named the partition id where
it meant the holder's node id; a holder that went offline lost its partition to the next claimant).
"""

import logging

import pytest
import torch
from flwr.app import ConfigRecord

from fedpeft.lora import LoraFactors, scaling_for
from fedpeft.server import FederationFailed, FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from strategies.fedavg import FedAvg
from tests.harness import FakeGrid, random_B, reply_to

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"l0.q": (8, 12)}
RANK, ALPHA = 2, 4.0


def adapter(num_clients=3, min_clients=1, fraction=1.0) -> FlowerAdapter:
    g = torch.Generator().manual_seed(0)
    start = {m: LoraFactors(torch.randn(RANK, i, generator=g), torch.zeros(o, RANK), scaling_for(RANK, ALPHA)) for m, (o, i) in SHAPES.items()}
    return FlowerAdapter(FedAvg(), GlobalModel(start, {}), fraction=fraction, min_clients=min_clients,
                         client_spec=lambda i: ClientSpec(i, RANK, ALPHA), shapes=SHAPES, seed=0, num_clients=num_clients)


def train_round(fa: FlowerAdapter, r: int, grid: FakeGrid) -> dict:
    """One round on ``grid``: every sampled node replies with a trained update; the round's metrics."""
    from fedpeft import messages

    msgs = list(fa.configure_train(r, fa.arrays(), ConfigRecord(), grid))
    replies = []
    for m in msgs:
        dec = messages.decode(m.content)
        replies.append(reply_to(m, random_B(dec.adapter, seed=r), dec.head))
    _, metrics = fa.aggregate_train(r, replies)
    return {k: v for k, v in metrics.items()}


# ------------------------------------------------------------------ (a) the run's partitions


def test_out_of_range_partition_refuses_the_run_naming_partition_and_node():
    """A SuperNode configured with partition-id 99 of 3 replaces node 2: partition 2 has no node."""
    fa = adapter(num_clients=3, min_clients=2)
    grid = FakeGrid({101: 0, 102: 1, 103: 99})
    with pytest.raises(FederationFailed) as e:
        fa.check_partitions(grid)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("partition(s) 2 of 0..2 have no node"), msg
    assert "partition 2: no node claimed it" in msg and "node 103 left out: partition-id 99 is not one of 0..2" in msg, msg
    assert fa.missing(fa.identify(grid)) == {2: "no node claimed it"}


def test_every_partition_served_starts_and_missing_partitions_are_shown_each_round():
    fa = adapter(num_clients=3, min_clients=2)
    grid = FakeGrid({101: 0, 102: 1, 103: 2})
    fa.check_partitions(grid)  # all three: no error
    m1 = train_round(fa, 1, grid)
    assert (m1["clients_sampled"], m1["clients_replied"], m1["clients_missing"]) == (3, 3, 0)
    assert fa.stats[1].missing == ()

    del grid.nodes[102]  # node 102 (partition 1) disconnects
    m2 = train_round(fa, 2, grid)
    assert (m2["clients_sampled"], m2["clients_replied"], m2["clients_missing"], m2["round_applied"]) == (2, 2, 1, 1)
    assert fa.stats[2].missing == (1,)

    grid.nodes[102] = 1  # back: partition 1 is served again
    m3 = train_round(fa, 3, grid)
    assert (m3["clients_sampled"], m3["clients_missing"]) == (3, 0)


def test_fewer_connected_partitions_than_min_clients_stop_the_run_naming_them(caplog):
    fa = adapter(num_clients=3, min_clients=2)
    grid = FakeGrid({101: 0, 102: 1, 103: 2})
    train_round(fa, 1, grid)
    del grid.nodes[102], grid.nodes[103]
    grid.nodes[104] = 99  # and a misconfigured node joins
    with pytest.raises(FederationFailed) as e, caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        fa.configure_train(2, fa.arrays(), ConfigRecord(), grid)
    msg = str(e.value)
    assert msg.startswith("1 of 3 partitions have a connected node, fewer than min_clients=2"), msg
    assert "partition 1: its node 102 is not connected" in msg and "partition 2: its node 103 is not connected" in msg, msg
    assert "node 104 left out: partition-id 99 is not one of 0..2" in msg, msg


def test_progress_line_shows_the_missing_partitions():
    from fedpeft.tracking import progress_line

    line = progress_line(2, 3, {"clients_sampled": 2, "clients_replied": 2, "clients_missing": 1, "round_applied": 1}, 10.0)
    assert "clients 2/2 (1 partition(s) without a node)" in line, line


# ------------------------------------------------------------------ (b) the first claim holds


def test_first_claim_holds_against_a_lower_node_id_and_the_warning_names_both(caplog):
    """Node ids are random: an intruder with a lower id must not win a partition by its id. Both
    claim partition 1 in the same exchange; node 500's reply was made first."""
    fa = adapter(num_clients=2)
    grid = FakeGrid({500: 1, 20: 1, 30: 0}, created_at={500: 1.0, 20: 2.0, 30: 1.5})
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        assert fa.identify(grid) == {500: 1, 30: 0}
    assert "node 20 left out: it did not identify its partition (partition-id 1 is held by node 500, the first node to claim it)" in caplog.text


def test_holder_keeps_its_partition_while_offline_and_after_a_resume(caplog):
    fa = adapter(num_clients=2, min_clients=1)
    grid = FakeGrid({500: 1, 30: 0})
    train_round(fa, 1, grid)
    # the holder of partition 1 goes away; an intruder claims partition 1: refused, partition 1 missing
    del grid.nodes[500]
    grid.nodes[7] = 1
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        m2 = train_round(fa, 2, grid)
    assert "node 7 left out: it did not identify its partition (partition-id 1 is held by node 500, the first node to claim it)" in caplog.text
    assert (m2["clients_sampled"], m2["clients_missing"]) == (1, 1)
    assert fa.stats[2].missing == (1,)
    grid.nodes[500] = 1  # the holder is back: it serves partition 1 again, not the intruder
    train_round(fa, 3, grid)
    assert fa.identify(grid) == {30: 0, 500: 1}

    # resume: the claims are in the state; the intruder answers first, and still does not win
    state = fa.state_dict()
    again = adapter(num_clients=2, min_clients=1)
    again.load_state_dict(state)
    grid2 = FakeGrid({7: 1, 500: 1, 30: 0}, created_at={7: 0.0, 500: 5.0, 30: 5.0})
    again.check_partitions(grid2)
    assert again.identify(grid2) == {30: 0, 500: 1}
    assert again.partition_of == {30: 0, 500: 1}


def test_resume_under_a_new_superlink_claims_the_partitions_afresh():
    """``fedpeft deploy resume=…`` starts a new SuperLink, which gives every node a new id: none of
    the saved holders is connected, so the nodes claim the partitions again."""
    fa = adapter(num_clients=2)
    train_round(fa, 1, FakeGrid({500: 1, 30: 0}))
    again = adapter(num_clients=2)
    again.load_state_dict(fa.state_dict())
    assert again.identify(FakeGrid({})) == {}  # no node connected yet: nothing is decided
    grid = FakeGrid({61: 0, 62: 1})
    again.check_partitions(grid)
    assert again.identify(grid) == {61: 0, 62: 1}


# ------------------------------------------------------------------ the simulation engine's own map


def test_nodes_the_simulation_engine_registered_are_not_asked():
    """``clients=5000`` spent ~140 s asking every node its partition; the engine's map is in this
    process (fedpeft.simnodes), so the server asks only the nodes the map lacks."""
    nodes = {1000 + 7 * i: i for i in range(50)}
    fa = adapter(num_clients=51)
    fa.known_partitions = lambda: {n: p for n, p in nodes.items() if p < 49}  # partitions 0..48 known; 49 and 50 not
    grid = FakeGrid({**nodes, 9999: 50})
    assert fa.identify(grid) == {**nodes, 9999: 50}
    assert grid.queries == 2  # only the nodes of partitions 49 and 50
    asked_again = grid.queries
    fa.identify(grid)
    assert grid.queries == asked_again  # known now: never asked again


def test_the_engine_map_is_recorded_from_flowers_own_registration():
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from fedpeft import simnodes

    original = vce_api._register_nodes
    with simnodes.recording():  # the engine's own registration, as start_vce calls it
        mapping = vce_api._register_nodes(4, LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()))
        assert simnodes.known() == mapping and sorted(mapping.values()) == [0, 1, 2, 3]
    assert simnodes.known() == {} and vce_api._register_nodes is original

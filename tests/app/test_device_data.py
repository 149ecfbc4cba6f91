"""A device trains on its own local file (``node_config["data-path"]``) and says so when the server
asks who it is; the server then takes the example count it reports instead of requiring its
partition's size. In-process: the real ClientApp (``clients.app.app``) behind a grid that delivers
each message to it with the node's own Context (tests/harness.py's AppGrid)."""

import csv

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedpeft.composing import compose
from fedpeft.models import build, module_shapes, read_adapter, use_adapter
from fedpeft.runconfig import to_run_config
from fedpeft.server import FlowerAdapter
from strategies.base import ClientSpec
from strategies.fedavg import FedAvg
from tests.harness import AppGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def test_a_device_with_its_own_file_trains_on_it_and_its_example_count_is_accepted(tmp_path):
    rows = [("clinton wins the debate tonight", "HillaryClinton"), ("make america great again", "realDonaldTrump")] * 15
    path = tmp_path / "mine.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])  # the columns the run's data has
        w.writerows(rows)
    cfg = compose(["clients=2", "min_clients=2", "model.rank=4", "model.alpha=8", "model.max_length=16", "train.local_steps=1",
                   "train.batch_size=4", "data.eval_samples=16", "tracking.mode=disabled", "engine.num_cpus=1"])
    rc = to_run_config(cfg, tmp_path / "run")
    contexts = {
        21: Context(run_id=7, node_id=21, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=rc),
        22: Context(run_id=7, node_id=22, node_config={"partition-id": 1, "data-path": str(path)}, state=RecordDict(), run_config=rc),
    }
    from fedpeft.preflight import prepare_data

    _, partitioner, _, num_labels = prepare_data(cfg)
    lm = build(cfg.model, num_labels=num_labels, device="cpu", seed=0)
    use_adapter(lm, 4, 8.0)
    fa = FlowerAdapter(FedAvg(), read_adapter(lm), fraction=1.0, min_clients=2, client_spec=lambda i: ClientSpec(i, 4, 8.0),
                       shapes=module_shapes(lm), seed=0, num_clients=2, expected_examples=lambda i: partitioner.load_partition(i).num_rows)
    grid = AppGrid(contexts)
    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), grid))
    assert fa.local_data == {1} and fa.partition_of == {21: 0, 22: 1}
    replies = grid.send_and_receive(msgs)
    counts = {r.metadata.src_node_id: r.content.config_records["config"]["num-examples"] for r in replies}
    local_train = 24  # the file's 30 rows less the seeded stratified 20 % test split
    assert counts == {21: partitioner.load_partition(0).num_rows, 22: local_train}
    fa.aggregate_train(1, replies)
    assert (fa.stats[1].replied, fa.stats[1].rejected) == (2, 0)

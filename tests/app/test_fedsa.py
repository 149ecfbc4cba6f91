"""FedSA-LoRA's ClientApp in-process with MiniLM (no Ray): each client trains from its own B, kept on
disk by round, and a re-run round replies the same (the strategy and the server adapter:
tests/unit/test_fedsa.py; one real simulation: tests/e2e/test_fedsa.py)."""


import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedpeft import messages
from fedpeft.server import FlowerAdapter
from strategies.base import ClientSpec
from strategies.fedsa_lora import FedSALoRA
from tests.harness import FakeGrid

# ------------------------------------------------------------------ the ClientApp, in-process with MiniLM


@pytest.mark.usefixtures("task_identity")
def test_the_client_app_trains_from_its_own_B_and_a_rerun_round_gives_the_same(tmp_path):
    """Two clients through ``clients.app.app`` (the ClientApp, as Flower calls it) with a shared
    dir: round 2 starts from each client's own round-1 B (not zero, not the other's); re-running
    round 2 in a new process (a resumed run) reads the same B and replies bit for bit the same;
    evaluation sees the round's own B."""
    from clients import app as client_app
    from clients.train import TrainSettings, train
    from fedpeft import runconfig
    from fedpeft.composing import compose
    from fedpeft.models import module_shapes, read_adapter, use_adapter

    cfg = compose(["strategy=fedsa_lora", "engine.device=cpu", "engine.num_cpus=1", "model.rank=4", "model.alpha=8", "model.max_length=32",
                   "train.local_steps=2", "train.batch_size=8", "train.lr=3e-3", "clients=4"])
    shared = tmp_path / "state"
    rc = runconfig.to_run_config(cfg, tmp_path, shared_dir=str(shared))
    s = runconfig.settings(rc)
    nodes = {101: 0, 102: 1}
    ctx = lambda node: Context(run_id=7, node_id=node, node_config={"partition-id": nodes[node], "num-partitions": 4}, state=RecordDict(), run_config=rc)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from fedpeft import data as fdata

        lm = client_app.get_model(s, len(fdata.label_names(fdata.load(s.data.name, seed=0))), 7)
        use_adapter(lm, 4, 8.0)
        fa = FlowerAdapter(FedSALoRA(), read_adapter(lm), fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, 4, 8.0),
                           shapes=module_shapes(lm), seed=0, num_clients=4)
        grid = FakeGrid(nodes)

        def stored(pid, rnd):
            from safetensors.torch import load_file

            return load_file(str(shared / f"client_{pid}" / f"personal_B_{rnd:05d}.safetensors"))

        msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), grid))
        fa.aggregate_train(1, [client_app.app(m, ctx(m.metadata.dst_node_id)) for m in msgs])
        assert fa.stats[1].replied == 2 and fa.stats[1].rejected == 0
        B1 = {pid: stored(pid, 1) for pid in (0, 1)}
        assert all(float(B.abs().max()) > 0 for b in B1.values() for B in b.values())
        assert any(not torch.equal(B1[0][n], B1[1][n]) for n in B1[0])

        msgs = list(fa.configure_train(2, fa.arrays(), ConfigRecord(), grid))
        m0 = next(m for m in msgs if m.metadata.dst_node_id == 101)
        step = client_app.read_step(m0, ctx(101))
        start = client_app.payload_of(step, ctx(101))
        assert all(torch.equal(start.adapter[n].B, B1[0][n]) for n in B1[0])  # its own round-1 B
        reply = client_app.app(m0, ctx(101))
        B2 = stored(0, 2)
        # exactly what training from (global A, own round-1 B) gives
        want, _ = train(lm, start, client_app.local_data(s, ctx(101).node_config, step.plan), TrainSettings.of(s.train),
                        seed=step.seed(0), client_id=0)
        assert all(torch.equal(want.adapter[n].B, B2[n]) for n in B2)
        again = client_app.app(m0, ctx(101))  # round 2 re-run by a new process (resume): the same start, the same reply
        a, b = (r.content.array_records[messages.ARRAYS] for r in (reply, again))
        assert set(a) == set(b) and all(a[k].data == b[k].data for k in a) and not any(k.startswith("B/") for k in a)
        assert all(torch.equal(stored(0, 2)[n], B2[n]) for n in B2)

        evals = list(fa.configure_evaluate(2, fa.arrays(), ConfigRecord(), grid))
        fa.aggregate_evaluate(2, [client_app.app(m, ctx(m.metadata.dst_node_id)) for m in evals])
        metrics = fa.personal[2]
        held = len(fdata.held_out(client_app.node_data(s, ctx(101).node_config), 0)["test"])
        assert metrics["personal/clients"] == 2 and metrics["personal/failed"] == 0 and held > 0
        accs = [metrics[f"personal_accuracy/client_{p}"] for p in (0, 1)]
        assert metrics["personal/accuracy_mean"] == pytest.approx(sum(accs) / 2)
    finally:
        torch.set_num_threads(threads)

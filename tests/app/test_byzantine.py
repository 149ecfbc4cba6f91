"""Byzantine clients in the ClientApp (clients/app.py, the ``byzantine`` mod; ``profile.byzantine``):
an attacker trains honestly and replies the attack of its update relative to the global factors it
received. In-process with MiniLM: the server side is ``fedpeft.server.FlowerAdapter`` over a
``FakeGrid``, the client side is ``clients.app.app`` (``train_handler`` behind its mods, as Flower
calls it) with real Flower messages and a run config built the way a run builds it. The same message
to the same node with and without the profile: the honest reply and the attacker's."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.client.mod.utils import make_ffn

from clients import app as client_app
from fedpeft import attacks, messages, runconfig
from fedpeft import data as fdata
from fedpeft.models import module_shapes, read_adapter, use_adapter
from fedpeft.server import FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from strategies.fedavg import FedAvg
from strategies.ffa_lora import FFALoRA
from tests.harness import FakeGrid, random_B

pytestmark = pytest.mark.usefixtures("task_identity")

RANK, ALPHA, CLIENTS, RUN_ID = 4, 8.0, 10, 1
BASE = ["engine.device=cpu", "engine.num_cpus=1", "model.rank=4", "model.alpha=8", "model.max_length=32",
        "train.local_steps=2", "train.batch_size=8", f"clients={CLIENTS}"]
ATTACKERS = sorted(attacks.attackers(0, CLIENTS, 0.2))


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    from fedpeft.composing import compose

    run_dir = tmp_path_factory.mktemp("run")
    return lambda *overrides: runconfig.to_run_config(compose([*BASE, *overrides]), run_dir, shared_dir="")


@pytest.fixture(scope="module")
def lm(run_config):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = runconfig.settings(run_config())
    yield client_app.get_model(s, len(fdata.label_names(fdata.load(s.data.name, seed=s.seed))), RUN_ID)
    torch.set_num_threads(threads)


def node_context(pid: int, rc: dict) -> Context:
    return Context(run_id=RUN_ID, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": CLIENTS}, state=RecordDict(), run_config=rc)


def sent_tensors(reply, payload_adapter, send_A=True):
    dec = messages.decode(reply.content, kept=payload_adapter)
    return messages.tensors_of(dec.adapter, dec.head, send_A=send_A)


@pytest.mark.parametrize("strategy", [FedAvg(), FFALoRA(seed=0)], ids=["fedavg", "ffa_lora"])
def test_a_sign_flip_attacker_replies_twice_the_global_minus_its_honest_update(lm, run_config, strategy):
    use_adapter(lm, RANK, ALPHA)
    start = read_adapter(lm)
    start = GlobalModel(random_B(start.adapter, seed=5), start.head)  # a global B away from zero: 2·global − honest is not −honest
    fa = FlowerAdapter(strategy, start, fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, RANK, ALPHA),
                       shapes=module_shapes(lm), seed=0, num_clients=CLIENTS)
    bad, good = ATTACKERS[0], next(p for p in range(CLIENTS) if p not in ATTACKERS)
    grid = FakeGrid({100 + bad: bad, 100 + good: good})
    msgs = {grid.nodes[m.metadata.dst_node_id]: m for m in fa.configure_train(1, fa.arrays(), ConfigRecord(), grid)}
    attacked, honest_rc = run_config("profile.byzantine=0.2"), run_config()
    for pid in (bad, good):
        _, payload, _ = fa.sent[100 + pid]
        send_A = payload.plan.uplink[0]
        honest = sent_tensors(client_app.app(msgs[pid], node_context(pid, honest_rc)), payload.adapter, send_A)
        reply = client_app.app(msgs[pid], node_context(pid, attacked))
        got = sent_tensors(reply, payload.adapter, send_A)
        glob = messages.tensors_of(payload.adapter, payload.head, send_A=send_A)
        assert got.keys() == honest.keys() and (any(k.startswith("A/") for k in got) == send_A)
        for k, t in got.items():
            if pid == bad:
                torch.testing.assert_close(t, 2 * glob[k] - honest[k], rtol=0, atol=1e-6)
                assert not torch.allclose(t, honest[k])
            else:
                assert torch.equal(t, honest[k])  # an honest client's reply is untouched
        if not send_A:  # FFA-LoRA: the frozen A is not sent, so not attacked: the server still accepts the reply
            fa.check_reply(100 + pid, reply)


def test_a_scaling_attacker_as_the_cohort_engine_applies_the_mods(lm, run_config):
    """The cohort engine runs each member's plain reply through :data:`clients.app.MODS` with
    ``make_ffn`` (``cohort_handler``): the attack is among them, after local DP, before the codec."""
    mods = client_app.MODS
    assert mods.index(client_app.compress_update) < mods.index(client_app.byzantine) < mods.index(client_app.local_dp)
    use_adapter(lm, RANK, ALPHA)
    start = read_adapter(lm)
    fa = FlowerAdapter(FedAvg(), GlobalModel(random_B(start.adapter, seed=6), start.head), fraction=1.0, min_clients=1,
                       client_spec=lambda i: ClientSpec(i, RANK, ALPHA), shapes=module_shapes(lm), seed=0, num_clients=CLIENTS)
    bad = ATTACKERS[1]
    (msg,) = fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid({100 + bad: bad}))
    _, payload, _ = fa.sent[100 + bad]
    plain = client_app.app(msg, node_context(bad, run_config()))  # the honest reply (no mod changes it)
    ctx = node_context(bad, run_config("profile.byzantine=0.2", "profile.attack=scale", "profile.attack_scale=-4"))
    reply = make_ffn(lambda m, c: plain, mods)(msg, ctx)
    honest, got = sent_tensors(plain, payload.adapter), sent_tensors(reply, payload.adapter)
    glob = messages.tensors_of(payload.adapter, payload.head)
    for k, t in got.items():
        torch.testing.assert_close(t, glob[k] - 4 * (honest[k] - glob[k]), rtol=1e-5, atol=1e-6)
    fa.aggregate_train(1, [reply])
    assert fa.stats[1].applied and fa.stats[1].rejected == 0

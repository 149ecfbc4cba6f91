"""Regression tests for behaviours that nothing else would notice if they went missing (issue 8,
part 5). Each test fails when its behaviour is removed; how that was checked is noted in each.

In-process only (no Ray): the server side is ``fedpeft.server.FlowerAdapter`` over a ``FakeGrid``,
the client side is ``clients.app.app`` (the ClientApp: ``train_handler`` behind its mods, as Flower
calls it) with real Flower ``Message`` s and a real ``flwr.app.Context`` whose run config is built
the way a run builds it. One MiniLM per module (the client app's own cached model). (Those on the
server side alone: tests/unit/test_regressions.py.)
"""

import copy
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients import app as client_app
from clients.train import DPSettings, TrainSettings, train
from fedpeft import compression, messages, runconfig
from fedpeft import data as fdata
from fedpeft import merges as merge_forms
from fedpeft.lora import fresh_adapter, scaling_for
from fedpeft.models import apply_merge, layer, module_shapes, read_adapter, use_adapter
from fedpeft.privacy import update_norm
from fedpeft.server import Codecs, FlowerAdapter
from strategies.base import ClientSpec, Payload
from strategies.fedavg import FedAvg
from strategies.flora import FLoRA, merged_delta
from tests.harness import FakeGrid, random_B, reply_to

pytestmark = pytest.mark.usefixtures("task_identity")

ALPHA = 8.0
RANK = 4  # the client rank of the MiniLM tests (model.rank=4, model.alpha=8)
NUM_PARTITIONS = 10
RUN_ID = 1  # the run id of every node context here (the client app's model cache is keyed by it)
NO_CODECS = Codecs()  # no compression either way (frozen: safe to share as a default)
BASE = [
    "engine.device=cpu", "engine.num_cpus=1", "model.rank=4", "model.alpha=8", "model.max_length=32",
    "train.local_steps=2", "train.batch_size=8", "train.lr=3e-3", f"clients={NUM_PARTITIONS}",
]


def within(ratio: float, n: int) -> bool:
    """A sample std over ``n`` Gaussian entries is within 4 standard errors (``1/sqrt(2n)``) of the
    true one; the tests use enough entries that this is tighter than ±10 %."""
    tol = 4 / math.sqrt(2 * n)
    assert tol < 0.1, tol
    return abs(ratio - 1) < tol


# ------------------------------------------------------------------ fixtures


def _compose(*overrides):
    from fedpeft.composing import compose

    return compose([*BASE, *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def settings(run_dir):
    """The typed config every ClientApp reads from its run config, built the way a run builds it
    (compose → ``to_run_config`` → ``runconfig.settings``)."""
    return runconfig.settings(runconfig.to_run_config(_compose(), run_dir, shared_dir=""))


@pytest.fixture(scope="module")
def run_config(run_dir):
    """``run_config(*overrides)``: the run config a run with ``BASE`` plus ``overrides`` gives its
    apps (no shared dir: a node keeps its state in Flower's node state only)."""
    return lambda *overrides: runconfig.to_run_config(_compose(*overrides), run_dir, shared_dir="")


@pytest.fixture(scope="module")
def lm(settings):
    """The client app's cached model (``train_handler`` finds this same object). One thread, as
    ``engine.num_cpus=1`` makes ``train_handler`` set: on a shared 2-core machine two threads are
    several times slower. The thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = fdata.load(settings.data.name, seed=settings.seed)
    yield client_app.get_model(settings, len(fdata.label_names(ds)), RUN_ID)
    torch.set_num_threads(threads)


def node_context(node: int, pid: int, run_config: dict) -> Context:
    return Context(run_id=RUN_ID, node_id=node, node_config={"partition-id": pid, "num-partitions": NUM_PARTITIONS}, state=RecordDict(), run_config=run_config)


def minilm_adapter(lm, strategy=None, codecs=NO_CODECS, privacy=None):
    use_adapter(lm, RANK, ALPHA)
    return FlowerAdapter(
        strategy or FedAvg(), read_adapter(lm), fraction=1.0, min_clients=1,
        client_spec=lambda i: ClientSpec(i, RANK, ALPHA), shapes=module_shapes(lm), seed=0, codecs=codecs,
        num_clients=NUM_PARTITIONS, privacy=privacy,
    )


# ------------------------------------------------------------------ 2. FLoRA: merges travel in the messages


def _without_merges(content: RecordDict) -> RecordDict:
    arrays = {k: v for k, v in content.array_records[messages.ARRAYS].items() if not k.startswith("merge")}
    return RecordDict({messages.ARRAYS: ArrayRecord(arrays), messages.CONFIG: content.config_records[messages.CONFIG]})


def _merge_data_bytes(merge) -> int:
    return sum(merge_forms.numel(f) * 4 for f in merge.values())  # float32, in the form it travels


def test_flora_merges_travel_in_the_messages_are_counted_and_rebuild_the_servers_base(settings, lm):
    """Mutation checks (fedpeft/server.py configure_train): ``merges={}`` instead of the merges the
    node lacks → ``sync_base`` raises; ``bytes_down`` counted on the message without
    its merge arrays → the byte assertion fails; a merge sent twice or skipped → the per-round key
    sets differ."""
    ranks = {0: 4, 1: 2, 2: 3}
    fa = FlowerAdapter(FLoRA(seed=0), read_adapter(lm), fraction=1.0, min_clients=1,
                       client_spec=lambda i: ClientSpec(i, ranks[i], ALPHA), shapes=module_shapes(lm), seed=0)
    grid = FakeGrid({201: 0, 202: 1})
    worker = copy.deepcopy(lm)  # a worker whose node is 201, at base version 0
    assert worker.base_version == 0
    w0 = {m: layer(lm, m).base_layer.weight.detach().clone() for m in lm.modules}

    def train_round(rnd):
        msgs = list(fa.configure_train(rnd, fa.arrays(), ConfigRecord(), grid))
        assert fa.stats[rnd].bytes_down == sum(messages.num_bytes(m.content) for m in msgs)
        out = []
        for m in msgs:
            dec = messages.decode(m.content)
            r = ranks[grid.nodes[m.metadata.dst_node_id]]
            fresh = fresh_adapter(fa.shapes, r, scaling_for(r, ALPHA), int(dec.config["init_seed"]))
            out.append(reply_to(m, random_B(fresh, seed=rnd * 100 + r, scale=0.02), dec.head))
        fa.aggregate_train(rnd, out)
        assert fa.stats[rnd].replied == len(msgs)
        return msgs

    def merge_versions(msg):
        return {int(k.split("/")[0][5:]) for k in msg.content.array_records[messages.ARRAYS] if k.startswith("merge")}

    msgs1 = train_round(1)
    assert all(merge_versions(m) == set() for m in msgs1) and fa.model.version == 1
    msgs2 = train_round(2)
    assert all(merge_versions(m) == {1} for m in msgs2) and fa.model.version == 2
    for m in msgs2:  # the merge's arrays are in the bytes counted down
        assert messages.num_bytes(m.content) - messages.num_bytes(_without_merges(m.content)) >= _merge_data_bytes(fa.merge_form(1))
    grid.nodes[203] = 2  # a node that joins now lacks both merges
    msgs3 = list(fa.configure_train(3, fa.arrays(), ConfigRecord(), grid))
    by_node = {m.metadata.dst_node_id: m for m in msgs3}
    assert merge_versions(by_node[201]) == merge_versions(by_node[202]) == {2} and merge_versions(by_node[203]) == {1, 2}
    assert fa.stats[3].bytes_down == sum(messages.num_bytes(m.content) for m in msgs3)
    need = _merge_data_bytes(fa.merge_form(1)) + _merge_data_bytes(fa.merge_form(2))
    assert messages.num_bytes(by_node[203].content) - messages.num_bytes(_without_merges(by_node[203].content)) >= need

    # The clients apply the merges from the messages alone (no merge store) ...
    m2 = next(m for m in msgs2 if m.metadata.dst_node_id == 201)
    for msg in (m2, by_node[201]):
        dec = messages.decode(msg.content)
        client_app.sync_base(worker, int(dec.config["base-version"]), dec.merges)
    late = copy.deepcopy(lm)
    dec = messages.decode(by_node[203].content)
    client_app.sync_base(late, int(dec.config["base-version"]), dec.merges)
    assert worker.base_version == late.base_version == 2
    # ... and reach the base the server's merges define: bit for bit what applying them in the form
    # the server chose gives (here, stacks of rank 6 on 384 × 384 modules: the stacks), and W0 + Σ B_i A_i.
    reference = copy.deepcopy(lm)
    for v in range(1, fa.model.version + 1):
        assert all(f is fa.model.merges[v - 1][m] for m, f in fa.merge_form(v).items())
        apply_merge(reference, fa.merge_form(v))
    dense = merged_delta(fa.model)
    for m in lm.modules:
        w = layer(worker, m).base_layer.weight
        assert torch.equal(w, layer(reference, m).base_layer.weight)
        assert torch.equal(layer(late, m).base_layer.weight, w)
        torch.testing.assert_close(w, w0[m] + dense[m], rtol=0, atol=1e-6)
        assert (w - w0[m]).abs().max() > 1e-4  # the merges really moved the base
    del worker, late, reference


# ------------------------------------------------------------------ 3. top-k error feedback in the node's state


def _sent_delta(reply: Message) -> dict[str, torch.Tensor]:
    """What a top-k reply carries: its delta from the start, decoded exactly (no reference added)."""
    cfg = dict(reply.content.config_records[messages.CONFIG])
    assert cfg["codec"] == "topk" and cfg["delta"]
    arrays = reply.content.array_records[messages.ARRAYS].to_torch_state_dict()
    return compression.decode(arrays, cfg)


def test_topk_residual_is_kept_in_the_node_state_and_feeds_the_next_update(run_config, lm):
    """Mutation checks (clients/app.py, the ``compress_update`` mod): without
    ``context.state[RESIDUAL] = ...`` (``save_residual``) the residual is missing after call 1;
    reading the state (``load_residual``) but passing ``residual=None`` (or ``{}``) to
    ``messages.encode`` leaves call 2 equal to an empty-residual call; both fail."""
    frac = 0.1
    rc = run_config("compression=topk", f"compression.topk_fraction={frac}", "compression.error_feedback=true", "compression.downlink=none")
    s = runconfig.settings(rc)
    assert (s.compression.uplink, s.compression.downlink, s.compression.topk_fraction, s.compression.error_feedback) == ("topk", "none", frac, True)
    fa = minilm_adapter(lm, codecs=Codecs(uplink="topk", topk_fraction=frac))
    grid = FakeGrid({301: 0})
    ctx = node_context(301, 0, rc)

    (msg1,) = fa.configure_train(1, fa.arrays(), ConfigRecord(), grid)
    reply1 = client_app.app(msg1, ctx)
    assert client_app.RESIDUAL in ctx.state.array_records  # written back to the node's state
    r1 = ctx.state[client_app.RESIDUAL].to_torch_state_dict()
    s1 = _sent_delta(reply1)
    assert set(r1) == set(s1)
    for k, sent in s1.items():
        assert torch.count_nonzero(sent) <= max(1, math.ceil(frac * sent.numel()))
        assert not (r1[k][sent != 0]).any()  # the residual is the dropped part: zero where sent
    assert sum(int(torch.count_nonzero(r)) for r in r1.values()) > 0.5 * sum(r.numel() for r in r1.values())
    fa.aggregate_train(1, [reply1])
    assert fa.stats[1].replied == 1

    (msg2,) = fa.configure_train(2, fa.arrays(), ConfigRecord(), grid)
    reply2 = client_app.app(msg2, ctx)
    r2 = ctx.state[client_app.RESIDUAL].to_torch_state_dict()
    s2 = _sent_delta(reply2)
    # the same message to a node with an empty state: the update Δ₂ alone
    fresh = node_context(301, 0, rc)
    s2e = _sent_delta(client_app.app(msg2, fresh))
    r2e = fresh.state[client_app.RESIDUAL].to_torch_state_dict()
    assert any(not torch.equal(s2[k], s2e[k]) for k in s2)  # the residual changed what was sent
    for k in s2:  # lossless: sent₂ + residual₂ = Δ₂ + residual₁, and Δ₂ = sent₂(empty) + residual₂(empty)
        torch.testing.assert_close(s2[k] + r2[k], s2e[k] + r2e[k] + r1[k], rtol=0, atol=1e-6)
    fa.aggregate_train(2, [reply2])
    assert fa.stats[2].replied == 1


# ------------------------------------------------------------------ 5. DP-SGD: clipped per example, noise σ·C / E


class _FirstStepGrads(torch.optim.AdamW):
    """AdamW that records the gradients its first ``step`` receives: under Opacus, what
    ``DPOptimizer.pre_step`` left in ``p.grad`` (clipped per example, summed, noised, averaged)."""

    seen: list = []

    def step(self, closure=None):
        if not _FirstStepGrads.seen:
            params = [p for g in self.param_groups for p in g["params"]]
            batch = next(int(p.grad_sample.shape[0]) for p in params if isinstance(getattr(p, "grad_sample", None), torch.Tensor))
            _FirstStepGrads.seen.append((torch.cat([p.grad.detach().flatten().clone() for p in params]), batch))
        return super().step(closure)


def test_dp_sgd_clips_each_example_and_adds_noise_of_std_sigma_C_over_the_expected_batch(lm, monkeypatch):
    """``clients.train.train`` with DP, one step, gradients recorded as the optimizer receives them.
    The same seed gives the same Poisson batch with and without noise, so their difference is the
    noise alone; Opacus (``DPOptimizer.add_noise`` / ``scale_grad``, loss_reduction="mean") adds
    ``N(0, (σ·C)²)`` to the sum of clipped per-example gradients and divides by the expected batch
    size ``E = n · q``, ``q = 1/ceil(n/batch)``.

    Mutation checks (clients/train.py ``_dp_steps``' ``make_private``): ``noise_multiplier=0`` →
    the noise std is 0; ``loss_reduction="sum"`` (no division by E) → std σ·C, 8x too large;
    ``max_grad_norm`` huge (no clipping) → the σ=0 gradient norm exceeds |B|·C/E. All fail."""
    monkeypatch.setattr(torch.optim, "AdamW", _FirstStepGrads)
    ds = fdata.load("election_tweets", seed=0)["train"].shuffle(seed=5).select(range(64))
    n, batch = len(ds), 8
    E = n * (1.0 / math.ceil(n / batch))
    use_adapter(lm, RANK, ALPHA)
    g = read_adapter(lm)
    start = random_B(g.adapter, seed=3, scale=0.02)  # B ≠ 0: A gets data gradients too

    def first_grad(sigma, C):
        _FirstStepGrads.seen = []
        train(lm, Payload(start, g.head), ds, TrainSettings(1, batch, 1e-3), seed=11, client_id=0, dp=DPSettings(sigma, C))
        (grad, b), = _FirstStepGrads.seen
        return grad, b

    C, sigma = 1e-3, 2.0
    clean, b = first_grad(0.0, C)
    noisy, b2 = first_grad(sigma, C)
    assert b == b2 and b > 0  # the same Poisson batch
    noise = noisy - clean
    assert within(float(noise.std()) / (sigma * C / E), noise.numel()), float(noise.std()) / (sigma * C / E)
    assert abs(float(noise.mean())) < 4 * sigma * C / E / math.sqrt(noise.numel())
    # clipping: each example's gradient has norm ≤ C, so ‖Σ‖/E ≤ |B|·C/E; unclipped ones are far larger
    assert float(clean.norm()) <= b * C / E * (1 + 1e-4)
    loose, _ = first_grad(0.0, 1e6)
    assert float(loose.norm()) > 10 * b * C / E


# ------------------------------------------------------------------ 6. local DP in the client app


def test_local_dp_in_the_client_app_clips_to_C_and_adds_noise_sigma_C(run_config, lm):
    """The ClientApp with ``privacy.mode=local`` (σ from the server's privacy plan, in the train
    message): the reply minus the start it trained from is clipped to ‖Δ‖ ≤ C (σ = 0) and carries
    N(0, (σC)²) per entry (σ large).

    Mutation checks (clients/app.py): the ``local_dp`` mod skipped (left out of
    ``@app.train(mods=...)``, or returning the plain reply) → the σ=0 update's norm is the raw one
    (> C) and the σ>0 deviation has std ≪ σC; noise ``σ`` instead of ``σ·C`` in ``noised_update``
    → std 1/C = 10x too large. Both fail."""
    from fedpeft.preflight import privacy_plan

    C = 0.1
    grid = FakeGrid({501: 0})
    for sigma in (0.0, 30.0):
        overrides = ("privacy=local", f"privacy.clip={C}", f"privacy.noise_multiplier={sigma}")
        rc = run_config(*overrides)
        s = runconfig.settings(rc)
        assert (s.privacy.mode, s.privacy.clip, s.privacy.noise_multiplier) == ("local", C, sigma)
        fa = minilm_adapter(lm, privacy=privacy_plan(_compose(*overrides), None, personalized=False))  # local DP: no partitioner needed
        (msg,) = fa.configure_train(1, fa.arrays(), ConfigRecord(), grid)
        assert float(messages.decode(msg.content).config["noise-multiplier"]) == sigma  # σ reaches the client in the message
        reply = client_app.app(msg, node_context(501, 0, rc))
        start = messages.start_tensors(messages.decode(msg.content), fa.shapes, RANK, ALPHA)
        dec = messages.decode(reply.content)
        sent = messages.tensors_of(dec.adapter, dec.head)
        assert set(sent) == set(start)
        dev = {k: sent[k] - start[k] for k in sent}
        if sigma == 0:
            assert update_norm(dev) == pytest.approx(C, rel=1e-4)  # clipped to C ...
            assert float(reply.content.metric_records[messages.METRICS]["update_norm"]) > 2 * C  # ... from a larger update
        else:
            flat = torch.cat([d.flatten() for d in dev.values()])
            assert within(float(flat.std()) / (sigma * C), flat.numel()), float(flat.std()) / (sigma * C)
        fa.aggregate_train(1, [reply])
        assert fa.stats[1].replied == 1

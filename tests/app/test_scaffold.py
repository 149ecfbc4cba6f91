"""SCAFFOLD (``strategy.scaffold``) on MiniLM in-process: the client's corrected SGD step is the plain
one minus ``η (c − c_i)`` per step; round 1 (``c = c_i = 0``) is plain FedAvg bit for bit, with ``c``
and ``Δc_i`` counted in the bytes; the clients' ``c_i`` persist across rounds (the server's ``c`` stays
the mean of every client's ``c_i``, which a client that lost its state would break), across machines
that share no disk (node state), and across a resume, which continues bit for bit; Δc_i passes the
uplink codec; each strategy keeps variates of exactly the tensors its clients train."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from clients.train import DPSettings, TrainSettings, train
from fedpeft import messages
from fedpeft.plan import ClientPlan
from strategies.base import Payload
from tests.app.test_multinode import _tensors, assert_same_run, federate, rows
from tests.harness import rotten_minilm


@pytest.fixture(scope="module")
def setup():
    return rotten_minilm(8)


def run(lm, adapter, head, part, settings, correction=None, dp=None):
    u, _ = train(lm, Payload(adapter=adapter, head=head, plan=ClientPlan(scaffold=correction is not None)), part, settings, seed=1,
                 client_id=0, correction=correction, dp=dp)
    return u


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, max_grad_norm=0.5)], ids=["plain", "dp_sgd"])
def test_a_corrected_sgd_step_is_the_plain_step_minus_lr_times_c_minus_c_i(setup, dp):
    """SGD at rate η: one corrected step is the plain step minus η·d (d = c − c_i), on every tensor
    the client trains (A, B, head); the data gradient is the same (same batch, same dropout). Under
    DP-SGD the same, with the data gradient Opacus's clipped, noised mean: d is added after it."""
    lm, part, start = setup
    lr = 0.2
    one = TrainSettings(local_steps=1, batch_size=8, lr=lr, optimizer="sgd")
    x = messages.tensors_of(start.adapter, start.head)
    g = torch.Generator().manual_seed(0)
    d = {k: 0.05 * torch.randn(t.shape, generator=g) for k, t in x.items()}
    u = run(lm, start.adapter, start.head, part, one, dp=dp)
    plain = messages.tensors_of(u.adapter, u.head)
    u = run(lm, start.adapter, start.head, part, one, d, dp=dp)
    corrected = messages.tensors_of(u.adapter, u.head)
    for k in x:
        assert float((corrected[k] - plain[k]).abs().max()) > 1e-3, k  # the correction moved every tensor
        torch.testing.assert_close(corrected[k], plain[k] - lr * d[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_step_adds_c_minus_c_i_to_the_gradient_the_optimizer_steps_with(setup, monkeypatch, optimizer):
    """K = 3 steps: at each one the gradient the optimizer reads is the (clipped) data gradient plus
    d = c − c_i, exactly, on every trained tensor: SGD follows g − c_i + c; AdamW normalises it."""
    import clients.train as ct

    lm, part, start = setup
    x = messages.tensors_of(start.adapter, start.head)
    d = {k: torch.full(t.shape, 0.01 * (i + 1)) for i, (k, t) in enumerate(x.items())}
    data_grads, step_grads, which = [], [], {}
    real_clip, real_make, real_corrected = ct.clip_norm, ct.make_optimizer, ct.corrected

    def clip(params, max_norm):
        real_clip(params, max_norm)
        data_grads.append({id(p): p.grad.clone() for p in params})

    def make(params, settings):
        opt = real_make(params, settings)
        step = opt.step

        def spied(*a, **k):
            step_grads.append({id(p): p.grad.clone() for p in params})
            return step(*a, **k)

        opt.step = spied
        return opt

    def corrected(lm, params, correction):
        out = real_corrected(lm, params, correction)
        which.update({id(p): k for (p, _), k in zip(out, correction)})
        return out

    monkeypatch.setattr(ct, "clip_norm", clip)
    monkeypatch.setattr(ct, "make_optimizer", make)
    monkeypatch.setattr(ct, "corrected", corrected)
    run(lm, start.adapter, start.head, part, TrainSettings(local_steps=3, batch_size=4, lr=1e-3, optimizer=optimizer, max_grad_norm=1.0), d)
    assert len(data_grads) == len(step_grads) == 3 and sorted(which.values()) == sorted(d)
    for before, at in zip(data_grads, step_grads):
        for pid, key in which.items():
            torch.testing.assert_close(at[pid] - before[pid], d[key], rtol=0, atol=1e-7, msg=key)


SCAFFOLD = ["strategy.scaffold=true", "fraction=0.5", "min_clients=1"]


def c_i_files(run_dir, clients: int) -> dict[int, dict[str, torch.Tensor]]:
    """Each client's latest c_i from its state dir (the clients never sampled have none: 0)."""
    out = {}
    for i in range(clients):
        files = sorted((run_dir / "state" / f"client_{i}").glob("scaffold_c_*.safetensors"))
        if files:
            out[i] = load_file(str(files[-1]))
    return out


@pytest.mark.usefixtures("task_identity", "one_torch_thread")
def test_round_one_is_fedavg_c_is_the_mean_of_every_c_i_and_a_resume_continues_bit_for_bit(tmp_path):
    plain, _ = federate(tmp_path / "plain", ["fraction=0.5", "min_clients=1", "rounds=1"], run_id=60)
    first, _ = federate(tmp_path / "resumed", [*SCAFFOLD, "rounds=1"], run_id=61)
    # round 1: c = c_i = 0, so the correction is 0 and the global model is FedAvg's, bit for bit
    a, b = plain.adapter.state_dict()["model"], first.adapter.state_dict()["model"]
    for (ka, ta), (kb, tb) in zip(sorted(_tensors(a)), sorted(_tensors(b))):
        assert ka == kb and torch.equal(ta, tb), ka
    from flwr.app import ConfigRecord

    # c travels down and Δc_i up, counted: one float32 record per client of the tensors it trains
    shapes = messages.tensors_of(plain.adapter.model.adapter, plain.adapter.model.head)
    record = messages.encode_control({k: torch.zeros(t.shape) for k, t in shapes.items()}).count_bytes()
    p, s = rows(plain)[-1], rows(first)[-1]
    flag = ConfigRecord({"scaffold": True}).count_bytes()  # the plan's wire key
    assert (s["bytes_down"] - p["bytes_down"], s["bytes_up"] - p["bytes_up"]) == (2 * (record + flag), 2 * record)
    assert {**s, "bytes_down": 0, "bytes_up": 0} == {**p, "bytes_down": 0, "bytes_up": 0}

    one, _ = federate(tmp_path / "one", [*SCAFFOLD, "rounds=3"], run_id=62)
    resumed, _ = federate(tmp_path / "resumed", [*SCAFFOLD, "rounds=3"], run_id=63, resume=True)
    assert rows(resumed)[-2:] == rows(one)[-2:], (rows(resumed), rows(one))
    a, b = one.adapter.state_dict(), resumed.adapter.state_dict()
    for (ka, ta), (kb, tb) in zip(sorted(_tensors({"model": a["model"], "scaffold": a["scaffold"]})),
                                  sorted(_tensors({"model": b["model"], "scaffold": b["scaffold"]}))):
        assert ka == kb and torch.equal(ta, tb), ka
    # c_i persists: c = c_0 + (1/N) Σ_i Δc_i, so with c_0 = c_i = 0 the server's c is the mean of
    # every client's latest c_i (0 for a client never sampled); a client that restarted from c_i = 0
    # would break it
    c, n = a["scaffold"]["c"], 4
    assert a["scaffold"]["num_clients"] == n and set(c) == set(shapes)
    kept = c_i_files(tmp_path / "one", n)
    assert 2 <= len(kept) <= n and all(set(t) == set(c) for t in kept.values())
    assert any(len(list((tmp_path / "one" / "state" / f"client_{i}").glob("scaffold_c_*"))) == 2 for i in kept)  # sampled twice
    for k in c:
        assert float(c[k].abs().max()) > 0, k
        torch.testing.assert_close(c[k], sum(t[k] for t in kept.values()) / n, rtol=0, atol=1e-6, msg=k)


@pytest.mark.usefixtures("task_identity", "one_torch_thread")
def test_c_i_travels_with_the_node_state_on_machines_that_share_no_disk(tmp_path):
    one, _ = federate(tmp_path / "one", SCAFFOLD, run_id=64)
    many, grid = federate(tmp_path / "many", SCAFFOLD, run_id=65, machines=2)
    assert_same_run(one, many, grid)
    a, b = one.adapter.state_dict()["scaffold"]["c"], many.adapter.state_dict()["scaffold"]["c"]
    assert a and sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("task_identity", "one_torch_thread")
def test_delta_c_i_passes_the_uplink_codec_at_full_precision(tmp_path):
    """The top-k uplink codec re-encodes the reply: Δc_i must come through it, or the server rejects
    every reply (its record missing)."""
    fed, _ = federate(tmp_path / "topk", [*SCAFFOLD, "rounds=2", "compression=topk", "compression.topk_fraction=0.2"], run_id=66)
    assert [(r["clients_replied"], r["clients_rejected"], r["round_applied"]) for r in rows(fed)[-2:]] == [(2, 0, 1), (2, 0, 1)]
    assert all(float(t.abs().max()) > 0 for t in fed.adapter.state_dict()["scaffold"]["c"].values())


@pytest.mark.usefixtures("task_identity", "one_torch_thread")
@pytest.mark.parametrize("overrides, trained, run_id", [
    (["strategy=ffa_lora"], {"B", "head"}, 70),  # A frozen: no variate
    (["strategy=fedsa_lora"], {"A", "head"}, 71),  # B is each client's own: no variate
    (["strategy=rolora"], {"A", "B", "head"}, 72),  # B in round 1, A in round 2: each keeps its own
    (["peft=ia3"], {"head"}, 73),  # a method without LoRA factors: its tensors travel as head/<name>
], ids=["ffa_lora", "fedsa_lora", "rolora", "fedavg_ia3"])
def test_each_strategy_keeps_variates_of_exactly_the_tensors_its_clients_train(tmp_path, overrides, trained, run_id):
    fed, _ = federate(tmp_path / "run", [*SCAFFOLD, "fraction=1", "rounds=2", *overrides], run_id=run_id)
    assert [(r["clients_replied"], r["clients_rejected"]) for r in rows(fed)[-2:]] == [(4, 0), (4, 0)]
    c = fed.adapter.state_dict()["scaffold"]["c"]
    assert {k.split("/")[0] for k in c} == trained and all(float(t.abs().max()) > 0 for t in c.values())
    kept = c_i_files(tmp_path / "run", 4)
    for k in c:  # every client trained both rounds: c is the mean of the four c_i
        torch.testing.assert_close(c[k], sum(t[k] for t in kept.values()) / 4, rtol=0, atol=1e-6, msg=k)

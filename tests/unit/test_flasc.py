"""FLASC (``strategy=flasc``, Kuo, Raje, Rajesh & Smith 2024): the joint top-k, the sparse download
and upload on the wire (bytes: 8 per entry sent, int32 index + float32 value), the aggregate
against a hand computation, the plan's ``upload_density``, and the one-line refusals."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

import strategies
from fedpeft import compression, messages
from fedpeft.lora import LoraFactors
from fedpeft.plan import KEYS, ClientPlan
from fedpeft.server import Codecs, FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from tests.harness import FakeGrid, config_error

T = torch.tensor
# The global model: one module at rank 2 (A [2 × 3], B [2 × 2], scaling 2 = alpha 4 / r 2) and a
# head; N = 12 entries, so density 1/4 keeps k = 3 of them.
P = GlobalModel(
    adapter={"m": LoraFactors(T([[1.0, -7.0, 2.0], [0.5, 3.0, -4.0]]), T([[6.0, 0.0], [-0.1, 0.2]]), 2.0)},
    head={"h": T([5.0, -0.3])},
)
# By hand: the 3 largest |entries| of all 12 together are -7 (A), 6 (B) and 5 (head).
P_SENT = {"A/m": T([[0.0, -7.0, 0.0], [0.0, 0.0, 0.0]]), "B/m": T([[6.0, 0.0], [0.0, 0.0]]), "head/h": T([5.0, 0.0])}
# What two clients trained, as their change from P_SENT, and by hand the top 3 of each change:
D1 = {"A/m": T([[0.1, 0.0, -0.9], [0.0, 0.0, 0.0]]), "B/m": T([[0.0, 0.3], [0.0, 0.0]]), "head/h": T([0.0, -0.05])}
D2 = {"A/m": T([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0]]), "B/m": T([[0.0, 0.0], [-0.6, 0.02]]), "head/h": T([0.4, 0.01])}
UP1 = {"A/m": T([[0.1, 0.0, -0.9], [0.0, 0.0, 0.0]]), "B/m": T([[0.0, 0.3], [0.0, 0.0]]), "head/h": T([0.0, 0.0])}  # -0.05 dropped
UP2 = {"A/m": T([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0]]), "B/m": T([[0.0, 0.0], [-0.6, 0.0]]), "head/h": T([0.4, 0.0])}  # 0.02, 0.01 dropped
# The next global model by hand, P + ¼·UP1 + ¾·UP2 (the clients hold 1 and 3 examples):
P_NEXT = {"A/m": T([[1.025, -7.0, 1.775], [0.65, 3.0, -4.0]]), "B/m": T([[6.0, 0.075], [-0.55, 0.2]]), "head/h": T([5.3, -0.3])}


def flat(adapter, head):
    return messages.tensors_of(adapter, head)


def test_joint_topk_keeps_the_largest_entries_of_all_tensors_together():
    x = {"a": T([[0.5, -3.0], [1.0, 0.0]]), "b": T([2.5, -0.1, 4.0]), "c": T([0.2])}
    got = compression.topk_sparsify_joint(x, 0.375)  # k = ⌈0.375 · 8⌉ = 3: -3 (a), 4 and 2.5 (b); none of c
    assert [(n, i.tolist(), v.tolist()) for n, (i, v) in got.items()] == [("a", [1], [-3.0]), ("b", [0, 2], [2.5, 4.0]), ("c", [], [])]
    assert all(i.dtype == torch.int32 and v.dtype == torch.float32 for i, v in got.values())
    # one tensor alone is the per-tensor top-k
    y = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    i1, v1 = compression.topk_sparsify(y, 0.2)
    (i2, v2), = compression.topk_sparsify_joint({"y": y}, 0.2).values()
    assert torch.equal(i1, i2) and torch.equal(v1, v2) and i1.numel() == 7


def test_the_download_is_the_global_top_k_and_the_upload_density_travels_in_the_plan():
    s = strategies.build("flasc", density_down=0.25, density_up=0.25)
    p = s.payload(P, ClientSpec(0, 2, 4.0))
    got = flat(p.adapter, p.head)
    assert got.keys() == P_SENT.keys() and all(torch.equal(got[k], P_SENT[k]) for k in P_SENT)
    assert p.adapter["m"].scaling == 2.0
    assert p.plan.to_config() == {"upload_density": 0.25} and ClientPlan.from_config(p.plan.to_config()) == p.plan
    assert strategies.build("flasc", prox_mu=0.5).payload(P, ClientSpec(0, 2, 4.0)).plan.to_config() == {"prox_mu": 0.5, "upload_density": 0.25}
    # density 1: the dense global model, FedAvg's payload
    dense = strategies.build("flasc", density_down=1.0).payload(P, ClientSpec(0, 2, 4.0))
    assert all(torch.equal(a, b) for a, b in zip(flat(dense.adapter, dense.head).values(), flat(P.adapter, P.head).values()))


@pytest.mark.parametrize("cfg, line", [
    ({"upload_density": 0.0}, "upload_density is 0.0, expected a number in (0, 1]"),
    ({"upload_density": 1.5}, "upload_density is 1.5, expected a number in (0, 1]"),
    ({"upload_density": True}, "upload_density is True, expected a number"),
    ({"upload_density": "0.1"}, "upload_density is '0.1', expected a number"),
])
def test_a_malformed_upload_density_on_the_wire_is_one_line_naming_it(cfg, line):
    assert "upload_density" in KEYS
    with pytest.raises(ValueError) as e:
        ClientPlan.from_config(cfg)
    assert line in str(e.value) and "\n" not in str(e.value)


def data_bytes(content) -> int:
    return sum(np.load(io.BytesIO(a.data)).nbytes for a in content.array_records[messages.ARRAYS].values())


def hand_round(server_optimizer=None):
    """The hand example's round through the server adapter, each client's reply encoded as
    clients.app.compress_update encodes it: (the adapter, its train messages)."""
    fa = FlowerAdapter(strategies.build("flasc", density_down=0.25, density_up=0.25), P, fraction=1.0, min_clients=1,
                       client_spec=lambda i: ClientSpec(i, 2, 4.0), shapes={"m": (2, 3)}, seed=0, server_optimizer=server_optimizer)
    assert fa.codecs == Codecs("topk", "topk", 0.25, joint=True)
    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid({7: 0, 8: 1})))
    replies = []
    for m, (delta, n) in zip(msgs, ((D1, 1), (D2, 3))):
        record = m.content.array_records[messages.ARRAYS]
        assert sum(np.load(io.BytesIO(record[k].data)).size for k in record if k.endswith("#idx")) == 3
        assert data_bytes(m.content) == 3 * (4 + 4)  # int32 index + float32 value per entry
        dec = messages.decode(m.content)
        assert all(torch.equal(flat(dec.adapter, dec.head)[k], P_SENT[k]) for k in P_SENT)
        assert dec.config["upload_density"] == 0.25
        # the client: trained P_SENT + delta; its reply as clients.app.compress_update encodes it
        plan = ClientPlan.from_config({"upload_density": dec.config["upload_density"]})
        start = messages.start_tensors(dec, {"m": (2, 3)}, 2, 4.0)
        trained = {"m": LoraFactors(P_SENT["A/m"] + delta["A/m"], P_SENT["B/m"] + delta["B/m"], 2.0)}
        content = messages.encode(trained, {"h": P_SENT["head/h"] + delta["head/h"]}, {"num-examples": n}, codec="topk",
                                  fraction=plan.upload_density, reference=start, joint=True)
        assert data_bytes(content) == 3 * 8
        metadata = SimpleNamespace(src_node_id=m.metadata.dst_node_id, reply_to_message_id="")
        replies.append(SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content))
    fa.aggregate_train(1, replies)
    return fa, msgs


@pytest.mark.usefixtures("task_identity")
def test_a_round_on_the_wire_sparse_both_ways_and_the_aggregate_by_hand():
    """Through the server adapter: each payload holds 3 (index, value) pairs (24 data bytes), the
    client decodes P_SENT; each reply holds 3 pairs; the next global model is P + Σ p_k Δ_k, the
    unsent entries of P kept (not zeroed)."""
    fa, msgs = hand_round()
    assert fa.stats[1].replied == 2 and fa.stats[1].bytes_down == sum(messages.num_bytes(m.content) for m in msgs)
    got = flat(fa.model.adapter, fa.model.head)
    for k in P_NEXT:
        torch.testing.assert_close(got[k], P_NEXT[k], atol=1e-6, rtol=0)
    # what the clients decode, averaged (top-k both ways as a codec would do it), would have zeroed A[0, 0] = 1
    assert abs(float(got["A/m"][0, 0]) - 1.025) < 1e-6


@pytest.mark.usefixtures("task_identity")
def test_a_server_optimizer_steps_along_the_mean_sparse_update():
    """The paper steps P with Adam along Σ_k p_k Δ_k: FedAdam's first moment after one round is
    (1 − β₁)·(P_NEXT − P), by hand."""
    from fedpeft.serveropt import ServerOptimizer

    fa, _ = hand_round(ServerOptimizer("fedadam", 0.1))
    before = flat(P.adapter, P.head)
    for k in P_NEXT:
        torch.testing.assert_close(fa.server_opt.state.m[k], 0.1 * (P_NEXT[k] - before[k]), atol=1e-6, rtol=0)


def test_the_aggregate_is_the_server_model_plus_the_mean_sparse_update():
    """The pure rule on random tensors: P ← P + Σ p_k (U_k − P̃), for U_k = P̃ + Δ_k; uniform weights."""
    g = torch.Generator().manual_seed(1)
    model = GlobalModel({"m": LoraFactors(torch.randn(4, 9, generator=g), torch.randn(6, 4, generator=g), 0.5)}, {"h": torch.randn(5, generator=g)})
    s = strategies.build("flasc", density_down=0.1, density_up=0.3, weighting="uniform")
    sent = s.payload(model, ClientSpec(0, 4, 2.0))
    ups = []
    for n in (2, 5, 9):
        U = {"m": LoraFactors(sent.adapter["m"].A + torch.randn(4, 9, generator=g), sent.adapter["m"].B + torch.randn(6, 4, generator=g), 0.5)}
        ups.append(strategies.ClientUpdate(n, U, {"h": sent.head["h"] + torch.randn(5, generator=g)}, n))
    new = s.aggregate(model, ups)
    nz = int(sum(torch.count_nonzero(t) for t in flat(sent.adapter, sent.head).values()))
    assert nz == math.ceil(0.1 * (36 + 24 + 5))  # 7 entries downloaded
    for key, P_t, S_t, U_t, N_t in [
        ("A", model.adapter["m"].A, sent.adapter["m"].A, [u.adapter["m"].A for u in ups], new.adapter["m"].A),
        ("B", model.adapter["m"].B, sent.adapter["m"].B, [u.adapter["m"].B for u in ups], new.adapter["m"].B),
        ("head", model.head["h"], sent.head["h"], [u.head["h"] for u in ups], new.head["h"]),
    ]:
        want = P_t + sum((u - S_t) for u in U_t) / 3
        torch.testing.assert_close(N_t, want, atol=1e-5, rtol=0, msg=key)
    assert new.adapter["m"].scaling == 0.5
    assert s.aggregate(model, []) is model


def test_codecs_of_the_run_are_refused_beside_flasc():
    with pytest.raises(ValueError, match="strategy=flasc takes no compression codecs: it sparsifies its messages both ways itself"):
        Codecs(uplink="int8").for_strategy(strategies.build("flasc"))
    assert Codecs(uplink="int8").for_strategy(strategies.build("fedavg")) == Codecs(uplink="int8")


@pytest.mark.parametrize("override, expected", [
    ("strategy=flasc compression=topk", "compression.uplink: topk does not work with strategy=flasc (it sparsifies its messages both ways "
                                        "itself, at strategy.density_down and strategy.density_up); use compression=none"),
    ("strategy=flasc compression.downlink=int8", "compression.downlink: int8 does not work with strategy=flasc"),
    ("strategy=flasc privacy=central privacy.noise_multiplier=1.0 strategy.weighting=uniform",
     "privacy.mode: strategy=flasc does not work with privacy.mode=central; use privacy=none | sample | local"),
    ("strategy=flasc strategy.density_up=0", "strategy.density_up: must be a number in (0, 1] (1: dense), got 0"),
    ("strategy=fedavg strategy.density_down=1.5", "strategy.density_down: must be a number in (0, 1] (1: dense), got 1.5"),
])
def test_refusals_are_one_line_naming_both_sides(override, expected, tmp_path, monkeypatch, capsys):
    line = config_error(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert expected in line, line


def test_resume_needs_no_flasc_state():
    """The download mask is a function of the global model, and nothing is carried between rounds
    on either side (no error feedback): the strategy keeps no server state of its own."""
    s = strategies.build("flasc")
    assert s.server_state().state_dict() == {}
    a, b = s.payload(P, ClientSpec(0, 2, 4.0)), s.payload(P, ClientSpec(1, 2, 4.0))
    assert all(torch.equal(x, y) for x, y in zip(flat(a.adapter, a.head).values(), flat(b.adapter, b.head).values()))

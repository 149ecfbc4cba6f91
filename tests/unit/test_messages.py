"""Adapters on the wire and the Flower adapter's handling of replies (in-process, no Ray)."""

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedpeft import messages
from fedpeft.lora import LoraFactors
from fedpeft.server import FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from strategies.fedavg import FedAvg
from tests.harness import FakeGrid


def adapter(value: float = 0.0, r: int = 4):
    return {m: LoraFactors(torch.full((r, 8), value), torch.full((6, r), value + 1), 2.0) for m in ("l0.q", "l0.v")}


HEAD = {"classifier.weight": torch.ones(2, 8), "classifier.bias": torch.zeros(2)}


def test_encode_decode_round_trip_and_byte_count():
    a = adapter(0.5)
    content = messages.encode(a, HEAD, {"server-round": 3, "freeze_A": True})
    dec = messages.decode(content)
    back, head, cfg = dec.adapter, dec.head, dec.config
    assert cfg == {"server-round": 3, "freeze_A": True}
    for m in a:
        assert torch.equal(back[m].A, a[m].A) and torch.equal(back[m].B, a[m].B) and back[m].scaling == 2.0
    assert torch.equal(head["classifier.weight"], HEAD["classifier.weight"])
    tensor_bytes = 2 * (4 * 8 + 6 * 4) * 4 + (16 + 2) * 4
    n = messages.num_bytes(content)
    # Flower counts each array's serialized bytes (data plus a small numpy header) and each key.
    assert tensor_bytes < n < tensor_bytes + 6 * 200 + 200, n


def test_decode_rejects_malformed_records_naming_the_problem():
    with pytest.raises(messages.UpdateError, match="lacks"):
        messages.decode(RecordDict({}))
    bad = RecordDict({messages.ARRAYS: ArrayRecord(torch_state_dict={"A/x": torch.zeros(2, 3)}), messages.CONFIG: ConfigRecord({})})
    with pytest.raises(messages.UpdateError, match="module x: A without B"):
        messages.decode(bad)


def _reply(node: int, ad, head, n=10, error=None):
    content = None if error else messages.encode(ad, head, {"num-examples": n})
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""),
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error, code=2),
        content=content,
    )


pytestmark = pytest.mark.usefixtures("task_identity")


def make_adapter_strategy():
    g = GlobalModel(adapter=adapter(0.0), head=HEAD)
    fa = FlowerAdapter(FedAvg(), g, fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, 4, 8.0),
                       shapes={"l0.q": (6, 8), "l0.v": (6, 8)}, seed=0)
    grid = FakeGrid({11: 0, 12: 1, 13: 2, 14: 3, 15: 4})
    msgs = fa.configure_train(1, fa.arrays(), ConfigRecord(), grid)
    return fa, msgs


def test_per_node_messages_and_bytes_down():
    fa, msgs = make_adapter_strategy()
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12, 13, 14, 15]
    assert fa.stats[1].bytes_down == sum(messages.num_bytes(m.content) for m in msgs)
    assert all(m.content.config_records[messages.CONFIG]["server-round"] == 1 for m in msgs)


def test_bad_and_failed_replies_are_counted_and_the_rest_aggregated(caplog):
    fa, _ = make_adapter_strategy()
    wrong_shape = adapter(1.0, r=5)
    nan = adapter(1.0)
    nan["l0.q"] = LoraFactors(torch.full((4, 8), float("nan")), nan["l0.q"].B, 2.0)
    replies = [
        _reply(11, adapter(1.0), HEAD, n=10),
        _reply(12, adapter(3.0), HEAD, n=30),
        _reply(13, wrong_shape, HEAD),
        _reply(14, nan, HEAD),
        _reply(15, None, None, error="RuntimeError: boom"),
    ]
    arrays, metrics = fa.aggregate_train(1, replies)
    s = fa.stats[1]
    assert (s.sampled, s.replied, s.rejected, s.failed) == (5, 2, 2, 1)
    assert metrics["clients_rejected"] == 2 and metrics["clients_failed"] == 1
    # Only the two good updates, weighted 10:30.
    torch.testing.assert_close(fa.model.adapter["l0.q"].A, torch.full((4, 8), 0.25 * 1.0 + 0.75 * 3.0))
    text = caplog.text
    assert "client 2 (node 13) rejected: array 'B/l0.q' has shape (6, 5): rank 5, expected rank 4" in text
    assert "client 3 (node 14) rejected: module l0.q: non-finite values" in text
    assert "node 15 failed: RuntimeError: boom" in text
    assert s.bytes_up == sum(messages.num_bytes(r.content) for r in replies[:2])


def test_no_usable_update_keeps_the_global_adapter():
    fa, _ = make_adapter_strategy()
    before = fa.model
    fa.aggregate_train(1, [_reply(11, None, None, error="x")])
    assert fa.model is before


def test_ffa_payloads_leave_A_out_and_the_receiver_regenerates_it():
    from fedpeft.lora import seeded_lora_A

    A = {m: seeded_lora_A(m, 4, 8, seed=5) for m in ("l0.q", "l0.v")}
    ad = {m: LoraFactors(A[m], torch.randn(6, 4), 2.0) for m in A}
    full = messages.encode(ad, HEAD, {"A_seed": 5})
    half = messages.encode(ad, HEAD, {"A_seed": 5}, send_A=False)
    dec = messages.decode(half)
    for m in ad:
        assert torch.equal(dec.adapter[m].A, A[m]) and torch.equal(dec.adapter[m].B, ad[m].B)
    saved = messages.num_bytes(full) - messages.num_bytes(half)
    assert saved >= 2 * 4 * 8 * 4  # both A matrices (float32) are not sent
    # Without A_seed the receiver must hold the A it sent (RoLoRA's reply: decode's ``kept``).
    unseeded = messages.encode(ad, HEAD, {}, send_A=False)
    with pytest.raises(messages.UpdateError, match="no A_seed to regenerate it"):
        messages.decode(unseeded)
    assert all(torch.equal(f.A, A[m]) for m, f in messages.decode(unseeded, kept=ad).adapter.items())
    # Neither factor (SLoRA's stage-1 reply): the head alone, an empty adapter, the layout still checked.
    bare = messages.encode(ad, HEAD, {}, send_A=False, send_B=False)
    assert set(bare.array_records[messages.ARRAYS]) == {f"head/{h}" for h in HEAD}
    dec = messages.decode(bare)
    assert dec.adapter == {} and all(torch.equal(dec.head[h], t) for h, t in HEAD.items())
    shapes = {m: (6, 8) for m in ad}
    head_shapes = {h: tuple(t.shape) for h, t in HEAD.items()}
    assert messages.check_reply_layout(bare, shapes, head_shapes, (4,), scaling=2.0, send_A=False, send_B=False) == 4
    with pytest.raises(messages.UpdateError, match="unexpected array 'B/l0.q'"):
        messages.check_reply_layout(messages.encode(ad, HEAD, {}, send_A=False), shapes, head_shapes, (4,), scaling=2.0, send_A=False, send_B=False)


def test_merges_travel_with_their_versions():
    merge = {m: LoraFactors(torch.randn(3, 8), torch.randn(6, 3), 1.0) for m in ("l0.q", "l0.v")}
    dec = messages.decode(messages.encode({}, {}, {}, merges={2: merge, 3: merge}))
    assert sorted(dec.merges) == [2, 3]
    assert torch.equal(dec.merges[3]["l0.v"].B, merge["l0.v"].B) and dec.adapter == {}

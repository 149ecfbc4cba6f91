"""Compression on the wire: payloads compressed as values, updates as deltas from the start both
sides know, top-k error feedback through the encoder, bytes counted from what is really sent."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedpeft import compression, messages
from fedpeft.lora import LoraFactors, fresh_adapter, scaling_for
from fedpeft.server import Codecs, FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from strategies.fedavg import FedAvg
from strategies.ffa_lora import FFALoRA
from tests.harness import FakeGrid

SHAPES = {"l0.q": (48, 64), "l0.v": (48, 64)}


pytestmark = pytest.mark.usefixtures("task_identity")


def adapter(seed, r=4, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {m: LoraFactors(torch.randn(r, i, generator=g) * scale, torch.randn(o, r, generator=g) * scale, 2.0) for m, (o, i) in SHAPES.items()}


HEAD = {"classifier.weight": torch.randn(2, 64), "classifier.bias": torch.randn(2)}


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4", "topk"])
def test_bytes_counted_are_the_encoded_arrays(codec):
    content = messages.encode(adapter(0), HEAD, {"num-examples": 3}, codec=codec, fraction=0.1, generator=torch.Generator().manual_seed(0),
                              reference=messages.tensors_of(adapter(1), HEAD), residual={})
    record = content.array_records[messages.ARRAYS]
    data = sum(np.load(io.BytesIO(arr.data)).nbytes for arr in record.values())
    shapes = [(r, i) for o, i in SHAPES.values() for r in (4,)] + [(o, 4) for o, _ in SHAPES.values()] + [(2, 64), (2,)]
    assert data == sum(compression.expected_bytes(s, codec, 0.1) for s in shapes)
    # What Flower counts (and fedpeft reports) is those bytes plus each array's .npy header and key.
    headers = sum(len(arr.data) - np.load(io.BytesIO(arr.data)).nbytes for arr in record.values())
    assert record.count_bytes() == data + headers + sum(len(k) for k in record.keys())
    assert messages.num_bytes(content) == record.count_bytes() + content.config_records[messages.CONFIG].count_bytes()


def test_delta_coding_recovers_the_update_within_the_quantization_bound():
    start, end = adapter(1), adapter(1)
    end = {m: LoraFactors(f.A + 0.01 * torch.randn_like(f.A), f.B + 0.01 * torch.randn_like(f.B), 2.0) for m, f in start.items()}
    ref = messages.tensors_of(start, HEAD)
    content = messages.encode(end, HEAD, {"num-examples": 1}, codec="int8", generator=torch.Generator().manual_seed(3), reference=ref)
    dec = messages.decode(content, ref)
    for m in end:
        step = (end[m].A - start[m].A).abs().amax(dim=1, keepdim=True) / 127  # per-row scale of the delta
        assert ((dec.adapter[m].A - end[m].A).abs() <= step + 1e-6).all()
    # values instead of deltas would be ~100x coarser: the delta's range is 1% of the values'
    with pytest.raises(messages.UpdateError, match="without the reference"):
        messages.decode(content)


def test_topk_error_feedback_through_the_encoder_loses_nothing():
    ref = messages.tensors_of(adapter(1), HEAD)
    residual: dict = {}
    true_sum = {k: torch.zeros_like(v) for k, v in ref.items()}
    sent_sum = {k: torch.zeros_like(v) for k, v in ref.items()}
    for t in range(8):
        end = adapter(100 + t, scale=1.0)
        head = {k: v + t for k, v in HEAD.items()}
        content = messages.encode(end, head, {}, codec="topk", fraction=0.05, reference=ref, residual=residual)
        dec = messages.decode(content, ref)
        got = messages.tensors_of(dec.adapter, dec.head)
        true = messages.tensors_of(end, head)
        for k in ref:
            true_sum[k] += true[k] - ref[k]
            sent_sum[k] += got[k] - ref[k]
            assert torch.count_nonzero(got[k] - ref[k]) <= max(1, int(np.ceil(0.05 * ref[k].numel())))
    for k in ref:
        torch.testing.assert_close(sent_sum[k] + residual[k], true_sum[k], atol=1e-4, rtol=0)
    assert max(float(residual[k].abs().max()) for k in ref) > 0.1  # the residual is really carried


def test_adapter_compresses_payloads_and_decodes_delta_updates_against_what_it_sent():
    g = GlobalModel(adapter=adapter(5), head=HEAD)
    fa = FlowerAdapter(FedAvg(), g, fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, 4, 8.0),
                       shapes=SHAPES, seed=0, codecs=Codecs(uplink="int4", downlink="int8"))
    grid = FakeGrid({7: 0, 8: 1})
    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), grid))
    def data_bytes(content):
        return sum(np.load(io.BytesIO(a.data)).nbytes for a in content.array_records[messages.ARRAYS].values())

    plain = data_bytes(messages.encode(g.adapter, g.head, {}))
    assert all(data_bytes(m.content) < 0.3 * plain for m in msgs)  # int8 codes + one float32 scale per row
    assert fa.stats[1].bytes_down == sum(messages.num_bytes(m.content) for m in msgs)
    replies, targets = [], []
    for m in msgs:
        dec = messages.decode(m.content)  # what the client starts from: the int8-decoded payload
        start = messages.start_tensors(dec, SHAPES, 4, 8.0)
        end = {k: LoraFactors(f.A + 0.05, f.B - 0.05, f.scaling) for k, f in dec.adapter.items()}
        targets.append(end)
        content = messages.encode(end, dec.head, {"num-examples": 5}, codec="int4", generator=torch.Generator().manual_seed(1), reference=start)
        metadata = SimpleNamespace(src_node_id=m.metadata.dst_node_id, reply_to_message_id="")
        replies.append(SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content))
    fa.aggregate_train(1, replies)
    assert fa.stats[1].replied == 2
    for k in SHAPES:  # the delta (+0.05 everywhere) is constant per row: int4 codes it exactly
        want = (targets[0][k].A + targets[1][k].A) / 2
        torch.testing.assert_close(fa.model.adapter[k].A, want, atol=1e-5, rtol=0)


def test_fresh_starts_and_frozen_A_have_references_too():
    ffa = FFALoRA(seed=3)
    model = ffa.init(GlobalModel(adapter={m: LoraFactors(torch.zeros(4, i), torch.zeros(o, 4), 2.0) for m, (o, i) in SHAPES.items()}, head=HEAD))
    fa = FlowerAdapter(ffa, model, fraction=1.0, min_clients=1, client_spec=lambda i: ClientSpec(i, 4, 8.0),
                       shapes=SHAPES, seed=0, codecs=Codecs(uplink="int8"))
    fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid({3: 0}))
    spec, payload, reference = fa.sent[3]
    assert not any(k.startswith("A/") for k in reference)  # FFA: A is neither sent nor coded
    # a fresh-start payload's reference is the seeded fresh LoRA the client builds
    dec = messages.Decoded({}, dict(HEAD), {"init_seed": 42})
    ref = messages.start_tensors(dec, SHAPES, 4, 8.0)
    fresh = fresh_adapter(SHAPES, 4, scaling_for(4, 8.0), 42)
    assert torch.equal(ref["A/l0.q"], fresh["l0.q"].A) and torch.count_nonzero(ref["B/l0.q"]) == 0

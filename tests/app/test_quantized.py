"""Reduced-precision and quantized bases (``model.dtype``, ``model.quantization``: bitsandbytes'
CPU backend runs here): what loads, what stays float32, and that a strategy's merges are kept
beside a base that is not float32 (:class:`fedpeft.models.HeldDelta`), exactly and alike on every node.

SmolLM2-135M is loaded in 4-bit NF4 and in bf16 once each; the federations run a tiny random-init
Llama (2 layers, hidden 64, SmolLM2's tokenizer) quantized to 4-bit, where the weights' values do
not matter but the shapes, the bnb layers and the merges do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clients import app as client_app
from fedpeft.config import ModelConfig
from fedpeft.models import PREFIX, HeldDelta, ModelError, apply_merge, base_weight, build, layer, module_shapes, read_adapter

SMOL = dict(name="smollm2", task="causal_lm", target_modules=["q_proj", "v_proj"], max_length=16)


def train_step(lm, steps=2):
    """A few AdamW steps of LoRA on a fixed batch: (losses, adapter before, adapter after)."""
    before = read_adapter(lm)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = lm.tokenizer(["To be, or not to be, that is the question"], return_tensors="pt").input_ids[:, :12]
    lm.model.train()
    losses = []
    for _ in range(steps):
        loss = lm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    lm.model.eval()
    return losses, before, read_adapter(lm)


def assert_float32_adapter_that_trains(lm):
    assert {p.dtype for p in lm.model.parameters() if p.requires_grad} == {torch.float32}
    losses, before, after = train_step(lm)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    for m in lm.modules:
        assert after.adapter[m].A.dtype == after.adapter[m].B.dtype == torch.float32
    assert any(not torch.equal(before.adapter[m].B, after.adapter[m].B) for m in lm.modules)
    return losses


@pytest.mark.usefixtures("one_torch_thread")
def test_smollm2_loads_in_4bit_nf4_with_a_float32_adapter_that_trains():
    import bitsandbytes as bnb

    lm = build(ModelConfig(**SMOL, quantization="4bit", compute_dtype="float32"), num_labels=None, device="cpu")
    base = lm.model.get_base_model()
    assert base.is_loaded_in_4bit
    footprint = base.get_memory_footprint() / 1e6
    assert footprint < 200, footprint  # 538 MB in float32
    q = layer(lm, lm.modules[0]).base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4" and q.weight.quant_state.nested  # double quantization
    assert module_shapes(lm)[lm.modules[0]] == (576, 576)  # the weight is stored packed: (165888, 1)
    losses = assert_float32_adapter_that_trains(lm)
    assert losses[1] < losses[0]


@pytest.mark.usefixtures("one_torch_thread")
def test_smollm2_loads_in_bf16_and_a_merge_stays_float32_beside_the_weight():
    lm = build(ModelConfig(**SMOL, dtype="bfloat16"), num_labels=None, device="cpu")
    m = lm.modules[0]
    lay = layer(lm, m)
    assert lay.base_layer.weight.dtype == torch.bfloat16
    w0 = lay.base_layer.weight.detach().clone()
    x = torch.randn(2, 3, 576, dtype=torch.bfloat16)
    y0 = lay.base_layer(x)
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 576, generator=g) * 1e-3, torch.randn(576, 2, generator=g) * 1e-3  # far below bf16's resolution of W
    from fedpeft.lora import LoraFactors

    apply_merge(lm, {m: LoraFactors(A, B, 1.0)})
    assert torch.equal(lay.base_layer.weight, w0)  # never rounded into the bf16 weight
    held = getattr(lay.base_layer, HeldDelta.ATTR)
    assert held.D is None and torch.equal(held.A, A) and torch.equal(held.B, B)
    assert torch.equal(base_weight(lm, m), w0.float() + (B.double() @ A.double()).float())
    y = lay.base_layer(x)
    expected = (y0.float() + F.linear(F.linear(x.float(), A), B)).to(torch.bfloat16)
    assert torch.equal(y, expected)
    assert lm.base_version == 1
    assert_float32_adapter_that_trains(lm)

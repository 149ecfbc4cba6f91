"""The memory plan's arithmetic (fedpeft/memory.py) on a tiny Llama config built on the meta device,
bitsandbytes' real storage cost, and the one-line refusal."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from fedpeft import memory
from fedpeft.config import ConfigError

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return memory.counts_from_model(model, model.config, ("q_proj", "v_proj"), classification=False)


def test_parameters_are_counted_per_kind(tiny):
    # per layer: q 64x64, k and v 32x64 (2 KV heads of 16), o 64x64, gate and up 128x64, down 64x128
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128
    assert tiny.quantizable == 2 * per_layer == 73728
    assert tiny.quantizable_rows == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert tiny.other == 1000 * 64 + 2 * 2 * 64 + 64  # the (tied) embedding, two RMSNorms per layer, the final norm
    assert tiny.lora == {f"model.layers.{i}.self_attn.{m}": s for i in range(2) for m, s in (("q_proj", (64, 64)), ("v_proj", (32, 64)))}
    assert (tiny.kind, tiny.layers, tiny.kv_heads, tiny.vocab, tiny.head) == ("decoder", 2, 2, 1000, 0)


def test_weights_by_dtype_and_quantization(tiny):
    total = 73728 + 64320
    assert memory.weight_bytes(tiny, "float32") == 4 * total
    assert memory.weight_bytes(tiny, "bfloat16") == 2 * total
    assert memory.weight_bytes(tiny, "float32", "8bit") == 73728 + 4 * 512 * 2 + 4 * 64320
    assert memory.weight_bytes(tiny, "bfloat16", "4bit", double_quant=False) == 73728 * (0.5 + 4 / 64) + 4 * 64320
    assert memory.weight_bytes(tiny, "bfloat16", "4bit") == pytest.approx(73728 * (0.5 + 1 / 64 + 4 / 16384) + 4 * 64320)


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_4bit_cost_per_weight_is_what_bitsandbytes_stores(double_quant):
    """NF4 with bitsandbytes' Linear4bit block size (64): the packed codes, the absmax per block
    and, double-quantized, the 8-bit absmax with its own float32 constants (per 256 blocks)."""
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 1024, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # and its offset
    tiny_counts = memory.Counts(quantizable=w.numel(), quantizable_rows=256, other=0, lora={}, head=0, kind="decoder", layers=1, hidden=1,
                                intermediate=1, heads=1, kv_heads=1, vocab=1, eager_attention=False, dropout=False)
    assert memory.weight_bytes(tiny_counts, "bfloat16", "4bit", double_quant) == pytest.approx(stored, rel=0.01)


def test_the_8bit_cost_is_what_bitsandbytes_stores():
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 1024, dtype=torch.float16)
    codes, row_stats, _ = bnbf.int8_vectorwise_quant(w)
    stored = codes.numel() * codes.element_size() + row_stats.numel() * 4
    c = memory.Counts(quantizable=w.numel(), quantizable_rows=256, other=0, lora={}, head=0, kind="decoder", layers=1, hidden=1,
                      intermediate=1, heads=1, kv_heads=1, vocab=1, eager_attention=False, dropout=False)
    assert memory.weight_bytes(c, "float16", "8bit") == stored


def test_adapter_gradient_and_adamw_states(tiny):
    params = 2 * (8 * (64 + 64) + 8 * (32 + 64))
    assert memory.adapter_params(tiny, 8) == params == 3584
    assert memory.adapter_bytes(tiny, 8) == 16 * params  # value, gradient, two moments: float32
    assert memory.adapter_bytes(tiny, 8, "sgd", momentum=0.9) == 12 * params
    assert memory.adapter_bytes(tiny, 8, "sgd") == 8 * params


def test_activations_checkpointing_logits_and_cohorts(tiny):
    kw = dict(checkpointing=False, causal=True)
    full = memory.activation_bytes(tiny, 4, 32, 4, **kw)
    ckpt = memory.activation_bytes(tiny, 4, 32, 4, checkpointing=True, causal=True)
    no_logits = memory.activation_bytes(tiny, 4, 32, 4, checkpointing=False, causal=False)
    assert full - no_logits == 4 * 32 * 1000 * 16  # the logits, their log-softmax and the two gradients, float32
    assert ckpt < full
    # checkpointing keeps one block input per layer and recomputes one block
    layer = memory._layer_bytes(tiny, 128, 32, 4, 8)
    assert full - ckpt == pytest.approx(2 * layer - (2 * 4 * 64 * 128 + layer))
    assert memory.activation_bytes(tiny, 8, 32, 4, **kw) == pytest.approx(2 * full)  # linear in tokens
    one = memory.make_plan(tiny, memory.Setting(batch_size=4, max_length=32, causal=True))
    four = memory.make_plan(tiny, memory.Setting(batch_size=4, max_length=32, causal=True, cohort=4))
    assert four.weights == one.weights and four.adapter == 4 * one.adapter and four.activations == pytest.approx(4 * one.activations)
    assert one.per_actor == one.runtime + one.weights + one.adapter + one.activations
    assert re.fullmatch(r"memory plan: \d+\.\d\d GB per actor for one client \(float32 weights .*\); server's evaluation copy \d+\.\d\d GB", one.line())


def big() -> memory.Counts:
    """A 7B Llama's counts (Llama-2-7B's shape)."""
    h, inter, layers, vocab = 4096, 11008, 32, 32000
    per_layer = 4 * h * h + 3 * h * inter
    return memory.Counts(quantizable=layers * per_layer, quantizable_rows=layers * (4 * h + 2 * inter + h), other=2 * vocab * h + (2 * layers + 1) * h,
                         lora={f"l{i}.{m}": (h, h) for i in range(layers) for m in ("q_proj", "v_proj")}, head=0, kind="decoder", layers=layers,
                         hidden=h, intermediate=inter, heads=32, kv_heads=32, vocab=vocab, eager_attention=False, dropout=False)


def test_a_plan_that_does_not_fit_is_refused_in_one_line_naming_a_setting_that_fits():
    c = big()
    assert c.total == pytest.approx(6.74e9, rel=0.01)
    s = memory.Setting(dtype="float32", rank=16, batch_size=4, max_length=512, causal=True, cuda=True)
    plan = memory.make_plan(c, s)
    share = memory.Share(20e9, "engine.num_gpus=0.25 of 80 GB")
    line = memory.refusal(plan, c, share)
    m = re.fullmatch(r"needs (\d+\.\d) GB per actor, has 20\.0 GB \(engine\.num_gpus=0\.25 of 80 GB\): (.*) needs about (\d+\.\d) GB", line)
    assert m, line
    assert float(m.group(1)) > 27  # 27 GB of float32 weights alone
    assert float(m.group(3)) <= 20 and "model.quantization=4bit" in m.group(2)
    assert memory.refusal(plan, c, memory.Share(200e9, "x")) is None


def test_check_memory_divides_the_host_among_concurrent_actors(monkeypatch, tiny):
    cfg = OmegaConf.create({
        "clients": 8, "fraction": 1.0, "min_clients": 2,
        "model": {"name": "x", "task": "causal_lm", "target_modules": ["q_proj"], "rank": 8, "dtype": "float32", "quantization": "none",
                  "double_quant": True, "compute_dtype": "bfloat16", "max_length": 64, "eval_batch_size": 8},
        "train": {"batch_size": 4, "gradient_checkpointing": False, "optimizer": "adamw", "momentum": 0.0},
        "engine": {"device": "cpu", "num_gpus": 0.0, "num_cpus": 1.0, "kind": "per_client", "cohort_size": 8, "ray_address": None},
    })
    monkeypatch.setattr(memory, "count", lambda *a: tiny)
    monkeypatch.setattr(memory.os, "cpu_count", lambda: 4)
    need = memory.plan_for(cfg, None)[0]
    monkeypatch.setattr(memory, "host_available", lambda: need.server + 4 * need.per_actor + 1e6)
    assert memory.check_memory(cfg, None).per_actor == need.per_actor  # 4 actors (4 CPUs) fit
    monkeypatch.setattr(memory, "host_available", lambda: need.server + 3 * need.per_actor)
    with pytest.raises(ConfigError, match=r"^needs \d+\.\d GB per actor, has \d+\.\d GB \(\d+\.\d GB of available RAM over 4 concurrent actor\(s\)\): "):
        memory.check_memory(cfg, None)
    cfg.engine.num_cpus = 2.0  # 2 actors at once
    assert memory.check_memory(cfg, None) is not None


def test_a_client_whose_actor_died_gets_the_plan_in_its_failure_line(tiny):
    from fedpeft.serverapp import actor_death_note

    plan = memory.make_plan(tiny, memory.Setting(batch_size=4, max_length=32, causal=True))
    note = actor_death_note(plan)
    died = note("<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task.'>")
    assert died.startswith(f" (its actor died: out of memory? the memory plan is {plan.per_actor / 1e9:.1f} GB per actor at train.batch_size=4")
    assert note("<class 'clients.train.ClientOutOfMemory'>:<'client 1: out of memory training rank 4, ...'>") == ""  # it said so itself
    assert note("<class 'ValueError'>:<'something else'>") == "" and actor_death_note(None)("ActorDiedError") == ""

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
from omegaconf import OmegaConf

from clients import app as client_app
from fedpeft.config import ModelConfig
from fedpeft.models import HeldDelta, ModelError, apply_merge, base_weight, build, layer, module_shapes, read_adapter

SMOL = dict(name="smollm2", task="causal_lm", target_modules=["q_proj", "v_proj"], max_length=16)


def train_step(lm, steps=2, tokens=12):
    """A few AdamW steps of LoRA on a fixed batch: (losses, adapter before, adapter after)."""
    before = read_adapter(lm)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = lm.tokenizer(["To be, or not to be, that is the question"], return_tensors="pt").input_ids[:, :tokens]
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


def assert_float32_adapter_that_trains(lm, **step):
    assert {p.dtype for p in lm.model.parameters() if p.requires_grad} == {torch.float32}
    losses, before, after = train_step(lm, **step)
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
def test_a_4bit_base_keeps_its_layout_through_evaluation_so_train_and_eval_see_one_base():
    """bitsandbytes 0.50 repacks a Linear4bit in place on its first eval-mode forward without
    gradients on a CPU with AVX512-BF16, rounding its scales to bfloat16: the server's evaluation
    then ran on another base than the clients' training, and dequantizing it read garbage (this
    machine has AVX512-BF16; on a CPU without it the repacking never happens and this test cannot
    fail)."""
    from bitsandbytes.functional import has_avx512bf16

    lm = build(ModelConfig(**SMOL, quantization="4bit", compute_dtype="float32"), num_labels=None, device="cpu")
    m = lm.modules[0]
    q = layer(lm, m).base_layer
    before = base_weight(lm, m).clone()
    x = torch.randn(1, 4, 576)
    q.train()
    y_train = q(x.requires_grad_(True)).detach()
    lm.model.eval()
    with torch.no_grad():
        y_eval = q(x.detach())
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False), f"repacked (AVX512-BF16: {has_avx512bf16()})"
    assert torch.equal(base_weight(lm, m), before)
    assert torch.equal(y_eval, y_train)  # one base for training and for evaluation


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
    assert_float32_adapter_that_trains(lm, steps=1, tokens=6)  # (bf16 matmuls are slow on CPUs without bf16 units)


@pytest.mark.usefixtures("one_torch_thread")
def test_minilm_classifier_on_an_8bit_base_keeps_its_head_float32_and_unquantized():
    import bitsandbytes as bnb

    lm = build(ModelConfig(quantization="8bit"), num_labels=3, device="cpu")
    assert isinstance(layer(lm, lm.modules[0]).base_layer, bnb.nn.Linear8bitLt)
    assert lm.head == ("classifier.weight", "classifier.bias")
    assert {p.dtype for p in lm.model.parameters() if p.requires_grad} == {torch.float32}
    before = read_adapter(lm)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = lm.tokenizer(["a fine film", "a dull film"], return_tensors="pt")
    lm.model.train()
    loss = lm.model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = read_adapter(lm)
    assert not torch.equal(before.head["classifier.weight"], after.head["classifier.weight"])
    assert not torch.equal(before.adapter[lm.modules[0]].B, after.adapter[lm.modules[0]].B)


def test_what_bitsandbytes_cannot_run_is_refused_in_one_line(monkeypatch):
    import sys

    from fedpeft.composing import compose
    from fedpeft.config import ConfigError

    for over, match in ((["model.quantization=3bit"], "model.quantization"),
                        (["model.quantization=4bit", "peft=loha"], r"model.quantization: 4bit with peft=loha: .*use peft=lora \(QLoRA\)"),
                        (["model.quantization=8bit", "peft=lora_xs"], "model.quantization: 8bit with peft=lora_xs")):
        with pytest.raises(ConfigError, match=match) as e:
            compose(over)
        assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ModelError, match=r"^model.quantization=4bit: bitsandbytes is not usable here \(.*\); install bitsandbytes") as e:
        build(ModelConfig(quantization="4bit"), num_labels=2, device="cpu")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- federations on a 4-bit base


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-init Llama (2 layers, hidden 64, grouped-query v_proj 64 → 32) with SmolLM2's tokenizer, saved as a local model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedpeft.models import model_path

    tok = AutoTokenizer.from_pretrained(model_path("smollm2"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def fed_overrides(path: str, *more: str) -> list[str]:
    return ["+preset=shakespeare", f"model.name={path}", "model.quantization=4bit", "model.compute_dtype=float32", "clients=4",
            "fraction=0.5", "min_clients=2", "rounds=10", "model.rank=4", "model.alpha=8", "model.max_length=16", "train.local_steps=1",
            "train.batch_size=2", "train.lr=1e-2", "data.eval_samples=8", "model.eval_batch_size=8", "tracking.mode=disabled",
            "engine.device=cpu", "engine.num_cpus=1", *more]


def federate(run_dir, overrides, run_id):
    """The real server over the real ClientApp in-process (:class:`tests.harness.AppGrid`); the
    simulated nodes share ``run_dir/state`` (the server's merge store is ``state/merges``)."""
    from flwr.app import Context, RecordDict

    from fedpeft.composing import compose
    from fedpeft.runconfig import RunSpec, to_run_config
    from fedpeft.serverapp import Federation
    from tests.harness import AppGrid

    cfg = compose(overrides)
    shared = str(run_dir / "state")
    rc = to_run_config(cfg, run_dir, shared_dir=shared)
    contexts = {
        100 + i: Context(run_id=run_id, node_id=100 + i, node_config={"partition-id": i, "num-partitions": cfg.clients}, state=RecordDict(),
                         run_config=rc)
        for i in range(cfg.clients)
    }
    fed, grid = Federation(cfg, RunSpec(run_dir, shared_dir=shared)), AppGrid(contexts)
    fed.run(grid)
    return fed, grid


def dense(form) -> torch.Tensor:
    return form.double() if isinstance(form, torch.Tensor) else form.scaling * (form.B.double() @ form.A.double())


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    err = float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))
    assert err <= rel, f"{what}: relative error {err:.2e}"


@pytest.mark.usefixtures("task_identity", "one_torch_thread")
@pytest.mark.parametrize("strategy", ["flora", "fedex_lora"])
def test_merges_on_a_4bit_base_stay_float32_beside_it_and_every_node_holds_the_servers_weights(strategy, tiny_llama, tmp_path):
    from clients.app import sync_base
    from fedpeft.merges import load_merge
    from fedpeft.server import global_adapter

    fed, _ = federate(tmp_path, fed_overrides(tiny_llama, f"strategy={strategy}"), run_id=31 if strategy == "flora" else 32)
    server, store = fed.adapter, tmp_path / "state" / "merges"
    V = server.model.version
    assert V == 10 and len(fed.history) == 11 and all(r["clients_replied"] == 2 for r in fed.history[1:])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in fed.history)
    forms = {v: server.merges.form(server.model, v) for v in range(1, V + 1)}
    node = next(iter(client_app._MODELS.values()))  # the simulated nodes' cached model (one per worker)
    assert 0 < node.base_version <= V
    sync_base(node, V, forms)  # the merges of rounds it did not train after, as its node's state keeps them

    # A node that joins now (a new worker, a resumed run) is sent every merge; the store (a checkpoint) holds the same forms.
    cfg = fed.cfg
    fresh = build(cfg.model, num_labels=None, device="cpu", seed=cfg.seed, peft_cfg=cfg.peft)
    sync_base(fresh, V, {v: load_merge(store, v) for v in range(1, V + 1)})
    fp32 = build(OmegaConf.merge(cfg.model, {"quantization": "none"}), num_labels=None, device="cpu", seed=cfg.seed, peft_cfg=cfg.peft)
    w0 = {m: base_weight(fp32, m).clone() for m in fp32.modules}
    sync_base(fp32, V, forms)  # the same merges on a float32 base: added in place

    kinds = set()
    for m in node.modules:
        lay = layer(node, m)
        held = getattr(lay.base_layer, HeldDelta.ATTR)
        kinds.add("dense" if held.D is not None else "factors")
        # every node holds the same 4-bit weight (never re-quantized) and the same float32 ΔW, bit for bit
        assert torch.equal(lay.base_layer.weight, layer(fresh, m).base_layer.weight), m
        assert torch.equal(held.dense(), getattr(layer(fresh, m).base_layer, HeldDelta.ATTR).dense()), m
        assert held.dense().dtype == torch.float32
        # ΔW is the sum of the merges as the server computed and sent them (float32 rounding) ...
        expected = sum(dense(forms[v][m]) for v in range(1, V + 1))
        assert_close(held.dense(), expected, 1e-6, f"{m}: held ΔW vs the server's merges")
        # ... and what a float32 base adds to its weight from the same merges
        assert_close(held.dense(), base_weight(fp32, m) - w0[m], 1e-5, f"{m}: held ΔW vs the float32 base's delta")
        # the forward applies it: base_layer(x) = x W_qᵀ + x ΔWᵀ
        x = torch.randn(3, lay.in_features)
        plain = type(lay.base_layer).forward(lay.base_layer, x)  # the bnb layer without its hook
        assert_close(lay.base_layer(x) - plain, F.linear(x, held.dense()), 1e-5, f"{m}: the hook's output")
        # the node's effective weight is the server's: W_q (dequantized) + Σ merges (+ the global adapter)
        adapter = global_adapter(server.model)
        server_w = base_weight(fed.lm, m) + dense(adapter[m]).float()
        node_w = base_weight(node, m) + (dense(server.model.adapter[m]).float() if m in server.model.adapter else 0)
        assert_close(node_w, server_w, 1e-5, f"{m}: node vs server effective weight")
        lora = layer(fed.lm, m)  # the server's evaluation adapter holds that global adapter in float32
        name = fed.lm.model.active_adapter
        assert lora.lora_A[name].weight.dtype == torch.float32
        assert_close(lora.scaling[name] * (lora.lora_B[name].weight.double() @ lora.lora_A[name].weight.double()), dense(adapter[m]), 1e-6, m)
    assert "dense" in kinds, kinds  # 10 stacked merges outgrow dense in these small modules


@pytest.mark.usefixtures("task_identity", "one_torch_thread")
def test_cohort_engine_gives_the_per_client_engines_flora_on_a_4bit_base(tiny_llama, tmp_path):
    """The cohort engine's batched LoRA over bnb Linear4bit base layers, with the merges held
    beside them, trains as the per-client engine does (FLoRA: from round 2 on, on merged bases)."""
    over = fed_overrides(tiny_llama, "strategy=flora", "rounds=3", "fraction=0.75", "min_clients=3", "engine.cohort_size=3", "train.local_steps=2")
    one, _ = federate(tmp_path / "per_client", [*over, "engine.kind=per_client"], run_id=41)
    many, grid = federate(tmp_path / "cohort", [*over, "engine.kind=cohort"], run_id=42)
    assert "train.cohort" in grid.types and "train" not in grid.types
    assert many.adapter.model.version == one.adapter.model.version == 3
    for a, b in zip(one.history, many.history, strict=True):
        assert (a.get("clients_replied"), a.get("bytes_up")) == (b.get("clients_replied"), b.get("bytes_up"))
        for key in ("loss", "train_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["round"], key)
    for v in range(1, 4):
        for m, f in one.adapter.merges.form(one.adapter.model, v).items():
            assert_close(dense(many.adapter.merges.form(many.adapter.model, v)[m]), dense(f), 1e-3, f"merge {v} of {m}")

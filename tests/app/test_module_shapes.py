"""Global adapters whose modules have different ranks (issue 8): an LLM's modules differ in shape
(SmolLM2: ``q_proj`` 576×576, grouped-query ``k_proj``/``v_proj`` 576→192, MLP 576↔1536), so FLoRA's
and FlexLoRA's global adapters, re-factorised at ``min(Σ r_k, out, in)``, have a rank per module. The
server's evaluation adapter and its checkpoint carry them as peft's ``rank_pattern`` /
``alpha_pattern``; in-process, no Ray."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

import strategies
from clients.app import sync_base
from clients.train import evaluate
from fedpeft.lora import LoraFactors, delta, scaling_for
from fedpeft.models import LoadedModel, build, layer, lora_config, model_path, module_shapes, pattern_key, read_adapter, save_adapter, scaling_of, write_adapter
from fedpeft.server import load_global
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.flora import merged_delta

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = SimpleNamespace(name="smollm2", task="causal_lm", target_modules=ALL_LINEAR, rank=4, alpha=8.0, dropout=0.0, max_length=12)
MINILM = SimpleNamespace(name="minilm", task="classification", target_modules=["query", "value"], rank=4, alpha=8.0, dropout=0.0, max_length=16)
TEXTS = [
    "To be, or not to be, that is the question:", "Now is the winter of our discontent", "All the world's a stage,",
    "Friends, Romans, countrymen, lend me your ears;",
]


def layer_of(peft_model, module: str):
    return peft_model.get_submodule("base_model.model." + module)


def random_factors(shape, rank, scaling, gen, size=2e-3):
    """Factors whose ``s·B·A`` has entries of about ``size`` (a visible but harmless change of the weights)."""
    o, i = shape
    A = torch.randn(rank, i, generator=gen) * 0.02
    B = torch.randn(o, rank, generator=gen) * (size / (scaling * 0.02 * rank**0.5))
    return LoraFactors(A, B, scaling)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared, busy CPU two threads' barriers cost far more than they gain
    (a SmolLM2 forward measured 3-7 s with two, 1 s with one). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- (a) a small model: per-module ranks and scalings equal the dense merge ---------------------


def test_load_global_with_a_rank_and_scaling_per_module_equals_the_dense_merge():
    lm, merged = build(MINILM, num_labels=2, device="cpu", seed=0), build(MINILM, num_labels=2, device="cpu", seed=0)
    head = read_adapter(lm).head
    gen = torch.Generator().manual_seed(1)
    shapes = module_shapes(lm)
    # every module its own rank (1..12) and scaling (MiniLM has 6 layers: layers 1 vs 11 are below, on SmolLM2)
    adapter = {m: random_factors(shapes[m], 1 + j, 0.5 + 0.25 * j, gen, size=5e-3) for j, m in enumerate(lm.modules)}
    model = GlobalModel(adapter=adapter, head=head)
    load_global(lm, model)
    for j, m in enumerate(lm.modules):
        assert layer(lm, m).lora_A[lm.model.active_adapter].weight.shape == (1 + j, 384)
        assert scaling_of(lm, m) == pytest.approx(0.5 + 0.25 * j, rel=1e-12)
    # the same update merged densely, W ← W + s·B·A, on a second copy with a zero adapter
    for m, f in adapter.items():
        layer(merged, m).base_layer.weight.data += delta(f)
    write_adapter(merged, {m: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling) for m, f in read_adapter(merged).adapter.items()}, head)
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = lm.model(**enc).logits, merged.model(**enc).logits
        with lm.model.disable_adapter():
            base = lm.model(**enc).logits
    assert (got - base).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # ranks change (and change back to the default adapter's): still one evaluation adapter
    load_global(lm, GlobalModel(adapter={m: random_factors(shapes[m], 2, 1.0, gen) for m in lm.modules}, head=head))
    assert set(lm.model.peft_config) == {"default", "global"} and lm.model.active_adapter == "global"
    assert layer(lm, lm.modules[3]).lora_A["global"].weight.shape[0] == 2
    load_global(lm, GlobalModel(adapter={m: random_factors(shapes[m], 4, 2.0, gen) for m in lm.modules}, head=head))
    assert set(lm.model.peft_config) == {"default"} and lm.model.active_adapter == "default"
    assert all(set(layer(lm, m).lora_A) == {"default"} for m in lm.modules)
    # alpha = scaling · rank is rounded: (1/49)·49 = 0.9999999999999999 is alpha 1, no pattern entry
    cfg = lora_config(lm, {m: 49 for m in lm.modules}, {m: (1 / 49) * 49 for m in lm.modules})
    assert (cfg.r, cfg.lora_alpha, cfg.rank_pattern, cfg.alpha_pattern) == (49, 1.0, {}, {})


# --- (b) every strategy on SmolLM2, all linear layers, Σr past the smallest module dimension ----

GQA_DIM = 192  # SmolLM2's k_proj / v_proj output: the smallest module dimension

# strategy → (rounds of client ranks, r_max of the server adapter); alpha = 2·rank (scaling 2)
PLANS = {
    "fedavg": ([[4, 4]], 4),
    "dp_lora": ([[4, 4]], 4),
    "ffa_lora": ([[196, 8]], 196),  # a client rank past v_proj's 192
    "hetlora": ([[196, 8]], 196),
    "flexlora": ([[120, 80]], None),  # Σr = 200: k/v at 192, the others at 200
    "raflora": ([[120, 80]], None),  # as FlexLoRA: partitions [0, 80) and [80, 120)
    "flora": ([[64, 48], [64, 48]], None),  # two merges, Σr = 224: k/v at 192, the others at 224
    "fedex_lora": ([[4, 4]], 4),  # the average at r=4 plus its residual merge ((K−1)·r = 4): 8
    "rolora": ([[4, 4]], 4),
    "flasc": ([[4, 4]], 4),  # a dense global A, B at r=4 (the download's top-k is the plan's, not the model's)
}
# Covered elsewhere: their global model is no LoRA adapter of the server's (FedSA-LoRA: B stays with
# the clients; Fed-SB: peft=lora_xs), or needs the base weights at init (FeDeRA: test_exact_strategies;
# SLoRA: tests/app/test_slora.py, whose stage-1 model the server loads as an exact full-rank adapter).
ELSEWHERE = {"fedsa_lora", "fed_sb", "federa", "slora"}


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM

    lm = build(SMOLLM2, num_labels=None, device="cpu", seed=0)
    base = AutoModelForCausalLM.from_pretrained(model_path("smollm2"), dtype=torch.float32).eval()
    from datasets import Dataset

    data = Dataset.from_dict({"text": TEXTS})
    with lm.model.disable_adapter():
        base_ppl = evaluate(lm, data, 4)["perplexity"]
    return SimpleNamespace(lm=lm, base=base, data=data, shapes=module_shapes(lm), base_ppl=base_ppl)


def expected_rank(name: str, shape, rounds, r_max) -> int:
    if name in ("flora", "flexlora", "raflora"):
        return min(sum(map(sum, rounds)), *shape)
    if name == "fedex_lora":
        return 4 + sum(4 * (len(ranks) - 1) for ranks in rounds)
    return r_max if name in ("ffa_lora", "hetlora") else 4


def run_rounds(smol, name, rounds, r_max, gen):
    """The global model after ``rounds`` of updates with random factors of the right shapes (the
    strategy's own payloads, so FFA-LoRA's frozen A and HetLoRA's truncation are respected)."""
    kwargs = {"r_max": r_max} if name == "ffa_lora" else {}
    strategy = strategies.build(name, **kwargs)
    start = r_max or SMOLLM2.rank
    initial = {
        m: LoraFactors(torch.rand(start, i, generator=gen) * 0.08 - 0.04, torch.zeros(o, start), scaling_for(start, 2.0 * start))
        for m, (o, i) in smol.shapes.items()
    }
    model = strategy.init(GlobalModel(adapter=initial, head={}))
    for ranks in rounds:
        updates = []
        for k, r in enumerate(ranks):
            spec = ClientSpec(client_id=k, rank=r, alpha=2.0 * r)
            payload = strategy.payload(model, spec)
            adapter = {}
            for m, shape in smol.shapes.items():
                f = random_factors(shape, r, scaling_for(r, spec.alpha), gen)
                if not payload.plan.train_A:
                    f = LoraFactors(payload.adapter[m].A, f.B, f.scaling)
                adapter[m] = f
            updates.append(ClientUpdate(client_id=k, adapter=adapter, head={}, num_examples=10 + 5 * k))
        model = strategy.aggregate(model, updates)
    return model


@pytest.mark.parametrize("name", list(PLANS))
def test_every_strategy_loads_saves_and_reloads_a_global_adapter_with_ranks_per_module(smol, name, tmp_path):
    from peft import PeftModel

    assert set(PLANS) | ELSEWHERE == set(strategies.REGISTRY)
    rounds, r_max = PLANS[name]
    lm = smol.lm
    model = run_rounds(smol, name, rounds, r_max, torch.Generator().manual_seed(len(name)))
    load_global(lm, model)
    want = {m: expected_rank(name, shape, rounds, r_max) for m, shape in smol.shapes.items()}
    got = {m: layer(lm, m).lora_A[lm.model.active_adapter].weight.shape[0] for m in lm.modules}
    assert got == want
    if name in ("flora", "flexlora", "raflora"):
        assert {want[m] for m in lm.modules if m.endswith(("k_proj", "v_proj"))} == {GQA_DIM}
        assert min(want[m] for m in lm.modules if m.endswith("q_proj")) > GQA_DIM
    if name == "flora":  # the stack of both merges, re-factorised at 192 where it exceeds k/v's rank: exact
        loaded = read_adapter(lm).adapter
        dense = merged_delta(model)
        for m in ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
            torch.testing.assert_close(delta(loaded[m]), dense[m], rtol=1e-4, atol=1e-6)
    # the server's evaluation is the global update: not the base model's
    server = evaluate(lm, smol.data, 4)
    assert abs(server["perplexity"] / smol.base_ppl - 1) > 1e-4, (server, smol.base_ppl)  # ≫ the 1e-5 below
    # one evaluation adapter at most, besides the default one
    assert set(lm.model.peft_config) <= {"default", "global"}
    assert set(layer(lm, lm.modules[-1]).lora_A) == set(lm.model.peft_config)

    save_adapter(lm, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert {m: cfg["rank_pattern"].get(pattern_key(m), cfg["r"]) for m in lm.modules} == want
    reloaded = PeftModel.from_pretrained(copy.deepcopy(smol.base), tmp_path / "ckpt").eval()
    assert {m: layer_of(reloaded, m).lora_A["default"].weight.shape[0] for m in lm.modules} == want
    for m in lm.modules:
        assert float(layer_of(reloaded, m).scaling["default"]) == pytest.approx(scaling_of(lm, m), rel=1e-12)
    again = evaluate(LoadedModel(reloaded, lm.tokenizer, "causal_lm", torch.device("cpu"), SMOLLM2.max_length, (), ()), smol.data, 4)
    assert again["perplexity"] == pytest.approx(server["perplexity"], rel=1e-5)
    assert again["loss"] == pytest.approx(server["loss"], rel=1e-5)


def test_a_rank_and_scaling_per_layer_survive_the_checkpoint(smol, tmp_path):
    """Layer l's modules get rank l + 1 + (0..6) and their own scaling: the keys for layer 1 must not
    touch layers 10-19 (or 21), in the server's adapter and in the reloaded checkpoint."""
    from peft import PeftModel

    lm = smol.lm
    gen = torch.Generator().manual_seed(11)
    ranks = {m: int(m.split(".")[2]) + 1 + ALL_LINEAR.index(m.rsplit(".", 1)[1]) for m in lm.modules}
    scalings = {m: 0.5 + r / 16 for m, r in ranks.items()}
    load_global(lm, GlobalModel(adapter={m: random_factors(smol.shapes[m], ranks[m], scalings[m], gen) for m in lm.modules}, head={}))
    save_adapter(lm, tmp_path / "ckpt")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(smol.base), tmp_path / "ckpt").eval()
    for peft_model, adapter in ((lm.model, lm.model.active_adapter), (reloaded, "default")):
        assert {m: layer_of(peft_model, m).lora_A[adapter].weight.shape[0] for m in lm.modules} == ranks
        assert {m: layer_of(peft_model, m).scaling[adapter] for m in lm.modules} == pytest.approx(scalings, rel=1e-12)
    server = evaluate(lm, smol.data, 4)
    again = evaluate(LoadedModel(reloaded, lm.tokenizer, "causal_lm", torch.device("cpu"), SMOLLM2.max_length, (), ()), smol.data, 4)
    assert again["loss"] == pytest.approx(server["loss"], rel=1e-5) and abs(server["perplexity"] / smol.base_ppl - 1) > 1e-4


def test_flora_merges_past_a_modules_dimension_apply_to_the_clients_base(smol):
    """A client's base merge (``W += B·A``) of rank 224 > 192 = v_proj's output: dense, any rank."""
    lm = smol.lm
    names = [n for n in lm.modules if n.startswith("model.layers.0.")]
    w0 = {n: layer(lm, n).base_layer.weight.detach().clone() for n in names}
    gen = torch.Generator().manual_seed(5)
    merge = {n: random_factors(smol.shapes[n], 224, 1.0, gen) for n in names}
    try:
        sync_base(lm, 1, {1: merge})
        assert lm.base_version == 1
        for n in names:
            torch.testing.assert_close(layer(lm, n).base_layer.weight - w0[n], delta(merge[n]), rtol=1e-4, atol=1e-6)  # ΔW ~ 2e-3; W + ΔW rounds at W's ulp
    finally:  # W0 again for any test that follows
        with torch.no_grad():
            for n in names:
                layer(lm, n).base_layer.weight.copy_(w0[n])
        lm.base_version = 0

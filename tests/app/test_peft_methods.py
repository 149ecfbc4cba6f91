"""Every PEFT method through one seam (fedpeft/methods): what each trains and sends, FedAvg of its
tensors, and its saved adapter reloading with peft (the registry and the config checks that refuse
a method: tests/unit/test_peft_methods.py).

The federations run in-process (tests/harness.py's AppGrid: the real round loop,
strategies and ClientApp, without Ray), two rounds each; a method's checkpoint of round 2 is
loaded with ``PeftModel.from_pretrained`` on a fresh base model and must evaluate to the metrics
the server logged for that round.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft import methods
from fedpeft.composing import compose
from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.models import ModelError, build, read_adapter, write_adapter

ALL = list(methods.METHODS)  # tests/unit/test_peft_methods.py pins it to the documented list
# What each method trains on MiniLM (query/value at r=4; IA3 adds output.dense), besides the head.
GROUPS = {
    "lora": {"lora_A", "lora_B"}, "rslora": {"lora_A", "lora_B"}, "dora": {"lora_A", "lora_B", "vector"},
    "loha": {"factors"}, "lokr": {"factors"}, "vera": {"vector"}, "ia3": {"vector"},
    "prompt_tuning": {"embeddings"}, "prefix_tuning": {"embeddings"}, "bitfit": {"bias"}, "lora_xs": {"core"},
}
OWN = {"prompt_tuning": ["peft.num_virtual_tokens=4"], "prefix_tuning": ["peft.num_virtual_tokens=4"], "vera": ["peft.vera_rank=16"]}


def small(name: str) -> list[str]:
    """A small model for ``peft=name``, with only the options that method reads (others are refused)."""
    return ["model.rank=4", "model.alpha=8", *OWN.get(name, [])]


@pytest.fixture(scope="module")
def minilm_models():
    cache = {}

    def get(name):
        if name not in cache:
            peft_cfg = PeftConfig(name=name, num_virtual_tokens=4, vera_rank=16)
            cache[name] = build(ModelConfig(rank=4, alpha=8), num_labels=2, device="cpu", seed=0, peft_cfg=peft_cfg)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ALL)
def test_each_method_sends_exactly_its_trainable_tensors_grouped(name, minilm_models):
    lm = minilm_models(name)
    assert set(lm.groups.values()) == GROUPS[name] | {"head"}
    assert {lm.groups[h] for h in lm.head} == (GROUPS[name] - {"lora_A", "lora_B"}) | {"head"}
    g = read_adapter(lm)
    sent = sum(f.A.numel() + f.B.numel() for f in g.adapter.values()) + sum(t.numel() for t in g.head.values())
    assert sent == sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    assert bool(lm.modules) == (name in ("lora", "rslora", "dora"))
    # Written tensors are what the model then holds (through peft's own state-dict functions).
    g2 = {k: torch.randn_like(t) for k, t in g.head.items()}
    write_adapter(lm, g.adapter, g2)
    assert all(torch.equal(read_adapter(lm).head[k], g2[k]) for k in g2)
    write_adapter(lm, g.adapter, g.head)


def test_rslora_scales_by_the_square_root_of_the_rank(minilm_models):
    from fedpeft.models import scaling_of

    assert scaling_of(minilm_models("lora"), minilm_models("lora").modules[0]) == pytest.approx(8 / 4)
    assert scaling_of(minilm_models("rslora"), minilm_models("rslora").modules[0]) == pytest.approx(8 / 2)


def test_a_trainable_tensor_outside_the_methods_groups_is_an_error_naming_it(minilm_models, monkeypatch):
    """DoRA's magnitude read by a method that does not declare it: refused by name, never 'head'."""
    lora = methods.get("lora")
    blind = methods.PeftMethod("dora", methods.get("dora").config, lora.groups, lora_update=True)
    monkeypatch.setitem(methods.METHODS, "dora", blind)
    with pytest.raises(ModelError, match=r"peft=dora: state-dict tensor '.*lora_magnitude_vector' belongs to none of the method's groups"):
        build(ModelConfig(rank=4, alpha=8), num_labels=2, device="cpu", seed=0, peft_cfg=PeftConfig(name="dora"))


def test_a_model_without_bias_terms_refuses_bitfit():
    with pytest.raises(ModelError, match="peft=bitfit: the model has nothing this method trains"):
        model_cfg = ModelConfig(name="smollm2", task="causal_lm", target_modules=["q_proj"], max_length=16)
        build(model_cfg, num_labels=None, device="cpu", seed=0, peft_cfg=PeftConfig(name="bitfit"))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_that_fit_the_models_positions_are_accepted_and_run(method):
    """The preflight's limit is the model's: 448 virtual tokens + 64 fill MiniLM's 512 positions
    and the forward runs; one more is refused (tests/unit/test_cli.py) where the forward would raise."""
    from fedpeft.preflight import check_model

    cfg = compose([f"peft={method}", "peft.num_virtual_tokens=448", "model.max_length=64"])
    check_model(cfg, 4)
    lm = build(ModelConfig(max_length=64), num_labels=4, device="cpu", seed=0, peft_cfg=PeftConfig(name=method, num_virtual_tokens=448))
    ids = torch.randint(1000, 2000, (2, 64))
    assert lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 4)


# --------------------------------------------------------------------------- federations, in-process


def federate(tmp_path, overrides, run_id=7):
    from flwr.app import Context, RecordDict

    from fedpeft.runconfig import RunSpec, to_run_config
    from fedpeft.serverapp import Federation
    from tests.harness import AppGrid

    cfg = compose(overrides)
    rc = to_run_config(cfg, tmp_path, shared_dir=str(tmp_path))
    contexts = {
        100 + i: Context(run_id=run_id, node_id=100 + i, node_config={"partition-id": i, "num-partitions": cfg.clients}, state=RecordDict(), run_config=rc)
        for i in range(cfg.clients)
    }
    fed = Federation(cfg, RunSpec(tmp_path, shared_dir=str(tmp_path)))
    fed.run(AppGrid(contexts))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return fed, rows


def reload_and_evaluate(fed, ckpt, task):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from clients.train import evaluate
    from fedpeft.models import LoadedModel, model_path

    cfg = fed.cfg
    if task == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(model_path(cfg.model.name), num_labels=fed.lm.model.get_base_model().config.num_labels)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path(cfg.model.name), dtype=torch.float32)
    base.config.pad_token_id = fed.lm.tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, ckpt).eval()
    lm = LoadedModel(model, fed.lm.tokenizer, task, torch.device("cpu"), cfg.model.max_length, (), ())
    return evaluate(lm, fed.test, cfg.model.eval_batch_size)


FED = ["clients=3", "min_clients=3", "rounds=2", "model.max_length=32", "train.local_steps=3", "train.batch_size=8",
       "train.lr=1e-2", "data.eval_samples=64", "tracking.mode=disabled", "engine.device=cpu", "partition=dirichlet", "partition.alpha=0.5"]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ALL)
def test_each_method_federates_with_fedavg_and_its_checkpoint_reloads_to_the_logged_accuracy(name, tmp_path):
    fed, rows = federate(tmp_path, [*FED, *small(name), f"peft={name}"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["clients_replied"] == 3 and rows[2]["clients_failed"] == 0
    # FedAvg of every trained tensor: the global tensors moved from their start.
    start = read_adapter(build(fed.cfg.model, num_labels=2, device="cpu", seed=fed.cfg.seed, peft_cfg=fed.cfg.peft))
    moved = [k for k in start.head if not torch.equal(start.head[k], fed.adapter.model.head[k])]
    assert len(moved) == len(start.head), set(start.head) - set(moved)
    m = reload_and_evaluate(fed, tmp_path / "adapters" / "round_002", "classification")
    assert m["accuracy"] == pytest.approx(rows[2]["accuracy"], abs=1e-9)
    assert m["loss"] == pytest.approx(rows[2]["loss"], rel=1e-4)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["dora", "ia3", "prefix_tuning"])
def test_causal_lm_methods_federate_and_reload_to_the_logged_perplexity(name, tmp_path):
    fed, rows = federate(tmp_path, [*FED[:-2], *small(name), "+preset=shakespeare", "clients=3", "min_clients=3", "fraction=1.0",
                                    "model.target_modules=[q_proj,v_proj]", "model.max_length=24", "train.local_steps=2", "train.batch_size=4",
                                    "data.eval_samples=16", "model.eval_batch_size=8", f"peft={name}"])
    assert rows[2]["loss"] < rows[0]["loss"], rows
    m = reload_and_evaluate(fed, tmp_path / "adapters" / "round_002", "causal_lm")
    assert m["loss"] == pytest.approx(rows[2]["loss"], rel=1e-4)


@pytest.mark.usefixtures("task_identity")
def test_dora_with_heterogeneous_ranks_averages_its_magnitude_like_fedavg(tmp_path):
    """HetLoRA takes DoRA: the factors are zero-padded and aggregated, the magnitude averaged."""
    fed, rows = federate(tmp_path, [*FED, *small("dora"), "strategy=hetlora", "ranks=flora", "ranks.levels=[4,2,2]", "peft=dora"])
    assert rows[2]["clients_replied"] == 3
    mags = [k for k, g in fed.lm.groups.items() if g == "vector"]
    assert mags and all(k in fed.adapter.model.head for k in mags)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["prefix_tuning", "bitfit"])
def test_sample_level_dp_trains_the_methods_opacus_supports(name, tmp_path):
    fed, rows = federate(tmp_path, [*FED, *small(name), f"peft={name}", "privacy=sample", "privacy.noise_multiplier=0.5"])
    assert rows[2]["clients_replied"] == 3 and rows[2]["epsilon"] > 0


@pytest.mark.usefixtures("task_identity")
def test_local_dp_noises_a_non_lora_methods_update(tmp_path):
    fed, rows = federate(tmp_path, [*FED, *small("ia3"), "peft=ia3", "privacy=local", "privacy.noise_multiplier=0.5", "privacy.clip=0.5"])
    assert rows[2]["clients_replied"] == 3 and rows[2]["epsilon"] > 0


# --------------------------------------------------------------------------- Fed-SB (LoRA-XS's core)


def test_averaging_lora_xs_cores_is_the_average_update_exactly():
    """Fed-SB's defining property on peft's own layers: with A₀, B₀ frozen and shared, averaging the
    trained coordinates v (R = Σ v_i P_i) gives ΔW = Σ p_k B₀ R_k A₀ exactly; FedAvg does it."""
    from fedpeft.models import layer
    from strategies import FedSB
    from strategies.base import ClientUpdate, GlobalModel

    lm = build(ModelConfig(rank=4, alpha=8), num_labels=2, device="cpu", seed=0, peft_cfg=PeftConfig(name="lora_xs"))
    assert {lm.groups[h] for h in lm.head} == {"core", "head"}
    cores = [h for h in lm.head if lm.groups[h] == "core"]
    assert all(read_adapter(lm).head[h].numel() == 16 for h in cores)  # r² coordinates per module
    g = torch.Generator().manual_seed(0)
    start = read_adapter(lm)
    updates, deltas = [], []
    modules = [n[: -len(".weight")] for n, _ in lm.model.base_model.model.named_parameters() if n.endswith("attention.self.query.base_layer.weight")]
    for k, n in enumerate((30, 50, 20)):
        head = {h: torch.randn(t.shape, generator=g, dtype=t.dtype) for h, t in start.head.items()}
        write_adapter(lm, {}, head)
        deltas.append({m: layer(lm, m[: -len(".base_layer")]).get_delta_weight("default").double() for m in modules})
        updates.append(ClientUpdate(client_id=k, adapter={}, head=head, num_examples=n))
    avg = FedSB().aggregate(GlobalModel(adapter={}, head=start.head), updates)
    write_adapter(lm, {}, avg.head)
    p = [0.3, 0.5, 0.2]
    for m in modules:
        want = sum(pk * d[m] for pk, d in zip(p, deltas))
        got = layer(lm, m[: -len(".base_layer")]).get_delta_weight("default").double()
        assert float((got - want).norm()) <= 1e-5 * float(want.norm()), m
    # What travels per module: r² = 16 numbers (LoRA: r·(in + out) = 3,072).
    assert sum(start.head[h].numel() for h in cores) == 12 * 16


@pytest.mark.usefixtures("task_identity")
def test_fed_sb_federates_and_sends_only_the_cores_and_the_head(tmp_path):
    fed, rows = federate(tmp_path / "sb", [*FED, "model.rank=4", "model.alpha=8", "strategy=fed_sb"])
    lora, lrows = federate(tmp_path / "lora", [*FED, "model.rank=4", "model.alpha=8"])
    assert fed.cfg.peft.name == "lora_xs" and rows[2]["clients_replied"] == 3
    tensors = 4 * (12 * 16 + 770)  # float32: 12 cores of r² = 16, the head
    per_client = rows[2]["bytes_up"] / 3
    assert tensors < per_client < tensors + 14 * 200, per_client  # + each array's .npy header and key
    assert lrows[2]["bytes_up"] / rows[2]["bytes_up"] > 10  # LoRA at r=4 sends 37,634 numbers a client
    m = reload_and_evaluate(fed, tmp_path / "sb" / "adapters" / "round_002", "classification")
    assert m["accuracy"] == pytest.approx(rows[2]["accuracy"], abs=1e-9)


@pytest.mark.usefixtures("task_identity")
def test_runs_record_their_trained_parameters_and_compare_shows_them(tmp_path):
    from fedpeft import compare

    counts = {}
    for name in ("ia3", "prompt_tuning"):
        fed, _ = federate(tmp_path / name, [*FED, *small(name), "rounds=1", f"peft={name}"])
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        counts[name] = sum(p.numel() for p in fed.lm.model.parameters() if p.requires_grad)
        assert summary["peft"] == name and summary["trainable_params"] == counts[name]
        assert sum(summary["trainable_by_group"].values()) == counts[name] and "head" in summary["trainable_by_group"]
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "trained params" in md and f"{counts['ia3']:,}" in md and f"{counts['prompt_tuning']:,}" in md

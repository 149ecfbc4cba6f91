"""A client's local training and the model plumbing, in-process (no Flower, no Ray)."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from clients import app as client_app
from clients.train import TrainSettings, batch_order, evaluate, train
from fedpeft import data as fdata
from fedpeft.config import ModelConfig, schema
from fedpeft.lora import LoraFactors
from fedpeft.models import ModelError, build, read_adapter, write_adapter
from strategies.base import Payload

MODEL = SimpleNamespace(name="minilm", task="classification", target_modules=["query", "value"], rank=4, alpha=8.0, dropout=0.0, max_length=48)


@pytest.fixture(scope="module")
def tweets():
    return fdata.load("election_tweets", seed=0)


@pytest.fixture(scope="module")
def lm(tweets):
    torch.set_num_threads(2)
    return build(MODEL, num_labels=len(fdata.label_names(tweets)), device="cpu", seed=0)


def test_read_write_adapter_round_trip_and_shape_errors(lm):
    g = read_adapter(lm)
    assert len(g.adapter) == 12 and set(g.head) == {"classifier.weight", "classifier.bias"}
    f = next(iter(g.adapter.values()))
    assert f.A.shape == (4, 384) and f.B.shape == (384, 4) and f.scaling == 2.0
    assert torch.count_nonzero(f.B) == 0  # peft's init: B = 0
    changed = {m: LoraFactors(x.A + 1.0, x.B + 2.0, x.scaling) for m, x in g.adapter.items()}
    write_adapter(lm, changed, g.head)
    back = read_adapter(lm)
    for m in g.adapter:
        assert torch.equal(back.adapter[m].A, changed[m].A) and torch.equal(back.adapter[m].B, changed[m].B)
    name = next(iter(g.adapter))
    bad = dict(g.adapter)
    bad[name] = LoraFactors(torch.zeros(5, 384), torch.zeros(384, 5), 2.0)
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        write_adapter(lm, bad, g.head)
    write_adapter(lm, g.adapter, g.head)


def test_local_training_lowers_the_loss_and_moves_only_the_adapter(lm, tweets):
    part = tweets["train"].shuffle(seed=1).select(range(256))
    g = read_adapter(lm)
    write_adapter(lm, g.adapter, g.head)
    before = evaluate(lm, part, 128)
    base = lm.model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query").base_layer.weight.clone()
    settings = TrainSettings(local_steps=25, batch_size=16, lr=2e-3)
    update, metrics = train(lm, Payload(g.adapter, g.head), part, settings, seed=7, client_id=3)
    after = evaluate(lm, part, 128)
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert update.num_examples == 256 and update.client_id == 3
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert torch.equal(base, lm.model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query").base_layer.weight)
    moved = [m for m in g.adapter if not torch.equal(update.adapter[m].B, g.adapter[m].B)]
    assert len(moved) == len(g.adapter)
    # The same seed and payload reproduce the same update (what a cohort executor must match).
    again, _ = train(lm, Payload(g.adapter, g.head), part, settings, seed=7, client_id=3)
    for m in g.adapter:
        torch.testing.assert_close(again.adapter[m].B, update.adapter[m].B)


def test_worker_caches_one_model_and_rebuilds_when_reuse_is_off(monkeypatch, tweets):
    builds = []
    real_build = client_app.build

    def counting_build(*a, **k):
        builds.append(1)
        return real_build(*a, **k)

    monkeypatch.setattr(client_app, "build", counting_build)
    monkeypatch.setattr(client_app, "_MODELS", {})
    base = schema()  # the typed config a ClientApp gets (fedpeft.runconfig.settings)
    settings = replace(base, model=ModelConfig(**vars(MODEL)), engine=replace(base.engine, device="cpu", reuse_model=True), seed=0)
    m1 = client_app.get_model(settings, 2)
    m2 = client_app.get_model(settings, 2)
    assert m1 is m2 and len(builds) == 1
    m3 = client_app.get_model(replace(settings, engine=replace(settings.engine, reuse_model=False)), 2)
    assert m3 is not m1 and len(builds) == 2


def test_smollm2_causal_lm_on_a_shakespeare_role_lowers_perplexity():
    """The second model family: SmolLM2-135M (from GGUF) with LoRA as a causal LM, one role's speeches."""
    ds = fdata.load("shakespeare", seed=0)
    p = fdata.partition(ds["train"], "natural", 3)
    role = p.load_partition(0)
    assert len(set(role["group"])) == 1
    cfg = SimpleNamespace(name="smollm2", task="causal_lm", target_modules=["q_proj", "v_proj"], rank=4, alpha=8.0, dropout=0.0, max_length=32)
    lm = build(cfg, num_labels=None, device="cpu", seed=0)
    assert len(lm.modules) == 2 * 30 and lm.head == ()
    few = role.select(range(16))
    g = read_adapter(lm)
    before = evaluate(lm, few, 8)
    update, metrics = train(lm, Payload(g.adapter, g.head), few, TrainSettings(local_steps=6, batch_size=8, lr=3e-3), seed=0, client_id=0)
    after = evaluate(lm, few, 8)
    assert after["perplexity"] < 0.9 * before["perplexity"], (before, after)
    assert before["perplexity"] < 1000  # a pretrained LM: a random one scores about its vocabulary size, 49,152


def test_sgd_takes_exactly_the_step_lr_times_the_gradient(lm, tweets):
    """``train.optimizer=sgd``: one local step moves every trained tensor by ``-lr · grad`` of that
    step's batch (the batch ``batch_order`` gives), where AdamW moves it by about ``lr`` per entry."""
    from clients.train import encode

    part = tweets["train"].shuffle(seed=3).select(range(32))
    g = read_adapter(lm)
    start = {m: LoraFactors(f.A, torch.randn(f.B.shape, generator=torch.Generator().manual_seed(1)) * 0.01, f.scaling) for m, f in g.adapter.items()}
    write_adapter(lm, start, g.head)
    (idx,) = list(batch_order(len(part), 1, 8, seed=5))
    lm.model.zero_grad(set_to_none=True)
    lm.model.train()  # the base model's own dropout draws from torch's RNG, seeded as train() seeds it
    with torch.random.fork_rng():
        torch.manual_seed(5)
        lm.model(**encode(lm, part[idx])).loss.backward()
    lm.model.eval()
    name = next(iter(start))
    lay = lm.model.get_submodule("base_model.model." + name)
    grad_B = lay.lora_B["default"].weight.grad.clone()
    grad_head = lm.model.get_submodule("base_model.model.classifier").modules_to_save["default"].weight.grad.clone()
    lm.model.zero_grad(set_to_none=True)
    lr = 0.5
    sgd, _ = train(lm, Payload(start, g.head), part, TrainSettings(1, 8, lr, optimizer="sgd"), seed=5, client_id=0)
    torch.testing.assert_close(sgd.adapter[name].B, start[name].B - lr * grad_B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sgd.head["classifier.weight"], g.head["classifier.weight"] - lr * grad_head, rtol=1e-5, atol=1e-6)
    adam, _ = train(lm, Payload(start, g.head), part, TrainSettings(1, 8, 1e-3), seed=5, client_id=0)
    moved = (adam.adapter[name].B - start[name].B).abs()
    # Adam's first step is lr·g/(|g| + eps): about lr for every entry, whatever its gradient's size.
    assert moved.max() <= 1e-3 * (1 + 1e-5) and moved.median() > 0.9e-3
    write_adapter(lm, g.adapter, g.head)

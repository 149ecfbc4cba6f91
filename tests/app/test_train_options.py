"""The training options (``train.grad_accum_steps``, ``max_grad_norm``, ``gradient_checkpointing``,
``lr_schedule``) in the per-client engine and the cohort engine, DP-SGD's logical batch, and a
client that runs out of memory, in-process. Tiny models (MiniLM at 16 tokens, a two-layer random
Llama), a few steps."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import opacus
import pytest
import torch
from omegaconf import OmegaConf

import clients.train as ctrain
from clients.cohort import CohortError, CohortJob, train_cohort
from clients.train import ClientOutOfMemory, DPSettings, TrainSettings, sample_rate, train
from fedpeft.models import build, use_adapter
from fedpeft.plan import ClientPlan, Payload
from fedpeft.schedule import lr_at
from tests.app.test_cohort import MAXLEN, MINILM, causal_rows, check, full_rows, parts, random_adapter, random_head
from tests.harness import dropout_off, federate, save_tiny_llama

SGD = TrainSettings(local_steps=2, batch_size=4, lr=0.5, optimizer="sgd")
ADAMW = TrainSettings(local_steps=2, batch_size=4, lr=3e-3, weight_decay=0.01)


@pytest.fixture(scope="module")
def tweets():
    from fedpeft import data as fdata

    return fdata.load("election_tweets", seed=0)["train"].shuffle(seed=3).select(range(400))


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return dropout_off(build(MINILM, num_labels=2, device="cpu", seed=0))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A two-layer random Llama with SmolLM2's tokenizer, as in tests/app/test_cohort.py."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from fedpeft.models import converted_dir

    if not (converted_dir() / "tokenizer_config.json").exists():
        pytest.skip("SmolLM2's converted checkpoint (its tokenizer) is not cached")
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), AutoTokenizer.from_pretrained(converted_dir()))
    spec = SimpleNamespace(name=str(path), task="causal_lm", target_modules=["q_proj", "v_proj"], rank=4, alpha=8.0, dropout=0.0, max_length=MAXLEN)
    return dropout_off(build(spec, num_labels=None, device="cpu", seed=0))


@pytest.fixture(scope="module")
def full(tweets, minilm):
    return full_rows(tweets, minilm.tokenizer)


def flat(update) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for f in update.adapter.values() for t in (f.A, f.B)] + [t.reshape(-1) for t in update.head.values()])


def rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


def one(lm, payload, data, settings, seed=5, dp=None):
    use_adapter(lm, 4, 8.0)
    return train(lm, payload, data, settings, seed=seed, client_id=0, dp=dp)


def test_accumulating_two_batches_of_4_is_one_batch_of_8(minilm, full):
    """Full rows (no padding), mean cross-entropy per example, plain SGD: G=2 batches of 4 (each
    loss divided by 2) take the same steps as batches of 8 drawn from the same permutation."""
    data = full.select(range(16))
    payload = Payload(random_adapter(minilm, 4, 8.0, 1), random_head(minilm, 2))
    accumulated, m = one(minilm, payload, data, replace(SGD, grad_accum_steps=2))
    big, mbig = one(minilm, payload, data, replace(SGD, batch_size=8))
    small, _ = one(minilm, payload, data, SGD)
    start = flat(ctrain.ClientUpdate(0, payload.adapter, payload.head, 1))
    assert rel(flat(accumulated) - start, flat(big) - start) < 1e-4
    assert rel(flat(small) - start, flat(big) - start) > 1e-2  # the batches of 4 alone move elsewhere
    assert m["train_loss_first"] == pytest.approx(mbig["train_loss_first"], rel=1e-5)  # a step's loss: the mean of its batches'


def test_max_grad_norm_bounds_each_step_and_a_loose_one_changes_nothing(minilm, full):
    data = full.select(range(8))
    payload = Payload(random_adapter(minilm, 4, 8.0, 3), random_head(minilm, 4))
    start = flat(ctrain.ClientUpdate(0, payload.adapter, payload.head, 1))
    step = replace(SGD, local_steps=1, lr=1.0)
    clipped, _ = one(minilm, payload, data, replace(step, max_grad_norm=1e-3))
    assert float((flat(clipped) - start).norm()) == pytest.approx(1e-3, rel=1e-3)  # SGD at lr 1: the step is the clipped gradient
    free, _ = one(minilm, payload, data, step)
    loose, _ = one(minilm, payload, data, replace(step, max_grad_norm=1e6))
    assert float((flat(free) - start).norm()) > 1e-2
    assert torch.equal(flat(free), flat(loose))


def test_gradient_checkpointing_gives_the_same_update(tiny_llama, tweets):
    lm = tiny_llama
    data = causal_rows(tweets, 8, 0)
    payload = Payload(random_adapter(lm, 4, 8.0, 5), {})
    plain, _ = one(lm, payload, data, ADAMW)
    assert not lm.model.get_base_model().is_activation_checkpointing
    ckpt, _ = one(lm, payload, data, replace(ADAMW, gradient_checkpointing=True))
    assert lm.model.get_base_model().is_activation_checkpointing  # kept on the cached model until a call asks otherwise
    assert rel(flat(ckpt), flat(plain)) < 1e-5
    one(lm, payload, data, ADAMW)
    assert not lm.model.get_base_model().is_activation_checkpointing


def test_cohort_engine_honours_accumulation_clipping_and_checkpointing(tiny_llama, minilm, full, tweets):
    """Each client's update in a cohort equals its update alone, with G=2, a clip that binds
    (each client's own norm over its slices: heterogeneous ranks, a fresh init, a head) and
    checkpointing on."""
    settings = replace(ADAMW, grad_accum_steps=2, max_grad_norm=0.05, gradient_checkpointing=True)
    head = random_head(minilm, 1)
    data = parts(full, [12, 9, 7])
    jobs = [CohortJob(Payload(random_adapter(minilm, r, 8.0, 10 + k, b_scale=0.2), head), data[k], seed=100 + k, client_id=k)
            for k, r in enumerate((4, 4, 2))]
    check(minilm, jobs, settings)
    lm = tiny_llama
    spec = [(8, 16.0), (4, 4.0)]
    jobs = [CohortJob(Payload({}, {}, ClientPlan(init_seed=7)) if k else Payload(random_adapter(lm, r, a, 30, b_scale=0.2), {}),
                      causal_rows(tweets, 8, 20 * k), seed=50 + k, client_id=k, rank=r, alpha=a) for k, (r, a) in enumerate(spec)]
    check(lm, jobs, settings)
    for p in lm.model.parameters():  # the clip binds: without it the updates differ
        p.grad = None
    free = train_cohort(lm, jobs, replace(settings, max_grad_norm=None))
    clipped = train_cohort(lm, jobs, settings)
    assert rel(flat(clipped[0][0]), flat(free[0][0])) > 1e-4
    train_cohort(lm, jobs, ADAMW)  # checkpointing off again for the module's other tests


def test_dp_sgd_accumulates_the_logical_batch(minilm, tweets, tiny_llama, monkeypatch):
    """DP-SGD with G=2: Poisson batches at the logical batch's rate (what the accountant takes),
    every example clipped, noise once per logical step. For classification (a per-example loss) it
    equals one physical batch of 2x the size, noise included; the cohort engine agrees on a causal
    LM, whose per-example gradients depend on the chunks."""
    data = full_rows(tweets, minilm.tokenizer).select(range(40))
    payload = Payload(random_adapter(minilm, 4, 8.0, 9, b_scale=0.1), random_head(minilm, 9))
    rates = []
    make_private = opacus.PrivacyEngine.make_private

    def spy(self, **kw):
        out = make_private(self, **kw)
        rates.append(out[2].sample_rate)
        return out

    monkeypatch.setattr(opacus.PrivacyEngine, "make_private", spy)
    dp = DPSettings(noise_multiplier=0.5, max_grad_norm=0.05)
    settings = TrainSettings(local_steps=3, batch_size=4, lr=3e-3, grad_accum_steps=2)
    accumulated, _ = one(minilm, payload, data, settings, dp=dp)
    big, _ = one(minilm, payload, data, replace(settings, batch_size=8, grad_accum_steps=1), dp=dp)
    assert rates == [sample_rate(40, 8)] * 2 == [1 / 5] * 2
    assert rel(flat(accumulated), flat(big)) < 1e-5
    monkeypatch.undo()
    lm = tiny_llama
    jobs = [CohortJob(Payload(random_adapter(lm, r, 8.0, 70 + k, b_scale=0.1), {}), causal_rows(tweets, n, 40 * k), seed=700 + k, client_id=k,
                      rank=r, alpha=8.0, dp=DPSettings(0.5, 0.05)) for k, (r, n) in enumerate([(8, 12), (4, 9)])]
    check(lm, jobs, TrainSettings(local_steps=2, batch_size=2, lr=3e-3, grad_accum_steps=3))


def test_the_accountant_takes_the_logical_batch():
    from fedpeft.preflight import privacy_plan

    class Parts:
        def load_partition(self, i):
            return type("P", (), {"num_rows": 100 + 10 * i})()

    cfg = OmegaConf.create({"seed": 0, "clients": 3, "rounds": 2, "fraction": 1.0, "min_clients": 1,
                            "train": {"batch_size": 4, "grad_accum_steps": 5, "local_steps": 3},
                            "privacy": {"mode": "sample", "noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5, "target_epsilon": None}})
    plan = privacy_plan(cfg, Parts(), personalized=False)
    assert plan.sample_rate == sample_rate(100, 20) == 1 / 5 and plan.steps_per_round == 3


def test_combinations_no_engine_trains_are_refused_in_one_line(minilm, full):
    payload = Payload(random_adapter(minilm, 4, 8.0, 1), random_head(minilm, 1))
    dp = DPSettings(1.0, 0.1)
    with pytest.raises(ValueError, match=r"^train\.gradient_checkpointing: Opacus"):
        one(minilm, payload, full.select(range(8)), replace(SGD, gradient_checkpointing=True), dp=dp)
    with pytest.raises(ValueError, match=r"^train\.max_grad_norm: privacy\.mode=sample"):
        one(minilm, payload, full.select(range(8)), replace(SGD, max_grad_norm=1.0), dp=dp)
    with pytest.raises(CohortError, match=r"^train\.gradient_checkpointing: Opacus"):
        train_cohort(minilm, [CohortJob(payload, full.select(range(8)), 0, 0, dp=dp)], replace(SGD, gradient_checkpointing=True))
    drop = next(m for m in minilm.model.modules() if isinstance(m, torch.nn.Dropout))
    drop.p = 0.1
    try:
        with pytest.raises(CohortError, match=r"^train\.gradient_checkpointing: the cohort engine draws each client's dropout masks"):
            train_cohort(minilm, [CohortJob(payload, full.select(range(8)), 0, 0)], replace(SGD, gradient_checkpointing=True))
    finally:
        drop.p = 0.0


def test_out_of_memory_fails_the_client_alone_in_one_line_and_leaves_the_worker_clean(minilm, full, monkeypatch):
    payload = Payload(random_adapter(minilm, 4, 8.0, 1), random_head(minilm, 1))
    data = full.select(range(8))
    steps = ctrain._steps

    def oom(lm, opt, *a, **kw):
        loss = lm.model(**ctrain.encode(lm, a[0][:4])).loss
        loss.backward()  # gradients on the model, as a real failure midway leaves them
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ctrain, "_steps", oom)
    with pytest.raises(ClientOutOfMemory) as e:
        one(minilm, payload, data, SGD)
    line = str(e.value)
    assert "\n" not in line and line.startswith("client 0: out of memory training rank 4, train.batch_size=4 x model.max_length=16 tokens")
    assert "float32 base, gradient checkpointing off" in line
    assert "train.batch_size=2 with train.grad_accum_steps=2" in line and "model.quantization=4bit" in line
    assert all(p.grad is None for p in minilm.model.parameters())
    monkeypatch.setattr(ctrain, "_steps", steps)
    after, _ = one(minilm, payload, data, SGD)  # the worker trains its next client as if nothing happened
    fresh, _ = one(minilm, payload, data, SGD)
    assert torch.equal(flat(after), flat(fresh))


def test_a_federation_schedules_the_lr_and_goes_on_past_a_client_out_of_memory(tmp_path, task_identity, monkeypatch, caplog):
    """cosine over 3 rounds: every client trains at the round's lr (sent by the server), which the
    metrics rows record; client 1 runs out of memory in round 2, fails alone with its plan, and the
    round is applied with the other client's update."""
    seen: list[tuple[int, float]] = []
    calls = {0: 0, 1: 0}
    steps = ctrain._steps

    def spy(lm, opt, data, settings, seed, client_id, extra):
        seen.append((client_id, settings.lr))
        calls[client_id] += 1
        if client_id == 1 and calls[1] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return steps(lm, opt, data, settings, seed, client_id, extra)

    monkeypatch.setattr(ctrain, "_steps", spy)
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        federate(tmp_path, "rounds=3", "clients=2", "train.local_steps=1", "train.batch_size=4", "min_clients=1",
                 "model.max_length=16", "data.eval_samples=32", "train.lr_schedule=cosine", "train.lr=0.01", "train.lr_min=0.001")
    want = [lr_at(r, 3, 0.01, 0.001, "cosine") for r in (1, 2, 3)]
    assert want[0] < 0.01 and want[2] == pytest.approx(0.001)  # FlowerTune's: round 1 already annealed, the last at lr_min
    assert [lr for _, lr in sorted(seen, key=lambda x: x[0])][:3] == pytest.approx(want)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["round"] > 0] == pytest.approx(want)
    r2 = next(r for r in rows if r["round"] == 2)
    assert r2["clients_failed"] == 1 and r2["clients_replied"] == 1 and r2["round_applied"] == 1
    failed = [m for m in caplog.messages if "out of memory" in m]
    assert len(failed) == 1 and "client 1: out of memory training rank 4, train.batch_size=4 x model.max_length=16 tokens" in failed[0]
    assert "round 2" in failed[0]

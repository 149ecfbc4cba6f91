"""FeDeRA and RoLoRA on the real MiniLM, in-process (no Ray): FeDeRA's init keeps the forward pass,
and ``freeze_B`` trains A alone (the strategies on random tensors: tests/unit/test_exact_strategies.py)."""

import pytest
import torch

from fedpeft.lora import LoraFactors, delta
from fedpeft.plan import ClientPlan
from strategies.base import GlobalModel
from strategies.federa import FeDeRA

# ---------------------------------------------------------------- FeDeRA


def test_federa_init_on_minilm_keeps_the_forward_pass():
    """On the real model: base weights W − s B₀A₀ (the merge applied as clients apply it) with the
    adapter at (A₀, B₀) give the base model's logits."""
    from types import SimpleNamespace

    from fedpeft.models import apply_merge, layer, read_adapter, write_adapter
    from fedpeft.models import build as build_model

    torch.set_num_threads(2)
    lm = build_model(SimpleNamespace(name="minilm", task="classification", target_modules=["query", "value"], rank=4, alpha=8.0, dropout=0.0, max_length=32),
                     num_labels=2, device="cpu", seed=0)
    batch = lm.tokenizer(["the vote count was fair", "polls close at eight tonight, officials said"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = lm.model(**batch).logits  # B = 0: the base model
    start = read_adapter(lm)
    g = FeDeRA().init(start, base_weights={m: layer(lm, m).base_layer.weight.detach() for m in lm.modules})
    apply_merge(lm, g.merges[0])
    write_adapter(lm, g.adapter, start.head)
    with torch.no_grad():
        after = lm.model(**batch).logits
    assert max(delta(f).abs().max().item() for f in g.adapter.values()) > 0.1  # the init is not small
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- the client: freeze_B


@pytest.fixture(scope="module")
def minilm_and_data():
    from types import SimpleNamespace

    from fedpeft import data as fdata
    from fedpeft.models import build as build_model
    from fedpeft.models import read_adapter

    torch.set_num_threads(2)
    lm = build_model(SimpleNamespace(name="minilm", task="classification", target_modules=["query", "value"], rank=4, alpha=8.0, dropout=0.0, max_length=32),
                     num_labels=2, device="cpu", seed=0)
    start = read_adapter(lm)
    g = torch.Generator().manual_seed(0)
    adapter = {m: LoraFactors(f.A, 0.05 * torch.randn(f.B.shape, generator=g), f.scaling) for m, f in start.adapter.items()}  # B ≠ 0: A has a gradient
    return lm, GlobalModel(adapter, start.head), fdata.load("rotten_tomatoes", seed=0)["train"].shuffle(seed=2).select(range(48))


@pytest.mark.parametrize("dp", [False, True])
def test_freeze_B_trains_A_alone_also_under_dp_sgd(minilm_and_data, dp):
    from clients.train import DPSettings, TrainSettings, train
    from strategies.base import Payload

    lm, start, part = minilm_and_data
    payload = Payload(adapter=start.adapter, head=start.head, plan=ClientPlan(train_B=False))
    u, _ = train(lm, payload, part, TrainSettings(local_steps=2, batch_size=8, lr=3e-3), seed=1, client_id=0, dp=DPSettings(1.0, 1.0) if dp else None)
    for m, f in start.adapter.items():
        assert torch.equal(u.adapter[m].B, f.B)
        assert not torch.equal(u.adapter[m].A, f.A)
    assert all(p.requires_grad for n, p in lm.model.named_parameters() if "lora_" in n)  # unfrozen afterwards
    with pytest.raises(ValueError, match="no LoRA factor to train"):  # no such plan, so no such training
        ClientPlan(train_A=False, train_B=False)


def test_the_cohort_engine_refuses_freeze_B(minilm_and_data):
    from clients.cohort import CohortError, CohortJob, train_cohort
    from clients.train import TrainSettings
    from strategies.base import Payload

    lm, start, part = minilm_and_data
    job = CohortJob(Payload(adapter=start.adapter, head=start.head, plan=ClientPlan(train_B=False)), part, 1, 0, 4, 8.0, None)
    with pytest.raises(CohortError, match="freeze_B"):
        train_cohort(lm, [job], TrainSettings(local_steps=1, batch_size=8, lr=3e-3))

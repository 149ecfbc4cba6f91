"""FedEx-LoRA, RoLoRA and FeDeRA end to end: one small federation each on Flower's simulation
engine with Ray (3 clients on Dirichlet label skew, 2 rounds, 3 local steps), asserting on numbers."""

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.lora import delta
from tests.harness import simulate

pytestmark = pytest.mark.slow

RUN = ["clients=3", "rounds=2", "partition=dirichlet", "train.local_steps=3", "train.batch_size=8", "data.eval_samples=64", "tracking.mode=disabled"]


def checkpoint(run_dir, rnd):
    """Module → (A, B, scaling) of a saved round's peft adapter."""
    import json

    path = run_dir / "adapters" / f"round_{rnd:03d}"
    t = load_file(str(path / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            m = k[len("base_model.model."):-len(".lora_A.weight")]
            out[m] = (t[k], t[k.replace("lora_A", "lora_B")], cfg["lora_alpha"] / cfg["r"])
    return out


def recording(monkeypatch, cls):
    """Record every (model before, updates, model after) of ``cls.aggregate`` (the server runs in this process)."""
    seen = []
    original = cls.aggregate

    def aggregate(self, model, updates):
        out = original(self, model, updates)
        seen.append((model, updates, out))
        return out

    monkeypatch.setattr(cls, "aggregate", aggregate)
    return seen


def test_fedex_lora_global_update_is_the_average_of_the_clients_updates(tmp_path, monkeypatch):
    """Each round: the new merge plus s B̄ Ā equals Σ_k p_k s B_k A_k (p_k the clients' data shares);
    the saved round-2 adapter is the sum of both rounds' average updates (to float32 rounding)."""
    from strategies.fedex_lora import FedExLoRA

    seen = recording(monkeypatch, FedExLoRA)
    cfg, summary = simulate(tmp_path, "strategy=fedex_lora", *RUN)
    assert summary["status"] == "finished" and len(seen) == 2
    total = {}
    for t, (before, updates, after) in enumerate(seen, start=1):
        assert len(updates) == 3 and after.version == t == len(after.merges)
        n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        p = (n / n.sum()).tolist()
        assert len(set(u.num_examples for u in updates)) > 1  # Dirichlet: unequal shares
        for m, g in after.adapter.items():
            average = sum(pk * delta(u.adapter[m]).double() for u, pk in zip(updates, p))
            merge = after.merges[-1][m]
            got = delta(merge).double() + delta(g).double()
            assert merge.rank == 2 * 4  # (K − 1)·r
            torch.testing.assert_close(got, average, rtol=0, atol=1e-6 * average.abs().max().item())
            start = delta(before.adapter[m]).double()
            total[m] = total.get(m, 0) + average - start  # this round's average update, from the start every client had
        assert all(not torch.equal(u.adapter[m].A, updates[0].adapter[m].A) for u in updates[1:] for m in after.adapter)
    saved = checkpoint(tmp_path / "run", 2)
    assert saved.keys() == total.keys()
    for m, (A, B, s) in saved.items():
        torch.testing.assert_close(s * B.double() @ A.double(), total[m], rtol=0, atol=1e-5 * total[m].abs().max().item())
    assert summary["history"][2]["factor_avg_error"] > 0


def test_rolora_round_1_trains_only_B_and_round_2_only_A(tmp_path):
    """peft's start has B = 0, so RoLoRA's odd rounds train B (``strategy.first=B``): the saved
    global adapter's A is bit for bit unchanged by round 1 and its B by round 2."""
    cfg, summary = simulate(tmp_path, "strategy=rolora", *RUN)
    assert summary["status"] == "finished"
    r0, r1, r2 = (checkpoint(tmp_path / "run", r) for r in (0, 1, 2))
    for m in r0:
        assert torch.equal(r1[m][0], r0[m][0]) and not torch.equal(r1[m][1], r0[m][1])  # round 1: B moved, A did not
        assert torch.equal(r2[m][1], r1[m][1]) and not torch.equal(r2[m][0], r1[m][0])  # round 2: A moved, B did not
    assert not r0[next(iter(r0))][1].any()  # the start: B = 0
    h = summary["history"]
    assert [r["clients_replied"] for r in h[1:]] == [3, 3] and h[2]["loss"] != h[1]["loss"]
    # the uplink carries one factor: B (768 × 4) in round 1 and A (4 × 384) in round 2 per module, plus the head
    assert h[1]["bytes_up"] < h[1]["bytes_down"] and h[2]["bytes_up"] < h[2]["bytes_down"]
    # one factor trains a round: each counts half of its 12 modules × 4 × 384 parameters
    assert (summary["trainable_by_group"]["lora_A"], summary["trainable_by_group"]["lora_B"]) == (12 * 4 * 384 // 2, 12 * 4 * 384 // 2)


def test_federa_round_0_is_the_base_model_and_training_moves_it(tmp_path):
    """The SVD init with the residual base computes the pre-trained model's function: round 0's
    accuracy is plain LoRA's (B = 0) and its loss agrees to float32 rounding; the saved round-0
    adapter (merge + init, stacked) is ΔW ≈ 0 while its factors are not small."""
    from clients.train import evaluate
    from fedpeft.models import build, use_adapter
    from fedpeft.preflight import prepare_data

    cfg, summary = simulate(tmp_path, "strategy=federa", *RUN)
    assert summary["status"] == "finished"
    _, _, test, num_labels = prepare_data(cfg)
    torch.set_num_threads(2)
    lm = build(cfg.model, num_labels=num_labels, device="cpu", seed=cfg.seed)
    use_adapter(lm, cfg.model.rank, cfg.model.alpha)
    plain = evaluate(lm, test, cfg.model.eval_batch_size)  # plain LoRA's round 0: the base model
    h = summary["history"]
    assert h[0]["accuracy"] == plain["accuracy"]
    assert h[0]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for _m, (A, B, s) in checkpoint(tmp_path / "run", 0).items():
        assert A.shape[0] == 2 * cfg.model.rank and B.abs().max() > 0.1  # [merge | init], scaling 1
        assert (s * B.double() @ A.double()).abs().max() < 1e-5
    assert h[2]["loss"] != h[0]["loss"] and [r["clients_replied"] for r in h[1:]] == [3, 3]

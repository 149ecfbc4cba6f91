"""A run that diverges says so: a finite explosion (``train.lr=1000``) finishes with a warning, and
``summary.json`` and the final line name it; every client's loss turning NaN ends the run with one
line, though each client's line names its own id (the server's ``FederationFailed`` compares causes)."""

from __future__ import annotations

import json

import pytest

from tests.harness import federate

pytestmark = pytest.mark.usefixtures("task_identity", "one_torch_thread")

SMALL = ("clients=2", "rounds=1", "train.local_steps=2", "data.eval_samples=64", "tracking.save_adapters=false")


def test_a_finite_divergence_is_warned_and_in_the_summary_and_final_line(tmp_path, caplog, capsys):
    cfg, summary = federate(tmp_path, *SMALL, "train.lr=1000")
    start, end = summary["history"][0]["loss"], summary["history"][-1]["loss"]
    assert end > 10 * start  # what the rule catches: a finite loss far above the untrained model's
    assert summary["status"] == "finished" and summary["diverged"].startswith("diverged: round 1's evaluation loss ")
    assert "(the rule: above 10x round 0's, or not finite); lower train.lr" in summary["diverged"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["diverged"] == summary["diverged"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("diverged")] == [summary["diverged"]]  # warned once
    final = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[fedpeft] done in")]
    assert len(final) == 1 and summary["diverged"] in final[0]


def test_every_client_diverging_to_nan_ends_the_run_in_one_line(tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F

    from fedpeft.serverapp import RunFailed

    real = F.cross_entropy

    def diverging(*args, **kw):  # every training loss is NaN (no weight is touched); evaluation (no grad) is as it was
        loss = real(*args, **kw)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(F, "cross_entropy", diverging)
    with pytest.raises(RunFailed) as e:
        federate(tmp_path, *SMALL)
    assert str(e.value) == "client 0: training loss became nan (2 of 2 sampled clients); stopped after round 0"

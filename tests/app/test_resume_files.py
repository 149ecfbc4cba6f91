"""Resume with a run's files damaged or missing (issue 24, §2): a deleted adapter checkpoint of the
last complete round is written again from the state; earlier ones are named as lost. In-process:
the real server over :class:`tests.harness.AppGrid`, a small MiniLM."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.harness import federate

pytestmark = pytest.mark.usefixtures("task_identity")

OVERRIDES = ["clients=2", "train.local_steps=1", "data.eval_samples=32"]


def test_a_deleted_adapter_of_the_last_round_is_written_again_on_resume(tmp_path, capsys):
    from fedpeft.composing import compose
    from fedpeft.runconfig import RunSpec
    from fedpeft.serverapp import Federation

    federate(tmp_path, *OVERRIDES, "rounds=2")
    run = tmp_path / "run"
    saved = load_file(run / "adapters" / "round_002" / "adapter_model.safetensors")
    config = json.loads((run / "adapters" / "round_002" / "adapter_config.json").read_text())
    shutil.rmtree(run / "adapters" / "round_002")
    shutil.rmtree(run / "adapters" / "round_001")
    capsys.readouterr()
    cfg = compose(["tracking.mode=disabled", "model.rank=4", "model.alpha=8", "model.max_length=48", "data.eval_samples=256",
                   "engine.device=cpu", "engine.num_cpus=1", *OVERRIDES, "rounds=3"])  # federate's config, one round more
    Federation(cfg, RunSpec(run, resume=True, shared_dir=str(run / "state")))
    again = load_file(run / "adapters" / "round_002" / "adapter_model.safetensors")
    assert sorted(again) == sorted(saved) and all((again[k] == saved[k]).all() for k in saved)
    assert json.loads((run / "adapters" / "round_002" / "adapter_config.json").read_text()) == config
    assert not (run / "adapters" / "round_001").exists()
    out = capsys.readouterr().out
    assert f"[fedpeft] resume: {run / 'adapters' / 'round_002'} was missing: written again from {run / 'state' / 'server.pt'}" in out
    assert (f"[fedpeft] resume: the adapters of round(s) 1 are missing from {run / 'adapters'} and cannot be written again "
            "(the state holds the last round's model only)") in out

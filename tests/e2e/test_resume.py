"""Resume: a run killed with SIGKILL during a round continues from its last complete round and ends
exactly as the same run uninterrupted; a changed config is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FEDPEFT = str(Path(sys.executable).with_name("fedpeft"))
# FLoRA (its base merges are server state, and fresh worker processes must rebuild the base), 4
# clients of which 2 are sampled per round (the sampler's random state), heterogeneous ranks, and
# top-k uplink with error feedback (the clients' residuals are client state).
RUN = ["strategy=flora", "ranks=flora", "ranks.levels=[4,2]", "clients=4", "fraction=0.5", "rounds=3", "train.local_steps=2",
       "model.rank=4", "model.alpha=8", "model.max_length=32", "data.eval_samples=64", "compression=topk", "tracking.mode=offline"]


def fedpeft(*args, **kw):
    return subprocess.Popen([FEDPEFT, "simulate", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True, **kw)


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if "seconds" not in k and k != "elapsed_s"} for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def parent_with_a_wandb_service(tmp_path_factory):
    """This process holds a wandb service, as it does after any in-process test with W&B, and its
    WANDB_SERVICE is inherited by every fedpeft started here: a killed run's W&B id must not stay held."""
    import wandb

    wandb.init(mode="offline", dir=str(tmp_path_factory.mktemp("parent_wandb")), settings=wandb.Settings(console="off", quiet=True)).finish()
    assert os.environ.get("WANDB_SERVICE")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "whole"
    proc = fedpeft(*RUN, f"hydra.run.dir={run_dir}")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return run_dir


def test_a_run_killed_during_a_round_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    proc = fedpeft(*RUN, f"hydra.run.dir={run_dir}")
    seen = []
    for line in proc.stdout:  # round 2 is complete: kill the whole process tree (driver and Ray) during round 3,
        seen.append(line)     # as soon as a client has finished round 3 (its top-k residual for round 3 is written)
        if line.startswith("[fedpeft] round 2/3"):
            deadline = time.monotonic() + 10
            while not list(run_dir.glob("state/client_*/residual_00003.safetensors")) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 2
    assert not (run_dir / "summary.json").exists()

    again = fedpeft(f"resume={run_dir}", cwd=tmp_path)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-3000:]
    assert "resuming after round 2 of 3" in out

    got, want = rows(run_dir), rows(uninterrupted)
    assert [r["round"] for r in got] == [0, 1, 2, 3]  # no gap, no duplicate
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if g["round"] == 3 and k == "bytes_down":
                # A resumed run is a new Flower run whose nodes hold no merge yet: round 3 sends each of its
                # clients every FLoRA merge from version 1 (the uninterrupted run sent only the ones each lacked: never more).
                assert g[k] >= w[k], (g[k], w[k])
                continue
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), (g["round"], k)
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == [f"round_{r:03d}" for r in range(4)]
    final = "adapters/round_003/adapter_model.safetensors"
    assert (run_dir / final).read_bytes() == (uninterrupted / final).read_bytes()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and [h["round"] for h in summary["history"]] == [0, 1, 2, 3]


def test_resuming_with_a_changed_config_is_refused_naming_the_keys(uninterrupted, tmp_path):
    proc = fedpeft(f"resume={uninterrupted}", "rounds=5", "train.lr=0.1", "seed=4")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:]
    assert "resume: the config differs from the run's in seed, train.lr" in out
    proc = fedpeft(f"resume={uninterrupted}", "peft=ia3")  # another group option: one line naming it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "resume: peft=ia3 would change the run's peft (it ran peft=lora)" in out, out[-2000:]
    proc = fedpeft(f"resume={uninterrupted}", "peft=lora")  # the run's own option is no change
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "already finished all 3 rounds" in out

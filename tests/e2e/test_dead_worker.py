"""A Ray worker process killed while a round trains (what the kernel's out-of-memory killer does):
the run loses that one client, in that round, and finishes every round."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

FEDPEFT = str(Path(sys.executable).with_name("fedpeft"))


def busy_actors(pid: int) -> list[psutil.Process]:
    """The ``ray::ClientAppActor`` worker processes under ``pid`` running a message now (Ray titles
    an actor's process ``ray::ClientAppActor.run`` while it runs the ``run`` method)."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::ClientAppActor.run"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_a_killed_worker_costs_one_client_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [FEDPEFT, "simulate", "clients=4", "rounds=3", "train.local_steps=5", "train.batch_size=8", "model.rank=4", "model.alpha=8", "model.max_length=32",
         "data.eval_samples=32", "tracking.mode=disabled", "tracking.save_adapters=false", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )
    seen, killed = [], None
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[fedpeft] round 1/3"):  # round 2 is starting: its clients are being sent and trained
                deadline, busy = time.monotonic() + 30, []
                while not busy and time.monotonic() < deadline:
                    busy = busy_actors(proc.pid)
                    time.sleep(0.2)
                assert busy, "".join(seen[-20:])
                killed = busy[0].pid
                os.kill(killed, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen)
    assert killed is not None and proc.returncode == 0, out[-3000:]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["clients_failed"] == 0 and rows[2]["clients_failed"] == 1 and rows[3]["clients_failed"] == 0, out[-3000:]
    assert rows[3]["clients_replied"] == 4 and all(r["round_applied"] == 1 for r in rows[1:])
    died = [l for l in seen if "died" in l and "failed:" in l]
    assert len(died) == 1  # the client the killed worker was running, and no other
    assert all(f"(pid {killed}) died" in l and "a fresh worker replaces it" in l and "'>" not in l for l in died), died
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"

"""``flwr run .``: Flower's own CLI runs the fedpeft app on a local simulation SuperLink (which it
starts itself, detached), as docs/deployment.md says: Flower's default config.toml, the nodes in
``--federation-config`` (no deprecated ``options.`` keys), the user's overrides on top of the app's,
and the SuperLink stopped with SIGTERM, which leaves no process behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedpeft.deploy import free_ports, processes_with_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_flwr_run_dot_runs_the_app_on_a_local_simulation(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    http, control = free_ports(2)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    # clients=3 and tracking.mode=disabled come from the app's own app-overrides (pyproject.toml)
    overrides = "rounds=1 train.local_steps=2 model.rank=4 model.alpha=8 model.max_length=32 data.eval_samples=64"
    flwr = str(Path(sys.executable).with_name("flwr"))
    try:
        out = subprocess.run([flwr, "run", str(ROOT), "local", "--stream", "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
                              "--run-config", f"overrides='{overrides}' run-dir='{run_dir}'"],
                             env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert summary["status"] == "finished" and summary["clients"] == 3
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_replied"] == 3 and rows[1]["round_applied"] == 1
        assert rows[1]["loss"] != rows[0]["loss"]
        assert "`options.` fields" not in out.stdout + out.stderr  # no deprecated key
        assert (home / "config.toml").read_text().count(":local:") == 1  # Flower's default, written by flwr
        # the docs' stop: SIGTERM to the local SuperLink (here only the one this test's FLWR_HOME started)
        links = [p for p in processes_with_env(f"FLWR_HOME={home}") if "flower-superlink --insecure --simulation" in cmdline(p)]
        assert len(links) == 1
        os.kill(links[0], signal.SIGTERM)
        # the SuperLink and its flower-superexec end within seconds; the run's flwr-simulation process
        # (still pushing its outputs when `flwr run` returns; it watches its parent's pid) and its
        # orphaned Ray workers (ray::ClientAppActor, once their raylet is gone) end by themselves
        # (measured: within ~40 s of the run's end)
        flower = ("flower-superlink", "flower-superexec")
        deadline = time.monotonic() + 15
        while any(f in cmdline(p) for p in processes_with_env(f"FLWR_HOME={home}") for f in flower) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [c for c in map(cmdline, processes_with_env(f"FLWR_HOME={home}")) if any(f in c for f in flower)] == []
        deadline = time.monotonic() + 90
        while processes_with_env(f"FLWR_HOME={home}") and time.monotonic() < deadline:
            time.sleep(1)
        assert [cmdline(p) for p in processes_with_env(f"FLWR_HOME={home}")] == []
    finally:
        left = processes_with_env(f"FLWR_HOME={home}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 20
    while processes_with_env(f"FLWR_HOME={home}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_with_env(f"FLWR_HOME={home}")


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""

"""Opt-in (``FEDPEFT_MULTINODE=1``, root): the way it failed, with two real Ray nodes on loopback.

The head node runs here; the second node runs in a private mount namespace with a tmpfs over the
runs' directory, so its workers see an empty directory where the driver writes the run (as on any
real cluster: machines share no disk; /work/shared/notes/ray-multinode-on-one-machine.md). One CPU
per node and per client actor: Flower places one actor on each node, and the clients change nodes
between rounds. FedSA-LoRA (each client's own B) and FLoRA with ``fraction=0.5`` and failures (a
worker behind its node) equal the run on one machine, round by round; a resumed FedSA-LoRA run is
refused in one line. Minutes of CPU: not in the default tiers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("FEDPEFT_MULTINODE") != "1" or os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="opt-in: FEDPEFT_MULTINODE=1, as root (unshare --mount)")

RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")
WORKER = ("import sys, types, ray._private.ray_constants as c\n"
          "import ray.scripts.scripts as s\n"
          "k = types.ModuleType('ray_constants'); k.__dict__.update(c.__dict__); k.ENABLE_RAY_CLUSTER = True\n"
          "s.ray_constants = k\n"
          "sys.argv = ['ray'] + sys.argv[1:]\n"
          "s.main()\n")
RUN = ["clients=2", "rounds=3", "model.rank=4", "model.alpha=8", "model.max_length=16", "train.local_steps=2", "train.batch_size=4",
       "data.eval_samples=16", "model.eval_batch_size=16", "tracking.mode=disabled", "engine.num_cpus=1", "engine.device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """(the head's address, the runs' directory the second node cannot see); both nodes stopped after."""
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="fpmn", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX's 107 bytes
    head = subprocess.Popen([RAY_BIN, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             f"--temp-dir={temp}/h", "--block"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    inner = (f"mount -t tmpfs tmpfs {runs} && exec {sys.executable} -c \"$WORKER\" start --address={address} --node-ip-address=127.0.0.1 "
             f"--num-cpus=1 --temp-dir={temp}/w --block")
    worker = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and subprocess.run([RAY_BIN, "status", f"--address={address}"], env=env, capture_output=True).returncode:
            time.sleep(2)
        worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", inner], env={**env, "WORKER": WORKER},
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while time.time() < deadline:
            out = subprocess.run([RAY_BIN, "status", f"--address={address}"], env=env, capture_output=True, text=True).stdout
            if out.count("node_") >= 2:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the second Ray node did not join {address}")
        yield address, runs
    finally:
        for p in (worker, head):
            if p is not None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def simulate(run_dir, *args):
    # the driver too keeps Ray's node addresses on loopback (else it looks for the head at the machine's outward address)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-m", "fedpeft.cli", "simulate", *args], env=env, capture_output=True, text=True, timeout=900)


def rows(run_dir):
    keep = ("loss", "accuracy", "clients_replied", "clients_failed", "round_applied", "bytes_down", "bytes_up")
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k in keep or k.startswith("personal")})
    return out


@pytest.mark.parametrize("over", [["strategy=fedsa_lora"], ["strategy=flora", "clients=4", "fraction=0.5", "min_clients=1", "profile.failure_rate=0.3"]],
                         ids=["fedsa_lora", "flora"])
def test_two_ray_nodes_that_share_no_disk_equal_one(cluster, tmp_path, over):
    address, runs = cluster
    one, many = tmp_path / "one", runs / "many"
    r1 = simulate(one, *RUN, *over, f"hydra.run.dir={one}")
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = simulate(many, *RUN, *over, f"engine.ray_address={address}", f"hydra.run.dir={many}")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert rows(many) == rows(one)
    if over == ["strategy=fedsa_lora"]:
        again = simulate(many, f"resume={many}", "rounds=4", f"engine.ray_address={address}")
        assert again.returncode == 2
        assert "cannot see the run directory: strategy=fedsa_lora's personal B are checkpointed" in again.stderr

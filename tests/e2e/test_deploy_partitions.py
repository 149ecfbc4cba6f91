"""Devices that misbehave, on a real local deployment (issue 24, part 5): a SuperLink with TLS and
SuperNode authentication and 3 SuperNodes on 127.0.0.1 (fedpeft.deploy), two runs on it.

1. Node 2 is configured with ``partition-id=99`` (of 3): the run is refused before round 0, in one
   line naming partition 2 and the node. Before, it trained 2 of 3 clients every round, printed
   "clients 2/2" and ended "finished".
2. ``flwr run`` with an unknown override key (``train.lrr``): the run fails with the one line
   ``fedpeft deploy`` gives, and the ServerApp's traceback in the stream is short and unchained
   (it was 85 lines: Hydra's and OmegaConf's chained errors, with Hydra's "+train.lrr" hint).

The server loads the model once per run (a few tens of seconds on the shared 2-core machine).
"""

from __future__ import annotations

import re
import time

import pytest

from fedpeft.deploy import Deployment, DeploymentError, make_pki, node_configs

pytestmark = pytest.mark.slow

SMALL = ["clients=3", "train.local_steps=2", "model.rank=4", "model.alpha=8", "model.max_length=32",
         "data.eval_samples=64", "tracking.mode=disabled", "fraction=1.0", "min_clients=2", "engine.round_timeout=300"]


def test_an_out_of_range_partition_refuses_the_run_and_a_bad_override_is_one_line(tmp_path, capfd):
    from fedpeft.composing import compose
    from fedpeft.launch import ENV_DEFAULTS, project_dir
    from fedpeft.runconfig import to_run_config

    run_dir = (tmp_path / "run").resolve()
    cfg = compose([*SMALL, "rounds=2", f"hydra.run.dir={run_dir}"])
    nodes = node_configs(cfg, run_dir)
    nodes[2] = {**nodes[2], "partition-id": 99}  # a device configured for a partition the run does not have
    pki = make_pki(run_dir / "deploy" / "pki", 3)
    t0 = time.monotonic()
    with Deployment(run_dir / "deploy", 3, nodes, pki=pki, env=dict(ENV_DEFAULTS), startup_timeout=180) as dep:
        node99 = dep.node_ids[2]
        with pytest.raises(DeploymentError) as e:
            dep.run(project_dir(), to_run_config(cfg, run_dir), timeout=900)
        t_refused = time.monotonic() - t0
        msg = str(e.value)
        assert "ended finished:failed" in msg, msg
        assert "partition(s) 2 of 0..2 have no node" in msg and "partition 2: no node claimed it" in msg, msg
        assert f"node {node99} left out: partition-id 99 is not one of 0..2" in msg, msg
        assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip(), \
            "a round was recorded before the run was refused"

        capfd.readouterr()
        bad = {"config": "", "overrides": " ".join([*SMALL, "train.lrr=0.01"]), "run-dir": str(tmp_path / "bad"),
               "resume": False, "shared-dir": ""}
        with pytest.raises(DeploymentError) as e2:
            dep.run(project_dir(), bad, timeout=600)
        out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capfd.readouterr().out)
    msg2 = str(e2.value)
    print(f"\n[timing] refused after {t_refused:.0f} s: {msg}\n[bad override] {msg2}")
    assert "unknown key 'train.lrr' (Key 'lrr' not in 'TrainConfig'); did you mean 'train.lr'?" in msg2, msg2
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "ServerApp raised an exception" in line)
    end = next(i for i, line in enumerate(lines) if i > start and "ConfigError: unknown key 'train.lrr'" in line)
    traceback_lines = lines[start:end + 1]
    print(f"[bad override] the ServerApp's traceback in the stream: {len(traceback_lines)} lines")
    text = "\n".join(traceback_lines)
    assert "direct cause" not in text and "During handling" not in text and "+train.lrr" not in text, text
    assert len(traceback_lines) <= 20, text

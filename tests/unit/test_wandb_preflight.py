"""W&B fails fast: an online run (``tracking.mode=online``, or ``auto`` with WANDB_API_KEY) whose API
key is missing or whose server is unreachable stops before Ray starts with one line, or with
``tracking.fallback=offline`` goes on offline and says how to ``wandb sync`` it later. Everything on
127.0.0.1: a closed port for an unreachable server, a local HTTP server for a reachable one."""

import http.server
import socket
import threading

import pytest
import wandb
from omegaconf import OmegaConf

from fedpeft.config import ConfigError
from fedpeft.preflight import check_wandb

KEY = "k" * 40  # the shape of a W&B API key; never sent anywhere but 127.0.0.1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


@pytest.fixture
def wb(tmp_path, monkeypatch):
    """A clean wandb: no key in the environment or a netrc, no `wandb login --host` settings; settings re-read."""
    monkeypatch.setenv("NETRC", str(tmp_path / "wandb-home" / ".netrc"))  # no such file
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-home"))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    wandb.teardown()  # wandb reads its settings (base URL, key) once per process
    yield monkeypatch
    wandb.teardown()


@pytest.fixture
def server():
    """A reachable HTTP server on 127.0.0.1 (every request gets a 404)."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def cfg(mode="online", fallback="none"):
    return OmegaConf.create({"tracking": {"mode": mode, "fallback": fallback}})


def test_a_key_and_an_unreachable_server_is_one_line_before_anything_starts(wb):
    url = f"http://127.0.0.1:{closed_port()}"
    wb.setenv("WANDB_BASE_URL", url)
    wb.setenv("WANDB_API_KEY", KEY)
    with pytest.raises(ConfigError) as e:
        check_wandb(cfg("auto"))  # auto with a key is online
    msg = str(e.value)
    assert msg.startswith(f"tracking.mode=auto: the W&B server {url} is unreachable (") and "\n" not in msg
    assert msg.endswith("; log offline with tracking.mode=offline, or go on offline when this happens with tracking.fallback=offline")


def test_online_without_an_api_key_is_one_line(wb, server):
    wb.setenv("WANDB_BASE_URL", server)
    with pytest.raises(ConfigError, match=rf"^tracking.mode=online: no W&B API key for {server} \(set WANDB_API_KEY or run `wandb login`\); "):
        check_wandb(cfg())


def test_a_key_the_server_refuses_is_one_line(wb, server):
    """A reachable server that does not accept the key (this one answers every request with an error)."""
    wb.setenv("WANDB_BASE_URL", server)
    wb.setenv("WANDB_API_KEY", KEY)
    with pytest.raises(ConfigError) as e:
        check_wandb(cfg())
    msg = str(e.value)
    assert msg.startswith(f"tracking.mode=online: the W&B server {server} refused the API key (") and "\n" not in msg and "<" not in msg


def test_fallback_offline_goes_on_offline_and_says_how_to_sync(wb, tmp_path, capsys):
    wb.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    wb.setenv("WANDB_API_KEY", KEY)
    c = cfg("online", "offline")
    check_wandb(c, tmp_path / "run")
    assert c.tracking.mode == "offline"
    out = capsys.readouterr().out
    assert "is unreachable" in out and "going on offline (tracking.fallback=offline)" in out
    assert f"wandb sync {tmp_path / 'run' / 'wandb'}/offline-run-*" in out and out.count("\n") == 1


@pytest.mark.parametrize("mode", ["offline", "disabled", "auto"])
def test_offline_disabled_and_auto_without_a_key_ask_no_server(wb, mode):
    wb.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    c = cfg(mode)
    check_wandb(c)
    assert c.tracking.mode == mode


def test_fedpeft_simulate_online_with_an_unreachable_server_stops_in_one_line_before_ray(wb, tmp_path, capsys):
    """It took 80-170 s and a traceback, inside the run, leaving a run directory without a summary."""
    import ray

    from tests.harness import run_cli

    url = f"http://127.0.0.1:{closed_port()}"
    wb.setenv("WANDB_BASE_URL", url)
    wb.setenv("WANDB_API_KEY", KEY)
    code, out, err = run_cli(["simulate", "clients=2", "rounds=1", "tracking.mode=online"], tmp_path, wb, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fedpeft: error: tracking.mode=online: the W&B server {url} is unreachable"), err
    assert not ray.is_initialized()
    assert [p for p in tmp_path.rglob("*") if "wandb-home" not in p.parts] == []  # the run directory Hydra made is gone


SWEEP = """
# W&B Sweeps over fedpeft (a Hydra app): `wandb sweep sweep.yaml`, then `wandb agent ENTITY/PROJECT/ID`
program: fedpeft
method: grid
metric: {name: accuracy, goal: maximize}
parameters:
  strategy.name: {values: [fedavg, flora]}
  ranks.kind: {value: list}
  ranks.levels: {value: [8, 4]}
  clients: {value: 2}
  train.lr: {value: 0.0005}
  tracking.save_adapters: {value: false}
  seed: {values: [0, 1, 2]}
command:
  - ${env}
  - fedpeft
  - simulate
  - ${args_no_hyphens}
"""


def test_a_wandb_sweep_command_line_is_one_fedpeft_accepts(monkeypatch):
    """The command a ``wandb agent`` runs for one of the sweep's runs, built by wandb's own code
    (``create_sweep_command``, ``create_sweep_command_args``, the agent's macro expansion), is a
    ``fedpeft simulate`` command line whose overrides compose to the sampled values: lists as
    ``[8, 4]``, booleans as ``False`` (Python's spelling), floats as ``0.0005``. Offline: no agent, no server."""
    import yaml
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    from fedpeft.composing import compose

    sweep = yaml.safe_load(SWEEP)
    run = {k: {"value": (v["values"][-1] if "values" in v else v["value"])} for k, v in sweep["parameters"].items()}
    sweep_vars = {**sweep_utils.create_sweep_command_args({"args": run}), "env": ["/usr/bin/env"]}
    command = []
    for word in map(str, sweep_utils.create_sweep_command(sweep["command"])):  # as wandb_agent.Agent._run_job expands it
        command += sweep_vars.get(word[2:-1], []) if word.startswith("${") and word.endswith("}") else [word]
    assert command == ["/usr/bin/env", "fedpeft", "simulate", "strategy.name=flora", "ranks.kind=list", "ranks.levels=[8, 4]",
                       "clients=2", "train.lr=0.0005", "tracking.save_adapters=False", "seed=2"]
    cfg = compose(command[3:])
    assert (cfg.strategy.name, cfg.ranks.kind, list(cfg.ranks.levels), cfg.clients) == ("flora", "list", [8, 4], 2)
    assert cfg.train.lr == 0.0005 and cfg.tracking.save_adapters is False and cfg.seed == 2

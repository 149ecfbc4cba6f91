"""``fedpeft simulate``: the fedpeft ServerApp and ClientApp on Flower's simulation engine (Ray
backend), in this process: the same apps ``flwr run .`` and a SuperLink run, configured by the same
run config (:mod:`fedpeft.runconfig`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedpeft.config import validate
from fedpeft.launch import descendants, project_dir, setup_env
from fedpeft.preflight import check_resources, check_wandb
from fedpeft.runconfig import to_run_config

log = logging.getLogger("fedpeft")

def backend_config(cfg: DictConfig) -> dict[str, Any]:
    """Ray resources per client actor; a local Ray listens on 127.0.0.1 only."""
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
    if cfg.engine.ray_address:
        init["address"] = cfg.engine.ray_address
    resources: dict[str, Any] = {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus}
    return {"init_args": init, "client_resources": resources}


def bind_ray_to_loopback(cfg: DictConfig) -> None:
    """A local Ray (no ``engine.ray_address``) runs in single-node mode: node IP 127.0.0.1, and
    every Ray server (GCS, raylet, workers, runtime-env agent) listens on 127.0.0.1 only.

    Ray on Linux otherwise resolves the node IP to the machine's outward address and binds its
    gRPC servers to all interfaces, whatever ``_node_ip_address`` says. The switch is read when
    Ray is imported, so it must be set before that; Ray's worker processes inherit it.
    """
    if cfg.engine.ray_address:
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules:
        from ray._private import ray_constants  # only where Ray is imported already: never import it here

        if ray_constants.ENABLE_RAY_CLUSTER:
            log.warning("Ray was imported before fedpeft could keep it on 127.0.0.1; it may listen on other interfaces")


class QuietClientFailures(logging.Filter):
    """Flower's simulation engine logs a ClientApp's exception as two ERROR tracebacks (its Ray
    backend's and its worker's) and then hands it to the server as an error reply, which fedpeft's
    server logs as one line naming the client. Drop the tracebacks (the records those two
    functions log at ERROR); everything else Flower logs passes."""

    SOURCES = (("raybackend.py", "process_message"), ("vce_api.py", "worker"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and any(record.pathname.endswith(f) and record.funcName == fn for f, fn in self.SOURCES))


def start_ray(cfg: DictConfig) -> None:
    """Start (or join) Ray here, as Flower's Ray backend would (``backend_config``'s init args, the
    driver's ``sys.path`` as the workers' ``PYTHONPATH``), instead of inside the simulation engine:
    Ray's native failure handler takes SIGTERM over when Ray starts, so :class:`StopOnInterrupt`
    must install its handlers after that. Flower then finds Ray running and uses it."""
    import ray  # lazy: Ray reads the switch bind_ray_to_loopback sets when it is imported

    if ray.is_initialized():
        return
    from fedpeft.tracking import say

    where = f"joining the Ray cluster at {cfg.engine.ray_address}" if cfg.engine.ray_address else "starting Ray on 127.0.0.1"
    say(f"{where}: one worker per {cfg.engine.num_cpus:g} CPU(s){f' and {cfg.engine.num_gpus:g} GPU(s)' if cfg.engine.num_gpus else ''}, "
        "each loading the base model once …")
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **backend_config(cfg)["init_args"])


class StopOnInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM during ``fedpeft simulate``: stop within seconds, keep what is done.

    Flower's simulation engine waits for the clients' running calls and the server's round (up to
    ``engine.round_timeout``) before it returns, minutes after a Ctrl-C. Instead, the first signal
    waits for a round that is being written (``guard``: its checkpoint and metrics row are written
    whole), records the run as interrupted (``finish``) and leaves the process with exit code 130
    (143 for SIGTERM) at once; Ray's processes end with it (:func:`_reap_when_gone`). A second signal while that happens is
    ignored. Only for the command line (it ends the process), and only in the main thread."""

    def __init__(self, guard, finish) -> None:
        self.guard, self.finish = guard, finish
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.stop)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def stop(self, signum, frame) -> None:
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)
        code = 130 if signum == signal.SIGINT else 143
        try:
            if self.guard.acquire(timeout=60):
                self.finish()
        finally:
            try:
                _reap_when_gone(os.getpid(), _ray_processes())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


def _ray_processes() -> set[int]:
    """This process's Ray descendants: GCS, raylet, its agents and workers (not wandb's service)."""
    import psutil
    import ray  # lazy: as in start_ray

    def is_ray(pid: int) -> bool:
        try:
            args = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return False
        return args.startswith("ray::") or package in args

    package = os.path.dirname(ray.__file__)
    return {pid for pid in descendants({os.getpid()}) if pid != os.getpid() and is_ray(pid)}


def _reap_when_gone(parent: int, pids: set[int]) -> None:
    """Start a detached process that, once ``parent`` has exited, gives ``pids`` ``grace`` seconds
    and SIGKILLs what is left. Ray is not shut down in-process: Flower's threads still call it, and
    a call after ``ray.shutdown`` either starts a second, orphaned cluster or ends the process with
    Ray's exit code. Exiting at once, the GCS and raylet die with this process (Ray's fate
    sharing); the raylet's agents notice only by polling, and one that then reports the raylet's
    death to the stopped GCS can wait a minute for it: the reaper ends them."""
    if pids:
        code = f"from fedpeft.launch import reap; reap({parent}, {sorted(pids)})"
        subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def simulate(run_config: dict[str, Any], num_supernodes: int, cfg: DictConfig) -> None:
    """Run the module-level apps on Flower's simulation engine with ``run_config`` for the server
    and every node (``run_simulation`` cannot pass a run config: this is its body, with one)."""
    # lazy: Flower (FLWR_TELEMETRY_ENABLED) and the apps' transformers and datasets (HF_HUB_OFFLINE,
    # ...) read ENV_DEFAULTS when imported, and run() calls setup_env() first
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from clients.app import app as client_app
    from fedpeft import simnodes
    from fedpeft.raypool import healing
    from fedpeft.serverapp import app as server_app

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    with healing(), simnodes.recording():  # a dead worker costs its client (fedpeft.raypool); nodes' partitions known (fedpeft.simnodes)
        _run_simulation(
            num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, client_app=client_app, server_app=server_app,
            backend_config=backend_config(cfg), server_app_context=context, app_dir=str(project_dir()), run=run, is_app=True,
        )


def run(cfg: DictConfig, run_dir: Path, *, interruptible: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run one federation (or, with ``resume``, continue the one in ``run_dir``); returns the summary
    (also in ``run_dir/summary.json``). ``interruptible``: Ctrl-C ends the process within seconds
    (:class:`StopOnInterrupt`; the CLI)."""
    setup_env()
    bind_ray_to_loopback(cfg)
    from fedpeft import serverapp  # lazy: as in simulate(): after setup_env()

    flwr_log = logging.getLogger("flwr")  # Flower's own console handler; keep it off Hydra's root one
    flwr_log.setLevel(cfg.engine.flower_log_level)
    flwr_log.propagate = False
    if not any(isinstance(f, QuietClientFailures) for f in flwr_log.filters):
        flwr_log.addFilter(QuietClientFailures())
    validate(cfg)
    check_resources(cfg)
    run_dir = Path(run_dir).resolve()
    check_wandb(cfg, run_dir)  # before Ray starts: an online run without a key or server stops (or goes offline) at once
    run_config = to_run_config(cfg, run_dir, resume=resume, shared_dir=str(run_dir / "state"))

    def interrupted() -> None:
        for fed in serverapp.CURRENT:
            fed.interrupted()

    guard = _Guards()
    if interruptible or cfg.engine.ray_address:
        start_ray(cfg)
    if cfg.engine.ray_address:
        from fedpeft.cluster import check  # lazy: asks the cluster's nodes (Ray)

        check(cfg, run_dir, resume)
    with StopOnInterrupt(guard, interrupted) if interruptible else contextlib.nullcontext():
        simulate(run_config, cfg.clients, cfg)
    return json.loads((run_dir / "summary.json").read_text())


class _Guards:
    """The running federation's write guard (its rounds are written whole), for StopOnInterrupt."""

    def acquire(self, timeout: float) -> bool:
        from fedpeft import serverapp  # lazy: as in run()

        return all(fed.guard.acquire(timeout=timeout) for fed in serverapp.CURRENT)

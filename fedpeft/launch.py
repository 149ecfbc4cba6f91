"""What every launcher shares (``fedpeft simulate``, ``fedpeft deploy``, ``fedpeft fetch-assets``,
the ServerApp started by ``flwr run``): the process environment a run starts with, the Flower app's
directory, and the process table that stopping a run walks (psutil's, so any platform psutil
supports).

Standard library and psutil only, so that the command line can import it before it knows what
will run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_SILENT": "true",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def setup_env() -> None:
    """:data:`ENV_DEFAULTS` into ``os.environ``, where the user has not set them."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def project_dir() -> Path:
    """The Flower app's directory: its pyproject.toml declares the run config keys the simulated
    nodes' ``context.run_config`` is fused from."""
    # lazy: fedpeft.config imports Hydra, and `fedpeft --help` imports this module without needing it
    from fedpeft.config import ConfigError

    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app.config]" not in pyproject.read_text():
        raise ConfigError(
            f"the fedpeft app's pyproject.toml (with [tool.flwr.app.config]) is not in {root}; install fedpeft from its source tree (pip install -e .)"
        )
    return root


def proc_table() -> dict[int, int]:
    """pid -> ppid of every live (non-zombie) process."""
    import psutil

    dead = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    return {p.info["pid"]: p.info["ppid"] for p in psutil.process_iter(["pid", "ppid", "status"])
            if p.info["status"] not in dead and p.info["ppid"] is not None}


def has_env(pid: int, name: str, value: str) -> bool:
    """Whether process ``pid``'s environment holds ``name=value`` (False where it cannot be read:
    gone, or another user's)."""
    import psutil

    try:
        return psutil.Process(pid).environ().get(name) == value
    except (psutil.Error, OSError):
        return False


def descendants(roots: set[int], table: dict[int, int] | None = None) -> set[int]:
    """The live ``roots`` and every live process below them."""
    table = proc_table() if table is None else table
    found, grew = {r for r in roots if r in table}, True
    while grew:
        more = {pid for pid, ppid in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def send_signal(pid: int, sig: int, group: bool = False) -> None:
    """``sig`` to process ``pid`` (``group``: to process group ``pid``); one that is gone or not
    ours is skipped."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(parent: int, pids: list[int], grace: float = 3.0) -> None:
    """Once ``parent`` has exited (or after 60 s), give ``pids`` and their descendants ``grace``
    seconds and SIGKILL what is left (the detached reaper of an interrupted ``fedpeft simulate``,
    :func:`fedpeft.simulation._reap_when_gone`)."""
    deadline = time.monotonic() + 60
    while parent in proc_table() and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + grace
    while (alive := descendants(set(pids))) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        send_signal(pid, signal.SIGKILL)

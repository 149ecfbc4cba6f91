"""The environment every test runs in, and the tiers: a test's folder under tests/ is its tier.

- ``tests/unit``: no model built or trained, no Ray, no process started: math, configs (checked
  against the model's architecture on the meta device), messages and the wire, compare, the server
  adapter over a fake grid, tiny data sets made in the test. The tier takes about a minute of CPU.
- ``tests/app``: in-process, no Ray: builds models, reads the built-in data sets whole, runs the
  ClientApp and whole federations through :class:`tests.harness.AppGrid`.
- ``tests/e2e``: starts Ray (Flower's simulation engine), ``fedpeft`` or Flower processes, or a
  deployment. These are also marked ``slow``, so ``-m "not slow"`` runs the other two tiers.

Each test gets its tier's marker (``unit``, ``app``, ``e2e``); shared helpers live in tests/harness.py.
"""

import os
import sys
from pathlib import Path

import absl.logging
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# dp-accounting (the independent accountant in test_privacy) imports absl, whose log handler binds
# the sys.stderr of import time — a pytest capture. Hydra's logging setup closes every handler, and
# absl's would close that capture with it: point absl at the real stderr, which it never closes.
absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the run's identity; run_simulation sets it, so do we here."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models and batches: one thread is fastest, and the
    2-core machine may be shared), the previous count restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TIERS = ("unit", "app", "e2e")
HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Marks each test with its folder's tier, and e2e tests ``slow``; a test outside the tier
    folders, or marked ``slow`` outside tests/e2e, is a usage error naming it."""
    for item in items:
        rel = Path(item.path).resolve().relative_to(HERE)
        tier = rel.parts[0] if len(rel.parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test belongs in tests/unit, tests/app or tests/e2e (see tests/conftest.py)")
        if tier != "e2e" and item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid}: marked slow but in tests/{tier}: slow tests (Ray, processes) belong in tests/e2e")
        item.add_marker(tier)
        if tier == "e2e":
            item.add_marker("slow")


@pytest.fixture(scope="session")
def can_mount():
    """Skips a test where this process may not mount a tmpfs in a private mount namespace (not root)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.decode().strip()}")

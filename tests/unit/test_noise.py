"""What a run prints: libraries' noise that no user can act on is silenced, real warnings are kept."""

import logging
import subprocess
import sys

import fedpeft  # noqa: F401  (installs the filters, in the driver and in every Ray worker that imports fedpeft)


def test_flowers_actor_shutdown_warning_is_dropped_and_its_other_warnings_kept():
    flwr_log = logging.getLogger("flwr")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    saved = flwr_log.level, flwr_log.disabled
    flwr_log.addHandler(handler)
    flwr_log.setLevel(logging.WARNING)
    flwr_log.disabled = False
    try:
        flwr_log.warning("Manually terminating %s", "ClientAppActor")
        flwr_log.warning("Actor died: %s", "ClientAppActor")
    finally:
        flwr_log.removeHandler(handler)
        flwr_log.level, flwr_log.disabled = saved
    assert [r.getMessage() for r in records] == ["Actor died: ClientAppActor"]


def test_torchs_own_jit_deprecation_is_ignored_and_other_deprecations_are_not():
    """A Ray worker shows every DeprecationWarning: with that set before fedpeft is imported, torch's
    own jit one is still dropped and any other is shown (a fresh interpreter: pytest resets filters)."""
    code = (
        "import warnings\n"
        "warnings.simplefilter('always', DeprecationWarning)\n"
        "import fedpeft\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.warn('`torch.jit.script_method` is deprecated. Please switch to `torch.compile`', DeprecationWarning, stacklevel=1)\n"
        "    warnings.warn('something else is deprecated', DeprecationWarning, stacklevel=1)\n"
        "print([str(w.message) for w in seen])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['something else is deprecated']", out.stdout


def test_bitsandbytes_optional_kernel_warning_is_below_the_level_shown():
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() > logging.WARNING


def test_hydra_job_logging_quiets_alembic_and_absl_info():
    import yaml

    from fedpeft.config import CONFIG_DIR

    loggers = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())["hydra"]["job_logging"]["loggers"]
    assert loggers["alembic"]["level"] == "WARNING" and loggers["absl"]["level"] == "WARNING"

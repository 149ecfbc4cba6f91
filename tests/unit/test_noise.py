"""What a run prints: libraries' noise that no user can act on is silenced, real warnings are kept."""

import logging
import warnings

import fedpeft  # noqa: F401  (installs the filters, in the driver and in every Ray worker that imports fedpeft)


def test_flowers_actor_shutdown_warning_is_dropped_and_its_other_warnings_kept(caplog):
    flwr_log = logging.getLogger("flwr")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        flwr_log.propagate, old = True, flwr_log.propagate
        try:
            flwr_log.warning("Manually terminating %s", "ClientAppActor")
            flwr_log.warning("Actor died: %s", "ClientAppActor")
        finally:
            flwr_log.propagate = old
    assert [r.getMessage() for r in caplog.records] == ["Actor died: ClientAppActor"]


def test_torchs_own_jit_deprecation_is_ignored_and_other_deprecations_are_not():
    """A Ray worker shows every DeprecationWarning: with "always" right after fedpeft's filter, torch's
    own jit one is still dropped and any other is shown."""
    with warnings.catch_warnings(record=True) as seen:  # restores the filters afterwards
        ours = next(i for i, f in enumerate(warnings.filters)
                    if f[0] == "ignore" and f[1] is not None and f[1].match("`torch.jit.script_method` is deprecated"))
        warnings.filters.insert(ours + 1, ("always", None, DeprecationWarning, None, 0))
        warnings._filters_mutated()
        warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`", DeprecationWarning, stacklevel=1)
        warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


def test_bitsandbytes_optional_kernel_warning_is_below_the_level_shown():
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() > logging.WARNING


def test_hydra_job_logging_quiets_alembic_and_absl_info():
    import yaml

    from fedpeft.config import CONFIG_DIR

    loggers = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())["hydra"]["job_logging"]["loggers"]
    assert loggers["alembic"]["level"] == "WARNING" and loggers["absl"]["level"] == "WARNING"

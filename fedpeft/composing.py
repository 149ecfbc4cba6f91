"""A run's config from ``KEY=VALUE`` / ``GROUP=OPTION`` words: ``configs/`` composed with Hydra,
merged into the schema, validated, and checked against the file system, the assets, the machine,
the data and the model (:mod:`fedpeft.preflight`) before anything runs. ``fedpeft simulate`` and
``fedpeft deploy`` compose here, and so does an app started by ``flwr run .`` with no config
(:mod:`fedpeft.runconfig`)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from fedpeft.config import CONFIG_DIR, ConfigError, config_error_line, register, strategy_defaults, typed, validate
from fedpeft.preflight import check_assets, check_model, check_privacy, check_resources, check_run_dir, prepare_data


def compose(overrides: list[str]):
    """Compose and validate the config; raises ConfigError with a one-line message."""
    return compose_run(overrides)[0]


def compose_run(overrides: list[str]):
    """:func:`compose`, and the run directory ``hydra.run.dir`` names (``${now:...}`` read now)."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
            run_dir = hydra_run_dir(cfg)
    except Exception as e:  # Hydra / OmegaConf errors: reduce to one line naming the key
        raise ConfigError(config_error_line(e)) from e
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        del cfg["hydra"]  # as hydra's compose does without return_hydra_config
    strategy_defaults(cfg, overrides)
    schema_check(cfg)
    validate(cfg)
    check_run_dir(run_dir)
    check_assets(cfg)
    check_resources(cfg)
    _, partitioner, _, num_labels = prepare_data(cfg)  # cached: the run that follows in this process reuses it
    check_privacy(cfg, partitioner)
    check_model(cfg, num_labels)
    return cfg, run_dir


def hydra_run_dir(cfg) -> Path | None:
    """Where ``hydra.run.dir`` puts a single run (``${now:...}`` read now); None if it cannot be
    resolved outside a Hydra run."""
    try:
        return Path(str(cfg.hydra.run.dir))
    except Exception:
        return None


def schema_check(cfg) -> None:
    """Keys added with ``+key=...`` must still exist in the schema."""
    typed(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])))

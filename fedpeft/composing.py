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


def quote_values(overrides: list[str]) -> list[str]:
    """The overrides as Hydra's lexer takes them: a ``KEY=VALUE`` whose value it refuses unquoted
    (a character outside its grammar, such as ``hydra.run.dir=runs/dir ü``) is given quoted, when
    quoted it means the same string; any other word is left as it is (Hydra names what is wrong)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for word in overrides:
        key, eq, value = word.partition("=")
        # a flag (--config-dir=…) is not an override; a list or dict is Hydra's syntax, not a string
        if eq and value and not key.startswith("-") and not value.startswith(("'", '"', "[", "{")):
            try:
                parser.parse_override(word)
            except Exception:
                for quote in ("'", '"'):
                    quoted = f"{key}={quote}{value}{quote}"
                    try:
                        if parser.parse_override(quoted).value() == value:
                            word = quoted
                            break
                    except Exception:
                        continue
        out.append(word)
    return out


def compose(overrides: list[str], config_dir: Path | None = None, config_name: str = "config"):
    """Compose and validate the config; raises ConfigError with a one-line message."""
    return compose_run(overrides, config_dir, config_name)[0]


def compose_run(overrides: list[str], config_dir: Path | None = None, config_name: str = "config"):
    """:func:`compose`, and the run directory ``hydra.run.dir`` names (``${now:...}`` read now).
    ``config_dir`` / ``config_name``: a user's own primary config, as Hydra's ``--config-dir`` /
    ``--config-name`` give it (:func:`user_config`); fedpeft's ``configs/`` stay on the search path."""
    cfg, run_dir = compose_config(overrides, config_dir, config_name)
    check_run_dir(run_dir)
    check_assets(cfg)
    check_resources(cfg)
    _, partitioner, _, num_labels = prepare_data(cfg)  # cached: the run that follows in this process reuses it
    check_privacy(cfg, partitioner)
    check_model(cfg, num_labels)
    return cfg, run_dir


def compose_config(overrides: list[str], config_dir: Path | None = None, config_name: str = "config"):
    """The config alone, composed and validated, and its run directory: no file system, asset,
    machine, data or model check (what the docs' commands are checked with)."""
    register()
    GlobalHydra.instance().clear()
    if config_dir is not None:
        user_config(config_dir, config_name)
        overrides = [*overrides, f"hydra.searchpath=[file://{CONFIG_DIR}]"]
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
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
    return cfg, run_dir


def user_config(config_dir: Path, config_name: str) -> None:
    """A user's primary config ``config_dir/config_name.yaml`` must exist and build on fedpeft's:
    its defaults list names ``config`` (``defaults: [config, _self_]``); raises ConfigError."""
    import yaml

    path = Path(config_dir) / (config_name if config_name.endswith(".yaml") else f"{config_name}.yaml")
    if not Path(config_dir).is_dir():
        raise ConfigError(f"--config-dir: {config_dir} is not a directory")
    if not path.is_file():
        have = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
        raise ConfigError(f"--config-name: no {path.name} in {config_dir}" + (f"; it has {', '.join(have)}" if have else ""))
    if path.stem == "config":
        raise ConfigError(f"--config-name: name your config anything but 'config' ({path}): it builds on fedpeft's own config.yaml")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config-name: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    defaults = doc.get("defaults", []) if isinstance(doc, dict) else []
    if "config" not in [d for d in defaults if isinstance(d, str)]:
        raise ConfigError(f"--config-name: {path} must build on fedpeft's config: start it with 'defaults: [config, _self_]' "
                          "(then your keys; group options such as '- override strategy: flora' go in the list)")


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

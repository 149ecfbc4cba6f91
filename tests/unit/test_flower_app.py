"""The Flower app as ``flwr run`` / ``flwr build`` see it: what the bundle ships, and how the
user's ``--run-config`` combines with the app's own run config."""

from __future__ import annotations

import io
import tomllib
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedpeft import runconfig

ROOT = Path(__file__).resolve().parents[2]


def test_the_app_bundle_ships_the_apps_and_configs_but_no_experiments_tests_or_docs():
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()  # what `flwr build` writes
    assert {"fedpeft/serverapp.py", "clients/app.py", "strategies/base.py", "configs/config.yaml", "pyproject.toml"} <= set(names)
    shipped = [n for n in names if n.split("/")[0] in ("experiments", "tests", "docs")]
    assert shipped == [], shipped[:5]


def flwr_run_config(run_config_arg: str) -> dict:
    """The run config Flower hands the apps for ``flwr run . --run-config ARG``: the app's
    ``[tool.flwr.app.config]`` fused with the parsed argument, as Flower does it."""
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return fuse_dicts(flatten_dict(app), parse_config_args([run_config_arg]))


def test_flwr_run_overrides_add_to_the_apps_own_overrides():
    cfg, _ = runconfig.load(flwr_run_config("overrides='strategy=flora rounds=1'"))
    assert cfg.strategy.name == "flora" and cfg.rounds == 1  # the user's words
    assert cfg.clients == 3 and cfg.data.eval_samples == 200 and cfg.tracking.mode == "disabled"  # the app's, kept


def test_without_user_overrides_the_app_runs_its_own_small_federation():
    cfg, _ = runconfig.load(flwr_run_config("run-dir='x'"))
    assert (cfg.clients, cfg.rounds, cfg.data.eval_samples, cfg.tracking.mode) == (3, 2, 200, "disabled")


def test_a_user_key_replaces_the_apps_word_for_that_key():
    assert runconfig.overrides({"app-overrides": "clients=3 rounds=2 +preset=x", "overrides": "clients=5 ++preset=y seed=1"}) == [
        "rounds=2", "clients=5", "++preset=y", "seed=1"]

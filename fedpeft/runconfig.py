"""A fedpeft run as Flower sees it: the run config every ServerApp and ClientApp reads.

Flower gives each app ``context.run_config``: the app's ``[tool.flwr.app.config]`` in
pyproject.toml, overridden by the launcher (``fedpeft simulate``/``deploy``, ``flwr run
--run-config``). Its keys:

- ``config``: the resolved fedpeft config as JSON (what ``fedpeft simulate`` composed and
  validated). Empty when the app is started by ``flwr run .`` directly: the app then composes
  ``configs/`` itself (:func:`fedpeft.composing.compose`) with
- ``app-overrides``: the app's own Hydra overrides (pyproject.toml: a small, quick federation),
  then ``overrides``: the user's, the same ``KEY=VALUE`` / ``GROUP=OPTION`` words ``fedpeft
  simulate`` takes. Flower replaces a run-config value as a whole, so the two are separate keys:
  ``flwr run --run-config "overrides='strategy=flora'"`` adds to the app's overrides, and a key the
  user sets replaces the app's word for that key (:func:`overrides`);
- ``run-dir``: where the server writes (empty: ``runs/flwr/<time>``); ``resume``: continue the run
  in ``run-dir`` from its last complete round;
- ``shared-dir``: simulation only: where clients checkpoint their own state (top-k residuals,
  FedSA-LoRA's personal B) under ``client_<id>``, so that a resumed run (whose node states start
  empty) has it. Nothing is read from it while a run goes on: FLoRA's merges and each client's
  state travel with Flower's node state, so a worker on a machine that cannot see this directory
  (a Ray cluster without a shared disk) trains the same. Empty in a deployment: a node keeps its
  checkpoint in ``node_config["state-dir"]`` (if given).

Both apps get the typed :class:`fedpeft.config.Config` (dataclasses), never a dict read by key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedpeft import config as C
from fedpeft.composing import compose


@dataclass(frozen=True)
class RunSpec:
    """What the launcher says about the run besides its config."""

    run_dir: Path
    resume: bool = False
    shared_dir: str = ""


def to_run_config(cfg: DictConfig, run_dir: Path, *, resume: bool = False, shared_dir: str = "") -> dict[str, str | bool]:
    """The run config a launcher passes to Flower for a composed, validated ``cfg``."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return {"config": json.dumps(resolved, sort_keys=True), "overrides": "", "run-dir": str(Path(run_dir).resolve()),
            "resume": bool(resume), "shared-dir": shared_dir}


@lru_cache(maxsize=4)
def _config(config_json: str, overrides: str) -> DictConfig:
    if config_json:
        cfg = C.typed(json.loads(config_json))
        C.validate(cfg)
        return cfg
    return compose(overrides.split())


def _key(word: str) -> str:
    return word.lstrip("~+").split("=", 1)[0]


def overrides(run_config: dict[str, Any]) -> list[str]:
    """The Hydra overrides an app composes when no ``config`` is given: ``app-overrides``, less the
    words whose key ``overrides`` sets again, then ``overrides``."""
    user = str(run_config.get("overrides", "")).split()
    given = {_key(w) for w in user}
    return [w for w in str(run_config.get("app-overrides", "")).split() if _key(w) not in given] + user


def load(run_config: dict[str, Any]) -> tuple[DictConfig, RunSpec]:
    """The validated config and the run spec from a Flower ``run_config``. A bad config (an
    unknown override key under ``flwr run``) raises :class:`fedpeft.config.ConfigError` with its
    one line and no chained Hydra / OmegaConf traceback, as ``fedpeft deploy`` reports it. The run
    dir is absolute: an empty ``run-dir`` is ``runs/flwr/<time>`` under the working directory of
    the process running the ServerApp (the SuperLink's, under ``flwr run``)."""
    try:
        cfg = _config(str(run_config.get("config", "")), " ".join(overrides(run_config)))
    except C.ConfigError as e:  # bad input, not a crash: the one line, without the Hydra/OmegaConf errors it came from
        raise C.ConfigError(str(e)) from None
    run_dir = str(run_config.get("run-dir", "")) or str(Path("runs") / "flwr" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    return cfg, RunSpec(Path(run_dir).resolve(), bool(run_config.get("resume", False)), str(run_config.get("shared-dir", "")))


@lru_cache(maxsize=4)
def _settings(config_json: str, overrides: str) -> C.Config:
    return OmegaConf.to_object(_config(config_json, overrides))


def digest(cfg: DictConfig) -> str:
    """A short fingerprint of a resolved config: the server sends it with every train message and
    a node refuses to train with a config that differs (another app version, a stale override)."""
    return hashlib.sha256(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def _digest(config_json: str, overrides: str) -> str:
    return digest(_config(config_json, overrides))


def settings_digest(run_config: dict[str, Any]) -> str:
    """:func:`digest` of a run config's config (cached: a node checks it with every message)."""
    return _digest(str(run_config.get("config", "")), " ".join(overrides(run_config)))


def settings(run_config: dict[str, Any]) -> C.Config:
    """The typed config a ClientApp trains with (cached per run config); a bad one raises
    :class:`fedpeft.config.ConfigError` with its one line, as :func:`load` does."""
    try:
        return _settings(str(run_config.get("config", "")), " ".join(overrides(run_config)))
    except C.ConfigError as e:
        raise C.ConfigError(str(e)) from None

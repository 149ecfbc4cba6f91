"""``fedpeft simulate``: a ServerApp and the ClientApp on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fedpeft")

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
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def client_settings(cfg: DictConfig) -> dict[str, Any]:
    """What every client needs to know besides its payload (sent in each train message)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    return {
        "model": c["model"],
        "data": {k: c["data"][k] for k in ("name", "text_column", "label_column", "group_column")},
        "partition": c["partition"],
        "train": c["train"],
        "seed": c["seed"],
        "failure_rate": c["profile"]["failure_rate"],
        "reuse_model": c["engine"]["reuse_model"],
        "device": c["engine"]["device"],
        "num_cpus": c["engine"]["num_cpus"],
        "privacy": {"mode": c["privacy"]["mode"], "clip": c["privacy"]["clip"], "noise_multiplier": c["privacy"]["noise_multiplier"]},
        "compression": c["compression"],
    }


def privacy_plan(cfg: DictConfig, partitioner):
    """The noise multiplier and what each round composes into the privacy ledger.

    sample: every client runs ``train.local_steps`` DP-SGD steps per round at its Poisson rate
    ``1/ceil(n_k/batch)``; the ledger takes the largest rate (the smallest partition) and counts
    every round for every client (no amplification by client sampling is claimed).
    central / local: one Gaussian release per round per client, at the client sampling rate
    ``K/N`` (a fixed-size uniform sample, accounted as Poisson sampling at that rate, as in
    McMahan et al. 2018).
    ``privacy.target_epsilon`` without a noise multiplier: σ such that the last round spends it."""
    from clients.train import sample_rate
    from fedpeft.privacy import noise_multiplier_for
    from fedpeft.server import PrivacyPlan, sample_size

    pv = cfg.privacy
    if pv.mode == "none":
        return None
    if pv.mode == "sample":
        smallest = min(partitioner.load_partition(i).num_rows for i in range(cfg.clients))
        q, steps = sample_rate(smallest, cfg.train.batch_size), cfg.train.local_steps
    else:
        q, steps = sample_size(cfg.clients, cfg.fraction, cfg.min_clients) / cfg.clients, 1
    sigma = pv.noise_multiplier
    if sigma is None:
        sigma = noise_multiplier_for(pv.target_epsilon, pv.delta, q, steps * cfg.rounds)
    return PrivacyPlan(pv.mode, float(sigma), pv.clip, q, steps, pv.delta, budget=pv.target_epsilon)


def backend_config(cfg: DictConfig) -> dict[str, Any]:
    """Ray resources per client actor; a local Ray listens on 127.0.0.1 only."""
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
    if cfg.engine.ray_address:
        init["address"] = cfg.engine.ray_address
    resources: dict[str, Any] = {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus}
    return {"init_args": init, "client_resources": resources}


def bind_ray_to_loopback(cfg: DictConfig) -> None:
    """A local Ray (no ``engine.ray_address``) runs in single-node mode: node IP 127.0.0.1, and
    every Ray server (GCS, raylet, workers, runtime-env agent) listens on 127.0.0.1 only.

    Ray on Linux otherwise resolves the node IP to the machine's outward address and binds its
    gRPC servers to all interfaces, whatever ``_node_ip_address`` says. The switch is read when
    Ray is imported, so it must be set before that; Ray's worker processes inherit it.
    """
    if cfg.engine.ray_address:
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            log.warning("Ray was imported before fedpeft could keep it on 127.0.0.1; it may listen on other interfaces")


def check_resources(cfg: DictConfig) -> None:
    import torch

    from fedpeft.config import ConfigError

    if cfg.engine.ray_address:  # an existing cluster: its resources are not known here
        return
    if cfg.engine.num_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"engine.num_gpus: {cfg.engine.num_gpus} GPU per client asked for, but no CUDA device is visible (use engine.num_gpus=0)")
    if cfg.engine.num_gpus > torch.cuda.device_count():
        raise ConfigError(f"engine.num_gpus: {cfg.engine.num_gpus} GPUs per client asked for, but this machine has {torch.cuda.device_count()} "
                          f"(a local Ray could not place one client; lower engine.num_gpus or set engine.ray_address)")
    cpus = os.cpu_count() or 1
    if cfg.engine.num_cpus > cpus:
        raise ConfigError(f"engine.num_cpus: {cfg.engine.num_cpus:g} CPUs per client asked for, but this machine has {cpus} "
                          f"(a local Ray could not place one client; lower engine.num_cpus or set engine.ray_address)")


def prepare_data(cfg: DictConfig):
    """Load the dataset and partition it as the clients will (cached per process), check that the
    model's task fits the data, and pick the server's fixed evaluation subset."""
    from fedpeft import data as fdata
    from fedpeft.config import ConfigError

    ds = fdata.load(cfg.data.name, seed=cfg.seed, text_column=cfg.data.text_column, label_column=cfg.data.label_column, group_column=cfg.data.group_column)
    if cfg.data.name in fdata.BUILTIN:  # the column keys rename a user's columns; a built-in's are fixed
        cols = ds["train"].column_names
        for key, given, default in (("text_column", cfg.data.text_column, "text"), ("label_column", cfg.data.label_column, "label"),
                                    ("group_column", cfg.data.group_column, None)):
            if given != default and not (key == "group_column" and given == "group" and "group" in cols):
                raise ConfigError(f"data.{key}: built-in data {cfg.data.name!r} has the fixed columns {', '.join(cols)}; "
                                  f"data.{key} only renames a column of a Hugging Face dataset or a local path (drop the override)")
    task = fdata.task_of(ds)
    if cfg.model.task == "classification" and task != "classification":
        raise ConfigError(f"model.task: classification needs labelled data, but data {cfg.data.name!r} has no label column (use a causal_lm model, e.g. model=smollm2)")
    num_labels = len(fdata.label_names(ds)) if cfg.model.task == "classification" else None
    kw = {k: v for k, v in OmegaConf.to_container(cfg.partition).items() if k != "kind"}
    partitioner = fdata.partition(ds["train"], cfg.partition.kind, cfg.clients, seed=cfg.seed, **kw)
    test = ds["test"]
    if cfg.data.eval_samples and len(test) > cfg.data.eval_samples:
        test = test.shuffle(seed=cfg.seed).select(range(cfg.data.eval_samples))
    return ds, partitioner, test, num_labels


def strategy_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The strategy config's keys that the named strategy's dataclass takes, plus the run seed."""
    import dataclasses

    import strategies

    names = {f.name for f in dataclasses.fields(strategies.REGISTRY[cfg.strategy.name]) if f.init}
    given = {**OmegaConf.to_container(cfg.strategy, resolve=True), "seed": cfg.seed}
    return {k: v for k, v in given.items() if k in names and k != "name"}


class QuietClientFailures(logging.Filter):
    """Flower's simulation engine logs a ClientApp's exception as two ERROR tracebacks (its Ray
    backend's and its worker's) and then hands it to the server as an error reply, which fedpeft's
    server logs as one line naming the client. Drop the tracebacks (the records those two
    functions log at ERROR); everything else Flower logs passes."""

    SOURCES = (("raybackend.py", "process_message"), ("vce_api.py", "worker"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and any(record.pathname.endswith(f) and record.funcName == fn for f, fn in self.SOURCES))


def start_ray(cfg: DictConfig) -> None:
    """Start (or join) Ray here, as Flower's Ray backend would (``backend_config``'s init args, the
    driver's ``sys.path`` as the workers' ``PYTHONPATH``), instead of inside the simulation engine:
    Ray's native failure handler takes SIGTERM over when Ray starts, so :class:`StopOnInterrupt`
    must install its handlers after that. Flower then finds Ray running and uses it."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **backend_config(cfg)["init_args"])


class StopOnInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM during ``fedpeft simulate``: stop within seconds, keep what is done.

    Flower's simulation engine waits for the clients' running calls and the server's round (up to
    ``engine.round_timeout``) before it returns, minutes after a Ctrl-C. Instead, the first signal
    waits for a round that is being written (``guard``: its checkpoint and metrics row are written
    whole), records the run as interrupted (``finish``), shuts Ray down (its GCS, raylet and worker
    processes) and leaves the process with exit code 130. A second signal while that happens is
    ignored. Only for the command line (it ends the process), and only in the main thread."""

    def __init__(self, guard, finish) -> None:
        self.guard, self.finish = guard, finish
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.stop)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def stop(self, signum, frame) -> None:
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)
        code = 130 if signum == signal.SIGINT else 143
        try:
            if self.guard.acquire(timeout=60):
                self.finish()
        finally:
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


def rank_tag(cfg: DictConfig, ranks: list[int]) -> str:
    return str(ranks[0]) if len(set(ranks)) == 1 else f"{cfg.ranks.kind}:{min(ranks)}-{max(ranks)}"


class RunFailed(RuntimeError):
    """The federation ran but failed as a whole (most clients failed alike, or nothing was applied);
    the summary says ``status: failed`` and the completed rounds' checkpoints stay."""


def save_checkpoint(lm, path: Path) -> None:
    """The active adapter in peft format at ``path``, written whole or not at all (a sibling
    temporary directory, then a rename)."""
    import shutil

    from fedpeft.models import save_adapter

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(lm, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def run(cfg: DictConfig, run_dir: Path, *, interruptible: bool = False) -> dict[str, Any]:
    """Run one federation; returns the summary (also written to ``run_dir/summary.json``).
    ``interruptible``: Ctrl-C ends the process within seconds (:class:`StopOnInterrupt`; the CLI)."""
    setup_env()
    bind_ray_to_loopback(cfg)
    from flwr.app import MetricRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.exception import PrivacyBudgetExhausted
    from flwr.simulation import run_simulation

    import strategies
    from clients.app import app as client_app
    from clients.train import evaluate
    from fedpeft import data as fdata
    from fedpeft.config import validate
    from clients.app import save_merge
    from fedpeft.models import build, module_shapes, read_adapter, use_adapter
    from fedpeft.ranks import client_alpha, client_ranks
    from fedpeft.server import Codecs, FederationFailed, FlowerAdapter, load_global, sample_size, wrap_central_dp
    from fedpeft.tracking import Tracker, progress_line, say
    from strategies.base import ClientSpec

    flwr_log = logging.getLogger("flwr")  # Flower's own console handler; keep it off Hydra's root one
    flwr_log.setLevel(cfg.engine.flower_log_level)
    flwr_log.propagate = False
    if not any(isinstance(f, QuietClientFailures) for f in flwr_log.filters):
        flwr_log.addFilter(QuietClientFailures())
    validate(cfg)
    check_resources(cfg)
    from fedpeft.preflight import check_model, check_run_dir  # compose checks these too; --multirun jobs and API callers skip compose

    check_run_dir(run_dir)
    t_start = time.perf_counter()
    ds, partitioner, test, num_labels = prepare_data(cfg)
    check_model(cfg, num_labels)
    sizes = [partitioner.load_partition(i).num_rows for i in range(min(cfg.clients, 3))]
    ranks = client_ranks(cfg.ranks, cfg.clients, cfg.model.rank, cfg.seed)
    alphas = [client_alpha(cfg.ranks, r, cfg.model.rank, cfg.model.alpha) for r in ranks]
    lm = build(cfg.model, num_labels=num_labels, device=cfg.engine.device, seed=cfg.seed)
    r_max = max(ranks)
    use_adapter(lm, r_max, client_alpha(cfg.ranks, r_max, cfg.model.rank, cfg.model.alpha))
    initial = read_adapter(lm)
    strategy = strategies.build(cfg.strategy.name, **strategy_kwargs(cfg))
    plan = privacy_plan(cfg, partitioner)
    settings = client_settings(cfg)
    if plan is not None:
        settings["privacy"]["noise_multiplier"] = plan.noise_multiplier
    merge_store = run_dir / "merges"
    settings["merge_store"] = str(merge_store) if cfg.strategy.name == "flora" else None
    adapter = FlowerAdapter(
        strategy,
        initial,
        settings=settings,
        fraction=cfg.fraction,
        min_clients=cfg.min_clients,  # validate: at most clients
        client_spec=lambda i: ClientSpec(client_id=i, rank=ranks[i], alpha=alphas[i]),
        shapes=module_shapes(lm),
        seed=cfg.seed,
        on_merge=lambda v, merge: save_merge(merge_store, v, merge),
        privacy=plan,
        codecs=Codecs(cfg.compression.uplink, cfg.compression.downlink, cfg.compression.topk_fraction),
        num_clients=cfg.clients,
        identify_timeout=cfg.engine.round_timeout,
        # each client's reply must claim its partition's size, which the server knows in simulation
        expected_examples=lru_cache(maxsize=None)(lambda i: partitioner.load_partition(i).num_rows),
    )
    flower_strategy = wrap_central_dp(adapter, sample_size(cfg.clients, cfg.fraction, cfg.min_clients)) if cfg.privacy.mode == "central" else adapter
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = Tracker(
        run_dir,
        resolved,
        mode=cfg.tracking.mode,
        project=cfg.tracking.project,
        group=cfg.tracking.experiment,
        tags=[f"strategy:{cfg.strategy.name}", f"clients:{cfg.clients}", f"ranks:{rank_tag(cfg, ranks)}", f"data:{cfg.data.name}", f"partition:{cfg.partition.kind}"],
    )
    baseline = {"majority_rate": fdata.majority_rate(test)} if cfg.model.task == "classification" else {}
    (run_dir / "ranks.json").write_text(json.dumps({"ranks": ranks, "alphas": alphas}) + "\n")
    if plan is not None:
        say(
            f"privacy: {plan.mode}-level DP, noise multiplier {plan.noise_multiplier:.4f}, clip {plan.clip}, "
            f"δ={plan.delta}, {plan.steps_per_round} step(s) per round at sampling rate {plan.sample_rate:.4g}"
            + (f", budget ε={plan.budget}" if plan.budget is not None else "")
        )
        (run_dir / "privacy.json").write_text(json.dumps({"mode": plan.mode, "noise_multiplier": plan.noise_multiplier, "clip": plan.clip, "sample_rate": plan.sample_rate, "steps_per_round": plan.steps_per_round, "delta": plan.delta, "budget": plan.budget}) + "\n")
    say(f"client ranks ({cfg.ranks.kind}, alpha {cfg.ranks.alpha}): {ranks if len(ranks) <= 20 else ranks[:20] + ['...']}")
    say(
        f"{cfg.strategy.name} on {cfg.data.name} ({len(ds['train'])} train / {len(test)} eval examples, "
        f"{cfg.partition.kind} over {cfg.clients} clients, e.g. sizes {sizes}), model {cfg.model.name} "
        f"LoRA on {list(cfg.model.target_modules)}; run dir {run_dir}"
    )
    history: list[dict[str, Any]] = []
    guard = threading.Lock()
    failure: list[str] = []  # why the federation failed (FederationFailed), once

    def evaluate_fn(server_round: int, arrays) -> MetricRecord:
        if cfg.privacy.mode == "central":  # Flower's DP wrapper noised the aggregate
            adapter.adopt(arrays)
        load_global(lm, adapter.model)
        metrics = evaluate(lm, test, cfg.model.eval_batch_size)
        stats = adapter.stats.get(server_round)
        row: dict[str, Any] = dict(metrics)
        if stats is not None:
            row.update(stats.train_metrics)
            row.update(
                clients_sampled=stats.sampled, clients_replied=stats.replied, clients_failed=stats.failed,
                clients_rejected=stats.rejected, bytes_down=stats.bytes_down, bytes_up=stats.bytes_up,
                round_seconds=round(stats.seconds, 3), round_applied=int(stats.applied),
            )
            if stats.epsilon is not None:
                row["epsilon"] = stats.epsilon
        with guard:  # a round's checkpoint and its metrics row are written whole (see StopOnInterrupt)
            if cfg.tracking.save_adapters:
                save_checkpoint(lm, tracker.checkpoint_dir(server_round))
            tracker.log_round(server_round, row)
            history.append({"round": server_round, **row})
        say(progress_line(server_round, cfg.rounds, row, time.perf_counter() - t_start))
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        try:
            flower_strategy.start(grid, adapter.arrays(), num_rounds=cfg.rounds, timeout=cfg.engine.round_timeout, evaluate_fn=evaluate_fn)
        except PrivacyBudgetExhausted:
            say(f"stopped: {adapter.stopped}; the last checkpoint is round {len(history) - 1}")
        except FederationFailed as e:
            failure.append(str(e))

    summary: dict[str, Any] = {"run_dir": str(run_dir), "strategy": cfg.strategy.name, "rounds": cfg.rounds, "clients": cfg.clients, **baseline}
    status = "failed"

    def finish(status: str) -> None:
        summary.update(status=status, seconds=round(time.perf_counter() - t_start, 1), history=history, rounds_applied=adapter.rounds_applied)
        if history:
            summary["final"] = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
        if plan is not None:
            summary["privacy"] = {"mode": plan.mode, "noise_multiplier": plan.noise_multiplier, "epsilon": plan.accountant.epsilon(), "delta": plan.delta}
        tracker.finish(summary, exit_code={"finished": 0, "stopped": 0, "interrupted": 130}.get(status, 1))

    def interrupted() -> None:
        last = f"round {len(history) - 1}" + (f" (adapter in {tracker.checkpoint_dir(len(history) - 1)})" if cfg.tracking.save_adapters and history else "")
        say(f"interrupted: the run is stopped; the last complete round is {last}")
        finish("interrupted")

    try:
        if interruptible:
            start_ray(cfg)
        with StopOnInterrupt(guard, interrupted) if interruptible else contextlib.nullcontext():
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients, backend_config=backend_config(cfg))
        if failure:
            summary["error"] = failure[0]
            raise RunFailed(f"{failure[0]}; stopped after round {len(history) - 1}")
        if adapter.stopped:
            status = "stopped"
            summary["stopped"] = adapter.stopped
        elif len(history) != cfg.rounds + 1:
            raise RunFailed(f"the simulation ended after {len(history) - 1} of {cfg.rounds} rounds")
        elif adapter.rounds_applied == 0:
            summary["error"] = "no round applied an update"
            raise RunFailed(f"no round applied an update (clients failed or were rejected every round; see the log and {run_dir / 'metrics.jsonl'})")
        else:
            status = "finished"
    finally:
        finish(status)
    final = history[-1]
    where = f"; adapter in {tracker.checkpoint_dir(len(history) - 1)}" if cfg.tracking.save_adapters else f"; results in {run_dir}"
    if "accuracy" in final:
        say(f"done in {summary['seconds']:.0f}s: test accuracy {final['accuracy']:.4f} (majority-class rate {baseline['majority_rate']:.4f}){where}")
    else:
        say(f"done in {summary['seconds']:.0f}s: test perplexity {final['perplexity']:.2f}{where}")
    return summary

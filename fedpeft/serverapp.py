"""The fedpeft ServerApp: one module-level Flower app for ``fedpeft simulate``, ``flwr run .``,
``fedpeft deploy`` and a real SuperLink.

Everything it needs comes from ``context.run_config`` (:mod:`fedpeft.runconfig`). A
:class:`Federation` holds the run: the server's evaluation model, the strategy behind a
:class:`fedpeft.server.FlowerAdapter`, the tracker; it drives the rounds, and at the end of every
round writes the checkpoint, the metrics row and the whole server state (``state/server.pt``,
atomically), so that ``resume`` continues from the last complete round.

A ``personalized`` strategy (FedSA-LoRA) has no global model to evaluate: after each round's
aggregate (and before round 1) every client evaluates its own model on its held-out split
(evaluate messages, :meth:`fedpeft.server.FlowerAdapter.configure_evaluate`), and the row's
``accuracy`` and ``loss`` (``perplexity``) are then the *mean over clients* of theirs
(``personal/accuracy_mean``), next to the per-client values and percentiles; the server's own
test-set evaluation is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from omegaconf import DictConfig, OmegaConf

import strategies
from fedpeft import attacks, durable, runconfig, simnodes
from fedpeft.config import ConfigError, reset_unread, schema
from fedpeft.engines import EngineError, send_and_receive
from fedpeft.engines import get as get_engine
from fedpeft.launch import setup_env
from fedpeft.merges import save_merge
from fedpeft.metrics import divergence
from fedpeft.preflight import check_model, check_run_dir, prepare_data, privacy_plan, train_size
from fedpeft.ranks import client_alpha, client_ranks
from fedpeft.robust import RobustRule
from fedpeft.server import Codecs, FederationFailed, FlowerAdapter, load_global, sample_size, wrap_central_dp
from fedpeft.serveropt import ServerOptimizer
from fedpeft.tracking import RoundProgress, Tracker, hydra_overrides, progress_line, run_tags, say, varied_keys
from strategies.base import ClientSpec

# fedpeft.models, fedpeft.data and the client modules import transformers, peft and datasets,
# which read their environment (HF_HUB_OFFLINE, ...) when imported: the functions below import
# them when they run, after main() has called setup_env() (flwr run starts this app without it).

log = logging.getLogger("fedpeft")

STATE = Path("state") / "server.pt"  # relative to the run dir
MERGES = Path("state") / "merges"


class RunFailed(RuntimeError):
    """The federation ran but failed as a whole (most clients failed alike, or nothing was applied);
    the summary says ``status: failed`` and the completed rounds' checkpoints stay."""


class WriteFailed(RunFailed):
    """A file of the run could not be written (a full disk, a read-only directory): one line naming
    it, the last complete round and how to continue (:func:`write_failure`)."""


def write_failure(e: OSError, run_dir: Path, last: int | None) -> str:
    """``cannot write <path>: No space left on device; the last complete round is k; free space and
    continue with resume=<dir>`` (or, before any round is complete, start it again)."""
    fix = "free space" if durable.no_space(e) else "make it writable"
    where = (f"the last complete round is {last}; {fix} and continue with resume={run_dir}" if last is not None
             else f"no round is complete yet; {fix} and start the run again")
    return f"cannot write {e.filename}: {e.strerror}; {where}"


def strategy_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The strategy config's keys that the named strategy's dataclass takes, plus the run seed."""
    names = {f.name for f in dataclasses.fields(strategies.REGISTRY[cfg.strategy.name]) if f.init}
    given = {**OmegaConf.to_container(cfg.strategy, resolve=True), "seed": cfg.seed}
    return {k: v for k, v in given.items() if k in names and k != "name"}


def actor_death_note(plan) -> Any:
    """A client whose actor died (killed by Ray's memory monitor or the kernel's OOM killer: no
    line of its own) gets the run's memory plan and what to change added to its failure line."""
    import re

    def note(reason: str) -> str:
        if plan is None or "ClientOutOfMemory" in reason or not re.search(r"ActorDied|RayActorError|OutOfMemory|died|killed", reason):
            return ""
        s = plan.setting
        return (f" (its actor died: out of memory? the memory plan is {plan.per_actor / 1e9:.1f} GB per actor at train.batch_size={s.batch_size} x "
                f"model.max_length={s.max_length}; lower train.batch_size, set train.gradient_checkpointing=true or model.quantization=4bit, "
                "or run fewer actors at once)")

    return note


def byzantine_line(cfg: DictConfig) -> str:
    """The banner's line naming the attacking clients (``profile.byzantine``) and their attack."""
    pf = cfg.profile
    what = {"sign_flip": "θ_g − Δ", "scale": f"θ_g + {pf.attack_scale}·Δ", "gaussian": f"θ_g + N(0, {pf.attack_std}²)",
            "fixed": f"every entry {pf.attack_value}"}[pf.attack]
    return (f"byzantine: clients {sorted(attacks.attackers(cfg.seed, cfg.clients, pf.byzantine))} of {cfg.clients} "
            f"(profile.byzantine={pf.byzantine}) reply {pf.attack} ({what}) after honest training")


def lr_schedule(cfg: DictConfig):
    """Round → learning rate (:func:`fedpeft.schedule.lr_at`) when ``train.lr_schedule`` or
    ``train.warmup_rounds`` vary it; None for a constant ``train.lr`` (messages and metrics rows as before)."""
    from functools import partial

    from fedpeft.schedule import lr_at, scheduled

    t = cfg.train
    if not scheduled(t.lr_schedule, t.warmup_rounds):
        return None
    return partial(lr_at, rounds=cfg.rounds, lr=t.lr, lr_min=t.lr_min, schedule=t.lr_schedule, warmup_rounds=t.warmup_rounds)


def rank_tag(cfg: DictConfig, ranks: list[int]) -> str:
    return str(ranks[0]) if len(set(ranks)) == 1 else f"{cfg.ranks.kind}:{min(ranks)}-{max(ranks)}"


def save_checkpoint(lm, path: Path) -> None:
    """The active adapter in peft format at ``path``, written whole or not at all (a sibling
    temporary directory, then a rename). On the server that is the global adapter
    (:func:`fedpeft.server.load_global`), which carries every base merge (FLoRA's, FedEx-LoRA's,
    FeDeRA's) stacked with the adapter: it applies to the pre-trained base as loaded, quantized or
    not; the merges themselves are kept in the run's ``state/merges``."""
    from fedpeft.models import save_adapter

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(lm, tmp)
    except Exception as e:  # safetensors reports a full disk as its own error ("... (os error 28)")
        shutil.rmtree(tmp, ignore_errors=True)
        err = durable.os_error(e, path)
        if err is None:
            raise
        raise err from None
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def changed_keys(saved: dict[str, Any], new: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None) -> list[str]:
    """The dotted keys whose values differ between two resolved configs; ``rounds`` may grow and
    ``engine.*`` (how the clients run: Ray resources, device, per-client or cohort engine) may change.
    A key the saved config lacks (the run was saved before fedpeft had it) counts as unchanged when
    the new value is its default in ``defaults`` (the config schema's)."""
    out = []
    defaults = defaults or {}
    for k in sorted(set(saved) | set(new)):
        key = f"{prefix}{k}"
        if key == "engine":
            continue
        a, b = saved.get(k), new.get(k)
        if k not in saved and k in defaults and b == defaults[k]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, key + ".", defaults.get(k) if isinstance(defaults.get(k), dict) else None)
        elif a != b and not (key == "rounds" and isinstance(a, int) and isinstance(b, int) and b >= a):
            out.append(key)
    return out


STATE_KEYS = ("round", "config", "adapter")


def read_state(run_dir: Path) -> dict[str, Any]:
    """``state/server.pt`` of the run in ``run_dir``. A damaged one (truncated, or without its keys)
    is one line, which offers the previous round's state (``state/server.prev.pt``, kept by
    :meth:`Federation.record`) when that one is sound."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise ConfigError(f"resume: {run_dir} has no complete round to resume from (no {STATE})")
    try:
        return durable.load_torch(path, STATE_KEYS)
    except ValueError as e:
        damaged = str(e)
    prev = durable.previous(path)
    try:
        older = durable.load_torch(prev, STATE_KEYS) if prev.is_file() else None
    except ValueError:
        older = None
    if older is None:
        raise ConfigError(f"resume: {damaged}, and there is no sound previous state ({prev.name}) to fall back on: start the run again")
    raise ConfigError(f"resume: {damaged}; the state of round {older['round']} before it is sound: to resume from round {older['round']}, "
                      f"run: mv '{prev}' '{path}', then resume={run_dir} again")


def load_state(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """The server state of the run in ``run_dir`` to continue with ``cfg``; refuses a run with no
    complete round, a damaged state (:func:`read_state`) or ``metrics.jsonl``
    (:func:`fedpeft.durable.metrics_rows`: a half-written last row is cut off with a warning), a
    changed config (naming the keys; ``rounds`` may grow) or nothing left to do."""
    state = read_state(run_dir)
    try:
        durable.metrics_rows(Path(run_dir) / "metrics.jsonl", repair=True)
    except ConfigError as e:
        raise ConfigError(f"resume: {e}") from None
    saved = reset_unread(state["config"], warn=False)  # a key its strategy did not read: as it ran, at its default
    diff = changed_keys(saved, OmegaConf.to_container(cfg, resolve=True), defaults=OmegaConf.to_container(OmegaConf.structured(schema())))
    if diff:
        raise ConfigError(f"resume: the config differs from the run's in {', '.join(diff)} (only rounds, which may only grow, and engine.* may change)")
    if state["round"] >= cfg.rounds:
        raise ConfigError(f"resume: {run_dir} already finished all {cfg.rounds} rounds (raise rounds to continue it)")
    return state


# The federation running in this process, for an in-process launcher's Ctrl-C handler.
CURRENT: list["Federation"] = []


class Federation:
    """One run of the federation on the server: set up from the config (or from the run dir's
    state, to resume), then :meth:`run` drives the rounds on a Flower grid."""

    def __init__(self, cfg: DictConfig, spec: runconfig.RunSpec) -> None:
        self.cfg, self.run_dir, self.resume = cfg, Path(spec.run_dir), spec.resume
        self.t_start = time.perf_counter()
        self.guard = threading.Lock()  # a round's checkpoint, metrics row and state are written whole
        self.history: list[dict[str, Any]] = []
        self.samples: dict[int, list[dict[str, Any]]] = {}  # a round's generated samples, until record() logs them
        self.failure: str | None = None
        self.diverged: str | None = None  # fedpeft.metrics.divergence, once a round's evaluation loss says so
        self.status = "failed"
        self.state = self.saved_state() if self.resume else None
        self.saved_round = self.state["round"] if self.state is not None else None  # the last round whose state is written
        self.write_error: WriteFailed | None = None
        self.engine = get_engine(cfg.engine)  # how the rounds' messages reach the clients (engine.kind)
        if not self.resume:
            check_run_dir(self.run_dir)
        self.load_model()
        self.build_adapter()
        if self.state is not None:
            self.adapter.load_state_dict(self.state["adapter"])
        try:
            if self.state is not None:
                self.trim_to(self.state["round"])
            self.open_tracking()
            if self.state is not None:
                self.restore_adapters(self.state["round"])
        except OSError as e:  # a full disk or a read-only run dir before round 0: one line, as in record()
            raise WriteFailed(write_failure(e, self.run_dir, self.saved_round)) from None

    # ---------------------------------------------------------------- setup

    def saved_state(self) -> dict[str, Any]:
        return load_state(self.run_dir, self.cfg)

    def load_model(self) -> None:
        from fedpeft.models import build, use_adapter

        cfg = self.cfg
        self.ds, self.partitioner, self.test, num_labels = prepare_data(cfg)
        check_model(cfg, num_labels)  # the memory plan too: a run that cannot fit is refused before the model loads
        self.ranks = client_ranks(cfg.ranks, cfg.clients, cfg.model.rank, cfg.seed)
        self.alphas = [client_alpha(cfg.ranks, r, cfg.model.rank, cfg.model.alpha) for r in self.ranks]
        self.lm = build(cfg.model, num_labels=num_labels, device=cfg.engine.device, seed=cfg.seed, peft_cfg=cfg.peft)
        r_max = max(self.ranks)
        from fedpeft.memory import plan_for

        self.memory = plan_for(cfg, num_labels, r_max)
        use_adapter(self.lm, r_max, client_alpha(cfg.ranks, r_max, cfg.model.rank, cfg.model.alpha))
        try:  # a model the engine cannot train (the cohort engine batches LoRA on Linear layers) is refused before round 1
            self.engine.check_model(self.lm)
        except EngineError as e:
            raise ConfigError(str(e)) from None

    def build_adapter(self) -> None:
        from fedpeft.models import base_weight, module_shapes, read_adapter

        cfg = self.cfg
        strategy = strategies.build(cfg.strategy.name, **strategy_kwargs(cfg))
        self.counts = self.trained_counts(strategy)  # now, at r_max: merges and a resumed state change the server model's rank
        self.plan = privacy_plan(cfg, self.partitioner, strategy.personalized)
        merges = self.run_dir / MERGES
        ranks, alphas, partitioner = self.ranks, self.alphas, self.partitioner
        rslora = cfg.peft.name == "rslora"
        # FeDeRA initialises from the pre-trained weights: the server model's base weights are W_0 (merges never touch them;
        # a quantized or bf16 base: dequantized / upcast to float32)
        base = {m: base_weight(self.lm, m) for m in self.lm.modules} if strategy.needs_base_weights else None
        expected = lru_cache(maxsize=None)(lambda i: train_size(cfg, partitioner, i, strategy.personalized))
        self.secure = None  # secagg.enabled: each round's exchange runs Flower's SecAgg+ (fedpeft.secagg)
        if cfg.secagg.enabled:
            from fedpeft.secagg import SecAggPlus

            uniform = cfg.strategy.get("weighting") == "uniform"  # each client's weight: 1, else its num-examples (at most its partition's)
            max_weight = 1 if uniform else cfg.secagg.max_weight or max(expected(i) for i in range(cfg.clients))
            self.secure = SecAggPlus(cfg.secagg, max_weight=max_weight, timeout=cfg.engine.round_timeout)
        self.adapter = FlowerAdapter(
            strategy,
            read_adapter(self.lm),
            fraction=cfg.fraction,
            min_clients=cfg.min_clients,
            client_spec=lambda i: ClientSpec(client_id=i, rank=ranks[i], alpha=alphas[i], rslora=rslora),
            shapes=module_shapes(self.lm),
            seed=cfg.seed,
            on_merge=lambda v, merge: save_merge(merges, v, merge),
            privacy=self.plan,
            codecs=Codecs(cfg.compression.uplink, cfg.compression.downlink, cfg.compression.topk_fraction),
            num_clients=cfg.clients,
            identify_timeout=cfg.engine.round_timeout,
            # a reply from a node serving a partition must claim that partition's size
            expected_examples=expected,
            config_digest=runconfig.digest(cfg),
            base_weights=base,
            lr_at=lr_schedule(cfg),
            failure_note=actor_death_note(self.memory[0] if self.memory is not None else None),
            server_optimizer=ServerOptimizer.from_config(cfg.server),
            robust=RobustRule.from_config(cfg.server),
            known_partitions=simnodes.known,
            secure=self.secure,
        )
        central = cfg.privacy.mode == "central"
        self.strategy = wrap_central_dp(self.adapter, sample_size(cfg.clients, cfg.fraction, cfg.min_clients)) if central else self.adapter

    def trim_to(self, last: int) -> None:
        """Resume: keep what the state's last round wrote and drop anything a killed round left
        after it (a metrics row, an adapter, generated samples); the history is the metrics rows kept."""
        path = self.run_dir / "metrics.jsonl"
        kept = [r for r in durable.metrics_rows(path) if r["round"] <= last]
        durable.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        for d in (self.run_dir / "adapters").glob("round_*"):
            if d.name.endswith(".tmp") or int(d.name.split("_")[1]) > last:  # half-written, or after the state
                shutil.rmtree(d, ignore_errors=True)
        for f in (self.run_dir / "samples").glob("round_*"):
            if f.suffix != ".jsonl" or int(f.stem.split("_")[1]) > last:
                f.unlink()
        self.history = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in kept]

    def restore_adapters(self, last: int) -> None:
        """Resume: the last round's adapter checkpoint, if deleted, is written again from the state
        (the global model it holds is what that round saved); an earlier round's cannot be, and is named."""
        if not self.cfg.tracking.save_adapters:
            return
        from fedpeft.server import load_global

        if not self.tracker.checkpoint_dir(last).is_dir():
            load_global(self.lm, self.adapter.strategy.evaluated(self.adapter.model))
            save_checkpoint(self.lm, self.tracker.checkpoint_dir(last))
            say(f"resume: {self.tracker.checkpoint_dir(last)} was missing: written again from {self.run_dir / STATE}")
        gone = [r for r in range(last) if not self.tracker.checkpoint_dir(r).is_dir()]
        if gone:
            say(f"resume: the adapters of round(s) {', '.join(map(str, gone))} are missing from {self.run_dir / 'adapters'} "
                f"and cannot be written again (the state holds the last round's model only)")

    def open_tracking(self) -> None:
        """Write the run's config files and open its :class:`fedpeft.tracking.Tracker`: a W&B run in
        ``tracking.group`` (default: the experiment), ``job_type`` the strategy, tagged with what the
        run is and the keys the user varied (Hydra's recorded overrides, then ``tracking.tags``)."""
        from fedpeft import data as fdata

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            durable.write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            durable.write_text(self.run_dir / "ranks.json", json.dumps({"ranks": self.ranks, "alphas": self.alphas}) + "\n")
            if self.plan is not None:
                p = self.plan
                privacy = {"mode": p.mode, "noise_multiplier": p.noise_multiplier, "clip": p.clip, "sample_rate": p.sample_rate,
                           "steps_per_round": p.steps_per_round, "delta": p.delta, "budget": p.budget}
                durable.write_text(self.run_dir / "privacy.json", json.dumps(privacy) + "\n")
        varied = varied_keys(hydra_overrides(self.run_dir)) + list(cfg.tracking.tags or [])
        self.tracker = Tracker(
            self.run_dir, OmegaConf.to_container(cfg, resolve=True), mode=cfg.tracking.mode, project=cfg.tracking.project,
            group=cfg.tracking.group or cfg.tracking.experiment, job_type=cfg.strategy.name, resume=self.resume,
            tags=run_tags(cfg, rank_tag(cfg, self.ranks), varied),
        )
        self.baseline = {"majority_rate": fdata.majority_rate(self.test)} if cfg.model.task == "classification" else {}

    def trained_counts(self, strategy) -> dict[str, int]:
        """The parameters a client trains in a round, by group (fedpeft/methods): counted on the
        server model at the largest client rank before round 1 (FLoRA's and FlexLoRA's merges change
        its rank later), with LoRA's factors (``r·in`` for A, ``out·r`` for B) scaled to each client's
        own rank and averaged over the clients (rounded; exact when every client has one rank), and
        each group scaled by the strategy's ``trained_share`` (FFA-LoRA's frozen A is left out,
        RoLoRA's factors count half: one of them trains a round)."""
        from peft import get_peft_model_state_dict

        from fedpeft.models import active, short_name

        share = strategy.trained_share
        counts: dict[str, float] = {}
        mean_rank = sum(self.ranks) / len(self.ranks) / max(self.ranks)  # mean of r_k / r_max
        for key, t in get_peft_model_state_dict(self.lm.model, adapter_name=active(self.lm)).items():
            group = self.lm.groups.get(short_name(key))
            if group is not None and share.get(group, 1.0) > 0:
                scale = (mean_rank if group in ("lora_A", "lora_B") else 1.0) * share.get(group, 1.0)
                counts[group] = counts.get(group, 0) + t.numel() * scale
        return {g: round(n) for g, n in counts.items()}

    def method_line(self) -> str:
        """What the clients train: the PEFT method, where, and how many parameters by group."""
        cfg, counts = self.cfg, self.counts
        where = "" if cfg.peft.name in ("prompt_tuning", "prefix_tuning", "bitfit") else f" on {list(cfg.model.target_modules)}"
        per = " (a client's mean at its rank)" if len(set(self.ranks)) > 1 else ""
        return f"peft={cfg.peft.name}{where}, {sum(counts.values()):,} trained parameters{per} ({', '.join(f'{k} {v:,}' for k, v in counts.items())})"

    def banner(self) -> None:
        cfg, plan = self.cfg, self.plan
        if plan is not None:
            say(f"privacy: {plan.mode}-level DP, noise multiplier {plan.noise_multiplier:.4f}, clip {plan.clip}, "
                f"δ={plan.delta}, {plan.steps_per_round} step(s) per round at sampling rate {plan.sample_rate:.4g}"
                + (f", budget ε={plan.budget}" if plan.budget is not None else "") + self.default_note())
        if self.adapter.server_opt is not None:
            say(self.adapter.server_opt.optimizer.describe())
        if self.adapter.robust is not None:
            say(self.adapter.robust.describe())
        if cfg.profile.byzantine > 0:
            say(byzantine_line(cfg))
        ranks = self.ranks
        say(f"client ranks ({cfg.ranks.kind}, alpha {cfg.ranks.alpha}): {ranks if len(ranks) <= 20 else ranks[:20] + ['...']}")
        if self.memory is not None:
            say(self.memory[0].line())
        sizes = [self.partitioner.load_partition(i).num_rows for i in range(min(cfg.clients, 3))]
        say(f"{cfg.strategy.name} on {cfg.data.name} ({len(self.ds['train'])} train / {len(self.test)} eval examples, "
            f"{cfg.partition.kind} over {cfg.clients} clients, e.g. sizes {sizes}), model {cfg.model.name} "
            f"{self.method_line()}; run dir {self.run_dir}")
        if self.state is not None:
            say(f"resuming after round {self.state['round']} of {cfg.rounds}")

    def default_note(self) -> str:
        """Says when the privacy budget is the strategy's default (``privacy_default``), not the user's."""
        default = self.adapter.strategy.privacy_default
        if default is None or self.cfg.privacy.target_epsilon != default[1] or self.cfg.privacy.noise_multiplier is not None:
            return ""
        return f" (strategy={self.cfg.strategy.name}'s default target; set privacy.target_epsilon or privacy.noise_multiplier to change it)"

    # ---------------------------------------------------------------- rounds

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        """The global model's test metrics (a ``personalized`` strategy: the means of the clients'
        own, :meth:`personal_evaluation`) and the round's statistics: one metrics row. On
        instruction rows the test metrics are the response loss and perplexity and the generative
        metrics, and the round's generated samples wait in :attr:`samples` for :meth:`record`
        (:func:`fedpeft.evaluation.server_metrics`)."""
        from fedpeft.evaluation import server_metrics

        if self.cfg.privacy.mode == "central":  # Flower's DP wrapper noised the aggregate
            self.adapter.adopt(arrays)
        load_global(self.lm, self.adapter.strategy.evaluated(self.adapter.model))  # what the round's checkpoint saves (SLoRA: stage 1 as an adapter)
        row: dict[str, Any] = {}
        if self.adapter.strategy.personalized:
            personal = self.adapter.personal.get(server_round, {})
            row.update({k[len("personal/"):-len("_mean")]: v for k, v in personal.items() if k.startswith("personal/") and k.endswith("_mean")})
            row.update(personal)
        else:
            metrics, samples = server_metrics(self.lm, self.test, self.cfg)
            row.update(metrics)
            if samples:
                self.samples[server_round] = samples
        stats = self.adapter.stats.get(server_round)
        if stats is not None:
            row.update(stats.train_metrics)
            row.update(
                clients_sampled=stats.sampled, clients_replied=stats.replied, clients_failed=stats.failed,
                clients_rejected=stats.rejected, clients_missing=len(stats.missing), bytes_down=stats.bytes_down, bytes_up=stats.bytes_up,
                round_seconds=round(stats.seconds, 3), round_applied=int(stats.applied),
            )
            if stats.epsilon is not None:
                row["epsilon"] = stats.epsilon
        return row

    def record(self, server_round: int, row: dict[str, Any]) -> None:
        """End of a round: the adapter checkpoint, the metrics row (with the round's generated
        samples, :attr:`samples`), then the server state, each written whole; the state last, so a
        run killed before it resumes at this round again. The previous round's state stays beside
        it (``state/server.prev.pt``). A file that cannot be written (a full disk) is
        :class:`WriteFailed`, one line."""
        with self.guard:
            try:
                if self.cfg.tracking.save_adapters:
                    save_checkpoint(self.lm, self.tracker.checkpoint_dir(server_round))
                self.tracker.log_round(server_round, row, samples=self.samples.pop(server_round, None))
                self.history.append({"round": server_round, **row})
                durable.save_torch({"round": server_round, "config": OmegaConf.to_container(self.cfg, resolve=True),
                                    "adapter": self.adapter.state_dict()}, self.run_dir / STATE, keep_previous=True)
            except OSError as e:
                self.history = [h for h in self.history if h["round"] != server_round]
                self.write_error = WriteFailed(write_failure(e, self.run_dir, self.saved_round))
                self.error = str(self.write_error)
                raise self.write_error from None
            self.saved_round = server_round
        say(progress_line(server_round, self.cfg.rounds, row, time.perf_counter() - self.t_start))
        if self.diverged is None:  # said once, at the first round that diverged (fedpeft.metrics.divergence)
            self.diverged = divergence(self.history)
            if self.diverged:
                log.warning(self.diverged)

    def rounds(self, grid: Grid) -> None:
        """Flower's round loop (``Strategy.start``: configure_train → the engine's exchange →
        aggregate_train → evaluate), from the round after the last complete one; while a round's
        clients train, :class:`fedpeft.tracking.RoundProgress` shows how many have finished."""
        arrays = self.adapter.arrays()
        first = 1
        self.adapter.check_partitions(grid)  # every partition of the run has a node, or the run is refused
        if self.state is None:
            self.personal_evaluation(0, arrays, grid)
            self.record(0, self.evaluate(0, arrays))
        else:
            first = self.state["round"] + 1
        previous = None  # the last round's training time: the next round's first ETA
        for r in range(first, self.cfg.rounds + 1):
            messages = list(self.strategy.configure_train(r, arrays, ConfigRecord(), grid))
            progress = RoundProgress(r, self.cfg.rounds, len(messages), previous=previous)
            exchange = self.secure.exchange if self.secure is not None else self.engine.exchange
            try:
                replies = exchange(grid, messages, self.adapter.partition_of, progress.update)
            finally:
                progress.close()
            previous = progress.elapsed
            new, _ = self.strategy.aggregate_train(r, replies)
            if new is not None:
                arrays = new
            self.personal_evaluation(r, arrays, grid)
            self.record(r, self.evaluate(r, arrays))

    def personal_evaluation(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> None:
        """Flower's evaluate step (``configure_evaluate`` → send_and_receive → ``aggregate_evaluate``):
        for a ``personalized`` strategy every client evaluates its own model; nothing otherwise."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        if messages:
            self.strategy.aggregate_evaluate(server_round, send_and_receive(grid, messages, self.cfg.engine.round_timeout))

    def run(self, grid: Grid) -> dict[str, Any]:
        self.banner()
        CURRENT.append(self)
        try:
            try:
                self.rounds(grid)
            except PrivacyBudgetExhausted:
                say(f"stopped: {self.adapter.stopped}; the last checkpoint is round {len(self.history) - 1}")
            except FederationFailed as e:
                self.failure = str(e)
            except (KeyboardInterrupt, SystemExit):  # a deployment's launcher stopping this process
                self.status = "interrupted"
                raise
            self.status = self.outcome()
        finally:
            CURRENT.remove(self)
            with self.guard:
                self.finish(self.status)
        if self.status == "failed":
            raise RunFailed(self.summary["error"] + (f"; stopped after round {len(self.history) - 1}" if self.failure and self.history else ""))
        self.say_done()
        return self.summary

    def outcome(self) -> str:
        if self.failure:
            self.error = self.failure
            return "failed"
        if self.adapter.stopped:
            return "stopped"
        if self.adapter.rounds_applied == 0:
            self.error = f"no round applied an update (clients failed or were rejected every round; see the log and {self.run_dir / 'metrics.jsonl'})"
            return "failed"
        return "finished"

    def finish(self, status: str) -> None:
        """Write ``summary.json`` (and close W&B) with ``status``."""
        cfg, plan = self.cfg, self.plan
        s: dict[str, Any] = {"run_dir": str(self.run_dir), "strategy": cfg.strategy.name, "rounds": cfg.rounds, "clients": cfg.clients, **self.baseline}
        counts = self.counts
        s.update(peft=cfg.peft.name, trainable_params=sum(counts.values()), trainable_by_group=counts)
        s.update(status=status, seconds=round(time.perf_counter() - self.t_start, 1), history=self.history, rounds_applied=self.adapter.rounds_applied)
        if status == "failed":
            s["error"] = getattr(self, "error", None) or "the run ended before its rounds were done"
        if self.adapter.stopped:
            s["stopped"] = self.adapter.stopped
        s["diverged"] = divergence(self.history)
        if self.history:
            s["final"] = {k: v for k, v in self.history[-1].items() if isinstance(v, (int, float))}
        if plan is not None:
            s["privacy"] = {"mode": plan.mode, "noise_multiplier": plan.noise_multiplier, "epsilon": plan.accountant.epsilon(), "delta": plan.delta}
        self.summary = s
        try:
            self.tracker.finish(s, exit_code={"finished": 0, "stopped": 0, "interrupted": 130}.get(status, 1))
        except OSError as e:
            if self.write_error is None:  # else the write that failed first is the one to name
                self.write_error = WriteFailed(write_failure(e, self.run_dir, self.saved_round))
                raise self.write_error from None

    def interrupted(self) -> None:
        """Ctrl-C / SIGTERM (called by the launcher with :attr:`guard` held): record the run as interrupted."""
        last = len(self.history) - 1
        where = f" (adapter in {self.tracker.checkpoint_dir(last)})" if self.cfg.tracking.save_adapters and self.history else ""
        if self.history:
            say(f"interrupted: the run is stopped; the last complete round is round {last}{where}; continue it with resume={self.run_dir}")
        else:  # stopped during round 0's evaluation: no state was saved, so there is nothing to resume
            say(f"interrupted: the run is stopped before any round completed (round 0 is the initial evaluation); nothing to resume in {self.run_dir}")
        self.finish("interrupted")

    def say_done(self) -> None:
        final, last = self.history[-1], len(self.history) - 1
        where = f"; adapter in {self.tracker.checkpoint_dir(last)}" if self.cfg.tracking.save_adapters else f"; results in {self.run_dir}"
        diverged = f"; {self.summary['diverged']}" if self.summary.get("diverged") else ""
        what = "personalised (mean over clients' held-out splits)" if self.adapter.strategy.personalized else "test"
        if "accuracy" in final:
            say(
                f"done in {self.summary['seconds']:.0f}s: {what} accuracy {final['accuracy']:.4f} "
                f"(majority-class rate {self.baseline['majority_rate']:.4f}){diverged}{where}"
            )
        elif "perplexity" in final:
            from fedpeft.generate import summary_line

            gen = summary_line(final)
            say(f"done in {self.summary['seconds']:.0f}s: {what} perplexity {final['perplexity']:.2f}{'; ' + gen if gen else ''}{diverged}{where}")
        else:
            say(f"done in {self.summary['seconds']:.0f}s: no evaluation in the last round (see the log){where}")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, set the federation up (or pick it up from its state) and run it."""
    setup_env()
    cfg, spec = runconfig.load(context.run_config)
    Federation(cfg, spec).run(grid)

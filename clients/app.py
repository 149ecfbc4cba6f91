"""The Flower ClientApp: decode the payload, train on this node's data, reply with the update.

One module-level app for every engine: a simulation worker (Ray actor), ``flwr run`` and a real
SuperNode import it. It reads the run's typed config from ``context.run_config``
(:func:`fedpeft.runconfig.settings`) and who it is from ``context.node_config``
(``partition-id``; ``num-partitions`` or a device's own ``data-path``; optional ``state-dir``).
``train_handler`` trains and replies with the plain update; Flower mods around it add what wraps
any strategy: the fault profile, Byzantine attackers (:func:`byzantine`), local DP (clip and noise
the update) and the uplink codec.
Module-level caches keep the base model and the data for the life of the worker process, so a
worker loads the model once and serves many clients and rounds; only adapter tensors (and the
head) arrive with each message.
"""

from __future__ import annotations

import json
import os
import random
from copy import copy
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from safetensors.torch import load_file, save_file

from clients import partition_cache
from clients.cohort import CohortError, CohortJob, train_cohort
from clients.train import DPSettings, TrainSettings, evaluate, release, train
from fedpeft import attacks, cohorts, instruct, messages, privacy, runconfig, scaffold
from fedpeft import data as fdata
from fedpeft import merges as merge_forms
from fedpeft.config import Config, DataConfig, PartitionConfig
from fedpeft.lora import LoraFactors
from fedpeft.models import LoadedModel, apply_merge, build, module_shapes, use_adapter, write_adapter
from fedpeft.plan import UPLOAD_DENSITY, ClientPlan, Payload
from fedpeft.secagg import secure_aggregation_mod

_MODELS: dict[str, LoadedModel] = {}


class InjectedFailure(RuntimeError):
    """Raised by a client that the failure profile chose to fail this round."""


def get_model(s: Config, num_labels: int | None, run_id: int = 0) -> LoadedModel:
    """The worker's cached model for these settings (built once), or a new one if reuse is off."""
    # A run with base merges (FLoRA) changes the base weights: key the cache by run as well.
    key = json.dumps({"model": asdict(s.model), "peft": asdict(s.peft), "labels": num_labels, "device": s.engine.device, "run": run_id}, sort_keys=True)
    if not s.engine.reuse_model:
        return build(s.model, num_labels=num_labels, device=s.engine.device, seed=s.seed, peft_cfg=s.peft)
    if key not in _MODELS:
        _MODELS.clear()  # one base model per worker: a new run replaces the old one
        _MODELS[key] = build(s.model, num_labels=num_labels, device=s.engine.device, seed=s.seed, peft_cfg=s.peft)
    return _MODELS[key]


def _load(name: str, data: DataConfig, seed: int, model: str = ""):
    """``data`` read from ``name``; instruction data are rendered with model ``model``'s tokenizer."""
    return fdata.load(name, seed=seed, text_column=data.text_column, label_column=data.label_column, group_column=data.group_column,
                      instruct=instruct.spec(data, model))


@lru_cache(maxsize=4)
def _partitioner(data_json: str, partition_json: str, num_partitions: int, seed: int, model: str = ""):
    data, p = DataConfig(**json.loads(data_json)), json.loads(partition_json)
    ds = _load(data.name, data, seed, model)
    return fdata.partition(ds["train"], p.pop("kind"), num_partitions, seed=seed, **p), ds


def get_partitioner(data: DataConfig, partition: PartitionConfig, num_partitions: int, seed: int, model: str = ""):
    """The partitioner of ``data`` into ``num_partitions`` (cached per worker process) and the
    dataset (instruction data rendered with model ``model``'s tokenizer)."""
    return _partitioner(json.dumps(asdict(data), sort_keys=True), json.dumps(asdict(partition), sort_keys=True), num_partitions, seed, model)


@lru_cache(maxsize=2)
def _local_data(path: str, data_json: str, seed: int, model: str = ""):
    return _load(path, DataConfig(**json.loads(data_json)), seed, model)


def node_data(s: Config, node_config: dict):
    """This node's data: on a device, the file at ``node_config["data-path"]`` (any format
    ``data.name`` takes, with the same columns), all of its train split; in simulation (and a local
    deployment), partition ``partition-id`` of ``num-partitions`` of ``data.name``, split as the
    server splits it. A partition of a built-in or local dataset comes from the node-local disk
    cache (:mod:`clients.partition_cache`): a cold process (a deployment starts one per message)
    memory-maps it instead of loading and cutting the whole dataset."""
    if "data-path" in node_config:
        return _local_data(str(node_config["data-path"]), json.dumps(asdict(s.data), sort_keys=True), s.seed, s.model.name)["train"]
    num_partitions, pid = int(node_config["num-partitions"]), int(node_config["partition-id"])

    def build():
        return get_partitioner(s.data, s.partition, num_partitions, s.seed, s.model.name)[0].load_partition(pid)

    source = partition_cache.path_signature(s.data.name)
    if s.data.name not in fdata.BUILTIN and source is None:  # a hub id: its content is not pinned here, so not cached
        return build()
    key = {"data": asdict(s.data), "partition": asdict(s.partition), "num-partitions": num_partitions, "seed": s.seed,
           "model": s.model.name, "partition-id": pid, "code": partition_cache.code_digest(), "versions": partition_cache.versions(),
           "data-files": source, "model-files": partition_cache.path_signature(s.model.name)}
    return partition_cache.cached(key, build)


def local_data(s: Config, node_config: dict, plan: ClientPlan):
    """This node's training data (:func:`node_data`; with a ``personalised`` plan, whose client
    keeps part of its model, the 80% of it that :func:`fedpeft.data.held_out` leaves for training)."""
    part = node_data(s, node_config)
    return fdata.held_out(part, s.seed)["train"] if plan.personalised else part


def held_out_data(s: Config, node_config: dict, plan: ClientPlan):
    """This node's held-out 20% (:func:`fedpeft.data.held_out`), on which a client with a
    ``personalised`` plan evaluates its own model."""
    if not plan.personalised:
        raise ValueError(f"strategy={s.strategy.name} evaluates the global model on the server, not on clients")
    return fdata.held_out(node_data(s, node_config), s.seed)["test"]


def should_fail(seed: int, server_round: int, partition_id: int, rate: float) -> bool:
    """Seeded, reproducible fault injection: the same clients fail in the same rounds."""
    return rate > 0 and random.Random(f"{seed}/{server_round}/{partition_id}").random() < rate


def sync_base(lm: LoadedModel, target: int, merges: dict) -> None:
    """Bring this worker's cached base to version ``target`` exactly: apply the missing FLoRA
    merges in order, from ``merges``: the message's (the server sends each node the merges it has
    not seen) with the ones its node kept from earlier messages (:func:`kept_merges`). A worker may
    lag behind the node it serves (in simulation one worker process serves several nodes, on any
    machine of a Ray cluster; a device starts a new process for each message): the node's merges
    bring it up. Message and node state hold each merge in the one form the server chose for it
    (:mod:`fedpeft.merges`), so every worker's base is the same bit for bit."""
    if lm.base_version > target:
        raise RuntimeError(f"worker base is at version {lm.base_version}, ahead of the requested {target}")
    for v in range(lm.base_version + 1, target + 1):
        if v not in merges:
            raise RuntimeError(f"base merge {v} is neither in the message nor in this node's state (this worker's base is at version {lm.base_version})")
        apply_merge(lm, merges[v])


app = ClientApp()


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """The server asks each node once which partition (client id) it serves: Flower's node ids are
    random, the partition id in ``context.node_config`` is what ranks and sampling follow; and
    whether it trains on its own local data (``data-path``) rather than that partition."""
    pid = int(context.node_config["partition-id"])
    local = "data-path" in context.node_config  # a device with its own data: the server cannot know its size
    return Message(content=RecordDict({messages.CONFIG: ConfigRecord({"partition-id": pid, "local-data": local})}), reply_to=msg)


@dataclass(frozen=True)
class Step:
    """One train message as this node sees it: the run's typed settings and the round's plan."""

    settings: Config
    decoded: messages.Decoded
    server_round: int
    partition_id: int
    rank: int
    alpha: float
    base_version: int
    noise_multiplier: float | None
    plan: ClientPlan
    lr: float | None = None  # the round's scheduled learning rate (train.lr_schedule); None: train.lr

    def train_settings(self) -> TrainSettings:
        """This client's local training in this round: ``train.*`` at the round's learning rate."""
        return TrainSettings.of(self.settings.train, self.lr)

    @property
    def send_A(self) -> bool:
        """Whether the reply carries A (not when A is frozen: FFA-LoRA, RoLoRA's B rounds)."""
        return self.plan.uplink[0]

    @property
    def send_B(self) -> bool:
        """Whether the reply carries B (not when B is frozen, RoLoRA's A rounds, or personal, FedSA-LoRA)."""
        return self.plan.uplink[1]

    def seed(self, stream: int) -> int:
        """A seed for one random stream of this client in this round (0: training, 2: local DP noise, 3: codec, 4: an attacker's noise)."""
        key = (self.settings.seed, self.server_round, self.partition_id, stream) if stream else (self.settings.seed, self.server_round, self.partition_id)
        return hash(key) % (2**31)


def read_step(msg: Message, context: Context) -> Step:
    dec = messages.decode(msg.content)
    c = dec.config
    if "config-digest" in c and c["config-digest"] != runconfig.settings_digest(context.run_config):
        raise ValueError(f"this node's run config (digest {runconfig.settings_digest(context.run_config)}) differs from the server's "
                         f"({c['config-digest']}): are both running the same fedpeft app and config?")
    nm = c.get("noise-multiplier")
    mode = runconfig.settings(context.run_config).privacy.mode
    if mode in ("sample", "local") and not isinstance(nm, (int, float)):
        raise ValueError(f"privacy.mode={mode}, but the train message carries no noise-multiplier (a server without this run's privacy plan?)")
    return Step(
        settings=runconfig.settings(context.run_config), decoded=dec, server_round=int(c["server-round"]),
        partition_id=int(context.node_config["partition-id"]), rank=int(c["rank"]), alpha=float(c["alpha"]),
        base_version=int(c["base-version"]), noise_multiplier=None if nm is None else float(nm),
        plan=ClientPlan.from_config({k: v for k, v in c.items() if k not in RESERVED}),
        lr=float(c["lr"]) if "lr" in c else None,
    )


def node_model(step: Step, context: Context) -> LoadedModel:
    s = step.settings
    part = node_data(s, context.node_config)  # its features carry the dataset's class labels
    return get_model(s, len(fdata.label_names(part)) if s.model.task == "classification" else None, context.run_id)


def start_of(step: Step, context: Context) -> dict[str, torch.Tensor]:
    """The arrays this client started training from (the reference of its update's delta)."""
    return messages.start_tensors(step.decoded, module_shapes(node_model(step, context)), step.rank, step.alpha, send_A=step.send_A, send_B=step.send_B)


# ------------------------------------------------------------------ mods (Flower's client middleware)


def fault_profile(msg: Message, context: Context, call_next) -> Message:
    """``profile.failure_rate``: the client raises instead of training, seeded by (seed, round, client)."""
    rate = runconfig.settings(context.run_config).profile.failure_rate
    if rate == 0:  # off: the message is decoded once, by the train handler
        return call_next(msg, context)
    step = read_step(msg, context)
    if should_fail(step.settings.seed, step.server_round, step.partition_id, rate):
        raise InjectedFailure(f"client {step.partition_id}: injected failure in round {step.server_round} (profile.failure_rate={rate})")
    return call_next(msg, context)


def compress_update(msg: Message, context: Context, call_next) -> Message:
    """``compression.uplink``: the reply's update, coded as its difference from the start with the
    codec; for top-k with error feedback the dropped part is kept as this node's residual
    (Flower's node state, and ``<state dir>/residual_<round>.safetensors`` for a resumed run).
    A plan's ``upload_density`` (FLASC) instead: the top-k of the whole difference (all its
    tensors together) at that density, nothing kept."""
    reply = call_next(msg, context)
    codec = runconfig.settings(context.run_config).compression
    config = msg.content.config_records.get(messages.CONFIG, {})
    if (codec.uplink == "none" and UPLOAD_DENSITY not in config) or reply.has_error():
        return reply
    step = read_step(msg, context)
    density = step.plan.upload_density
    kind, fraction = ("topk", density) if density is not None else (codec.uplink, codec.topk_fraction)
    rec = messages.decode(reply.content, kept=step.decoded.adapter)
    residual = None
    if density is None and codec.uplink == "topk" and codec.error_feedback:
        residual = load_residual(step, context)
    content = messages.encode(
        rec.adapter, rec.head, rec.config, send_A=step.send_A, send_B=step.send_B, codec=kind, fraction=fraction,
        reference=start_of(step, context), generator=torch.Generator().manual_seed(step.seed(3)), residual=residual,
        joint=density is not None,
    )
    if residual is not None:
        save_residual(step, context, residual)
    content[messages.METRICS] = reply.content.metric_records[messages.METRICS]
    if scaffold.RECORD in reply.content.array_records:  # SCAFFOLD's Δc_i travels as it is (full precision)
        content[scaffold.RECORD] = reply.content.array_records[scaffold.RECORD]
    return Message(content=content, reply_to=msg)


def byzantine(msg: Message, context: Context, call_next) -> Message:
    """``profile.byzantine``: an attacking client (one of the run's fixed attackers,
    :func:`fedpeft.attacks.attackers`) trains honestly, then replaces every tensor it sends by the
    ``profile.attack`` of it relative to the start it received (:func:`fedpeft.attacks.attack`):
    after any local DP noise (an attacker need not honour it), before the uplink codec (the wire
    format the server decodes)."""
    reply = call_next(msg, context)
    pf = runconfig.settings(context.run_config).profile
    if pf.byzantine == 0 or reply.has_error():
        return reply
    step = read_step(msg, context)
    if step.partition_id not in attacks.attackers(step.settings.seed, step.settings.clients, pf.byzantine):
        return reply
    rec = messages.decode(reply.content, kept=step.decoded.adapter)
    sent = messages.tensors_of(rec.adapter, rec.head, send_A=step.send_A, send_B=step.send_B)
    start = start_of(step, context)
    out = attacks.attack(pf.attack, sent, {k: messages.slice_like(start, k, t) for k, t in sent.items()}, scale=pf.attack_scale,
                         std=pf.attack_std, value=pf.attack_value, generator=torch.Generator().manual_seed(step.seed(4)))
    adapter = {m: LoraFactors(out[f"A/{m}"] if step.send_A else f.A, out[f"B/{m}"] if step.send_B else f.B, f.scaling) for m, f in rec.adapter.items()}
    content = messages.encode(adapter, {h: out[f"head/{h}"] for h in rec.head}, rec.config, send_A=step.send_A, send_B=step.send_B)
    content[messages.METRICS] = reply.content.metric_records[messages.METRICS]
    if scaffold.RECORD in reply.content.array_records:  # SCAFFOLD's Δc_i travels as the honest client computed it
        content[scaffold.RECORD] = reply.content.array_records[scaffold.RECORD]
    return Message(content=content, reply_to=msg)


def local_dp(msg: Message, context: Context, call_next) -> Message:
    """``privacy.mode=local``: the update ``Δ`` (what is sent, minus the start) is clipped to
    ``‖Δ‖₂ ≤ clip`` and ``N(0, (σ·clip)²)`` is added to every entry, before any compression."""
    reply = call_next(msg, context)
    pv = runconfig.settings(context.run_config).privacy
    if pv.mode != "local" or reply.has_error():
        return reply
    step = read_step(msg, context)
    rec = messages.decode(reply.content, kept=step.decoded.adapter)
    g = torch.Generator().manual_seed(step.seed(2))
    adapter, head, norm = noised_update(rec.adapter, rec.head, start_of(step, context), pv.clip, step.noise_multiplier, g,
                                        send_A=step.send_A, send_B=step.send_B)
    content = messages.encode(adapter, head, rec.config, send_A=step.send_A, send_B=step.send_B)
    metrics = dict(reply.content.metric_records[messages.METRICS])
    content[messages.METRICS] = messages.metric_record({**metrics, "update_norm": norm})
    return Message(content=content, reply_to=msg)


def prepare(step: Step, context: Context) -> tuple[LoadedModel, Any]:
    """This node's cached model with its base at the step's version (FLoRA's merges applied), and
    its training data."""
    s = step.settings
    torch.set_num_threads(max(1, int(s.engine.num_cpus)))
    part = local_data(s, context.node_config, step.plan)
    lm = node_model(step, context)
    # The node state keeps every merge its node was sent (Flower carries it with each message, to
    # whichever worker and machine serves the node): a worker behind its node catches up from it.
    merges = {**kept_merges(context), **step.decoded.merges}
    keep_merges(context, step.decoded.merges)
    sync_base(lm, step.base_version, merges)
    return lm, part


def payload_of(step: Step, context: Context, *, through: int | None = None) -> Payload:
    """What this client starts from: the message's payload; with a personal B (FedSA-LoRA) its
    A (the global one) with this client's own B as of round ``through`` (default: the round before
    this one; :func:`load_personal_B`), or peft's init B = 0 before its first training round."""
    adapter = step.decoded.adapter
    if step.plan.personal_B:
        own = load_personal_B(step, context, through=step.server_round - 1 if through is None else through)
        adapter = with_personal_B(adapter, own, step.partition_id)
    return Payload(adapter=adapter, head=step.decoded.head, plan=step.plan, base_version=step.base_version)


def with_personal_B(adapter: dict[str, LoraFactors], own: dict[str, torch.Tensor], client_id: int) -> dict[str, LoraFactors]:
    """``adapter``'s A and scalings with the client's own B per module (``own``; empty: keep
    ``adapter``'s B, the zero placeholder a payload without B decodes to)."""
    if not own:
        return dict(adapter)
    out = {}
    for m, f in adapter.items():
        B = own.get(m)
        if B is None or tuple(B.shape) != tuple(f.B.shape):
            raise ValueError(f"client {client_id}: its stored B of module {m!r} is {None if B is None else tuple(B.shape)}, expected {tuple(f.B.shape)}")
        out[m] = LoraFactors(f.A, B.to(dtype=f.B.dtype, device=f.B.device), f.scaling)
    return out


def plain_reply(msg: Message, step: Step, update, metrics: dict) -> Message:
    """The reply carrying the plain update (before the mods' local DP and compression)."""
    reply = {"num-examples": update.num_examples, "partition-id": step.partition_id, **step.plan.reply_config()}
    content = messages.encode(update.adapter, update.head, reply, send_A=step.send_A, send_B=step.send_B)
    content[messages.METRICS] = messages.metric_record({**metrics, "num-examples": update.num_examples})
    return Message(content=content, reply_to=msg)


# The mods every client's train reply passes through, outermost first: in the per-client handler
# (Flower applies them) and for each member of a cohort (cohort_handler applies the same list).
# Outermost, secagg.enabled: Flower's SecAgg+ (fedpeft.secagg) masks what the others produce.
MODS = [secure_aggregation_mod, fault_profile, compress_update, byzantine, local_dp]


@app.train(mods=MODS)
def train_handler(msg: Message, context: Context) -> Message:
    """Train on this node's data from the payload; reply with the plain update (the mods above
    add local DP and compression)."""
    step = read_step(msg, context)
    s = step.settings
    lm, part = prepare(step, context)
    use_adapter(lm, step.rank, step.alpha)
    dp = DPSettings(step.noise_multiplier, s.privacy.clip) if s.privacy.mode == "sample" else None
    settings = step.train_settings()
    c = c_i = correction = None
    if step.plan.scaffold:  # SCAFFOLD: the server's c (in the message) and this client's own c_i
        x = start_of(step, context)
        c = messages.decode_control(msg.content, {k: tuple(t.shape) for k, t in x.items()})
        c_i = load_control(step, context)
        correction = scaffold.correction(c, c_i)
    update, metrics = train(lm, payload_of(step, context), part, settings, seed=step.seed(0), client_id=step.partition_id, dp=dp,
                            correction=correction)
    if step.plan.personal_B:
        save_personal_B(step, context, update.adapter)
    reply = plain_reply(msg, step, update, metrics)
    if c is not None:  # option II: keep c_i⁺ = c_i − c + (x − y_i)/(K η_l), send Δc_i = c_i⁺ − c_i
        y = messages.tensors_of(update.adapter, update.head, send_A=step.send_A, send_B=step.send_B)
        new, delta = scaffold.client_update(c_i, c, x, y, settings.local_steps, settings.lr)
        save_control(step, context, new)
        reply.content[scaffold.RECORD] = messages.encode_control(delta)
    return reply


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Personalised evaluation (a ``personalized`` strategy, FedSA-LoRA): this client's own model,
    the message's global A and head with its own B as of this round (:func:`payload_of`), on its
    held-out split (:func:`held_out_data`); replies ``accuracy`` and ``loss`` (or ``loss`` and
    ``perplexity``) with its ``partition-id`` and ``num-examples``."""
    step = read_step(msg, context)
    s = step.settings
    lm, _ = prepare(step, context)
    use_adapter(lm, step.rank, step.alpha)
    payload = payload_of(step, context, through=step.server_round)
    write_adapter(lm, payload.adapter, payload.head)
    data = held_out_data(s, context.node_config, step.plan)
    metrics = evaluate(lm, data, s.model.eval_batch_size)
    content = RecordDict({messages.CONFIG: ConfigRecord({"partition-id": step.partition_id, "num-examples": len(data)}),
                          messages.METRICS: messages.metric_record(metrics)})
    return Message(content=content, reply_to=msg)


def _error(e: Exception) -> Error:
    """A member's failure as Flower reports a ClientApp's exception (code and reason format)."""
    return Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(type(e)) + ":<'" + str(e) + "'>")


@app.train(cohorts.ACTION)
def cohort_handler(msg: Message, context: Context) -> Message:
    """``engine.kind=cohort``: train the message's K clients together (:func:`clients.cohort.train_cohort`,
    one batched step over this worker's base model) and reply with each one's update.

    Each member is handled as the per-client engine handles its own message, with its own
    partition id and its own node state, which travels with the cohort (:mod:`fedpeft.cohorts`):
    the fault profile first (a failing member is left out of the cohort and replies its error),
    then training, then its reply through :data:`MODS`, the per-client handler's mods (local DP,
    the uplink codec and its top-k residual). A simulation engine only: the members' data are
    partitions of the run's dataset. If training
    the cohort fails (one client's loss became NaN, the cohort ran out of memory, ...), each member
    is trained alone instead, so that a failing client fails alone (out of memory: one line naming
    its plan and what to change, :class:`clients.train.ClientOutOfMemory`)."""
    if not runconfig.load(context.run_config)[1].shared_dir:
        raise CohortError("engine.kind=cohort runs on simulation workers only (this node has no shared dir): use engine.kind=per_client on devices")
    members = []
    for pid, content, state in cohorts.unpack(msg.content):
        sub = Message(content=content, metadata=copy(msg.metadata))
        node_config = {**context.node_config, "partition-id": pid}
        ctx = Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config, state=state, run_config=context.run_config)
        members.append((sub, ctx))
    replies: list[RecordDict | Error | None] = [None] * len(members)
    steps: dict[int, Step] = {}
    for j, (sub, ctx) in enumerate(members):
        try:
            fault_profile(sub, ctx, lambda m, c: m)
            steps[j] = read_step(sub, ctx)
        except Exception as e:  # one member's failure is its reply, not the cohort's
            replies[j] = _error(e)
    if steps:
        versions = {st.base_version for st in steps.values()}
        if len(versions) > 1:
            raise CohortError(f"the cohort's clients are on base versions {sorted(versions)}: one cohort trains on one base")
        first = min(steps)
        s = steps[first].settings
        for j, st in steps.items():  # each member keeps the merges it was sent (the first one's prepare keeps its own)
            if j != first:
                keep_merges(members[j][1], st.decoded.merges)
        lm, _ = prepare(steps[first], members[first][1])  # merges its message lacks come from its node state
        jobs = [
            CohortJob(payload_of(st, members[j][1]), local_data(s, members[j][1].node_config, st.plan), st.seed(0), st.partition_id, st.rank, st.alpha,
                      DPSettings(st.noise_multiplier, s.privacy.clip) if s.privacy.mode == "sample" else None)
            for j, st in steps.items()
        ]
        settings = steps[first].train_settings()  # one round: one learning rate
        try:
            results: list | None = train_cohort(lm, jobs, settings, autocast=torch.bfloat16 if s.engine.precision == "bf16" else None)
        except CohortError:
            raise  # a setting the cohort engine cannot train: every member's error, naming it
        except Exception:  # one client's failure (its loss became NaN, out of memory, ...) must not fail the others
            results = None
        if results is None:  # outside the except block: the failed cohort's tensors are freed first
            release(lm)
            results = []
            for job in jobs:  # each member alone, as the per-client engine trains it
                try:
                    use_adapter(lm, job.rank, job.alpha)
                    results.append(train(lm, job.payload, job.data, settings, seed=job.seed, client_id=job.client_id, dp=job.dp))
                except Exception as e:
                    results.append(e)
        for (j, st), result in zip(steps.items(), results):
            sub, ctx = members[j]
            if isinstance(result, Exception):
                replies[j] = _error(result)
                continue
            plain = plain_reply(sub, st, *result)
            try:
                if st.plan.personal_B:
                    save_personal_B(st, ctx, result[0].adapter)
                reply = make_ffn(lambda m, c, plain=plain: plain, MODS)(sub, ctx)  # the member's reply through the same mods as alone
                replies[j] = reply.error if reply.has_error() else reply.content
            except Exception as e:
                replies[j] = _error(e)
    return Message(content=cohorts.pack_replies(replies, [ctx.state for _, ctx in members]), reply_to=msg)


RESERVED = ("server-round", "rank", "alpha", "base-version", "noise-multiplier", "config-digest", "lr")
RESIDUAL = "topk-residual"


MERGES = "base-merges"


def kept_merges(context: Context) -> dict[int, merge_forms.Merge]:
    """The FLoRA base merges this node received in earlier rounds (its Flower node state), in the
    form they came in (factors or dense, per module)."""
    if MERGES not in context.state.array_records:
        return {}
    out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in context.state[MERGES].to_torch_state_dict().items():
        version, part, module = key.split("/", 2)
        out.setdefault(int(version), {}).setdefault(module, {})[part] = t
    return {v: {m: merge_forms.from_parts(p) for m, p in mods.items()} for v, mods in out.items()}


def keep_merges(context: Context, merges: dict[int, merge_forms.Merge]) -> None:
    """Add ``merges`` to the ones this node keeps, in the form they came in: a node is sent each
    merge once, and its next round (a new process) must rebuild its base from all of them."""
    if not merges:
        return
    tensors = context.state[MERGES].to_torch_state_dict() if MERGES in context.state.array_records else {}
    for v, merge in merges.items():
        for m, f in merge.items():
            for part, t in merge_forms.parts(f).items():
                tensors[f"{v}/{part}/{m}"] = t
    context.state[MERGES] = ArrayRecord(torch_state_dict=tensors)


def state_dir(step: Step, context: Context) -> Path | None:
    """Where this client keeps state that must outlive its process: ``node_config["state-dir"]``
    on a device, ``<shared-dir>/client_<id>`` in simulation; None: memory only."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    shared = runconfig.load(context.run_config)[1].shared_dir
    return Path(shared) / f"client_{step.partition_id}" if shared else None


def _round_files(where: Path, stem: str) -> dict[int, Path]:
    return {int(p.stem.rsplit("_", 1)[1]): p for p in where.glob(f"{stem}_*.safetensors")} if where.is_dir() else {}


def load_round_tensors(where: Path | None, stem: str, before: int) -> dict[str, torch.Tensor]:
    """The tensors this client last wrote in a round before ``before`` (:func:`save_round_tensors`), or {}."""
    earlier = {r: p for r, p in _round_files(where, stem).items() if r < before} if where else {}
    return load_file(str(earlier[max(earlier)])) if earlier else {}


def save_round_tensors(where: Path, stem: str, server_round: int, tensors: dict[str, torch.Tensor]) -> None:
    """``<where>/<stem>_<round>.safetensors``, written atomically; the two latest files stay (a
    resumed run re-runs the round after its last complete one, and reads the one before it)."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{stem}_{server_round:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    files = _round_files(where, stem)
    for r in sorted(files)[:-2]:
        files[r].unlink(missing_ok=True)


def load_residual(step: Step, context: Context) -> dict[str, torch.Tensor]:
    """This node's top-k residual: from its Flower node state, or (a new process: a resumed run or a
    restarted node) the last one it wrote before this round."""
    if RESIDUAL in context.state.array_records:
        return context.state[RESIDUAL].to_torch_state_dict()
    return load_round_tensors(state_dir(step, context), "residual", step.server_round)


def save_residual(step: Step, context: Context, residual: dict[str, torch.Tensor]) -> None:
    """Keep the residual in the node state and, where there is a state dir, in
    ``residual_<round>.safetensors`` (:func:`save_round_tensors`)."""
    context.state[RESIDUAL] = ArrayRecord(torch_state_dict=residual)
    where = state_dir(step, context)
    if where is not None:
        save_round_tensors(where, "residual", step.server_round, residual)


PERSONAL_B = "personal-B"
PERSONAL_B_ROUND = "personal-B-round"


def load_personal_B(step: Step, context: Context, *, through: int) -> dict[str, torch.Tensor]:
    """FedSA-LoRA: this client's own B per module as it left its last training round ``≤ through``
    ({} before its first): from its Flower node state (which Flower carries with every message to
    whichever worker and machine serves the node), or, where the node state has none from a round
    that early (a resumed run, a restarted node), from the checkpoint in its state dir
    (``personal_B_<round>.safetensors`` under ``<shared-dir>/client_<id>`` in simulation, or the
    device's ``state-dir``)."""
    if PERSONAL_B in context.state.array_records and int(context.state[PERSONAL_B_ROUND]["round"]) <= through:
        return context.state[PERSONAL_B].to_torch_state_dict()
    return load_round_tensors(state_dir(step, context), "personal_B", through + 1)


def save_personal_B(step: Step, context: Context, adapter: dict[str, LoraFactors]) -> None:
    """Keep this client's trained B (never sent) for its next round in its node state and, where
    there is a state dir, as a checkpoint there: see :func:`load_personal_B`."""
    tensors = {m: f.B.detach().cpu().contiguous() for m, f in adapter.items()}
    context.state[PERSONAL_B] = ArrayRecord(torch_state_dict=tensors)
    context.state[PERSONAL_B_ROUND] = ConfigRecord({"round": step.server_round})
    where = state_dir(step, context)
    if where is not None:
        save_round_tensors(where, "personal_B", step.server_round, tensors)


CONTROL = "scaffold-c"
CONTROL_ROUND = "scaffold-c-round"


def load_control(step: Step, context: Context) -> dict[str, torch.Tensor]:
    """SCAFFOLD: this client's control variate ``c_i`` as its last training round before this one
    left it ({} before its first: 0): from its Flower node state, or, where that has none from an
    earlier round (a resumed run, a restarted node), from its state dir
    (``scaffold_c_<round>.safetensors``), as :func:`load_personal_B` reads a personal B."""
    if CONTROL in context.state.array_records and int(context.state[CONTROL_ROUND]["round"]) < step.server_round:
        return context.state[CONTROL].to_torch_state_dict()
    return load_round_tensors(state_dir(step, context), "scaffold_c", step.server_round)


def save_control(step: Step, context: Context, c_i: dict[str, torch.Tensor]) -> None:
    """Keep ``c_i`` for this client's next round in its node state and, where there is a state dir,
    as ``scaffold_c_<round>.safetensors`` there (:func:`save_round_tensors`)."""
    tensors = {k: t.detach().cpu().contiguous() for k, t in c_i.items()}
    context.state[CONTROL] = ArrayRecord(torch_state_dict=tensors)
    context.state[CONTROL_ROUND] = ConfigRecord({"round": step.server_round})
    where = state_dir(step, context)
    if where is not None:
        save_round_tensors(where, "scaffold_c", step.server_round, tensors)


def noised_update(adapter: dict, head: dict, start: dict, clip: float, noise_multiplier: float, generator: torch.Generator, *,
                  send_A: bool = True, send_B: bool = True) -> tuple[dict, dict, float]:
    """Local client-level DP: the update ``Δ`` (what is sent, minus ``start``) is clipped to
    ``‖Δ‖₂ ≤ clip`` and ``N(0, (σ·clip)²)`` is added to every entry; returns ``start + Δ̃`` as an
    adapter and head, and ``‖Δ‖`` before clipping."""
    sent = messages.tensors_of(adapter, head, send_A=send_A, send_B=send_B)
    ref = {k: messages.slice_like(start, k, t) for k, t in sent.items()}
    clipped, norm = privacy.clip({k: t - ref[k] for k, t in sent.items()}, clip)
    noisy = privacy.gaussian_noise(clipped, noise_multiplier * clip, generator)
    out = {k: ref[k] + noisy[k] for k in sent}
    new_adapter = {
        m: LoraFactors(out[f"A/{m}"] if send_A else f.A, out[f"B/{m}"] if send_B else f.B, f.scaling) for m, f in adapter.items()
    }
    return new_adapter, {h: out[f"head/{h}"] for h in head}, norm

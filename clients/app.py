"""The Flower ClientApp: decode the payload, train on this node's partition, reply with the update.

This module is imported by every simulation worker (Ray actor) and by a real SuperNode. Its
module-level caches keep the base model and the partitioned data for the life of the worker
process, so a worker loads the model once and serves many clients and rounds; only adapter
tensors (and the head) arrive with each message.
"""

from __future__ import annotations

import json
import os
import random
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.train import DPSettings, TrainSettings, train
from fedpeft import data as fdata
from fedpeft import messages
from fedpeft import privacy
from fedpeft.lora import LoraFactors
from fedpeft.models import LoadedModel, apply_merge, build, module_shapes, use_adapter
from strategies.base import Payload


app = ClientApp()

_MODELS: dict[str, LoadedModel] = {}


class InjectedFailure(RuntimeError):
    """Raised by a client that the failure profile chose to fail this round."""


def _ns(d: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**d)


def get_model(settings: dict[str, Any], num_labels: int | None) -> LoadedModel:
    """The worker's cached model for these settings (built once), or a new one if reuse is off."""
    # A run with base merges (FLoRA) changes the base weights: key the cache by run as well.
    key = json.dumps({"model": settings["model"], "labels": num_labels, "device": settings["device"], "run": settings.get("merge_store")}, sort_keys=True)
    if not settings["reuse_model"]:
        return build(_ns(settings["model"]), num_labels=num_labels, device=settings["device"], seed=settings["seed"])
    if key not in _MODELS:
        _MODELS.clear()  # one base model per worker: a new run replaces the old one
        _MODELS[key] = build(_ns(settings["model"]), num_labels=num_labels, device=settings["device"], seed=settings["seed"])
    return _MODELS[key]


@lru_cache(maxsize=4)
def get_partitioner(data_json: str, partition_json: str, num_partitions: int, seed: int):
    d, p = json.loads(data_json), json.loads(partition_json)
    ds = fdata.load(d["name"], seed=seed, text_column=d["text_column"], label_column=d["label_column"], group_column=d["group_column"])
    kw = {k: v for k, v in p.items() if k != "kind"}
    return fdata.partition(ds["train"], p["kind"], num_partitions, seed=seed, **kw), ds


def should_fail(seed: int, server_round: int, partition_id: int, rate: float) -> bool:
    """Seeded, reproducible fault injection: the same clients fail in the same rounds."""
    return rate > 0 and random.Random(f"{seed}/{server_round}/{partition_id}").random() < rate


def sync_base(lm: LoadedModel, target: int, merges: dict, store: str | None) -> None:
    """Bring this worker's cached base to version ``target`` exactly: apply the missing FLoRA
    merges in order, from the message (what a real device receives) or, for versions this worker
    missed while the node did not, from the run's merge store (``<run>/merges/``)."""
    if lm.base_version > target:
        raise RuntimeError(f"worker base is at version {lm.base_version}, ahead of the requested {target}")
    for v in range(lm.base_version + 1, target + 1):
        merge = merges.get(v)
        if merge is None:
            if not store:
                raise RuntimeError(f"base merge {v} is neither in the message nor in a merge store")
            merge = load_merge(Path(store), v)
        apply_merge(lm, merge)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """The server asks each node once which partition (client id) it serves: Flower's node ids are
    random, the partition id in ``context.node_config`` is what ranks and sampling follow."""
    pid = int(context.node_config["partition-id"])
    return Message(content=RecordDict({messages.CONFIG: ConfigRecord({"partition-id": pid})}), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    dec = messages.decode(msg.content)
    config = dec.config
    settings = json.loads(config["settings"])
    server_round = int(config["server-round"])
    pid = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    seed = int(settings["seed"])
    torch.set_num_threads(max(1, int(settings["num_cpus"])))
    if should_fail(seed, server_round, pid, settings["failure_rate"]):
        raise InjectedFailure(f"client {pid}: injected failure in round {server_round} (profile.failure_rate={settings['failure_rate']})")
    partitioner, ds = get_partitioner(
        json.dumps(settings["data"], sort_keys=True), json.dumps(settings["partition"], sort_keys=True), num_partitions, seed
    )
    part = partitioner.load_partition(pid)
    lm = get_model(settings, len(fdata.label_names(ds)) if settings["model"]["task"] == "classification" else None)
    sync_base(lm, int(config["base-version"]), dec.merges, settings.get("merge_store"))
    rank, alpha = int(config["rank"]), float(config["alpha"])
    use_adapter(lm, rank, alpha)
    instructions = {k: v for k, v in config.items() if k not in RESERVED}
    dp_cfg, codec = settings["privacy"], settings["compression"]
    dp = DPSettings(dp_cfg["noise_multiplier"], dp_cfg["clip"]) if dp_cfg["mode"] == "sample" else None
    update, metrics = train(
        lm,
        Payload(adapter=dec.adapter, head=dec.head, instructions=instructions, base_version=int(config["base-version"])),
        part,
        TrainSettings(**settings["train"]),
        seed=hash((seed, server_round, pid)) % (2**31),
        client_id=pid,
        dp=dp,
    )
    reply = {"num-examples": update.num_examples, "partition-id": pid}
    freeze_A = bool(instructions.get("freeze_A"))
    if freeze_A:
        reply["A_seed"] = int(instructions["A_seed"])
    adapter, head = update.adapter, update.head
    start = None
    if dp_cfg["mode"] == "local" or codec["uplink"] != "none":
        start = messages.start_tensors(dec, module_shapes(lm), rank, alpha, send_A=not freeze_A)
    if dp_cfg["mode"] == "local":  # clip → noise, before any compression
        g = torch.Generator().manual_seed(hash((seed, server_round, pid, 2)) % (2**31))
        adapter, head, norm = local_dp(adapter, head, start, dp_cfg["clip"], dp_cfg["noise_multiplier"], g, send_A=not freeze_A)
        metrics["update_norm"] = norm
    residual = None
    if codec["uplink"] == "topk" and codec["error_feedback"]:
        residual = context.state[RESIDUAL].to_torch_state_dict() if RESIDUAL in context.state.array_records else {}
    content = messages.encode(
        adapter, head, reply, send_A=not freeze_A,
        codec=codec["uplink"], fraction=codec["topk_fraction"], reference=start if codec["uplink"] != "none" else None,
        generator=torch.Generator().manual_seed(hash((seed, server_round, pid, 3)) % (2**31)), residual=residual,
    )
    if residual is not None:  # the error-feedback memory stays with this client (Flower's node state)
        context.state[RESIDUAL] = ArrayRecord(torch_state_dict=residual)
    content[messages.METRICS] = messages.metric_record({**metrics, "num-examples": update.num_examples})
    return Message(content=content, reply_to=msg)


RESERVED = ("settings", "server-round", "rank", "alpha", "base-version")
RESIDUAL = "topk-residual"


def local_dp(adapter: dict, head: dict, start: dict, clip: float, noise_multiplier: float, generator: torch.Generator, *, send_A: bool = True) -> tuple[dict, dict, float]:
    """Local client-level DP: the update ``Δ`` (what is sent, minus ``start``) is clipped to
    ``‖Δ‖₂ ≤ clip`` and ``N(0, (σ·clip)²)`` is added to every entry; returns ``start + Δ̃`` as an
    adapter and head, and ``‖Δ‖`` before clipping."""
    sent = messages.tensors_of(adapter, head, send_A=send_A)
    ref = {k: messages.slice_like(start, k, t) for k, t in sent.items()}
    clipped, norm = privacy.clip({k: t - ref[k] for k, t in sent.items()}, clip)
    noisy = privacy.gaussian_noise(clipped, noise_multiplier * clip, generator)
    out = {k: ref[k] + noisy[k] for k in sent}
    new_adapter = {
        m: LoraFactors(out[f"A/{m}"] if send_A else f.A, out[f"B/{m}"], f.scaling) for m, f in adapter.items()
    }
    return new_adapter, {h: out[f"head/{h}"] for h in head}, norm


def merge_path(store: Path, version: int) -> Path:
    return Path(store) / f"merge_{version:04d}.safetensors"


def save_merge(store: Path, version: int, merge: dict) -> None:
    """One FLoRA base merge (stacked factors, scaling 1) as safetensors, written atomically."""
    from safetensors.torch import save_file

    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m, f in merge.items():
        tensors[f"{m}.A"] = f.A.contiguous()
        tensors[f"{m}.B"] = f.B.contiguous()
    tmp = merge_path(store, version).with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, merge_path(store, version))


def load_merge(store: Path, version: int) -> dict:
    from safetensors.torch import load_file

    from fedpeft.lora import LoraFactors

    t = load_file(str(merge_path(store, version)))
    modules = {k[: -len(".A")] for k in t if k.endswith(".A")}
    return {m: LoraFactors(t[f"{m}.A"], t[f"{m}.B"], 1.0) for m in modules}

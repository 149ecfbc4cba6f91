"""Adapters on the wire: LoRA factors, scalings and heads to and from Flower records.

A payload or update travels as one ``ArrayRecord`` (``A/<module>``, ``B/<module>``,
``head/<name>``) and one ``ConfigRecord`` (per-module scalings, strategy instructions, and on
replies the example count). Byte counts use Flower's own ``count_bytes`` on exactly the records
that are sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.lora import Adapter, LoraFactors

ARRAYS, CONFIG, METRICS = "adapter", "config", "metrics"


class UpdateError(ValueError):
    """A client's reply that cannot be aggregated; the message names what is wrong."""


@dataclass
class Decoded:
    adapter: Adapter
    head: dict[str, torch.Tensor]
    config: dict[str, Any]
    merges: dict[int, Adapter] = field(default_factory=dict)  # base version → stacked factors


def encode(
    adapter: Adapter,
    head: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    send_A: bool = True,
    merges: Mapping[int, Adapter] | None = None,
) -> RecordDict:
    """``send_A=False`` leaves out every ``A`` (FFA-LoRA: A is frozen and regenerated from
    ``config["A_seed"]`` by :func:`fedpeft.lora.seeded_lora_A`); ``merges`` carries FLoRA's
    stacked factors of the base versions the receiver has not applied yet."""
    tensors: dict[str, torch.Tensor] = {}
    cfg: dict[str, Any] = dict(config)
    if not send_A and "A_seed" not in cfg:
        raise ValueError("send_A=False needs config['A_seed'] so that the receiver can regenerate A")
    for name, f in adapter.items():
        if send_A:
            tensors[f"A/{name}"] = f.A.detach().cpu().contiguous()
        else:
            cfg[f"in_features/{name}"] = int(f.A.shape[1])
        tensors[f"B/{name}"] = f.B.detach().cpu().contiguous()
        cfg[f"scaling/{name}"] = float(f.scaling)
    for name, t in head.items():
        tensors[f"head/{name}"] = t.detach().cpu().contiguous()
    for version, merge in (merges or {}).items():
        for name, f in merge.items():
            if f.scaling != 1.0:
                raise ValueError(f"merge {version}, module {name}: merges are stacked at scaling 1, got {f.scaling}")
            tensors[f"merge{version}/A/{name}"] = f.A.detach().cpu().contiguous()
            tensors[f"merge{version}/B/{name}"] = f.B.detach().cpu().contiguous()
    return RecordDict({ARRAYS: ArrayRecord(torch_state_dict=tensors), CONFIG: ConfigRecord(cfg)})


def decode(content: RecordDict) -> Decoded:
    """Inverse of :func:`encode`; raises :class:`UpdateError` on a malformed record."""
    from fedpeft.lora import seeded_lora_A

    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise UpdateError(f"reply lacks its '{ARRAYS}' arrays or '{CONFIG}' config record")
    tensors = content.array_records[ARRAYS].to_torch_state_dict()
    cfg = dict(content.config_records[CONFIG])
    out = Decoded({}, {}, {k: v for k, v in cfg.items() if not k.startswith(("scaling/", "in_features/"))})
    merge_parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "B":
            if f"scaling/{name}" not in cfg:
                raise UpdateError(f"module {name}: B without a scaling")
            if f"A/{name}" in tensors:
                A = tensors[f"A/{name}"]
            elif f"in_features/{name}" in cfg and "A_seed" in cfg:
                A = seeded_lora_A(name, t.shape[1], int(cfg[f"in_features/{name}"]), int(cfg["A_seed"]))
            else:
                raise UpdateError(f"module {name}: B without A (and no A_seed to regenerate it)")
            try:
                out.adapter[name] = LoraFactors(A, t, float(cfg[f"scaling/{name}"]))
            except ValueError as e:
                raise UpdateError(f"module {name}: {e}") from None
        elif kind == "head":
            out.head[name] = t
        elif kind.startswith("merge") and kind[5:].isdigit():
            part, _, module = name.partition("/")
            merge_parts.setdefault(int(kind[5:]), {}).setdefault(module, {})[part] = t
        elif kind == "A":
            if f"B/{name}" not in tensors:
                raise UpdateError(f"module {name}: A without B")
        else:
            raise UpdateError(f"unexpected array {key!r}")
    for version, modules in sorted(merge_parts.items()):
        try:
            out.merges[version] = {m: LoraFactors(p["A"], p["B"], 1.0) for m, p in modules.items()}
        except (KeyError, ValueError) as e:
            raise UpdateError(f"merge {version}: incomplete or inconsistent factors ({e})") from None
    return out


def num_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and config actually carried by a message."""
    total = sum(r.count_bytes() for r in content.array_records.values())
    total += sum(r.count_bytes() for r in content.config_records.values())
    return total


def check_update(
    adapter: Adapter,
    head: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    expect_head: Mapping[str, torch.Tensor],
) -> None:
    """An update must cover the model's modules with their ``(out, in)`` shapes at a rank no
    larger than the client was given (HetLoRA clients may shrink), and hold finite values only."""
    if set(adapter) != set(shapes):
        missing, extra = sorted(set(shapes) - set(adapter)), sorted(set(adapter) - set(shapes))
        raise UpdateError(f"modules differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, f in adapter.items():
        if f.shape != tuple(shapes[name]) or f.rank > max_rank:
            raise UpdateError(f"module {name}: shapes A {tuple(f.A.shape)}, B {tuple(f.B.shape)} do not fit {tuple(shapes[name])} at rank <= {max_rank}")
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            raise UpdateError(f"module {name}: non-finite values")
    if set(head) != set(expect_head):
        raise UpdateError(f"head tensors {sorted(head)} differ from the payload's {sorted(expect_head)}")
    for name, t in head.items():
        if t.shape != expect_head[name].shape or not torch.isfinite(t).all():
            raise UpdateError(f"head {name}: shape {tuple(t.shape)} or values do not fit")


def metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})

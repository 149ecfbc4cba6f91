"""Adapters on the wire: LoRA factors, scalings and heads to and from Flower records.

A payload or update travels as one ``ArrayRecord`` (``A/<module>``, ``B/<module>``,
``head/<name>``) and one ``ConfigRecord`` (per-module scalings, strategy instructions, and on
replies the example count). Byte counts use Flower's own ``count_bytes`` on exactly the records
that are sent.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.lora import Adapter, LoraFactors

ARRAYS, CONFIG, METRICS = "adapter", "config", "metrics"


class UpdateError(ValueError):
    """A client's reply that cannot be aggregated; the message names what is wrong."""


def encode(adapter: Adapter, head: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> RecordDict:
    tensors: dict[str, torch.Tensor] = {}
    cfg: dict[str, Any] = dict(config)
    for name, f in adapter.items():
        tensors[f"A/{name}"] = f.A.detach().cpu().contiguous()
        tensors[f"B/{name}"] = f.B.detach().cpu().contiguous()
        cfg[f"scaling/{name}"] = float(f.scaling)
    for name, t in head.items():
        tensors[f"head/{name}"] = t.detach().cpu().contiguous()
    return RecordDict({ARRAYS: ArrayRecord(torch_state_dict=tensors), CONFIG: ConfigRecord(cfg)})


def decode(content: RecordDict) -> tuple[Adapter, dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`encode`; raises :class:`UpdateError` on a malformed record."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise UpdateError(f"reply lacks its '{ARRAYS}' arrays or '{CONFIG}' config record")
    tensors = content.array_records[ARRAYS].to_torch_state_dict()
    cfg = dict(content.config_records[CONFIG])
    adapter: Adapter = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "A":
            if f"B/{name}" not in tensors or f"scaling/{name}" not in cfg:
                raise UpdateError(f"module {name}: A without B or scaling")
            try:
                adapter[name] = LoraFactors(t, tensors[f"B/{name}"], float(cfg[f"scaling/{name}"]))
            except ValueError as e:
                raise UpdateError(f"module {name}: {e}") from None
        elif kind == "head":
            head[name] = t
        elif kind != "B":
            raise UpdateError(f"unexpected array {key!r}")
    config = {k: v for k, v in cfg.items() if not k.startswith("scaling/")}
    return adapter, head, config


def num_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and config actually carried by a message."""
    total = sum(r.count_bytes() for r in content.array_records.values())
    total += sum(r.count_bytes() for r in content.config_records.values())
    return total


def check_update(adapter: Adapter, head: Mapping[str, torch.Tensor], expect: Adapter, expect_head: Mapping[str, torch.Tensor]) -> None:
    """An update must update the same modules with the shapes of what was sent, finite values only."""
    if set(adapter) != set(expect):
        missing, extra = sorted(set(expect) - set(adapter)), sorted(set(adapter) - set(expect))
        raise UpdateError(f"modules differ from the payload: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, f in adapter.items():
        e = expect[name]
        if f.A.shape != e.A.shape or f.B.shape != e.B.shape:
            raise UpdateError(f"module {name}: shapes A {tuple(f.A.shape)}, B {tuple(f.B.shape)}; sent A {tuple(e.A.shape)}, B {tuple(e.B.shape)}")
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            raise UpdateError(f"module {name}: non-finite values")
    if set(head) != set(expect_head):
        raise UpdateError(f"head tensors {sorted(head)} differ from the payload's {sorted(expect_head)}")
    for name, t in head.items():
        if t.shape != expect_head[name].shape or not torch.isfinite(t).all():
            raise UpdateError(f"head {name}: shape {tuple(t.shape)} or values do not fit")


def metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})

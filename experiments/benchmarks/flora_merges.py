"""Benchmark: what FLoRA's base merge costs each client and the server, at 100 clients.

The server side of ``fedpeft simulate strategy=flora ranks=flora clients=100`` without the
simulation: a :class:`fedpeft.server.FlowerAdapter` over FLoRA, MiniLM-L6's LoRA modules
(query and value of 6 layers, 384 × 384 each, and a 20-class head), client ranks
``[64,32,16,16,8,8,4,4,4,4]`` cycled (alpha 16), fake client replies (the seeded fresh A, a random
B) aggregated in round 1, then round 2's ``configure_train`` measured: it sends every client
merge 1, whose stack has rank ``Σ r_k`` (1,600 at 100 sampled clients, 800 at 50).

* **before**: the stacked factors, encoded into every client's message (what ``configure_train``
  did before issue 12: ``messages.encode(..., merges={1: stack})`` per client);
* **after**: each module's merge in its cheapest exact form (:mod:`fedpeft.merges`; here dense,
  384 × 384), encoded once per round and shared by every message.

Per setting it prints the bytes each client is sent (``bytes_down`` / clients, and the merge's
part of it), and the server's memory for the round's messages: tracemalloc's peak during
``configure_train`` (Python and NumPy allocations: the encoded arrays) and the growth of the
process RSS while the messages are held (each setting in a fresh process), with the time taken.

    .venv/bin/python experiments/benchmarks/flora_merges.py [--clients 100] [--fractions 1.0 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]  # configs/ranks/flora.yaml, cycled
ALPHA = 16.0
# fedpeft.models.module_shapes of a built MiniLM-L6 (model=minilm: target_modules [query, value])
SHAPES = {f"bert.encoder.layer.{i}.attention.self.{p}": (384, 384) for i in range(6) for p in ("query", "value")}
HEAD = {"classifier.weight": (20, 384), "classifier.bias": (20,)}
MB = 1e6


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Grid:
    """A Flower grid for in-process use: node ids → partition ids; answers the adapter's queries."""

    def __init__(self, nodes: dict[int, int]) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, msgs, *, timeout=None):
        from types import SimpleNamespace

        from flwr.app import ConfigRecord, RecordDict

        return [
            SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id, reply_to_message_id=m.metadata.message_id),
                            has_error=lambda: False, content=RecordDict({"config": ConfigRecord({"partition-id": self.nodes[m.metadata.dst_node_id]})}))
            for m in msgs
        ]


def child(mode: str, clients: int, fraction: float) -> dict:
    import torch
    from flwr.app import ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft import merges, messages
    from fedpeft.lora import LoraFactors, fresh_adapter, scaling_for
    from fedpeft.plan import KEYS, ClientPlan
    from fedpeft.server import BaseMerges, FlowerAdapter
    from strategies.base import ClientSpec, GlobalModel
    from strategies.flora import FLoRA

    for attr in ("_task_id", "_run_id", "_node_id"):  # what run_simulation sets: messages carry the run's identity
        setattr(TaskIdentity, attr, 1)
    torch.set_num_threads(2)

    class Before(BaseMerges):
        """The merges as they were: the stacked factors, encoded into every message."""

        def form(self, model, version):
            return dict(model.merges[version - 1])

        def encoded_merge(self, model, version):
            return messages.encode_merge(version, self.form(model, version))

    ranks = [RANKS[i % len(RANKS)] for i in range(clients)]
    g = torch.Generator().manual_seed(0)
    head = {k: torch.randn(s, generator=g) * 0.01 for k, s in HEAD.items()}
    fa = FlowerAdapter(FLoRA(seed=0), GlobalModel({}, head), fraction=fraction, min_clients=1,
                       client_spec=lambda i: ClientSpec(i, ranks[i], ALPHA), shapes=SHAPES, seed=0)
    if mode == "before":
        fa.merges = Before()
    grid = Grid({1000 + i: i for i in range(clients)})

    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), grid))
    replies = []
    for m in msgs:
        dec = messages.decode(m.content)
        r = int(dec.config["rank"])
        fresh = fresh_adapter(SHAPES, r, scaling_for(r, ALPHA), ClientPlan.from_config({k: v for k, v in dec.config.items() if k in KEYS}).init_seed)
        trained = {n: LoraFactors(f.A, torch.randn(f.B.shape, generator=g) * 0.01, f.scaling) for n, f in fresh.items()}
        replies.append(Message(content=messages.encode(trained, dec.head, {"num-examples": 100}), reply_to=m))
    del msgs
    t = time.perf_counter()
    fa.aggregate_train(1, replies)  # the stack, and (after) each module's form, chosen once
    t_aggregate = time.perf_counter() - t
    del replies
    stack_rank = next(iter(fa.model.merges[0].values())).rank
    t = time.perf_counter()
    kinds = sorted({merges.kind(f) for f in merges.cheapest(fa.model.merges[0]).values()})
    t_forms = time.perf_counter() - t

    rss0, peak0 = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t = time.perf_counter()
    msgs = list(fa.configure_train(2, fa.arrays(), ConfigRecord(), grid))
    seconds = time.perf_counter() - t
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = rss() - rss0  # the round's messages are still held here
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak0
    stats = fa.stats[2]
    merge_bytes = [sum(len(a.data) + len(k) for k, a in m.content.array_records[messages.ARRAYS].items() if k.startswith("merge")) for m in msgs]
    distinct = {id(a.data): len(a.data) for m in msgs for k, a in m.content.array_records[messages.ARRAYS].items() if k.startswith("merge")}
    return {
        "mode": mode, "sampled": stats.sampled, "stack_rank": stack_rank, "form": "+".join(kinds) if mode == "after" else "factors",
        "bytes_per_client": stats.bytes_down / stats.sampled, "merge_bytes_per_client": sum(merge_bytes) / len(merge_bytes),
        "merge_bytes_held": sum(distinct.values()), "tracemalloc_peak": traced_peak, "rss_growth": held, "peak_rss_growth": peak,
        "seconds": seconds, "aggregate_seconds": t_aggregate, "forms_seconds": t_forms, "rss_before": rss0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FRACTION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.clients, float(args.child[1]))))
        return
    rows = []
    for fraction in args.fractions:
        for mode in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--clients", str(args.clients), "--child", mode, str(fraction)],
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"FLoRA round 2 at {args.clients} clients: MiniLM-L6's 12 LoRA modules (384 × 384), ranks {RANKS} cycled; "
          f"{os.cpu_count()} CPUs, torch threads 2")
    head = ("sampled", "merge rank", "form", "MB / client", "merge MB / client", "merge MB held", "tracemalloc peak MB",
            "RSS growth MB", "configure_train s")
    print("| " + " | ".join(("", *head)) + " |")
    print("|" + "---|" * (len(head) + 1))
    for r in rows:
        cells = (r["mode"], r["sampled"], r["stack_rank"], r["form"], f"{r['bytes_per_client'] / MB:.2f}", f"{r['merge_bytes_per_client'] / MB:.2f}",
                 f"{r['merge_bytes_held'] / MB:.1f}", f"{r['tracemalloc_peak'] / MB:.1f}", f"{r['rss_growth'] / MB:.1f}", f"{r['seconds']:.2f}")
        print("| " + " | ".join(map(str, cells)) + " |")
    after = [r for r in rows if r["mode"] == "after"]
    print("choosing the forms (12 modules: ΔW in float64 and a rank sketch; no SVD needed): "
          + ", ".join(f"{r['forms_seconds']:.2f} s at rank {r['stack_rank']}" for r in after)
          + "; round 1's aggregate_train (stack + forms): "
          + ", ".join(f"{r['aggregate_seconds']:.2f} s ({r['mode']}, {r['sampled']} clients)" for r in rows))


if __name__ == "__main__":
    main()

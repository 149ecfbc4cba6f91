"""Benchmark: the server-side cost of the heterogeneous-rank strategies at Llama-7B shapes.

Times each strategy's ``aggregate`` — FFA-LoRA, HetLoRA, FLoRA, FlexLoRA — and FlexLoRA's
``payload`` for every client, on ``--modules`` LoRA modules of shape 4096 × 4096 (Llama-7B q_proj
and v_proj in 32 layers = 64 modules), for 10 and 100 clients with ranks cycled from
[64, 32, 16, 16, 8, 8, 4, 4, 4, 4] (alpha 16, float32), on the CPU and/or CUDA.

FlexLoRA's SVD is done once per module in ``aggregate`` (QR of the stacked factors + SVD of the
small core; ΔW is never formed), and every client's payload is then a slice. Two reference points:

* "per-client factored SVD": ``best_rank(stacked, r_k, s_k)`` redone for every client (what a
  payload that decomposes the stacked factors each time would cost), measured on a few
  (module, client) pairs and extrapolated to all of them;
* "dense SVD baseline": forming ΔW (4096 × 4096) and ``torch.linalg.svd`` of it, measured on
  ``--dense-modules`` modules and extrapolated to ``--modules`` (labelled ``extrapolated``).

Client factors are generated lazily, one module at a time (untimed), and each strategy aggregates
that one module (modules are independent in every strategy), so the peak memory stays at one
module's worth of client factors. Times are summed over modules.

    .venv/bin/python experiments/benchmarks/aggregation.py [--clients 10 100] [--modules 64] [--device cpu|cuda|auto]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedpeft.lora import LoraFactors, best_rank, normalized_weights, scaling_for, stack
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
ALPHA = 16.0
D = 4096  # Llama-7B hidden size: q_proj and v_proj are 4096 × 4096
R_MAX = max(RANKS)


def module_name(i: int) -> str:
    return f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj"


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def client_updates(name, specs, nums, gen, device, A_shared=None):
    """Random trained factors for one module (A = the shared A's rows for FFA-LoRA)."""
    ups = []
    for c, n in zip(specs, nums):
        A = A_shared[: c.rank] if A_shared is not None else torch.randn(c.rank, D, generator=gen).to(device) / D**0.5
        B = torch.randn(D, c.rank, generator=gen).to(device) * 0.01
        ups.append(ClientUpdate(c.client_id, {name: LoraFactors(A, B, scaling_for(c.rank, c.alpha))}, {}, n))
    return ups


def server_adapter(name, gen, device):
    A = torch.randn(R_MAX, D, generator=gen).to(device) / D**0.5
    return {name: LoraFactors(A, torch.randn(D, R_MAX, generator=gen).to(device) * 0.01, scaling_for(R_MAX, ALPHA))}


def run(clients: int, modules: int, device: torch.device, dense_modules: int, svd_samples: int, seed: int) -> list[tuple]:
    timer = Timer(device)
    specs = [ClientSpec(k, r, ALPHA) for k, r in zip(range(clients), itertools.cycle(RANKS))]
    gen = torch.Generator().manual_seed(seed)
    nums = [int(x) for x in torch.randint(50, 500, (clients,), generator=gen)]
    ffa, het, flora, flex = FFALoRA(seed=seed), HetLoRA(), FLoRA(seed=seed), FlexLoRA(seed=seed)
    t = defaultdict(float)
    per_client_svd: list[float] = []
    dense: list[float] = []
    for i in range(modules):
        name = module_name(i)
        # FFA-LoRA: shared seeded A, clients' A = its leading rows
        g_ffa = ffa.init(GlobalModel(adapter=server_adapter(name, gen, device)))
        ups = client_updates(name, specs, nums, gen, device, A_shared=g_ffa.adapter[name].A)
        t["ffa_lora aggregate"] += timer(lambda g=g_ffa, ups=ups: ffa.aggregate(g, ups))[0]
        # the other three: independent random factors at each client's rank
        ups = client_updates(name, specs, nums, gen, device)
        g_het = het.init(GlobalModel(adapter=server_adapter(name, gen, device)))
        t["hetlora aggregate (sparsity weights)"] += timer(lambda g=g_het, ups=ups: het.aggregate(g, ups))[0]
        t["flora aggregate (stack)"] += timer(lambda ups=ups: flora.aggregate(GlobalModel(adapter={}), ups))[0]
        dt, g_flex = timer(lambda ups=ups: flex.aggregate(GlobalModel(adapter={}), ups))
        t["flexlora aggregate (stack + factored SVD)"] += dt
        t["flexlora payload, all clients (slices)"] += timer(lambda g=g_flex: [flex.payload(g, c) for c in specs])[0]
        if i < dense_modules:
            p = normalized_weights(nums)
            stacked = stack([u.adapter[name] for u in ups], p)
            for c in specs[:svd_samples]:
                per_client_svd.append(timer(lambda stacked=stacked, c=c: best_rank(stacked, c.rank, scaling_for(c.rank, c.alpha)))[0])
            dense.append(timer(lambda stacked=stacked: torch.linalg.svd(stacked.B @ stacked.A, full_matrices=False))[0])
        del ups, g_ffa, g_het, g_flex
    rows = [(name, clients, secs, f"measured, {modules} modules") for name, secs in t.items()]
    if per_client_svd:
        mean = sum(per_client_svd) / len(per_client_svd)
        rows.append((
            "flexlora payload, per-client factored SVD", clients, mean * clients * modules,
            f"EXTRAPOLATED: {mean:.3f} s per (module, client) x {clients} clients x {modules} modules "
            f"(mean of {len(per_client_svd)} measured, largest ranks)",
        ))
    if dense:
        mean = sum(dense) / len(dense)
        rows.append((
            "flexlora dense baseline (form dW + torch.linalg.svd)", clients, mean * modules,
            f"EXTRAPOLATED: {mean:.3f} s per module (measured on {len(dense)}) x {modules} modules",
        ))
    return rows


def warm_up(device: torch.device) -> None:
    """First-call costs (CUDA context, cuSOLVER/cuBLAS handles, MKL/LAPACK init) are not the method's."""
    x = torch.randn(256, 64, device=device)
    torch.linalg.qr(x)
    torch.linalg.svd(x.mT @ x)
    torch.linalg.svd(x @ x.mT)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--modules", type=int, default=64, help="LoRA modules of 4096 x 4096 (Llama-7B q,v x 32 layers = 64)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="auto: the CPU, and CUDA too when torch.cuda.is_available()")
    ap.add_argument("--dense-modules", type=int, default=2, help="modules on which the dense-SVD baseline is measured")
    ap.add_argument("--svd-samples", type=int, default=2, help="clients per module for the per-client SVD reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    else:
        devices = [args.device]
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} CPU threads; "
          f"{args.modules} modules of {D}x{D}, ranks cycled from {RANKS}, alpha {ALPHA}, float32")
    with torch.inference_mode():
        for dev in devices:
            device = torch.device(dev)
            if device.type == "cuda":
                print(f"CUDA device: {torch.cuda.get_device_name(device)}")
                torch.cuda.reset_peak_memory_stats(device)
            warm_up(device)
            rows = []
            for k in args.clients:
                rows += run(k, args.modules, device, min(args.dense_modules, args.modules), args.svd_samples, args.seed)
            w = max(len(r[0]) for r in rows)
            print(f"\n== device: {dev} ==")
            print(f"{'strategy':<{w}}  {'clients':>7}  {'seconds':>10}  note")
            for name, k, secs, note in rows:
                print(f"{name:<{w}}  {k:>7}  {secs:>10.3f}  {note}")
            if device.type == "cuda":
                print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"peak process RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()

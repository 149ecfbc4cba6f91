"""Benchmark: FlexLoRA's server step on one very large module, where a dense ΔW would not fit.

One ``--size`` × ``--size`` LoRA module (default 20000 × 20000: ΔW would be 1.6 GB in float32),
clients of ``--ranks`` (default 16 8 8 8, alpha 16, float32, equal example counts). Prints, for
``FlexLoRA.aggregate`` plus every client's ``payload``:

* wall time (the best and the median of ``--repeat`` runs),
* the growth of the process's peak RSS over the first run (``ru_maxrss``: the factors themselves
  are allocated before it is read, so this is what the SVD path adds), and on CUDA the peak
  allocated memory,
* the largest tensor any torch function returned (recorded with a ``TorchFunctionMode``, in a
  separate untimed run), against the stacked factors' ``size · Σ r_k`` and the dense ``size²``.

These figures used to be assertions in ``tests/unit/test_strategies_hetero.py``
(``test_flexlora_never_forms_the_out_by_in_matrix``: < 5 s, < 400 MiB); the test keeps the
machine-independent part (no tensor larger than the stacked factors, exactness on sampled entries).

    .venv/bin/python experiments/benchmarks/flexlora_scale.py [--size 20000] [--ranks 16 8 8 8] [--repeat 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedpeft.lora import LoraFactors, scaling_for
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.flexlora import FlexLoRA

ALPHA = 16.0


class LargestTensor(TorchFunctionMode):
    """Records the shape of the largest tensor any torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.shape = 0, ()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20_000, help="out = in features of the module")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 8, 8, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    n, ranks = args.size, args.ranks
    gen = torch.Generator().manual_seed(args.seed)
    ups = []
    for k, r in enumerate(ranks):
        f = LoraFactors(torch.randn(r, n, generator=gen).to(device), torch.randn(n, r, generator=gen).to(device), scaling_for(r, ALPHA))
        ups.append(ClientUpdate(k, {"big": f}, {}, 10))
    specs = [ClientSpec(k, r, ALPHA) for k, r in enumerate(ranks)]
    s = FlexLoRA(seed=args.seed)

    def step():
        g = s.aggregate(GlobalModel(adapter={}), ups)
        return g, [s.payload(g, c) for c in specs]

    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} CPU threads, device {device}; "
          f"one {n} x {n} module, client ranks {ranks}, alpha {ALPHA}, float32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    seconds = []
    with torch.inference_mode():
        for _ in range(max(1, args.repeat)):
            sync(device)
            t0 = time.perf_counter()
            g, pls = step()
            sync(device)
            seconds.append(time.perf_counter() - t0)
            if len(seconds) == 1:
                grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
            del g, pls
        with LargestTensor() as probe:
            g, pls = step()
    stacked, dense = n * sum(ranks), n * n
    print(f"aggregate + {len(specs)} payloads: best {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s over {len(seconds)} run(s)")
    print(f"peak RSS growth over the first run: {grown_mib:.1f} MiB "
          f"(process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB")
    print(f"largest tensor formed: {probe.shape} = {probe.numel:,} elements; stacked factors {stacked:,} "
          f"({probe.numel / stacked:.2f}x); dense dW {dense:,} ({probe.numel / dense:.2e}x)")
    print(f"global rank {g.adapter['big'].rank}, client payload ranks {[p.adapter['big'].rank for p in pls]}")


if __name__ == "__main__":
    main()

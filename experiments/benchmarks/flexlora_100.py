"""Benchmark: FlexLoRA's server step at 100 clients — dense SVD, the exact factored SVD, and the
certified randomised leading components (:func:`fedpeft.lora.leading_svd`).

One ``--size`` × ``--size`` module (default 4096, a Llama-7B q/v projection), ``--clients`` clients
(default 100) with ranks cycled from ``--ranks`` (default [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]: stacked
rank 1,600 at 100 clients, r_max = 64), alpha 16, float32, example counts drawn in [50, 500).

Updates share a decaying spectrum, as trained updates do: a common signal ``S = U diag(σ) Vᵀ`` with
``σ_i = exp(-decay · i)`` (rank r_max); client k's ``s_k B_k A_k`` is the signal's top ``r_k``
components with its own noise on both factors (``‖noise‖_F ≈ --noise × ‖S_{r_k}‖_F``). The
noise-floor case (``--floor``, default 0.05; ``--floor`` with no value skips it) is the same with a
slowly decaying signal ``σ_i ∝ 1/√i`` (i = 1 … r_max) and 5% noise: a trained update is a signal plus
a noise floor. The dense SVD is measured again on it (its time depends on the spectrum). The flat case
(on unless ``--no-flat``) uses random factors instead (``A ~ N(0, 1/in)``, ``B ~ N(0, 0.01²)``, as
``aggregation.py``), where the randomised path must fall back to the exact SVD.

For each method: the seconds of one module's server step (stack + SVD + every client's payload;
dense: form ΔW, ``torch.linalg.svd`` and slice; wall clock and the process's CPU time, which on a
shared machine leaves out the waits for a core), the speedup against dense, and the worst client
excess ``max_k (‖ΔW − s_k B_k A_k‖_F − opt_{r_k}) / ‖ΔW‖_F`` with ``opt_r = √Σ_{i>r} σ_i²``
(Eckart–Young), measured in float64 against the float64 factored SVD of the same update. Dense is
measured once (``--no-dense`` skips it, ``--dense-seconds`` supplies a figure).

    .venv/bin/python experiments/benchmarks/flexlora_100.py [--size 4096] [--clients 100] [--ranks 64 32 16 16 8 8 4 4 4 4]
        [--noise 0.1] [--floor 0.05] [--decay 0.05] [--repeat 1] [--threads N] [--no-dense] [--no-flat]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from pathlib import Path

if "--threads" in sys.argv[:-1] and sys.argv[sys.argv.index("--threads") + 1] != "0":
    # NumPy's OpenBLAS (leading_svd's float64 products on the CPU) reads its thread count on load
    os.environ.setdefault("OPENBLAS_NUM_THREADS", sys.argv[sys.argv.index("--threads") + 1])

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedpeft.lora import LoraFactors, normalized_weights, scaling_for, stack, svd_factors
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.flexlora import FlexLoRA

ALPHA = 16.0
RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
F64 = torch.float64


def spectrum(kind, r_max, decay):
    """The shared signal's singular values: ``exp(-decay · i)`` (``"exp"``, i = 0, 1, …) or ``1/√i``
    (``"sqrt"``, i = 1, 2, …: a slow decay, so that the clients' noise is a floor under it)."""
    i = torch.arange(r_max, dtype=torch.float32)
    return torch.exp(-decay * i) if kind == "exp" else 1 / (i + 1).sqrt()


def decaying_updates(n, ranks, noise, sig, gen):
    r_max = max(ranks)
    U = torch.linalg.qr(torch.randn(n, r_max, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, r_max, generator=gen)).Q
    out = []
    for r in ranks:
        s = scaling_for(r, ALPHA)
        sn = float(sig[:r].norm())
        B = U[:, :r] * sig[:r] + torch.randn(n, r, generator=gen) * (noise * sn / math.sqrt(2 * n * r))
        A = V[:, :r].mT + torch.randn(r, n, generator=gen) * (noise / math.sqrt(2 * n))
        out.append(LoraFactors(A.contiguous(), (B / s).contiguous(), s))
    return out


def flat_updates(n, ranks, gen):
    return [LoraFactors(torch.randn(r, n, generator=gen) / n**0.5, torch.randn(n, r, generator=gen) * 0.01, scaling_for(r, ALPHA)) for r in ranks]


def timed(fn, repeat=1):
    """``((wall, cpu) seconds of the fastest of ``repeat`` runs, its result)``. CPU seconds are the
    process's (``time.process_time``): with one thread they are the work, without the time spent
    waiting for a core that other jobs on a shared machine hold."""
    best, out = (float("inf"), float("inf")), None
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best, out


def worst_excess(W, S, payloads):
    """max over the distinct client ranks of (‖W − s B A‖_F − opt_r) / ‖W‖_F, in float64."""
    nrm, worst = S.norm(), -float("inf")
    for r, f in payloads.items():
        P = f.scaling * (f.B.to(F64) @ f.A.to(F64))
        worst = max(worst, float(((W - P).norm() - S[r:].norm()) / nrm))
    return worst


def run_case(label, factors, specs, nums, repeat, dense, dense_seconds, seed, exact=True):
    p = normalized_weights(nums)
    ups = [ClientUpdate(c.client_id, {"m": f}, {}, n) for c, f, n in zip(specs, factors, nums)]
    by_rank = {c.rank: c for c in specs}  # clients of one rank (and alpha) get the same payload
    # the float64 reference: ΔW and its singular values, from the factors
    ref = stack([LoraFactors(f.A.to(F64), f.B.to(F64), f.scaling) for f in factors], p)
    W = ref.B @ ref.A
    S = svd_factors(ref)[1]
    print(f"\n[{label}] ‖ΔW‖_F = {float(S.norm()):.4g}; σ_1 = {float(S[0]):.3g}, σ_r for r = 4, 16, 64, 65, 200: "
          + ", ".join(f"{float(S[r - 1] / S[0]):.2e}" for r in (4, 16, 64, 65, 200) if r <= S.shape[0]) + " (relative to σ_1)")
    rows = []
    if dense:
        def dense_step():
            st = stack(factors, p)
            D = st.B @ st.A  # the out × in update
            U, Sd, Vh = torch.linalg.svd(D, full_matrices=False)
            return {r: LoraFactors(Vh[:r].contiguous(), (U[:, :r] * Sd[:r]) / scaling_for(r, ALPHA), scaling_for(r, ALPHA)) for r in by_rank}

        dense_seconds, pls = timed(dense_step)
        rows.append(("dense SVD (form ΔW + torch.linalg.svd)", dense_seconds, worst_excess(W, S, pls), "measured"))
    methods = [("exact factored SVD (svd='exact', before)", FlexLoRA(seed=seed, svd="exact"))] if exact else []
    for name, strategy in methods + [("leading_svd (svd='auto', new)", FlexLoRA(seed=seed))]:
        def step(strategy=strategy):
            g = strategy.aggregate(GlobalModel(adapter={}), ups)
            return g, [strategy.payload(g, c) for c in specs]

        sec, (g, pls) = timed(step, repeat)
        payloads = {c.rank: pl.adapter["m"] for c, pl in zip(specs, pls)}
        kind = type(g.adapter["m"]).__name__
        rows.append((name, sec, worst_excess(W, S, payloads), f"global {kind} rank {g.adapter['m'].rank}"
                     + (f", leading {g.adapter['m'].leading.rank}" if hasattr(g.adapter["m"], "leading") else "")))
    print(f"{'method':44s} {'seconds':>9s} {'vs dense':>9s} {'cpu s':>9s} {'vs dense':>9s} {'worst excess':>13s}  note")
    for name, (sec, cpu), ex, note in rows:
        speed = f"{dense_seconds[0] / sec:8.1f}x" if dense_seconds else "        -"
        cspeed = f"{dense_seconds[1] / cpu:8.1f}x" if dense_seconds and dense_seconds[1] == dense_seconds[1] else "        -"
        print(f"{name:44s} {sec:9.3f} {speed} {cpu:9.3f} {cspeed} {ex:13.2e}  {note}")
    return dense_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="out = in features of the module")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--ranks", type=int, nargs="+", default=RANKS, help="client ranks, cycled over the clients")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.1], help="per-client noise, relative (one case each; none: skip)")
    ap.add_argument("--decay", type=float, default=0.05, help="signal spectrum σ_i = exp(-decay · i)")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs (exact and new)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense SVD")
    ap.add_argument("--dense-seconds", type=float, default=0.0, help="a dense figure to compare against when skipping it")
    ap.add_argument("--floor", type=float, nargs="*", default=[0.05],
                    help="noise-floor cases: σ_i ∝ 1/√i with this per-client noise (one case each; none: skip)")
    ap.add_argument("--no-flat", dest="flat", action="store_false", help="skip the flat-spectrum case")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.size
    ranks = [r for _, r in zip(range(args.clients), itertools.cycle(args.ranks))]
    specs = [ClientSpec(k, r, ALPHA) for k, r in enumerate(ranks)]
    gen = torch.Generator().manual_seed(args.seed)
    nums = torch.randint(50, 500, (args.clients,), generator=gen).tolist()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} CPU threads "
          f"({os.cpu_count()} cores, load average {load:.1f} at start: a shared machine, times vary); "
          f"one {n} x {n} module, {args.clients} clients, ranks cycled from {args.ranks} (stacked rank {sum(ranks)}, "
          f"r_max {max(ranks)}), alpha {ALPHA}, float32")
    with torch.inference_mode():
        dense_seconds = (args.dense_seconds, float("nan")) if args.dense_seconds else None
        for i, noise in enumerate(args.noise):
            factors = decaying_updates(n, ranks, noise, spectrum("exp", max(ranks), args.decay), gen)
            dense_seconds = run_case(f"decaying spectrum, noise {noise}, decay {args.decay}", factors, specs, nums, args.repeat,
                                     args.dense and i == 0, dense_seconds, args.seed)
        for i, noise in enumerate(args.floor):  # dense again: its time depends on the spectrum
            factors = decaying_updates(n, ranks, noise, spectrum("sqrt", max(ranks), args.decay), gen)
            dense_seconds = run_case(f"noise floor: σ_i ∝ 1/√i, noise {noise}", factors, specs, nums, args.repeat,
                                     args.dense and i == 0, dense_seconds, args.seed)
        if args.flat:
            run_case("flat spectrum (random factors): expect the exact fallback", flat_updates(n, ranks, gen), specs, nums, args.repeat,
                     False, dense_seconds, args.seed)


if __name__ == "__main__":
    main()

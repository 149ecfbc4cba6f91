"""Privacy on Reuters R8 and compression on rotten tomatoes (MiniLM-L6 + LoRA, IID clients).

Two sweeps, each run a real `fedpeft simulate` (Flower + Ray) per setting and seed, reported by
`fedpeft compare` (re-running with the same ``--dir`` skips the runs that finished):

* privacy: FedAvg-LoRA, FFA-LoRA and DP-LoRA with sample-level DP (DP-SGD, Opacus, clip 1.0) at
  ε ∈ {∞, 8, 3, 1}, δ = 1e-5, over ``--seeds``; σ is derived from the target for the whole run. At
  ε = ∞ every method clips every example and samples its batches as under DP, without noise (σ = 0):
  the same SGD setting, so the columns differ by the noise only (unclipped, lr 0.5 diverges: the
  FedAvg-LoRA pilot without DP ends at the majority class, 0.508).
  The DP setting keeps DP-SGD's noise as small against its signal as this CPU affords (few
  trainable parameters, large partitions, batches of 128, SGD; see DP_SETTINGS); `pilot.py --measure`
  prints the two norms and the batch size each ε would need.
* compression: FedAvg-LoRA with each codec (none, fp16, bf16, int8, int4, top-k 10% and 1% with
  error feedback): accuracy against the bytes really sent (Flower's count of the encoded records).

    .venv/bin/python experiments/privacy/run.py [--sweep privacy|compression|all] [--seeds 0 1 2] [--dir DIR] [overrides...]

Results: experiments/privacy/results/{privacy,compression}/ (compare.md, compare.csv, runs.csv, privacy/claims.md,
plots); each run's config, metrics and summary under sweep/{privacy,compression}/ (kept in git;
checkpoints and W&B files are not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sweep import report, run_sweep, with_seeds, write_claims  # noqa: E402

# DP-SGD's noise on the averaged gradient has norm σ·C·sqrt(d)/B (d trainable parameters, B the
# expected batch) against a signal, the norm of the mean of the clipped per-example gradients, that
# `pilot.py --measure` measures: 0.12 on rotten tomatoes, 0.49 on Reuters R8 (topic gradients agree
# across examples far more than sentiment ones), so the DP sweep runs on R8. LoRA r=1 on `value`
# only (d = 4,608 + the 3,080-parameter head; FFA-LoRA trains 2,304 + the head), B = 128 and two
# clients of 2,742 documents: at ε = 8 over 30 steps σ = 0.62 and the noise is 0.4–0.5× the signal.
# The optimizer is SGD with momentum 0.9, not AdamW: Adam divides every coordinate's step by its own
# gradient scale, so under noise every coordinate (the head's included) moves by about the
# learning rate in a random direction, and the head's random walk along the features' common
# component sends every example to one class. Measured with the pilot (one client, 30 steps,
# clip 1): AdamW lr 1e-2 learns at σ = 0, 0.05, 0.2 (0.77, 0.76, 0.77) and collapses at σ = 0.6
# (0.53, 100% one class; lr 1e-3 as well); SGD lr 0.5 gives 0.77 at σ = 0 and 0.70 at σ = 0.6;
# SGD lr 2 diverges even without noise.
DP_SETTINGS = [
    "data=reuters_r8", "clients=2", "rounds=3", "train.local_steps=10", "train.batch_size=128", "train.lr=0.5",
    "train.optimizer=sgd", "train.momentum=0.9", "model.target_modules=[value]", "model.rank=1", "model.alpha=2",
    "data.eval_samples=500",
]
# The compression sweep keeps the original setting (LoRA r=8 on query/value, batch 16).
CODEC_SETTINGS = ["data=rotten_tomatoes", "clients=5", "rounds=3", "train.local_steps=15", "data.eval_samples=500"]
EPSILONS = ["inf", "8", "3", "1"]
METHODS = ("fedavg", "ffa_lora", "dp_lora")  # FedAvg-LoRA, FFA-LoRA, DP-LoRA
CODECS = {
    "fp16": ["compression=fp16"],
    "bf16": ["compression=bf16"],
    "int8": ["compression=int8"],
    "int4": ["compression=int4"],
    "topk10": ["compression=topk", "compression.topk_fraction=0.1"],
    "topk1": ["compression=topk", "compression.topk_fraction=0.01"],
}


def privacy_runs(epsilons: list[str] = EPSILONS) -> dict[str, list[str]]:
    runs = {}
    for method in METHODS:
        for eps in epsilons:
            if eps == "inf":  # clipped and Poisson-sampled as under DP, no noise: what the noise alone costs
                dp = ["privacy=sample", "privacy.noise_multiplier=0.0"]
            else:
                dp = ["privacy=sample", f"privacy.target_epsilon={eps}"]
            runs[f"{method}_eps{eps}"] = [f"strategy={method}", *dp]
    return runs


def privacy_claims(epsilons: list[str] = EPSILONS) -> list[tuple[str, str, str]]:
    """FFA-LoRA's claim (≥ FedAvg-LoRA under DP) at each ε, and each method at each finite ε
    against the majority class (does DP-SGD learn at all)."""
    names = {"fedavg": "FedAvg-LoRA", "ffa_lora": "FFA-LoRA", "dp_lora": "DP-LoRA"}
    out = [(f"FFA-LoRA ≥ FedAvg-LoRA at ε = {'∞' if e == 'inf' else e} (Sun et al., ICLR 2024)", f"ffa_lora_eps{e}", f"fedavg_eps{e}")
           for e in epsilons]
    out += [(f"{names[m]} at ε = {e} > the majority class", f"{m}_eps{e}", f"majority:{m}_eps{e}")
            for e in epsilons if e != "inf" for m in METHODS]
    return out


def compression_runs() -> dict[str, list[str]]:
    runs = {"codec_none": ["strategy=fedavg", "privacy=none"]}
    runs.update({f"codec_{k}": ["strategy=fedavg", "privacy=none", *v] for k, v in CODECS.items()})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", choices=["privacy", "compression", "all"], default="privacy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dir", type=Path, help="sweep directory (default: sweep/ here; re-running skips finished runs)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the reports from --dir")
    ap.add_argument("--epsilons", nargs="+", default=EPSILONS, choices=EPSILONS, help="the privacy sweep's targets (inf: no DP)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sweep_dir = (args.dir or HERE / "sweep").resolve()  # kept in git: finished runs carry over between machines
    book = ["tracking.save_adapters=false", "tracking.experiment=privacy"]
    for sweep, runs, settings, title in (
        ("privacy", privacy_runs(args.epsilons), DP_SETTINGS, "Sample-level DP on Reuters R8: accuracy against ε"),
        ("compression", compression_runs(), CODEC_SETTINGS, "Update compression on rotten tomatoes (FedAvg-LoRA)"),
    ):
        if args.sweep not in (sweep, "all"):
            continue
        if not args.report_only:
            run_sweep(with_seeds(runs, args.seeds), [*settings, *book, *args.overrides], sweep_dir / sweep, sweep)
        report(sweep_dir / sweep, HERE / "results" / sweep, title)
        if sweep == "privacy":
            write_claims(sweep_dir / sweep, privacy_claims(args.epsilons), args.seeds, HERE / "results" / sweep,
                         "FFA-LoRA's claim and DP's utility, on paired seeds")


if __name__ == "__main__":
    main()

"""PEFT methods and the federated methods after FLoRA on 20 Newsgroups: every PEFT method with
FedAvg, and FedEx-LoRA, FedSA-LoRA, RoLoRA, FeDeRA, Fed-SB and FLASC (LoRA at r=8 where they take
it; Fed-SB trains LoRA-XS's 8×8 cores; FLASC sends a quarter of the entries each way); Dirichlet(0.5) over 10 clients, half of them a round, the same
rounds and local steps for all, each with every seed.

One command runs the sweep (one `fedpeft simulate` per setting and seed; re-running with the same
``--dir`` skips what finished and extends what has fewer rounds) and writes `fedpeft compare`'s
table (final accuracy mean ± std over seeds, trained parameters, MB up, seconds) and plots
(accuracy against round and against cumulative MB uploaded):

    .venv/bin/python experiments/peft_methods/run.py [--seeds 0 1 2] [--rounds 10] [--steps 10] [--dir DIR] [overrides...]

FedSA-LoRA's accuracy is the mean over the clients' own held-out splits (its global A alone is no
model); every other row is the server's test-set accuracy.

Results: experiments/peft_methods/results/ (compare.md, compare.csv, runs.csv, the plots, and
claims.md: the papers' claims against FedAvg-LoRA, paired by seed with a 95% t-interval); each
run's config, metrics and summary under sweep/ (kept in git; checkpoints and W&B files are not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sweep import report, run_sweep, select, with_seeds, write_claims  # noqa: E402

METHODS = ["lora", "rslora", "dora", "loha", "lokr", "vera", "ia3", "prompt_tuning", "prefix_tuning", "bitfit"]
# FLASC: its default densities, ¼ down and ¼ up; SLoRA: its defaults, 1 round of stage 1 at 1% density, then LoRA
STRATEGIES = ["fedex_lora", "fedsa_lora", "rolora", "federa", "fed_sb", "flasc", "slora"]
# (claim, better, worse): each paper's claim as "better ≥ worse" in final test accuracy, against
# FedAvg of plain LoRA at the same rank, rounds and local steps. FedSA-LoRA is in none: its accuracy
# is the mean over the clients' own held-out splits, not the server's test set.
CLAIMS = [
    ("DoRA ≥ LoRA (Liu et al., ICML 2024)", "fedavg_dora", "fedavg_lora"),
    ("rsLoRA ≥ LoRA (Kalajdzievski 2023; shown for larger ranks than 8)", "fedavg_rslora", "fedavg_lora"),
    ("FedEx-LoRA ≥ FedAvg-LoRA: exact aggregation (Singhal et al., ACL 2025)", "fedex_lora", "fedavg_lora"),
    ("RoLoRA ≥ FedAvg-LoRA (Chen et al., NeurIPS 2025)", "rolora", "fedavg_lora"),
    ("FeDeRA ≥ FedAvg-LoRA under non-IID data (Yan et al. 2024)", "federa", "fedavg_lora"),
    ("Fed-SB ≥ FedAvg-LoRA at a fraction of the bytes (Singhal et al. 2025)", "fed_sb", "fedavg_lora"),
    ("FLASC ≥ FedAvg-LoRA sending ¼ of the entries each way (Kuo et al. 2024: it matches dense LoRA)", "flasc", "fedavg_lora"),
    ("SLoRA ≥ FedAvg-LoRA (Babakniya et al. 2023)", "slora", "fedavg_lora"),
    *((f"{m} learns: above the majority class", f"fedavg_{m}", f"majority:fedavg_{m}") for m in METHODS),
]


def runs() -> dict[str, list[str]]:
    out = {f"fedavg_{m}": ["strategy=fedavg", f"peft={m}"] for m in METHODS}
    out.update({s: [f"strategy={s}"] for s in STRATEGIES})  # Fed-SB selects peft=lora_xs itself
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dir", type=Path, help="sweep directory (default: sweep/ here; re-running skips finished runs)")
    ap.add_argument("--only", nargs="+", help="run only these settings (names as in the table: fedavg_ia3, fed_sb, ...)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from --dir")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sweep_dir = (args.dir or HERE / "sweep").resolve()  # kept in git: finished runs carry over between machines
    common = [
        "data=newsgroups", "partition=dirichlet", "partition.alpha=0.5", "clients=10", "fraction=0.5",
        f"rounds={args.rounds}", f"train.local_steps={args.steps}", "data.eval_samples=500", "model.rank=8", "model.alpha=16",
        "tracking.experiment=peft_methods", "tracking.save_adapters=false", *args.overrides,
    ]
    chosen = select(runs(), args.only, ap)
    if not args.report_only:
        run_sweep(with_seeds(chosen, args.seeds), common, sweep_dir, "PEFT methods")
    out = HERE / "results"
    report(sweep_dir, out, "PEFT methods and strategies on 20 Newsgroups (10 clients, Dirichlet 0.5)")
    write_claims(sweep_dir, CLAIMS, args.seeds, out)


if __name__ == "__main__":
    main()

"""Byzantine clients on the default task: 20% sign-flip attackers against FedAvg, the coordinate-wise
median, the trimmed mean and Krum, with FedAvg without attackers as the reference; each with each seed.

The default task is `fedpeft simulate`'s (configs/config.yaml): MiniLM-L6 + LoRA r=8 on query/value,
10 IID clients all sampled every round, the 2016 election tweets, 5 rounds of 20 local steps. Two
of the ten clients (``profile.byzantine=0.2``, drawn once from the seed) reply the sign-flipped
update ``θ_g − Δ`` each round. Krum assumes f = 2 (n = 10 > 2f + 2); the trimmed mean drops
⌊0.2·10⌋ = 2 values at each end of every coordinate (β = 0.2).

One command runs the sweep (one `fedpeft simulate` per setting and seed; re-running with the same
``--dir`` skips what finished), then writes `fedpeft compare`'s table and plots and the claims
tested on paired seeds (same partition, initialisation, attackers):

    .venv/bin/python experiments/byzantine/run.py [--seeds 0 1 2] [--rounds 5] [--steps 20] [--dir DIR] [--only NAME...] [overrides...]

Results: experiments/byzantine/results/ (compare.md, compare.csv, runs.csv, the plots, claims.md);
each run's config, metrics and summary under sweep/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sweep import report, run_sweep, select, with_seeds, write_claims  # noqa: E402

ATTACK = ["profile.byzantine=0.2", "profile.attack=sign_flip"]
SETTINGS = {
    "fedavg_clean": [],  # no attackers: the reference
    "fedavg": ATTACK,
    "median": [*ATTACK, "server.robust=median"],
    "trimmed_mean": [*ATTACK, "server.robust=trimmed_mean", "server.trim_beta=0.2"],
    "krum": [*ATTACK, "server.robust=krum", "server.krum_f=2"],
}
# (claim, better, worse), as "better ≥ worse" in final test accuracy, paired by seed.
CLAIMS = [
    ("20% sign-flip attackers hurt FedAvg", "fedavg_clean", "fedavg"),
    ("the median resists them better than FedAvg (Yin et al. 2018)", "median", "fedavg"),
    ("the trimmed mean resists them better than FedAvg (Yin et al. 2018)", "trimmed_mean", "fedavg"),
    ("Krum resists them better than FedAvg (Blanchard et al. 2017)", "krum", "fedavg"),
    ("the median under attack is as good as FedAvg without", "median", "fedavg_clean"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="default: the default task's (configs/config.yaml)")
    ap.add_argument("--steps", type=int, default=20, help="local steps per round (default: the default task's)")
    ap.add_argument("--dir", type=Path, help="sweep directory (default: sweep/ here; re-running skips finished runs)")
    ap.add_argument("--only", nargs="+", help=f"run only these settings, in this order (some of {', '.join(SETTINGS)})")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from --dir")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sweep_dir = (args.dir or HERE / "sweep").resolve()  # kept in git: finished runs carry over between machines
    common = [f"rounds={args.rounds}", f"train.local_steps={args.steps}", "tracking.experiment=byzantine",
              "tracking.save_adapters=false", *args.overrides]
    if not args.report_only:
        run_sweep(with_seeds(select(SETTINGS, args.only, ap), args.seeds), common, sweep_dir, "byzantine")
    out = HERE / "results"
    report(sweep_dir, out, "20% sign-flip attackers on the default task (10 IID clients, MiniLM + LoRA)")
    write_claims(sweep_dir, CLAIMS, args.seeds, out, title="Robust aggregation against 20% sign-flip attackers, on paired seeds")


if __name__ == "__main__":
    main()

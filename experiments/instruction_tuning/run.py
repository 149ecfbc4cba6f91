"""Federated instruction tuning of SmolLM2-135M-Instruct on the built-in multi-task federation
(``+preset=instruct``: five tasks, one per client group, a 4-bit NF4 base, LoRA on every linear
layer): FedAvg with everyone at the smallest rank, HetLoRA, FLoRA and FlexLoRA with heterogeneous
ranks [16, 8, 4, 4, 4] (cycled over clients), FedEx-LoRA at the smallest rank (it aggregates one
rank exactly); FedAvg and FLoRA also on an unquantized base (``*_full``: ``--full-dtype``, bfloat16
on a GPU, float32 on a CPU, where torch's bf16 matmuls are ~50× slower); every method with each seed.

One command runs the sweep (one `fedpeft simulate` per method and seed; re-running with the same
``--dir`` skips what finished), then writes `fedpeft compare`'s table and plots of the generative
accuracy and the papers' claims tested on paired seeds:

    .venv/bin/python experiments/instruction_tuning/run.py [--seeds 0 1 2] [--full-dtype float32|bfloat16] [--dir DIR] [--only NAME...] [overrides...]

Results: experiments/instruction_tuning/results/ (compare.md, compare.csv, the plots, claims.md);
each run's config, metrics and generated samples under sweep/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sweep import report, run_sweep, select, with_seeds, write_claims  # noqa: E402

METRIC = "gen/accuracy"  # the server's greedy-generation accuracy over the held-out rows of the short-answer tasks
METHODS = {m: [f"+method={m}"] for m in ["fedavg_r4", "hetlora", "flora", "flexlora", "fedex_lora"]}
FULL = ["model.quantization=none"]  # + model.dtype=<--full-dtype>
SETTINGS = {**METHODS, "fedavg_r4_full": ["+method=fedavg_r4", *FULL], "flora_full": ["+method=flora", *FULL]}
# The budget of one run on a 2-core CPU: 3 rounds of 4 local steps of 4 examples, the server's loss
# on 50 held-out rows and 25 greedy generations (5 per task) of up to 6 tokens (the labels' length).
BUDGET = ["rounds=3", "train.local_steps=4", "train.batch_size=4", "data.eval_samples=50", "eval.generate_samples=25",
          "eval.max_new_tokens=6", "eval.log_samples=4"]
# (claim, better, worse): "better ≥ worse" in final generative accuracy.
CLAIMS = [
    ("heterogeneous ranks (FLoRA) ≥ everyone at the smallest rank (Wang et al. 2024)", "flora", "fedavg_r4"),
    ("FLoRA ≥ zero-padding (HetLoRA) under heterogeneous ranks (Wang et al. 2024)", "flora", "hetlora"),
    ("FlexLoRA ≥ HetLoRA on heterogeneous tasks (Bai et al. 2024)", "flexlora", "hetlora"),
    ("heterogeneous ranks (HetLoRA) ≥ everyone at the smallest rank (Cho et al. 2024)", "hetlora", "fedavg_r4"),
    ("exact aggregation (FedEx-LoRA) ≥ FedAvg of the factors at one rank (Singhal et al. 2025)", "fedex_lora", "fedavg_r4"),
    ("a 4-bit NF4 base loses nothing against an unquantized one (QLoRA, Dettmers et al. 2023): FedAvg", "fedavg_r4", "fedavg_r4_full"),
    ("a 4-bit NF4 base loses nothing against an unquantized one: FLoRA", "flora", "flora_full"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--full-dtype", default=None, help="the unquantized base's model.dtype (default: bfloat16 with CUDA, float32 without)")
    ap.add_argument("--dir", type=Path, help="sweep directory (default: sweep/ here; re-running skips finished runs)")
    ap.add_argument("--only", nargs="+", help=f"run only these settings, in this order (some of {', '.join(SETTINGS)})")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from --dir")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sweep_dir = (args.dir or HERE / "sweep").resolve()
    common = [
        f"hydra.searchpath=[file://{HERE / 'conf'}]", "+preset=instruct", "tracking.save_adapters=false", *BUDGET, *args.overrides,
    ]
    full = args.full_dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    SETTINGS["fedavg_r4_full"].append(f"model.dtype={full}")
    SETTINGS["flora_full"].append(f"model.dtype={full}")
    if not args.report_only:
        run_sweep(with_seeds(select(SETTINGS, args.only, ap), args.seeds), common, sweep_dir, "instruction tuning")
    out = HERE / "results"
    report(sweep_dir, out, "Federated instruction tuning, SmolLM2-135M-Instruct, five tasks", metric=METRIC)
    write_claims(sweep_dir, CLAIMS, args.seeds, out, metric=METRIC)


if __name__ == "__main__":
    main()

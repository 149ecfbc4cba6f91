"""Privacy and compression on rotten tomatoes (MiniLM-L6 + LoRA r=8, 5 IID clients).

Two sweeps, each run a real `fedpeft simulate` (Flower + Ray) in sequence:

* privacy: FedAvg-LoRA, FFA-LoRA and DP-LoRA with sample-level DP (DP-SGD, Opacus, clip 1.0) at
  ε ∈ {∞, 8, 3, 1}, δ = 1e-5; σ is derived from the target for the whole run. At ε = ∞ FedAvg-LoRA
  and FFA-LoRA train without DP; DP-LoRA still clips every example's gradient (σ = 0).
* compression: FedAvg-LoRA with each codec (none, fp16, bf16, int8, int4, top-k 10% and 1% with
  error feedback): accuracy against the bytes really sent (Flower's count of the encoded records).

    .venv/bin/python experiments/privacy/run.py [--sweep privacy|compression|all] [--clients 5] [--rounds 3] [--steps 15] [overrides...]

Results: experiments/privacy/results/ (results.md, privacy.png, compression.png); each run's
metrics, config and W&B (offline) files under runs/privacy/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EPSILONS = ["inf", "8", "3", "1"]
METHODS = {"fedavg": "FedAvg-LoRA", "ffa_lora": "FFA-LoRA", "dp_lora": "DP-LoRA"}
CODECS = {  # the float32 baseline ("none") is the privacy sweep's FedAvg-LoRA at ε = ∞: the same run
    "fp16": ["compression=fp16"],
    "bf16": ["compression=bf16"],
    "int8": ["compression=int8"],
    "int4": ["compression=int4"],
    "topk10": ["compression=topk", "compression.topk_fraction=0.1"],
    "topk1": ["compression=topk", "compression.topk_fraction=0.01"],
}
CODEC_LABELS = {"none": "float32", "fp16": "fp16", "bf16": "bf16", "int8": "int8 (stoch.)", "int4": "int4 (stoch.)", "topk10": "top-10% + EF", "topk1": "top-1% + EF"}


def privacy_runs() -> dict[str, list[str]]:
    runs = {}
    for method in METHODS:
        for eps in EPSILONS:
            if eps == "inf":
                dp = ["privacy=sample", "privacy.noise_multiplier=0.0"] if method == "dp_lora" else ["privacy=none"]
            else:
                dp = ["privacy=sample", f"privacy.target_epsilon={eps}"]
            runs[f"{method}_eps{eps}"] = [f"strategy={method}", *dp]
    return runs


def compression_runs() -> dict[str, list[str]]:
    runs = {"fedavg_epsinf": privacy_runs()["fedavg_epsinf"]}
    runs.update({f"codec_{k}": ["strategy=fedavg", "privacy=none", *v] for k, v in CODECS.items()})
    return runs


def run_all(runs: dict[str, list[str]], common: list[str], sweep_dir: Path) -> None:
    exe = str(Path(sys.executable).with_name("fedpeft"))
    for name, overrides in runs.items():
        out = sweep_dir / name
        if (out / "summary.json").exists() and json.loads((out / "summary.json").read_text()).get("status") == "finished":
            print(f"[privacy experiment] {name}: already done", flush=True)
            continue
        if out.exists():  # an unfinished run: fedpeft refuses to write into it, so keep it aside
            aside = out.with_name(f"{name}.incomplete-{datetime.now():%Y%m%d-%H%M%S}")
            out.rename(aside)
            print(f"[privacy experiment] {name}: the unfinished run is kept in {aside}", flush=True)
        cmd = [exe, "simulate", *common, *overrides, f"hydra.run.dir={out}"]
        print(f"[privacy experiment] {name}: $ fedpeft {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            print(f"[privacy experiment] {name}: failed; going on with the others", file=sys.stderr, flush=True)


def load(sweep_dir: Path, names) -> dict[str, dict]:
    out = {}
    for n in names:
        p = sweep_dir / n / "summary.json"
        if p.exists():
            out[n] = json.loads(p.read_text())
    return out


def report(sweep_dir: Path, common: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res_dir = HERE / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    where = sweep_dir.relative_to(ROOT) if sweep_dir.is_relative_to(ROOT) else sweep_dir
    lines = [
        "# Privacy and compression on rotten tomatoes",
        "",
        f"Measured {datetime.now():%Y-%m-%d} on a 2-core CPU with `experiments/privacy/run.py`; common settings: `{' '.join(common)}`",
        f"(MiniLM-L6 + LoRA r=8 on query/value, IID clients, all sampled each round, AdamW lr 3e-3, batch 16). Runs: `{where}`.",
        "",
    ]
    pr = load(sweep_dir, privacy_runs())
    if pr:
        lines += [
            "## Sample-level DP (DP-SGD via Opacus, clip 1.0, δ = 1e-5)",
            "",
            "ε is the RDP accountant's value after the last round (every client's worst case: the smallest",
            "partition's Poisson rate, every round counted). σ is the noise multiplier derived from the target.",
            "",
            "| method | target ε | σ | ε spent | " + " | ".join(f"acc r{r}" for r in range(len(next(iter(pr.values()))["history"]))) + " | final test loss | seconds |",
            "|---|---|---|---|" + "---|" * (len(next(iter(pr.values()))["history"]) + 2),
        ]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for method, label in METHODS.items():
            xs, ys = [], []
            for eps in EPSILONS:
                s = pr.get(f"{method}_eps{eps}")
                if s is None:
                    lines.append(f"| {label} | {eps} | — | — | not run or failed |")
                    continue
                p = s.get("privacy", {})
                acc = [h["accuracy"] for h in s["history"]]
                spent = p.get("epsilon")
                spent_s = "∞" if spent is None or spent == float("inf") else f"{spent:.2f}"
                sigma = f"{p['noise_multiplier']:.3f}" if p else "—"
                lines.append(f"| {label} | {'∞' if eps == 'inf' else eps} | {sigma} | {spent_s} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {s['history'][-1]['loss']:.4f} | {s['seconds']:.0f} |")
                xs.append(EPSILONS.index(eps))
                ys.append(acc[-1])
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xticks(range(len(EPSILONS)), ["∞", "8", "3", "1"])
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel("final test accuracy")
        ax.set_title("Rotten tomatoes, sample-level DP (δ = 1e-5)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(res_dir / "privacy.png", dpi=120)
        lines.append("")
        lines.append(f"Majority-class rate: {next(iter(pr.values()))['majority_rate']:.3f}.")
        lines.append("")
    cr = load(sweep_dir, compression_runs())
    if cr:
        lines += [
            "## Compression (FedAvg-LoRA, no DP)",
            "",
            "Bytes are Flower's `count_bytes` of the records sent (encoded arrays + config), summed over all rounds.",
            "",
            "| codec | final accuracy | final test loss | MB up (total) | MB down (total) | up vs float32 | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        base_up = None
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for key, label in CODEC_LABELS.items():
            s = cr.get("fedavg_epsinf" if key == "none" else f"codec_{key}")
            if s is None:
                lines.append(f"| {label} | not run or failed | | | | | |")
                continue
            up = sum(h.get("bytes_up", 0) for h in s["history"][1:])
            down = sum(h.get("bytes_down", 0) for h in s["history"][1:])
            base_up = base_up or (up if key == "none" else None)
            ratio = f"{up / base_up:.3f}" if base_up else "—"
            acc = s["history"][-1]["accuracy"]
            lines.append(f"| {label} | {acc:.3f} | {s['history'][-1]['loss']:.4f} | {up / 1e6:.2f} | {down / 1e6:.2f} | {ratio} | {s['seconds']:.0f} |")
            ax.scatter((up + down) / 1e6, acc, s=40)
            ax.annotate(label, ((up + down) / 1e6, acc), textcoords="offset points", xytext=(5, -12 if key == "bf16" else 4), fontsize=8)
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("MB sent, up + down, all rounds (log)")
        ax.set_ylabel("final test accuracy")
        ax.set_title("Rotten tomatoes, FedAvg-LoRA: accuracy vs bytes")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(res_dir / "compression.png", dpi=120)
        lines.append("")
    (res_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", choices=["privacy", "compression", "all"], default="all")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--dir", type=Path, help="sweep directory (re-running skips finished runs)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sweep_dir = (args.dir or ROOT / "runs" / "privacy" / f"sweep_{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    common = [
        "data=rotten_tomatoes", f"clients={args.clients}", f"rounds={args.rounds}", f"train.local_steps={args.steps}",
        "data.eval_samples=500", "tracking.save_adapters=false", "tracking.experiment=privacy", *args.overrides,
    ]
    if not args.report_only:
        runs = {}
        if args.sweep in ("privacy", "all"):
            runs.update(privacy_runs())
        if args.sweep in ("compression", "all"):
            runs.update(compression_runs())
        run_all(runs, common, sweep_dir)
    report(sweep_dir, common)


if __name__ == "__main__":
    main()

"""Pilot for the DP experiment's setting: one client's DP-SGD training in-process (no federation),
so that a setting can be tried in about a minute before the sweep spends an hour on it.

For each (trainable set, lr) it trains `--steps` DP-SGD steps at the noise multiplier that the
sweep's accountant would derive for ε = 8 (and without DP), then prints the held-out accuracy and
the noise-to-signal figure ``σ·C·sqrt(d)/B``:

    .venv/bin/python experiments/privacy/pilot.py [--steps 30] [--batch 64] [--lrs 1e-3 3e-3]
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import torch


def signal_norm(lm, payload, rows, clip: float = 1.0) -> tuple[float, float]:
    """(‖mean of the per-example gradients clipped to ``clip``‖, mean per-example norm before
    clipping) over ``rows``, at the payload's start: DP-SGD's signal, measured one example at a time."""
    from clients.train import encode
    from fedpeft.models import write_adapter

    write_adapter(lm, payload.adapter, payload.head)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    if not payload.plan.train_A:
        params = [p for n, p in lm.model.named_parameters() if p.requires_grad and "lora_A" not in n]
    total, norms = None, []
    for i in range(len(rows)):
        lm.model.zero_grad(set_to_none=True)
        lm.model(**encode(lm, rows[i : i + 1])).loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
        norms.append(float(g.norm()))
        g = g * min(1.0, clip / (norms[-1] + 1e-12))
        total = g if total is None else total + g
    lm.model.zero_grad(set_to_none=True)
    return float(total.norm()) / len(rows), sum(norms) / len(norms)


def main() -> None:
    from clients.train import DPSettings, TrainSettings, evaluate, sample_rate, train
    from fedpeft import data as fdata
    from fedpeft.models import build, read_adapter, write_adapter
    from fedpeft.plan import ClientPlan, Payload
    from fedpeft.privacy import noise_multiplier_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="DP-SGD steps (the sweep: rounds × local steps)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--clients", type=int, default=2, help="the partition is train/clients examples")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--ffa-only", action="store_true")
    ap.add_argument("--modules", nargs="+", default=["value"], help="LoRA target modules (peft names or suffixes)")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--measure", action="store_true", help="only measure DP-SGD's signal and noise norms (no training)")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--data", default="rotten_tomatoes", help="a built-in dataset (fedpeft.data)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ds = fdata.load(args.data, seed=0)
    num_labels = len(set(ds["train"]["label"]))
    n = len(ds["train"]) // args.clients
    part = ds["train"].shuffle(seed=0).select(range(n))
    test = ds["test"].shuffle(seed=0).select(range(500))
    q = sample_rate(n, args.batch)
    sigma = noise_multiplier_for(args.epsilon, 1e-5, q, args.steps)
    print(f"partition {n} examples, q = {q:.4f}, {args.steps} steps: σ = {sigma:.3f} for ε = {args.epsilon}")
    for modules, rank, freeze in ((args.modules, args.rank, False), (args.modules, args.rank, True))[1 if args.ffa_only else 0:]:
        model_cfg = SimpleNamespace(name="minilm", task="classification", target_modules=modules, rank=rank, alpha=2.0 * rank, dropout=0.0, max_length=64)
        lm = build(model_cfg, num_labels=num_labels, device="cpu", seed=0)
        start = read_adapter(lm)
        d = sum(p.numel() for p in lm.model.parameters() if p.requires_grad) - (sum(f.A.numel() for f in start.adapter.values()) if freeze else 0)
        if args.measure:
            payload = Payload(adapter=start.adapter, head=start.head, plan=ClientPlan(train_A=not freeze))
            signal, raw = signal_norm(lm, payload, part.shuffle(seed=1).select(range(256)))
            print(f"{'FFA-LoRA' if freeze else 'LoRA    '} r={rank} on {modules} d={d}: per-example gradient norm {raw:.2f} (mean), "
                  f"clipped mean's norm {signal:.4f}", flush=True)
            for batch in (64, 256, 1024, 4096):
                qb = sample_rate(n, batch)
                sb = noise_multiplier_for(args.epsilon, 1e-5, qb, args.steps)
                print(f"    B={batch:5d}: σ={sb:.3f} for ε={args.epsilon} over {args.steps} steps, noise norm σ·sqrt(d)/B = {sb * math.sqrt(d) / batch:.4f} "
                      f"({sb * math.sqrt(d) / batch / signal:.1f}× the signal)", flush=True)
            continue
        for lr in args.lrs:
            for dp in (None, DPSettings(sigma, 1.0)):
                t0 = time.perf_counter()
                payload = Payload(adapter=start.adapter, head=start.head, plan=ClientPlan(train_A=not freeze))
                settings = TrainSettings(local_steps=args.steps, batch_size=args.batch, lr=lr, optimizer=args.optimizer, momentum=args.momentum)
                update, _ = train(lm, payload, part, settings, seed=1, client_id=0, dp=dp)
                write_adapter(lm, update.adapter, update.head)
                acc = evaluate(lm, test, 128)["accuracy"]
                write_adapter(lm, start.adapter, start.head)
                ns = (dp.noise_multiplier * math.sqrt(d) / args.batch) if dp else 0.0
                print(f"{'FFA-LoRA' if freeze else 'LoRA    '} r={rank} on {modules} d={d:6d} lr={lr:g} {'DP ε=' + str(args.epsilon) if dp else 'no DP  '}: "
                      f"acc {acc:.3f}  noise/signal bound {ns:.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()

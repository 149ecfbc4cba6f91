"""Benchmark: the per-client engine (``clients.train.train``, one client after another) against the
cohort engine (``clients.cohort.train_cohort``, K clients in one batched step over one base model).

The same clients (same payloads, data, seeds, settings) are trained by both engines, in-process (no
Flower, no Ray): the per-client engine client by client, the cohort engine in cohorts of K. Printed
per model and engine: seconds for all clients, real (non-padding) tokens per second, the speed-up
over the per-client engine, the share of token slots that are padding; on CUDA also the model FLOP
utilisation and the peak memory.

    .venv/bin/python experiments/benchmarks/cohort.py                      # CPU: MiniLM and SmolLM2 (a few minutes)
    .venv/bin/python experiments/benchmarks/cohort.py --models minilm --ks 1,4,8,16,32 --clients 32
    .venv/bin/python experiments/benchmarks/cohort.py --device cuda --models llama1b   # ~1B Llama shape, bf16, MFU

``llama1b`` is a random-init Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads,
4 KV heads, MLP 5632, vocabulary 32000) in bf16, LoRA r=8 on q_proj and v_proj, fed synthetic token
rows of ``--max-length`` tokens (no tokenizer or checkpoint needed); without CUDA it is skipped with
a message. ``llama-tiny`` is the same path at toy size on any device (what CI can run).

MFU: model FLOPs per trained token ``4·N + 12·L·T·d`` — the frozen matmul weights' forward (2N)
and the backward to the activations (2N; frozen weights get no gradient), plus attention scores and
values (``4·T·d`` per layer forward, twice that backward) — over the GPU's dense bf16 peak
(``--peak-tflops``, default from the device name: H100/H200 989, A100 312).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()  # no load reports for the new classification head

import torch  # noqa: E402

from clients.cohort import CohortJob, train_cohort  # noqa: E402
from clients.train import TrainSettings, batch_order, encode, train  # noqa: E402
from fedpeft.lora import LoraFactors, scaling_for  # noqa: E402
from fedpeft.models import LoadedModel, build, module_shapes, read_adapter, use_adapter  # noqa: E402
from strategies.base import Payload  # noqa: E402

DEFAULTS = {  # per model: clients, local steps, batch size, max length, cohort sizes (the default run: a few minutes on 2 CPU cores)
    "minilm": dict(clients=32, steps=2, batch_size=4, max_length=64, ks=(1, 4, 8, 16, 32)),
    "smollm2": dict(clients=16, steps=1, batch_size=4, max_length=32, ks=(1, 4, 8, 16)),
    "llama-tiny": dict(clients=32, steps=2, batch_size=4, max_length=64, ks=(1, 4, 8, 16, 32)),
    "llama1b": dict(clients=32, steps=5, batch_size=4, max_length=256, ks=(1, 4, 8, 16, 32)),
}
LLAMA1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


class IdTokenizer:
    """Rows of space-separated token ids → tensors, for synthetic data: ``encode`` needs only this."""

    pad_token_id = 0
    eos_token_id = 0
    padding_side = "right"

    def __call__(self, texts, truncation=True, max_length=None, padding=True, return_tensors="pt"):
        rows = [[int(t) for t in s.split()][:max_length] for s in texts]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def synthetic_llama(shape: dict, dtype: torch.dtype, device: str, max_length: int, rank: int, alpha: float) -> LoadedModel:
    """A random-init Llama of ``shape`` with a peft LoRA on q_proj and v_proj, as ``build`` makes one."""
    from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=max(2048, max_length), pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora).eval()
    state = get_peft_model_state_dict(model)
    modules = tuple(k[len("base_model.model.") : -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    return LoadedModel(model, IdTokenizer(), "causal_lm", torch.device(device), max_length, modules, (), lora)


def synthetic_rows(n: int, length: int, vocab: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"text": [" ".join(map(str, torch.randint(3, vocab, (length,), generator=g).tolist())) for _ in range(n)]})


def make_model(name: str, device: str, max_length: int, rank: int, alpha: float):
    """The model and a function giving client k's partition."""
    if name in ("llama1b", "llama-tiny"):
        shape = LLAMA1B if name == "llama1b" else LLAMA_TINY
        dtype = torch.bfloat16 if (name == "llama1b" and device == "cuda") else torch.float32
        lm = synthetic_llama(shape, dtype, device, max_length, rank, alpha)
        return lm, lambda k, n: synthetic_rows(n, max_length, shape["vocab_size"], 1000 + k)
    from datasets import Dataset

    from fedpeft import data as fdata

    tweets = fdata.load("election_tweets", seed=0)["train"].shuffle(seed=0)
    task = "classification" if name == "minilm" else "causal_lm"
    targets = ["query", "value"] if name == "minilm" else ["q_proj", "v_proj"]
    spec = SimpleNamespace(name=name, task=task, target_modules=targets, rank=rank, alpha=alpha, dropout=0.0, max_length=max_length)
    lm = build(spec, num_labels=2 if task == "classification" else None, device=device, seed=0)

    def part(k: int, n: int):
        rows = tweets.select(range(k * n, (k + 1) * n))
        return rows if task == "classification" else Dataset.from_dict({"text": rows["text"]})

    return lm, part


def payload(lm: LoadedModel, rank: int, alpha: float, seed: int) -> Payload:
    """A later round's payload: A at peft's init scale, a small non-zero B, the model's head."""
    g = torch.Generator().manual_seed(seed)
    s = scaling_for(rank, alpha)
    adapter = {
        m: LoraFactors((torch.rand(rank, i, generator=g) * 2 - 1) / math.sqrt(i), torch.randn(o, rank, generator=g) * 0.01, s)
        for m, (o, i) in module_shapes(lm).items()
    }
    return Payload(adapter, read_adapter(lm).head)


def tokens_of(lm: LoadedModel, job: CohortJob, settings: TrainSettings) -> int:
    """Real (non-padding) tokens the client trains on: its batches, replayed."""
    order = batch_order(len(job.data), settings.local_steps, settings.batch_size, job.seed)
    return sum(int(encode(lm, job.data[idx])["attention_mask"].sum()) for idx in order)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Row:
    engine: str
    k: int
    seconds: float  # wall
    cpu: float  # this process's CPU seconds (on a shared CPU, what the work itself cost)
    tokens: int
    pad: float
    peak_gib: float = float("nan")


def run_per_client(lm, jobs, settings, device, rank, alpha) -> tuple[float, float]:
    """Wall and CPU (this process) seconds for all clients, one after another."""
    use_adapter(lm, rank, alpha)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for j in jobs:
        train(lm, j.payload, j.data, settings, j.seed, j.client_id)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def run_cohorts(lm, jobs, settings, device, k, tokens_by_client: dict[int, int], pad_tolerance: float | None) -> tuple[float, float, float]:
    """Wall and CPU seconds for all clients in cohorts of ``k``, and the padding share of the token slots."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = slots = 0.0
    for start in range(0, len(jobs), k):
        chunk = jobs[start : start + k]
        out = train_cohort(lm, chunk, settings, pad_tolerance=pad_tolerance)
        # pad_fraction = 1 - tokens/slots over the cohort's steps: recover its slots from its tokens
        t = sum(tokens_by_client[j.client_id] for j in chunk)
        tokens += t
        slots += t / max(1e-12, 1.0 - out[0][1]["pad_fraction"])
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, 1.0 - tokens / slots


def model_flops_per_token(lm: LoadedModel, seq: int) -> float:
    base = lm.model.get_base_model()
    cfg = base.config
    emb = base.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in base.parameters()) - emb  # matmul weights (lm_head included when untied)
    if getattr(cfg, "tie_word_embeddings", False):
        n += emb
    return 4 * n + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size


def peak_tflops(arg: float | None) -> float | None:
    if arg:
        return arg
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0)):
        if key in name:
            return value
    return None


def bench(name: str, args) -> None:
    d = dict(DEFAULTS[name])
    for key in ("clients", "steps", "batch_size", "max_length"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else d["ks"]
    ks = tuple(k for k in ks if k <= d["clients"])
    if name == "llama1b" and args.device != "cuda":
        print(f"\n[{name}] skipped: it is the GPU benchmark (bf16, ~1.1B parameters); run it with --device cuda")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"\n[{name}] skipped: --device cuda but no CUDA device is visible")
        return
    t = time.perf_counter()
    lm, part = make_model(name, args.device, d["max_length"], args.rank, args.alpha)
    settings = TrainSettings(local_steps=d["steps"], batch_size=d["batch_size"], lr=1e-3)
    examples = d["batch_size"] * d["steps"]  # one pass over its data per round
    jobs = [CohortJob(payload(lm, args.rank, args.alpha, k), part(k, examples), seed=10_000 + k, client_id=k) for k in range(d["clients"])]
    tokens_by_client = {j.client_id: tokens_of(lm, j, settings) for j in jobs}
    total = sum(tokens_by_client.values())
    params = sum(p.numel() for p in lm.model.get_base_model().parameters())
    print(f"\n[{name}] {params / 1e6:.1f}M parameters, {next(lm.model.parameters()).dtype}, {args.device}"
          f"{'' if args.device == 'cuda' else f', {torch.get_num_threads()} thread(s)'}; {d['clients']} clients x {d['steps']} steps x "
          f"{d['batch_size']} rows x <= {d['max_length']} tokens ({total} real tokens); LoRA r={args.rank}; pad_tolerance={args.pad_tolerance} "
          f"(loaded in {time.perf_counter() - t:.0f} s)")
    # warm-up (allocator, kernels, tokenizer): one client, one step, both engines
    warm = TrainSettings(local_steps=1, batch_size=d["batch_size"], lr=1e-3)
    use_adapter(lm, args.rank, args.alpha)
    train(lm, jobs[0].payload, jobs[0].data, warm, 0, 0)
    train_cohort(lm, jobs[: min(2, len(jobs))], warm)

    def peak_reset():
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")

    pad_alone = 1.0 - total / sum(
        sum(encode(lm, j.data[idx])["input_ids"].numel() for idx in batch_order(len(j.data), settings.local_steps, settings.batch_size, j.seed))
        for j in jobs
    )
    configs = [("per-client", 1)] + [("cohort", k) for k in ks]
    best: dict[tuple[str, int], Row] = {}
    for rep in range(args.repeats):  # interleaved, so that a busy spell of a shared CPU hits every engine alike
        for engine, k in configs:
            peak_reset()
            if engine == "per-client":
                (sec, cpu), pad = run_per_client(lm, jobs, settings, args.device, args.rank, args.alpha), pad_alone
            else:
                sec, cpu, pad = run_cohorts(lm, jobs, settings, args.device, k, tokens_by_client, args.pad_tolerance)
            print(f"  {engine} {'' if engine == 'per-client' else f'K={k} '}(run {rep + 1}/{args.repeats}): {sec:.1f} s, {cpu:.1f} CPU s", flush=True)
            if (engine, k) not in best or sec < best[(engine, k)].seconds:
                best[(engine, k)] = Row(engine, k, sec, cpu, total, pad, peak())
    rows = [best[c] for c in configs]
    flops = model_flops_per_token(lm, d["max_length"])
    peak_t = peak_tflops(args.peak_tflops) if args.device == "cuda" else None
    ref, ref_cpu = rows[0].seconds, rows[0].cpu
    head = f"  {'engine':<12}{'K':>4}{'seconds':>10}{'tokens/s':>11}{'speed-up':>10}{'padding':>9}"
    head += f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}" if args.device == "cuda" else f"{'CPU s':>9}{'tokens/CPU s':>14}{'CPU speed-up':>14}"
    print(head + (f"   (fastest of {args.repeats} interleaved runs)" if args.repeats > 1 else ""))
    for r in rows:
        line = f"  {r.engine:<12}{r.k if r.engine == 'cohort' else '-':>4}{r.seconds:>10.2f}{r.tokens / r.seconds:>11.0f}{ref / r.seconds:>9.2f}x{r.pad:>9.1%}"
        if args.device != "cuda":
            line += f"{r.cpu:>9.2f}{r.tokens / r.cpu:>14.0f}{ref_cpu / r.cpu:>13.2f}x"
        else:
            tf = r.tokens * flops / r.seconds / 1e12
            line += f"{tf:>9.1f}{(tf / peak_t if peak_t else float('nan')):>7.1%}{r.peak_gib:>10.1f}"
        print(line)
    del lm
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated: minilm, smollm2, llama-tiny, llama1b (default: minilm,smollm2 on CPU, llama1b on CUDA)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ks", default=None, help="cohort sizes, e.g. 1,4,8,16,32")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="local steps per client")
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    ap.add_argument("--max-length", dest="max_length", type=int, default=None)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--pad-tolerance", dest="pad_tolerance", type=lambda v: None if v.lower() == "none" else float(v), default=0.1,
                    help="train_cohort's pad_tolerance (none: one forward pass per step)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per engine, interleaved; the table shows the fastest")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",") if args.models else (["llama1b"] if args.device == "cuda" else ["minilm", "smollm2"])
    for name in models:
        if name not in DEFAULTS:
            sys.exit(f"--models: unknown model {name!r}; expected one of {', '.join(DEFAULTS)}")
    if args.device == "cuda" and torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    for name in models:
        bench(name, args)


if __name__ == "__main__":
    main()

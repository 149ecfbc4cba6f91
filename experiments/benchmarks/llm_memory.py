"""Benchmark: the memory plan (:mod:`fedpeft.memory`) against measured peaks, and tokens/s per actor.

Every setting runs in a fresh Python process (``--worker``), so each peak is that setting's alone:
the process loads the base, builds its LoRA (rank 8 on q_proj and v_proj, SmolLM2's default
targets), trains one warm-up step, then ``--steps`` steps of ``--batch-size`` rows of
``--max-length`` tokens through fedpeft's own training code (``clients.train.train``; the cohort
engine ``clients.cohort.train_cohort`` for ``cohort``). Measured: the peak over those steps and
the real tokens per second. The peak is the process's resident-set high-water mark on CPU
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up, so that loading transients
are left out; the table also shows the load's own peak), and ``torch.cuda.max_memory_allocated``
on a GPU (reset after the warm-up; the plan's CUDA context is not in it and is left out of the
estimate it is compared with).

    .venv/bin/python experiments/benchmarks/llm_memory.py                  # CPU: SmolLM2 in float32, bf16, 8-bit, 4-bit, checkpointing off/on
    .venv/bin/python experiments/benchmarks/llm_memory.py --device cuda    # a ~1B Llama (random init) in bf16 and 4-bit, 1/2/4 actors per GPU

On CUDA the model is a random-init Llama built from a config (hidden 2048, 16 layers, MLP 8192,
32 heads, 8 KV heads, vocabulary 128256: Llama-3.2-1B's shape; nothing is downloaded; saved once
to a temporary directory so that the 4-bit path loads it through bitsandbytes as a checkpoint is
loaded), fed synthetic token rows; 1, 2 and 4 actors share the GPU (processes started together,
each training its own client, or a cohort of ``--cohort`` clients), and the table gives each
actor's peak and tokens/s. Without CUDA, ``--device cuda`` says so and exits.

Every base loads through fedpeft's own ``build`` (``model.dtype``, ``model.quantization``: NF4 with
double quantization, ``model.compute_dtype=auto``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LLAMA1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
BASES = ("float32", "bfloat16", "8bit", "4bit")
RANK, ALPHA, TARGETS = 8, 16.0, ("q_proj", "v_proj")


# ----------------------------------------------------------------------------------------- worker


def vm(key: str) -> float:
    """A ``/proc/self/status`` memory field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024.0
    raise KeyError(key)


def reset_host_peak() -> None:
    """Return freed heap to the system and restart the resident high-water mark from now."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def synthetic_llama_dir(shape: dict, where: Path) -> Path:
    """A random-init Llama of ``shape`` in bf16 with a small word-level tokenizer, saved as a checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (where / "config.json").exists():
        return where
    where.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(4000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(where)
    fast.save_pretrained(where)
    return where


def load(name: str, base: str, device: str, max_length: int):
    """A :class:`fedpeft.models.LoadedModel` with a ``base`` (float32 | bfloat16 | 8bit | 4bit) base,
    built by fedpeft's own ``build`` (``model.dtype`` / ``model.quantization``; a 4-bit base computes
    in ``model.compute_dtype=auto``: bfloat16 on a GPU, float32 on a CPU)."""
    from fedpeft.models import build

    spec = SimpleNamespace(name=name, task="causal_lm", target_modules=list(TARGETS), rank=RANK, alpha=ALPHA, dropout=0.0, max_length=max_length,
                           dtype="bfloat16" if base == "bfloat16" else "float32", quantization=base if base.endswith("bit") else "none",
                           quant_type="nf4", double_quant=True, compute_dtype="auto")
    return build(spec, num_labels=None, device=device, seed=0)


def rows(tokenizer, n: int, length: int, seed: int):
    """``n`` texts of at least ``length`` tokens (truncated to it by ``encode``: every row is full)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalnum() and len(w) > 2][:3000] or ["word"]
    return Dataset.from_dict({"text": [" ".join(rng.choice(words) for _ in range(2 * length)) for _ in range(n)]})


def worker(spec: dict) -> dict:
    """One setting in this process: load, warm up, reset the peak, train, measure."""
    import torch

    import clients.app  # noqa: F401  (what an actor imports: Flower, fedpeft's client side)
    from clients.cohort import CohortJob, train_cohort
    from clients.train import TrainSettings, train
    from fedpeft.models import read_adapter
    from fedpeft.plan import Payload

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    start_rss = vm("VmRSS")
    lm = load(spec["name"], spec["base"], spec["device"], spec["max_length"])
    load_peak = torch.cuda.max_memory_allocated() if cuda else vm("VmHWM")
    k = spec["cohort"]
    settings = TrainSettings(local_steps=1, batch_size=spec["batch_size"], lr=1e-4, gradient_checkpointing=spec["checkpointing"])
    g = read_adapter(lm)
    data = [rows(lm.tokenizer, spec["batch_size"] * (spec["steps"] + 1), spec["max_length"], seed=j) for j in range(k)]

    def run(steps: int) -> None:
        s = TrainSettings(**{**settings.__dict__, "local_steps": steps})
        if spec["engine"] == "cohort":
            train_cohort(lm, [CohortJob(Payload(g.adapter, g.head), data[j], seed=j, client_id=j) for j in range(k)], s)
        else:
            train(lm, Payload(g.adapter, g.head), data[0], s, seed=0, client_id=0)

    if cuda:  # warm-up: allocator, kernels, the optimizer's first step
        run(1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_host_peak()
    resident = torch.cuda.memory_allocated() if cuda else vm("VmRSS")
    t0 = time.perf_counter()
    run(spec["steps"])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else vm("VmHWM")
    tokens = spec["steps"] * spec["batch_size"] * spec["max_length"] * (k if spec["engine"] == "cohort" else 1)
    return {"peak": peak, "resident": resident, "load_peak": load_peak, "runtime": start_rss, "tokens_per_s": tokens / seconds}


# ----------------------------------------------------------------------------------------- parent


def estimate(path: str, base: str, spec: dict) -> float:
    """The plan's bytes for the setting (on a GPU without the CUDA context, which the peak does not count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedpeft import memory

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    c = memory.counts_from_model(meta, meta.config, TARGETS, classification=False)
    s = memory.Setting(dtype=base if base in memory.DTYPE_BYTES else "bfloat16", quantization=base if base.endswith("bit") else "none",
                       rank=RANK, batch_size=spec["batch_size"], max_length=spec["max_length"], checkpointing=spec["checkpointing"],
                       cohort=spec["cohort"] if spec["engine"] == "cohort" else 1, causal=True, cuda=spec["device"] == "cuda")
    plan = memory.make_plan(c, s)
    return plan.per_actor - (memory.CUDA_CONTEXT if s.cuda else 0.0)


def launch(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))


def collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def cpu_table(args) -> None:
    from fedpeft.models import model_path

    path = model_path("smollm2")
    print(f"SmolLM2-135M on CPU, LoRA r={RANK} on {'/'.join(TARGETS)}, batch {args.batch_size} x {args.max_length} tokens, {args.steps} step(s); "
          "peak = resident high-water over the training steps (fresh process per row)")
    print(f"{'base':9} {'ckpt':4} {'engine':10} {'estimate GB':>11} {'peak GB':>8} {'ratio':>6} {'before GB':>9} {'load peak GB':>12} "
          f"{'tokens/s':>9}")
    worst = 0.0
    saved = json.loads(Path(args.load).read_text()) if args.load else {}
    specs = [dict(name="smollm2", path=path, base=base, device="cpu", checkpointing=ck, engine=args.engine, cohort=args.cohort,
                  batch_size=args.batch_size, max_length=args.max_length, steps=args.steps, threads=args.threads)
             for base in args.bases.split(",") for ck in (False, True)]
    keys = [json.dumps({k: v for k, v in spec.items() if k != "path"}, sort_keys=True) for spec in specs]
    measured = {k: saved[k] for k in keys if k in saved}
    todo = [(k, spec) for k, spec in zip(keys, specs) if k not in measured]
    for i in range(0, len(todo), args.parallel):  # each process's own high-water mark: parallel rows do not disturb each other's peaks
        batch = [(k, launch(spec)) for k, spec in todo[i : i + args.parallel]]
        for k, proc in batch:
            measured[k] = collect(proc)
        if args.save:
            Path(args.save).write_text(json.dumps(measured, indent=1))
    for key, spec in zip(keys, specs):
        base, ck = spec["base"], spec["checkpointing"]
        got = measured[key]
        est = estimate(path, base, spec)
        if "error" in got:
            print(f"{base:9} {'on' if ck else 'off':4} {args.engine:10} {est / 1e9:11.2f} {'failed: ' + got['error']}")
            continue
        ratio = got["peak"] / est
        worst = max(worst, abs(ratio - 1))
        print(f"{base:9} {'on' if ck else 'off':4} {args.engine:10} {est / 1e9:11.2f} {got['peak'] / 1e9:8.2f} {ratio:6.2f} "
              f"{got['resident'] / 1e9:9.2f} {got['load_peak'] / 1e9:12.2f} {got['tokens_per_s']:9.1f}")
    print(f"largest deviation of the estimate from the measured peak: {100 * worst:.0f}%")


def cuda_table(args) -> None:
    import torch

    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible here; run it on a GPU machine (the CPU table: --device cpu)")
        return
    total = torch.cuda.get_device_properties(0).total_memory
    path = str(synthetic_llama_dir(LLAMA1B, Path(args.workdir or tempfile.gettempdir()) / "fedpeft_llama1b"))
    print(f"random-init Llama ({LLAMA1B}) on {torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB), LoRA r={RANK}, "
          f"batch {args.batch_size} x {args.max_length} tokens, {args.steps} step(s); peak = max_memory_allocated per actor")
    print(f"{'base':9} {'engine':10} {'actors':>6} {'estimate GB':>11} {'peak GB (each)':>22} {'tokens/s (each)':>24}")
    for base in ("bfloat16", "4bit"):
        for engine in ("per_client", "cohort"):
            for n in (1, 2, 4):
                spec = dict(name=path, path=path, base=base, device="cuda", checkpointing=args.checkpointing, engine=engine, cohort=args.cohort,
                            batch_size=args.batch_size, max_length=args.max_length, steps=args.steps, threads=2)
                got = [collect(p) for p in [launch(spec) for _ in range(n)]]
                est = estimate(path, base, spec)
                peaks = " ".join("OOM" if "error" in g else f"{g['peak'] / 1e9:.2f}" for g in got)
                speeds = " ".join("-" if "error" in g else f"{g['tokens_per_s']:.0f}" for g in got)
                print(f"{base:9} {engine:10} {n:6} {est / 1e9:11.2f} {peaks:>22} {speeds:>24}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--bases", default=",".join(BASES), help="CPU: comma-separated bases (float32,bfloat16,8bit,4bit)")
    ap.add_argument("--engine", choices=("per_client", "cohort"), default="per_client", help="CPU: the engine")
    ap.add_argument("--cohort", type=int, default=4, help="clients per cohort (engine cohort)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1, help="CPU: settings measured at once (each in its own process)")
    ap.add_argument("--checkpointing", action="store_true", help="CUDA: with gradient checkpointing")
    ap.add_argument("--workdir", default=None, help="CUDA: where the random Llama checkpoint is saved (default: the temp dir)")
    ap.add_argument("--save", default=None, help="CPU: write the measurements (JSON) here, row by row")
    ap.add_argument("--load", default=None, help="CPU: reuse the measurements of a --save file (re-print with the current estimator)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.device == "cuda":
        args.batch_size, args.max_length = args.batch_size or 4, args.max_length or 512
        cuda_table(args)
    else:
        args.batch_size, args.max_length = args.batch_size or 4, args.max_length or 128
        cpu_table(args)


if __name__ == "__main__":
    main()

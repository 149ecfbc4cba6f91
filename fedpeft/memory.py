"""The memory plan: what one client (a simulation actor), a cohort and the server's evaluation copy
need, computed from the model's config on the meta device before anything loads.

Terms (bytes; ``GB`` below is 10⁹ bytes):

* **Weights** (:func:`weight_bytes`). The base's parameters counted per kind on the meta device
  (:func:`count`): the ``Linear`` weights inside the blocks, which bitsandbytes quantizes, and the
  rest (embeddings, norms, biases, the LM or classification head), which it does not. Plain bases
  hold every parameter in ``model.dtype``. A quantized base holds its quantized weights at
  bitsandbytes' storage cost per parameter: 8-bit (LLM.int8) 1 byte plus one float32 scale per
  output row; 4-bit (NF4/FP4) half a byte plus, per block of 64 weights, a float32 absmax (4/64
  byte per weight) or, with double quantization, an 8-bit absmax with one float32 constant per
  256 blocks (1/64 + 4/16384 byte per weight). Its other parameters are float32: peft's
  ``prepare_model_for_kbit_training`` casts them.
* **Adapter** (:func:`adapter_bytes`): the LoRA factors at the largest client rank,
  ``r·(in + out)`` per targeted module, plus a classification head's trained copy; float32, with
  a float32 gradient and AdamW's two float32 moments: 16 bytes per trained parameter (SGD with
  momentum 12, without 8).
* **Activations** (:func:`activation_bytes`) for ``batch_size × max_length`` tokens: what autograd
  keeps for the backward pass, per layer, for Llama-style decoders (RMSNorms that compute in
  float32, SDPA attention that keeps q, k, v, its output and a float32 log-sum-exp, SwiGLU's three
  intermediate tensors) and BERT-style encoders (LayerNorms, attention scores ``heads × T²`` when
  the attention is eager, GELU's intermediate, dropout masks); with gradient checkpointing, each
  layer's input only, plus one layer recomputed in the backward pass. A causal LM adds its logits
  over the vocabulary, often the biggest term: four ``T × vocab`` float32 tensors at the backward's
  start (the logits, the log-softmax kept for the backward pass, the gradients passing through
  them: measured on SmolLM2 at 256 tokens, where three fell 80 MB short), plus the logits in the
  base's dtype when it is not float32.
* **Runtime**: the process before any model (torch, transformers, peft, Flower, Ray, a tokenizer
  and its data): about 0.75 GB of host memory on CPU; on a GPU, the CUDA context (about 0.5 GB) that ``max_memory_allocated`` does
  not count but the GPU's memory holds.
* **Cohort** (``engine.kind=cohort``): one base, ``cohort_size`` clients' adapters and optimizer
  states, and the activations of all their batches in one pass.
* **Server**: the server's evaluation copy (weights, adapter at the largest rank, no optimizer)
  and one evaluation batch (``eval_batch_size × max_length``, no graph: one layer's tensors at a
  time, and the logits for a causal LM).

:func:`check_memory` refuses, before anything loads, a run whose actor's share cannot hold one
client (one line naming settings that fit); the server's banner prints :meth:`MemoryPlan.line`.
The estimates are measured against real peaks in ``experiments/benchmarks/llm_memory.py``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Any

from fedpeft.config import ConfigError

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# An actor's process before its model: torch, transformers, peft, Flower and Ray imported (0.6 GB
# measured), the tokenizer and its data (experiments/benchmarks/llm_memory.py: 0.75 GB in all).
RUNTIME_CPU = 0.75 * GB
CUDA_CONTEXT = 0.5 * GB


@dataclass(frozen=True)
class Counts:
    """A model's parameters and shapes, from its config on the meta device."""

    quantizable: int  # weights of the Linear layers bitsandbytes quantizes (all but the output head)
    quantizable_rows: int  # their output features (8-bit keeps one float32 scale per row)
    other: int  # every other parameter: embeddings, norms, biases, the LM / classification head
    lora: dict[str, tuple[int, int]]  # (out, in) of every module LoRA targets
    head: int  # a classification head's parameters (peft trains a copy of them)
    kind: str  # decoder | encoder
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    eager_attention: bool  # attention scores materialised (heads × T²) rather than SDPA's fused kernel
    dropout: bool  # training draws dropout masks (kept for the backward pass)

    @property
    def total(self) -> int:
        return self.quantizable + self.other


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def counts_from_model(model: Any, config: Any, targets: tuple[str, ...], classification: bool) -> Counts:
    """:class:`Counts` of a (meta-device) transformers model and its config."""
    import torch

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads_mods = {id(m) for m in (out_emb,) if m is not None}
    head_params = 0
    if classification:
        for attr in ("classifier", "score"):
            mod = getattr(model, attr, None)
            if mod is not None:
                heads_mods.add(id(mod))
                head_params += sum(p.numel() for p in mod.parameters())
                heads_mods.update(id(m) for m in mod.modules())
    quant, rows, lora = 0, 0, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if id(mod) not in heads_mods:
                quant += mod.weight.numel()
                rows += mod.out_features
            if _matches(name, targets):
                lora[name] = (mod.out_features, mod.in_features)
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    drop = any(float(getattr(config, k, 0.0) or 0.0) > 0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"))
    return Counts(
        quantizable=quant, quantizable_rows=rows, other=total - quant, lora=lora, head=head_params,
        kind="decoder" if hasattr(config, "rms_norm_eps") else "encoder",  # Llama-style RMSNorm decoders; BERT-style otherwise
        layers=int(config.num_hidden_layers), hidden=hidden, intermediate=int(getattr(config, "intermediate_size", 4 * hidden)),
        heads=heads, kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), vocab=int(config.vocab_size),
        eager_attention=impl == "eager", dropout=drop,
    )


@functools.lru_cache(maxsize=8)
def count(name: str, task: str, targets: tuple[str, ...], num_labels: int | None) -> Counts | None:
    """:class:`Counts` of model ``name`` from its config on the meta device (nothing loads); None
    when transformers cannot build it from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedpeft.models import model_path

    classification = task == "classification"
    try:
        config = AutoConfig.from_pretrained(model_path(name), **({"num_labels": num_labels} if classification and num_labels else {}))
        with torch.device("meta"):
            model = (AutoModelForSequenceClassification if classification else AutoModelForCausalLM).from_config(config)
    except Exception:
        return None
    return counts_from_model(model, model.config, targets, classification)


# ----------------------------------------------------------------------------------------- terms


def weight_bytes(c: Counts, dtype: str, quantization: str = "none", double_quant: bool = True) -> float:
    """The base's weights: see the module's docstring."""
    if quantization == "8bit":
        return c.quantizable * 1.0 + 4.0 * c.quantizable_rows + 4.0 * c.other
    if quantization == "4bit":
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
        return c.quantizable * per + 4.0 * c.other
    return float(c.total * DTYPE_BYTES[dtype])


def adapter_params(c: Counts, rank: int) -> int:
    """LoRA factors at ``rank`` over the targeted modules, plus a classification head's trained copy."""
    return sum(rank * (o + i) for o, i in c.lora.values()) + c.head


def adapter_bytes(c: Counts, rank: int, optimizer: str = "adamw", momentum: float = 0.0) -> float:
    """Float32 adapter, its gradient and the optimizer's state (AdamW: two moments)."""
    states = 2 if optimizer == "adamw" else (1 if momentum > 0 else 0)
    return adapter_params(c, rank) * 4.0 * (2 + states)


def _layer_bytes(c: Counts, tokens: int, length: int, act: int, lora_rank: int) -> float:
    """What one block keeps for the backward pass over ``tokens`` tokens (sequences of ``length``)."""
    h, inter, kv = c.hidden, c.intermediate, c.hidden * c.kv_heads // c.heads
    lora = 2 * lora_rank * act * len(c.lora) / max(c.layers, 1)  # each targeted module keeps A·x (and x: counted below)
    if c.kind == "decoder":
        # two RMSNorms that compute in float32: their float32 input and normalised output, and the
        # cast-back output that the LoRA-wrapped projections read
        norms = 2 * (4 * h + 4 * h + act * h) if act == 4 else 2 * (4 * h + 2 * act * h)
        attention = act * (2 * h + 2 * kv) + 4 * c.heads  # SDPA: q, k, v, output, log-sum-exp
        mlp = 3 * act * inter  # SwiGLU: gate (SiLU's input), SiLU's output, up
        per_token = norms + attention + mlp
    else:
        # post-LayerNorm encoder: q, k, v, context, the attention output's and the block's LayerNorm
        # inputs and outputs, GELU's input and output
        per_token = act * (4 * h + 4 * h + 2 * inter)
        if c.dropout:
            per_token += 3 * h + inter  # boolean dropout masks
    per_token += lora
    scores = act * c.heads * length * length * (3 if c.dropout else 2) * (tokens // max(length, 1)) if c.eager_attention else 0
    return per_token * tokens + scores


def activation_bytes(c: Counts, batch: int, length: int, act_dtype_bytes: int, *, checkpointing: bool, causal: bool, lora_rank: int = 8) -> float:
    """Activations of one training step over ``batch × length`` tokens (see the module's docstring)."""
    tokens = batch * length
    layer = _layer_bytes(c, tokens, length, act_dtype_bytes, lora_rank)
    if checkpointing:  # each block's input, and one block recomputed during the backward pass
        body = c.layers * act_dtype_bytes * c.hidden * tokens + layer
    else:
        body = c.layers * layer
    body += 2 * act_dtype_bytes * c.hidden * tokens  # embeddings' output, the final norm
    logits = 0.0
    if causal:
        logits = tokens * c.vocab * (16.0 + (act_dtype_bytes if act_dtype_bytes != 4 else 0))
    return body + logits


def eval_bytes(c: Counts, batch: int, length: int, act_dtype_bytes: int, causal: bool) -> float:
    """One evaluation batch without a graph: one block's tensors at a time, and the logits."""
    tokens = batch * length
    layer = act_dtype_bytes * tokens * (4 * c.hidden + 2 * c.intermediate)
    if c.eager_attention:
        layer += act_dtype_bytes * c.heads * length * length * batch
    return layer + (tokens * c.vocab * (4 + act_dtype_bytes) if causal else 0.0)


# ----------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Setting:
    """What the plan depends on (the config's keys, flattened)."""

    dtype: str = "float32"
    quantization: str = "none"
    double_quant: bool = True
    compute_dtype: str = "auto"
    rank: int = 8
    batch_size: int = 16
    max_length: int = 64
    eval_batch_size: int = 128
    checkpointing: bool = False
    optimizer: str = "adamw"
    momentum: float = 0.0
    cohort: int = 1  # clients trained together (engine.kind=cohort: engine.cohort_size)
    causal: bool = False
    cuda: bool = False

    @property
    def act_bytes(self) -> int:
        """The activations' element size: the base's dtype; a quantized base's hidden states are
        float32 (peft's k-bit preparation casts the embeddings and norms to float32)."""
        if self.quantization != "none":
            return 4
        return DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class MemoryPlan:
    setting: Setting
    weights: float
    adapter: float  # all of the cohort's clients
    activations: float  # the cohort's one pass, with the setting's checkpointing
    activations_other: float  # the same with checkpointing the other way
    runtime: float
    server: float  # the server's evaluation copy and one evaluation batch

    @property
    def per_actor(self) -> float:
        return self.runtime + self.weights + self.adapter + self.activations

    def line(self) -> str:
        s = self.setting
        base = s.quantization if s.quantization != "none" else s.dtype
        ck = "on" if s.checkpointing else "off"
        other = "off" if s.checkpointing else "on"
        who = f"a cohort of {s.cohort}" if s.cohort > 1 else "one client"
        return (f"memory plan: {self.per_actor / GB:.2f} GB per actor for {who} ({base} weights {self.weights / GB:.2f} GB, "
                f"adapter+grad+optimizer {self.adapter / GB:.3f} GB at rank {s.rank}, activations {self.activations / GB:.2f} GB for "
                f"{s.batch_size}x{s.max_length} tokens with checkpointing {ck} ({self.activations_other / GB:.2f} GB {other}), "
                f"runtime {self.runtime / GB:.1f} GB); server's evaluation copy {self.server / GB:.2f} GB")


def make_plan(c: Counts, s: Setting) -> MemoryPlan:
    """The plan of ``s`` for a model of counts ``c``."""
    weights = weight_bytes(c, s.dtype, s.quantization, s.double_quant)
    adapter = s.cohort * adapter_bytes(c, s.rank, s.optimizer, s.momentum)
    acts = {ck: activation_bytes(c, s.batch_size * s.cohort, s.max_length, s.act_bytes, checkpointing=ck, causal=s.causal, lora_rank=s.rank)
            for ck in (True, False)}
    runtime = CUDA_CONTEXT if s.cuda else RUNTIME_CPU
    server = weights + adapter_params(c, s.rank) * 4.0 + eval_bytes(c, s.eval_batch_size, s.max_length, s.act_bytes, s.causal)
    return MemoryPlan(s, weights, adapter, acts[s.checkpointing], acts[not s.checkpointing], runtime, server)


def setting_of(cfg: Any, *, cuda: bool, max_rank: int | None = None) -> Setting:
    """The :class:`Setting` of a run's config (``max_rank``: the largest client rank, default model.rank)."""
    m, t, e = cfg.model, cfg.train, cfg.engine
    dtype = m.dtype if m.dtype in DTYPE_BYTES else "float32"  # auto: as the checkpoint (fedpeft's built-ins are float32)
    return Setting(
        dtype=dtype, quantization=m.quantization, double_quant=bool(m.double_quant), compute_dtype=m.compute_dtype,
        rank=int(max_rank or m.rank), batch_size=int(t.batch_size), max_length=int(m.max_length), eval_batch_size=int(m.eval_batch_size),
        checkpointing=bool(t.gradient_checkpointing), optimizer=t.optimizer, momentum=float(t.momentum),
        cohort=int(e.cohort_size) if e.kind == "cohort" else 1, causal=m.task == "causal_lm", cuda=cuda,
    )


# ----------------------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Share:
    """An actor's share of the machine: ``bytes`` and how it was worked out (for the message)."""

    bytes: float
    how: str


def actor_share(cfg: Any, *, cuda_total: float | None, host_available: float, concurrent: int) -> Share:
    """``engine.num_gpus`` × the GPU's memory on CUDA; otherwise the host's available memory divided
    among the actors that run at once."""
    if cuda_total is not None and cfg.engine.num_gpus > 0:
        g = cfg.engine.num_gpus
        return Share(min(g, 1.0) * cuda_total, f"engine.num_gpus={g:g} of {cuda_total / GB:.0f} GB")
    return Share(host_available / max(concurrent, 1), f"{host_available / GB:.1f} GB of available RAM over {concurrent} concurrent actor(s)")


def suggestion(c: Counts, s: Setting, share: float) -> str:
    """Settings that fit ``share``, the least change first: checkpointing, a smaller batch (with
    gradient accumulation to keep the logical batch), 4-bit (with checkpointing), a smaller cohort."""
    tries: list[tuple[str, Setting]] = []
    if not s.checkpointing:
        tries.append(("train.gradient_checkpointing=true", replace(s, checkpointing=True)))
    for b in (s.batch_size // 2, s.batch_size // 4, 1):
        if 1 <= b < s.batch_size:
            acc = s.batch_size // b
            tries.append((f"train.batch_size={b} train.grad_accum_steps={acc} train.gradient_checkpointing=true", replace(s, batch_size=b, checkpointing=True)))
    if s.quantization != "4bit":
        tries.append(("model.quantization=4bit", replace(s, quantization="4bit")))
        tries.append(("model.quantization=4bit train.gradient_checkpointing=true", replace(s, quantization="4bit", checkpointing=True)))
        tries.append(("model.quantization=4bit train.batch_size=1 train.gradient_checkpointing=true",
                      replace(s, quantization="4bit", checkpointing=True, batch_size=1)))
    if s.cohort > 1:
        tries.append(("engine.cohort_size=1", replace(s, cohort=1)))
    for what, alt in tries:
        need = make_plan(c, alt).per_actor
        if need <= share:
            return f"{what} needs about {need / GB:.1f} GB"
    smallest = make_plan(c, replace(s, quantization="4bit", checkpointing=True, batch_size=1, cohort=1)).per_actor
    return f"even model.quantization=4bit with train.batch_size=1 and checkpointing needs {smallest / GB:.1f} GB: give each actor more memory"


def refusal(plan: MemoryPlan, c: Counts, share: Share) -> str | None:
    """The one-line refusal when an actor's share cannot hold the plan, else None."""
    if plan.per_actor <= share.bytes:
        return None
    return (f"needs {plan.per_actor / GB:.1f} GB per actor, has {share.bytes / GB:.1f} GB ({share.how}): "
            f"{suggestion(c, plan.setting, share.bytes)}")


def host_available() -> float:
    """The host's available memory (psutil's ``available``: Linux's ``MemAvailable``)."""
    import psutil

    return float(psutil.virtual_memory().available)


def plan_for(cfg: Any, num_labels: int | None, max_rank: int | None = None) -> tuple[MemoryPlan, Counts] | None:
    """The run's memory plan (None: the model cannot be built from its config alone)."""
    c = count(cfg.model.name, cfg.model.task, tuple(cfg.model.target_modules), num_labels)
    if c is None:
        return None
    import torch

    cuda = cfg.engine.device != "cpu" and torch.cuda.is_available()
    return make_plan(c, setting_of(cfg, cuda=cuda, max_rank=max_rank)), c


def concurrent_actors(cfg: Any) -> int:
    """How many actors a local Ray runs at once: its CPUs over ``engine.num_cpus``, at most the
    clients a round samples (each cohort message trains ``cohort_size`` of them in one actor)."""
    from fedpeft.server import sample_size

    per_round = sample_size(cfg.clients, cfg.fraction, cfg.min_clients)
    if cfg.engine.kind == "cohort":
        per_round = -(-per_round // max(cfg.engine.cohort_size, 1))
    return max(1, min(int((os.cpu_count() or 1) // max(cfg.engine.num_cpus, 1e-9)), per_round))


def check_memory(cfg: Any, num_labels: int | None, max_rank: int | None = None) -> MemoryPlan | None:
    """Refuse (:class:`ConfigError`, one line) a run whose actor's share cannot hold one client's
    (or one cohort's) plan; returns the plan. On CPU the host's available memory is shared by the
    concurrent actors (after the server's evaluation copy, which runs in this process)."""
    got = plan_for(cfg, num_labels, max_rank)
    if got is None:
        return None
    plan, c = got
    if cfg.engine.ray_address:  # an existing cluster: its machines are not known here
        return plan
    import torch

    cuda_total = None
    if plan.setting.cuda and cfg.engine.num_gpus > 0:
        cuda_total = float(torch.cuda.get_device_properties(0).total_memory)
    host = host_available() - (0 if plan.setting.cuda else plan.server)
    share = actor_share(cfg, cuda_total=cuda_total, host_available=host, concurrent=concurrent_actors(cfg))
    line = refusal(plan, c, share)
    if line:
        raise ConfigError(line)
    return plan

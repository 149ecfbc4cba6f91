"""PEFT methods: one small module per family declares, for each method, the peft config it builds,
which tensors of peft's state dict a client trains and sends, and how they group.

Every tensor travels under its state-dict name, as ``get_peft_model_state_dict`` returns it (the
``base_model.model.`` prefix dropped). The groups:

* ``lora_A`` / ``lora_B`` — LoRA factors per module (``ΔW = s·B·A``): the LoRA-structured
  strategies (FFA-LoRA, HetLoRA, FLoRA, FlexLoRA, …) work on these;
* ``vector`` — one vector per module (DoRA's magnitude, IA3's scalings, VeRA's λ's);
* ``factors`` — other per-module factors (LoHa's Hadamard factors, LoKr's Kronecker factors);
* ``core`` — LoRA-XS's ``r × r`` core between frozen factors (Fed-SB), in its peft coordinates;
* ``embeddings`` — virtual-token embeddings (prompt and prefix tuning);
* ``bias`` — bias terms (BitFit);
* ``head`` — the task head, found through peft's own ``modules_to_save``;
* ``frozen`` — in the state dict but never trained or sent (LoRA-XS's frozen factors, BitFit's placeholder).

Everything but the LoRA factors is averaged elementwise by every strategy (FedAvg's rule); a
trainable tensor that matches no group is an error naming it, never silently "head".
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any

from fedpeft.methods.base import GROUPS, PeftMethod

__all__ = ["GROUPS", "METHODS", "PeftMethod", "get", "lora_update_methods", "peft_config"]


def _registry() -> dict[str, PeftMethod]:
    """Every method of every module of this package, by name: a module registers its methods by
    ending with ``METHODS = [PeftMethod(...), ...]`` (``base`` and modules whose name starts with
    ``_`` are helpers). A new PEFT method is one file here."""
    out: dict[str, PeftMethod] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if not isinstance(getattr(mod, "METHODS", None), (list, tuple)):
            raise TypeError(f"{mod.__name__}: a PEFT method module ends with METHODS = [PeftMethod(...), ...]")
        for m in mod.METHODS:
            if m.name in out:
                raise TypeError(f"PEFT method {m.name!r} is declared twice ({mod.__name__} and another module of fedpeft.methods)")
            out[m.name] = m
    return out


METHODS: dict[str, PeftMethod] = _registry()


def get(name: str) -> PeftMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"peft.name: unknown PEFT method {name!r}; expected one of {', '.join(METHODS)}") from None


def lora_update_methods() -> list[str]:
    return [n for n, m in METHODS.items() if m.lora_update]


# peft's names for what fedpeft sets from its own keys (peft.kwargs refuses them, naming ours)
OWNED = {
    "task_type": "model.task", "r": "model.rank", "lora_alpha": "model.alpha", "alpha": "model.alpha",
    "lora_dropout": "model.dropout", "vera_dropout": "model.dropout", "tinylora_dropout": "model.dropout",
    "target_modules": "model.target_modules", "use_rslora": "peft=rslora", "use_dora": "peft=dora",
    "num_virtual_tokens": "peft.num_virtual_tokens", "feedforward_modules": "peft.feedforward_modules",
}
OWNED_BY = {"vera": {"r": "peft.vera_rank"}, "lora_xs": {"u": "peft.u"}}
# peft settings that would break what the strategies rely on, and why
REFUSED = {
    "init_lora_weights": "fedpeft draws a fresh adapter's A from the seed (peft's default init) so that the server and every "
                         "client agree on it (FLoRA, FlexLoRA and compression need that start); other inits (gaussian, pissa, "
                         "olora, loftq, ...) are not supported",
    "bias": "a LoRA method trains only its factors here; to train bias terms use peft=bitfit",
    "lora_bias": "a LoRA method trains only its factors here; to train bias terms use peft=bitfit",
    "rank_pattern": "one rank per module is not supported: a client's rank applies to every targeted module (set ranks=... for ranks per client)",
    "alpha_pattern": "one alpha per module is not supported: model.alpha (and ranks.alpha) apply to every targeted module",
}


def peft_config(method: PeftMethod, model_cfg: Any, peft_cfg: Any, task_type: Any = None) -> Any:
    """Method ``method``'s peft config for ``model_cfg`` and ``peft_cfg``, with ``peft.kwargs``
    (peft's own settings: ``init_lora_weights``, ``layers_to_transform``, ``bias`` …) applied on
    top through ``dataclasses.replace``, so the config class's own checks run. Raises ValueError in
    one line naming ``peft.kwargs.<key>``: a key the class lacks (with the closest names), one that
    fedpeft sets itself (with the fedpeft key to set instead), or a value peft refuses."""
    from peft import TaskType

    if task_type is None:
        task_type = TaskType.CAUSAL_LM if model_cfg.task == "causal_lm" else TaskType.SEQ_CLS
    config = method.config(model_cfg, peft_cfg, task_type)
    kwargs = getattr(peft_cfg, "kwargs", None) or {}
    if not kwargs:
        return config
    try:
        from omegaconf import OmegaConf

        kwargs = OmegaConf.to_container(kwargs) if OmegaConf.is_config(kwargs) else dict(kwargs)
    except ImportError:
        kwargs = dict(kwargs)
    cls = type(config)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    owned = {**OWNED, **OWNED_BY.get(method.name, {})}
    for key in kwargs:
        where = f"peft.kwargs.{key}"
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            raise ValueError(f"{where}: {cls.__name__} (peft={method.name}) has no setting {key!r}{hint}")
        if key in REFUSED:
            raise ValueError(f"{where}: {REFUSED[key]}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if key in owned or getattr(config, key) != default:
            instead = owned.get(key)
            raise ValueError(f"{where}: fedpeft sets {key} for peft={method.name} itself"
                             + (f"; set {instead} instead" if instead else " (the method needs its value)"))
    try:
        return dataclasses.replace(config, **kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"peft.kwargs: peft refuses {kwargs} for peft={method.name}: {msg}") from None

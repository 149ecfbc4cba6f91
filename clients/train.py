"""A client's local training: one function, payload + partition → update + metrics.

The Flower ClientApp (``clients.app``) calls it; the cohort engine (``clients.cohort``), which
trains many clients' adapters at once, reproduces its semantics: start from the payload, a fresh
optimizer (AdamW, or SGD) at the round's learning rate over the adapter's trainable tensors,
``local_steps`` optimizer steps, each accumulating ``grad_accum_steps`` batches of ``batch_size``
examples (each batch's loss divided by ``grad_accum_steps``) drawn without replacement (reshuffled
every pass) from a generator seeded by ``(seed, round, client)``, the global gradient norm clipped
to ``max_grad_norm`` before each step when set.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from fedpeft.lora import LoraFactors, truncate
from fedpeft.models import LoadedModel, SparseDelta, active, fresh_init, full_name, layer, read_adapter, write_adapter
from fedpeft.plan import SPARSE, ClientUpdate, Finaliser, LossTerm, Payload, Proximal


@dataclass(frozen=True)
class TrainSettings:
    """One client's local training in one round (``train.*``; ``lr`` is the round's learning rate,
    :func:`fedpeft.schedule.lr_at`)."""

    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.0  # sgd only
    gradient_checkpointing: bool = False  # recompute activations in the backward pass
    grad_accum_steps: int = 1  # batches accumulated per optimizer step
    max_grad_norm: float | None = None  # clip each step's global gradient norm (not DP)

    @classmethod
    def of(cls, train: Any, lr: float | None = None) -> "TrainSettings":
        """The settings of a ``train`` config section (:class:`fedpeft.config.TrainConfig`), at
        ``lr`` (the round's scheduled learning rate) when given, else ``train.lr``."""
        return cls(
            local_steps=train.local_steps, batch_size=train.batch_size, lr=train.lr if lr is None else float(lr),
            weight_decay=train.weight_decay, optimizer=train.optimizer, momentum=train.momentum,
            gradient_checkpointing=bool(train.gradient_checkpointing), grad_accum_steps=int(train.grad_accum_steps),
            max_grad_norm=None if train.max_grad_norm is None else float(train.max_grad_norm),
        )

    @property
    def logical_batch(self) -> int:
        """The examples behind one optimizer step: ``batch_size × grad_accum_steps``."""
        return self.batch_size * self.grad_accum_steps


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """A fresh optimizer per client and round: AdamW (the default), or SGD with ``momentum`` —
    DP-SGD's own update, under which a coordinate whose gradient is mostly noise moves by the noise
    times the learning rate, where Adam's normalisation moves every coordinate by about ``lr``."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    raise ValueError(f"train.optimizer: unknown value {settings.optimizer!r}; expected adamw or sgd")


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP-SGD (Abadi et al., CCS 2016) through Opacus: every example's gradient of
    the trainable adapter tensors is clipped to ``max_grad_norm`` and Gaussian noise of std
    ``noise_multiplier · max_grad_norm`` is added to their sum; batches are Poisson-sampled at rate
    ``1 / ceil(n / logical_batch)`` (what the accountant assumes).

    With ``grad_accum_steps = G`` a step's batch is the logical one: a Poisson sample at the rate
    of ``batch_size × G`` examples, run in physical chunks of at most ``batch_size`` rows (Opacus's
    virtual steps: each chunk's per-example gradients are clipped and summed, ``signal_skip_step``),
    noised once and divided by the logical expected batch size. So DP-SGD still clips per example
    over the logical batch, and the accountant's sample rate is the logical one."""

    noise_multiplier: float
    max_grad_norm: float


def sample_rate(n: int, batch_size: int) -> float:
    """The Poisson sampling rate of Opacus's ``DPDataLoader`` for ``n`` examples in batches of
    ``batch_size``: one over the number of batches of the plain loader."""
    return 1.0 / math.ceil(n / batch_size)


class ClientOutOfMemory(MemoryError):
    """A client's training ran out of memory; the message names its plan and what to change."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA), or the CPU allocator's failure (a RuntimeError)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "not enough memory" in str(e))


def base_kind(lm: LoadedModel) -> str:
    """The frozen base's storage: 4bit | 8bit (bitsandbytes), or its dtype."""
    w = layer(lm, lm.modules[0]).base_layer.weight if lm.modules else next(lm.model.parameters())
    kind = type(w).__name__
    return "4bit" if kind == "Params4bit" else "8bit" if kind == "Int8Params" else str(w.dtype).removeprefix("torch.")


def out_of_memory_line(lm: LoadedModel, settings: TrainSettings, client_id: int, cohort: int = 1) -> str:
    """One line: the client's plan (rank, batch, length, base, checkpointing, cohort) and what to change."""
    rank = layer(lm, lm.modules[0]).lora_A[active(lm)].weight.shape[0] if lm.modules else None
    base = base_kind(lm)
    plan = (f"rank {rank}, " if rank else "") + f"train.batch_size={settings.batch_size} x model.max_length={lm.max_length} tokens"
    plan += f" (x{settings.grad_accum_steps} accumulated)" if settings.grad_accum_steps > 1 else ""
    plan += f", {base} base, gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}"
    plan += f", a cohort of {cohort} on {lm.device.type}" if cohort > 1 else f" on {lm.device.type}"
    fixes = []
    if settings.batch_size > 1:
        fixes.append(f"train.batch_size={max(1, settings.batch_size // 2)} with train.grad_accum_steps={2 * settings.grad_accum_steps}")
    if not settings.gradient_checkpointing:
        fixes.append("train.gradient_checkpointing=true")
    if base != "4bit":
        fixes.append("model.quantization=4bit")
    if cohort > 1:
        fixes.append("a smaller engine.cohort_size")
    fixes.append("fewer actors per GPU (a larger engine.num_gpus)" if lm.device.type == "cuda" else "fewer concurrent actors (a larger engine.num_cpus)")
    return f"client {client_id}: out of memory training {plan}; try {', or '.join(fixes)}"


def release(lm: LoadedModel) -> None:
    """After an out-of-memory failure: drop the model's gradients and the allocator's cache, so that
    the worker's next client starts clean."""
    for p in lm.model.parameters():
        p.grad = None
    if lm.device.type == "cuda":
        torch.cuda.empty_cache()


def check_settings(settings: TrainSettings, dp: bool) -> None:
    """Combinations no engine trains: DP-SGD clips per example (``privacy.clip``), so a second,
    global clip is refused; Opacus's per-example hooks see a recomputed forward twice, so gradient
    checkpointing is refused with DP-SGD."""
    if dp and settings.max_grad_norm is not None:
        raise ValueError("train.max_grad_norm: privacy.mode=sample clips every example's gradient (privacy.clip); drop train.max_grad_norm")
    if dp and settings.gradient_checkpointing:
        raise ValueError("train.gradient_checkpointing: Opacus's per-example gradients (privacy.mode=sample) "
                         "do not work with recomputed activations; set train.gradient_checkpointing=false")


def checkpointing(lm: LoadedModel, on: bool) -> None:
    """Turn transformers' gradient checkpointing on or off on the cached model (non-reentrant, so
    that gradients reach the adapters though the frozen inputs need none; with it on, the input
    embeddings' output requires grad, as peft's k-bit preparation does)."""
    base = lm.model.get_base_model()
    if not getattr(base, "supports_gradient_checkpointing", False):
        if on:
            raise ValueError(f"train.gradient_checkpointing: model {type(base).__name__} does not support gradient checkpointing")
        return
    if on and not base.is_activation_checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
        if not getattr(base, "_require_grads_hooks", None):  # transformers adds the hook itself for input_ids models
            base.enable_input_require_grads()
    elif not on and base.is_activation_checkpointing:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of indices into ``range(n)``: seeded permutations, concatenated."""
    g = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    for _ in range(steps):
        if len(perm) < min(batch_size, n):
            perm = perm + torch.randperm(n, generator=g).tolist()
        take, perm = perm[: min(batch_size, n)], perm[min(batch_size, n) :]
        yield take


def encode(lm: LoadedModel, rows: dict[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Tokenize a batch of rows onto the device: ``text`` and, for classification, ``label``; or
    instruction rows (``prompt`` and ``response``, :mod:`fedpeft.instruct`): :func:`encode_instruction`."""
    if "prompt" in rows and "response" in rows:
        return encode_instruction(lm, rows)[0]
    enc = lm.tokenizer(
        list(rows["text"]), truncation=True, max_length=lm.max_length, padding=True, return_tensors="pt"
    )
    if lm.task == "classification":
        enc["labels"] = torch.as_tensor(list(rows["label"]), dtype=torch.long)
    else:
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
    return {k: v.to(lm.device) for k, v in enc.items()}


def fit(prompt: Sequence[int], response: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and its response cut to ``max_length`` together: unchanged when they
    fit; else the prompt loses its start, down to ``max(max_length - len(response), max_length // 2)``
    tokens (at least half the window stays the prompt's, or all of it when it is shorter), then the
    response loses its tail: a response keeps at least ``max_length - max_length // 2`` tokens (or all of itself)."""
    p, r = list(prompt), list(response)
    if len(p) + len(r) <= max_length:
        return p, r
    keep_p = min(len(p), max(max_length - len(r), max_length // 2))
    p = p[len(p) - keep_p:] if keep_p else []
    return p, r[: max_length - len(p)]


def instruction_ids(lm: LoadedModel, rows: dict[str, Sequence[Any]]) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """Each row's prompt and response token ids (tokenized apart, ``add_special_tokens=False``),
    cut to ``lm.max_length`` together by :func:`fit`; and how many rows were cut
    (truncated) and how many kept no response token (dropped: they train nothing)."""
    prompts = lm.tokenizer(list(rows["prompt"]), add_special_tokens=False)["input_ids"]
    responses = lm.tokenizer(list(rows["response"]), add_special_tokens=False)["input_ids"]
    out, truncated, dropped = [], 0, 0
    for p, r in zip(prompts, responses):
        fp, fr = fit(p, r, lm.max_length)
        truncated += len(fp) + len(fr) < len(p) + len(r)
        dropped += not fr
        out.append((fp, fr))
    return out, truncated, dropped


def encode_instruction(lm: LoadedModel, rows: dict[str, Sequence[Any]]) -> tuple[dict[str, torch.Tensor], int, int]:
    """Instruction rows as a right-padded batch: ``input_ids`` = prompt + response, ``labels`` =
    -100 on the prompt and the padding and the response's ids elsewhere, so the model's causal-LM
    loss is the mean cross-entropy over the response tokens only; with the counts of
    :func:`instruction_ids`."""
    pairs, truncated, dropped = instruction_ids(lm, rows)
    width = max(len(p) + len(r) for p, r in pairs)
    pad = lm.tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.as_tensor(p + r, dtype=torch.long)
        labels[i, len(p):n] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(lm.device) for k, v in batch.items()}, truncated, dropped


def truncation_metrics(lm: LoadedModel, data: Any) -> dict[str, float]:
    """For instruction data: the shares of the client's examples that ``model.max_length`` cuts
    (``truncated_fraction``) and that keep no response token (``dropped_fraction``); the server's
    example-weighted mean of them is the share over all the round's training examples. Empty for
    other data (their metrics are unchanged)."""
    if len(data) == 0 or "prompt" not in data.column_names or "response" not in data.column_names:
        return {}
    _, truncated, dropped = instruction_ids(lm, data[:])
    return {"truncated_fraction": truncated / len(data), "dropped_fraction": dropped / len(data)}


def train(
    lm: LoadedModel,
    payload: Payload,
    data: Any,
    settings: TrainSettings,
    seed: int,
    client_id: int,
    dp: DPSettings | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
) -> tuple[ClientUpdate, dict[str, float]]:
    """Train the active adapter from ``payload`` on ``data`` (a ``datasets.Dataset``).

    The plan (``payload.plan``, :class:`fedpeft.plan.ClientPlan`) honoured: an empty
    ``payload.adapter`` starts a fresh LoRA seeded by ``init_seed`` (FLoRA, FlexLoRA's first round);
    ``train_A=False`` trains B only (FFA-LoRA, RoLoRA's B rounds), ``train_B=False`` A only (RoLoRA's
    A rounds); ``loss_term`` is added to every step's loss (HetLoRA's rank self-pruning term
    ``λ Σ_modules ‖B[:, ⌊γr⌋:]‖_F ‖A[⌊γr⌋:, :]‖_F``) and ``finalise`` picks the rank the update keeps
    (HetLoRA's ``max(⌊γr⌋, r_min)`` when that term decreased); ``proximal`` (FedProx) adds
    ``μ/2 Σ ‖θ − θ_g‖²`` over the tensors it trains and sends back, θ_g those tensors as written from
    the payload before the first step (:class:`fedpeft.plan.Proximal`); ``sparse`` (SLoRA's stage 1,
    :class:`fedpeft.plan.SparseBase`, with ``train_A`` and ``train_B`` false) trains the values of the
    LoRA modules' masked base entries, which arrive and go back as the head's ``sparse_base/<module>``
    tensors (:class:`fedpeft.models.SparseDelta`; the base weights themselves are never written).

    ``correction`` (SCAFFOLD, :mod:`fedpeft.scaffold`): ``c − c_i`` per trained tensor, keyed as on the
    wire (``A/<module>``, ``B/<module>``, ``head/<name>``); it is added to that tensor's gradient before
    every optimizer step (after ``max_grad_norm`` clips the data gradient; under DP-SGD after Opacus's
    clipping and noise), so the step follows ``g − c_i + c``.

    ``dp``: train with DP-SGD through Opacus on exactly the trainable tensors (with ``train_A=False``,
    B and the head; with ``train_B=False``, A and the head); the cached model is wrapped for this call
    only and unwrapped afterwards.

    Out of memory (``torch.OutOfMemoryError``, or the CPU allocator's failure): the gradients and
    the allocator's cache are released and :class:`ClientOutOfMemory` raised, one line naming the
    client's plan and what to change; the worker stays usable for its next client.

    ``settings``: ``lr`` is the round's; ``grad_accum_steps`` batches per optimizer step;
    ``max_grad_norm`` clips each step's global gradient norm over the trainable tensors (after the
    plan's loss term is added); ``gradient_checkpointing`` recomputes activations in the backward
    pass (the cached model keeps the setting until a call asks otherwise).
    """
    if len(data) == 0:
        raise ValueError(f"client {client_id}: its partition is empty")
    check_settings(settings, dp is not None)
    checkpointing(lm, settings.gradient_checkpointing)
    t0 = time.perf_counter()
    plan = payload.plan
    head = {h: t for h, t in payload.head.items() if not h.startswith(SPARSE)}  # SLoRA's stage-1 values are not the model's
    sparse_values = {h[len(SPARSE):]: t for h, t in payload.head.items() if h.startswith(SPARSE)}
    if bool(sparse_values) != (plan.sparse is not None):
        raise ValueError(f"client {client_id}: the plan's sparse_density and the payload's {SPARSE}<module> values come together")
    if plan.sparse is not None and dp is not None:
        raise ValueError(f"client {client_id}: SLoRA's stage 1 (sparse_density) does not train under DP-SGD")
    if payload.adapter or not lm.modules:  # a method without LoRA factors has only "head" tensors
        write_adapter(lm, payload.adapter, head)
    else:
        if plan.init_seed is None:
            raise ValueError(f"client {client_id}: an empty payload adapter needs the plan's init_seed (a fresh LoRA)")
        fresh_init(lm, plan.init_seed)
        write_adapter(lm, read_adapter(lm).adapter, head)
    model = lm.model
    name = active(lm)
    frozen = [layer(lm, m).lora_A[name].weight for m in lm.modules] if not plan.train_A else []
    frozen += [layer(lm, m).lora_B[name].weight for m in lm.modules] if not plan.train_B else []
    for p in frozen:
        p.requires_grad_(False)
    # SLoRA's stage 1: the masked base entries train beside the frozen base (fedpeft.models.SparseDelta)
    deltas = SparseDelta.attach(lm, sparse_values, plan.sparse.density, plan.sparse.seed) if plan.sparse is not None else {}
    params = [p for p in model.parameters() if p.requires_grad] + [d.values for d in deltas.values()]
    opt = make_optimizer(params, settings)
    personal = {id(layer(lm, m).lora_B[name].weight) for m in lm.modules} if plan.personal_B else set()
    anchored = [p for p in params if id(p) not in personal]  # FedProx's θ: what the client trains and sends back
    extra = _Extra(lm, plan.loss_term, plan.finalise, plan.proximal, anchored, corrected(lm, params, correction))
    model.train()
    devices = [lm.device] if lm.device.type == "cuda" else []
    # Dropout draws from torch's RNG: fork it and seed it per (seed, round, client).
    oom = None
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if dp is None:
                losses = _steps(lm, opt, data, settings, seed, client_id, extra)
            else:
                losses = _dp_steps(lm, opt, data, settings, dp, client_id, extra)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        oom = out_of_memory_line(lm, settings, client_id)  # raised below, once this frame's tensors are freed
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for d in deltas.values():
            d.remove()
    if oom is not None:
        del opt, extra
        release(lm)
        raise ClientOutOfMemory(oom)
    trained = read_adapter(lm)
    adapter = trained.adapter
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        **truncation_metrics(lm, data),
    }
    new_rank = extra.rank_after()
    if new_rank is not None:
        metrics["rank_after_pruning"] = new_rank
        if new_rank < extra.rank:
            adapter = {m: truncate(f, new_rank) for m, f in adapter.items()}
    metrics["train_seconds"] = time.perf_counter() - t0
    trained_head = {**trained.head, **{SPARSE + m: d.values.detach().cpu().clone() for m, d in deltas.items()}}
    update = ClientUpdate(client_id=client_id, adapter=adapter, head=trained_head, num_examples=len(data))
    return update, metrics


class _Extra:
    """The plan's loss terms and finalisation (:class:`fedpeft.plan.LossTerm`,
    :class:`fedpeft.plan.Finaliser`, :class:`fedpeft.plan.Proximal`) on the live adapter tensors;
    any may be absent. ``anchored``: the tensors the proximal term reads, whose values now (as
    received) are its anchors θ_g."""

    def __init__(self, lm: LoadedModel, term: LossTerm | None, finaliser: Finaliser | None,
                 proximal: Proximal | None = None, anchored: Sequence[torch.Tensor] = (),
                 corrections: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()):
        self.lm, self.name, self.term, self.finaliser = lm, active(lm), term, finaliser
        self.corrections = list(corrections)
        self.proximal, self.anchored = proximal, list(anchored) if proximal is not None else []
        self.anchors = [p.detach().clone() for p in self.anchored]
        if finaliser is not None:
            self.rank = layer(lm, lm.modules[0]).lora_A[self.name].weight.shape[0]
            self.before = finaliser.measure(self.factors())

    def factors(self) -> list[LoraFactors]:
        """The live LoRA factors, one per module (gradients flow through them)."""
        out = []
        for m in self.lm.modules:
            lay = layer(self.lm, m)
            out.append(LoraFactors(lay.lora_A[self.name].weight, lay.lora_B[self.name].weight, float(lay.scaling[self.name])))
        return out

    def penalty(self) -> torch.Tensor | None:
        """The loss terms' value now (the plan's term plus the proximal term), or None: nothing to add."""
        terms = [self.term.penalty(self.factors()) if self.term is not None else None,
                 self.proximal.penalty(self.anchored, self.anchors) if self.proximal is not None else None]
        terms = [t for t in terms if t is not None]
        return None if not terms else terms[0] if len(terms) == 1 else terms[0] + terms[1]

    @torch.no_grad()
    def correct(self) -> None:
        """SCAFFOLD: add ``c − c_i`` to each trained tensor's gradient (:func:`corrected`)."""
        for p, t in self.corrections:
            if p.grad is None:
                p.grad = t.clone()
            else:
                p.grad.add_(t)

    def rank_after(self) -> int | None:
        """The rank the trained update keeps, or None: not finalised."""
        if self.finaliser is None:
            return None
        return self.finaliser.rank_after(self.rank, self.before, self.finaliser.measure(self.factors()))


def corrected(lm: LoadedModel, params: Sequence[torch.Tensor], correction: Mapping[str, torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SCAFFOLD's ``c − c_i`` (keyed as on the wire) as ``(parameter, tensor)`` pairs over the live
    trainable tensors, on each one's device and dtype; a key that names no trainable tensor, or a
    shape that differs, is a ``ValueError`` naming it."""
    if not correction:
        return []
    from peft import get_peft_model_state_dict

    name = active(lm)
    held = get_peft_model_state_dict(lm.model, adapter_name=name)
    trainable = {p.data_ptr(): p for p in params}
    out = []
    for key, t in correction.items():
        kind, _, rest = key.partition("/")
        if kind in ("A", "B") and rest in lm.modules:
            lay = layer(lm, rest)
            p = (lay.lora_A if kind == "A" else lay.lora_B)[name].weight
        elif kind == "head" and full_name(rest) in held:
            p = trainable.get(held[full_name(rest)].data_ptr())
        else:
            p = None
        if p is None or p.data_ptr() not in trainable:
            raise ValueError(f"scaffold: the control variate {key!r} names no tensor this client trains")
        if tuple(p.shape) != tuple(t.shape):
            raise ValueError(f"scaffold: the control variate {key!r} is {tuple(t.shape)}, the tensor {tuple(p.shape)}")
        out.append((p, t.to(device=p.device, dtype=p.dtype)))
    return out


def clip_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> None:
    """``train.max_grad_norm``: scale the gradients so that their global L2 norm is at most ``max_norm``."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)


def _steps(lm: LoadedModel, opt: torch.optim.Optimizer, data: Any, settings: TrainSettings, seed: int, client_id: int, extra: _Extra) -> list[float]:
    """``local_steps`` optimizer steps of ``grad_accum_steps`` batches each (the batches are the
    first ``local_steps × grad_accum_steps`` of :func:`batch_order`); a step's loss is the mean of
    its batches' losses, the plan's loss term is added once per step."""
    model = lm.model
    params = [p for g in opt.param_groups for p in g["params"]]
    accum = settings.grad_accum_steps
    losses: list[float] = []
    try:
        order = batch_order(len(data), settings.local_steps * accum, settings.batch_size, seed)
        for _ in range(settings.local_steps):
            step_losses = []
            for i in range(accum):
                batch = encode(lm, data[next(order)])
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"client {client_id}: training loss became {loss.item()}")
                total = loss / accum if accum > 1 else loss
                if i == accum - 1:
                    penalty = extra.penalty()
                    total = total + penalty if penalty is not None else total
                total.backward()
                step_losses.append(loss.item())
            clip_norm(params, settings.max_grad_norm)
            extra.correct()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_losses[0] if accum == 1 else sum(step_losses) / accum)
    finally:
        model.eval()
    return losses


def _dp_steps(lm: LoadedModel, opt: torch.optim.Optimizer, data: Any, settings: TrainSettings, dp: DPSettings, client_id: int, extra: _Extra) -> list[float]:
    """``local_steps`` DP-SGD steps via Opacus's ``PrivacyEngine`` (hooks grad-sample mode,
    Poisson-sampled batches). The wrapper is closed afterwards, so the worker's cached model can be
    wrapped again for the next client. The plan's loss terms (HetLoRA's pruning term, FedProx's
    ``μ/2 ‖θ − θ_g‖²``) depend on no example: their gradient (FedProx's: ``μ(θ − θ_g)``) is added
    after Opacus has clipped each example's data gradient, noised their sum and divided it by the
    expected batch size — never clipped, and not scaled by the batch size. This is post-processing of
    the noised gradient and of θ (itself a function of earlier noised steps): the ε is the one of the
    data gradients alone, the same with or without the term.

    ``grad_accum_steps > 1``: the loader samples logical batches (rate ``1 / ceil(n /
    logical_batch)``), each run in chunks of at most ``batch_size`` rows; every chunk's
    per-example gradients are clipped and summed (``signal_skip_step``, Opacus's virtual steps), the
    last chunk's ``pre_step`` adds the noise once and divides by the logical expected batch size. A
    step's loss is the chunks' mean weighted by their rows."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    rows = TensorDataset(torch.arange(len(data)))
    collate = lambda items: torch.stack([i for (i,) in items])  # noqa: E731  (the sampled row indices)
    loader = DataLoader(rows, batch_size=min(settings.logical_batch, len(data)), collate_fn=collate)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # runs are seeded on purpose
        model, dp_opt, dp_loader = PrivacyEngine().make_private(
            module=lm.model, optimizer=opt, data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
        )
    losses: list[float] = []
    try:
        model.train()
        batches = iter(dp_loader)
        while len(losses) < settings.local_steps:
            try:
                batch = next(batches)
            except StopIteration:  # a new pass over the data (Poisson-sampled again)
                batches = iter(dp_loader)
                continue
            if len(batch) == 0:  # an empty Poisson sample (probability ~e^-batch_size)
                continue
            idx = batch.tolist()
            size = settings.batch_size if settings.grad_accum_steps > 1 else len(idx)  # G = 1: the Poisson batch in one pass
            chunks = [idx[i : i + size] for i in range(0, len(idx), size)]
            step_losses = []
            for c, chunk in enumerate(chunks):
                loss = model(**encode(lm, data[chunk])).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"client {client_id}: training loss became {loss.item()}")
                with warnings.catch_warnings():  # Opacus's hooks on a frozen-input layer: expected
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                step_losses.append(loss.item())
                if c < len(chunks) - 1:  # a virtual step: clip and sum this chunk's per-example gradients
                    dp_opt.signal_skip_step(do_skip=True)
                    dp_opt.pre_step()
                    dp_opt.zero_grad(set_to_none=True)
            loss_value = step_losses[0] if len(chunks) == 1 else sum(v * len(ch) for v, ch in zip(step_losses, chunks)) / len(idx)
            if dp_opt.pre_step():  # clip per example, add noise, average
                penalty = extra.penalty()
                if penalty is not None:
                    params = [p for g in dp_opt.param_groups for p in g["params"]]
                    grads = torch.autograd.grad(penalty, params, allow_unused=True)
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.grad.add_(g)
                extra.correct()
                dp_opt.original_optimizer.step()
            dp_opt.zero_grad(set_to_none=True)
            losses.append(loss_value)
    finally:
        model._close()  # remove Opacus's hooks and per-sample gradients from the cached model
        lm.model.eval()
    return losses


@torch.no_grad()
def evaluate(lm: LoadedModel, data: Any, batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy (classification), or token-level loss and perplexity."""
    model = lm.model
    model.eval()
    n, correct, loss_sum, tokens = 0, 0, 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = encode(lm, data[start : start + batch_size])
        out = model(**batch)
        if lm.task == "classification":
            k = batch["labels"].shape[0]
            loss_sum += out.loss.item() * k
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            n += k
        else:
            # HF shifts labels inside; count the predicted tokens the same way.
            k = int((batch["labels"][:, 1:] != -100).sum().item())
            loss_sum += out.loss.item() * k
            tokens += k
    if lm.task == "classification":
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}
    mean = loss_sum / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}

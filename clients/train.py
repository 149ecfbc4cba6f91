"""A client's local training: one function, payload + partition → update + metrics.

The Flower ClientApp (``clients.app``) calls it; a future cohort executor that trains many
clients' adapters at once must reproduce its semantics: start from the payload, a fresh optimizer (AdamW, or SGD)
over the adapter's trainable tensors, ``local_steps`` steps of ``batch_size`` examples drawn
without replacement (reshuffled every pass) from a generator seeded by ``(seed, round, client)``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from fedpeft.lora import LoraFactors, truncate
from fedpeft.models import LoadedModel, active, fresh_init, layer, read_adapter, write_adapter
from strategies.base import ClientUpdate, Payload


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.0  # sgd only


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
    ``1 / ceil(n / batch_size)`` (what the accountant assumes)."""

    noise_multiplier: float
    max_grad_norm: float


def sample_rate(n: int, batch_size: int) -> float:
    """The Poisson sampling rate of Opacus's ``DPDataLoader`` for ``n`` examples in batches of
    ``batch_size``: one over the number of batches of the plain loader."""
    return 1.0 / math.ceil(n / batch_size)


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
    """Tokenize a batch of rows (``text`` and, for classification, ``label``) onto the device."""
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


def train(
    lm: LoadedModel,
    payload: Payload,
    data: Any,
    settings: TrainSettings,
    seed: int,
    client_id: int,
    dp: DPSettings | None = None,
) -> tuple[ClientUpdate, dict[str, float]]:
    """Train the active adapter from ``payload`` on ``data`` (a ``datasets.Dataset``).

    Instructions honoured: an empty ``payload.adapter`` starts a fresh LoRA seeded by
    ``init_seed`` (FLoRA, FlexLoRA's first round); ``freeze_A`` trains B only (FFA-LoRA, RoLoRA's B
    rounds); ``freeze_B`` trains A only (RoLoRA's A rounds);
    ``prune`` adds HetLoRA's rank self-pruning term ``λ Σ_modules ‖B[:, ⌊γr⌋:]‖_F ‖A[⌊γr⌋:, :]‖_F``
    to the loss and shrinks the rank to ``max(⌊γr⌋, r_min)`` when that term decreased.

    ``dp``: train with DP-SGD through Opacus on exactly the trainable tensors (with ``freeze_A``,
    B and the head; with ``freeze_B``, A and the head); the cached model is wrapped for this call only
    and unwrapped afterwards.
    """
    if len(data) == 0:
        raise ValueError(f"client {client_id}: its partition is empty")
    t0 = time.perf_counter()
    ins = payload.instructions
    if payload.adapter or not lm.modules:  # a method without LoRA factors has only "head" tensors
        write_adapter(lm, payload.adapter, payload.head)
    else:
        fresh_init(lm, int(ins["init_seed"]))
        write_adapter(lm, read_adapter(lm).adapter, payload.head)
    model = lm.model
    name = active(lm)
    if ins.get("freeze_A") and ins.get("freeze_B"):
        raise ValueError(f"client {client_id}: freeze_A and freeze_B together leave no LoRA factor to train")
    frozen = [layer(lm, m).lora_A[name].weight for m in lm.modules] if ins.get("freeze_A") else []
    frozen += [layer(lm, m).lora_B[name].weight for m in lm.modules] if ins.get("freeze_B") else []
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    prune = _Pruning(lm, ins) if ins.get("prune") else None
    model.train()
    devices = [lm.device] if lm.device.type == "cuda" else []
    # Dropout draws from torch's RNG: fork it and seed it per (seed, round, client).
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if dp is None:
                losses = _steps(lm, opt, data, settings, seed, client_id, prune)
            else:
                losses = _dp_steps(lm, opt, data, settings, dp, client_id, prune)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    trained = read_adapter(lm)
    adapter = trained.adapter
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
    }
    if prune is not None:
        new_rank = prune.new_rank()
        metrics["rank_after_pruning"] = new_rank
        if new_rank < prune.rank:
            adapter = {m: truncate(f, new_rank) for m, f in adapter.items()}
    metrics["train_seconds"] = time.perf_counter() - t0
    update = ClientUpdate(client_id=client_id, adapter=adapter, head=trained.head, num_examples=len(data))
    return update, metrics


class _Pruning:
    """HetLoRA's rank self-pruning (Cho et al., EMNLP 2024), on the live adapter tensors."""

    def __init__(self, lm: LoadedModel, ins: dict[str, Any]):
        from strategies.hetlora import pruned_rank

        self.lm, self.name = lm, active(lm)
        self.gamma, self.lam, self.r_min = float(ins["prune_gamma"]), float(ins["prune_lambda"]), int(ins["prune_r_min"])
        self.rank = layer(lm, lm.modules[0]).lora_A[self.name].weight.shape[0]
        self.target = pruned_rank(self.rank, self.gamma, self.r_min)
        with torch.no_grad():
            self.start = float(self.term())

    def term(self) -> torch.Tensor:
        from strategies.hetlora import tail_norm

        total = 0.0
        for m in self.lm.modules:
            lay = layer(self.lm, m)
            f = LoraFactors(lay.lora_A[self.name].weight, lay.lora_B[self.name].weight, float(lay.scaling[self.name]))
            total = total + tail_norm(f, self.gamma)
        return total

    def penalty(self) -> torch.Tensor:
        return self.lam * self.term()

    def new_rank(self) -> int:
        with torch.no_grad():
            end = float(self.term())
        return self.target if (self.target < self.rank and end < self.start) else self.rank


def _steps(lm: LoadedModel, opt: torch.optim.Optimizer, data: Any, settings: TrainSettings, seed: int, client_id: int, prune: "_Pruning | None" = None) -> list[float]:
    model = lm.model
    losses: list[float] = []
    try:
        for idx in batch_order(len(data), settings.local_steps, settings.batch_size, seed):
            batch = encode(lm, data[idx])
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {client_id}: training loss became {loss.item()}")
            total = loss + prune.penalty() if prune is not None else loss
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        model.eval()
    return losses


def _dp_steps(lm: LoadedModel, opt: torch.optim.Optimizer, data: Any, settings: TrainSettings, dp: DPSettings, client_id: int, prune: "_Pruning | None" = None) -> list[float]:
    """``local_steps`` DP-SGD steps via Opacus's ``PrivacyEngine`` (hooks grad-sample mode,
    Poisson-sampled batches). The wrapper is closed afterwards, so the worker's cached model can be
    wrapped again for the next client. HetLoRA's pruning term depends on no example: its gradient
    is added after Opacus has clipped and noised the data gradient."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    rows = TensorDataset(torch.arange(len(data)))
    collate = lambda items: encode(lm, data[[int(i) for (i,) in items]])  # noqa: E731
    loader = DataLoader(rows, batch_size=min(settings.batch_size, len(data)), collate_fn=collate)
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
            if batch["input_ids"].shape[0] == 0:  # an empty Poisson sample (probability ~e^-batch_size)
                continue
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {client_id}: training loss became {loss.item()}")
            with warnings.catch_warnings():  # Opacus's hooks on a frozen-input layer: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            if dp_opt.pre_step():  # clip per example, add noise, average
                if prune is not None:
                    params = [p for g in dp_opt.param_groups for p in g["params"]]
                    grads = torch.autograd.grad(prune.penalty(), params, allow_unused=True)
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.grad.add_(g)
                dp_opt.original_optimizer.step()
            dp_opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
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

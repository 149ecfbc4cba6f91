"""The cohort engine's core: K clients' local training in one batched step over one frozen base model.

:func:`train_cohort` takes K jobs — each exactly what :func:`clients.train.train` takes for one
client (payload, partition, seed, client id; plus the client's rank and alpha, which ``train``
reads from the model's active adapter) — and returns, per client, the ``(ClientUpdate, metrics)``
that ``train`` would return, to float rounding. ``engine.kind=cohort`` runs it on a simulation
worker (``clients.app.cohort_handler``).

How one step works (K clients, module ``m`` with ``W [out × in]``):

* **Data.** Client k's batch at step t is the one ``train`` uses: ``batch_order(len(data_k),
  local_steps, batch_size, seed_k)``, tokenized by :func:`clients.train.encode` (padded to the
  client's own longest row, as alone). The batches of a forward pass are right-padded to the pass's
  longest row (pad token, attention 0, label -100) and concatenated along the batch dimension.
  Right-padding keeps every real token at the position and with the keys it has alone (position
  ids are ``arange``; the extra keys are masked), so the per-client computation is unchanged.
  Padding is kept low by passes: longest batch first, a client whose batch is shorter than
  ``(1 − pad_tolerance)`` × the pass's longest opens a new pass (gradients accumulate over a step's
  passes, then one optimizer step), and it is measured: ``pad_fraction`` in the metrics (and
  ``pad_fraction_alone``, what the per-client engine pads anyway).
* **LoRA.** Each targeted peft ``Linear`` keeps its frozen ``base_layer(x)`` over all rows and adds
  every client's own ``s_k · B_k A_k x`` to its rows with batched matmuls (``torch.bmm``) over the
  stacks ``A [K × R × in]``, ``B [K × out × R]`` (``R`` = the cohort's largest rank for that module),
  in peft's order of operations (``(x Aᵀ) Bᵀ · s``). Clients are ordered by their rows per step
  (``min(batch_size, len(data))``, constant over the steps: a partition smaller than ``batch_size``
  has fewer) and then by rank, so that clients with equal row counts and ranks are contiguous: one
  ``bmm`` per such run, over a view of the activations and the run's live slice ``A[:, :r]``,
  ``B[:, :, :r]`` of the stacks (one run for a uniform cohort, one per distinct rank otherwise; no
  gather, no padded rows, no FLOPs on padded components). The batched matmul's backward computes
  the factor gradients in ``F.linear``'s operand layout. Result, on this CPU in float32: most
  clients' updates are bit for bit those of the per-client engine; the others differ by float
  rounding, where a kernel's shape differs between the engines (extra sequence padding and its
  attention mask; a matmul over a client's 2 rows alone and over 13 in the cohort picks another
  kernel), amplified by AdamW to the per-client engine's own float32 accuracy (see the tests).
* **Padding held at exactly zero.** Client k's components ``r_k..R`` are zero rows of ``A_k`` and
  zero columns of ``B_k``, and no matmul reads them (each run uses its live slice), so their
  gradient is exactly zero (the slice's backward writes zeros there). It would be zero even if they
  were read: ``∂L/∂A_k[j] = s_k B_k[:, j]ᵀ G X`` and ``∂L/∂B_k[:, j] = s_k G (A_k[j] X)ᵀ`` each carry
  the other factor's zero slice. HetLoRA's penalty reads the true-rank slices only. An elementwise
  optimizer keeps them zero: AdamW's moments stay 0 and its step is ``0 / (0 + ε) = 0``, weight decay
  multiplies 0, SGD's momentum buffer stays 0. (The tests check the stacks' padding after training.)
* **Heads.** Each trained head tensor (peft's ``modules_to_save``, e.g. the classifier) becomes a
  ``[K × …]`` stack; a ``Linear`` head is applied to each client's rows with ``torch.baddbmm`` (one
  per run of equal row counts), any other head module per client through
  ``torch.func.functional_call``.
* **Loss.** The model runs without labels; client k's loss is computed on its own rows exactly as
  the model computes it alone (mean cross-entropy over its examples for classification, the model's
  own causal-LM loss, a mean over its predicted tokens), plus HetLoRA's ``λ_k · Σ_m tail_m`` when
  it prunes. The cohort's objective is the SUM over clients. A client's rows depend only on its own
  adapter and head (transformer rows do not interact), so the gradient of the sum with respect to
  client k's tensors is exactly the gradient of client k's own objective.
* **Optimizer.** One optimizer (``clients.train.make_optimizer``: AdamW or SGD, same lr, weight
  decay, momentum) over the stacked tensors. This is exactly K per-client optimizers: AdamW and SGD
  are elementwise (each entry's update reads only that entry's gradient, moments and value), every
  client takes the same number of steps (``local_steps``; the bias corrections use the step count)
  with the same hyperparameters, so client k's slice of the stack follows the same recursion as its
  own tensor would alone.
* **FFA-LoRA** (the plan's ``train_A=False``): a frozen client's A is a constant, never an optimizer parameter (in a
  mixed cohort its slice is taken from a constant by ``torch.where``, so neither its gradient nor
  weight decay can reach it). **Fresh inits** (empty payload adapter): ``fedpeft.lora.fresh_adapter``
  at the client's rank and scaling, seeded by the plan's ``init_seed`` — what ``fresh_init`` does.
  **HetLoRA** (the plan's :class:`fedpeft.plan.SelfPruning`): the penalty above, batched, and the
  rank shrink of ``train`` (the same rule, :meth:`SelfPruning.rank_after`: shrink to
  ``max(⌊γ r⌋, r_min)`` when the tail term decreased).

Dropout: ``train`` seeds torch's generators with the client's seed (in a forked RNG) and draws
every dropout mask of its run from them. A cohort keeps one stream per client (:class:`_Streams`,
seeded the same way) and, while it trains, runs ``F.dropout`` (every ``nn.Dropout``: the base
model's hidden and attention-probability dropout, peft's ``lora_dropout``) and SDPA's attention
dropout per client: on the client's own rows, cut to its own batch length (the tensor it has
alone), with its own stream. So a client draws the same masks in the same order as alone, and
with dropout on the engines agree as they do with it off (to float rounding). Random draws
elsewhere in a model's forward (none in the supported models) would come from the cohort's own
generator (seeded by the first job's seed when K = 1, a hash of all jobs' seeds otherwise).

**DP-SGD** (``privacy.mode=sample``; every job carries its ``DPSettings``): each client's batches
are Poisson samples drawn as the per-client engine's Opacus loader draws them, from a generator
seeded by the client's seed (:class:`_PoissonSampler`), so a client's batch sizes vary per step and
clients of a pass form runs by equal batch size. The LoRA deltas and the Linear heads run through
functions whose backward hands over every example's own gradients (LoRA factors are thin: forming
``Σ_t g_t h_tᵀ`` per example costs T·r·d, less than the T²·d of the "ghost" norm identity); per
client, each example's gradient over all its trained tensors is clipped to C, the sum gets
``N(0, (σC)²)`` per entry drawn from the client's stream in Opacus's tensor order, and is divided by
the client's expected batch size (:func:`_clip_and_noise`), then HetLoRA's term's gradient is added
and the optimizer steps — Opacus's ``DPOptimizer`` step, per client. With dropout off, a client's
DP-SGD update equals the per-client engine's, noise included (the tests check σ = 0 and σ > 0).

**Training options** (``train.*``, as :func:`clients.train.train` honours them): the round's ``lr``;
``grad_accum_steps`` G: each optimizer step accumulates G of every client's ``batch_order`` batches
(each client's loss divided by G; DP-SGD: one Poisson sample at the logical batch's rate, its loss
taken in chunks of ``batch_size`` rows as the per-client engine's virtual steps take it);
``max_grad_norm``: each client's own global norm over its own slices of the stacks (its LoRA
factors and head; zero padding adds nothing), clipped as ``clip_grad_norm_`` clips it alone;
``gradient_checkpointing``: transformers' non-reentrant checkpointing of the base's layers (refused
for a model with active dropout: a recomputed forward would draw a client's masks from its stream
again).

Not supported (each raises :class:`CohortError`, one line naming the setting): ``freeze_B`` (RoLoRA's
rounds that train A; the config refuses ``strategy=rolora`` with ``engine.kind=cohort``), DP-SGD with a head
that is not a Linear layer, a cohort mixing DP and non-DP clients, LoRA variants such as DoRA, LoRA on non-``Linear`` modules, merged
adapters, multi-label/regression classification heads, clients of one cohort on different FLoRA
base versions. bf16: ``autocast=torch.bfloat16`` runs the frozen base under autocast and the
LoRA path and heads in the adapter's dtype (float32); a base model loaded in bf16 / fp16 or
quantized by bitsandbytes (``model.dtype``, ``model.quantization``) runs as peft runs it: the frozen
``base_layer(x)`` (a bnb ``Linear4bit`` / ``Linear8bitLt`` too) with what strategies merged beside it
(its float32 :class:`fedpeft.models.HeldDelta`, a forward hook of that module), the LoRA path in the
adapter's dtype (float32), added to the base output in its dtype.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from clients.train import DPSettings, TrainSettings, batch_order, check_settings, checkpointing, encode, make_optimizer, truncation_metrics
from fedpeft.lora import LoraFactors, fresh_adapter, scaling_for, tail_start, truncate
from fedpeft.models import PREFIX, LoadedModel, ModelError, active, layer, module_shapes, scaling_of
from fedpeft.plan import ClientUpdate, Payload, SelfPruning

METHODS = ("lora", "rslora")  # the PEFT methods the cohort engine batches (LoRA factors on Linear layers)


class CohortError(ValueError):
    """A cohort the engine cannot train as asked; one line, naming the setting."""


@dataclass(frozen=True)
class CohortJob:
    """One client of a cohort: what ``train(lm, payload, data, settings, seed, client_id, dp)`` takes.

    ``rank`` / ``alpha``: the client's LoRA rank and alpha. ``train`` reads them from the model's
    active adapter (the app calls ``use_adapter(lm, rank, alpha)`` first); a cohort has no single
    active adapter, so a job with an empty payload adapter (a fresh init) should carry them; when
    left out, the model's active adapter's rank and scaling are used, as ``train`` would. With a
    non-empty payload the factors' own shapes and scalings are used (``rank`` must agree if given).
    """

    payload: Payload
    data: Any
    seed: int
    client_id: int
    rank: int | None = None
    alpha: float | None = None
    dp: DPSettings | None = None


def as_job(job: CohortJob | Sequence[Any]) -> CohortJob:
    return job if isinstance(job, CohortJob) else CohortJob(*job)


# ----------------------------------------------------------------------------------------- checks


def check_model(lm: LoadedModel) -> None:
    """Refuse (:class:`CohortError`, one line naming the setting) a model the cohort engine cannot
    batch; the server calls it before the first round."""
    name = active(lm)
    if lm.task not in ("classification", "causal_lm"):
        raise CohortError(f"model.task={lm.task!r}: the cohort engine trains classification and causal_lm only")
    method = getattr(lm.method, "name", "lora")
    if method not in METHODS or getattr(lm.lora, "use_dora", False):
        raise CohortError(f"peft={method}: the cohort engine batches peft={' | '.join(METHODS)} only; use engine.kind=per_client")
    for m in lm.modules:
        lay = layer(lm, m)
        if not isinstance(lay, _linear_layers()):
            raise CohortError(f"model.target_modules: {m} is a {type(lay).__name__}; the cohort engine batches LoRA on Linear layers only")
        if lay.merged:
            raise CohortError(f"{m}: the LoRA adapter is merged into the base weights; unmerge it before training a cohort")
        if name in getattr(lay, "lora_variant", {}):
            raise CohortError(f"{m}: LoRA variant {type(lay.lora_variant[name]).__name__} is not supported by the cohort engine")
    if lm.task == "classification":
        cfg = lm.model.get_base_model().config
        if cfg.problem_type not in (None, "single_label_classification") or cfg.num_labels < 2:
            raise CohortError(
                f"classification with problem_type={cfg.problem_type!r}, num_labels={cfg.num_labels}: "
                "the cohort engine trains single-label classification only"
            )
    # What train() optimises: the active adapter's LoRA factors and its modules_to_save copies.
    # Anything else trainable would be silently frozen here: refuse instead.
    marks = (f".lora_A.{name}.", f".lora_B.{name}.", f".modules_to_save.{name}.")
    for pname, p in lm.model.named_parameters():
        if p.requires_grad and not any(k in pname for k in marks):
            raise CohortError(f"the model trains {pname}, which is neither a LoRA factor nor a head tensor; the cohort engine cannot batch it")


def _linear_layers() -> tuple[type, ...]:
    """peft's LoRA Linear layers: over a float base, and over a bitsandbytes 4-bit / 8-bit one
    (its ``base_layer`` is a bnb module the batched forward calls like any other)."""
    from peft.tuners.lora.layer import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # peft defines them only when bitsandbytes imports
        return (Linear,)
    return (Linear, Linear4bit, Linear8bitLt)


def _check_jobs(lm: LoadedModel, jobs: list[CohortJob]) -> None:
    if not jobs:
        raise CohortError("train_cohort: no jobs")
    if len({j.dp is None for j in jobs}) > 1:
        raise CohortError("privacy.mode=sample: some clients of the cohort train with DP-SGD and some without; one cohort trains one way")
    for j in jobs:
        if len(j.data) == 0:
            raise ValueError(f"client {j.client_id}: its partition is empty")
        if j.payload.plan.proximal is not None:
            raise CohortError("strategy.prox_mu (FedProx's proximal term): the cohort engine does not batch it; "
                              "use engine.kind=per_client, or strategy.prox_mu=0")
        if j.payload.plan.scaffold:
            raise CohortError("strategy.scaffold (SCAFFOLD's control variates): the cohort engine does not batch them; "
                              "use engine.kind=per_client, or strategy.scaffold=false")
        if not j.payload.plan.train_B:
            raise CohortError("freeze_B (strategy=rolora): the cohort engine does not batch a frozen B; use engine.kind=per_client")
        if j.payload.base_version != lm.base_version:
            raise CohortError(
                f"client {j.client_id}: its payload asks for base version {j.payload.base_version} but the model holds "
                f"{lm.base_version}; every client of a cohort trains on the same base (sync it first)"
            )
        if set(j.payload.head) != set(lm.head):
            raise ModelError(f"head tensors {sorted(j.payload.head)} do not match the model's {sorted(lm.head)}")


def _pruning(p: Payload) -> SelfPruning | None:
    """The client's HetLoRA self-pruning when it is on (the plan's loss term and finalisation), else None."""
    term = p.plan.loss_term
    return term if isinstance(term, SelfPruning) and term.on else None


def _start(lm: LoadedModel, job: CohortJob) -> dict[str, LoraFactors]:
    """The factors client ``job`` starts from: its payload's, or a fresh seeded LoRA."""
    p = job.payload
    shapes = module_shapes(lm)
    if p.adapter:
        missing, extra = set(lm.modules) - set(p.adapter), set(p.adapter) - set(lm.modules)
        if missing or extra:
            raise ModelError(f"adapter does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        for m, f in p.adapter.items():
            if f.shape != tuple(shapes[m]):
                raise ModelError(f"{m}: factors A {tuple(f.A.shape)}, B {tuple(f.B.shape)} do not fit the module's {tuple(shapes[m])}")
        r0 = p.adapter[lm.modules[0]].rank
        if job.rank is not None and job.rank != r0:
            raise CohortError(f"client {job.client_id}: rank {job.rank} but its payload's factors have rank {r0}")
        return dict(p.adapter)
    if p.plan.init_seed is None:
        raise CohortError(f"client {job.client_id}: an empty payload adapter needs the plan's init_seed (a fresh LoRA)")
    if job.rank is None:  # the active adapter's, as train()'s fresh_init
        rank = layer(lm, lm.modules[0]).lora_A[active(lm)].weight.shape[0]
        scaling = scaling_of(lm, lm.modules[0])
    else:
        if job.alpha is None:
            raise CohortError(f"client {job.client_id}: a fresh LoRA at rank {job.rank} needs the client's alpha too")
        rank, scaling = int(job.rank), scaling_for(int(job.rank), float(job.alpha), bool(getattr(lm.lora, "use_rslora", False)))
    return fresh_adapter(shapes, rank, scaling, p.plan.init_seed)


# ----------------------------------------------------------------------------------------- stacks


class _BatchedLinear(torch.autograd.Function):
    """``y[k] = x[k] W[k]ᵀ (+ b[k])`` over ``x [G, M, in]``, ``W [G, out, in]``: one ``bmm`` for G
    clients. Its backward computes ``∂W[k] = G[k]ᵀ x[k]`` (not autograd's ``(x[k]ᵀ G[k])ᵀ`` for a
    ``bmm``), the operand layout that ``F.linear``'s own backward uses, so that on CPU each client's
    gradient is bit for bit the one the per-client engine computes (checked by the tests)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, W)
        ctx.has_bias = b is not None
        if b is None:
            return torch.bmm(x, W.transpose(1, 2))
        return torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, W = ctx.saved_tensors
        gx = torch.bmm(g, W) if ctx.needs_input_grad[0] else None
        gW = torch.bmm(g.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gW, gb


def _linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return _BatchedLinear.apply(x, W, b)


class _LoraPerExample(torch.autograd.Function):
    """DP-SGD's LoRA delta ``y[k] = s[k] · (x[k] A[k]ᵀ) B[k]ᵀ`` over ``x [G, n·T, in]`` (G clients
    of n examples of T positions each). Its backward returns the input's gradient only and hands
    ``sink`` every example's own factor gradients, what Opacus computes for peft's ``lora_A`` and
    ``lora_B`` Linear layers: with ``g = s·∂L/∂y`` and ``h = x Aᵀ``,
    ``∂B_i = Σ_t g_t h_tᵀ`` ``[G, n, out, r]`` and ``∂A_i = Σ_t (g_t B) x_tᵀ`` ``[G, n, r, in]``.
    LoRA's factors are thin (r ≪ in, out), so each example's gradients are small and are formed
    directly: the "ghost" identity ``‖Σ_t u_t v_tᵀ‖² = Σ_{t,t'} (u_t·u_t')(v_t·v_t')`` would cost T²
    per example instead of T·r·d."""

    @staticmethod
    def forward(ctx, x, A, B, s, n: int, sink, want_A: bool):
        h = torch.bmm(x, A.transpose(1, 2))
        ctx.save_for_backward(x, h, A, B, s)
        ctx.n, ctx.sink, ctx.want_A = n, sink, want_A
        return torch.bmm(h, B.transpose(1, 2)) * s.view(-1, 1, 1)

    @staticmethod
    def backward(ctx, gy):
        x, h, A, B, s = ctx.saved_tensors
        G, n = x.shape[0], ctx.n
        g = gy * s.view(-1, 1, 1)
        gh = torch.bmm(g, B)
        gB = torch.einsum("gnto,gntr->gnor", g.reshape(G, n, -1, g.shape[-1]), h.reshape(G, n, -1, h.shape[-1]))
        gA = torch.einsum("gntr,gnti->gnri", gh.reshape(G, n, -1, gh.shape[-1]), x.reshape(G, n, -1, x.shape[-1])) if ctx.want_A else None
        ctx.sink(gA, gB)
        gx = torch.bmm(gh, A) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None


class _LinearPerExample(torch.autograd.Function):
    """DP-SGD's per-client Linear head ``y[k] = x[k] W[k]ᵀ + b[k]`` over ``x [G, n·T, in]``; its
    backward hands ``sink`` each example's ``∂W_i = Σ_t g_t x_tᵀ`` and ``∂b_i = Σ_t g_t`` (Opacus's
    Linear grad sampler) and returns the input's gradient only."""

    @staticmethod
    def forward(ctx, x, W, b, n: int, sink):
        ctx.save_for_backward(x, W)
        ctx.n, ctx.sink, ctx.has_bias = n, sink, b is not None
        return torch.bmm(x, W.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2))

    @staticmethod
    def backward(ctx, gy):
        x, W = ctx.saved_tensors
        G, n = x.shape[0], ctx.n
        g4 = gy.reshape(G, n, -1, gy.shape[-1])
        gW = torch.einsum("gnto,gnti->gnoi", g4, x.reshape(G, n, -1, x.shape[-1]))
        ctx.sink(gW, g4.sum(2) if ctx.has_bias else None)
        gx = torch.bmm(gy, W) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None




def _take(t: torch.Tensor, sel) -> torch.Tensor:
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


class _Rows:
    """One forward pass: its clients (``members``, stack indices in row order) and their rows.

    Members are ordered by rows per step, then rank, so that clients with equal row counts (and, per
    module, equal ranks) form runs of consecutive rows, each a ``[G, rows·…, d]`` view of the base's
    ``[N, …, d]`` activations (no gather, no copy of activations). A run's stack slices are views
    when its members are consecutive in the stacks, small index-selects otherwise."""

    def __init__(self, members: list[int], counts: list[int], device: torch.device, lengths: list[int] | None = None):
        self.members, self.counts, self.device = members, counts, device
        self.K = len(members)
        self.n = sum(counts)
        self.offsets = [sum(counts[:j]) for j in range(self.K)]
        self.groups = self.runs([0] * self.K)
        # Each member's own batch length (what it is padded to alone) and the pass's: per-client dropout slices to it.
        self.lengths = lengths
        self.T = max(lengths) if lengths else None

    def runs(self, keys: list[int]) -> list[tuple[Any, int, int, int]]:
        """Maximal runs of consecutive members with equal row counts and equal ``keys`` (one per
        member): ``(stack selection, first row, end row, key)``."""
        out, j = [], 0
        while j < self.K:
            e = j
            while e < self.K and self.counts[e] == self.counts[j] and keys[e] == keys[j]:
                e += 1
            idx = self.members[j:e]
            if idx == list(range(idx[0], idx[0] + len(idx))):
                sel = slice(idx[0], idx[0] + len(idx))
            else:
                sel = torch.tensor(idx, dtype=torch.long, device=self.device)
            out.append((sel, self.offsets[j], self.offsets[j] + self.counts[j] * (e - j), keys[j]))
            j = e
        return out

    def apply(self, x: torch.Tensor, runs: list[tuple[Any, int, int, int]], fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``fn(x_g [G, rows·…, in], sel, key) -> [G, rows·…, out]`` per run, back to ``[N, …, out]``."""
        if x.shape[0] != self.n:
            raise RuntimeError(f"cohort engine: a layer saw {x.shape[0]} rows, expected {self.n} (batch-first inputs)")
        # split, not slices: a slice's backward writes its gradient into a zero tensor of the
        # whole input, once per run; split's backward concatenates the runs' gradients once
        pieces = [x] if len(runs) == 1 else x.split([r1 - r0 for _, r0, r1, _ in runs])
        outs = []
        for (sel, r0, r1, key), xr in zip(runs, pieces):
            g = (sel.stop - sel.start) if isinstance(sel, slice) else sel.numel()
            y = fn(xr.reshape(g, -1, x.shape[-1]), sel, key)
            outs.append(y.reshape(r1 - r0, *x.shape[1:-1], y.shape[-1]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's rows of ``t`` (one split: its backward is one concatenation)."""
        return t.split(self.counts)


class _Streams:
    """Each client's own random stream, as the per-client engine has it: ``train`` seeds torch's
    generators with the client's seed (``torch.manual_seed``) and every dropout mask of its run is
    drawn from them in the model's order. Here client ``k``'s draws run with torch's default
    generators set to ``k``'s state (and its state saved back after), so each client's masks are
    the draws it makes alone. With DP-SGD a client's Poisson batches and noise come from the same
    stream (:class:`_PoissonSampler`'s generators), as Opacus draws them from the default ones."""

    def __init__(self, cpu: list[torch.Generator], device: torch.device, dev: list[torch.Generator] | None = None):
        self.cpu, self.device = cpu, device
        self.dev = dev if device.type == "cuda" else None

    @classmethod
    def seeded(cls, seeds: list[int], device: torch.device) -> "_Streams":
        dev = [torch.Generator(device=device).manual_seed(s) for s in seeds] if device.type == "cuda" else None
        return cls([torch.Generator().manual_seed(s) for s in seeds], device, dev)

    def run(self, k: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        saved = torch.get_rng_state()
        torch.set_rng_state(self.cpu[k].get_state())
        if self.dev is not None:
            saved_dev = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.dev[k].get_state(), self.device)
        try:
            return fn()
        finally:
            self.cpu[k].set_state(torch.get_rng_state())
            torch.set_rng_state(saved)
            if self.dev is not None:
                self.dev[k].set_state(torch.cuda.get_rng_state(self.device))
                torch.cuda.set_rng_state(saved_dev, self.device)


class _Stacks:
    """The cohort's trainable state: per module ``A [K × R × in]``, ``B [K × out × R]`` and the
    scalings ``s [K]``; per head tensor a ``[K × …]`` stack; which clients freeze A; HetLoRA's masks."""

    def __init__(self, lm: LoadedModel, jobs: list[CohortJob], starts: list[dict[str, LoraFactors]]):
        K, dev = len(jobs), lm.device
        name = active(lm)
        self.K, self.modules = K, lm.modules
        self.order = list(range(K))  # the callers' index of each stacked client (set by _train)
        self.ranks = {m: [s[m].rank for s in starts] for m in lm.modules}
        self.frozen = [not j.payload.plan.train_A for j in jobs]
        self.A: dict[str, torch.Tensor] = {}  # leaf (trained, or constant when every client freezes A)
        self.A_const: dict[str, torch.Tensor] = {}  # mixed cohorts only: the frozen clients' A
        self.B: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.scalings = {m: [float(s[m].scaling) for s in starts] for m in lm.modules}
        self._frozen_mask = torch.tensor(self.frozen, device=dev).view(K, 1, 1)
        for m in lm.modules:
            dtype = layer(lm, m).lora_A[name].weight.dtype
            R = max(self.ranks[m])
            out_f, in_f = starts[0][m].shape
            A = torch.zeros(K, R, in_f, dtype=dtype, device=dev)
            B = torch.zeros(K, out_f, R, dtype=dtype, device=dev)
            for k, s in enumerate(starts):
                r = s[m].rank
                A[k, :r] = s[m].A.to(dev, dtype)
                B[k, :, :r] = s[m].B.to(dev, dtype)
            if any(self.frozen) and not all(self.frozen):
                self.A_const[m] = A.clone()
            self.A[m] = A.requires_grad_(not all(self.frozen))
            self.B[m] = B.requires_grad_(True)
            self.s[m] = torch.tensor(self.scalings[m], dtype=dtype, device=dev)
        self.head: dict[str, torch.Tensor] = {}
        if lm.head:  # in the model's head dtype, as write_adapter copies it into the model
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(lm.model, adapter_name=name)
            for h in lm.head:
                self.head[h] = torch.stack([j.payload.head[h].to(dev, state[PREFIX + h].dtype) for j in jobs]).requires_grad_(True)
        # HetLoRA: per client its SelfPruning (γ, λ, r_min) when it prunes; the tail masks over components, per module.
        self.prune: list[SelfPruning | None] = [_pruning(j.payload) for j in jobs]
        self.tail: dict[str, torch.Tensor] = {}
        self.dtype = layer(lm, lm.modules[0]).lora_A[name].weight.dtype
        self.lam = torch.tensor([float(p.lam) if p else 0.0 for p in self.prune], dtype=self.dtype, device=dev)
        if any(self.prune):
            for m in lm.modules:
                mask = torch.zeros(K, max(self.ranks[m]), device=dev)
                for k, p in enumerate(self.prune):
                    if p:
                        r = self.ranks[m][k]
                        mask[k, tail_start(r, float(p.gamma)) : r] = 1.0
                self.tail[m] = mask

    def params(self) -> list[torch.Tensor]:
        return [t for t in (*self.A.values(), *self.B.values(), *self.head.values()) if t.requires_grad]

    def effective_A(self) -> dict[str, torch.Tensor]:
        """A as the forward uses it: in a mixed cohort, the frozen clients' slices are constants."""
        if not self.A_const:
            return self.A
        return {m: torch.where(self._frozen_mask, self.A_const[m], self.A[m]) for m in self.modules}

    def tail_term(self, A: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[K]``: each pruning client's ``Σ_m ‖B[:, ⌊γr⌋:r]‖_F ‖A[⌊γr⌋:r]‖_F`` (HetLoRA's
        ``tail_norm`` on its true-rank slices), zero for the others. ``vector_norm``'s gradient at a
        zero tail is zero, as in ``tail_norm``."""
        total = torch.zeros(self.K, dtype=self.dtype, device=self.lam.device)
        for m in self.modules:
            mask = self.tail[m].to(A[m].dtype)
            tb = torch.linalg.vector_norm(self.B[m] * mask[:, None, :], dim=(1, 2))
            ta = torch.linalg.vector_norm(A[m] * mask[:, :, None], dim=(1, 2))
            total = total + (tb * ta).to(total.dtype)
        return total

    def factors(self, k: int) -> dict[str, LoraFactors]:
        A = self.effective_A()
        out = {}
        for m in self.modules:
            r = self.ranks[m][k]
            out[m] = LoraFactors(A[m][k, :r].detach().cpu().clone(), self.B[m][k, :, :r].detach().cpu().clone(), self.scalings[m][k])
        return out


# ----------------------------------------------------------------------------------------- forward


class _Forward:
    """Overrides the forward of every targeted LoRA layer and of every head wrapper for the duration
    of a cohort (instance attributes, removed afterwards); :meth:`set_rows` before each pass."""

    def __init__(self, lm: LoadedModel, stacks: _Stacks):
        from peft.utils.other import ModulesToSaveWrapper

        self.lm, self.stacks = lm, stacks
        # DP-SGD: each client's per-example gradients, {stack index: {tensor key: [n, ...]}}, filled
        # by the backward pass (None: no DP, the stacks' gradients are autograd's).
        self.per_example: dict[int, dict[tuple[str, str], torch.Tensor]] | None = None
        self.rows: _Rows | None = None
        self.runs: dict[str, list] = {}
        self.A: dict[str, torch.Tensor] = {}
        self.patched: list[torch.nn.Module] = []
        self.streams: _Streams | None = None  # each client's random stream (dropout masks); set by _train
        self._functions: dict[str, Callable] = {}  # torch.nn.functional's own, while patched
        self.name = active(lm)
        # Heads: group the trained tensors by their modules_to_save wrapper.
        self.heads: dict[str, tuple[torch.nn.Module, list[tuple[str, str]]]] = {}
        for h in lm.head:
            parts = h.split(".")
            for i in range(len(parts) - 1, 0, -1):
                mod = lm.model.get_submodule(PREFIX + ".".join(parts[:i]))
                if isinstance(mod, ModulesToSaveWrapper):
                    path = ".".join(parts[:i])
                    self.heads.setdefault(path, (mod, []))[1].append((h, ".".join(parts[i:])))
                    break
            else:
                raise CohortError(f"head tensor {h} is not in a peft modules_to_save module; the cohort engine cannot batch it")

    def linear_heads(self) -> bool:
        """Every head is a Linear whose weight (and bias) train: what DP-SGD's per-example head gradients need."""
        return all(isinstance(w.modules_to_save[self.name], torch.nn.Linear) and {p for _, p in t} <= {"weight", "bias"}
                   for w, t in self.heads.values())

    def _sink(self, sel, keys: tuple[tuple[str, str] | None, ...]) -> Callable:
        """Where a run's per-example gradients go: member j of the run, tensor ``keys[i]``."""
        members = list(range(sel.start, sel.stop)) if isinstance(sel, slice) else sel.tolist()

        def sink(*grads: torch.Tensor | None) -> None:
            for key, g in zip(keys, grads):
                if key is None or g is None:
                    continue
                for j, k in enumerate(members):
                    if key[0] == "A" and self.stacks.frozen[k]:
                        continue
                    store = self.per_example.setdefault(k, {})
                    store[key] = store[key] + g[j] if key in store else g[j]

        return sink

    def rows_per_member(self, sel) -> int:
        """The examples per client of a run (equal within a run)."""
        k = sel.start if isinstance(sel, slice) else int(sel[0])
        return self.rows.counts[self.rows.members.index(k)]

    def set_rows(self, rows: _Rows) -> None:
        """The next forward pass's clients; per module, its runs of equal rows and rank."""
        self.rows = rows
        self.runs = {m: rows.runs([self.stacks.ranks[m][k] for k in rows.members]) for m in self.lm.modules}
        self.A = self.stacks.effective_A()

    def __enter__(self) -> "_Forward":
        for m in self.lm.modules:
            self._patch(layer(self.lm, m), self._lora_forward(m, layer(self.lm, m)))
        for _path, (wrapper, tensors) in self.heads.items():
            self._patch(wrapper, self._head_forward(wrapper.modules_to_save[self.name], tensors))
        for fname, fn in (("dropout", self._dropout), ("scaled_dot_product_attention", self._sdpa)):
            self._functions[fname] = getattr(F, fname)
            setattr(F, fname, fn)
        return self

    def __exit__(self, *exc) -> None:
        for mod in self.patched:
            del mod.forward
        self.patched.clear()
        for fname, fn in self._functions.items():
            setattr(F, fname, fn)
        self._functions.clear()

    # Dropout per client. ``nn.Dropout`` (the base model's hidden and attention-probability dropout,
    # peft's ``lora_dropout``) calls ``F.dropout``; transformers' SDPA attention passes its dropout to
    # ``F.scaled_dot_product_attention``. While a cohort trains, both run per member on the member's
    # rows cut to its own batch length (its shape alone: ``[rows, T_k, …]``, ``[rows, heads, T_k, T_k]``)
    # with its own random stream (:class:`_Streams`), so its masks are the ones it draws alone; the
    # positions past ``T_k`` (padding, masked out of attention) pass through undropped.

    def _members(self, x: torch.Tensor, what: str):
        rows = self.rows
        if x.shape[0] != rows.n:
            raise RuntimeError(f"cohort engine: {what} saw {x.shape[0]} rows, expected {rows.n} (batch-first inputs)")
        lengths = rows.lengths or [x.shape[1] if x.dim() > 1 else 1] * rows.K
        return zip(rows.members, rows.split(x), lengths)

    def _dropout(self, x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        drop = self._functions["dropout"]
        if not training or p == 0.0 or self.rows is None or self.streams is None:
            return drop(x, p, training, inplace)
        T = self.rows.T
        outs = []
        for k, xk, Tk in self._members(x, "a dropout"):
            if T is not None and Tk < T and x.dim() == 3 and x.shape[1] == T:  # [rows, T, d]
                head = self.streams.run(k, lambda xk=xk, Tk=Tk: drop(xk[:, :Tk], p, True, False))
                outs.append(torch.cat([head, xk[:, Tk:]], dim=1))
            elif T is not None and Tk < T and x.dim() == 4 and x.shape[2] == x.shape[3] == T:  # [rows, heads, T, T]
                head = self.streams.run(k, lambda xk=xk, Tk=Tk: drop(xk[:, :, :Tk, :Tk], p, True, False))
                top = torch.cat([head, xk[:, :, :Tk, Tk:]], dim=3)
                outs.append(torch.cat([top, xk[:, :, Tk:]], dim=2))
            else:
                outs.append(self.streams.run(k, lambda xk=xk: drop(xk, p, True, False)))
        return torch.cat(outs, dim=0)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs) -> torch.Tensor:
        sdpa = self._functions["scaled_dot_product_attention"]
        if dropout_p == 0.0 or self.rows is None or self.streams is None:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
        rows, T = self.rows, self.rows.T
        outs = []
        for j, (k, q, Tk) in enumerate(self._members(query, "attention")):
            r0, r1 = rows.offsets[j], rows.offsets[j] + rows.counts[j]
            kk, v = key[r0:r1], value[r0:r1]
            m = attn_mask[r0:r1] if attn_mask is not None and attn_mask.shape[0] == rows.n else attn_mask
            cut = T is not None and Tk < T and q.shape[-2] == T
            if cut:
                q, kk, v = q[..., :Tk, :], kk[..., :Tk, :], v[..., :Tk, :]
                if m is not None:
                    m = m[..., :Tk, :Tk] if m.shape[-2] == T else m[..., :Tk]
            o = self.streams.run(k, partial(sdpa, q, kk, v, attn_mask=m, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs))
            outs.append(F.pad(o, (0, 0, 0, T - Tk)) if cut else o)
        return torch.cat(outs, dim=0)

    def _patch(self, mod: torch.nn.Module, fn: Callable) -> None:
        mod.forward = fn
        self.patched.append(mod)

    def _lora_forward(self, m: str, lay: torch.nn.Module) -> Callable:
        base, drop = lay.base_layer, lay.lora_dropout[self.name]
        B, s, K = self.stacks.B[m], self.stacks.s[m], self.stacks.K

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = base(x, *args, **kwargs)  # under autocast (engine.precision=bf16): the base in bf16
            A = self.A[m]

            def delta(xg: torch.Tensor, sel, r: int) -> torch.Tensor:
                # The run's live components only: the padding r..R never enters a matmul.
                if sel == slice(0, K) and r == A.shape[1]:
                    a, b, sc = A, B, s
                else:
                    a, b, sc = _take(A, sel)[:, :r], _take(B, sel)[:, :, :r], _take(s, sel)
                if self.per_example is not None:  # DP-SGD: every example's own factor gradients
                    n = self.rows_per_member(sel)
                    members = range(sel.start, sel.stop) if isinstance(sel, slice) else sel.tolist()
                    want_A = not all(self.stacks.frozen[k] for k in members)
                    return _LoraPerExample.apply(xg, a, b, sc, n, self._sink(sel, (("A", m), ("B", m))), want_A)
                return _linear(_linear(xg, a), b) * sc.view(-1, 1, 1)  # peft's (x Aᵀ) Bᵀ · s

            with torch.autocast(x.device.type, enabled=False):  # the clients' LoRA in the adapter's dtype
                out = self.rows.apply(drop(x.to(B.dtype)), self.runs[m], delta)
            return (result + out).to(result.dtype)

        return forward

    def _head_forward(self, template: torch.nn.Module, tensors: list[tuple[str, str]]) -> Callable:
        stacks = self.stacks.head
        linear = isinstance(template, torch.nn.Linear) and {p for _, p in tensors} <= {"weight", "bias"}
        names = dict((p, h) for h, p in tensors)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):  # the clients' heads in their own dtype
                return head(x, *args, **kwargs)

        def head(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            rows = self.rows
            if linear and not args and not kwargs:
                W, b = stacks[names["weight"]], stacks[names["bias"]] if "bias" in names else None
                if self.per_example is not None:  # DP-SGD: every example's own head gradients
                    keys = (("head", names["weight"]), ("head", names["bias"]) if b is not None else None)
                    return rows.apply(x.to(W.dtype), rows.groups, lambda xg, sel, _: _LinearPerExample.apply(
                        xg, _take(W, sel), None if b is None else _take(b, sel), self.rows_per_member(sel), self._sink(sel, keys)))
                return rows.apply(x.to(W.dtype), rows.groups, lambda xg, sel, _: _linear(xg, _take(W, sel), None if b is None else _take(b, sel)))
            if self.per_example is not None:
                raise CohortError(
                    f"privacy.mode=sample: the head {template.__class__.__name__} is not a Linear layer; "
                    "the cohort engine clips per-example gradients of Linear heads only"
                )
            outs = []
            for k, xk in zip(rows.members, rows.split(x)):
                params = {p: stacks[h][k] for h, p in tensors}
                outs.append(torch.func.functional_call(template, params, (xk, *args), kwargs))
            return torch.cat(outs, dim=0)

        return forward


# ----------------------------------------------------------------------------------------- batches


def _collate(lm: LoadedModel, batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Right-pad each client's batch to the cohort's longest row and concatenate; the labels apart."""
    T = max(b["input_ids"].shape[1] for b in batches)
    fills = {"input_ids": lm.tokenizer.pad_token_id, "labels": -100}
    cat: dict[str, torch.Tensor] = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key]
            if t.dim() == 2 and not (key == "labels" and lm.task == "classification") and t.shape[1] < T:
                t = F.pad(t, (0, T - t.shape[1]), value=fills.get(key, 0))
            parts.append(t)
        cat[key] = torch.cat(parts, dim=0)
    labels = cat.pop("labels")
    real = int(torch.stack([b["attention_mask"].sum() for b in batches]).sum())  # one device sync
    alone = sum(b["input_ids"].numel() for b in batches)
    stats = {"tokens": real, "slots": cat["input_ids"].numel(), "slots_alone": alone}
    return cat, labels, stats


def _loss(lm: LoadedModel, lg: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """The loss of one batch's rows, as the model computes it for that batch alone."""
    if lm.task == "classification":  # transformers' single-label loss: mean cross-entropy
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1))
    base = lm.model.get_base_model()  # the model's own causal-LM loss (shift, ignore -100, mean over predicted tokens)
    return base.loss_function(logits=lg, labels=lb, vocab_size=base.config.vocab_size)


def _client_losses(lm: LoadedModel, logits: torch.Tensor, labels: torch.Tensor, rows: _Rows) -> list[torch.Tensor]:
    """Each client's loss on its own rows, as the model computes it for that client's batch alone."""
    return [_loss(lm, lg, lb) for lg, lb in zip(rows.split(logits), rows.split(labels))]


def _dp_chunked(lm: LoadedModel, logits: torch.Tensor, labels: torch.Tensor, rows: _Rows, size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """DP-SGD with ``grad_accum_steps > 1``: each client's logical batch in chunks of ``size`` rows,
    as the per-client engine's virtual steps run it: per client ``Σ_c n_c · loss_c`` (what Opacus's
    per-example gradients are the gradients of) and its loss, the chunks' mean weighted by rows."""
    objectives, values = [], []
    for lg, lb in zip(rows.split(logits), rows.split(labels)):
        n = lg.shape[0]
        parts = [(min(size, n - i), _loss(lm, lg[i : i + size], lb[i : i + size])) for i in range(0, n, size)]
        objectives.append(torch.stack([c * v for c, v in parts]).sum())
        values.append(parts[0][1] if len(parts) == 1 else torch.stack([c * v.detach() for c, v in parts]).sum() / n)
    return objectives, values


def _clip_per_client(stacks: "_Stacks", max_norm: float) -> None:
    """``train.max_grad_norm`` per client: client k's global gradient norm over its own slices of
    the stacks (``clip_grad_norm_``'s norm of the per-tensor norms; the zero padding adds nothing),
    its slices scaled by ``min(1, max_norm / (norm + 1e-6))`` as ``clip_grad_norm_`` scales alone."""
    grads = [t.grad for t in stacks.params() if t.grad is not None]
    if not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads], dim=1)
    coef = (max_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))


# ----------------------------------------------------------------------------------------- DP-SGD


class _PoissonSampler:
    """One client's DP-SGD batches, drawn exactly as the per-client engine's Opacus loader draws
    them after ``torch.manual_seed(seed)`` (``clients.train._dp_steps``): a ``DPDataLoader`` over
    n examples at ``sample_rate = 1 / ceil(n / min(batch_size, n))``, whose iterator draws a base
    seed when it starts a pass, then one Poisson mask (``rand(n) < rate``) per batch for
    ``int(1 / rate)`` batches; an empty batch is skipped. The client's noise is drawn from the same
    stream (on a GPU, from the device's generator with the same seed), after its mask, as Opacus
    draws it from the default generator: a client's whole DP-SGD run equals the per-client
    engine's draw for draw."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n = n
        self.rate = 1 / math.ceil(n / min(batch_size, n))  # DPDataLoader.from_data_loader: 1 / len(data_loader)
        self.steps = int(1 / self.rate)  # UniformWithReplacementSampler: batches per pass
        self.expected = int(n * self.rate)  # PrivacyEngine: the expected batch size the sum is divided by
        self.g = torch.Generator().manual_seed(seed)
        self.noise_g = self.g if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
        self.left = 0

    def next(self) -> list[int]:
        while True:
            if self.left == 0:  # a new pass: the DataLoader iterator's base seed
                torch.empty((), dtype=torch.int64).random_(generator=self.g)
                self.left = self.steps
            mask = torch.rand(self.n, generator=self.g) < self.rate
            self.left -= 1
            idx = mask.nonzero(as_tuple=False).reshape(-1).tolist()
            if idx:
                return idx


def _param_keys(lm: LoadedModel, flags: list[tuple[torch.nn.Parameter, bool]]) -> list[tuple[str, str]]:
    """The trained tensors in the order the per-client engine's optimizer (and so Opacus) lists
    them, ``model.parameters()``: ``("A", module)``, ``("B", module)``, ``("head", name)``."""
    from peft.utils.other import ModulesToSaveWrapper

    name = active(lm)
    ids = {}
    for m in lm.modules:
        lay = layer(lm, m)
        ids[id(lay.lora_A[name].weight)] = ("A", m)
        ids[id(lay.lora_B[name].weight)] = ("B", m)
    for h in lm.head:
        parts = h.split(".")
        for i in range(len(parts) - 1, 0, -1):
            mod = lm.model.get_submodule(PREFIX + ".".join(parts[:i]))
            if isinstance(mod, ModulesToSaveWrapper):
                ids[id(mod.modules_to_save[name].get_parameter(".".join(parts[i:])))] = ("head", h)
                break
    return [ids[id(p)] for p, trains in flags if trains and id(p) in ids]


def _clip_and_noise(
    stacks: _Stacks, k: int, grads: dict[tuple[str, str], torch.Tensor], keys: list[tuple[str, str]], dp: DPSettings, sampler: _PoissonSampler
) -> None:
    """Client ``k``'s DP-SGD gradient, as Opacus's ``DPOptimizer.pre_step`` forms it: every
    example's gradient over all its trained tensors clipped to ``C`` (factor
    ``min(1, C / (‖g_i‖ + 1e-6))``), summed, plus ``N(0, (σC)²)`` per entry (in the tensors' order,
    skipping a frozen A), divided by the expected batch size; written into the client's live slices
    of the stacks' gradients (its padding keeps a zero gradient)."""
    keys = [key for key in keys if not (key[0] == "A" and stacks.frozen[k])]
    per = [grads[key] for key in keys]
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in per], dim=1).norm(2, dim=1)
    factor = (dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    std = dp.noise_multiplier * dp.max_grad_norm
    for (kind, name), g in zip(keys, per):
        summed = torch.einsum("i,i...", factor.to(g.dtype), g)
        if std > 0:
            summed = summed + torch.normal(mean=0, std=std, size=summed.shape, device=summed.device, generator=sampler.noise_g, dtype=summed.dtype)
        grad = summed / sampler.expected
        target = stacks.A[name] if kind == "A" else stacks.B[name] if kind == "B" else stacks.head[name]
        if target.grad is None:
            target.grad = torch.zeros_like(target)
        if kind == "A":
            target.grad[k, : grad.shape[0]] = grad
        elif kind == "B":
            target.grad[k, :, : grad.shape[1]] = grad
        else:
            target.grad[k] = grad


# ----------------------------------------------------------------------------------------- train


def train_cohort(
    lm: LoadedModel,
    jobs: Sequence[CohortJob | Sequence[Any]],
    settings: TrainSettings,
    *,
    pad_tolerance: float | None = 0.1,
    max_tokens: int | None = None,
    autocast: torch.dtype | None = None,
) -> list[tuple[ClientUpdate, dict[str, float]]]:
    """Train K clients together over ``lm``'s frozen base; per client what ``train`` returns.

    ``autocast=torch.bfloat16`` (``engine.precision=bf16``): the frozen base runs under
    ``torch.autocast`` in bf16 (on GPU, its matmuls on the tensor cores), while the clients' LoRA
    deltas, heads, losses, gradients and optimizer states stay in the adapter's dtype (float32).

    Each step runs one forward/backward pass over the clients' batches concatenated, or several
    (gradients accumulated, then one optimizer step; exact either way, since a client's gradient
    comes from its own rows only): clients are taken longest batch first, and a client whose batch
    is shorter than ``(1 − pad_tolerance)`` × the pass's longest starts a new pass, so that short
    batches are not padded to long ones (``pad_tolerance=None``: always one pass); ``max_tokens``
    caps a pass's token slots (rows × length; memory), a client's batch being never split.

    Metrics per client: ``train_loss`` / ``train_loss_first`` / ``train_loss_last`` (its own mean
    loss per step, as alone), ``rank_after_pruning`` (HetLoRA), ``train_seconds`` (the cohort's wall
    time, shared by its clients), ``cohort_size``, ``cohort_passes`` (forward passes per step, on
    average), ``pad_fraction`` (share of the cohort's token slots that are padding, over all steps)
    and ``pad_fraction_alone`` (the same share had each client's batches run alone, i.e. the
    per-client engine's padding), ``peak_memory_mb`` (on CUDA the device's peak allocated memory
    during the cohort; on CPU the process's peak resident memory so far).
    """
    results, _ = _train(lm, [as_job(j) for j in jobs], settings, pad_tolerance=pad_tolerance, max_tokens=max_tokens, autocast=autocast)
    return results


def _has_dropout(lm: LoadedModel) -> bool:
    """Whether training draws random masks: an ``nn.Dropout`` with p > 0 or attention dropout in the config."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm.model.modules()):
        return True
    return float(getattr(lm.model.get_base_model().config, "attention_dropout", 0.0) or 0.0) > 0  # Llama-style attention reads it directly


def _passes(lengths: list[int], counts: list[int], pad_tolerance: float | None, max_tokens: int | None) -> list[list[int]]:
    """The step's forward passes: lists of stack indices (ascending, i.e. by rows then rank)."""
    if pad_tolerance is not None and not 0.0 <= pad_tolerance <= 1.0:
        raise CohortError(f"engine.pad_tolerance must be in [0, 1], got {pad_tolerance}")
    out: list[list[int]] = []
    cur: list[int] = []
    T = 0
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        short = pad_tolerance is not None and lengths[k] < (1.0 - pad_tolerance) * T
        full = max_tokens is not None and (sum(counts[c] for c in cur) + counts[k]) * T > max_tokens
        if cur and (short or full):
            out.append(sorted(cur))
            cur = []
        if not cur:
            T = lengths[k]
        cur.append(k)
    out.append(sorted(cur))
    return out


def _train(
    lm: LoadedModel, jobs: list[CohortJob], settings: TrainSettings, *, pad_tolerance: float | None = 0.1, max_tokens: int | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[list[tuple[ClientUpdate, dict[str, float]]], _Stacks]:
    t0 = time.perf_counter()
    if autocast not in (None, torch.bfloat16):
        raise CohortError(f"engine.precision: the cohort engine autocasts to bf16 only, not {autocast}")
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    check_model(lm)
    _check_jobs(lm, jobs)
    try:
        check_settings(settings, jobs[0].dp is not None)
    except ValueError as e:
        raise CohortError(str(e)) from None
    if settings.gradient_checkpointing and _has_dropout(lm):
        raise CohortError("train.gradient_checkpointing: the cohort engine draws each client's dropout masks from its own stream, "
                          "which a recomputed forward would draw again; use engine.kind=per_client or a model without dropout")
    checkpointing(lm, settings.gradient_checkpointing)
    K = len(jobs)
    given = jobs
    # Stacked in order of rows per step, then rank (stable): a pass's equal rows and ranks are runs.
    counts = [min(settings.batch_size, len(j.data)) for j in given]
    starts = [_start(lm, j) for j in given]
    order = sorted(range(K), key=lambda k: (-counts[k], -starts[k][lm.modules[0]].rank))
    jobs = [given[i] for i in order]
    counts = [counts[i] for i in order]
    starts = [starts[i] for i in order]
    stacks = _Stacks(lm, jobs, starts)
    stacks.order = order
    opt = make_optimizer(stacks.params(), settings)
    pruning = any(stacks.prune)
    if pruning:
        with torch.no_grad():
            start_term = stacks.tail_term(stacks.effective_A()).tolist()
    model = lm.model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    devices = [lm.device] if lm.device.type == "cuda" else []
    seed = given[0].seed if K == 1 else hash(tuple(j.seed for j in given)) % (2**31)
    dp = jobs[0].dp is not None
    if dp:
        samplers = [_PoissonSampler(len(j.data), settings.logical_batch, j.seed, lm.device) for j in jobs]
        keys = _param_keys(lm, flags)
        streams = _Streams([smp.g for smp in samplers], lm.device, [smp.noise_g for smp in samplers])
    else:
        orders = [batch_order(len(j.data), settings.local_steps * settings.grad_accum_steps, settings.batch_size, j.seed) for j in jobs]
        streams = _Streams.seeded([j.seed for j in jobs], lm.device)
    losses: list[list[float]] = [[] for _ in jobs]
    totals = {"tokens": 0, "slots": 0, "slots_alone": 0, "passes": 0}
    try:
        for p, _ in flags:  # only the stacks train: no gradient for the base, peft's own adapter or head
            p.requires_grad_(False)
        model.train()
        with torch.random.fork_rng(devices=devices), _Forward(lm, stacks) as fwd:
            torch.manual_seed(seed)
            fwd.streams = streams
            if dp and not fwd.linear_heads():
                raise CohortError("privacy.mode=sample: the cohort engine clips per-example gradients of Linear heads only")
            accum = settings.grad_accum_steps
            chunked = dp and accum > 1  # DP-SGD's logical batch, its loss in chunks as the per-client engine's virtual steps
            for _ in range(settings.local_steps):
                step_losses: list[list[float]] = [[] for _ in jobs]
                for _micro in range(1 if dp else accum):
                    if dp:  # each client's Poisson sample, drawn as the per-client engine's Opacus loader draws it
                        batches = [encode(lm, j.data[smp.next()]) for j, smp in zip(jobs, samplers)]
                        counts = [b["input_ids"].shape[0] for b in batches]
                        fwd.per_example = {}
                    else:
                        batches = [encode(lm, j.data[next(o)]) for j, o in zip(jobs, orders)]
                        if [b["input_ids"].shape[0] for b in batches] != counts:
                            raise RuntimeError(f"cohort engine: batch sizes {[b['input_ids'].shape[0] for b in batches]} differ from the planned {counts}")
                    for members in _passes([b["input_ids"].shape[1] for b in batches], counts, pad_tolerance, max_tokens):
                        inputs, labels, stats = _collate(lm, [batches[k] for k in members])
                        for key in stats:
                            totals[key] += stats[key]
                        totals["passes"] += 1
                        rows = _Rows(members, [counts[k] for k in members], lm.device, [batches[k]["input_ids"].shape[1] for k in members])
                        fwd.set_rows(rows)
                        with torch.autocast(lm.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                            logits = model(**inputs).logits
                        if chunked:
                            objectives, per_client = _dp_chunked(lm, logits, labels, rows, settings.batch_size)
                        else:
                            per_client = _client_losses(lm, logits, labels, rows)
                        values = torch.stack([v.detach() for v in per_client]).tolist()
                        for k, v in zip(members, values):
                            if not (v == v and abs(v) != float("inf")):
                                raise FloatingPointError(f"client {jobs[k].client_id}: training loss became {v}")
                            step_losses[k].append(v)
                        if chunked:
                            torch.stack(objectives).sum().backward()
                        elif dp:  # Opacus's per-sample gradients are those of n × the batch's mean loss
                            torch.stack([v * counts[k] for k, v in zip(members, per_client)]).sum().backward()
                        elif accum > 1:
                            (torch.stack(per_client).sum() / accum).backward()
                        else:
                            torch.stack(per_client).sum().backward()
                for k, ls in enumerate(step_losses):
                    losses[k].append(ls[0] if len(ls) == 1 else sum(ls) / len(ls))
                if dp:
                    for k, job in enumerate(jobs):
                        _clip_and_noise(stacks, k, fwd.per_example[k], keys, job.dp, samplers[k])
                    fwd.per_example = None
                if pruning:  # HetLoRA's term reads no data: its own backward, into the same gradients
                    (stacks.lam * stacks.tail_term(stacks.effective_A())).sum().backward()
                if settings.max_grad_norm is not None:
                    _clip_per_client(stacks, settings.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.eval()
    if pruning:
        with torch.no_grad():
            end_term = stacks.tail_term(stacks.effective_A()).tolist()
    seconds = time.perf_counter() - t0
    if lm.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(lm.device) / 2**20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    pad = 1.0 - totals["tokens"] / max(totals["slots"], 1)
    pad_alone = 1.0 - totals["tokens"] / max(totals["slots_alone"], 1)
    results = []
    for k, job in enumerate(jobs):
        adapter = stacks.factors(k)
        ls = losses[k]
        metrics: dict[str, float] = {"train_loss": sum(ls) / len(ls), "train_loss_first": ls[0], "train_loss_last": ls[-1],
                                     **truncation_metrics(lm, job.data)}
        if stacks.prune[k]:
            rank = stacks.ranks[lm.modules[0]][k]
            new_rank = stacks.prune[k].rank_after(rank, start_term[k], end_term[k])
            metrics["rank_after_pruning"] = new_rank
            if new_rank < rank:
                adapter = {m: truncate(f, new_rank) for m, f in adapter.items()}
        metrics.update({"train_seconds": seconds, "cohort_size": K, "cohort_passes": totals["passes"] / settings.local_steps,
                        "pad_fraction": pad, "pad_fraction_alone": pad_alone, "peak_memory_mb": peak_mb})
        head = {h: stacks.head[h][k].detach().cpu().clone() for h in lm.head}
        results.append((ClientUpdate(client_id=job.client_id, adapter=adapter, head=head, num_examples=len(job.data)), metrics))
    back = [None] * K  # the callers' order
    for i, res in zip(order, results):
        back[i] = res
    return back, stacks

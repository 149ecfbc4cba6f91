"""The server's evaluation of a global model: each round (:class:`fedpeft.serverapp.Federation`)
and after the run, on a saved adapter (``fedpeft eval RUN_DIR [round=k]``: :func:`evaluate_run`).

Which evaluation a held-out set gets depends on its rows: instruction rows (``prompt`` /
``response``: :func:`fedpeft.generate.evaluate`) get the response loss and perplexity and the
generative metrics; text rows get ``clients.train.evaluate`` (accuracy and loss for
classification, token loss and perplexity for a causal LM), as they always have.

A saved adapter (``adapters/round_NNN``, peft format) is the whole global model on the run's base
``W_0``: the server's evaluation model never merges anything into its base, and the adapter it saves
carries FLoRA's merges, FedEx-LoRA's residuals and FeDeRA's fold stacked into it
(:func:`fedpeft.server.global_adapter`). So re-evaluating needs only the base as the run built it
(:func:`fedpeft.models.build`: its dtype and quantization) and the adapter loaded with peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedpeft.config import ConfigError

# What `fedpeft eval` may change in a run's config: how it evaluates, never what was trained.
EVAL_KEYS = ("eval.", "data.eval_samples", "model.eval_batch_size", "engine.device")


def server_metrics(lm: Any, test: Any, cfg: DictConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The global model's metrics on the held-out rows ``test`` and the samples to log (generated
    rows; none for text data): :func:`fedpeft.generate.evaluate` for instruction rows,
    ``clients.train.evaluate`` for text rows."""
    from fedpeft import generate

    if generate.is_instruction(test):
        return generate.evaluate(lm, test, cfg.eval, cfg.model.eval_batch_size, cfg.seed)
    from clients.train import evaluate

    return evaluate(lm, test, cfg.model.eval_batch_size), []


def saved_rounds(run_dir: Path) -> list[int]:
    """The rounds whose adapter the run saved (``adapters/round_NNN``; a half-written ``.tmp`` is not one)."""
    out = []
    for d in (Path(run_dir) / "adapters").glob("round_*"):
        tail = d.name[len("round_"):]
        if d.is_dir() and tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def spans(rounds: list[int]) -> str:
    """``0-3, 5`` for rounds ``[0, 1, 2, 3, 5]``."""
    out, start = [], None
    for i, r in enumerate(rounds):
        if start is None:
            start = r
        if i + 1 == len(rounds) or rounds[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The config of the run in ``run_dir`` (its ``config.yaml``) with ``KEY=VALUE`` overrides of
    the :data:`EVAL_KEYS` only, validated. One-line :class:`ConfigError` for anything else."""
    from fedpeft.config import config_error_line, reset_unread, typed, validate

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"eval: {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"eval: {run_dir} is not a fedpeft run directory (no config.yaml)")
    for word in overrides:
        key = word.split("=", 1)[0]
        if "=" not in word or not any(key.startswith(k) if k.endswith(".") else key == k for k in EVAL_KEYS):
            raise ConfigError(f"eval: {word!r}: only round=K, eval.*, data.eval_samples, model.eval_batch_size and engine.device "
                              "can be given (the rest is the run's own config)")
    try:
        original = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        saved = OmegaConf.create(reset_unread(original, warn=False))  # a key its strategy did not read: as it ran, at its default
        cfg = typed(OmegaConf.to_container(OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))))
    except ConfigError as e:
        raise ConfigError(f"eval: {e}") from None
    except Exception as e:  # a broken config.yaml, a bad override value
        raise ConfigError(f"eval: {run_dir / 'config.yaml'}: {config_error_line(e)}") from e
    validate(cfg)
    reset_unread(original)  # the warning naming each such key (not before a refusal's one line)
    return cfg


@dataclass
class Evaluation:
    """What :func:`evaluate_run` found: the round, its metrics and samples, and the run's own
    metrics row of that round (empty when ``metrics.jsonl`` has none)."""

    run_dir: Path
    round: int
    examples: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    logged: dict[str, Any] = field(default_factory=dict)


def load_saved_adapter(lm: Any, adapter_dir: Path, name: str = "saved") -> None:
    """Load the peft adapter saved at ``adapter_dir`` into ``lm``'s model as adapter ``name`` and
    activate it; every tensor of the file must land in the model unchanged (else a one-line
    :class:`fedpeft.models.ModelError` naming the directory)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from fedpeft.models import ModelError

    weights = adapter_dir / "adapter_model.safetensors"
    try:
        if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
            raise FileNotFoundError(f"no {'adapter_config.json' if weights.is_file() else weights.name}")
        saved = load_file(str(weights))
        lm.model.load_adapter(str(adapter_dir), adapter_name=name)
        lm.model.set_adapter(name)
    except Exception as e:  # a damaged file: safetensors' header error, peft's size mismatch, bad JSON, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"eval: the adapter in {adapter_dir} could not be loaded ({type(e).__name__}: {first})") from None
    held = get_peft_model_state_dict(lm.model, adapter_name=name)
    wrong = sorted(set(saved) ^ set(held)) or [k for k in saved if not torch.equal(held[k].detach().cpu(), saved[k].to(held[k].dtype))]
    if wrong:
        raise ModelError(f"eval: the adapter in {adapter_dir} does not fit the run's model (tensor {wrong[0]!r})")
    lm.model.to(lm.device).eval()


def evaluate_run(run_dir: Path, server_round: int | None = None, overrides: list[str] | None = None) -> Evaluation:
    """Re-evaluate the adapter a run saved after ``server_round`` (default: its last saved round) on
    the run's held-out set, as the server evaluated it (:func:`server_metrics`), with ``eval.*``
    (and the other :data:`EVAL_KEYS`) from ``overrides``."""

    import strategies
    from fedpeft.models import build
    from fedpeft.preflight import prepare_data

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, list(overrides or []))
    if strategies.REGISTRY[cfg.strategy.name].personalized:
        raise ConfigError(f"eval: strategy={cfg.strategy.name} is personalised: each client evaluated its own model, "
                          "and the saved global adapter alone is no client's model")
    rounds = saved_rounds(run_dir)
    if server_round is None:
        if not rounds:
            why = " (the run had tracking.save_adapters=false)" if not cfg.tracking.save_adapters else ""
            raise ConfigError(f"eval: {run_dir} has no saved adapter (no adapters/round_NNN){why}")
        server_round = rounds[-1]
    elif server_round not in rounds:
        raise ConfigError(f"round: round {server_round} of {run_dir} was not saved (no adapters/round_{server_round:03d}); "
                          f"saved rounds: {spans(rounds) or 'none'}")
    _, _, test, num_labels = prepare_data(cfg)
    lm = build(cfg.model, num_labels=num_labels, device=cfg.engine.device, seed=cfg.seed, peft_cfg=cfg.peft)
    load_saved_adapter(lm, run_dir / "adapters" / f"round_{server_round:03d}")
    metrics, samples = server_metrics(lm, test, cfg)
    return Evaluation(run_dir, server_round, len(test), metrics, samples, logged_row(run_dir / "metrics.jsonl", server_round))


def logged_row(path: Path, server_round: int) -> dict[str, Any]:
    """The run's own metrics row of ``server_round`` from ``metrics.jsonl``, for comparison only: a
    half-written last row is left out (:func:`fedpeft.durable.metrics_rows`), and a file damaged
    elsewhere gives no row with a warning naming the line — it never costs the re-evaluation."""
    from fedpeft.durable import log, metrics_rows

    try:
        rows = metrics_rows(path)
    except ConfigError as e:
        log.warning("%s; the run's logged values are not shown", e)
        return {}
    return next((r for r in rows if r["round"] == server_round), {})


def table(ev: Evaluation) -> str:
    """The metrics of ``ev`` as a text table, beside the values the run logged for that round."""
    keys = list(ev.metrics)
    width = max(len(k) for k in keys + ["metric"])
    head = f"{'metric':<{width}}  {'re-evaluated':>12}  {f'run, round {ev.round}':>14}"
    lines = [head, "-" * len(head)]
    for k in keys:
        logged = ev.logged.get(k)
        shown = "—" if not isinstance(logged, (int, float)) else f"{logged:.4f}"
        lines.append(f"{k:<{width}}  {ev.metrics[k]:>12.4f}  {shown:>14}")
    return "\n".join(lines)

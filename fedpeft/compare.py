"""``fedpeft compare``: one table and two plots from many run directories.

    fedpeft compare PATH... [--metric NAME] [--baseline GROUP] [--out DIR] [--title T] [--format png,pdf,svg]

A PATH is a run directory, a folder holding run directories at any depth (an experiment, a Hydra
multirun), a quoted glob, or an experiment name (``runs/<name>``). Runs are grouped by the config
keys that differ among them (``seed`` and bookkeeping keys aside); the runs of a group are its
seeds, and each group gets the mean ± sample std over its seeds. With ``--baseline GROUP`` every
other group also gets the paired difference of its final metric from the baseline's, run against run
at the same seed, with a 95% Student-t interval over the seeds both have. Only complete runs (``summary.json``
with status ``finished`` and every round of ``config.rounds``) enter the aggregates; every other
run is listed, with the reason, never dropped silently.

The Python API the experiment scripts use::

    runs, problems = load_runs(["runs/my_sweep"])
    groups = group_runs(runs, "accuracy")
    md = write_report(groups, problems, Path("runs/my_sweep/compare"), "accuracy", "My sweep",
                      baseline=find_group(groups, "strategy=fedavg"))
    mean, lo, hi = paired_interval([0.02, 0.01, 0.03])  # the 95% t-interval of paired differences
"""

from __future__ import annotations

import argparse
import csv
import functools
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.metrics import best_row, lower_is_better, total_mb

MARKERS = ("config.yaml", "metrics.jsonl", "summary.json")
SKIP_DIRS = {"wandb", "adapters", "state", "compare"}  # never runs themselves (hidden dirs are skipped too)
# Settings named in the report when every run shares them.
CONTEXT_KEYS = ("data.name", "model.name", "model.task", "model.rank", "partition.kind", "clients", "fraction", "rounds",
                "train.local_steps")


class CompareError(ValueError):
    """Bad input to ``fedpeft compare``; the message is one line."""


@dataclass
class Run:
    """One run directory. ``status``: complete | missing | partial | unreadable (| excluded: no value of the metric)."""

    path: Path
    config: dict[str, Any]  # flattened: dotted keys, lists as their JSON string
    history: list[dict[str, Any]]  # one row per round, round 0 first
    summary: dict[str, Any] | None
    status: str = "complete"
    reason: str = ""

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def values(self, metric: str) -> list[tuple[int, float]]:
        """``(round, value)`` of ``metric`` for every round that has it."""
        return [(int(r["round"]), float(r[metric])) for r in self.history if isinstance(r.get(metric), (int, float))]

    def final(self, metric: str) -> float:
        vals = self.values(metric)
        return vals[-1][1] if vals else math.nan

    def best(self, metric: str) -> float:
        """Best value over the trained rounds (:func:`best_row`)."""
        row = best_row(self.history, metric)
        return math.nan if row is None else float(row[metric])

    def mb(self, direction: str) -> float:
        return total_mb(self.history, direction)

    def cumulative_mb_up(self) -> list[tuple[int, float]]:
        total, out = 0.0, []
        for r in self.history:
            total += float(r.get("bytes_up") or 0)
            out.append((int(r["round"]), total / 1e6))
        return out

    @property
    def seconds(self) -> float:
        s = (self.summary or {}).get("seconds")
        return float(s) if isinstance(s, (int, float)) else math.nan

    def failed_rounds(self) -> list[tuple[int, int, int]]:
        """``(round, clients failed, clients sampled)`` of every round where a client failed."""
        return [(int(r["round"]), int(r["clients_failed"]), int(r.get("clients_sampled") or 0))
                for r in self.history if isinstance(r.get("clients_failed"), (int, float)) and r["clients_failed"] > 0]

    @property
    def s_per_round(self) -> float:
        """Median of ``round_seconds`` over the trained rounds (robust to one slow round, e.g. the
        first one's warm-up); nan when no round recorded it."""
        vals = [float(r["round_seconds"]) for r in self.history if r.get("round", 0) and isinstance(r.get("round_seconds"), (int, float))]
        return float(np.median(vals)) if vals else math.nan

    @property
    def params(self) -> float:
        """Parameters a client trains and sends (``summary.trainable_params``; nan for older runs)."""
        n = (self.summary or {}).get("trainable_params")
        return float(n) if isinstance(n, (int, float)) else math.nan

    @property
    def majority_rate(self) -> float | None:
        """The test set's majority-class rate (``summary.majority_rate``; classification only)."""
        m = (self.summary or {}).get("majority_rate")
        return float(m) if isinstance(m, (int, float)) else None

    def personalised(self, metric: str) -> bool:
        """Whether ``metric`` is the mean over clients of each client's own model on its own split
        (a personalised strategy such as FedSA-LoRA logs it as ``personal/<metric>_mean``), not one
        global model on the shared test set."""
        return any(f"personal/{metric}_mean" in r for r in self.history)

    @property
    def epsilon(self) -> float | None:
        """ε spent (``summary.privacy.epsilon``), None without DP."""
        privacy = (self.summary or {}).get("privacy")
        if not isinstance(privacy, dict) or privacy.get("epsilon") is None:
            return None
        return float(privacy["epsilon"])


@dataclass
class Group:
    """Runs with equal values of every grouping key; their seeds are the repetitions."""

    label: str
    values: dict[str, Any]  # grouping key → value
    runs: list[Run] = field(default_factory=list)
    metric: str = "accuracy"
    shown: list[str] = field(default_factory=list)  # the grouping keys its label names (:func:`label_keys`)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        return sorted((r.seed for r in self.runs), key=lambda s: (str(type(s)), s))

    def stat(self, what: str) -> tuple[float, float]:
        """(mean, sample std) over the seeds of ``final`` or ``best``; std is nan for n = 1."""
        return mean_std([getattr(r, what)(self.metric) for r in self.runs])

    def by_seed(self, what: str = "final") -> dict[str, float]:
        """Seed → ``final`` or ``best`` metric (the mean of the runs that repeat a seed)."""
        out: dict[str, list[float]] = {}
        for r in self.runs:
            out.setdefault(show(r.seed), []).append(getattr(r, what)(self.metric))
        return {s: float(np.mean(v)) for s, v in out.items()}

    @property
    def personalised(self) -> bool:
        return any(r.personalised(self.metric) for r in self.runs)

    def mean(self, what: str) -> float:
        """Mean over the seeds of ``mb_up``, ``mb_down``, ``seconds``, ``s_per_round`` or ``params``
        (``params`` and ``s_per_round``: over the runs that recorded it; runs of one group train the
        same tensors, and older runs lack it)."""
        if what in ("params", "s_per_round"):
            known = [getattr(r, what) for r in self.runs if not math.isnan(getattr(r, what))]
            return float(np.mean(known)) if known else math.nan
        vals = {"mb_up": lambda r: r.mb("up"), "mb_down": lambda r: r.mb("down"), "seconds": lambda r: r.seconds}[what]
        return float(np.mean([vals(r) for r in self.runs]))

    @property
    def epsilon(self) -> float | None:
        eps = [r.epsilon for r in self.runs if r.epsilon is not None]
        return float(np.mean(eps)) if eps else None

    def curve(self, x: str = "round") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, mean, std over seeds) of the metric per round; x is the round or the mean cumulative MB up."""
        per_round: dict[int, list[float]] = {}
        for run in self.runs:
            for r, v in run.values(self.metric):
                per_round.setdefault(r, []).append(v)
        rounds = sorted(per_round)
        mean = np.array([np.mean(per_round[r]) for r in rounds])
        std = np.array([np.std(per_round[r], ddof=1) if len(per_round[r]) > 1 else 0.0 for r in rounds])
        if x == "round":
            return np.array(rounds, dtype=float), mean, std
        cum: dict[int, list[float]] = {}
        for run in self.runs:
            for r, mb in run.cumulative_mb_up():
                cum.setdefault(r, []).append(mb)
        return np.array([np.mean(cum.get(r, [np.nan])) for r in rounds]), mean, std


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the ``level`` Student-t interval of the mean of paired differences,
    ``mean ± t(1 - (1 - level)/2, n - 1) · s / √n`` with ``s`` the sample std (ddof = 1); the quantile
    from ``scipy.stats.t``, so any number of pairs works. ``low`` and ``high`` are nan for n < 2."""
    arr = np.asarray(diffs, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, math.nan, math.nan
    from scipy import stats  # lazy: only for intervals

    half = float(stats.t.ppf(1 - (1 - level) / 2, arr.size - 1)) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, mean - half, mean + half


@dataclass
class Paired:
    """A group's final metric against the baseline's, run against run at the same seed."""

    seeds: list[str]  # the seeds both groups have
    mean: float  # mean of (group − baseline) over those seeds
    low: float  # the 95% t-interval (nan for fewer than 2 pairs)
    high: float

    @property
    def n(self) -> int:
        return len(self.seeds)

    def verdict(self, metric: str) -> str:
        """better | worse (the interval excludes 0) | not shown (it contains 0) | — (< 2 pairs)."""
        if math.isnan(self.low):
            return "—"
        if self.low <= 0 <= self.high:
            return "not shown"
        higher = self.low > 0
        return "worse" if higher == lower_is_better(metric) else "better"


def paired(group: Group, baseline: Group, what: str = "final") -> Paired:
    """:class:`Paired` of ``group`` against ``baseline`` (same seed: same partition, initialisation
    and client sampling)."""
    mine, theirs = group.by_seed(what), baseline.by_seed(what)
    seeds = sorted((s for s in mine if s in theirs), key=natural_seed)
    return Paired(seeds, *paired_interval([mine[s] - theirs[s] for s in seeds]))


def natural_seed(seed: str) -> tuple[int, Any]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


# ---------------------------------------------------------------------------------------------
# Finding and reading runs


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in MARKERS)


def find_run_dirs(root: Path) -> list[Path]:
    """``root`` if it is a run directory, else every run directory below it (not descending into a
    run directory, hidden folders or ``wandb/``, ``adapters/``, ``state/``, ``compare/``)."""
    if is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
    return found


def resolve_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """Every run directory the PATHs name (see the module docstring); a PATH naming none raises
    :class:`CompareError` naming it."""
    out: list[Path] = []
    for given in paths:
        text = str(given)
        if any(c in text for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
        elif Path(text).expanduser().exists():
            matches = [Path(text).expanduser()]
        elif os.sep not in text and (Path("runs") / text).is_dir():
            matches = [Path("runs") / text]  # an experiment name
        else:
            what = "no such run directory or folder" + ("" if os.sep in text else f", and no experiment runs/{text}")
            raise CompareError(f"{text}: {what}")
        dirs: list[Path] = []
        for m in matches:
            if m.is_file() and m.name in MARKERS:
                m = m.parent
            if m.is_dir():
                dirs.extend(find_run_dirs(m))
        if not dirs:
            raise CompareError(
                f"{text}: {'no match' if not matches else 'no fedpeft run directory there'} "
                "(a run directory holds config.yaml, metrics.jsonl or summary.json)"
            )
        out.extend(dirs)
    unique: dict[Path, Path] = {}
    for d in out:
        unique.setdefault(d.resolve(), d)
    return sorted(unique.values(), key=natural_key)


def natural_key(path: Path) -> list[Any]:
    """Sort ``multirun/2_x`` before ``multirun/10_x``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys → leaf values; a list becomes its compact JSON string."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        return {prefix[:-1]: json.dumps(list(tree), separators=(",", ":"))}
    return {prefix[:-1]: tree}


@functools.lru_cache(maxsize=1)
def schema_defaults() -> dict[str, Any]:
    """The config schema's defaults, flattened: what a key an older run's config lacks (fedpeft did
    not have it yet) stood for, as resume reads it (``serverapp.changed_keys``)."""
    # lazy: Hydra and OmegaConf (fedpeft.config) are for reading runs, not for `fedpeft compare --help`
    from omegaconf import OmegaConf

    from fedpeft.config import schema

    return flatten(OmegaConf.to_container(OmegaConf.structured(schema())))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and "round" in row:
            rows.append(row)
    return rows


def rounds_text(history: list[dict[str, Any]]) -> str:
    if not history:
        return "no round"
    first, last = history[0]["round"], history[-1]["round"]
    return f"rounds {first}–{last}" if first != last else f"round {first}"


def load_run(path: Path) -> Run:
    """Read one run directory and decide whether it is complete."""
    import yaml  # lazy: as in schema_defaults

    cfg_file, metrics_file, summary_file = (path / m for m in MARKERS)
    history = read_jsonl(metrics_file) if metrics_file.is_file() else []
    summary = None
    run = Run(path, {}, history, None)
    if not cfg_file.is_file():
        run.status, run.reason = "unreadable", "no config.yaml"
    else:
        try:
            tree = yaml.safe_load(cfg_file.read_text())
            if not isinstance(tree, dict):
                raise ValueError("not a mapping")
            run.config = {**schema_defaults(), **flatten(tree)}
        except Exception as e:
            run.status, run.reason = "unreadable", f"config.yaml unreadable: {' '.join(str(e).split())[:200]}"
    rounds = run.config.get("rounds")
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
            if not isinstance(summary, dict):
                raise ValueError("not an object")
        except Exception as e:
            if run.status == "complete":
                run.status, run.reason = "partial", f"summary.json unreadable ({' '.join(str(e).split())[:120]}); {rounds_text(history)} logged"
            return run
        run.summary = summary
        if isinstance(summary.get("history"), list) and summary["history"]:
            run.history = [r for r in summary["history"] if isinstance(r, dict) and "round" in r]
        if rounds is None:
            rounds = summary.get("rounds")
    if run.status != "complete":
        return run
    of = f" of {rounds}" if rounds is not None else ""
    if summary is None:
        last = f"metrics.jsonl holds {rounds_text(history)}{of}" if metrics_file.is_file() else "no metrics.jsonl"
        run.status, run.reason = "missing", f"no summary.json (crashed, still running or killed); {last}"
        return run
    status = summary.get("status")
    last = run.history[-1]["round"] if run.history else None
    if status != "finished":
        why = summary.get("error") or summary.get("stopped") or ""
        run.status = "partial"
        run.reason = f"status {status}" + (f": {' '.join(str(why).split())[:200]}" if why else "") + f"; {rounds_text(run.history)}{of} logged"
    elif rounds is not None and (last is None or last < int(rounds)):
        run.status, run.reason = "partial", f"finished with {rounds_text(run.history)}{of} logged"
    return run


def load_runs(paths: list[str | os.PathLike]) -> tuple[list[Run], list[Run]]:
    """``(complete runs, the others)`` under ``paths``; every other run carries its status
    (missing, partial, unreadable) and the reason. Raises :class:`CompareError` for a PATH that
    names no run directory."""
    runs, problems = [], []
    for d in resolve_paths(paths):
        run = load_run(d)
        (runs if run.status == "complete" else problems).append(run)
    return runs, problems


# ---------------------------------------------------------------------------------------------
# Grouping


def bookkeeping(key: str) -> bool:
    """Keys that never make two runs different experiments: the seed, tracking, engine, paths."""
    leaf = key.rsplit(".", 1)[-1].lower()
    return (key == "seed" or key.split(".")[0] in ("tracking", "engine", "hydra")
            or leaf in ("resume", "run_dir", "output_dir", "shared_dir")
            or bool(re.search(r"(^|_)(dir|path|file)$", leaf)))


def grouping_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values differ among ``runs`` (bookkeeping keys aside), in config order."""
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.config if k not in keys)
    missing = object()
    return [k for k in keys if not bookkeeping(k) and len({json.dumps(r.config.get(k, missing), default=repr) for r in runs}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """Leaf names where unambiguous (``strategy.name`` → ``strategy``, ``model.rank`` → ``rank``)."""

    def short(k: str) -> str:
        parts = k.split(".")
        if len(parts) > 1 and parts[-1] in ("name", "kind", "mode"):
            return parts[-2]
        return parts[-1]

    counts: dict[str, int] = {}
    for k in keys:
        counts[short(k)] = counts.get(short(k), 0) + 1
    return {k: short(k) if counts[short(k)] == 1 else k for k in keys}


def show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return json.dumps(value)


EPSILON = "privacy.target_epsilon"
# Kept in labels over keys they determine or that determine them (ε, not the σ derived from it).
PREFERRED = (EPSILON, "strategy.name", "peft.name", "model.name", "data.name")


def label_keys(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The grouping keys a label needs: a key whose value follows from the other keys' values (over
    these groups' ``rows``: ``strategy.weighting`` from ``strategy.name``, ``ranks.levels`` from
    ``ranks.kind``) is left out, trying the last keys first and :data:`PREFERRED` ones last, so labels
    stay distinct and short."""
    kept = list(keys)
    for k in sorted(reversed(keys), key=lambda k: k in PREFERRED):
        rest = [o for o in kept if o != k]
        if not rest:
            break
        seen: dict[str, str] = {}
        if all(seen.setdefault(json.dumps([row[o] for o in rest], default=repr), json.dumps(row[k], default=repr))
               == json.dumps(row[k], default=repr) for row in rows):
            kept = rest
    return kept


def label_value(key: str, value: Any, group: Group) -> str:
    """A value as a label shows it; a null ``privacy.target_epsilon`` is the ε the group spent (∞:
    no noise or no DP)."""
    if key == EPSILON and value is None:
        eps = group.epsilon
        return "∞" if eps is None or math.isinf(eps) else f"{eps:.3g}"
    return show(value)


def group_runs(runs: list[Run], metric: str) -> list[Group]:
    """Groups of ``runs`` (complete runs) by their grouping keys, in the order of first appearance,
    labelled by the keys that do not follow from others (:func:`label_keys`). A run without a value
    of ``metric`` raises :class:`CompareError` naming it."""
    for run in runs:
        if not run.values(metric):
            raise CompareError(f"{run.path}: no {metric!r} in its metrics")
    keys = grouping_keys(runs)
    groups: dict[str, Group] = {}
    for run in runs:
        values = {k: run.config.get(k) for k in keys}
        groups.setdefault(json.dumps(list(values.values()), default=repr), Group("", values, metric=metric)).runs.append(run)
    shown = label_keys(keys, [g.values for g in groups.values()])
    names = {**short_names(shown), **({EPSILON: "ε"} if EPSILON in shown else {})}
    for g in groups.values():
        g.shown = shown
        g.label = ", ".join(f"{names[k]}={label_value(k, g.values[k], g)}" for k in shown) or "all runs"
    return list(groups.values())


def find_group(groups: list[Group], text: str) -> Group:
    """The group ``text`` names: its label, or ``KEY=VALUE[,KEY=VALUE...]`` (full or short key
    names, e.g. ``strategy=fedavg,rank=4``) that only it matches; otherwise :class:`CompareError`
    listing the groups."""
    for g in groups:
        if g.label == text:
            return g
    names = short_names(list(groups[0].values)) if groups else {}
    wanted = [w.strip() for w in text.split(",") if w.strip()]

    def matches(g: Group) -> bool:
        for w in wanted:
            key, eq, value = w.partition("=")
            hits = [k for k in g.values if key.strip() in (k, names.get(k), "ε" if k == EPSILON else None)]
            if not eq or not hits or not any(value.strip() in (show(g.values[k]), label_value(k, g.values[k], g)) for k in hits):
                return False
        return bool(wanted)

    found = [g for g in groups if matches(g)]
    if len(found) == 1:
        return found[0]
    which = "matches several groups" if found else "matches no group"
    raise CompareError(f"--baseline {text}: {which}; the groups: " + "; ".join(g.label for g in (found or groups)))


def default_metric(runs: list[Run]) -> str:
    seen = {k for r in runs for row in r.history for k in row}
    return "accuracy" if "accuracy" in seen else "perplexity"


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}f}"


def pm(mean: float, std: float, digits: int = 4) -> str:
    return fmt(mean, digits) + ("" if math.isnan(std) else f" ± {fmt(std, digits)}")


def metric_digits(groups: list[Group]) -> int:
    finals = [abs(g.stat("final")[0]) for g in groups if not math.isnan(g.stat("final")[0])]
    return 2 if finals and max(finals) >= 10 else 4


PERSONAL_NOTE = ("† personalised: the metric is the mean over clients of each client's own model on its own split, "
                 "not one global model on the shared test set")


def table(groups: list[Group], metric: str, baseline: Group | None = None) -> str:
    """The markdown table; with ``baseline``, each group's paired difference from it (:func:`paired`)."""
    d = metric_digits(groups)
    direction = "min" if lower_is_better(metric) else "max"
    with_eps = any(g.epsilon is not None for g in groups)
    with_params = any(not math.isnan(g.mean("params")) for g in groups)
    head = ["group", "n", "seeds", f"final {metric}", f"best {metric} ({direction})"]
    head += (["Δ final vs baseline [95% CI]", "pairs", "vs baseline"] if baseline is not None else [])
    head += ["MB up", "MB down", "seconds", "s / round"] + (["trained params"] if with_params else []) + (["ε"] if with_eps else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        row = [g.label + (" †" if g.personalised else ""), str(g.n), ", ".join(show(s) for s in g.seeds), pm(*g.stat("final"), d),
               pm(*g.stat("best"), d)]
        if baseline is not None:
            if g is baseline:
                row += ["baseline", "", ""]
            else:
                pr = paired(g, baseline)
                ci = "" if math.isnan(pr.low) else f" [{pr.low:+.{d}f}, {pr.high:+.{d}f}]"
                row += ["—" if math.isnan(pr.mean) else f"{pr.mean:+.{d}f}{ci}", str(pr.n), pr.verdict(metric)]
        row += [fmt(g.mean("mb_up"), 2), fmt(g.mean("mb_down"), 2), fmt(g.mean("seconds"), 1), fmt(g.mean("s_per_round"), 1)]
        if with_params:
            row.append("—" if math.isnan(g.mean("params")) else f"{g.mean('params'):,.0f}")
        if with_eps:
            row.append(fmt(g.epsilon, 2))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def majority(groups: list[Group], metric: str) -> tuple[float, float, float] | None:
    """``(mean, min, max)`` of the runs' majority-class rates, where every run knows it and the
    metric is accuracy (the rate a constant prediction of the largest class scores)."""
    rates = [r.majority_rate for g in groups for r in g.runs]
    if metric not in ("accuracy", "personal/accuracy_mean") or not rates or any(m is None for m in rates):
        return None
    return float(np.mean(rates)), min(rates), max(rates)


def failure_lines(runs: list[Run], root: Path | None = None) -> list[str]:
    """The complete runs in which clients failed: they are in the aggregates, but those rounds
    averaged fewer clients than sampled (re-run them for a clean comparison)."""
    hit = [r for r in runs if r.failed_rounds()]
    if not hit:
        return []
    lines = ["", "Runs in which clients failed (in the aggregates; those rounds averaged fewer clients):"]
    for r in hit:
        rounds = "; ".join(f"round {n}: {f} of {k} failed" if k else f"round {n}: {f} failed" for n, f, k in r.failed_rounds())
        lines.append(f"- `{display(r.path, root)}` — {rounds}")
    return lines


def problem_lines(problems: list[Run], root: Path | None = None) -> list[str]:
    return [f"- {p.status}: `{display(p.path, root)}` — {p.reason}" for p in problems]


def display(path: Path, root: Path | None) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) if root else str(path)
    except ValueError:
        return str(path)


def shown_path(path: Path) -> Path:
    """``path`` relative to the current folder where it is under it (a report names no machine's
    absolute paths), else as it is."""
    cwd = Path.cwd()
    return path.relative_to(cwd) if path.is_relative_to(cwd) else path


def common_parent(paths: list[Path]) -> Path:
    """The folder the runs share; a single run's parent (never inside a run directory)."""
    if not paths:
        return Path(".")
    common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    while is_run_dir(common) and common.parent != common:
        common = common.parent
    return common


def write_csvs(groups: list[Group], problems: list[Run], out_dir: Path, metric: str,
               baseline: Group | None = None) -> tuple[Path, Path]:
    keys = list(groups[0].values) if groups else []
    num = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))  # noqa: E731
    group_csv = out_dir / "compare.csv"
    with group_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", *keys, "n", "seeds", f"{metric}_final_mean", f"{metric}_final_std", f"{metric}_best_mean",
                    f"{metric}_best_std", "mb_up", "mb_down", "seconds", "s_per_round", "epsilon", "trainable_params", "personalised",
                    "baseline", f"{metric}_final_diff_mean", f"{metric}_final_diff_ci95_low", f"{metric}_final_diff_ci95_high",
                    "pairs", "vs_baseline"])
        for g in groups:
            if baseline is None or g is baseline:
                vs = [baseline.label if baseline is not None else "", "", "", "", "", "baseline" if baseline is not None else ""]
            else:
                pr = paired(g, baseline)
                vs = [baseline.label, num(pr.mean), num(pr.low), num(pr.high), pr.n, pr.verdict(metric)]
            w.writerow([g.label, *(show(g.values[k]) for k in keys), g.n, " ".join(show(s) for s in g.seeds), *map(num, g.stat("final")),
                        *map(num, g.stat("best")), num(g.mean("mb_up")), num(g.mean("mb_down")), num(g.mean("seconds")), num(g.mean("s_per_round")),
                        num(g.epsilon), num(g.mean("params")), int(g.personalised), *vs])
    runs_csv = out_dir / "runs.csv"
    with runs_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "seed", "status", "in_aggregate", "last_round", f"{metric}_final", f"{metric}_best", "mb_up", "mb_down",
                    "seconds", "s_per_round", "epsilon", "reason", "path"])
        rows = [(g.label, r) for g in groups for r in g.runs] + [("", p) for p in problems]
        for label, r in rows:
            last = r.history[-1]["round"] if r.history else ""
            w.writerow([label, show(r.seed) if r.seed is not None else "", r.status, int(r.status == "complete"), last,
                        num(r.final(metric)), num(r.best(metric)), num(r.mb("up")), num(r.mb("down")), num(r.seconds), num(r.s_per_round),
                        num(r.epsilon), r.reason, str(r.path)])
    return group_csv, runs_csv


def styles(n: int) -> list[tuple[str, str, str]]:
    """``(color, linestyle, marker)`` for ``n`` curves, all different: the ten tab10 colours, then
    the same colours dashed with squares, dotted with triangles, ... (the 15 settings of a PEFT sweep
    would otherwise share colours)."""
    looks = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    return [(f"C{i % 10}", *looks[(i // 10) % len(looks)]) for i in range(n)]


def plot_stem(metric: str) -> str:
    """A metric's name as a file name's start: ``gen/accuracy`` → ``gen_accuracy`` (no folder)."""
    return metric.replace("/", "_")


FORMATS = ("png", "pdf", "svg")
PLOTS = (("round", "round"), ("mb_up", "cumulative MB uploaded (log scale)"))


def plot_names(metric: str, fmt_: str) -> list[str]:
    return [f"{plot_stem(metric)}_vs_{x}.{fmt_}" for x, _ in PLOTS]


def legend_label(g: Group) -> str:
    return f"{g.label} (n={g.n})" + (" — personalised: clients' own models" if g.personalised else "")


def default_title(runs: list[Run], metric: str) -> str:
    """What the runs share (data, model, clients, partition, rounds), not a folder's name."""
    def shared(key: str) -> Any:
        vals = {json.dumps(r.config.get(key), default=repr) for r in runs}
        return runs[0].config.get(key) if runs and len(vals) == 1 and runs[0].config.get(key) is not None else None

    bits = [show(v) for v in (shared("data.name"), shared("model.name")) if v is not None]
    if shared("clients") is not None:
        bits.append(f"{show(shared('clients'))} clients")
    if shared("partition.kind") is not None:
        alpha = shared("partition.alpha") if shared("partition.kind") == "dirichlet" else None
        bits.append(f"{shared('partition.kind')}" + (f"({show(alpha)})" if alpha is not None else "") + " partition")
    if shared("rounds") is not None:
        bits.append(f"{show(shared('rounds'))} rounds")
    return f"{metric}: " + ", ".join(bits) if bits else f"{metric} over {len(runs)} run{'s' * (len(runs) != 1)}"


def PlainLog(**kwargs):
    """matplotlib's LogFormatter (which ticks it labels: minor ones too on a short axis), written as
    plain numbers: 0.06, 1, 10 (not 6e-02, 10⁰ or 1.5×10⁰)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return Plain(**kwargs)


def figure(groups: list[Group], metric: str, x: str, title: str, majority_rate: float | None = None):
    """One plot as a matplotlib Figure (no pyplot state): the metric's mean ± std over seeds against
    the round (``x="round"``) or the mean cumulative MB uploaded (``x="mb_up"``, a log axis: the
    cheapest methods send 100× less than the dearest; round 0, at 0 MB, is left off it). The legend
    sits right of the axes, inside the figure (which widens for long labels). A personalised group
    is drawn with open markers and a thicker line; the majority class is a dotted grey line."""
    from matplotlib.figure import Figure  # lazy: only when plotting
    from matplotlib.ticker import MaxNLocator

    entries = len(groups) + (majority_rate is not None)
    ncols = 1 if entries <= 18 else 2
    longest = max((len(legend_label(g)) for g in groups), default=10)
    fig = Figure(figsize=(6.0 + ncols * (0.4 + 0.068 * longest), max(4.2, 0.21 * entries / ncols + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    positive = False
    for g, (color, linestyle, marker) in zip(groups, styles(len(groups))):
        xs, mean, std = g.curve(x)
        if x == "mb_up":
            keep = xs > 0
            xs, mean, std = xs[keep], mean[keep], std[keep]
            positive = positive or bool(keep.any())
        personal = g.personalised
        ax.plot(xs, mean, color=color, linestyle=linestyle, marker=marker, markersize=5 if personal else 3,
                markerfacecolor="white" if personal else color, linewidth=2.4 if personal else 1.4, label=legend_label(g))
        if g.n > 1:
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15 if personal else 0.2, linewidth=0)
    if majority_rate is not None:
        ax.axhline(majority_rate, color="0.35", linestyle=":", linewidth=1.2, label=f"majority class ({majority_rate:.3f})")
    if x == "round":
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif positive:
        ax.set_xscale("log")
        for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            set_formatter(PlainLog(labelOnlyBase=False))
        ax.set_xlabel("cumulative MB uploaded (log scale)")
    else:
        ax.set_xlabel("cumulative MB uploaded")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both" if x == "mb_up" else "major")
    if groups:
        # beside the axes, never over the curves; constrained layout keeps it inside the figure
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", ncols=ncols, frameon=False)
    return fig


def plot(groups: list[Group], out_dir: Path, metric: str, title: str, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """The two plots (:func:`figure`) in each of ``formats`` (png, pdf, svg)."""
    rate = majority(groups, metric)
    written = []
    for x, _ in PLOTS:
        fig = figure(groups, metric, x, title, rate[0] if rate else None)
        for fmt_ in formats:
            path = out_dir / f"{plot_stem(metric)}_vs_{x}.{fmt_}"
            fig.savefig(path, dpi=150, bbox_inches="tight")  # tight: nothing drawn is ever cut off
            written.append(path)
    return written


def write_report(groups: list[Group], problems: list[Run], out_dir: Path, metric: str, title: str | None = None,
                 baseline: Group | None = None, formats: tuple[str, ...] = ("png",)) -> Path:
    """Write ``compare.md``, ``compare.csv``, ``runs.csv`` and the two plots (in each of
    ``formats``) into ``out_dir``; returns the markdown file's path. ``title``: default
    :func:`default_title`; ``baseline``: a group of ``groups`` the others are paired against."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for g in groups for r in g.runs]
    title = title or default_title(runs, metric)
    root = common_parent([r.path for r in runs + problems]) if runs or problems else None
    keys = list(groups[0].values) if groups else []
    direction = "lowest" if lower_is_better(metric) else "highest"
    md = [f"# {title}", ""]
    md.append(f"{len(runs)} complete run{'s' * (len(runs) != 1)} in {len(groups)} group{'s' * (len(groups) != 1)}"
              + (f" (under `{shown_path(root)}`)" if root else "") + f". Metric: `{metric}`; final = the last round, best = the {direction}"
              " over rounds 1..R; mean ± sample std (ddof = 1) over a group's seeds; MB = bytes summed over the rounds / 1e6, mean"
              " over seeds. Only complete runs are in the aggregates"
              + (f"; {len(problems)} incomplete run{'s are' if len(problems) != 1 else ' is'} listed below." if problems else "."))
    if baseline is not None:
        md += ["", f"Baseline: `{baseline.label}`. Δ = a group's final {metric} minus the baseline's, run against run at the same seed"
               " (same partition, initialisation and client sampling), mean over the seeds both have (pairs) with its 95% Student-t"
               " interval (mean ± t(0.975, pairs − 1) · sd / √pairs); better or worse where the interval excludes 0, not shown where"
               " it contains 0."]
    md += ["", table(groups, metric, baseline), ""]
    if any(g.personalised for g in groups):
        md += [PERSONAL_NOTE + ".", ""]
    rate = majority(groups, metric)
    if rate:
        spread = f"; {rate[1]:.4f}–{rate[2]:.4f} over the runs' test sets" if rate[2] > rate[1] else ""
        md += [f"Majority class (predicting the test set's largest class): {rate[0]:.4f}{spread}.", ""]
    left_out = [k for k in keys if groups and k not in groups[0].shown]
    md.append("Grouping keys (differ among the runs; `seed` and tracking/engine/path keys aside): "
              + (", ".join(f"`{k}`" for k in keys) if keys else "none — every run shares one config.")
              + (f"; the labels leave out {', '.join(f'`{k}`' for k in left_out)}: they follow from the others (compare.csv has every key)."
                 if left_out else "."))
    repeated = [g.label for g in groups if len(set(map(show, g.seeds))) < g.n]
    if repeated:
        md += ["", "Repeated seeds (the same config and seed run more than once): " + "; ".join(repeated) + "."]
    if runs:
        shared = [f"{k}={show(runs[0].config[k])}" for k in CONTEXT_KEYS
                  if k in runs[0].config and k not in keys and all(r.config.get(k) == runs[0].config[k] for r in runs)]
        if shared:
            md += ["", "Shared settings: " + ", ".join(f"`{s}`" for s in shared) + "."]
    md += failure_lines(runs, root)
    md += ["", "## Incomplete runs (not in the aggregates)", ""]
    md += problem_lines(problems, root) or ["None."]
    shown_fmt = "png" if "png" in formats else formats[0]
    images = plot_names(metric, shown_fmt)
    md += ["", f"![{metric} vs round]({images[0]})", "", f"![{metric} vs MB up]({images[1]})", ""]
    path = out_dir / "compare.md"
    path.write_text("\n".join(md))
    write_csvs(groups, problems, out_dir, metric, baseline)
    plot(groups, out_dir, metric, title, formats)
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpeft compare",
        description="Compare fedpeft runs. Runs are grouped by the config keys that differ among them (seed and\n"
                    "tracking/engine/path keys aside); a group's runs are its seeds. Writes a markdown table (final and\n"
                    "best metric as mean ± sample std over seeds, MB up/down, seconds, median s per round, ε), compare.csv, runs.csv and two\n"
                    "plots. With --baseline, every group's final metric is paired with the baseline's at the same seed: the mean\n"
                    "difference and its 95% Student-t interval. Incomplete runs (no summary.json; failed, stopped or interrupted;\n"
                    "fewer rounds than the config's) are listed with the reason and kept out of the aggregates.",
        epilog="examples:\n  fedpeft compare runs/my_sweep\n  fedpeft compare my_sweep --metric loss --baseline strategy=fedavg\n"
               "  fedpeft compare 'runs/*/multirun_2026-*' --out results --title 'FFA-LoRA vs FedAvg' --format png,pdf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a run directory, a folder with runs at any depth, a quoted glob, or an experiment name (runs/NAME)")
    p.add_argument("--metric", metavar="NAME", help="the metric to compare (default: accuracy, else perplexity); any key of metrics.jsonl")
    p.add_argument("--baseline", metavar="GROUP",
                   help="pair every group with this one, seed by seed: a group's label or KEY=VALUE[,KEY=VALUE] only it matches "
                        "(e.g. strategy=fedavg,rank=4)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <common parent of the runs>/compare)")
    p.add_argument("--title", metavar="T", help="the report's title (default: what the runs share: data, model, clients, partition, rounds)")
    p.add_argument("--format", default="png", metavar="png,pdf,svg",
                   help="the plots' file formats, comma-separated (default: png; pdf and svg are vector, for papers)")
    return p


def formats_arg(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise CompareError(f"--format {text}: {'unknown format ' + ', '.join(unknown) if unknown else 'no format'}; choose from {', '.join(FORMATS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        formats = formats_arg(args.format)
        runs, problems = load_runs(args.paths)
        metric = args.metric or default_metric(runs + problems)
        seen = sorted({k for r in runs + problems for row in r.history for k, v in row.items() if isinstance(v, (int, float)) and k != "round"})
        if metric not in seen:
            raise CompareError(f"--metric {metric}: no run has it; available: {', '.join(seen) or 'none'}")
        lacking = [r for r in runs if not r.values(metric)]
        for r in lacking:
            r.status, r.reason = "excluded", f"no {metric!r} in its metrics"
        runs = [r for r in runs if r not in lacking]
        problems = problems + lacking
        groups = group_runs(runs, metric)
        baseline = find_group(groups, args.baseline) if args.baseline else None
    except CompareError as e:
        print(f"fedpeft compare: {e}", file=sys.stderr)
        return 2
    root = common_parent([r.path for r in runs + problems])
    out_dir = args.out or root / "compare"
    md = write_report(groups, problems, out_dir, metric, args.title, baseline, formats)
    print(table(groups, metric, baseline) if groups else "no complete run")
    if any(g.personalised for g in groups):
        print(PERSONAL_NOTE)
    failed = failure_lines([r for g in groups for r in g.runs], root)
    if failed:
        print("\n".join(failed))
    if problems:
        print(f"\nincomplete runs (not in the aggregates): {len(problems)}")
        print("\n".join(problem_lines(problems, root)))
    print(f"\nwrote {md}")
    for name in ("compare.csv", "runs.csv", *(n for f in formats for n in plot_names(metric, f))):
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

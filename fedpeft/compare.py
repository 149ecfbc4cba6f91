"""``fedpeft compare``: one table and two plots from many run directories.

    fedpeft compare PATH... [--metric NAME] [--out DIR] [--title T]

A PATH is a run directory, a folder holding run directories at any depth (an experiment, a Hydra
multirun), a quoted glob, or an experiment name (``runs/<name>``). Runs are grouped by the config
keys that differ among them (``seed`` and bookkeeping keys aside); the runs of a group are its
seeds, and each group gets the mean ± sample std over its seeds. Only complete runs (``summary.json``
with status ``finished`` and every round of ``config.rounds``) enter the aggregates; every other
run is listed, with the reason, never dropped silently.

The Python API the experiment scripts use::

    runs, problems = load_runs(["runs/my_sweep"])
    groups = group_runs(runs, "accuracy")
    md = write_report(groups, problems, Path("runs/my_sweep/compare"), "accuracy", "My sweep")
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

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        return sorted((r.seed for r in self.runs), key=lambda s: (str(type(s)), s))

    def stat(self, what: str) -> tuple[float, float]:
        """(mean, sample std) over the seeds of ``final`` or ``best``; std is nan for n = 1."""
        return mean_std([getattr(r, what)(self.metric) for r in self.runs])

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


def group_runs(runs: list[Run], metric: str) -> list[Group]:
    """Groups of ``runs`` (complete runs) by their grouping keys, in the order of first appearance.
    A run without a value of ``metric`` raises :class:`CompareError` naming it."""
    for run in runs:
        if not run.values(metric):
            raise CompareError(f"{run.path}: no {metric!r} in its metrics")
    keys = grouping_keys(runs)
    names = short_names(keys)
    groups: dict[str, Group] = {}
    for run in runs:
        values = {k: run.config.get(k) for k in keys}
        label = ", ".join(f"{names[k]}={show(v)}" for k, v in values.items()) or "all runs"
        groups.setdefault(label, Group(label, values, metric=metric)).runs.append(run)
    return list(groups.values())


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


def table(groups: list[Group], metric: str) -> str:
    d = metric_digits(groups)
    direction = "min" if lower_is_better(metric) else "max"
    with_eps = any(g.epsilon is not None for g in groups)
    with_params = any(not math.isnan(g.mean("params")) for g in groups)
    head = ["group", "n", "seeds", f"final {metric}", f"best {metric} ({direction})", "MB up", "MB down", "seconds", "s / round"]
    head += (["trained params"] if with_params else []) + (["ε"] if with_eps else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        row = [g.label, str(g.n), ", ".join(show(s) for s in g.seeds), pm(*g.stat("final"), d), pm(*g.stat("best"), d),
               fmt(g.mean("mb_up"), 2), fmt(g.mean("mb_down"), 2), fmt(g.mean("seconds"), 1), fmt(g.mean("s_per_round"), 1)]
        if with_params:
            row.append("—" if math.isnan(g.mean("params")) else f"{g.mean('params'):,.0f}")
        if with_eps:
            row.append(fmt(g.epsilon, 2))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


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


def common_parent(paths: list[Path]) -> Path:
    """The folder the runs share; a single run's parent (never inside a run directory)."""
    if not paths:
        return Path(".")
    common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    while is_run_dir(common) and common.parent != common:
        common = common.parent
    return common


def write_csvs(groups: list[Group], problems: list[Run], out_dir: Path, metric: str) -> tuple[Path, Path]:
    keys = list(groups[0].values) if groups else []
    num = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))  # noqa: E731
    group_csv = out_dir / "compare.csv"
    with group_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", *keys, "n", "seeds", f"{metric}_final_mean", f"{metric}_final_std", f"{metric}_best_mean",
                    f"{metric}_best_std", "mb_up", "mb_down", "seconds", "s_per_round", "epsilon", "trainable_params"])
        for g in groups:
            w.writerow([g.label, *(show(g.values[k]) for k in keys), g.n, " ".join(show(s) for s in g.seeds), *map(num, g.stat("final")),
                        *map(num, g.stat("best")), num(g.mean("mb_up")), num(g.mean("mb_down")), num(g.mean("seconds")), num(g.mean("s_per_round")),
                        num(g.epsilon), num(g.mean("params"))])
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


def plot(groups: list[Group], out_dir: Path, metric: str, title: str) -> list[Path]:
    import matplotlib  # lazy: only when plotting (the backend is chosen before pyplot is imported)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for x, xlabel, name in (("round", "round", f"{plot_stem(metric)}_vs_round.png"), ("mb_up", "cumulative MB uploaded", f"{plot_stem(metric)}_vs_mb_up.png")):
        many = len(groups) > 8  # the legend goes beside the axes, not over the curves
        fig, ax = plt.subplots(figsize=(11, 5) if many else (7, 4.5))
        for g, (color, linestyle, marker) in zip(groups, styles(len(groups))):
            xs, mean, std = g.curve(x)
            line, = ax.plot(xs, mean, color=color, linestyle=linestyle, marker=marker, markersize=3, label=f"{g.label} (n={g.n})")
            if g.n > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
        if x == "round":
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if groups:
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1)) if many else ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def write_report(groups: list[Group], problems: list[Run], out_dir: Path, metric: str, title: str) -> Path:
    """Write ``compare.md``, ``compare.csv``, ``runs.csv`` and the two plots into ``out_dir``;
    returns the markdown file's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for g in groups for r in g.runs]
    root = common_parent([r.path for r in runs + problems]) if runs or problems else None
    keys = list(groups[0].values) if groups else []
    direction = "lowest" if lower_is_better(metric) else "highest"
    md = [f"# {title}", ""]
    md.append(f"{len(runs)} complete run{'s' * (len(runs) != 1)} in {len(groups)} group{'s' * (len(groups) != 1)}"
              + (f" (under `{root}`)" if root else "") + f". Metric: `{metric}`; final = the last round, best = the {direction}"
              " over rounds 1..R; mean ± sample std (ddof = 1) over a group's seeds; MB = bytes summed over the rounds / 1e6, mean"
              " over seeds. Only complete runs are in the aggregates"
              + (f"; {len(problems)} incomplete run{'s are' if len(problems) != 1 else ' is'} listed below." if problems else "."))
    md += ["", table(groups, metric), ""]
    md.append("Grouping keys (differ among the runs; `seed` and tracking/engine/path keys aside): "
              + (", ".join(f"`{k}`" for k in keys) if keys else "none — every run shares one config."))
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
    md += ["", f"![{metric} vs round]({plot_stem(metric)}_vs_round.png)", "", f"![{metric} vs MB up]({plot_stem(metric)}_vs_mb_up.png)", ""]
    path = out_dir / "compare.md"
    path.write_text("\n".join(md))
    write_csvs(groups, problems, out_dir, metric)
    plot(groups, out_dir, metric, title)
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpeft compare",
        description="Compare fedpeft runs. Runs are grouped by the config keys that differ among them (seed and\n"
                    "tracking/engine/path keys aside); a group's runs are its seeds. Writes a markdown table (final and\n"
                    "best metric as mean ± sample std over seeds, MB up/down, seconds, median s per round, ε), compare.csv, runs.csv and two\n"
                    "plots. Incomplete runs (no summary.json; failed, stopped or interrupted; fewer rounds than the\n"
                    "config's) are listed with the reason and kept out of the aggregates.",
        epilog="examples:\n  fedpeft compare runs/my_sweep\n  fedpeft compare my_sweep --metric loss\n"
               "  fedpeft compare 'runs/*/multirun_2026-*' --out results --title 'FFA-LoRA vs FedAvg'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a run directory, a folder with runs at any depth, a quoted glob, or an experiment name (runs/NAME)")
    p.add_argument("--metric", metavar="NAME", help="the metric to compare (default: accuracy, else perplexity); any key of metrics.jsonl")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <common parent of the runs>/compare)")
    p.add_argument("--title", metavar="T", help="the report's title (default: the common parent's name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
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
    except CompareError as e:
        print(f"fedpeft compare: {e}", file=sys.stderr)
        return 2
    root = common_parent([r.path for r in runs + problems])
    out_dir = args.out or root / "compare"
    md = write_report(groups, problems, out_dir, metric, args.title or f"fedpeft compare: {root.name}")
    print(table(groups, metric) if groups else "no complete run")
    failed = failure_lines([r for g in groups for r in g.runs], root)
    if failed:
        print("\n".join(failed))
    if problems:
        print(f"\nincomplete runs (not in the aggregates): {len(problems)}")
        print("\n".join(problem_lines(problems, root)))
    print(f"\nwrote {md}")
    for name in ("compare.csv", "runs.csv", f"{plot_stem(metric)}_vs_round.png", f"{plot_stem(metric)}_vs_mb_up.png"):
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

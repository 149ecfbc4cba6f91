"""Run directory, metrics.jsonl, per-round peft checkpoints and generated samples, W&B (server side only), progress lines."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf

from fedpeft import durable
from fedpeft.metrics import best_row, total_mb

log = logging.getLogger("fedpeft.tracking")

# Override keys that are bookkeeping, not an experimental variable: not tagged.
BOOKKEEPING = ("tracking", "hydra", "engine", "resume")
MAX_TAG = 64  # W&B refuses longer tags


def wandb_mode(mode: str) -> str:
    """``auto`` is online with an API key and offline without one."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def varied_keys(overrides: Iterable[str]) -> list[str]:
    """The ``KEY=VALUE`` / ``GROUP=OPTION`` overrides that name an experimental variable: Hydra's
    ``+``/``++`` prefixes dropped, bookkeeping keys (:data:`BOOKKEEPING`: ``tracking.*``,
    ``hydra.*``, ``engine.*``, ``resume``) and deletions (``~KEY``) left out."""
    out = []
    for word in overrides:
        word = str(word).strip().lstrip("+")
        if not word or word.startswith("~") or "=" not in word:
            continue
        if word.split("=", 1)[0].split(".", 1)[0].split("/", 1)[0] in BOOKKEEPING:
            continue
        out.append(word)
    return out


def hydra_overrides(run_dir: Path) -> list[str]:
    """The overrides ``fedpeft simulate`` (Hydra, single run or one job of a ``--multirun``) was
    given for the run in ``run_dir``: Hydra records them in ``.hydra/overrides.yaml``. Empty where
    Hydra wrote no such file (``fedpeft deploy``, ``flwr run``)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        return [str(w) for w in OmegaConf.load(path) or []]
    except Exception as e:  # a damaged file must not stop a run
        log.warning("could not read %s: %s", path, e)
        return []


def run_tags(cfg: Any, rank_tag: str, varied: Iterable[str] = ()) -> list[str]:
    """W&B tags of a run: what it is (strategy, data, partition, clients, ranks, privacy, the
    server optimizer and compression when on) and then the ``varied`` keys (the user's overrides and ``tracking.tags``),
    each once, in order, cut to W&B's 64 characters."""
    tags = [f"strategy:{cfg.strategy.name}", f"data:{cfg.data.name}", f"partition:{cfg.partition.kind}",
            f"clients:{cfg.clients}", f"ranks:{rank_tag}"]
    if cfg.privacy.mode != "none":
        tags.append(f"privacy:{cfg.privacy.mode}")
    if cfg.server.optimizer != "none":
        tags.append(f"server:{cfg.server.optimizer}")
    if cfg.compression.uplink != "none":
        tags.append(f"uplink:{cfg.compression.uplink}")
    if cfg.compression.downlink != "none":
        tags.append(f"downlink:{cfg.compression.downlink}")
    tags += [str(t) for t in varied]
    out: list[str] = []
    for t in tags:
        t = t[:MAX_TAG]
        if t and t not in out:
            out.append(t)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_summary(summary: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The W&B run summary (one value per run, the runs table's columns) from ``summary.json``'s
    content and the run's metrics rows: the summary's scalars (status, seconds, rounds, ...), its
    dicts one level flat (``privacy/epsilon``: the ε spent, with DP); ``final/<metric>`` for every
    number of the last row; ``best/accuracy`` (max) or ``best/perplexity`` (min) over rounds 1..R
    (round 0 only if there is no other) and the round it came in (``best/round``); and
    ``total/mb_up`` / ``total/mb_down`` (summed over the rounds): as ``fedpeft compare`` has them.
    No key may be a logged metric's name: W&B sets those to the metric's last logged value after
    this update (when it writes out the run's last history row)."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, (int, float, str)):
            out[k] = v
        elif isinstance(v, Mapping):  # not the history (a list)
            out.update({f"{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float, str))})
    if rows:
        out.update({f"final/{k}": v for k, v in rows[-1].items() if _number(v)})
        for metric in ("accuracy", "perplexity"):
            best = best_row(rows, metric)
            if best is not None:
                out[f"best/{metric}"], out["best/round"] = best[metric], best["round"]
                break
        for direction in ("up", "down"):
            if any(f"bytes_{direction}" in r for r in rows):
                out[f"total/mb_{direction}"] = total_mb(rows, direction)
    return out


# The columns of a round's generated-samples table (the samples of fedpeft.generate.evaluate, after the round).
SAMPLE_COLUMNS = ("round", "task", "prompt", "answer", "generation", "correct", "rougeL")

RUN_IN_USE_TRIES, RUN_IN_USE_WAIT = 12, 5.0  # a resumed W&B run whose id is still held: up to a minute


class Tracker:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], *, mode: str, project: str, group: str, tags: list[str],
                 job_type: str | None = None, resume: bool = False):
        """One run's tracking: ``metrics.jsonl`` and, unless ``mode`` is disabled, a W&B run in
        ``group`` (runs of one experiment) with ``job_type`` (the strategy), ``tags`` and the
        resolved ``config``; the round is its x-axis. ``resume``: continue the run in ``run_dir``
        (its W&B run too: the same id, from ``wandb-id``)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.mode = wandb_mode(mode)
        self.wandb = None
        if self.mode != "disabled":
            import wandb  # lazy: heavy, and only for a run that logs to W&B

            id_file = self.run_dir / "wandb-id"
            run_id = id_file.read_text().strip() if resume and id_file.exists() else None
            for attempt in range(1, RUN_IN_USE_TRIES + 1):
                try:
                    self.wandb = wandb.init(
                        id=run_id,
                        resume="allow" if run_id else None,
                        project=project,
                        group=group,
                        job_type=job_type,
                        name=self.run_dir.name,
                        tags=tags,
                        config=dict(config),
                        dir=str(self.run_dir),
                        mode=self.mode,
                        settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
                    )
                    break
                except Exception as e:  # wandb raises its own ServerResponseError
                    # A run killed moments ago leaves its wandb service holding the run id until it
                    # notices its parent is gone: wait for it rather than failing the resume.
                    if run_id is None or "is in use" not in str(e) or attempt == RUN_IN_USE_TRIES:
                        raise
                    say(f"W&B run {run_id} is still held by the interrupted run's wandb service; retrying in {RUN_IN_USE_WAIT:g} s")
                    time.sleep(RUN_IN_USE_WAIT)
            # Plots against the round, not W&B's internal step (a resumed run's rounds continue).
            self.wandb.define_metric("round")
            self.wandb.define_metric("*", step_metric="round")
            durable.write_text(id_file, self.wandb.id + "\n")
            if run_id is not None:
                # A killed run's last rounds may be in metrics.jsonl but not in W&B (wandb-core, killed
                # with it, had not written them out): log the rounds kept again, but those W&B says it
                # has (online; offline it says none, so the newest offline run holds every round).
                for row in self.rows():
                    if row["round"] >= self.wandb.starting_step:
                        self._log_wandb(row)

    def log_round(self, server_round: int, metrics: Mapping[str, Any], samples: list[Mapping[str, Any]] | None = None) -> None:
        """One round: its metrics row appended to ``metrics.jsonl`` and, where generated ``samples``
        are given, ``samples/round_NNN.jsonl`` (written whole, before the row); both to W&B. A row
        that cannot be written whole (a full disk) is cut off the file again (:mod:`fedpeft.durable`)."""
        if samples:
            durable.write_text(self.samples_path(server_round), "".join(json.dumps({"round": server_round, **s}) + "\n" for s in samples))
        row = {"round": server_round, "elapsed_s": round(time.perf_counter() - self.t0, 3), **metrics}
        durable.append_line(self.metrics_path, json.dumps(row))
        if self.wandb is not None:
            self._log_wandb(row)

    def _log_wandb(self, row: Mapping[str, Any]) -> None:
        """A metrics row's numbers, at step = round (its ``round`` field is the plots' x-axis), and
        the round's samples file, if any, as the ``samples`` table (:data:`SAMPLE_COLUMNS`)."""
        data: dict[str, Any] = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        samples = self.samples(row["round"])
        if samples:
            import wandb

            data["samples"] = wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[s.get(c) for c in SAMPLE_COLUMNS] for s in samples])
        self.wandb.log(data, step=row["round"])

    def samples_path(self, server_round: int) -> Path:
        return self.run_dir / "samples" / f"round_{server_round:03d}.jsonl"

    def samples(self, server_round: int) -> list[dict[str, Any]]:
        """The generated samples logged for a round (none: no such file)."""
        path = self.samples_path(server_round)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.run_dir / "adapters" / f"round_{server_round:03d}"

    def rows(self) -> list[dict[str, Any]]:
        """The run's metrics rows (a resumed run's too), as logged (a half-written last row left out)."""
        return durable.metrics_rows(self.metrics_path)

    def finish(self, summary: Mapping[str, Any], exit_code: int = 0) -> None:
        """``summary.json``, written whole (:mod:`fedpeft.durable`), and the W&B run closed, even
        when that write fails."""
        try:
            durable.write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        finally:
            if self.wandb is not None:
                self.wandb.summary.update(run_summary(summary, self.rows()))
                self.wandb.finish(exit_code=exit_code)
                self.wandb = None


def progress_line(server_round: int, rounds: int, m: Mapping[str, Any], elapsed: float) -> str:
    parts = [f"round {server_round}/{rounds}"]
    for key, fmt in (("accuracy", "acc {:.4f}"), ("perplexity", "ppl {:.2f}"), ("loss", "loss {:.4f}"), ("gen/accuracy", "gen acc {:.4f}"),
                     ("gen/rougeL", "rougeL {:.4f}"), ("train_loss", "train_loss {:.4f}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    if "clients_sampled" in m:
        notes = [f"{int(m[k])} {word}" for k, word in
                 (("clients_failed", "failed"), ("clients_rejected", "rejected"), ("clients_missing", "partition(s) without a node")) if m.get(k)]
        parts.append(f"clients {int(m['clients_replied'])}/{int(m['clients_sampled'])}" + (f" ({', '.join(notes)})" if notes else ""))
        if "round_applied" in m and not m["round_applied"]:
            parts.append("not applied (too few good updates)")
    if "epsilon" in m:
        parts.append(f"ε {m['epsilon']:.3f}")
    if "bytes_down" in m:
        parts.append(f"down {m['bytes_down'] / 1e6:.2f} MB up {m['bytes_up'] / 1e6:.2f} MB")
    parts.append(f"{elapsed:.0f}s")
    return " | ".join(parts)


def say(line: str) -> None:
    print(f"[fedpeft] {line}", file=sys.stdout, flush=True)


def duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h03m``: a wait, to the second (minutes past an hour)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RoundProgress:
    """Progress while a round's clients train: clients finished / sampled, time elapsed and an ETA.

    The ETA counts down: it is an estimate of the round's whole duration minus the time elapsed. The
    estimate is made when a reply arrives — the completion rate so far (elapsed at that reply /
    finished × sampled, so parallel workers are counted in), blended with the previous round's
    duration (``previous``) by the share still out — and held until the next reply, so between
    replies the ETA only falls (to ``0s`` at worst); ``ETA —`` while there is nothing to go on.
    On a terminal (``stream.isatty()``) a tqdm bar redrawn in place at most every :attr:`redraw`
    seconds or when a client finishes, first drawn after :attr:`delay` seconds, as wide as the
    terminal, cleared by :meth:`close` before the round's summary line. Otherwise (a log file, a
    pipe, ``flwr run --stream``) a ``[fedpeft] training round k/R: 37/100 clients done, 2m10s
    elapsed, ETA 3m41s`` line every :attr:`every` seconds. A round over sooner prints nothing. No
    line starts ``[fedpeft] round k/R``: that is the summary :func:`progress_line` writes once round
    k is complete, and launchers and tests wait for it."""

    every = 30.0  # seconds between two plain lines
    delay = 1.0  # seconds before the terminal line first shows
    redraw = 1.0  # seconds between two redraws of the terminal line with no new reply

    def __init__(self, server_round: int, rounds: int, sampled: int, *, previous: float | None = None, stream=None,
                 clock=time.monotonic) -> None:
        self.server_round, self.rounds, self.sampled = server_round, rounds, sampled
        self.previous = previous if previous and previous > 0 else None
        self.stream = sys.stdout if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.clock = clock
        self.t0 = clock()
        self.last: float | None = None  # when a line was last written (drawn)
        self.done = -1  # finished clients at the last line
        self.seen = 0  # finished clients when the estimate was last made
        self.total = self.previous  # the round's estimated duration (None: no estimate yet)
        self.bar = None  # the terminal's tqdm bar, once drawn

    @property
    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self, done: int, elapsed: float) -> str:
        """The ETA shown with ``done`` finished after ``elapsed`` seconds (re-estimated on a new reply)."""
        if done > self.seen and self.sampled:
            by_rate = elapsed / done * self.sampled
            out = 1 - done / self.sampled
            self.total = by_rate if self.previous is None else (1 - out) * by_rate + out * self.previous
            self.seen = done
        if done >= self.sampled:
            return "0s"
        return "—" if self.total is None else duration(max(self.total - elapsed, 0.0))

    def text(self, done: int, elapsed: float) -> str:
        return f"{done}/{self.sampled} clients done, {duration(elapsed)} elapsed, ETA {self.eta(done, elapsed)}"

    def update(self, done: int) -> None:
        """``done`` of the sampled clients have replied; writes a line if one is due."""
        now = self.clock()
        elapsed = now - self.t0
        eta = self.eta(done, elapsed)  # every poll: a reply's time is when it is first seen
        if self.tty:
            if elapsed < self.delay or (done == self.done and self.last is not None and now - self.last < self.redraw):
                return
            self.draw(done, f"{duration(elapsed)} elapsed, ETA {eta}")
        else:
            if now - (self.t0 if self.last is None else self.last) < self.every:
                return
            self.stream.write(f"[fedpeft] training round {self.server_round}/{self.rounds}: {self.text(done, elapsed)}\n")
            self.stream.flush()
        self.last, self.done = now, done

    def draw(self, done: int, postfix: str) -> None:
        """The terminal bar (tqdm), made on its first draw, then redrawn with ``done`` and ``postfix``."""
        if self.bar is None:
            from tqdm import tqdm

            class Bar(tqdm):
                monitor_interval = 0  # no monitor thread: this bar is redrawn by the round's polls

            columns = self.columns()
            self.bar = Bar(total=self.sampled, initial=done, file=self.stream, leave=False, ascii="-#", mininterval=0,
                           ncols=columns - 1 if columns else None, desc=f"{self.server_round}/{self.rounds}", postfix=postfix,
                           bar_format="[fedpeft] training round {desc} [{bar}] {n_fmt}/{total_fmt} clients done{postfix}")
            return
        self.bar.n = done
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.refresh()

    def columns(self) -> int | None:
        """The terminal's width, or None where the stream has none."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return None

    def close(self) -> None:
        """The wait is over: clear the terminal bar (a plain line stays as written)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

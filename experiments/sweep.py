"""The experiments' sweep runner: one `fedpeft simulate` process per run, into one sweep directory.

A run that already finished (its summary.json says so) is skipped, so an interrupted sweep is
continued by running the same command with the same ``--dir``: a run stopped after a complete round
is resumed from it (``fedpeft simulate resume=DIR``, which refuses a changed config), one stopped
before is kept aside (``<name>.incomplete-<time>``) and started again. Asking for more ``rounds``
than finished runs have extends them the same way (``resume=DIR rounds=N``): a resumed run equals
an uninterrupted one, so a pilot's horizon can be lengthened without starting over. A run that fails is reported and the
sweep goes on. The report is `fedpeft compare` over the sweep directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def with_seeds(runs: dict[str, list[str]], seeds: list[int]) -> dict[str, list[str]]:
    """Every run once per seed: ``<name>_seed<s>`` with ``seed=<s>``, seed by seed (a sweep cut short
    has every setting at the seeds it reached, which is what paired comparisons need)."""
    return {f"{name}_seed{s}": [*overrides, f"seed={s}"] for s in seeds for name, overrides in runs.items()}


def select(runs: dict[str, list[str]], only: list[str] | None, ap) -> dict[str, list[str]]:
    """The settings named in ``--only`` (all when it is not given), in ``--only``'s order; an
    unknown name is ``ap.error`` naming it and the known ones."""
    if not only:
        return runs
    unknown = [n for n in only if n not in runs]
    if unknown:
        ap.error(f"--only: unknown settings {unknown}; expected some of {', '.join(runs)}")
    return {n: runs[n] for n in only}


def finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def run_rounds(run_dir: Path) -> int:
    """The ``rounds`` a run was configured with (0 when it has no config yet)."""
    import yaml

    config = run_dir / "config.yaml"
    return int(yaml.safe_load(config.read_text())["rounds"]) if config.exists() else 0


def run_sweep(runs: dict[str, list[str]], common: list[str], sweep_dir: Path, label: str) -> list[str]:
    """Run each ``name: overrides`` (after the ``common`` overrides) into ``sweep_dir/name``;
    returns the names that failed."""
    exe = str(Path(sys.executable).with_name("fedpeft"))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    failed, t0 = [], time.perf_counter()
    for i, (name, overrides) in enumerate(runs.items(), 1):
        out = sweep_dir / name
        head = f"[{label} {i}/{len(runs)}, {time.perf_counter() - t0:.0f}s] {name}"
        rounds = [w.split("=", 1)[1] for w in [*common, *overrides] if w.startswith("rounds=")]
        more = [f"rounds={rounds[-1]}"] if rounds and run_rounds(out) < int(rounds[-1]) else []
        if finished(out) and not more:
            print(f"{head}: already done", flush=True)
            continue
        cmd = [exe, "simulate", *common, *overrides, f"hydra.run.dir={out}"]
        if (out / "state" / "server.pt").exists():  # stopped after a round, or asked for more rounds: continue it
            cmd = [exe, "simulate", f"resume={out}", *more]
        elif out.exists():  # nothing to continue from, and fedpeft refuses to write into it: keep it aside
            aside = out.with_name(f"{name}.incomplete-{datetime.now():%Y%m%d-%H%M%S}")
            out.rename(aside)
            print(f"{head}: the unfinished run is kept in {aside}", flush=True)
        print(f"{head}: $ fedpeft {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
            print(f"{head}: failed; going on with the others", file=sys.stderr, flush=True)
    return failed


def report(sweep_dir: Path, out_dir: Path, title: str, metric: str = "accuracy") -> None:
    """`fedpeft compare` over the sweep: table, CSV and plots into ``out_dir``. If compare refuses
    (it has printed why: no such directory, no runs, ...), exit with its code before anything else
    in ``out_dir`` (the claims) is rewritten from nothing."""
    from fedpeft import compare

    # the runs' paths in runs.csv relative to the current folder (the repo root) where the sweep is under it
    rc = compare.main([str(compare.shown_path(sweep_dir)), "--out", str(out_dir), "--metric", metric, "--title", title])
    if rc:
        raise SystemExit(rc)


def final(run_dir: Path, key: str = "accuracy") -> float | None:
    """A finished run's final ``key`` (a metric, or ``majority_rate``); None if it did not finish."""
    s = run_dir / "summary.json"
    if not finished(run_dir):
        return None
    summary = json.loads(s.read_text())
    return summary["final"].get(key, summary.get(key))


def interval_row(text: str, diffs: list[float]) -> str:
    """``| text | mean | 95% t-interval | n | verdict |`` for paired differences (better − worse): the
    interval of ``fedpeft compare --baseline`` (:func:`fedpeft.compare.paired_interval`), any number of seeds."""
    from fedpeft.compare import paired_interval

    n = len(diffs)
    if n < 2:
        return f"| {text} | — | — | {n} | not enough finished seed pairs |"
    mean, lo, hi = paired_interval(diffs)
    verdict = "yes (interval above 0)" if lo > 0 else "no: the reverse holds (interval below 0)" if hi < 0 else "not shown (interval contains 0)"
    return f"| {text} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {n} | {verdict} |"


def paired_claims(sweep_dir: Path, claims: list[tuple[str, str, str]], seeds: list[int], metric: str = "accuracy") -> list[str]:
    """Each ``(claim, better, worse)`` as the paired difference of the final ``metric`` between the runs
    ``<better>_seed<s>`` and ``<worse>_seed<s>`` (same seed: same partition, initialisation and
    client sampling), with a 95% t-interval over the seeds both finished. ``worse`` may be
    ``majority:<run>``: that run's majority-class rate."""
    lines = ["| claim | mean difference (better − worse) | 95% interval | seeds | holds here? |", "|---|---|---|---|---|"]
    for text, a, b in claims:
        diffs = []
        for s in seeds:
            fa = final(sweep_dir / f"{a}_seed{s}", metric)
            fb = final(sweep_dir / f"{b.removeprefix('majority:')}_seed{s}", "majority_rate" if b.startswith("majority:") else metric)
            if fa is not None and fb is not None:
                diffs.append(fa - fb)
        lines.append(interval_row(text, diffs))
    return lines


def write_claims(sweep_dir: Path, claims: list[tuple[str, str, str]], seeds: list[int], out: Path,
                 title: str = "The papers' claims, on paired seeds", metric: str = "accuracy") -> None:
    """:func:`paired_claims` (of ``metric``) as ``out/claims.md``, and printed."""
    table = paired_claims(sweep_dir, claims, seeds, metric)
    (out / "claims.md").write_text(f"# {title}\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))

"""The experiments' sweep helpers: paired claims: final accuracies of runs at the same seed, differenced, with a
95% t-interval over the seeds both finished (experiments/sweep.py)."""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from sweep import paired_claims, select


def _run(root: Path, name: str, accuracy: float, status: str = "finished", majority: float = 0.5) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": status, "majority_rate": majority, "final": {"round": 3, "accuracy": accuracy}}))


def _experiment(name: str):
    """``experiments/<name>/run.py`` as a fresh module."""
    path = Path(__file__).resolve().parents[2] / "experiments" / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"{name}_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_differences_their_t_interval_and_the_verdict(tmp_path):
    for s, (a, b) in enumerate([(0.80, 0.70), (0.78, 0.70), (0.82, 0.71)]):
        _run(tmp_path, f"good_seed{s}", a)
        _run(tmp_path, f"bad_seed{s}", b, majority=0.6)
    _run(tmp_path, "good_seed3", 0.10, status="interrupted")  # not finished: left out, not counted as a loss
    _run(tmp_path, "bad_seed3", 0.70, majority=0.6)
    rows = paired_claims(tmp_path, [("good ≥ bad", "good", "bad"), ("bad ≥ good", "bad", "good"),
                                    ("bad > majority", "bad", "majority:bad"), ("missing", "good", "nowhere")], [0, 1, 2, 3])
    diffs = [0.10, 0.08, 0.11]
    mean = sum(diffs) / 3
    half = 4.303 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert rows[2] == f"| good ≥ bad | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] | 3 | yes (interval above 0) |"
    assert rows[3].endswith("| 3 | no: the reverse holds (interval below 0) |")
    bad_minus_majority = [0.10, 0.10, 0.11, 0.10]  # 0.70, 0.70, 0.71, 0.70 against 0.6; seed 3 counts here
    assert rows[4].startswith(f"| bad > majority | {sum(bad_minus_majority) / 4:+.4f} |") and rows[4].endswith("| 4 | yes (interval above 0) |")
    assert rows[5] == "| missing | — | — | 0 | not enough finished seed pairs |"


def test_an_interval_that_contains_zero_is_not_shown(tmp_path):
    for s, (a, b) in enumerate([(0.80, 0.70), (0.70, 0.80)]):
        _run(tmp_path, f"a_seed{s}", a)
        _run(tmp_path, f"b_seed{s}", b)
    (row,) = paired_claims(tmp_path, [("a ≥ b", "a", "b")], [0, 1])[2:]
    assert row.endswith("| 2 | not shown (interval contains 0) |") and "+0.0000" in row


def test_only_selects_settings_in_its_order_and_names_an_unknown_one(capsys):
    runs = {"a": ["x=1"], "b": ["x=2"], "c": ["x=3"]}
    ap = argparse.ArgumentParser(prog="run.py")
    assert select(runs, None, ap) == runs
    assert list(select(runs, ["c", "a"], ap).items()) == [("c", ["x=3"]), ("a", ["x=1"])]
    with pytest.raises(SystemExit):
        select(runs, ["a", "zz"], ap)
    assert "--only: unknown settings ['zz']; expected some of a, b, c" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["peft_methods", "heterogeneous_ranks", "byzantine"])
def test_every_claim_names_settings_of_its_experiment(experiment):
    """A misspelt setting would read as 'not enough finished seed pairs' forever: every claim's two
    sides are settings the experiment runs."""
    mod = _experiment(experiment)
    settings = set(mod.runs()) if hasattr(mod, "runs") else set(getattr(mod, "METHODS", None) or mod.SETTINGS)
    assert len(mod.CLAIMS) >= 5
    for text, better, worse in mod.CLAIMS:
        assert better in settings and worse.removeprefix("majority:") in settings, text


def test_a_report_over_no_runs_exits_before_it_rewrites_the_claims(tmp_path, monkeypatch, capsys):
    """`run.py --report-only --dir <wrong>` once replaced the committed claims.md with a table of
    'not enough finished seed pairs': the script now stops at compare's refusal, files untouched."""
    mod = _experiment("peft_methods")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "claims.md").write_text("kept\n")
    monkeypatch.setattr(mod, "HERE", tmp_path)
    monkeypatch.setattr(sys, "argv", ["run.py", "--report-only", "--dir", str(tmp_path / "no_such_sweep")])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 2
    assert "no_such_sweep: no such run directory" in capsys.readouterr().err
    assert (tmp_path / "results" / "claims.md").read_text() == "kept\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["claims.md"]


def test_claims_work_for_more_than_ten_seeds(tmp_path):
    """The hard-coded t table stopped at 10 seeds (KeyError beyond): t(0.975, 11) = 2.200985160, by hand."""
    diffs = [0.05, 0.02, 0.04, -0.01, 0.03, 0.06, 0.01, 0.02, 0.05, 0.00, 0.04, 0.03]
    for s, d in enumerate(diffs):
        _run(tmp_path, f"a_seed{s}", 0.5 + d)
        _run(tmp_path, f"b_seed{s}", 0.5)
    (row,) = paired_claims(tmp_path, [("a ≥ b", "a", "b")], list(range(12)))[2:]
    mean = sum(diffs) / 12
    half = 2.200985160 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 11) / math.sqrt(12)
    assert row == f"| a ≥ b | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] | 12 | yes (interval above 0) |"

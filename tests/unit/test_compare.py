"""``fedpeft compare``: grouping by the config keys that differ, mean ± std over seeds, the
incomplete runs listed (never averaged), the input forms, and the files it writes — on hand-built
run directories (tests/e2e/test_compare.py: on real runs of ``fedpeft simulate --multirun``)."""

import json
import math
import statistics
from pathlib import Path

import pytest

from fedpeft import compare
from fedpeft.cli import main as cli_main
from tests.harness import PNG, read_csv


def config(**over):
    """A config.yaml's content (the keys compare looks at, plus bookkeeping ones)."""
    cfg = {"strategy": {"name": "fedavg", "weighting": "num_examples"},
           "model": {"name": "minilm", "task": "classification", "target_modules": ["query", "value"], "rank": 8},
           "data": {"name": "rotten_tomatoes", "eval_samples": 64}, "partition": {"kind": "iid", "alpha": 0.5},
           "ranks": {"kind": "fixed", "levels": []}, "engine": {"num_cpus": 1.0}, "tracking": {"mode": "disabled", "experiment": "x"},
           "privacy": {"mode": "none"}, "train": {"local_steps": 2}, "clients": 2, "rounds": 2, "seed": 0}
    for key, value in over.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_yaml(path: Path, tree) -> None:
    import yaml

    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def make_run(run_dir: Path, cfg: dict, values: list[float], metric="accuracy", status="finished", summary=True,
             bytes_up=(1_000_000, 500_000), seconds=10.0, epsilon=None, round_seconds=(2.0, 3.0, 7.0), **summary_extra) -> Path:
    """A run directory as ``fedpeft simulate`` writes it: ``values[r]`` is the metric of round r."""
    run_dir.mkdir(parents=True)
    write_yaml(run_dir / "config.yaml", cfg)
    (run_dir / ".hydra").mkdir()
    write_yaml(run_dir / ".hydra" / "config.yaml", cfg)  # never a run of its own
    rows = []
    for r, v in enumerate(values):
        row = {"round": r, metric: v, "loss": 1.0 - r * 0.1}
        if r:
            row.update(bytes_up=bytes_up[(r - 1) % len(bytes_up)], bytes_down=2_000_000, train_loss=0.5,
                       round_seconds=round_seconds[(r - 1) % len(round_seconds)])
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({**row, "elapsed_s": 1.0}) + "\n" for row in rows))
    if summary:
        s = {"run_dir": str(run_dir), "strategy": cfg["strategy"]["name"], "rounds": cfg["rounds"], "clients": cfg["clients"],
             "status": status, "seconds": seconds, "history": rows, "final": rows[-1], **summary_extra}
        if epsilon is not None:
            s["privacy"] = {"mode": "sample", "noise_multiplier": 0.5, "epsilon": epsilon, "delta": 1e-5}
        (run_dir / "summary.json").write_text(json.dumps(s))
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    """strategy × model.rank, seeds as repetitions, plus the incomplete runs a sweep leaves."""
    root = tmp_path / "runs" / "exp"
    finals = {("fedavg", 8): [0.5, 0.75], ("fedavg", 4): [0.5, 0.75, 1.0], ("flora", 8): [0.25]}
    for (strategy, rank), seeds in finals.items():
        for seed, final in enumerate(seeds):
            # round 0 is the best (never counted: best is over the trained rounds), round 1 below the final
            cfg = config(strategy__name=strategy, model__rank=rank, seed=seed, tracking__experiment=f"e{seed}", engine__num_cpus=1.0 + seed)
            make_run(root / "multirun_1" / f"{strategy}_{rank}_s{seed}", cfg, [1.5, final - 0.125, final], seconds=10.0 + seed,
                     epsilon=math.inf if strategy == "flora" else None, round_seconds=(2.0 + seed, 9.0 + seed, 4.0 + seed, 3.0 + seed))
    cfg = config(strategy__name="fedavg", model__rank=8, seed=2)
    make_run(root / "crashed", cfg, [0.4, 0.9], summary=False)  # killed during round 2
    make_run(root / "failed", cfg, [0.4, 0.9], status="failed", error="no round applied an update")
    make_run(root / "short", cfg, [0.4, 0.9])  # "finished" but one round short of config.rounds
    bad = root / "deep" / "er" / "broken"
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text("strategy: [unclosed\n")
    (bad / "summary.json").write_text("{}")
    (root / "deep" / "notes").mkdir()  # a folder without runs: ignored
    (root / "nothing_ran" / ".hydra").mkdir(parents=True)  # only Hydra's own files: not a run, nor is .hydra/
    write_yaml(root / "nothing_ran" / ".hydra" / "config.yaml", cfg)
    return root


def test_a_complete_run_with_failed_clients_is_named_under_the_table(tmp_path, capsys):
    """It stays in the aggregates, but the reader is told which rounds averaged fewer clients."""
    root = tmp_path / "runs"
    make_run(root / "clean", config(seed=0), [0.1, 0.5, 0.6])
    hit = make_run(root / "hit", config(seed=1), [0.1, 0.5, 0.4])
    rows = [json.loads(line) for line in (hit / "metrics.jsonl").read_text().splitlines()]
    rows[2].update(clients_failed=3, clients_sampled=5)
    summary = json.loads((hit / "summary.json").read_text())
    summary["history"] = rows
    (hit / "summary.json").write_text(json.dumps(summary))
    assert compare.main([str(root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "Runs in which clients failed (in the aggregates; those rounds averaged fewer clients):\n- `hit` — round 2: 3 of 5 failed\n" in md
    assert "`clean`" not in md and "2 complete runs in 1 group" in md
    assert "- `hit` — round 2: 3 of 5 failed" in capsys.readouterr().out


def test_groups_by_every_differing_key_with_mean_and_sample_std(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.main([str(sweep), "--out", str(out), "--title", "Sweep"]) == 0
    rows = {r["group"]: r for r in read_csv(out / "compare.csv")}
    assert list(rows) == ["strategy=fedavg, rank=4", "strategy=fedavg, rank=8", "strategy=flora, rank=8"]
    g4, g8, flora = rows.values()
    assert (g4["strategy.name"], g4["model.rank"]) == ("fedavg", "4")
    assert (g4["n"], g4["seeds"], g8["n"], g8["seeds"], flora["n"], flora["seeds"]) == ("3", "0 1 2", "2", "0 1", "1", "0")
    assert float(g4["accuracy_final_mean"]) == 0.75 and float(g4["accuracy_final_std"]) == 0.25
    assert float(g8["accuracy_final_mean"]) == 0.625 and float(g8["accuracy_final_std"]) == pytest.approx(0.125 * math.sqrt(2), rel=1e-15)
    assert float(flora["accuracy_final_mean"]) == 0.25 and flora["accuracy_final_std"] == ""  # n = 1: no std
    assert float(g4["accuracy_best_mean"]) == 0.75  # max over rounds 1..R, not round 0's 1.5
    assert float(g4["mb_up"]) == 1.5 and float(g4["mb_down"]) == 4.0 and float(g4["seconds"]) == 11.0
    # s per round: the median of a run's trained rounds (2+s, 9+s: two rounds), then the mean over seeds
    assert float(g4["s_per_round"]) == statistics.mean(statistics.median([2.0 + s, 9.0 + s]) for s in range(3)) == 6.5
    assert g4["epsilon"] == "" and float(flora["epsilon"]) == math.inf
    md = (out / "compare.md").read_text()
    assert md.startswith("# Sweep\n")
    assert "| strategy=fedavg, rank=8 | 2 | 0, 1 | 0.6250 ± 0.1768 | 0.6250 ± 0.1768 | 1.50 | 4.00 | 10.5 | 6.0 | — |" in md
    assert "| strategy=flora, rank=8 | 1 | 0 | 0.2500 | 0.2500 | 1.50 | 4.00 | 10.0 | 5.5 | ∞ |" in md
    assert "Grouping keys (differ among the runs; `seed` and tracking/engine/path keys aside): `strategy.name`, `model.rank`" in md
    assert "`data.name=rotten_tomatoes`" in md and "`clients=2`" in md and "`rounds=2`" in md
    printed = capsys.readouterr().out
    assert "| strategy=fedavg, rank=4 | 3 | 0, 1, 2 | 0.7500 ± 0.2500 |" in printed and str(out / "compare.md") in printed


def test_incomplete_runs_are_listed_with_the_reason_and_kept_out_of_the_aggregates(sweep, tmp_path, capsys):
    runs, problems = compare.load_runs([sweep])
    assert len(runs) == 6  # not .hydra/, not the incomplete ones
    got = {p.path.name: (p.status, p.reason) for p in problems}
    assert got == {
        "crashed": ("missing", "no summary.json (crashed, still running or killed); metrics.jsonl holds rounds 0–1 of 2"),
        "failed": ("partial", "status failed: no round applied an update; rounds 0–1 of 2 logged"),
        "short": ("partial", "finished with rounds 0–1 of 2 logged"),
        "broken": ("unreadable", got["broken"][1]),
    }
    assert got["broken"][1].startswith("config.yaml unreadable: ")
    out = tmp_path / "out"
    assert compare.main([str(sweep), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    section = md.split("## Incomplete runs (not in the aggregates)")[1]
    for line in ("- missing: `crashed` — no summary.json", "- partial: `failed` — status failed", "- partial: `short` — finished with rounds 0–1 of 2",
                 "- unreadable: `deep/er/broken` — config.yaml unreadable"):
        assert line in section, section
    assert "4 incomplete runs are listed below" in md
    printed = capsys.readouterr().out
    assert "incomplete runs (not in the aggregates): 4" in printed and "- missing: `crashed`" in printed
    per_run = read_csv(out / "runs.csv")
    assert len(per_run) == 10
    status = {Path(r["path"]).name: (r["status"], r["in_aggregate"]) for r in per_run}
    assert status["crashed"] == ("missing", "0") and status["fedavg_8_s1"] == ("complete", "1")
    # the seed-2 fedavg/rank-8 runs are all incomplete: that group still has seeds 0 and 1 only
    assert {r["group"]: r["n"] for r in read_csv(out / "compare.csv")}["strategy=fedavg, rank=8"] == "2"


def test_one_config_is_one_group_and_perplexity_is_best_at_its_minimum(tmp_path):
    root = tmp_path / "lm"
    for seed, values in enumerate([[60.0, 20.0, 30.0], [50.0, 40.0, 10.0]]):
        cfg = config(model__task="causal_lm", seed=seed, tracking__experiment=f"exp{seed}")
        make_run(root / f"run{seed}", cfg, values, metric="perplexity", bytes_up=(0, 0))
    runs, problems = compare.load_runs([root])
    assert problems == [] and compare.default_metric(runs) == "perplexity"
    [group] = compare.group_runs(runs, "perplexity")
    assert group.label == "all runs" and group.seeds == [0, 1]
    assert group.stat("best") == (15.0, pytest.approx(math.sqrt(50)))  # min over rounds 1..2: 20 and 10
    assert group.stat("final") == (20.0, pytest.approx(math.sqrt(200)))
    md = compare.write_report([group], problems, tmp_path / "out", "perplexity", "LM")
    assert "best perplexity (min)" in md.read_text() and "none — every run shares one config" in md.read_text()
    assert "ε" not in md.read_text().split("\n\n")[2]  # no DP run: no ε column
    for name in ("perplexity_vs_round.png", "perplexity_vs_mb_up.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000


def test_a_key_an_older_run_lacks_reads_as_its_schema_default(tmp_path):
    """A run saved before fedpeft had ``peft.*`` and ``strategy.first`` is the same experiment as a
    newer one at their defaults (its seed joins the group), not one at a non-default value; the
    trained-parameter count is the mean over the runs that recorded it."""
    old = config(seed=0)
    make_run(tmp_path / "old", old, [0.1, 0.4, 0.5])
    new = config(seed=1, peft={"name": "lora", "num_virtual_tokens": 16, "vera_rank": 256, "feedforward_modules": [], "u": None})
    new["strategy"]["first"] = "B"
    make_run(tmp_path / "new", new, [0.1, 0.6, 0.7], trainable_params=1000)
    dora = config(seed=0, peft={"name": "dora"})
    make_run(tmp_path / "dora", dora, [0.1, 0.2, 0.3], trainable_params=1100)
    runs, problems = compare.load_runs([tmp_path])
    assert problems == []
    groups = {g.label: g for g in compare.group_runs(runs, "accuracy")}
    assert sorted(groups) == ["peft=dora", "peft=lora"]
    lora, other = groups["peft=lora"], groups["peft=dora"]
    assert (lora.seeds, other.seeds) == ([0, 1], [0])
    assert lora.stat("final") == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    assert lora.mean("params") == 1000 and other.mean("params") == 1100


def test_short_labels_keep_the_full_key_where_the_leaf_is_ambiguous(tmp_path):
    for i, (palpha, malpha, levels) in enumerate([(0.5, 16.0, [8, 4]), (1.0, 16.0, [8, 4]), (1.0, 32.0, [64, 32])]):
        make_run(tmp_path / f"r{i}", config(partition__alpha=palpha, model__alpha=malpha, ranks__levels=levels), [0.5, 0.5, 0.5])
    runs, _ = compare.load_runs([tmp_path])
    groups = compare.group_runs(runs, "accuracy")
    # ranks.levels follows from model.alpha here: the labels leave it out (the group's values keep it)
    assert [g.label for g in groups] == [
        "model.alpha=16.0, partition.alpha=0.5",
        "model.alpha=16.0, partition.alpha=1.0",
        "model.alpha=32.0, partition.alpha=1.0",
    ]
    assert [g.values["ranks.levels"] for g in groups] == ["[8,4]", "[8,4]", "[64,32]"]


def test_input_forms_run_dir_glob_and_experiment_name(sweep, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # sweep is tmp_path/runs/exp: the experiment "exp"
    runs, problems = compare.load_runs(["exp"])
    assert len(runs) == 6 and len(problems) == 4
    runs, problems = compare.load_runs([str(sweep / "multirun_1" / "flora_*"), str(sweep / "crashed")])
    assert [r.path.name for r in runs] == ["flora_8_s0"] and [p.path.name for p in problems] == ["crashed"]
    runs, _ = compare.load_runs([sweep / "multirun_1" / "fedavg_4_s0", sweep / "multirun_1" / "fedavg_4_s0" / "summary.json"])
    assert len(runs) == 1  # the same run named twice counts once
    assert compare.main(["exp"]) == 0  # default --out: the runs' common parent
    assert read_csv(sweep / "compare" / "compare.csv")[0]["group"] == "strategy=fedavg, rank=4"
    assert compare.load_runs(["exp"])[0].__len__() == 6  # exp/compare/ is not taken for a run


@pytest.mark.parametrize("path, says", [
    ("nowhere", "nowhere: no such run directory or folder, and no experiment runs/nowhere"),
    ("runs/exp/multirun_9*", "runs/exp/multirun_9*: no match"),
    ("runs/exp/deep/notes", "runs/exp/deep/notes: no fedpeft run directory there"),
])
def test_a_path_matching_nothing_is_one_line_naming_it(path, says, sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["compare", "exp", path]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"fedpeft compare: {says}") and err.count("\n") == 1 and out == ""
    assert not (sweep / "compare").exists()


def test_metric_option(sweep, tmp_path, capsys):
    assert compare.main([str(sweep), "--metric", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft compare: --metric nope: no run has it; available: accuracy, bytes_down") and err.count("\n") == 1
    assert compare.main([str(sweep), "--metric", "loss", "--out", str(tmp_path / "loss")]) == 0
    row = read_csv(tmp_path / "loss" / "compare.csv")[0]  # loss 1.0, 0.9, 0.8 in every run: best is the lowest
    assert float(row["loss_final_mean"]) == pytest.approx(0.8, abs=1e-15) and float(row["loss_best_mean"]) == pytest.approx(0.8, abs=1e-15)
    assert float(row["loss_best_std"]) == pytest.approx(0.0, abs=1e-15)
    assert (tmp_path / "loss" / "loss_vs_round.png").read_bytes().startswith(PNG)


def test_cli_lists_and_describes_compare(capsys):
    assert cli_main(["--help"]) == 0
    assert "compare PATH..." in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["compare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fedpeft compare" in out and "--metric NAME" in out and "seeds" in out


def test_fifteen_curves_get_fifteen_different_styles():
    """A PEFT sweep has 15 settings: tab10 alone would repeat five colours."""
    looks = compare.styles(15)
    assert len(set(looks)) == 15 and len({c for c, _, _ in looks}) == 10
    assert looks[0] == ("C0", "-", "o") and looks[10] == ("C0", "--", "s")


def test_a_metric_named_with_a_slash_plots_to_files_in_the_output_folder(tmp_path):
    """Generative metrics are named ``gen/accuracy``: the plots are ``gen_accuracy_vs_*.png`` in the
    output folder itself (no ``gen/`` folder), and the report links them so."""
    root = tmp_path / "gen"
    for seed, values in enumerate([[0.1, 0.2, 0.3], [0.0, 0.2, 0.4]]):
        make_run(root / f"run{seed}", config(model__task="causal_lm", seed=seed), values, metric="gen/accuracy", bytes_up=(0, 0))
    runs, problems = compare.load_runs([root])
    [group] = compare.group_runs(runs, "gen/accuracy")
    assert group.stat("final") == (pytest.approx(0.35), pytest.approx(math.sqrt(0.005)))
    md = compare.write_report([group], problems, tmp_path / "out", "gen/accuracy", "gen").read_text()
    for name in ("gen_accuracy_vs_round.png", "gen_accuracy_vs_mb_up.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG) and f"]({name})" in md
    assert not (tmp_path / "out" / "gen").exists()


# ---------------------------------------------------------------------------------------------
# Paired intervals against a baseline, and figures for a paper


def test_paired_interval_is_the_student_t_interval_for_any_number_of_pairs():
    """By hand: 12 pairs (the old hard-coded t table stopped at 10), t(0.975, 11) = 2.200985160 from a printed table."""
    diffs = [0.05, 0.02, 0.04, -0.01, 0.03, 0.06, 0.01, 0.02, 0.05, 0.00, 0.04, 0.03]
    mean = sum(diffs) / 12
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 11)
    half = 2.200985160 * sd / math.sqrt(12)
    got = compare.paired_interval(diffs)
    assert got == (pytest.approx(mean, abs=1e-15), pytest.approx(mean - half, abs=1e-9), pytest.approx(mean + half, abs=1e-9))
    # n = 2: t(0.975, 1) = 12.706204736
    lo, hi = compare.paired_interval([0.1, 0.3])[1:]
    assert (lo, hi) == (pytest.approx(0.2 - 12.706204736 * math.sqrt(0.02) / math.sqrt(2)), pytest.approx(0.2 + 12.706204736 * 0.1))
    assert compare.paired_interval([0.4])[0] == 0.4 and math.isnan(compare.paired_interval([0.4])[1])


def test_baseline_pairs_runs_by_seed_in_the_table_and_the_csv(tmp_path, capsys):
    """Twelve seeds of two strategies; the baseline lacks seed 11 (only 11 pairs), a third group has
    one seed (no interval). Differences are run against run at the same seed, not of the means."""
    root = tmp_path / "runs"
    base = [0.50 + 0.01 * s for s in range(11)]
    better = [b + d for b, d in zip(base, [0.05, 0.02, 0.04, -0.01, 0.03, 0.06, 0.01, 0.02, 0.05, 0.00, 0.04])] + [0.9]
    for s, v in enumerate(base):
        make_run(root / f"fedavg_s{s}", config(seed=s), [0.0, v / 2, v])
    for s, v in enumerate(better):
        make_run(root / f"flora_s{s}", config(strategy__name="flora", seed=s), [0.0, v / 2, v])
    make_run(root / "ffa_s3", config(strategy__name="ffa_lora", seed=3), [0.0, 0.1, 0.2])
    out = tmp_path / "out"
    assert compare.main([str(root), "--out", str(out), "--baseline", "strategy=fedavg"]) == 0
    diffs = [better[s] - base[s] for s in range(11)]
    mean = sum(diffs) / 11
    half = 2.228138852 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 10) / math.sqrt(11)  # t(0.975, 10)
    rows = {r["group"]: r for r in read_csv(out / "compare.csv")}
    flora, ffa, fedavg = rows["strategy=flora"], rows["strategy=ffa_lora"], rows["strategy=fedavg"]
    assert flora["baseline"] == "strategy=fedavg" and flora["pairs"] == "11" and flora["vs_baseline"] == "better"
    assert float(flora["accuracy_final_diff_mean"]) == pytest.approx(mean, abs=1e-12)
    assert float(flora["accuracy_final_diff_ci95_low"]) == pytest.approx(mean - half, abs=1e-8)
    assert float(flora["accuracy_final_diff_ci95_high"]) == pytest.approx(mean + half, abs=1e-8)
    assert float(ffa["accuracy_final_diff_mean"]) == pytest.approx(0.2 - 0.53) and ffa["pairs"] == "1"
    assert ffa["accuracy_final_diff_ci95_low"] == "" and ffa["vs_baseline"] == "—"
    assert fedavg["vs_baseline"] == "baseline" and fedavg["accuracy_final_diff_mean"] == ""
    md = (out / "compare.md").read_text()
    assert f"| {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] | 11 | better |" in md
    assert "| strategy=fedavg | 11 |" in md and "| baseline |  |  |" in md and "Baseline: `strategy=fedavg`." in md
    assert f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]" in capsys.readouterr().out


@pytest.mark.parametrize("baseline, says", [("strategy=nope", "matches no group; the groups: strategy=fedavg, rank=4; "),
                                            ("strategy=fedavg", "matches several groups; the groups: strategy=fedavg, rank=4; strategy=fedavg, rank=8\n")])
def test_a_baseline_naming_no_group_or_several_is_one_line(baseline, says, sweep, tmp_path, capsys):
    assert compare.main([str(sweep), "--out", str(tmp_path / "o"), "--baseline", baseline]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedpeft compare: --baseline {baseline}: ") and says in err and err.count("\n") == 1
    assert compare.main([str(sweep), "--out", str(tmp_path / "o"), "--baseline", "strategy=fedavg, rank=4"]) == 0  # a label


def test_labels_leave_out_keys_that_follow_from_others_and_show_epsilon_as_its_value(tmp_path):
    """A privacy sweep: weighting follows from the strategy, the noise multiplier from ε; a null
    target ε (σ = 0) is the ε spent, ∞ — not `target_epsilon=null`."""
    for strategy, weighting in (("fedavg", "num_examples"), ("dp_lora", "uniform")):
        for eps, sigma in ((1.0, None), (None, 0.0)):
            cfg = config(strategy__name=strategy, strategy__weighting=weighting, privacy__mode="sample")
            cfg["privacy"].update(target_epsilon=eps, noise_multiplier=sigma)
            make_run(tmp_path / f"{strategy}_{eps}", cfg, [0.1, 0.2, 0.3], epsilon=0.98 if eps else math.inf)
    runs, _ = compare.load_runs([tmp_path])
    groups = compare.group_runs(runs, "accuracy")
    assert sorted(g.label for g in groups) == ["strategy=dp_lora, ε=1.0", "strategy=dp_lora, ε=∞", "strategy=fedavg, ε=1.0", "strategy=fedavg, ε=∞"]
    md = compare.write_report(groups, [], tmp_path / "out", "accuracy").read_text()
    assert "the labels leave out `strategy.weighting`, `privacy.noise_multiplier`: they follow from the others" in md
    assert compare.find_group(groups, "strategy=fedavg,ε=∞").values["privacy.noise_multiplier"] == 0.0


def _groups(tmp_path, n: int, personal: int | None = None, majority: float | None = 0.25):
    """``n`` groups with long labels (three differing keys), two seeds each; group ``personal``
    logs a personalised evaluation (FedSA-LoRA)."""
    for i in range(n):
        for seed in (0, 1):
            extra = {"majority_rate": majority} if majority is not None else {}
            run = make_run(tmp_path / "runs" / f"g{i}_s{seed}", config(strategy__name=f"a_strategy_with_a_long_name_for_a_legend_entry_{i}", model__rank=2 + i,
                           partition__alpha=0.1 * (i + 1), seed=seed), [0.1, 0.2 + 0.01 * i, 0.3 + 0.01 * i + 0.01 * seed], **extra)
            if i == personal:
                rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                summary = json.loads((run / "summary.json").read_text())
                summary["history"] = [{**r, "personal/accuracy_mean": r["accuracy"], "personal/clients": 2} for r in rows]
                (run / "summary.json").write_text(json.dumps(summary))
    runs, _ = compare.load_runs([tmp_path / "runs"])
    return compare.group_runs(runs, "accuracy")


@pytest.mark.parametrize("n", [3, 8, 15])
def test_the_legend_sits_beside_the_axes_inside_the_figure(n, tmp_path):
    """Never over the curves, never cut off at the figure's edge (8 long labels were, at the right edge)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for x in ("round", "mb_up"):
        fig = compare.figure(_groups(tmp_path / x, n), "accuracy", x, "t", 0.25)
        FigureCanvasAgg(fig).draw()
        (ax,) = fig.axes
        legend, axes, whole = ax.get_legend().get_window_extent(), ax.get_window_extent(), fig.bbox
        assert legend.x0 >= axes.x1 and whole.x0 <= legend.x0 and legend.x1 <= whole.x1 and whole.y0 <= legend.y0 and legend.y1 <= whole.y1
        assert axes.width >= 0.4 * whole.width  # room left for the curves
        assert len(ax.get_legend().get_texts()) == n + 1  # every group, and the majority class


def test_bytes_on_a_log_axis_personalised_marked_majority_line_and_title(tmp_path):
    groups = _groups(tmp_path, 3, personal=1, majority=0.25)
    by_mb = compare.figure(groups, "accuracy", "mb_up", "t", 0.25)
    (ax,) = by_mb.axes
    assert ax.get_xscale() == "log"
    curves = {line.get_label(): line for line in ax.get_lines()}
    personal = [label for label in curves if "personalised" in label]
    assert personal == [f"{groups[1].label} (n=2) — personalised: clients' own models"]
    assert curves[personal[0]].get_markerfacecolor() == "white"
    assert curves[f"{groups[0].label} (n=2)"].get_markerfacecolor() != "white"
    assert min(curves[personal[0]].get_xdata()) > 0  # round 0 (0 MB) is left off the log axis
    assert list(curves["majority class (0.250)"].get_ydata()) == [0.25, 0.25]
    assert compare.figure(groups, "accuracy", "round", "t", 0.25).axes[0].get_xscale() == "linear"
    md = compare.write_report(groups, [], tmp_path / "out", "accuracy").read_text()
    assert md.startswith("# accuracy: rotten_tomatoes, minilm, 2 clients, iid partition, 2 rounds\n")  # not the folder's name
    assert f"| {groups[1].label} † |" in md and "† personalised: the metric is the mean over clients" in md
    assert "Majority class (predicting the test set's largest class): 0.2500." in md


def test_no_majority_line_where_a_run_does_not_know_it(tmp_path):
    groups = _groups(tmp_path, 2, majority=None)
    assert compare.majority(groups, "accuracy") is None
    assert compare.majority(_groups(tmp_path / "b", 2), "loss") is None  # not accuracy: no such line


def test_plots_in_pdf_and_svg(tmp_path, capsys):
    _groups(tmp_path, 2)
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "runs"), "--out", str(out), "--format", "pdf,svg"]) == 0
    for x in ("round", "mb_up"):
        assert (out / f"accuracy_vs_{x}.pdf").read_bytes().startswith(b"%PDF")
        assert b"<svg" in (out / f"accuracy_vs_{x}.svg").read_bytes()[:500]
        assert not (out / f"accuracy_vs_{x}.png").exists()
    assert "](accuracy_vs_round.pdf)" in (out / "compare.md").read_text()
    assert str(out / "accuracy_vs_mb_up.svg") in capsys.readouterr().out
    assert compare.main([str(tmp_path / "runs"), "--out", str(out), "--format", "png,jpg"]) == 2
    assert capsys.readouterr().err == "fedpeft compare: --format png,jpg: unknown format jpg; choose from png, pdf, svg\n"

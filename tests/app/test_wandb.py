"""W&B runs that can be compared: the offline run files read back with W&B's own record format
(``wandb_internal_pb2.Record`` in the LevelDB-style log ``run-<id>.wandb``) hold exactly what
``metrics.jsonl`` holds, round by round, the resolved config, the group/job_type/tags, the round as
the x-axis and the final/best/total values in the summary. In-process, no Ray (the reader:
tests/harness.py; what a run tells W&B, without W&B: tests/unit/test_wandb.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fedpeft.tracking import Tracker, hydra_overrides
from tests.harness import assert_history_is_metrics_jsonl, jsonl, offline_runs

CONFIG = {"strategy": {"name": "flora", "weighting": "num_examples"}, "model": {"name": "minilm", "rank": 8, "target_modules": ["query", "value"]},
          "privacy": {"mode": "central", "target_epsilon": 8.0, "delta": 1e-5}, "tracking": {"experiment": "cmp", "group": None}, "seed": 3}


def row_of(r: int) -> dict:
    """Realistic metrics rows: round 0 is the evaluation before training (no client statistics)."""
    row = {"accuracy": [0.5123, 0.70311, 0.6875][r], "loss": [0.69314718, 0.58, 0.6012345678901234][r]}
    if r:
        row.update(train_loss=0.61 / r, clients_sampled=4, clients_replied=4, clients_failed=0, clients_rejected=0,
                   bytes_down=123456 * r, bytes_up=65432, round_seconds=1.25 * r, round_applied=1, epsilon=2.5 * r)
    return row


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    tags = ["strategy:flora", "data:election_tweets", "privacy:central", "model.rank=8", "seed=3"]
    t = Tracker(run_dir, CONFIG, mode="offline", project="fedpeft-test", group="cmp", tags=tags, job_type="flora")
    for r in range(3):
        t.log_round(r, row_of(r))
    history = [{"round": r, **row_of(r)} for r in range(3)]
    t.finish({"run_dir": str(run_dir), "strategy": "flora", "rounds": 2, "status": "finished", "seconds": 12.5, "history": history,
              "final": {k: v for k, v in history[-1].items()}, "privacy": {"mode": "central", "noise_multiplier": 0.9, "epsilon": 4.75, "delta": 1e-5}})
    return run_dir, tags


def test_every_logged_row_equals_its_metrics_jsonl_row(offline):
    run_dir, _ = offline
    (run,) = offline_runs(run_dir)
    rows = jsonl(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert len(run.history) == 3
    assert_history_is_metrics_jsonl(run.history, rows)
    assert run.history[1]["loss"] == 0.58 and run.history[2]["loss"] == 0.6012345678901234  # not rounded on the way


def test_the_round_is_the_x_axis(offline):
    run_dir, _ = offline
    (run,) = offline_runs(run_dir)
    defined = {(m.name, m.glob_name): m.step_metric for m in run.metrics}
    assert ("round", "") in defined
    assert defined[("", "*")] == "round"


def test_group_job_type_tags_and_the_nested_config(offline):
    run_dir, tags = offline
    (run,) = offline_runs(run_dir)
    assert run.run.run_group == "cmp" and run.run.job_type == "flora" and run.run.display_name == "run"
    assert list(run.run.tags) == tags
    assert run.config == CONFIG
    assert run.config["model"]["target_modules"] == ["query", "value"]
    assert run.run.run_id == (run_dir / "wandb-id").read_text().strip()


def test_the_summary_has_final_best_totals_and_epsilon(offline):
    run_dir, _ = offline
    (run,) = offline_runs(run_dir)
    s, last = run.summary, jsonl(run_dir)[-1]
    for k, v in last.items():
        assert s[f"final/{k}"] == v, k
    assert s["best/accuracy"] == 0.70311 and s["best/round"] == 1  # max, not the last
    assert s["total/mb_up"] == pytest.approx(2 * 65432 / 1e6) and s["total/mb_down"] == pytest.approx(3 * 123456 / 1e6)
    assert s["privacy/epsilon"] == 4.75 and s["privacy/mode"] == "central" and s["final/epsilon"] == 5.0
    assert s["accuracy"] == 0.6875  # W&B's own: the last logged value of each metric
    assert (s["status"], s["seconds"], s["strategy"], s["rounds"]) == ("finished", 12.5, "flora", 2)
    assert "history" not in s
    assert run.exit_code == [0]


def test_resume_continues_the_same_wandb_run_with_every_round(tmp_path):
    """A run killed (SIGKILL) after round 1 had round 1 in metrics.jsonl but not in its W&B file
    (wandb-core, killed with it, had not written it out: tests/e2e/test_resume.py's killed run shows
    it); the resumed run has the same id, and its offline run (``wandb/latest-run``) every round."""
    run_dir = tmp_path / "run"
    first = Tracker(run_dir, CONFIG, mode="offline", project="fedpeft-test", group="cmp", tags=["a"], job_type="flora")
    first.log_round(0, row_of(0))
    run_id = first.wandb.id
    first.finish({"status": "interrupted"}, exit_code=130)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 1, "elapsed_s": 9.5, **row_of(1)}) + "\n")
    again = Tracker(run_dir, CONFIG, mode="offline", project="fedpeft-test", group="cmp", tags=["a"], job_type="flora", resume=True)
    again.log_round(2, row_of(2))
    again.finish({"status": "finished"})
    assert (run_dir / "wandb-id").read_text().strip() == run_id
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and {r.run.run_id for r in runs} == {run_id}
    assert [h["round"] for h in runs[0].history] == [0]
    assert (run_dir / "wandb" / "latest-run").resolve() == runs[1].path.resolve()
    assert_history_is_metrics_jsonl(runs[1].history, jsonl(run_dir))  # rounds 0, 1, 2
    assert runs[1].summary["best/accuracy"] == 0.70311 and runs[1].summary["best/round"] == 1
    assert [m.step_metric for m in runs[1].metrics if m.glob_name == "*"] == ["round"]


def test_a_fresh_run_in_the_same_directory_gets_a_new_id(tmp_path):
    first = Tracker(tmp_path / "a", CONFIG, mode="offline", project="fedpeft-test", group="g", tags=[])
    first.finish({"status": "finished"})
    second = Tracker(tmp_path / "a", CONFIG, mode="offline", project="fedpeft-test", group="g", tags=[], resume=False)
    second.finish({"status": "finished"})
    assert len({r.run.run_id for r in offline_runs(tmp_path / "a")}) == 2


def test_open_tracking_groups_tags_and_types_the_run(tmp_path):
    """The server's wiring (serverapp.Federation.open_tracking) without a federation: group from
    tracking.group, job_type the strategy, tags with Hydra's recorded overrides and tracking.tags."""
    from datasets import Dataset
    from omegaconf import OmegaConf

    from fedpeft.config import typed
    from fedpeft.serverapp import Federation

    cfg = typed({"strategy": {"name": "hetlora"}, "privacy": {"mode": "central"}, "compression": {"uplink": "int8", "downlink": "int8"},
                 "tracking": {"mode": "offline", "experiment": "exp", "group": "sweep-7", "tags": ["lr-sweep"]}, "clients": 3})
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- strategy=hetlora\n- model.rank=8\n- tracking.mode=offline\n- engine.num_cpus=1\n")
    fed = SimpleNamespace(cfg=cfg, run_dir=run_dir, resume=False, ranks=[2, 4, 8], alphas=[16, 16, 16], plan=None,
                          test=Dataset.from_dict({"label": [0, 1, 1]}))
    Federation.open_tracking(fed)
    fed.tracker.finish({"status": "finished"})
    (run,) = offline_runs(run_dir)
    assert (run.run.run_group, run.run.job_type) == ("sweep-7", "hetlora")
    assert list(run.run.tags) == ["strategy:hetlora", "data:election_tweets", "partition:iid", "clients:3", "ranks:fixed:2-8",
                                  "privacy:central", "uplink:int8", "downlink:int8", "strategy=hetlora", "model.rank=8", "lr-sweep"]
    assert run.config == OmegaConf.to_container(cfg, resolve=True)
    assert hydra_overrides(tmp_path / "nowhere") == []


def test_without_a_group_the_experiment_is_the_group(tmp_path):
    from datasets import Dataset

    from fedpeft.config import typed
    from fedpeft.serverapp import Federation

    cfg = typed({"tracking": {"mode": "offline", "experiment": "exp"}})
    fed = SimpleNamespace(cfg=cfg, run_dir=tmp_path / "run", resume=False, ranks=[8] * 10, alphas=[16] * 10, plan=None,
                          test=Dataset.from_dict({"label": [0, 1, 1]}))
    Federation.open_tracking(fed)
    fed.tracker.finish({"status": "finished"})
    (run,) = offline_runs(tmp_path / "run")
    assert (run.run.run_group, run.run.job_type) == ("exp", "fedavg")
    assert list(run.run.tags) == ["strategy:fedavg", "data:election_tweets", "partition:iid", "clients:10", "ranks:8"]

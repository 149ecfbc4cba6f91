"""What a run tells W&B, without W&B: the varied keys, the tags and the summary's best values (the
offline run files read back: tests/app/test_wandb.py)."""

from __future__ import annotations

from types import SimpleNamespace

from fedpeft.tracking import run_summary, run_tags, varied_keys


def test_the_varied_keys_are_the_overrides_but_bookkeeping():
    words = ["strategy=flora", "+preset=shakespeare", "model.rank=8", "tracking.mode=offline", "hydra.run.dir=x",
             "engine.num_cpus=1", "resume=runs/x", "~model.head", "++seed=3", "data.name=a/b"]
    assert varied_keys(words) == ["strategy=flora", "preset=shakespeare", "model.rank=8", "seed=3", "data.name=a/b"]


def test_tags_name_the_run_and_then_what_varied():
    cfg = SimpleNamespace(strategy=SimpleNamespace(name="flora"), data=SimpleNamespace(name="newsgroups"), partition=SimpleNamespace(kind="dirichlet"),
                          clients=10, privacy=SimpleNamespace(mode="none"), compression=SimpleNamespace(uplink="none", downlink="none"),
                          server=SimpleNamespace(optimizer="none"))
    assert run_tags(cfg, "flora:2-8", ["model.rank=8", "strategy:flora"]) == [
        "strategy:flora", "data:newsgroups", "partition:dirichlet", "clients:10", "ranks:flora:2-8", "model.rank=8"]
    cfg.privacy.mode, cfg.compression.uplink, cfg.server.optimizer = "local", "topk", "fedadam"
    tags = run_tags(cfg, "8", ["x" * 100])
    assert tags[-4:] == ["privacy:local", "server:fedadam", "uplink:topk", "x" * 64]


def test_perplexity_is_best_at_its_minimum():
    rows = [{"round": 0, "perplexity": 40.0}, {"round": 1, "perplexity": 20.5}, {"round": 2, "perplexity": 22.0}]
    s = run_summary({"status": "finished"}, rows)
    assert (s["best/perplexity"], s["best/round"], s["final/perplexity"]) == (20.5, 1, 22.0)
    assert "best/accuracy" not in s and "total/mb_up" not in s
    rows[0]["perplexity"] = 10.0  # before training: not a result (as in `fedpeft compare`)
    assert run_summary({}, rows)["best/perplexity"] == 20.5
    assert run_summary({}, rows[:1])["best/perplexity"] == 10.0  # unless it is the only round

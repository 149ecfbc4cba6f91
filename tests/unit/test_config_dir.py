"""A user's own YAML: ``fedpeft simulate --config-dir DIR --config-name NAME`` (Hydra's flags), with
``+preset=`` options from the user's directory; bad flags and files refused in one line."""

import pytest

from tests.harness import run_cli

MINE = """\
defaults:
  - config
  - override strategy: flora
  - override ranks: flora
  - _self_
rounds: 5
clients: 7
train:
  lr: 0.002
"""
FAST = "# @package _global_\ntrain:\n  local_steps: 3\n"


@pytest.fixture
def user_dir(tmp_path):
    d = tmp_path / "conf"
    (d / "preset").mkdir(parents=True)
    (d / "mine.yaml").write_text(MINE)
    (d / "preset" / "fast.yaml").write_text(FAST)
    return d


@pytest.mark.parametrize("flags", [["--config-dir", "{d}", "--config-name", "mine"], ["-cd", "{d}", "-cn", "mine"],
                                   ["--config-dir={d}", "--config-name=mine"]])
def test_a_users_config_reaches_the_run(flags, user_dir, tmp_path, monkeypatch, capsys):
    """The config the run gets (simulation.run, here captured) is the user's file on top of fedpeft's,
    their own preset applied, and command-line overrides on top of both."""
    from fedpeft import simulation

    seen = {}

    def run(cfg, run_dir, **kwargs):
        seen["cfg"] = cfg

    monkeypatch.setattr(simulation, "run", run)
    words = [f.format(d=user_dir) for f in flags]
    code, out, err = run_cli(["simulate", *words, "+preset=fast", "seed=3"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    cfg = seen["cfg"]
    assert (cfg.rounds, cfg.clients, cfg.seed, cfg.train.lr, cfg.train.local_steps) == (5, 7, 3, 0.002, 3)
    assert cfg.strategy.name == "flora" and cfg.ranks.kind == "list"
    assert cfg.model.name == "minilm"  # everything else: fedpeft's defaults


@pytest.mark.parametrize("words, expected", [
    (["--config-dir", "{d}/nope", "--config-name", "mine"], "--config-dir: {d}/nope is not a directory"),
    (["--config-dir", "{d}", "--config-name", "theirs"], "--config-name: no theirs.yaml in {d}; it has bare, mine"),
    (["--config-name", "mine"], "--config-name: give the directory that holds it too (--config-dir DIR)"),
    (["--config-dir"], "--config-dir: needs a value (--config-dir DIR)"),
    (["--config-dir", "{d}", "--config-name", "bare"], "must build on fedpeft's config: start it with 'defaults: [config, _self_]'"),
    (["--config-dir", "{d}", "--config-name", "mine", "+preset=slow"], "preset: no option 'slow'"),
])
def test_bad_config_flags_are_one_line(words, expected, user_dir, tmp_path, monkeypatch, capsys):
    (user_dir / "bare.yaml").write_text("rounds: 2\n")
    code, out, err = run_cli(["simulate", *[w.format(d=user_dir) for w in words]], tmp_path, monkeypatch, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("fedpeft: config error: ") and expected.format(d=user_dir) in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()

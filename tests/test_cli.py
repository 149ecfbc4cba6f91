"""Config errors: one line naming the culprit, non-zero exit, nothing written."""


import pytest

from fedpeft.cli import main


def run_cli(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("foo=1", "unknown key 'foo'"),
        ("model.bogus=3", "unknown key 'model.bogus'"),
        ("+train.bogus=3", "unknown key 'train.bogus'"),
        ("rounds=abc", "rounds: Value 'abc' of type 'str' could not be converted to Integer"),
        ("train.lr=fast", "train.lr:"),
        ("strategy=nope", "strategy: no option 'nope'; available: dp_lora, fedavg"),
        ("fraction=1.5", "fraction: must be in (0, 1], got 1.5"),
        ("partition.kind=random", "partition.kind: unknown value 'random'"),
        ("tracking.mode=loud", "tracking.mode: unknown value 'loud'"),
        ("strategy=dp_lora", "privacy.mode: strategy=dp_lora trains every client with DP-SGD: use privacy=sample"),
        ("privacy=sample", "privacy.noise_multiplier: privacy.mode=sample needs a noise multiplier or a privacy.target_epsilon"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon: must be positive"),
        ("privacy.mode=global", "privacy.mode: unknown value 'global'"),
        ("compression.uplink=zip", "compression.uplink: unknown value 'zip'"),
        ("compression.downlink=topk", "compression.downlink: unknown value 'topk'"),
        ("compression.topk_fraction=0", "compression.topk_fraction: must be in (0, 1]"),
    ],
)
def test_config_errors_are_one_line_naming_the_key_and_write_nothing(override, expected, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["simulate", override], tmp_path, monkeypatch, capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedpeft: config error: ")
    assert expected in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_asset_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "empty-cache"))
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_cli(["simulate"], work, monkeypatch, capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "missing asset" in lines[0] and "fedpeft fetch-assets" in lines[0], err
    assert list(work.iterdir()) == []


def test_help_lists_groups_and_keys(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["simulate", "--help"], tmp_path, monkeypatch, capsys)
    assert code == 0
    for group in ("strategy: dp_lora, fedavg", "model: minilm, smollm2", "partition: dirichlet, iid, natural, shards", "engine: ray", "privacy: central, local, none, sample", "compression: bf16, fp16, int4, int8, none, topk"):
        assert group in out, out
    for key in ("clients: 10", "rounds:", "fraction:", "seed:", "local_steps:", "num_gpus:", "ray_address:", "failure_rate:", "target_epsilon:", "topk_fraction:"):
        assert key in out
    assert list(tmp_path.iterdir()) == []


def test_unknown_command(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["simulat"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "unknown command 'simulat'" in err

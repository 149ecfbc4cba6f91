"""Config errors: one line naming the culprit, non-zero exit, nothing written."""


import pytest

from tests.harness import config_error, run_cli


@pytest.mark.parametrize(
    "override, expected",
    [
        ("foo=1", "unknown key 'foo'"),
        ("model.bogus=3", "unknown key 'model.bogus'"),
        ("+train.bogus=3", "unknown key 'train.bogus'"),
        # a key in the wrong group, or misspelt, names the key the user meant
        ("peft.rank=4", "unknown key 'peft.rank' (Key 'rank' not in 'PeftConfig'); did you mean 'model.rank'?"),
        ("train.lrr=0.1", "did you mean 'train.lr'?"),
        ("model.lr=0.1", "did you mean 'train.lr' or 'server.lr'?"),
        ("rounds=abc", "rounds: Value 'abc' of type 'str' could not be converted to Integer"),
        ("train.lr=fast", "train.lr:"),
        ("strategy=nope", "strategy: no option 'nope'; available: dp_lora, fed_sb, fedavg, federa"),
        ("fraction=1.5", "fraction: must be in (0, 1], got 1.5"),
        ("partition.kind=random", "partition.kind: unknown value 'random'"),
        ("tracking.mode=loud", "tracking.mode: unknown value 'loud'"),
        ("strategy=dp_lora privacy=none", "privacy.mode: strategy=dp_lora does not work with privacy.mode=none; use privacy=sample"),
        ("strategy=dp_lora privacy=local", "privacy.mode: strategy=dp_lora does not work with privacy.mode=local; use privacy=sample"),
        ("privacy=sample", "privacy.noise_multiplier: privacy.mode=sample needs a noise multiplier or a privacy.target_epsilon"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon: must be positive"),
        ("privacy.mode=global", "privacy.mode: unknown value 'global'"),
        ("compression.uplink=zip", "compression.uplink: unknown value 'zip'"),
        ("compression.downlink=topk", "compression.downlink: unknown value 'topk'"),
        ("compression.topk_fraction=0", "compression.topk_fraction: must be in (0, 1]"),
        # what a strategy accepts comes from its class (weightings, heterogeneous_ranks, privacy_modes)
        ("strategy=fedavg strategy.weighting=sparsity", "strategy.weighting: strategy=fedavg does not take 'sparsity'; expected one of num_examples, uniform"),
        ("strategy=flora strategy.weighting=sparsity", "strategy.weighting: strategy=flora does not take 'sparsity'"),
        ("strategy=dp_lora privacy=sample privacy.noise_multiplier=1 strategy.weighting=sparsity",
         "strategy.weighting: strategy=dp_lora does not take 'sparsity'"),
        ("strategy=dp_lora privacy=sample privacy.noise_multiplier=1 ranks=flora", "ranks.kind: strategy=dp_lora needs one rank for all clients"),
        ("strategy=fedavg ranks=heavy_tail", "ranks.kind: strategy=fedavg needs one rank for all clients"),
        ("strategy=fedavg ranks=heavy_tail", "use a strategy that takes heterogeneous ranks (ffa_lora, flexlora, flora, hetlora, raflora)"),
        # from the model's architecture on the meta device, before Ray starts
        ("peft=bitfit model=smollm2", "peft.name: peft=bitfit trains bias terms only, and model 'smollm2' has none"),
        ("peft=ia3 peft.feedforward_modules=[nope]", "peft.feedforward_modules: 'nope' matches no module of model 'minilm'"),
        ("peft=lora_xs peft.u=0", "peft.u: must be at least 1 (or null: model.rank²), got 0"),
        # MiniLM has 512 positions: 449 prompt tokens + 64 do not fit (measured: the forward raises), 448 do
        ("peft=prompt_tuning peft.num_virtual_tokens=449 model.max_length=64",
         "peft.num_virtual_tokens: 449 virtual tokens + model.max_length 64 exceed the 512 positions of model 'minilm'; use at most 448"),
        ("peft=prefix_tuning peft.num_virtual_tokens=500", "peft.num_virtual_tokens: 500 virtual tokens + model.max_length"),
        # no strategy takes heterogeneous ranks with VeRA: it says so rather than naming strategies that refuse it
        ("peft=vera ranks=flora", "heterogeneous ranks (ffa_lora, flexlora, flora, hetlora, raflora) cannot take peft=vera: use ranks=fixed"),
        ("strategy=ffa_lora privacy=central privacy.noise_multiplier=1",
         "privacy.mode: strategy=ffa_lora does not work with privacy.mode=central; use privacy=none | sample | local"),
        # values that used to pass and then fail every client, or fail far from the key
        ("train.weight_decay=-1", "train.weight_decay: must be non-negative, got -1.0"),
        ("train.optimizer=lion", "train.optimizer: unknown value 'lion'; expected one of adamw, sgd"),
        ("train.momentum=0.9", "train.momentum: applies to train.optimizer=sgd only"),
        ("train.optimizer=sgd train.momentum=1.0", "train.momentum: must be in [0, 1), got 1.0"),
        ("engine.round_timeout=-1", "engine.round_timeout: must be positive"),
        ("seed=-1", "seed: must be in [0, 2**32), got -1"),
        ("model.dropout=1.5", "model.dropout: must be in [0, 1), got 1.5"),
        ("model.eval_batch_size=0", "model.eval_batch_size: must be at least 1"),
        ("strategy=hetlora strategy.gamma=0", "strategy.gamma: must be in (0, 1]"),
        ("strategy=flexlora ranks=heavy_tail strategy.svd=fast", "strategy.svd: unknown value 'fast'; expected one of auto, exact"),
        ("strategy=flexlora ranks=heavy_tail strategy.svd_tol=0", "strategy.svd_tol: must be in (0, 1), got 0.0"),
        ("strategy=flexlora ranks=heavy_tail strategy.r_max=0", "strategy.r_max: must be at least 1 (or null), got 0"),
        ("strategy=flexlora strategy.r_max=many", "strategy.r_max:"),
        ("partition=dirichlet partition.min_partition_size=-1", "partition.min_partition_size: must be at least 1"),
        ("partition=dirichlet partition.alpha=0.01 partition.min_partition_size=0 clients=50", "partition.min_partition_size: must be at least 1"),
        ("clients=4 min_clients=10", "min_clients: 10 clients per round asked for, but there are only clients=4"),
        # ranks larger than the smallest targeted module (MiniLM: 384x384), from the model's config alone
        ("model.rank=1000",
         "model.rank: rank 1000 exceeds 384, the most that the smallest targeted module (bert.encoder.layer.0.attention.self.query, 384x384) can use"),
        ("strategy=flora ranks=flora ranks.levels=[8,400]", "ranks.levels: rank 400 exceeds 384"),
        ("strategy=hetlora ranks=hetlora ranks.r_max=500", "ranks.r_max: rank 500 exceeds 384"),
        ("model.target_modules=[nope]", "model.target_modules: ['nope'] do not fit model 'minilm'"),
        ("model.target_modules=[query,nope]", "model.target_modules: 'nope' matches no module of model 'minilm'"),
        ("model.name=nobody/no-such-model", "model.name: 'nobody/no-such-model'"),
        # a built-in dataset's columns are fixed
        ("data.label_column=bogus", "data.label_column: built-in data 'election_tweets' has the fixed columns text, label"),
        ("data.text_column=body", "data.text_column: built-in data 'election_tweets'"),
        ("data=rotten_tomatoes data.group_column=movie", "data.group_column: built-in data 'rotten_tomatoes' has the fixed columns text, label, group"),
        # the privacy plan (its noise multiplier from the partitions' sampling rates) is computed before anything runs
        ("strategy=dp_lora privacy=sample privacy.target_epsilon=0.05", "privacy.target_epsilon=0.05 is unreachable at delta="),
        # a local Ray cannot place a client that asks for more than the machine has
        ("engine.num_cpus=100", "engine.num_cpus: 100 CPUs per client asked for, but this machine has"),
        ("tracking.fallback=later", "tracking.fallback: unknown value 'later'"),
    ],
)
def test_config_errors_are_one_line_naming_the_key_and_write_nothing(override, expected, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedpeft: config error: ")
    assert expected in lines[0], lines[0]
    assert list(tmp_path.rglob("*")) == []  # no run dir, no .hydra/, no cli.log


@pytest.mark.parametrize(
    "words, expected",
    [  # (mode, noise multiplier, target ε, clip) after composition
        (["strategy=dp_lora"], ("sample", None, 8.0, 1.0)),
        (["strategy=dp_lora", "privacy.noise_multiplier=1.5"], ("sample", 1.5, None, 1.0)),
        (["strategy=dp_lora", "privacy.target_epsilon=3"], ("sample", None, 3.0, 1.0)),
        (["strategy=dp_lora", "privacy.clip=0.5"], ("sample", None, 8.0, 0.5)),
        (["strategy=dp_lora", "privacy=sample", "privacy.delta=1e-6"], ("sample", None, 8.0, 1.0)),
        (["strategy=fedavg"], ("none", None, None, 1.0)),
    ],
)
def test_dp_lora_as_typed_selects_sample_dp_with_its_default_target(words, expected, tmp_path):
    """``strategy=dp_lora`` alone is sample-level DP at ε = 8 (DPLoRA.privacy_default); any
    privacy key the user types wins over the default."""
    from fedpeft.composing import compose

    pv = compose([*words, f"hydra.run.dir={tmp_path / 'run'}"]).privacy
    assert (pv.mode, pv.noise_multiplier, pv.target_epsilon, pv.clip) == expected


@pytest.mark.parametrize(
    "words, expected",
    [
        (["strategy=flexlora"], ("auto", None, 1e-5)),
        (["strategy=flexlora", "strategy.svd=exact"], ("exact", None, 1e-5)),
        (["strategy=flexlora", "strategy.r_max=96", "strategy.svd_tol=1e-4"], ("auto", 96, 1e-4)),
    ],
)
def test_flexlora_svd_keys_reach_the_strategy(words, expected, tmp_path):
    """``strategy.svd``, ``strategy.r_max`` and ``strategy.svd_tol`` compose, validate and arrive in
    the FlexLoRA the server builds (fedpeft.serverapp.strategy_kwargs)."""
    import strategies
    from fedpeft.composing import compose
    from fedpeft.serverapp import strategy_kwargs

    cfg = compose([*words, "ranks=heavy_tail", f"hydra.run.dir={tmp_path / 'run'}"])
    s = strategies.build(cfg.strategy.name, **strategy_kwargs(cfg))
    assert (s.svd, s.r_max, s.svd_tol) == expected
    assert list(tmp_path.iterdir()) == []


def test_dp_lora_default_reaches_the_run_in_single_and_multirun(tmp_path, monkeypatch, capsys):
    """The Hydra job path (``fedpeft simulate``, also ``--multirun``) applies the default per job."""
    from fedpeft import simulation

    seen = []
    monkeypatch.setattr(simulation, "run", lambda cfg, run_dir, **kw: seen.append((cfg.strategy.name, cfg.privacy.mode, cfg.privacy.target_epsilon)))
    assert run_cli(["simulate", "strategy=dp_lora", "clients=4"], tmp_path, monkeypatch, capsys)[0] == 0
    assert seen == [("dp_lora", "sample", 8.0)]
    seen.clear()
    assert run_cli(["simulate", "--multirun", "strategy=fedavg,dp_lora", "clients=4"], tmp_path, monkeypatch, capsys)[0] == 0
    assert seen == [("fedavg", "none", None), ("dp_lora", "sample", 8.0)]


def test_an_existing_run_dir_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    old = tmp_path / "old"
    (old / "adapters" / "round_002").mkdir(parents=True)
    (old / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(["simulate", "clients=4", "rounds=2", "hydra.run.dir=old"], tmp_path, monkeypatch, capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedpeft: config error: hydra.run.dir: old already holds adapters, metrics.jsonl"), lines[0]
    assert "or continue that run with resume=old" in lines[0]
    assert sorted(tmp_path.rglob("*")) == before
    assert (old / "metrics.jsonl").read_text().count("\n") == 3
    # an empty directory, or one with only Hydra's own files, is fine
    from fedpeft.composing import compose

    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty" / "cli.log").write_text("")
    compose(["clients=4", "rounds=2", f"hydra.run.dir={tmp_path / 'empty'}"])


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path, monkeypatch, capsys):
    """A user error raised by simulation.run (found after Hydra made the run dir) removes the
    dir if it holds only Hydra's .hydra/ and cli.log; a dir with anything of the run's is kept."""
    from fedpeft import simulation
    from fedpeft.models import ModelError

    def failing_run(writes):
        def run(cfg, run_dir, **kwargs):
            assert (run_dir / ".hydra").is_dir()
            if writes:
                (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
            raise ModelError("model 'x': broken")

        return run

    monkeypatch.setattr(simulation, "run", failing_run(False))
    code, out, err = run_cli(["simulate", "clients=4", "rounds=1"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip() == "fedpeft: error: model 'x': broken", err
    assert list(tmp_path.rglob("*")) == []

    monkeypatch.setattr(simulation, "run", failing_run(True))
    code, out, err = run_cli(["simulate", "clients=4", "rounds=1"], tmp_path, monkeypatch, capsys)
    assert code == 2
    (run_dir,) = (tmp_path / "runs" / "default").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "cli.log", "metrics.jsonl"]


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
    for group in (
        "strategy: dp_lora, fed_sb, fedavg, federa, fedex_lora, fedsa_lora, ffa_lora", "peft: bitfit, dora, ia3, loha, lokr, lora, lora_xs",
        "model: minilm, smollm2", "partition: dirichlet, iid, natural, shards", "engine: ray", "privacy: central, local, none, sample",
        "compression: bf16, fp16, int4, int8, none, topk",
    ):
        assert group in out, out
    for key in (
        "clients: 10", "rounds:", "fraction:", "seed:", "local_steps:", "num_gpus:", "ray_address:", "failure_rate:", "target_epsilon:", "topk_fraction:",
    ):
        assert key in out
    assert list(tmp_path.iterdir()) == []


def test_unknown_command(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["simulat"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "unknown command 'simulat'" in err


# ------------------------------------------------------------------ strategy.<key> a strategy does not read


def _compose(words):
    from fedpeft.composing import compose_config

    return compose_config(words)[0]


def _refusal(words) -> str:
    from fedpeft.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _compose(words)
    return str(e.value)


@pytest.mark.parametrize("words, line", [
    (["strategy=flora", "strategy.sparse_rounds=2"],
     "strategy.sparse_rounds=2: strategy=flora does not read it (only strategy=slora does); "
     "use strategy=slora, or leave strategy.sparse_rounds at its default 1"),
    (["strategy=flora", "strategy.density_down=0.5"],
     "strategy.density_down=0.5: strategy=flora does not read it (only strategy=flasc does); "
     "use strategy=flasc, or leave strategy.density_down at its default 0.25"),
    # a key several strategies read names them all; a bool and a null are written as they are typed
    (["strategy=flora", "strategy.r_max=96"],
     "strategy.r_max=96: strategy=flora does not read it (only strategy=ffa_lora | flexlora | raflora do); "
     "use strategy=ffa_lora | flexlora | raflora, or leave strategy.r_max at its default null"),
    (["strategy=fedavg", "strategy.prune=false"],
     "strategy.prune=false: strategy=fedavg does not read it (only strategy=hetlora does); use strategy=hetlora, or leave strategy.prune at its default true"),
    # two of them: the first is named
    (["strategy=slora", "strategy.density_up=0.5", "strategy.first=A"],
     "strategy.density_up=0.5: strategy=slora does not read it (only strategy=flasc does); "
     "use strategy=flasc, or leave strategy.density_up at its default 0.25"),
])
def test_a_strategy_key_the_chosen_strategy_does_not_read_is_refused_naming_it(words, line):
    assert _refusal(words) == line


def test_a_value_no_strategy_takes_and_the_keys_with_their_own_refusal_keep_their_lines():
    """The checks that come first stay: a value that is wrong for every strategy, FedProx's and SCAFFOLD's own lines."""
    assert _refusal(["strategy=fedavg", "strategy.density_down=1.5"]) == "strategy.density_down: must be a number in (0, 1] (1: dense), got 1.5"
    assert _refusal(["strategy=flora", "strategy.prox_mu=0.1"]).startswith("strategy.prox_mu: FedProx's proximal term does not work with strategy=flora")
    assert _refusal(["strategy=flora", "strategy.scaffold=true"]).startswith("strategy.scaffold: SCAFFOLD's control variates do not work with strategy=flora")


@pytest.mark.parametrize("words, expected", [
    (["strategy=slora", "strategy.sparse_rounds=2"], {"sparse_rounds": 2}),
    (["strategy=flasc", "strategy.density_down=0.5"], {"density_down": 0.5}),
    # a key several strategies read works with each of them (r_max; prox_mu, weighting: with nearly all)
    (["strategy=ffa_lora", "strategy.r_max=96", "ranks=heavy_tail"], {"r_max": 96}),
    (["strategy=flexlora", "strategy.r_max=96", "ranks=heavy_tail"], {"r_max": 96}),
    (["strategy=raflora", "strategy.r_max=96", "ranks=heavy_tail"], {"r_max": 96}),
    (["strategy=hetlora", "strategy.prox_mu=0.01", "strategy.weighting=uniform"], {"prox_mu": 0.01, "weighting": "uniform"}),
    (["strategy=flora", "strategy.weighting=uniform"], {"weighting": "uniform"}),
])
def test_a_strategy_key_the_chosen_strategy_reads_reaches_it(words, expected):
    import strategies
    from fedpeft.serverapp import strategy_kwargs

    cfg = _compose(words)
    s = strategies.build(cfg.strategy.name, **strategy_kwargs(cfg))
    assert {k: getattr(s, k) for k in expected} == expected


def test_every_strategy_composes_at_its_defaults_and_with_every_other_key_typed_at_its_default():
    """No strategy is broken by the check: its own option passes, and so does every key it does not
    read when it is given at the value the option gives it (an experiment's saved config.yaml has them all)."""
    import strategies
    from fedpeft.config import strategy_key_defaults, strategy_readers, unread_strategy_keys

    readers, defaults = strategy_readers(), strategy_key_defaults()
    assert readers["sparse_rounds"] == ("slora",) and readers["density_down"] == ("flasc",)
    assert readers["weighting"] == tuple(strategies.REGISTRY)  # a key every strategy reads is never refused
    assert set(readers) == set(defaults)  # every key of the schema but name has a strategy that reads it
    assert len(strategies.REGISTRY) >= 14
    for name, cls in strategies.REGISTRY.items():
        cfg = _compose([f"strategy={name}"])
        assert cfg.strategy.name == name and unread_strategy_keys(cfg.strategy) == []
        others = [k for k in defaults if k not in cls.config_fields()]
        words = [f"strategy.{k}={'null' if defaults[k] is None else str(defaults[k]).lower() if isinstance(defaults[k], bool) else defaults[k]}"
                 for k in others]
        assert {k: _compose([f"strategy={name}", *words]).strategy[k] for k in others} == {k: defaults[k] for k in others}, name


def test_deploy_and_flwr_run_refuse_it_too(tmp_path, monkeypatch, capsys):
    import json

    from fedpeft import runconfig
    from fedpeft.config import ConfigError

    line = config_error(["deploy", "strategy=flora", "strategy.sparse_rounds=2"], tmp_path, monkeypatch, capsys)
    assert "strategy.sparse_rounds=2: strategy=flora does not read it (only strategy=slora does)" in line, line
    with pytest.raises(ConfigError, match=r"^strategy\.density_down=0\.5: strategy=flora does not read it \(only strategy=flasc does\)"):
        runconfig.load({"overrides": "strategy=flora strategy.density_down=0.5"})  # flwr run --run-config "overrides='...'"
    config = json.loads(runconfig.to_run_config(_compose(["strategy=flora"]), tmp_path / "run")["config"])
    config["strategy"]["sparse_rounds"] = 2  # a launcher's resolved config
    with pytest.raises(ConfigError, match=r"^strategy\.sparse_rounds=2: strategy=flora does not read it"):
        runconfig.load({"config": json.dumps(config)})


def test_an_old_run_saved_with_a_key_its_strategy_did_not_read_still_resumes_and_evaluates(tmp_path, monkeypatch, capsys, caplog):
    """A run saved before such keys were refused ran without them: resume and eval read them at their
    defaults (with a warning); setting one again on resume is refused."""
    import json

    import torch
    from omegaconf import OmegaConf

    from fedpeft import cli, simulation
    from fedpeft.evaluation import run_config

    config = OmegaConf.to_container(_compose(["strategy=flora", "clients=4", "rounds=4"]), resolve=True)
    config["strategy"]["sparse_rounds"] = 2
    d = tmp_path / "run"
    (d / "state").mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "accuracy": 0.5}) + "\n" for r in range(3)))
    torch.save({"round": 2, "config": config, "adapter": {"w": torch.ones(3)}}, d / "state" / "server.pt")
    assert run_config(d, []).strategy.sparse_rounds == 1
    started = []
    monkeypatch.setattr(simulation, "run", lambda *a, **kw: started.append(a))
    assert cli.main(["simulate", f"resume={d}"]) == 0 and len(started) == 1
    assert started[0][0].strategy.name == "flora" and started[0][0].strategy.sparse_rounds == 1
    assert "strategy.sparse_rounds=2: strategy=flora does not read it" in caplog.text
    capsys.readouterr()
    assert cli.main(["simulate", f"resume={d}", "strategy.sparse_rounds=3"]) == 2 and len(started) == 1
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "strategy.sparse_rounds=3: strategy=flora does not read it (only strategy=slora does)" in err[0], err

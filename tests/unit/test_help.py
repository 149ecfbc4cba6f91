"""``fedpeft simulate --help``: every config key with its default and a one-line description, fast
(no peft, Ray, transformers or datasets imported)."""

import subprocess
import sys

from omegaconf import OmegaConf

from fedpeft import help
from fedpeft.config import schema_keys
from tests.harness import run_cli


def test_every_key_has_a_description():
    docs = help.key_docs()
    missing = [k for k in schema_keys() if not docs.get(k)]
    assert missing == [], f"keys without a description (a comment beside their field): {missing}"


def test_field_docs_read_the_comment_block_above_and_beside_a_field():
    from dataclasses import dataclass

    @dataclass
    class Toy:
        # The first line
        # and its continuation.
        a: int = 1
        b: int = 2  # beside b

        c: int = 3

    assert help.field_docs(Toy) == {"a": "The first line and its continuation.", "b": "beside b"}


def test_help_shows_defaults_descriptions_and_groups(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["simulate", "--help"], tmp_path, monkeypatch, capsys)
    assert code == 0
    lines = out.splitlines()
    assert "strategy: dp_lora, fed_sb, fedavg, federa, fedex_lora, fedsa_lora, ffa_lora, flasc, flexlora, flora, hetlora, raflora, rolora, slora" in lines
    assert any(line.startswith("peft: bitfit, dora, ia3") for line in lines)
    assert "clients: 10  # How many clients (data partitions) the federation has" in lines
    assert any(line.startswith("  gamma: 0.99  # [hetlora] γ:") for line in lines)  # a key only some strategies read names them
    assert any(line.startswith("  local_steps: 20  # Optimizer steps each client takes per round") for line in lines)
    # the defaults shown are the composed config's (configs/ groups over the schema), e.g. the model group's target modules
    assert "  target_modules: ['query', 'value']  # The modules the adapter wraps, by name or name suffix (peft's target_modules)" in lines
    assert list(tmp_path.iterdir()) == []


def test_help_shows_the_composed_defaults():
    from hydra import compose, initialize_config_dir

    from fedpeft.config import CONFIG_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="config")
    text = help.text()
    for key in ("rounds", "train.lr", "model.name", "data.eval_samples", "privacy.delta"):
        leaf = key.rsplit(".", 1)[-1]
        assert f"{leaf}: {OmegaConf.select(cfg, key)}" in text, key


def test_help_imports_nothing_heavy():
    code = ("import sys; from fedpeft.cli import main; main(['simulate', '--help']); "
            "heavy = [m for m in ('peft', 'ray', 'transformers', 'datasets', 'flwr', 'opacus', 'wandb') if m in sys.modules]; "
            "print('HEAVY', heavy, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr[-2000:]
    assert "== Keys, their defaults and what they mean ==" in r.stdout

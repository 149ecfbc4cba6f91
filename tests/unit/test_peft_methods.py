"""Every PEFT method through one seam (fedpeft/methods), without a model: the registry and its config
groups, and the config checks that refuse a method where it cannot work, in one line (what each
method trains and sends, its federations and its reloaded checkpoints: tests/app/test_peft_methods.py).
"""

from __future__ import annotations

import re

import pytest

from fedpeft import methods
from fedpeft.composing import compose
from fedpeft.config import ConfigError

ALL = ["lora", "rslora", "dora", "loha", "lokr", "vera", "ia3", "prompt_tuning", "prefix_tuning", "bitfit", "lora_xs"]


def test_every_listed_method_is_registered_with_a_config_group():
    from hydra.core.config_store import ConfigStore

    from fedpeft.config import register

    register()  # the peft group is generated from the registered methods
    assert sorted(methods.METHODS) == sorted(ALL)
    assert sorted(n.removesuffix(".yaml") for n in ConfigStore.instance().repo["peft"]) == sorted(ALL)
    assert methods.lora_update_methods() == ["lora", "rslora", "dora"]


@pytest.mark.parametrize("strategy", ["ffa_lora", "hetlora", "flora", "flexlora"])
@pytest.mark.parametrize("method", ["ia3", "loha", "prompt_tuning"])
def test_lora_structured_strategies_refuse_other_methods_in_one_line(strategy, method):
    with pytest.raises(ConfigError) as e:
        compose([f"strategy={strategy}", f"peft={method}"])
    msg = str(e.value)
    assert "\n" not in msg and f"strategy={strategy}" in msg and f"peft={method}" in msg, msg


@pytest.mark.parametrize("strategy", ["ffa_lora", "hetlora", "flora", "flexlora"])
def test_lora_structured_strategies_take_dora_and_rslora(strategy):
    for method in ("dora", "rslora"):
        assert compose([f"strategy={strategy}", f"peft={method}"]).peft.name == method


def test_the_cohort_engine_refuses_methods_it_cannot_batch():
    with pytest.raises(ConfigError, match=r"engine.kind: the cohort engine batches peft=lora \| rslora only, not peft=ia3"):
        compose(["engine.kind=cohort", "peft=ia3"])


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match="peft"):
        compose(["peft.name=adapterhub"])


@pytest.mark.parametrize("option, method, readers", [
    ("peft.u=3", "lora", "lora_xs"),
    ("peft.num_virtual_tokens=4", "ia3", "prompt_tuning | prefix_tuning"),
    ("peft.vera_rank=16", "prefix_tuning", "vera"),
    ("peft.feedforward_modules=[output.dense]", "vera", "ia3"),
])
def test_an_option_the_method_does_not_read_is_refused_in_one_line(option, method, readers):
    key = option.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: applies to peft={re.escape(readers)} only, not peft={method}$"):
        compose([f"peft={method}", option])
    assert compose([f"peft={readers.split(' | ')[0]}", option]).peft.name == readers.split(" | ")[0]


@pytest.mark.parametrize("name", [n for n in ALL if not methods.get(n).opacus])
def test_sample_level_dp_refuses_methods_without_opacus_gradients_in_one_line(name):
    """Opacus 1.6 computes no per-example gradient for these peft layers (measured: the training
    step raises); the config says so before anything runs. Update-level DP takes them."""
    with pytest.raises(
        ConfigError, match=rf"privacy.mode: sample-level DP-SGD needs Opacus's per-example gradients, which Opacus 1.6 lacks for peft={name}'s layers"
    ):
        compose([f"peft={name}", "privacy=sample", "privacy.noise_multiplier=0.5"])
    assert compose([f"peft={name}", "privacy=local", "privacy.noise_multiplier=0.5"]).peft.name == name


def test_fed_sb_selects_lora_xs_and_refuses_other_methods():
    assert compose(["strategy=fed_sb"]).peft.name == "lora_xs"
    with pytest.raises(ConfigError, match=r"peft.name: strategy=fed_sb trains peft=lora_xs only, not peft=lora"):
        compose(["strategy=fed_sb", "peft=lora"])

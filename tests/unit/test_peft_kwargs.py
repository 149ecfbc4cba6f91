"""``peft.kwargs``: peft's own settings passed to the method's peft config class, checked against
its fields before anything loads; what fedpeft sets itself is refused naming fedpeft's key."""

from types import SimpleNamespace as NS

import pytest

from fedpeft import methods
from tests.harness import run_cli

MODEL = NS(task="causal_lm", rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def peft(name="lora", **kwargs):
    return NS(name=name, kwargs=kwargs, num_virtual_tokens=16, vera_rank=256, feedforward_modules=[], u=None)


def test_kwargs_reach_peft_config_and_leave_fedpeft_settings_alone():
    base = methods.peft_config(methods.get("lora"), MODEL, peft())
    cfg = methods.peft_config(methods.get("lora"), MODEL, peft(layers_to_transform=[0, 2], layers_pattern="layers"))
    assert base.layers_to_transform is None
    assert cfg.layers_to_transform == [0, 2] and cfg.layers_pattern == "layers"
    assert (cfg.r, cfg.lora_alpha, sorted(cfg.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    vera = methods.peft_config(methods.get("vera"), MODEL, peft("vera", d_initial=0.5))
    assert vera.d_initial == 0.5 and vera.r == 256


@pytest.mark.parametrize("name, kwargs, expected", [
    ("lora", {"lora_alpah": 3}, "peft.kwargs.lora_alpah: LoraConfig (peft=lora) has no setting 'lora_alpah'; did you mean lora_alpha"),
    ("lora", {"r": 16}, "peft.kwargs.r: fedpeft sets r for peft=lora itself; set model.rank instead"),
    ("lora", {"lora_dropout": 0.1}, "set model.dropout instead"),  # equal to peft's default 0.0 here: refused by name
    ("lora", {"target_modules": ["o_proj"]}, "set model.target_modules instead"),
    ("lora", {"use_dora": True}, "set peft=dora instead"),
    ("vera", {"r": 8}, "set peft.vera_rank instead"),
    ("lora", {"init_lora_weights": "pissa"}, "peft.kwargs.init_lora_weights: fedpeft draws a fresh adapter's A from the seed"),
    ("lora", {"bias": "all"}, "to train bias terms use peft=bitfit"),
    ("lora", {"rank_pattern": {"q_proj": 8}}, "peft.kwargs.rank_pattern: one rank per module is not supported"),
    # set by the method from its own needs (BitFit's placeholder), not a fedpeft key
    ("bitfit", {"lora_alpha": 4}, "set model.alpha instead"),
    ("vera", {"save_projection": True}, "fedpeft sets save_projection for peft=vera itself (the method needs its value)"),
])
def test_refused_kwargs_name_the_key(name, kwargs, expected):
    with pytest.raises(ValueError) as e:
        methods.peft_config(methods.get(name), MODEL, peft(name, **kwargs))
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("words, expected", [
    ("+peft.kwargs.lora_alph=3", "peft.kwargs.lora_alph: LoraConfig (peft=lora) has no setting 'lora_alph'; did you mean lora_alpha"),
    ("+peft.kwargs.r=16", "peft.kwargs.r: fedpeft sets r for peft=lora itself; set model.rank instead"),
    ("peft.kwargs.layers_to_transform=[0]", "peft.kwargs.layers_to_transform: peft's own settings are added with a '+': +peft.kwargs.layers_to_transform=<value>"),
])
def test_cli_refuses_bad_kwargs_in_one_line(words, expected, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["simulate", *words.split()], tmp_path, monkeypatch, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == f"fedpeft: config error: {expected}" or expected in lines[0], lines[0]
    assert list(tmp_path.rglob("*")) == []


def test_kwargs_compose_and_shape_the_model(tmp_path):
    """``+peft.kwargs.layers_to_transform=[0]`` composes, validates, and peft adapts only layer 0 of MiniLM."""
    from fedpeft.composing import compose
    from fedpeft.models import build

    cfg = compose(["+peft.kwargs.layers_to_transform=[0]", f"hydra.run.dir={tmp_path / 'run'}"])
    assert list(cfg.peft.kwargs.layers_to_transform) == [0]
    lm = build(cfg.model, num_labels=2, device="cpu", peft_cfg=cfg.peft)
    assert lm.modules and all(".layer.0." in m for m in lm.modules), lm.modules
    assert len(lm.modules) == len(cfg.model.target_modules)

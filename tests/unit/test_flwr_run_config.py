"""The run config as ``flwr run`` hands it to the apps (issue 24, part 5): a bad override is one
line, not Hydra's and OmegaConf's chained tracebacks, and an empty ``run-dir`` is an absolute path.

Both failed on the code before (checked): the ConfigError came ``from`` Hydra's
``ConfigCompositionException``, a 71-line traceback (85 in the SuperLink's log) with Hydra's
misleading ``+train.lrr`` hint; the run dir was ``runs/flwr/<time>``, relative to the SuperLink's
working directory, and printed so.
"""

import traceback
from pathlib import Path

import pytest

from fedpeft import runconfig
from fedpeft.config import ConfigError


@pytest.mark.parametrize("read", [runconfig.load, runconfig.settings], ids=["server", "client"])
def test_an_unknown_override_key_is_one_line_without_the_chained_tracebacks(read):
    with pytest.raises(ConfigError) as e:
        read({"overrides": "train.lrr=0.01"})
    assert str(e.value) == "unknown key 'train.lrr' (Key 'lrr' not in 'TrainConfig'); did you mean 'train.lr'?"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    text = "".join(traceback.format_exception(e.value))
    # what Flower logs under "ServerApp raised an exception": this module's frames and the line
    assert "direct cause" not in text and "During handling" not in text and "+train.lrr" not in text, text
    assert "hydra" not in text.lower() and "omegaconf" not in text.lower(), text
    assert len(text.splitlines()) <= 8, text


def test_an_empty_run_dir_is_absolute_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, spec = runconfig.load({"overrides": "", "run-dir": ""})
    assert spec.run_dir.is_absolute(), spec.run_dir
    assert spec.run_dir.parent == tmp_path.resolve() / "runs" / "flwr"
    _, spec = runconfig.load({"overrides": "", "run-dir": "mine/run1"})
    assert spec.run_dir == tmp_path.resolve() / "mine" / "run1"
    _, spec = runconfig.load({"overrides": "", "run-dir": str(tmp_path / "abs")})
    assert spec.run_dir == Path(tmp_path / "abs").resolve()
